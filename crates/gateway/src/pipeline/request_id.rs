//! Request IDs: accept a sane client `X-Request-ID`, otherwise make a UUIDv7.
//!
//! A client value is kept only if it is 1–128 characters of `[A-Za-z0-9._-]`, so it is safe to
//! log, to put in a JSON body and to send upstream. UUIDv7 sorts by time, which helps when
//! grepping logs across services.

use crate::proxy::headers::Seen;
use http::{HeaderMap, HeaderName, HeaderValue};

/// The header carrying the request id, both ways.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest client-supplied id accepted.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// True when a client-supplied id may be reused as is.
pub fn is_valid(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_REQUEST_ID_LEN
        && v.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The client's id when it is valid (exactly one header), else a new UUIDv7.
pub fn from_headers(headers: &HeaderMap, seen: Seen) -> HeaderValue {
    if !seen.may_have(Seen::REQUEST_ID) {
        return generate();
    }
    let mut all = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(v), None) = (all.next(), all.next())
        && is_valid(v.as_bytes())
    {
        return v.clone();
    }
    generate()
}

/// A new UUIDv7 (RFC 9562) in its hyphenated form: 48 bits of Unix milliseconds, version 7,
/// 74 random bits. The random bits come from a thread-local generator, not the OS: no
/// `getrandom` system call per request (request ids are not secrets). Formatted here, straight
/// into the value's bytes.
pub fn generate() -> HeaderValue {
    let ms = crate::unix_ms() & 0xffff_ffff_ffff;
    let (a, b) = (crate::proxy::balance::random(), crate::proxy::balance::random());
    let hi = ms << 16 | 0x7000 | (a & 0x0fff);
    let lo = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let (mut h, mut l) = ([0u8; 16], [0u8; 16]);
    crate::pipeline::trace::hex16(&mut h, hi);
    crate::pipeline::trace::hex16(&mut l, lo);
    let mut out = [b'-'; 36];
    out[..8].copy_from_slice(&h[..8]);
    out[9..13].copy_from_slice(&h[8..12]);
    out[14..18].copy_from_slice(&h[12..]);
    out[19..23].copy_from_slice(&l[..4]);
    out[24..].copy_from_slice(&l[4..]);
    crate::header_value(&out).expect("hex digits and hyphens")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sane_ids_only() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123_x.y"));
        assert_eq!(from_headers(&h, Seen::UNKNOWN), "abc-123_x.y");
        for bad in ["", "a b", "a\"b", "<script>", &"x".repeat(129)] {
            let mut h = HeaderMap::new();
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = from_headers(&h, Seen::UNKNOWN);
            assert_ne!(id.as_bytes(), bad.as_bytes());
            assert_eq!(id.len(), 36);
        }
        let mut h = HeaderMap::new();
        h.append(&X_REQUEST_ID, HeaderValue::from_static("a"));
        h.append(&X_REQUEST_ID, HeaderValue::from_static("b"));
        assert_eq!(from_headers(&h, Seen::UNKNOWN).len(), 36, "two ids: make a new one");
        assert_eq!(from_headers(&HeaderMap::new(), Seen::UNKNOWN).len(), 36);
        let a = uuid::Uuid::parse_str(generate().to_str().unwrap()).unwrap();
        let b = uuid::Uuid::parse_str(generate().to_str().unwrap()).unwrap();
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, b);
        // The time is in the first 48 bits.
        let ms = u64::from_str_radix(&generate().to_str().unwrap().replace('-', "")[..12], 16).unwrap();
        assert!(crate::unix_ms().abs_diff(ms) < 60_000, "{ms}");
    }
}
