//! W3C Trace Context: `traceparent` propagated to upstreams with this hop as the new parent
//! (a new span id), or a new trace started when the client sent none or an invalid one.
//! `tracestate` passes through unchanged with a valid parent and is dropped otherwise
//! (W3C Trace Context §3.3). The trace id goes into the access log.

use crate::proxy::balance::random;
use http::{HeaderMap, HeaderName, HeaderValue};

/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

fn hex_ok(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

/// A parsed, valid incoming `traceparent`: (trace id, flags).
pub fn parse(v: &str) -> Option<(&str, &str)> {
    let mut it = v.trim().split('-');
    let (ver, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if ver.len() != 2 || ver == "ff" || !ver.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if ver == "00" && it.next().is_some() {
        return None;
    }
    (hex_ok(trace, 32) && hex_ok(parent, 16) && flags.len() == 2 && flags.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((trace, flags))
}

fn span_id() -> u64 {
    loop {
        let v = random();
        if v != 0 {
            return v;
        }
    }
}

/// Rewrites `traceparent` for the upstream and returns the trace id.
pub fn propagate(h: &mut HeaderMap) -> String {
    let mut parents = h.get_all(&TRACEPARENT).iter();
    let incoming = match (parents.next(), parents.next()) {
        (Some(v), None) => v.to_str().ok().and_then(parse).map(|(t, f)| (t.to_string(), f.to_string())),
        _ => None,
    };
    let (trace, flags) = match incoming {
        Some(t) => t,
        None => {
            h.remove(&TRACESTATE);
            (format!("{:016x}{:016x}", span_id(), random()), "01".to_string())
        }
    };
    let v = format!("00-{trace}-{:016x}-{flags}", span_id());
    if let Ok(hv) = HeaderValue::from_str(&v) {
        h.insert(&TRACEPARENT, hv);
    }
    trace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_trace_and_replaces_the_parent() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        h.insert(&TRACESTATE, HeaderValue::from_static("b25=x"));
        let t = propagate(&mut h);
        assert_eq!(t, "4bf92f3577b34da6a3ce929d0e0e4736");
        let out = h[&TRACEPARENT].to_str().unwrap();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && out.ends_with("-01"));
        assert!(!out.contains("00f067aa0ba902b7"), "a new parent span id");
        assert_eq!(h[&TRACESTATE], "b25=x");
        for bad in [
            "",
            "00-0000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert(&TRACESTATE, HeaderValue::from_static("orphan=1"));
        let t = propagate(&mut h);
        assert_eq!(t.len(), 32);
        assert!(parse(h[&TRACEPARENT].to_str().unwrap()).is_some());
        assert!(!h.contains_key(&TRACESTATE));
    }
}
