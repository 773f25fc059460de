//! Path normalisation, before the route match.
//!
//! The path that is matched is the path that is forwarded: a request is either canonicalised
//! (percent-encoded unreserved characters such as `%72` are decoded) or refused with 400. It is
//! never matched one way and forwarded another, which is how path-confusion bypasses work.
//! Refused: `.`/`..` segments (also as `%2e`), empty segments (`//`), encoded `/` or `\`
//! (`%2f`, `%5c`), raw backslashes, `;` path parameters, NUL and control bytes, raw non-ASCII
//! bytes (UTF-8 must be percent-encoded), bad `%` escapes.
//!
//! The common case (nothing to decode) returns the input borrowed: no allocation.

use std::borrow::Cow;

/// Why a path was refused (the client-facing message).
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidPath(pub &'static str);

/// Returns the canonical form of `path` or why it is refused.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(InvalidPath("path must start with '/'"));
    }
    let mut needs_decode = false;
    // An escape of a byte ≥ 0x80 is kept encoded, but what it decodes to must be UTF-8 (with the
    // raw bytes around it): `%c0%ae` is an overlong '.', which a lenient upstream decoder turns
    // into a `..` segment the route match never saw.
    let mut high_escape = false;
    // One pass: ordinary bytes are skipped through a table; a `/` ends a segment, checked
    // there (on the raw form: when an escape is decoded below, the decoded form is checked
    // again, so `%2e%2e` is caught like `..`); the special bytes are looked at.
    let (mut i, mut segment) = (1, 1);
    while let Some(skip) = bytes[i..].iter().position(|&b| STOP[b as usize]) {
        i += skip;
        match bytes[i] {
            b'/' => {
                check_segment(&bytes[segment..i], false)?;
                i += 1;
                segment = i;
            }
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(InvalidPath("truncated percent-escape in path"))?;
                let v = decode_hex(hex).ok_or(InvalidPath("invalid percent-escape in path"))?;
                if v == b'/' || v == b'\\' {
                    return Err(InvalidPath("encoded '/' or '\\' in path"));
                }
                if v < 0x20 || v == 0x7f {
                    return Err(InvalidPath("control character in path"));
                }
                // Decoded (unreserved) or rewritten with upper-case hex (RFC 3986 §6.2.2.1),
                // so that one resource has one spelling for routes, cache keys and upstreams.
                if is_unreserved(v) || hex.iter().any(u8::is_ascii_lowercase) {
                    needs_decode = true;
                }
                high_escape |= v >= 0x80;
                i += 3;
            }
            b'\\' => return Err(InvalidPath("backslash in path")),
            b';' => return Err(InvalidPath("';' path parameters are not accepted")),
            // A request target is ASCII (RFC 3986 §2): raw UTF-8 must come percent-encoded,
            // so that a path has one spelling (`caf%C3%A9`, never `café` too).
            0x80.. => return Err(InvalidPath("non-ASCII byte in path: percent-encode it")),
            _ => return Err(InvalidPath("control character in path")),
        }
    }
    if high_escape && !decodes_to_utf8(bytes) {
        return Err(InvalidPath("path is not UTF-8 after percent-decoding"));
    }
    if !needs_decode {
        check_segment(&bytes[segment..], true)?;
        return Ok(Cow::Borrowed(path));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let v = decode_hex(&bytes[i + 1..i + 3]).expect("checked above");
            if is_unreserved(v) {
                out.push(v);
            } else {
                // Keep other escapes, with upper-case hex as RFC 3986 recommends.
                out.push(b'%');
                out.push(bytes[i + 1].to_ascii_uppercase());
                out.push(bytes[i + 2].to_ascii_uppercase());
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let out = String::from_utf8(out).map_err(|_| InvalidPath("path is not UTF-8"))?;
    check_segments(out.as_bytes())?;
    Ok(Cow::Owned(out))
}

/// Whether `path` (its escapes checked well-formed) is UTF-8 with every escape decoded:
/// overlong forms, surrogates, stray continuation bytes and truncated sequences are not.
fn decodes_to_utf8(path: &[u8]) -> bool {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        match (path[i], path.get(i + 1..i + 3).and_then(decode_hex)) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::str::from_utf8(&out).is_ok()
}

/// Bytes the pass must look at: `/` (a segment ends), `%`, `\\`, `;`, control characters.
static STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b < 0x20
            || b >= 0x7f
            || b == b'/' as usize
            || b == b'%' as usize
            || b == b'\\' as usize
            || b == b';' as usize;
        b += 1;
    }
    t
};

/// Refuses a `.` or `..` segment, and an empty one unless it is the last (a trailing slash).
fn check_segment(seg: &[u8], last: bool) -> Result<(), InvalidPath> {
    if seg == b"." || seg == b".." {
        return Err(InvalidPath("'.' and '..' segments are not accepted"));
    }
    if seg.is_empty() && !last {
        return Err(InvalidPath("empty path segment ('//')"));
    }
    Ok(())
}

/// Refuses `.`/`..` segments and empty ones other than a trailing slash (`p` starts with `/`).
fn check_segments(p: &[u8]) -> Result<(), InvalidPath> {
    let mut segments = p[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        check_segment(seg, segments.peek().is_none())?;
    }
    Ok(())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn decode_hex(h: &[u8]) -> Option<u8> {
    let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    Some(d(*h.first()?)? << 4 | d(*h.get(1)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalises_or_refuses() {
        assert!(matches!(normalize("/api/v1/orders").unwrap(), Cow::Borrowed(_)));
        assert_eq!(normalize("/api/v1/%72isk/status").unwrap(), "/api/v1/risk/status");
        assert_eq!(normalize("/a/b%20c").unwrap(), "/a/b%20c");
        assert_eq!(normalize("/a/b%7e%20").unwrap(), "/a/b~%20");
        assert_eq!(normalize("/api/v1/orders/").unwrap(), "/api/v1/orders/");
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("/a/.b/..c/...").unwrap(), "/a/.b/..c/...");
        // UTF-8 escapes stay as they are (upper-cased when something else is decoded).
        assert!(matches!(normalize("/m/caf%C3%A9").unwrap(), Cow::Borrowed(_)));
        // Lower-case hex is rewritten even when nothing is decoded: one spelling per path.
        assert_eq!(normalize("/m/caf%c3%a9").unwrap(), "/m/caf%C3%A9");
        assert_eq!(normalize("/m/%ef%bc%8f").unwrap(), "/m/%EF%BC%8F");
        assert_eq!(normalize("/%6d/caf%c3%a9/x").unwrap(), "/m/caf%C3%A9/x");
        // Raw non-ASCII is refused wherever it is: it must come percent-encoded.
        for raw in ["/m/caf\u{e9}", "/%6d/caf%c3%a9/\u{e9}", "/pub/\u{202e}", "/\u{7f}"] {
            assert!(normalize(raw).is_err(), "{raw:?}");
        }
        assert_eq!(normalize("/m/%E2%82%AC").unwrap(), "/m/%E2%82%AC");
        for bad in [
            "",
            "api",
            "/a/../b",
            "/a/./b",
            "/a/..",
            "/a//b",
            "//a",
            "/a/%2e%2e/b",
            "/a/%2E/b",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a;x",
            "/a%00",
            "/a%zz",
            "/a%2",
            "/a/.%2e/b",
            "/a\x01b",
            "/a\x7f",
            "/a\tb",
            "/a/b/..",
            "/a/b/.",
            "/./a",
            // Not UTF-8 once decoded: overlong '.', '/' and NUL, a surrogate, a truncated
            // sequence, a byte UTF-8 never uses, a stray continuation byte, an escape that
            // breaks a raw character.
            "/pub/%c0%ae%c0%ae/admin",
            "/a/%e0%80%ae",
            "/a%c0%afb",
            "/a%c0%80",
            "/a/%ed%a0%80",
            "/a/%e2%82",
            "/a/%ff",
            "/a/%80",
            "/a/%c3\u{e9}",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The earlier two-pass form: escapes first, then the segments of the decoded path (the
    /// path unchanged when no escape is decoded).
    fn reference(path: &str) -> Result<String, ()> {
        let b = path.as_bytes();
        if b.first() != Some(&b'/') {
            return Err(());
        }
        let mut decoded = false;
        let mut out = Vec::new();
        // Every escape decoded: must be UTF-8.
        let mut full = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    let v = b.get(i + 1..i + 3).and_then(decode_hex).ok_or(())?;
                    if v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f {
                        return Err(());
                    }
                    full.push(v);
                    if is_unreserved(v) {
                        decoded = true;
                        out.push(v);
                    } else {
                        decoded |= b[i + 1..i + 3].iter().any(u8::is_ascii_lowercase);
                        out.extend([b'%', b[i + 1].to_ascii_uppercase(), b[i + 2].to_ascii_uppercase()]);
                    }
                    i += 3;
                }
                c if c < 0x20 || c == 0x7f || c == b'\\' || c == b';' => return Err(()),
                c => {
                    out.push(c);
                    full.push(c);
                    i += 1;
                }
            }
        }
        if std::str::from_utf8(&full).is_err() {
            return Err(());
        }
        let segs: Vec<&[u8]> = out[1..].split(|&c| c == b'/').collect();
        for (n, seg) in segs.iter().enumerate() {
            if *seg == b"." || *seg == b".." || (seg.is_empty() && n + 1 < segs.len()) {
                return Err(());
            }
        }
        if decoded { String::from_utf8(out).map_err(|_| ()) } else { Ok(path.to_string()) }
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_two_pass_one_on_every_short_path() {
        // Every path of up to 6 bytes over an alphabet that makes segments, dots, escapes
        // (`%2e` is '.', `%2f` '/', `%72` 'r', `%20` kept) and refused bytes.
        let alphabet = [b'/', b'.', b'a', b'%', b'2', b'e', b'f', b';', b'7'];
        let mut path = Vec::new();
        let mut checked = 0;
        for len in 1..=6u32 {
            for mut n in 0..alphabet.len().pow(len) {
                path.clear();
                path.push(b'/');
                for _ in 0..len {
                    path.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                let p = std::str::from_utf8(&path).unwrap();
                let got = normalize(p).map(|c| c.into_owned()).map_err(|_| ());
                assert_eq!(got, reference(p), "{p:?}");
                checked += 1;
            }
        }
        assert!(checked > 500_000);
    }
}
