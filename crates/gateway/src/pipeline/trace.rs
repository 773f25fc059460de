//! W3C Trace Context: `traceparent` propagated to upstreams with this hop as the new parent
//! (a new span id), or a new trace started when the client sent none or an invalid one.
//! `tracestate` passes through unchanged with a valid parent and is dropped otherwise
//! (W3C Trace Context §3.3). The trace id goes into the access log.

use crate::proxy::balance::random;
use crate::proxy::headers::Seen;
use http::{HeaderMap, HeaderName};

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

/// The client's trace, when it sent exactly one valid `traceparent` (none or several start a
/// new trace): the trace id the access line records, also for a request the gateway answers
/// itself (a refusal, a cache hit), which starts no trace of its own.
pub fn incoming(h: &HeaderMap, seen: Seen) -> Option<TraceId> {
    incoming_with_flags(h, seen).map(|(t, _)| t)
}

fn incoming_with_flags(h: &HeaderMap, seen: Seen) -> Option<(TraceId, [u8; 2])> {
    let mut all = seen.may_have(Seen::TRACEPARENT).then(|| h.get_all(&TRACEPARENT).iter()).into_iter().flatten();
    let parent = match (all.next(), all.next()) {
        (Some(v), None) => v,
        _ => return None,
    };
    parent.to_str().ok().and_then(parse).map(|(t, f)| {
        let mut trace = [0u8; 32];
        trace.copy_from_slice(t.as_bytes());
        (TraceId(trace), [f.as_bytes()[0], f.as_bytes()[1]])
    })
}

/// A W3C trace id: 32 lowercase hex digits (kept on the stack: no allocation per request).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId([u8; 32]);

impl TraceId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits")
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Writes `v` as 16 lowercase hex digits (a byte at a time from a 256-entry table).
pub(crate) fn hex16(out: &mut [u8], v: u64) {
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
            i += 1;
        }
        t
    };
    for (pair, byte) in out[..16].chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair.copy_from_slice(&PAIRS[byte as usize]);
    }
}

/// A `traceparent` value (`00-<trace>-<span>-<flags>`), kept on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Traceparent([u8; 55]);

impl Traceparent {
    /// The value's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Wraps a value made elsewhere (tests).
    pub fn from_bytes(v: [u8; 55]) -> Self {
        Self(v)
    }
}

impl std::fmt::Debug for Traceparent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).unwrap_or("?"))
    }
}

/// This hop's trace context for the upstream.
#[derive(Debug)]
pub struct Hop {
    /// The trace id (the client's, or a new one).
    pub trace: TraceId,
    /// `traceparent` with a new span id as the parent.
    pub parent: Traceparent,
    /// The client's `tracestate` goes on: its `traceparent` was valid.
    pub keep_state: bool,
}

/// The trace context to send upstream: the client's trace continued with a new span id, or
/// a new trace when it sent no valid `traceparent` (its `tracestate` is then dropped).
pub fn next_hop(h: &HeaderMap, seen: Seen) -> Hop {
    let incoming = incoming_with_flags(h, seen);
    let keep_state = incoming.is_some();
    let (trace, flags) = incoming.unwrap_or_else(|| {
        let mut trace = [0u8; 32];
        hex16(&mut trace[..16], span_id());
        hex16(&mut trace[16..], random());
        (TraceId(trace), *b"01")
    });
    // 00-<trace>-<span>-<flags>
    let mut v = [0u8; 55];
    v[..3].copy_from_slice(b"00-");
    v[3..35].copy_from_slice(&trace.0);
    v[35] = b'-';
    hex16(&mut v[36..52], span_id());
    v[52] = b'-';
    v[53..].copy_from_slice(&flags);
    Hop { trace, parent: Traceparent(v), keep_state }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn keeps_the_trace_and_replaces_the_parent() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        h.insert(&TRACESTATE, HeaderValue::from_static("b25=x"));
        let hop = next_hop(&h, Seen::UNKNOWN);
        assert_eq!(hop.trace.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let out = std::str::from_utf8(hop.parent.as_bytes()).unwrap();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && out.ends_with("-01"));
        assert!(!out.contains("00f067aa0ba902b7"), "a new parent span id");
        assert!(parse(out).is_some());
        assert!(hop.keep_state);
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
        let hop = next_hop(&h, Seen::UNKNOWN);
        assert_eq!(hop.trace.as_str().len(), 32);
        assert!(parse(&format!("00-{}-00f067aa0ba902b7-01", hop.trace.as_str())).is_some());
        assert!(parse(std::str::from_utf8(hop.parent.as_bytes()).unwrap()).is_some());
        assert!(!hop.keep_state, "an orphan tracestate is dropped");
        // Two traceparents: invalid, a new trace.
        h.append(&TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        h.append(&TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_ne!(next_hop(&h, Seen::UNKNOWN).trace.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
