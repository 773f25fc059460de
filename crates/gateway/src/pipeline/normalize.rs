//! Path normalisation, before the route match.
//!
//! The path that is matched is the path that is forwarded: a request is either canonicalised
//! (percent-encoded unreserved characters such as `%72` are decoded) or refused with 400. It is
//! never matched one way and forwarded another, which is how path-confusion bypasses work.
//! Refused: `.`/`..` segments (also as `%2e`), empty segments (`//`), encoded `/` or `\`
//! (`%2f`, `%5c`), raw backslashes, `;` path parameters, NUL and control bytes, bad `%` escapes.
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
    let mut i = 0;
    // Ordinary bytes are skipped through a table; only the special ones are looked at.
    while let Some(skip) = bytes[i..].iter().position(|&b| SPECIAL[b as usize]) {
        i += skip;
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(InvalidPath("truncated percent-escape in path"))?;
                let v = decode_hex(hex).ok_or(InvalidPath("invalid percent-escape in path"))?;
                if v == b'/' || v == b'\\' {
                    return Err(InvalidPath("encoded '/' or '\\' in path"));
                }
                if v < 0x20 || v == 0x7f {
                    return Err(InvalidPath("control character in path"));
                }
                if is_unreserved(v) {
                    needs_decode = true;
                }
                i += 3;
            }
            b'\\' => return Err(InvalidPath("backslash in path")),
            b';' => return Err(InvalidPath("';' path parameters are not accepted")),
            _ => return Err(InvalidPath("control character in path")),
        }
    }
    let out: Cow<'_, str> = if needs_decode {
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
        Cow::Owned(String::from_utf8(out).map_err(|_| InvalidPath("path is not UTF-8"))?)
    } else {
        Cow::Borrowed(path)
    };
    // Segment checks run on the decoded form so `%2e%2e` is caught like `..`.
    check_segments(out.as_bytes())?;
    Ok(out)
}

/// Bytes the first pass must look at: `%`, `\\`, `;`, control characters.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b < 0x20 || b == 0x7f || b == b'%' as usize || b == b'\\' as usize || b == b';' as usize;
        b += 1;
    }
    t
};

/// Refuses `.`/`..` segments and empty ones other than a trailing slash (`p` starts with `/`).
fn check_segments(p: &[u8]) -> Result<(), InvalidPath> {
    let mut start = 1;
    let ends = memchr::memchr_iter(b'/', &p[1..]).map(|i| i + 1).chain(std::iter::once(p.len()));
    for i in ends {
        let seg = &p[start..i];
        if seg == b"." || seg == b".." {
            return Err(InvalidPath("'.' and '..' segments are not accepted"));
        }
        if seg.is_empty() && i < p.len() {
            return Err(InvalidPath("empty path segment ('//')"));
        }
        start = i + 1;
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
        ] {
            assert!(normalize(bad).is_err(), "{bad:?} accepted");
        }
    }
}
