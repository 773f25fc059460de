//! Request validation before anything is sent upstream: target and header limits (414/431),
//! message framing (400 and close: the request-smuggling shapes), required headers (400),
//! content types (415), and JSON well-formedness and depth for `json` routes (400).

use crate::error::{ErrorKind, GatewayError};
use crate::proxy::headers::Seen;
use http::header::{self, HeaderMap, HeaderName};
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

/// Refuses ambiguous framing (RFC 9112 §6.1, §6.3): both `Content-Length` and
/// `Transfer-Encoding`, several `Content-Length` values, a non-numeric length, or a transfer
/// coding other than `chunked`. The connection is closed after the 400.
pub fn check_framing(h: &HeaderMap) -> Result<(), GatewayError> {
    let bad = |m: &'static str| Err(GatewayError::new(ErrorKind::BadRequest, m).closing());
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

/// When the route lists content types and the request has a body, its media type must be one.
pub fn check_content_type(h: &HeaderMap, has_body: bool, allowed: &[String]) -> Result<(), GatewayError> {
    if allowed.is_empty() || !has_body {
        return Ok(());
    }
    let media =
        h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(|v| v.split(';').next().unwrap_or("").trim());
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
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
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
    fn json() {
        assert!(check_json(br#"{"a":[1,{"b":"[[[["}]}"#, 3).is_ok());
        assert!(check_json(br#"{"a":[1,{"b":[]}]}"#, 4).is_ok());
        assert!(check_json(br#"{"a":[1,{"b":[[]]}]}"#, 4).is_err());
        assert!(check_json(b"{\"a\":", 8).is_err());
        assert!(check_json(&vec![b'['; 100_000], 32).is_err());
        assert!(check_json(br#"{"a":"\"{{{{"}"#, 1).is_ok());
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
    }
}
