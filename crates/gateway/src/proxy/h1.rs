//! The upstream leg's HTTP/1.1 client: request heads written straight from the request parts,
//! response heads parsed with `httparse`, bodies decoded by a small state machine that owns
//! the connection and puts it back into its pool the moment the body is complete.
//!
//! Why not hyper's client connection: it runs each connection as a task of its own and talks
//! to it over channels, so every request crossed tasks twice, allocated channel slots and
//! copied large futures (a quarter of the gateway's instructions per request, measured with
//! callgrind). Here the request's own task writes the head and reads the answer; no task, no
//! channel. The gateway only ever speaks to its own upstreams, over a narrow subset of
//! HTTP/1.1 (no pipelining, no upgrades: WebSocket handshakes still use hyper), which keeps
//! this small. It is strict where a lax reading would be a smuggling or splitting risk:
//! `Transfer-Encoding` together with `Content-Length`, conflicting lengths, malformed chunk
//! sizes, oversized heads all fail the exchange (502) instead of being guessed at.
//!
//! Reuse: a connection returns to its pool only when its response ended exactly where the
//! framing said (nothing extra buffered), the upstream did not ask to close, and it spoke
//! HTTP/1.1. An idle connection is checked at checkout without a syscall (the reactor's
//! readiness): one the upstream closed, or that has unexpected bytes, is dropped instead.

use super::headers::Seen;
use super::pool::Pool;
use crate::body::{BoxError, UpstreamBody};
use crate::error::{ErrorKind, GatewayError};
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response header lines accepted.
const MAX_HEADERS: usize = 128;
/// Read size (and the buffer's initial capacity).
const READ_SIZE: usize = 8 * 1024;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Most bytes of trailers (read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// One upstream connection.
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    head: Vec<u8>,
    /// When its latest request started (the pool's idle clock runs from there: no clock
    /// reading when it comes back).
    pub(super) used: std::time::Instant,
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqFraming {
    /// No body and no length header.
    None,
    Length(u64),
    Chunked,
}

/// What this hop adds to a proxied request: written straight into the upstream request head
/// after the client's headers, whose headers of the same names are left out there.
///
/// Setting them in the request's `HeaderMap` instead cost a hashed insert each and, as the
/// map hyper builds is sized for the client's headers, a rehash into a bigger table: about
/// 3k instructions per request (callgrind), for headers that only ever go on the wire.
#[derive(Debug)]
pub struct HopHeaders<'a> {
    /// `X-Forwarded-For`: the client's list with the peer appended.
    pub forwarded_for: HeaderValue,
    /// `X-Forwarded-Proto`.
    pub forwarded_proto: &'static str,
    /// `X-Forwarded-Host`: the client's `Host` (or `:authority`); none is sent without one.
    pub forwarded_host: Option<HeaderValue>,
    /// `X-Request-Id`.
    pub request_id: HeaderValue,
    /// `traceparent` with this hop as the parent.
    pub traceparent: crate::pipeline::trace::Traceparent,
    /// The client's `tracestate` goes on (its `traceparent` was valid).
    pub keep_tracestate: bool,
    /// The authenticated principal's headers (configured names; the client's copies were
    /// removed from the map).
    pub principal: PrincipalHeaders<'a>,
}

/// Up to three identity headers for the upstream: subject, roles, authentication method.
pub type PrincipalHeaders<'a> = [Option<(&'a HeaderName, &'a HeaderValue)>; 3];

impl HopHeaders<'_> {
    /// True for a client header this hop replaces (or drops).
    fn replaces(&self, name: &HeaderName) -> bool {
        match name.as_str() {
            "tracestate" => !self.keep_tracestate,
            _ => Self::sets(name),
        }
    }

    /// True for the names this hop writes itself (`tracestate`: passed on or dropped), and
    /// for the other `X-Forwarded-*` names frameworks combine with them to build absolute URLs
    /// (`-Port`, `-Prefix`, `-Server`): a client's copies would be taken for this hop's word,
    /// so they are dropped.
    pub(crate) fn sets(name: &HeaderName) -> bool {
        matches!(
            name.as_str(),
            "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
                | "x-request-id"
                | "traceparent"
                | "tracestate"
                | "x-forwarded-port"
                | "x-forwarded-prefix"
                | "x-forwarded-server"
        )
    }

    fn encode(&self, w: &mut Vec<u8>) {
        let mut line = |name: &[u8], value: &[u8]| {
            w.extend_from_slice(name);
            w.extend_from_slice(value);
            w.extend_from_slice(b"\r\n");
        };
        line(b"x-forwarded-for: ", self.forwarded_for.as_bytes());
        line(b"x-forwarded-proto: ", self.forwarded_proto.as_bytes());
        if let Some(h) = &self.forwarded_host {
            line(b"x-forwarded-host: ", h.as_bytes());
        }
        line(b"x-request-id: ", self.request_id.as_bytes());
        line(b"traceparent: ", self.traceparent.as_bytes());
        for (name, value) in self.principal.iter().flatten() {
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
    }
}

/// Why a request could not be written.
pub enum WriteError {
    /// Not a byte was written (the connection was dead before the first write).
    Unsent(io::Error),
    /// The client's body failed (too large, idle, broken): the exchange is abandoned.
    Body(BoxError),
    /// The connection failed after part of the request was written.
    Io(io::Error),
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(READ_SIZE),
            head: Vec::with_capacity(512),
            used: std::time::Instant::now(),
        }
    }

    /// True when an idle connection can carry a request: the upstream has not closed it and
    /// sent nothing unasked. Costs a syscall only when the reactor saw it readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable while idle: closed (0), unexpected bytes, or a stale readiness.
            Poll::Ready(Ok(())) => {
                matches!(self.io.try_read_buf(&mut self.buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes the request head and body: `host` is the upstream's `host:port`, `hop` what
    /// this hop adds (see [`HopHeaders`]).
    pub async fn write_request(
        &mut self,
        parts: &http::request::Parts,
        host: &str,
        hop: Option<&HopHeaders<'_>>,
        body: &mut UpstreamBody,
    ) -> Result<(), WriteError> {
        let framing = request_framing(parts, body);
        encode_head(&mut self.head, parts, host, hop, framing);
        match body {
            UpstreamBody::Full(bytes) => {
                let mut bufs = [IoSlice::new(&self.head), IoSlice::new(bytes)];
                write_all_vectored(&mut self.io, &mut bufs, true).await
            }
            UpstreamBody::Stream(stream) => {
                write_all_vectored(&mut self.io, &mut [IoSlice::new(&self.head)], true).await?;
                let chunked = framing == ReqFraming::Chunked;
                let mut size = [0u8; 20];
                while let Some(frame) = http_body_util::BodyExt::frame(stream).await {
                    let Ok(data) = frame.map_err(WriteError::Body)?.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        let n = hex_line(&mut size, data.len() as u64);
                        let mut bufs = [IoSlice::new(&size[..n]), IoSlice::new(&data), IoSlice::new(b"\r\n")];
                        write_all_vectored(&mut self.io, &mut bufs, false).await?;
                    } else {
                        write_all_vectored(&mut self.io, &mut [IoSlice::new(&data)], false).await?;
                    }
                }
                if chunked {
                    write_all_vectored(&mut self.io, &mut [IoSlice::new(b"0\r\n\r\n")], false).await?;
                }
                Ok(())
            }
        }
    }

    /// Reads the response head (skipping 1xx interim answers) and returns the response with
    /// its body; the body hands the connection back to `pool` when it ends cleanly.
    pub async fn read_response(
        mut self,
        method: &Method,
        pool: &Arc<Pool>,
        reusable: bool,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let (parts, framing, keep_alive, raw) = loop {
            if !self.buf.is_empty()
                && let Some(head) = parse_head(&mut self.buf, method)?
            {
                if head.parts.status.is_informational() {
                    if head.parts.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(bad_response("an unrequested protocol switch (101)"));
                    }
                    continue; // 100 Continue, 103 Early Hints: the real answer follows.
                }
                break (head.parts, head.framing, head.keep_alive, head.raw);
            }
            match std::future::poll_fn(|cx| poll_read_more(&mut self.io, &mut self.buf, cx)).await {
                Ok(0) if self.buf.is_empty() => {
                    return Err(reset("the connection was closed before a response".into()));
                }
                Ok(0) => return Err(reset("the connection was closed in the middle of the response head".into())),
                Ok(_) => {}
                Err(e) => return Err(reset(e.to_string())),
            }
        };
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        let mut body = ResponseBody {
            conn: Some(self),
            pool: (reusable && keep_alive).then(|| pool.clone()),
            state,
            raw,
            idle: pool.response_idle_timeout(),
            timer: None,
        };
        if matches!(body.state, State::Done) {
            body.release();
        }
        Ok(Response::from_parts(parts, body))
    }
}

/// Writes every slice; `first` marks the request's first write, whose failure means nothing
/// was sent.
async fn write_all_vectored(io: &mut TcpStream, mut bufs: &mut [IoSlice<'_>], first: bool) -> Result<(), WriteError> {
    let mut wrote = !first;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match io.write_vectored(bufs).await {
            Ok(0) => return Err(WriteError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if !wrote => return Err(WriteError::Unsent(e)),
            Err(e) => return Err(WriteError::Io(e)),
        }
        wrote = true;
    }
    Ok(())
}

/// `{hex size}\r\n` into `out`; returns its length.
pub(crate) fn hex_line(out: &mut [u8; 20], mut n: u64) -> usize {
    let mut digits = [0u8; 16];
    let mut i = 16;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    let len = 16 - i;
    out[..len].copy_from_slice(&digits[i..]);
    out[len..len + 2].copy_from_slice(b"\r\n");
    len + 2
}

/// The body's framing: its exact size when known (a `Content-Length`), chunked otherwise. An
/// empty body of a method that normally has none gets no length header at all.
fn request_framing(parts: &http::request::Parts, body: &UpstreamBody) -> ReqFraming {
    match body.size_hint().exact() {
        Some(0)
            if !parts.headers.contains_key(header::CONTENT_LENGTH)
                && matches!(
                    parts.method,
                    Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
                ) =>
        {
            ReqFraming::None
        }
        Some(n) => ReqFraming::Length(n),
        None => ReqFraming::Chunked,
    }
}

/// Writes the request head: origin-form target, HTTP/1.1, `Host`, the client's headers
/// (framing headers replaced by the body's own; `Expect` is answered by this hop), then the
/// hop's own.
fn encode_head(
    w: &mut Vec<u8>,
    parts: &http::request::Parts,
    host: &str,
    hop: Option<&HopHeaders<'_>>,
    framing: ReqFraming,
) {
    w.clear();
    w.extend_from_slice(parts.method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    w.extend_from_slice(host.as_bytes());
    w.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::HOST
            || name == header::EXPECT
            || hop.is_some_and(|h| h.replaces(name))
        {
            continue;
        }
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            w.extend_from_slice(b"content-length: ");
            crate::push_decimal(w, n);
            w.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => w.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if let Some(hop) = hop {
        hop.encode(w);
    }
    w.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head.
struct Head {
    /// Status and version; the headers are in the map unless `raw` holds them.
    parts: http::response::Parts,
    framing: Framing,
    keep_alive: bool,
    raw: Option<RawHeaders>,
}

/// Parses a complete head off the front of `buf`, or `None` when more bytes are needed. The
/// header lines stay as they came ([`RawHeaders`]) unless there is a `Connection` header
/// (the headers it names must go, which the map does); a 1xx head's headers are dropped.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, GatewayError> {
    // Uninitialised header slots: zeroing 4 KiB per response showed up in the profile.
    let mut lines = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut lines) {
        // The cap holds however the head arrived (whole in one read, or in pieces).
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return Err(bad_response("response head too large")),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(bad_response("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(bad_response("too many response headers")),
        Err(e) => return Err(bad_response(&format!("invalid response head: {e}"))),
    };
    // 100–599 only (RFC 9110 §15): `http` takes up to 999, which no client should be handed.
    let status = resp
        .code
        .filter(|c| (100..600).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| bad_response("invalid status"))?;
    let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    if status.is_informational() {
        buf.advance(len);
        return Ok(Some(Head { parts, framing: Framing::Empty, keep_alive: true, raw: None }));
    }
    let (framing, keep_alive, connection) = response_framing(version, status.as_u16(), resp.headers, method)?;
    if !connection && resp.headers.len() <= RAW_HEADERS && len <= usize::from(u16::MAX) {
        let base = buf.as_ptr() as usize;
        let mut raw = RawHeaders { head: Bytes::new(), lines: [[0; 3]; RAW_HEADERS], len: 0 };
        for h in resp.headers.iter().filter(|h| !super::headers::is_hop_by_hop_name(h.name.as_bytes())) {
            let start = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            raw.lines[raw.len] = [start as u16, (start + h.name.len()) as u16, (value + h.value.len()) as u16];
            raw.len += 1;
        }
        raw.head = buf.split_to(len).freeze();
        return Ok(Some(Head { parts, framing, keep_alive, raw: Some(raw) }));
    }
    let spans = Spans::of(buf, resp.headers);
    let head = buf.split_to(len).freeze();
    // Room for what the gateway adds (CORS, rate-limit headers) without a rehash.
    let mut headers = crate::header_map(spans.len() + 4);
    for entry in spans.entries(&head) {
        let (name, value) = entry.map_err(bad_response)?;
        headers.append(name, value);
    }
    parts.headers = headers;
    Ok(Some(Head { parts, framing, keep_alive, raw: None }))
}

/// Most header lines a response may have to be kept as [`RawHeaders`] (more: a map).
const RAW_HEADERS: usize = 16;

/// An upstream response's header lines as they came, without the hop-by-hop ones: no
/// `HeaderMap` is built for a response the native HTTP/1.1 writer copies to the client
/// (building and dropping it was ≈ 3k instructions per response: a name parsed and hashed,
/// a value validated and reference-counted per header). Whatever reads or changes the
/// upstream's headers (cache, idempotency, CORS, HTTP/2) first turns them into the map
/// ([`RawHeaders::into_map`]). Only for a head of at most 64 KiB and [`RAW_HEADERS`] lines
/// with no `Connection` header (the headers it names must go: the map does that). Names and
/// values were validated by `httparse` (RFC 9110 tokens and field values, the rules of
/// `http`'s types); `httparse` strips the value's surrounding whitespace.
pub struct RawHeaders {
    /// The whole head.
    head: Bytes,
    /// Per line: where its name starts and ends and where its value ends (offsets in `head`).
    lines: [[u16; 3]; RAW_HEADERS],
    len: usize,
}

impl std::fmt::Debug for RawHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawHeaders")
    }
}

impl RawHeaders {
    /// Each header as `(name, line)`: the name in the upstream's case, and the line from the
    /// name to the end of the value (`name:` and the value, without the line end).
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines[..self.len].iter().map(|&[n0, n1, end]| {
            let line = &self.head[usize::from(n0)..usize::from(end)];
            (&line[..usize::from(n1 - n0)], line)
        })
    }

    /// `(name, value)` of each header.
    pub fn values(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines().map(|(name, line)| (name, line[name.len() + 1..].trim_ascii_start()))
    }

    /// The first value of `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        let name = name.as_str().as_bytes();
        self.values().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    /// Appends the headers to `map`; values share the head's buffer.
    pub fn into_map(self, map: &mut http::HeaderMap) -> Result<(), GatewayError> {
        map.reserve(self.len);
        for (name, value) in self.values() {
            let name = HeaderName::from_bytes(name).map_err(|_| bad_response("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(self.head.slice_ref(value))
                .map_err(|_| bad_response("invalid header value"))?;
            map.append(name, value);
        }
        Ok(())
    }
}

/// Where each header's name and value sit in a head buffer (offsets from its start), so they
/// can become slices of the head once it is frozen: no copy of a value. On the stack for the
/// usual few headers.
pub(crate) struct Spans {
    small: [[u32; 4]; 32],
    large: Vec<[u32; 4]>,
    len: usize,
    /// What the names say for a request's handler ([`Seen`]; the head's size not yet noted).
    pub(crate) seen: Seen,
}

impl Spans {
    /// The spans of `headers`, parsed out of `buf` (a head of at most 4 GiB).
    pub(crate) fn of(buf: &[u8], headers: &[httparse::Header<'_>]) -> Self {
        let base = buf.as_ptr() as usize;
        let mut s = Self { small: [[0; 4]; 32], large: Vec::new(), len: headers.len(), seen: Seen::NONE };
        let spans: &mut [[u32; 4]] = if headers.len() <= s.small.len() {
            &mut s.small[..headers.len()]
        } else {
            s.large.resize(headers.len(), [0; 4]);
            &mut s.large
        };
        for (span, h) in spans.iter_mut().zip(headers) {
            let n = (h.name.as_ptr() as usize - base) as u32;
            let v = (h.value.as_ptr() as usize - base) as u32;
            *span = [n, n + h.name.len() as u32, v, v + h.value.len() as u32];
            s.seen.note(h.name.as_bytes());
        }
        s
    }

    /// How many headers.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The headers as names and values sharing `head` (the frozen buffer they came from).
    pub(crate) fn entries<'a>(
        &'a self,
        head: &'a Bytes,
    ) -> impl Iterator<Item = Result<(HeaderName, HeaderValue), &'static str>> + 'a {
        let spans = if self.len <= self.small.len() { &self.small[..self.len] } else { &self.large[..] };
        spans.iter().map(move |&[n0, n1, v0, v1]| {
            let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
            let name = HeaderName::from_bytes(&head[n0..n1]).map_err(|_| "invalid header name")?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1)).map_err(|_| "invalid header value")?;
            Ok((name, value))
        })
    }
}

/// The body's framing (RFC 9112 §6.3), whether the connection may carry another request,
/// and whether the head has a `Connection` header.
fn response_framing(
    version: Version,
    status: u16,
    headers: &[httparse::Header<'_>],
    method: &Method,
) -> Result<(Framing, bool, bool), GatewayError> {
    let (mut connection, mut close, mut te) = (false, false, false);
    let mut length: Option<u64> = None;
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            connection = true;
            close |= h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only `chunked`, once: another coding (gzip, …) would have to be decoded or
            // passed on as a transfer coding, and relaying its bytes as the content is wrong.
            for coding in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|c| !c.is_empty()) {
                if !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(bad_response("unsupported Transfer-Encoding (only chunked is relayed)"));
                }
                if te {
                    return Err(bad_response("chunked applied more than once"));
                }
                te = true;
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for part in h.value.split(|&b| b == b',') {
                let n = parse_decimal(part.trim_ascii()).ok_or_else(|| bad_response("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad_response("conflicting Content-Length values"));
                }
                length = Some(n);
            }
        }
    }
    let keep_alive = version == Version::HTTP_11 && !close;
    if *method == Method::HEAD || status == 204 || status == 304 {
        return Ok((Framing::Empty, keep_alive, connection));
    }
    if te {
        if length.is_some() {
            return Err(bad_response("both Transfer-Encoding and Content-Length"));
        }
        return Ok((Framing::Chunked, keep_alive, connection));
    }
    Ok(match length {
        Some(0) => (Framing::Empty, keep_alive, connection),
        Some(n) => (Framing::Length(n), keep_alive, connection),
        None => (Framing::Close, false, connection),
    })
}

pub(crate) fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

fn bad_response(why: &str) -> GatewayError {
    GatewayError::new(ErrorKind::UpstreamBadResponse, "the upstream service sent an invalid response").with_detail(why)
}

fn reset(why: String) -> GatewayError {
    GatewayError::new(
        ErrorKind::UpstreamReset,
        "the upstream service closed the connection without a complete response",
    )
    .with_detail(why)
}

/// Where the chunked decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one (bytes seen so far).
    Trailers(usize),
}

pub(crate) enum Step {
    Data(Bytes),
    NeedMore,
    End,
}

/// Decodes what `buf` holds; stops at the first data, when more bytes are needed, or at the
/// end. With `skip_data`, stops before data instead of taking it (used to find the end early).
pub(crate) fn decode(state: &mut Chunk, buf: &mut BytesMut, skip_data: bool) -> Result<Step, &'static str> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(i) = memchr::memchr(b'\n', buf) else {
                    return if buf.len() > MAX_CHUNK_LINE {
                        Err("chunk size line too long")
                    } else {
                        Ok(Step::NeedMore)
                    };
                };
                let n = chunk_size(&buf[..i])?;
                buf.advance(i + 1);
                *state = if n == 0 { Chunk::Trailers(0) } else { Chunk::Data(n) };
            }
            Chunk::Data(_) if skip_data => return Ok(Step::NeedMore),
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = (buf.len() as u64).min(left);
                let data = buf.split_to(n as usize).freeze();
                *state = if n == left { Chunk::DataEnd } else { Chunk::Data(left - n) };
                return Ok(Step::Data(data));
            }
            Chunk::DataEnd => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                } else if buf.starts_with(b"\n") {
                    buf.advance(1);
                } else if buf.is_empty() || &buf[..] == b"\r" {
                    return Ok(Step::NeedMore);
                } else {
                    return Err("missing CRLF after chunk data");
                }
                *state = Chunk::Size;
            }
            Chunk::Trailers(seen) => {
                let Some(i) = memchr::memchr(b'\n', buf) else {
                    return if seen + buf.len() > MAX_TRAILERS {
                        Err("trailers too large")
                    } else {
                        Ok(Step::NeedMore)
                    };
                };
                let line = buf[..i].strip_suffix(b"\r").unwrap_or(&buf[..i]);
                if line.is_empty() {
                    buf.advance(i + 1);
                    return Ok(Step::End);
                }
                if !valid_trailer(line) {
                    return Err("invalid trailer line");
                }
                buf.advance(i + 1);
                if seen + i + 1 > MAX_TRAILERS {
                    return Err("trailers too large");
                }
                *state = Chunk::Trailers(seen + i + 1);
            }
        }
    }
}

/// The size on a chunk-size line (without its LF), strictly as RFC 9112 §7.1 writes it:
/// `1*HEXDIG [ BWS ";" chunk-ext ] CR`. No whitespace before the size or after it unless an
/// extension follows, no bare CR or other control byte anywhere (a front proxy that reads
/// such a line differently would disagree about where the body ends); leading zeros are fine.
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (size, rest) = line.split_at(digits);
    if size.is_empty() {
        return Err("invalid chunk size");
    }
    let ext = rest.trim_ascii_start();
    if !(rest.is_empty() || ext.first() == Some(&b';')) || ext.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
        return Err("invalid chunk size line");
    }
    let significant = &size[size.iter().take_while(|&&b| b == b'0').count()..];
    if significant.len() > 16 {
        return Err("chunk size too large");
    }
    Ok(significant.iter().fold(0u64, |n, &c| n << 4 | u64::from((c as char).to_digit(16).unwrap_or(0))))
}

/// A trailer field line: a token name, `:`, a value without control bytes but HTAB.
fn valid_trailer(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else { return false };
    colon > 0
        && line[..colon].iter().all(|&b| crate::pipeline::validate::is_tchar(b))
        && line[colon + 1..].iter().all(|&b| !b.is_ascii_control() || b == b'\t')
}

enum State {
    Length(u64),
    Chunked(Chunk),
    Close,
    /// Complete.
    Done,
    /// Framing error found ahead of the data already handed out: reported next.
    Broken(&'static str),
    /// An error was reported.
    Failed,
}

/// A response body streamed from the upstream connection it owns.
pub struct ResponseBody {
    /// `None` once the body is complete (the connection went back or was closed).
    conn: Option<Conn>,
    /// Where the connection goes when the body ends cleanly (`None`: not reusable).
    pool: Option<Arc<Pool>>,
    state: State,
    /// The head's header lines when no map was built for them.
    raw: Option<RawHeaders>,
    /// `response_idle_timeout`: the body is cut when the upstream sends nothing for this long.
    idle: std::time::Duration,
    /// Armed the first time a read has to wait (most bodies come whole with their head and
    /// never need one), pushed back on each read that brings bytes.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseBody")
    }
}

#[derive(Debug)]
struct BodyError(String);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream response body: {}", self.0)
    }
}

impl std::error::Error for BodyError {}

fn body_error(why: impl Into<String>) -> BoxError {
    Box::new(BodyError(why.into()))
}

impl ResponseBody {
    /// The head's header lines, when they were not put into the response's map.
    pub fn raw_headers(&self) -> Option<&RawHeaders> {
        self.raw.as_ref()
    }

    /// Takes the head's header lines (for the writer to copy).
    pub fn take_raw_headers(&mut self) -> Option<RawHeaders> {
        self.raw.take()
    }

    /// Moves the head's header lines, if still raw, into `map` (hop-by-hop ones left out).
    pub fn headers_into(&mut self, map: &mut http::HeaderMap) -> Result<(), GatewayError> {
        match self.raw.take() {
            Some(raw) => raw.into_map(map),
            None => Ok(()),
        }
    }

    /// The body is complete: the connection goes back to its pool if it is clean.
    fn release(&mut self) {
        self.state = State::Done;
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take())
            && conn.buf.is_empty()
        {
            pool.checkin(conn);
        }
    }

    /// Fails the body: the connection is closed.
    fn fail(&mut self, why: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Failed;
        self.conn = None;
        Poll::Ready(Some(Err(body_error(why))))
    }
}

/// Reads more bytes into the connection's buffer.
fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    poll_read_more(&mut conn.io, &mut conn.buf, cx)
}

/// Reads more bytes from `io` onto the end of `buf` (room for a read of at least 4 KiB is
/// made first); `Ok(0)` at end of stream. Both HTTP/1.1 legs read this way.
pub(crate) fn poll_read_more<R: tokio::io::AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SIZE / 2 {
        buf.reserve(READ_SIZE);
    }
    let read = io.read_buf(buf);
    std::pin::pin!(read).poll(cx)
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match &mut this.state {
                State::Done | State::Failed => return Poll::Ready(None),
                State::Broken(e) => {
                    let e = *e;
                    return this.fail(e);
                }
                State::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = (conn.buf.len() as u64).min(*left);
                        let data = conn.buf.split_to(n as usize).freeze();
                        *left -= n;
                        if *left == 0 {
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(chunk) => match decode(chunk, &mut conn.buf, false) {
                    Ok(Step::Data(data)) => {
                        // Find the end now if it is already here, so the connection goes
                        // back before the client has even received the last bytes.
                        match decode(chunk, &mut conn.buf, true) {
                            Ok(Step::End) => this.release(),
                            Ok(_) => {}
                            // Reported on the next poll; this data is good.
                            Err(e) => this.state = State::Broken(e),
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Step::End) => {
                        this.release();
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(e) => return this.fail(e),
                },
                State::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let conn = this.conn.as_mut().expect("checked above");
            let filled = poll_fill(conn, cx);
            if let Some(timer) = this.timer.as_mut() {
                if filled.is_ready() {
                    timer.as_mut().reset(tokio::time::Instant::now() + this.idle);
                } else if timer.as_mut().poll(cx).is_ready() {
                    return this.fail(format!("no data for {:?} (response_idle_timeout)", this.idle));
                }
            } else if filled.is_pending() {
                let mut timer = Box::pin(tokio::time::sleep(this.idle));
                // Registers the wake-up; a zero timeout is refused by validation.
                if timer.as_mut().poll(cx).is_ready() {
                    return this.fail(format!("no data for {:?} (response_idle_timeout)", this.idle));
                }
                this.timer = Some(timer);
            }
            match ready!(filled) {
                Ok(0) if matches!(this.state, State::Close) => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("the connection closed before the body was complete"),
                Ok(_) => {}
                Err(e) => return this.fail(e.to_string()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(wire: &[u8], split: usize) -> Result<(Vec<u8>, usize), &'static str> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match decode(&mut state, &mut buf, false)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::End => return Ok((out, buf.len())),
                Step::NeedMore => {
                    if fed == wire.len() {
                        return Err("incomplete");
                    }
                    let end = (fed + split).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in 1..=wire.len() {
            assert_eq!(decode_all(wire, split), Ok((b"hello, world".to_vec(), 0)), "split {split}");
        }
        // Bare LF line ends are read too; bytes after the end are left alone.
        assert_eq!(decode_all(b"3\nabc\n0\n\nEXTRA", 64), Ok((b"abc".to_vec(), 5)));
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            // RFC 9112 §7.1: no whitespace around the size without an extension, no bare CR,
            // no control bytes in an extension, trailer lines are fields.
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5\t\r\nhello\r\n0\r\n\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5;\x01\x7f\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nnot a header\x00\r\n\r\n",
            b"5\r\nhello\r\n0\r\n: empty name\r\n\r\n",
        ] {
            assert!(decode_all(bad, 64).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b'1'; MAX_CHUNK_LINE + 2];
        assert!(decode_all(&long, 64).is_err());
        for good in [
            &b"00000000000000005\r\nhello\r\n0\r\n\r\n"[..],
            b"5 ; name=\"v\"\r\nhello\r\n0\r\n\r\n",
            b"5;a\r\nhello\r\n0\r\nx-t: v\t1\r\n\r\n",
            b"5\nhello\n0\n\n",
        ] {
            assert_eq!(
                decode_all(good, 64).map(|(d, _)| d),
                Ok(b"hello".to_vec()),
                "{:?}",
                String::from_utf8_lossy(good)
            );
        }
    }

    /// The head's parts with every header in the map.
    fn head(raw: &str) -> Result<Option<http::response::Parts>, GatewayError> {
        let Some(Head { mut parts, raw, .. }) = parse_head(&mut BytesMut::from(raw.as_bytes()), &Method::GET)? else {
            return Ok(None);
        };
        if let Some(raw) = raw {
            raw.into_map(&mut parts.headers)?;
        }
        Ok(Some(parts))
    }

    fn framing_of(raw: &str, method: Method) -> Result<(Framing, bool), ErrorKind> {
        let head = parse_head(&mut BytesMut::from(raw.as_bytes()), &method).map_err(|e| e.kind())?.expect("complete");
        Ok((head.framing, head.keep_alive))
    }

    #[test]
    fn raw_header_lines_are_as_received_without_hop_by_hop_ones() {
        let wire = "HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nKeep-Alive: timeout=5\r\nX-A:  1 \r\nTE: x\nx-b:\r\n\
                    X-A: 2\r\nUpgrade: h2c\r\n\r\nbody";
        let mut buf = BytesMut::from(wire.as_bytes());
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(&buf[..], b"body");
        assert!(head.parts.headers.is_empty());
        let raw = head.raw.expect("no Connection header: kept raw");
        let lines: Vec<_> = raw.values().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = [("Content-Type", "a/b"), ("X-A", "1"), ("x-b", ""), ("X-A", "2")]
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(lines, want);
        assert_eq!(raw.get(&HeaderName::from_static("x-a")), Some(&b"1"[..]));
        assert_eq!(raw.get(&header::UPGRADE), None);
        let mut map = http::HeaderMap::new();
        raw.into_map(&mut map).unwrap();
        assert_eq!(map.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(map.len(), 4);
        assert!(map.get("keep-alive").is_none() && map.get(header::TE).is_none());

        // A Connection header: the map is built at once and the named headers can go.
        let wire = "HTTP/1.1 200 OK\r\nConnection: x-secret\r\nx-secret: 1\r\ncontent-length: 0\r\n\r\n";
        let head = parse_head(&mut BytesMut::from(wire.as_bytes()), &Method::GET).unwrap().unwrap();
        assert!(head.raw.is_none());
        assert_eq!(head.parts.headers.len(), 3);
    }

    #[test]
    fn response_framing_follows_rfc_9112_and_refuses_ambiguity() {
        let get = || Method::GET;
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", get()), Ok((Framing::Length(5), true)));
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", get()),
            Ok((Framing::Length(5), true))
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n", get()),
            Ok((Framing::Chunked, true))
        );
        // Codings other than chunked are not relayed as if they were the content.
        for te in ["gzip, chunked", "gzip", "identity", "chunked, chunked", "chunked\r\ntransfer-encoding: chunked"] {
            let head = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            assert!(framing_of(&head, get()).is_err(), "{te}");
        }
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\n\r\n", get()), Ok((Framing::Close, false)));
        assert_eq!(
            framing_of("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n", get()),
            Ok((Framing::Empty, true))
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", Method::HEAD),
            Ok((Framing::Empty, true))
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 1\r\n\r\n", get()),
            Ok((Framing::Length(1), false))
        );
        assert_eq!(framing_of("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", get()), Ok((Framing::Length(1), false)));
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\x01b\r\n\r\n",
            "SMTP/1.1 200 OK\r\n\r\n",
        ] {
            assert_eq!(framing_of(bad, get()), Err(ErrorKind::UpstreamBadResponse), "{bad:?}");
        }
    }

    #[test]
    fn heads_are_incomplete_until_the_blank_line_and_bounded() {
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n").unwrap().is_none());
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(head(&huge).err().map(|e| e.kind()), Some(ErrorKind::UpstreamBadResponse));
        // The same head complete in one read is refused too.
        let whole = format!("{huge}\r\n");
        assert_eq!(head(&whole).err().map(|e| e.kind()), Some(ErrorKind::UpstreamBadResponse));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(head(&many).err().map(|e| e.kind()), Some(ErrorKind::UpstreamBadResponse));
        let forty: String = (0..40).map(|i| format!("x-{i}: v{i}\r\n")).collect();
        let p = head(&format!("HTTP/1.1 200 OK\r\n{forty}\r\n")).unwrap().unwrap();
        assert_eq!(p.headers.len(), 40);
        assert_eq!(p.headers["x-39"], "v39");
        let p = head("HTTP/1.1 201 Created\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody").unwrap().unwrap();
        assert_eq!(p.status, 201);
        assert_eq!(p.headers.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
    }

    #[test]
    fn request_heads_carry_one_framing_header() {
        let mut req = http::Request::post("/api/v1/orders?x=1").body(()).unwrap();
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("client.example"));
        req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        req.headers_mut().insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let (parts, ()) = req.into_parts();
        let mut w = Vec::new();
        let body = UpstreamBody::Full(Bytes::from_static(b"{}"));
        encode_head(&mut w, &parts, "up:1", None, request_framing(&parts, &body));
        assert_eq!(
            String::from_utf8(w.clone()).unwrap(),
            "POST /api/v1/orders?x=1 HTTP/1.1\r\nhost: up:1\r\ncontent-length: 2\r\n\r\n"
        );
        let get = http::Request::get("/x").body(()).unwrap().into_parts().0;
        let empty = UpstreamBody::Full(Bytes::new());
        encode_head(&mut w, &get, "up:1", None, request_framing(&get, &empty));
        assert_eq!(String::from_utf8(w).unwrap(), "GET /x HTTP/1.1\r\nhost: up:1\r\n\r\n");
        let mut size = [0u8; 20];
        let n = hex_line(&mut size, 0x1f2e);
        assert_eq!(&size[..n], b"1f2e\r\n");
    }

    #[test]
    fn hop_headers_replace_the_clients() {
        let mut req = http::Request::get("/x").body(()).unwrap();
        for (n, v) in [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("x-request-id", "client-id"),
            ("traceparent", "00-bad"),
            ("tracestate", "vendor=1"),
            ("expect", "100-continue"),
            ("x-keep", "1"),
        ] {
            req.headers_mut().insert(n, HeaderValue::from_static(v));
        }
        let (parts, ()) = req.into_parts();
        let mut parent = [b'0'; 55];
        parent[..3].copy_from_slice(b"00-");
        let mut hop = HopHeaders {
            forwarded_for: HeaderValue::from_static("6.6.6.6, 127.0.0.1"),
            forwarded_proto: "http",
            forwarded_host: Some(HeaderValue::from_static("gw.example")),
            request_id: HeaderValue::from_static("rid-1"),
            traceparent: crate::pipeline::trace::Traceparent::from_bytes(parent),
            keep_tracestate: false,
            principal: [None; 3],
        };
        let mut w = Vec::new();
        let empty = UpstreamBody::Full(Bytes::new());
        encode_head(&mut w, &parts, "up:1", Some(&hop), request_framing(&parts, &empty));
        let text = String::from_utf8(w.clone()).unwrap();
        let want = format!(
            "GET /x HTTP/1.1\r\nhost: up:1\r\nx-keep: 1\r\nx-forwarded-for: 6.6.6.6, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: gw.example\r\nx-request-id: rid-1\r\n\
             traceparent: {}\r\n\r\n",
            String::from_utf8(parent.to_vec()).unwrap()
        );
        assert_eq!(text, want);
        hop.keep_tracestate = true;
        hop.forwarded_host = None;
        encode_head(&mut w, &parts, "up:1", Some(&hop), request_framing(&parts, &empty));
        let text = String::from_utf8(w).unwrap();
        assert!(text.contains("\r\ntracestate: vendor=1\r\n"), "{text}");
        assert!(!text.contains("x-forwarded-host"), "{text}");
    }
}
