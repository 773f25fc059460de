//! Request validation before anything is sent upstream: target and header limits (414/431),
//! message framing (400 and close: the request-smuggling shapes), required headers (400),
//! content types (415), and JSON well-formedness and depth for `json` routes (400).

use crate::error::{ErrorKind, GatewayError};
use crate::proxy::headers::Seen;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

/// Limits checked on every request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest request target.
    pub max_uri: usize,
    /// Most headers.
    pub max_headers: usize,
    /// Largest header block (names + values).
    pub max_header_bytes: usize,
}

/// Target length, header count and size.
pub fn check_limits(parts: &Parts, l: &Limits, seen: Seen) -> Result<(), GatewayError> {
    let target = parts.uri.path_and_query().map(|pq| pq.as_str().len()).unwrap_or(0);
    if target > l.max_uri {
        return Err(GatewayError::new(ErrorKind::UriTooLong, "request target is too long"));
    }
    if parts.headers.len() > l.max_headers {
        return Err(GatewayError::new(ErrorKind::HeadersTooLarge, "too many request headers"));
    }
    if seen.headers_within(l.max_header_bytes) {
        return Ok(());
    }
    // `Authorization` is bounded by the JWT layer's own limit (a 401 names the real problem).
    let bytes: usize = parts
        .headers
        .iter()
        .filter(|(n, _)| *n != header::AUTHORIZATION)
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if bytes > l.max_header_bytes {
        return Err(GatewayError::new(ErrorKind::HeadersTooLarge, "request headers are too large"));
    }
    Ok(())
}

/// Whether a `Host` value is `uri-host [":" port]` (RFC 9112 §3.2, RFC 3986 §3.2.2) or empty:
/// a reg-name (unreserved, sub-delims, `%`) or a bracketed IP literal, then digits after `:`.
/// `Host: a b` or `Host: evil/../x` is refused with 400 (RFC 9112 §3.2: "MUST respond with a
/// 400") instead of reaching `X-Forwarded-Host` and the upstream.
pub fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(end) = v.iter().position(|&b| b == b']') else { return false };
        let inner = &v[1..end];
        if inner.is_empty() || !inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return false;
        }
        (&[][..], &v[end + 1..])
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &[][..]),
        }
    };
    let port_ok = port.is_empty() || (port[0] == b':' && port[1..].iter().all(u8::is_ascii_digit));
    port_ok && host.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host` (an absolute-form target does not
/// excuse its absence), and no request has several. (The native HTTP/1.1 engine checks this
/// while parsing; this is for hyper's engines. HTTP/2 requests carry `:authority` instead.)
pub fn check_host_count(parts: &http::request::Parts) -> Result<(), GatewayError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let bad = |m: &'static str| Err(GatewayError::new(ErrorKind::BadRequest, m).closing());
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => bad("several Host headers"),
        (None, None) if parts.version == http::Version::HTTP_11 => bad("missing Host header"),
        _ => Ok(()),
    }
}

/// A `tchar` of RFC 9110 §5.6.2 (the bytes of a token: field names, methods).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a request target's authority (HTTP/2's `:authority`, an absolute-form target): the
/// same grammar as `Host` ([`valid_host`]; so no user information, RFC 9113 §8.3.1, RFC 9110
/// §4.2.4), and over HTTP/2 a `Host` that names another host is refused (RFC 9113 §8.3.1: the
/// request is malformed) rather than letting one of the two win silently. Over HTTP/1.1 the
/// target's authority is used and `Host` ignored (RFC 9112 §3.2.2).
pub fn check_authority(authority: &str, h: &HeaderMap, version: http::Version) -> Result<(), GatewayError> {
    let bad = |m: &'static str| Err(GatewayError::new(ErrorKind::BadRequest, m));
    if !valid_host(authority.as_bytes()) {
        return bad("invalid authority in the request target");
    }
    if version == http::Version::HTTP_2
        && h.get_all(header::HOST).iter().any(|v| !v.as_bytes().eq_ignore_ascii_case(authority.as_bytes()))
    {
        return bad("Host differs from :authority");
    }
    Ok(())
}

/// Refuses ambiguous framing (RFC 9112 §6.1, §6.3): both `Content-Length` and
/// `Transfer-Encoding`, several `Content-Length` values, a non-numeric length, or a transfer
/// coding other than `chunked`; and a malformed `Host` ([`valid_host`]). The connection is
/// closed after the 400. (The native HTTP/1.1 connection checks the same while parsing.)
pub fn check_framing(h: &HeaderMap) -> Result<(), GatewayError> {
    let bad = |m: &'static str| Err(GatewayError::new(ErrorKind::BadRequest, m).closing());
    if h.get_all(header::HOST).iter().any(|v| !valid_host(v.as_bytes())) {
        return bad("invalid Host header");
    }
    let te = h.contains_key(header::TRANSFER_ENCODING);
    let mut cls = h.get_all(header::CONTENT_LENGTH).iter();
    let first = cls.next();
    if te && first.is_some() {
        return bad("both Content-Length and Transfer-Encoding");
    }
    if let Some(v) = first {
        if cls.next().is_some() {
            return bad("several Content-Length headers");
        }
        let s = v.to_str().unwrap_or("");
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return bad("invalid Content-Length");
        }
    }
    if te {
        let mut all = h.get_all(header::TRANSFER_ENCODING).iter();
        let one = all.next().and_then(|v| v.to_str().ok()).map(str::trim);
        if all.next().is_some() || !one.is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            return bad("unsupported Transfer-Encoding");
        }
    }
    Ok(())
}

/// Every header in `required` must be present.
pub fn check_required(h: &HeaderMap, required: &[HeaderName]) -> Result<(), GatewayError> {
    for r in required {
        if !h.contains_key(r) {
            return Err(GatewayError::new(ErrorKind::BadRequest, format!("missing required header {r}")));
        }
    }
    Ok(())
}

/// The value of a header that may come once at most: two of them (the gateway would act on one
/// and an upstream perhaps on the other) are 400. `label` names it in the message.
pub fn at_most_one<'a>(
    h: &'a HeaderMap,
    name: &HeaderName,
    label: &str,
) -> Result<Option<&'a HeaderValue>, GatewayError> {
    let mut values = h.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        _ => Err(GatewayError::new(ErrorKind::BadRequest, format!("more than one {label} header"))),
    }
}

/// When the route lists content types and the request has a body, its media type must be one.
/// A body with two `Content-Type` headers is refused on any route (400): the gateway would check
/// one and the upstream might act on the other.
pub fn check_content_type(h: &HeaderMap, has_body: bool, allowed: &[String]) -> Result<(), GatewayError> {
    if !has_body {
        return Ok(());
    }
    let first = at_most_one(h, &header::CONTENT_TYPE, "Content-Type")?;
    if allowed.is_empty() {
        return Ok(());
    }
    let media = first.and_then(|v| v.to_str().ok()).map(|v| v.split(';').next().unwrap_or("").trim());
    match media {
        Some(m) if allowed.iter().any(|a| a.eq_ignore_ascii_case(m)) => Ok(()),
        _ => Err(GatewayError::new(
            ErrorKind::UnsupportedMediaType,
            format!("Content-Type must be one of: {}", allowed.join(", ")),
        )),
    }
}

/// Well-formed JSON no deeper than `max_depth` (depth counted before parsing, so a deeply
/// nested document is refused in linear time without recursion).
pub fn check_json(body: &[u8], max_depth: usize) -> Result<(), GatewayError> {
    // JSON text is UTF-8 (RFC 8259 §8.1); serde_json's slice reader lets invalid bytes inside
    // skipped strings through, so the text is checked first and parsed as a `str`.
    let text = std::str::from_utf8(body)
        .map_err(|_| GatewayError::new(ErrorKind::BadRequest, "body is not valid JSON: not UTF-8"))?;
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for &b in body {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(GatewayError::new(ErrorKind::BadRequest, "JSON body is nested too deeply"));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| GatewayError::new(ErrorKind::BadRequest, format!("body is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn framing() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert!(check_framing(&h).is_ok());
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert!(check_framing(&h).is_err());
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(check_framing(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip, chunked"));
        assert!(check_framing(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("+5"));
        assert!(check_framing(&h).is_err());
    }

    #[test]
    fn host_counts() {
        let parts = |version, hosts: &[&'static str]| {
            let mut b = http::Request::builder().version(version).uri("/x");
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert!(check_host_count(&parts(http::Version::HTTP_11, &["gw"])).is_ok());
        assert!(check_host_count(&parts(http::Version::HTTP_11, &[])).is_err());
        assert!(check_host_count(&parts(http::Version::HTTP_11, &["gw", "gw"])).is_err());
        assert!(check_host_count(&parts(http::Version::HTTP_10, &[])).is_ok());
        assert!(check_host_count(&parts(http::Version::HTTP_2, &[])).is_ok());
        assert!(check_host_count(&parts(http::Version::HTTP_2, &["a", "b"])).is_err());
    }

    #[test]
    fn authorities() {
        let mut h = HeaderMap::new();
        assert!(check_authority("gw.example:8443", &h, http::Version::HTTP_2).is_ok());
        assert!(check_authority("user@gw.example", &h, http::Version::HTTP_2).is_err());
        assert!(check_authority("user@gw.example", &h, http::Version::HTTP_11).is_err());
        h.insert(header::HOST, http::HeaderValue::from_static("GW.example"));
        assert!(check_authority("gw.example", &h, http::Version::HTTP_2).is_ok());
        h.insert(header::HOST, http::HeaderValue::from_static("other.example"));
        assert!(check_authority("gw.example", &h, http::Version::HTTP_2).is_err());
        // HTTP/1.1 absolute form: Host is ignored.
        assert!(check_authority("gw.example", &h, http::Version::HTTP_11).is_ok());
    }

    #[test]
    fn hosts() {
        for ok in ["", "gw", "gw:8080", "api.b25.example", "127.0.0.1:1", "[::1]", "[::1]:443", "a-b_c~d", "h:"] {
            assert!(valid_host(ok.as_bytes()), "{ok:?}");
        }
        for bad in
            ["a b", "evil/../x", "a\\b", "u@h", "h?x", "h#x", "h:8o", "a:b:c", "[::1", "[]", "[zz]", "[::1]x", "\u{e9}"]
        {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::HOST, http::HeaderValue::from_static("a b"));
        assert!(check_framing(&h).is_err());
    }

    #[test]
    fn json() {
        assert!(check_json(br#"{"a":[1,{"b":"[[[["}]}"#, 3).is_ok());
        assert!(check_json(br#"{"a":[1,{"b":[]}]}"#, 4).is_ok());
        assert!(check_json(br#"{"a":[1,{"b":[[]]}]}"#, 4).is_err());
        assert!(check_json(b"{\"a\":", 8).is_err());
        assert!(check_json(&vec![b'['; 100_000], 32).is_err());
        assert!(check_json(br#"{"a":"\"{{{{"}"#, 1).is_ok());
        // Not UTF-8 inside a string (a stray byte, an overlong '.'): refused; UTF-8 is fine.
        assert!(check_json(b"{\"a\":\"\xff\"}", 8).is_err());
        assert!(check_json(b"{\"a\":\"\xc0\xae\"}", 8).is_err());
        assert!(check_json("{\"a\":\"caf\u{e9} \u{20ac}\"}".as_bytes(), 8).is_ok());
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        let allowed = vec!["application/json".to_string()];
        assert!(check_content_type(&h, false, &allowed).is_ok());
        assert!(check_content_type(&h, true, &allowed).is_err());
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("Application/JSON; charset=utf-8"));
        assert!(check_content_type(&h, true, &allowed).is_ok());
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(check_content_type(&h, true, &allowed).is_err());
        // Two Content-Type headers: 400 whatever the route allows, 415 is for one wrong type.
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        for allowed in [&allowed[..], &[]] {
            let e = check_content_type(&h, true, allowed).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::BadRequest);
        }
        assert!(check_content_type(&h, false, &allowed).is_ok(), "no body, no media type to check");
    }
}
