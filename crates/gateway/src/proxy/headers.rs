//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are removed both ways:
//! Connection, Keep-Alive, Proxy-Connection, Proxy-Authenticate, Proxy-Authorization, TE,
//! Trailer, Transfer-Encoding, Upgrade, and every header the Connection header names.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The hop-by-hop headers every message loses (besides those `Connection` names).
pub(crate) fn is_hop_by_hop(n: &HeaderName) -> bool {
    is_hop_by_hop_name(n.as_str().as_bytes())
}

/// [`is_hop_by_hop`] for a header name as received (any case): the one list of them.
pub(crate) fn is_hop_by_hop_name(n: &[u8]) -> bool {
    // By length first: most names are none of these.
    let one_of = |names: &[&[u8]]| names.iter().any(|h| n.eq_ignore_ascii_case(h));
    match n.len() {
        2 => one_of(&[b"te"]),
        7 => one_of(&[b"upgrade", b"trailer"]),
        10 => one_of(&[b"connection", b"keep-alive"]),
        16 => one_of(&[b"proxy-connection"]),
        17 => one_of(&[b"transfer-encoding"]),
        18 => one_of(&[b"proxy-authenticate"]),
        19 => one_of(&[b"proxy-authorization"]),
        _ => false,
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names (a handful) instead of nine hashed lookups: most messages carry
    // none of these.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    // Rare (an HTTP/1.0 peer, a client's Upgrade): the names are collected once.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .chain(h.keys().filter(|n| is_hop_by_hop(n)).cloned())
        .collect();
    for n in named {
        h.remove(n);
    }
}

/// `X-Forwarded-For` for the upstream: the client's list (comma-joined into one value) with
/// `peer` appended; just `peer` (no copy) when the client sent none.
pub fn forwarded_for(h: &HeaderMap, peer: &HeaderValue) -> HeaderValue {
    let mut prior = h.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).peekable();
    if prior.peek().is_none() {
        return peer.clone();
    }
    let mut s = prior.collect::<Vec<_>>().join(", ");
    s.push_str(", ");
    s.push_str(peer.to_str().unwrap_or_default());
    HeaderValue::from_str(&s).unwrap_or_else(|_| peer.clone())
}

/// Appends the peer to `X-Forwarded-For` and sets `X-Forwarded-Proto` and `X-Forwarded-Host`
/// (the client's `Host` or `:authority`) in the map (the WebSocket handshake; proxied
/// requests carry them as [`super::h1::HopHeaders`]). `peer` is the client's IP, formatted
/// once per connection.
pub fn set_forwarded(h: &mut HeaderMap, peer: &HeaderValue, tls: bool, host: Option<HeaderValue>) {
    let xff = forwarded_for(h, peer);
    h.insert(&X_FORWARDED_FOR, xff);
    h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(if tls { "https" } else { "http" }));
    match host {
        Some(host) => {
            h.insert(&X_FORWARDED_HOST, host);
        }
        None => {
            h.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_hop_by_hop_checks_agree() {
        let names = [
            "connection",
            "Keep-Alive",
            "PROXY-CONNECTION",
            "te",
            "Trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "Proxy-Authorization",
            "tea",
            "trailers",
            "content-length",
            "x-request-id",
            "host",
            "upgrade-insecure-requests",
            "x-connection",
            "keep-alive2",
        ];
        for n in names {
            let parsed = HeaderName::from_bytes(n.as_bytes()).unwrap();
            assert_eq!(is_hop_by_hop_name(n.as_bytes()), is_hop_by_hop(&parsed), "{n}");
        }
        assert_eq!(names.iter().filter(|n| is_hop_by_hop_name(n.as_bytes())).count(), 9);
    }

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret, bogus header"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic x"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
        ]
        .into_iter()
        .chain(["transfer-encoding", "upgrade"])
        {
            let mut h = HeaderMap::new();
            h.insert("x-keep", HeaderValue::from_static("1"));
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("v"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} survived: {h:?}");
        }
    }

    #[test]
    fn forwarded_appends_peer() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2, 3.3.3.3"));
        set_forwarded(&mut h, &HeaderValue::from_static("127.0.0.1"), true, Some(HeaderValue::from_static("gw")));
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "gw");
    }
}
