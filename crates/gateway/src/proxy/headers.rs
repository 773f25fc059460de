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

/// What the connection that parsed a request's head noted about it (the native HTTP/1.1
/// server, from the raw names): which of the headers looked up on every request
/// (`X-Request-Id`, `traceparent`, `X-Forwarded-For`, any hop-by-hop one) it came with, and
/// the head's size. A lookup of an absent name (a hashed probe each) or a pass over the names
/// is skipped. [`Seen::UNKNOWN`] (every other connection) says "look".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    names: u8,
    /// The head's bytes with one more per header line (see [`Seen::headers_within`]).
    head: u32,
}

impl Seen {
    /// Nothing known: every lookup happens.
    pub const UNKNOWN: Seen = Seen { names: u8::MAX, head: u32::MAX };
    /// None of the names seen (yet), an empty head.
    pub const NONE: Seen = Seen { names: 0, head: 0 };
    /// `X-Request-Id`.
    pub const REQUEST_ID: u8 = 1;
    /// `traceparent`.
    pub const TRACEPARENT: u8 = 2;
    /// `X-Forwarded-For`.
    pub const FORWARDED_FOR: u8 = 4;
    /// Any hop-by-hop header (`Connection` among them, so also any header it names).
    pub const HOP_BY_HOP: u8 = 8;

    /// Notes a header name as received (any case).
    pub fn note(&mut self, name: &[u8]) {
        // By length first: most names are none of these.
        self.names |= match name.len() {
            11 if name.eq_ignore_ascii_case(b"traceparent") => Self::TRACEPARENT,
            12 if name.eq_ignore_ascii_case(b"x-request-id") => Self::REQUEST_ID,
            15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => Self::FORWARDED_FOR,
            _ if is_hop_by_hop_name(name) => Self::HOP_BY_HOP,
            _ => 0,
        };
    }

    /// Notes the size of the head: `bytes` in all, `lines` header lines.
    pub fn note_size(&mut self, bytes: usize, lines: usize) {
        self.head = u32::try_from(bytes.saturating_add(lines)).unwrap_or(u32::MAX);
    }

    /// Whether the request may carry the header `bit` stands for.
    pub fn may_have(self, bit: u8) -> bool {
        self.names & bit != 0
    }

    /// Whether the header lines are known to take at most `limit` bytes counted as
    /// name + value + 4 each: a line is at least name + value + 3 bytes (`name:value` and
    /// CRLF), so the head's size plus one per line bounds the sum.
    pub fn headers_within(self, limit: usize) -> bool {
        self.head != u32::MAX && (self.head as usize) <= limit
    }
}

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
pub fn forwarded_for(h: &HeaderMap, peer: &HeaderValue, seen: Seen) -> HeaderValue {
    if !seen.may_have(Seen::FORWARDED_FOR) {
        return peer.clone();
    }
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
    for dropped in ["x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server"] {
        h.remove(dropped);
    }
    let xff = forwarded_for(h, peer, Seen::UNKNOWN);
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

/// The response headers a stored response replays (a cache entry, an idempotency record):
/// not `Date` and `Age` (the replay's own), `Set-Cookie` (one client's), the request's
/// `X-Request-Id`, or connection framing; each value a copy ([`detached`]).
pub fn kept_for_replay(h: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    h.iter()
        .filter(|(n, _)| {
            !matches!(
                *n,
                &header::DATE | &header::AGE | &header::SET_COOKIE | &header::CONNECTION | &header::TRANSFER_ENCODING
            ) && *n != crate::pipeline::request_id::X_REQUEST_ID
        })
        .map(|(n, v)| (n.clone(), detached(v)))
        .collect()
}

/// A copy of `v` in an allocation of its own, for a value kept after its response: a cache
/// entry, an idempotency record. Header values parsed by the HTTP/1.1 legs share their
/// connection's read buffer (8 KiB allocations, `proxy::h1`), so a kept clone would hold the
/// whole buffer alive: an order record or a small cache entry would cost 8 KiB or more instead
/// of its size, outside the cache's byte budget.
pub fn detached(v: &HeaderValue) -> HeaderValue {
    let mut d = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
    d.set_sensitive(v.is_sensitive());
    d
}

/// The separator that combines the field lines of `name` into one value: `"; "` for `Cookie`
/// (RFC 9113 §8.2.3, RFC 6265 §5.4), `", "` for every other field (RFC 9110 §5.3).
pub fn field_separator(name: &HeaderName) -> &'static [u8] {
    if name == header::COOKIE { b"; " } else { b", " }
}

/// The field lines of `name` combined into one value, in order, with [`field_separator`]; none
/// when there are none. A value of its own (never a slice of a connection buffer), so it may
/// be kept ([`detached`]).
pub fn combined(h: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut lines = h.get_all(name).iter();
    let first = lines.next()?;
    let Some(second) = lines.next() else { return Some(detached(first)) };
    let sep = field_separator(name);
    let mut buf = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(lines) {
        buf.extend_from_slice(sep);
        buf.extend_from_slice(v.as_bytes());
    }
    // Valid values joined by a visible separator are valid.
    HeaderValue::from_bytes(&buf).ok()
}

/// Whether the field lines of `name` in `h`, combined as [`combined`] does, equal `want`
/// (`None`: no such field), without building the combined value: a cache lookup compares a
/// `Vary`-named field this way on every hit.
pub fn combined_eq(h: &HeaderMap, name: &HeaderName, want: Option<&HeaderValue>) -> bool {
    let mut lines = h.get_all(name).iter();
    let Some(want) = want else { return lines.next().is_none() };
    let sep = field_separator(name);
    // No line at all is a missing field, which `want` is not.
    let Some(first) = lines.next() else { return false };
    let Some(mut rest) = want.as_bytes().strip_prefix(first.as_bytes()) else { return false };
    for v in lines {
        match rest.strip_prefix(sep).and_then(|r| r.strip_prefix(v.as_bytes())) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

/// HTTP/2 cookie crumbs (several `cookie` fields) joined into one `Cookie` line with `"; "`:
/// RFC 9113 §8.2.3 requires it before the request goes on in HTTP/1.1, and many upstream
/// frameworks read only the first line. Call it for HTTP/2 requests only; one lookup when
/// there is at most one `cookie` field.
pub fn join_cookie_crumbs(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    if let Some(v) = combined(h, &header::COOKIE) {
        h.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in lines {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn field_lines_combine_in_order_with_the_fields_separator() {
        let h = map(&[("x-lang", "en"), ("cookie", "a=1"), ("x-lang", "fr"), ("cookie", "b=2"), ("accept", "*/*")]);
        let name = |s: &str| HeaderName::from_bytes(s.as_bytes()).unwrap();
        assert_eq!(combined(&h, &name("x-lang")).unwrap(), "en, fr");
        assert_eq!(combined(&h, &header::COOKIE).unwrap(), "a=1; b=2");
        assert_eq!(combined(&h, &header::ACCEPT).unwrap(), "*/*");
        assert_eq!(combined(&h, &header::HOST), None);
        for (n, v) in [("x-lang", "en, fr"), ("cookie", "a=1; b=2"), ("accept", "*/*")] {
            assert!(combined_eq(&h, &name(n), Some(&HeaderValue::from_static(v))), "{n}");
        }
        for (n, v) in [("x-lang", "en"), ("x-lang", "en, fr, de"), ("x-lang", "en,fr"), ("cookie", "a=1, b=2")] {
            assert!(!combined_eq(&h, &name(n), Some(&HeaderValue::from_static(v))), "{n}: {v}");
        }
        assert!(combined_eq(&h, &header::HOST, None));
        assert!(!combined_eq(&h, &header::ACCEPT, None));
        assert!(!combined_eq(&h, &header::HOST, Some(&HeaderValue::from_static(""))));
        // One line holding the combined value is the same field (RFC 9110 §5.3).
        assert!(combined_eq(&map(&[("x-lang", "en, fr")]), &name("x-lang"), Some(&HeaderValue::from_static("en, fr"))));
    }

    #[test]
    fn cookie_crumbs_become_one_line_and_a_single_cookie_is_left_alone() {
        let mut h = map(&[("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2"), ("cookie", "c=3")]);
        join_cookie_crumbs(&mut h);
        let lines: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(lines, ["a=1; b=2; c=3"]);
        let mut one = map(&[("cookie", "a=1; b=2")]);
        join_cookie_crumbs(&mut one);
        assert_eq!(one.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
        let mut none = map(&[("accept", "*/*")]);
        join_cookie_crumbs(&mut none);
        assert!(!none.contains_key(header::COOKIE));
    }

    #[test]
    fn a_detached_value_is_a_copy_with_the_same_bytes_and_sensitivity() {
        let buf = bytes::Bytes::from(vec![b'v'; 8192]);
        let mut v = HeaderValue::from_maybe_shared(buf.slice(100..132)).unwrap();
        v.set_sensitive(true);
        let d = detached(&v);
        assert_eq!(d.as_bytes(), v.as_bytes());
        assert!(d.is_sensitive());
        assert!(!buf.as_ptr_range().contains(&d.as_bytes().as_ptr()), "not a slice of the buffer");
    }

    #[test]
    fn seen_notes_the_looked_up_names_in_any_case_and_nothing_else() {
        let cases: [(&[&str], u8); 5] = [
            (&["Host", "Accept", "User-Agent"], 0),
            (&["X-Request-ID"], Seen::REQUEST_ID),
            (&["TRACEPARENT", "tracestate"], Seen::TRACEPARENT),
            (&["x-forwarded-for", "X-Forwarded-Host", "x-forwarded-fox"], Seen::FORWARDED_FOR),
            (&["x-request-ix", "traceparenT", "X-FORWARDED-FOR"], Seen::TRACEPARENT | Seen::FORWARDED_FOR),
        ];
        for (names, want) in cases {
            let mut seen = Seen::NONE;
            names.iter().for_each(|n| seen.note(n.as_bytes()));
            for bit in [Seen::REQUEST_ID, Seen::TRACEPARENT, Seen::FORWARDED_FOR] {
                assert_eq!(seen.may_have(bit), want & bit != 0, "{names:?} bit {bit}");
                assert!(Seen::UNKNOWN.may_have(bit));
            }
        }
        let mut hop = Seen::NONE;
        hop.note(b"Connection");
        assert!(hop.may_have(Seen::HOP_BY_HOP) && !hop.may_have(Seen::REQUEST_ID));
        // The head's size bounds what the header-bytes limit counts (name + value + 4 per
        // line), however tightly the lines are written.
        for head in [
            &b"GET / HTTP/1.1\r\nHost:a\r\nX:\r\nY:z\r\n\r\n"[..],
            b"GET /x HTTP/1.1\r\nhost: a\r\nx-long-name:  padded  \r\n\r\n",
        ] {
            let mut slots = [httparse::EMPTY_HEADER; 8];
            let mut req = httparse::Request::new(&mut slots);
            let len = match req.parse(head).unwrap() {
                httparse::Status::Complete(n) => n,
                httparse::Status::Partial => unreachable!(),
            };
            let counted: usize = req.headers.iter().map(|h| h.name.len() + h.value.len() + 4).sum();
            let mut seen = Seen::NONE;
            seen.note_size(len, req.headers.len());
            assert!(!seen.headers_within(counted - 1), "{:?}", String::from_utf8_lossy(head));
        }
        assert!(!Seen::UNKNOWN.headers_within(usize::MAX >> 1));
        // Absent: the peer alone, without a lookup; present: appended.
        let peer = HeaderValue::from_static("10.0.0.1");
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        assert_eq!(forwarded_for(&h, &peer, Seen::UNKNOWN), "1.1.1.1, 10.0.0.1");
        assert_eq!(forwarded_for(&h, &peer, Seen::NONE), "10.0.0.1", "noted absent: not looked up");
        let mut seen = Seen::NONE;
        seen.note(b"X-Forwarded-For");
        assert_eq!(forwarded_for(&h, &peer, seen), "1.1.1.1, 10.0.0.1");
    }

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

/// A route's header edits (`routes[].request_headers` / `response_headers`), parsed when the
/// snapshot is built: applying them is a removal and an insert per name, no parsing.
#[derive(Debug, Default)]
pub struct HeaderEdit {
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// Which side a header edit applies to (the names the gateway owns differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditSide {
    /// The request sent upstream.
    Request,
    /// The upstream's response.
    Response,
}

impl HeaderEdit {
    /// The edits, or `None` when there are none; a name or value that cannot be used is an
    /// error (`path`, reason), reported by validation before a snapshot is ever built.
    pub fn new<'a>(
        set: impl IntoIterator<Item = (&'a str, &'a str)>,
        remove: impl IntoIterator<Item = &'a str>,
        side: EditSide,
        owned: &dyn Fn(&HeaderName) -> bool,
    ) -> Result<Option<Self>, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let mut edit = Self::default();
        let name = |key: String, raw: &str| match HeaderName::from_bytes(raw.as_bytes()) {
            Ok(n) if is_hop_by_hop(&n) || n == header::CONTENT_LENGTH || owned(&n) || gateway_owned(&n, side) => {
                Err((key, format!("{raw:?} is a header the gateway itself sets or strips")))
            }
            // The gateway drops client headers with `_` (an upstream may read `x_auth_subject`
            // as `X-Auth-Subject`); it does not send any itself.
            Ok(n) if n.as_str().contains('_') => Err((key, format!("{raw:?}: names with '_' are not sent upstream"))),
            Ok(n) => Ok(n),
            Err(_) => Err((key, format!("{raw:?} is not a header name"))),
        };
        for (k, v) in set {
            let n = match name(format!("set.{k}"), k) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if edit.set.iter().any(|(s, _)| *s == n) {
                errors.push((format!("set.{k}"), "set twice (header names are case-insensitive)".into()));
                continue;
            }
            // Visible ASCII and inner spaces only: HTTP/2 forbids surrounding whitespace
            // (RFC 9113 §8.2.1), and bytes above 0x7F are not text every peer reads alike.
            let clean = v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) && v.trim() == v;
            match HeaderValue::from_str(v).ok().filter(|_| clean) {
                Some(v) => edit.set.push((n, v)),
                // The value is not quoted: on requests it may be a credential.
                None => errors.push((
                    format!("set.{k}"),
                    "not a valid header value (visible ASCII and inner spaces only)".into(),
                )),
            }
        }
        for (i, r) in remove.into_iter().enumerate() {
            let n = match name(format!("remove[{i}]"), r) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if edit.set.iter().any(|(s, _)| *s == n) {
                errors.push((format!("remove[{i}]"), format!("{r:?} is also in set")));
            }
            edit.remove.push(n);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok((!edit.set.is_empty() || !edit.remove.is_empty()).then_some(edit))
    }

    /// Applies the edits: removals, then each set header replaces every value of its name.
    pub fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
    }
}

/// Names the gateway writes on each side itself, which an edit would contradict.
fn gateway_owned(n: &HeaderName, side: EditSide) -> bool {
    match side {
        EditSide::Request => {
            super::h1::HopHeaders::sets(n)
                || [header::HOST, header::EXPECT, header::TRANSFER_ENCODING].contains(n)
                // The WebSocket handshake is checked and relayed by the gateway.
                || n.as_str().starts_with("sec-websocket-")
        }
        EditSide::Response => {
            let s = n.as_str();
            matches!(s, "x-request-id" | "server-timing" | "x-cache" | "idempotent-replayed")
                || s.starts_with("ratelimit-")
                || s.starts_with("access-control-")
        }
    }
}
