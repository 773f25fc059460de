//! The client-facing HTTP/1.1 connection: request heads parsed with `httparse` (the parser
//! hyper uses), request bodies decoded by a small state machine that borrows the connection
//! while the handler reads them, responses written with one vectored write where the body is
//! already at hand.
//!
//! Why not hyper's server connection: its dispatcher, buffered I/O, header-read timer and body
//! channel were the largest block of the gateway's instructions per proxied request
//! (callgrind: ≈ 13k of 35k). Here the connection's task parses the head, calls the handler
//! and writes the answer itself; a request with no body touches no channel, no lock and no
//! extra allocation. HTTP/2 (ALPN `h2`, or the h2c preface in clear text) is still hyper's.
//!
//! Strictness (each a smuggling or splitting risk when read leniently), answered with a JSON
//! error and the connection closed: both `Content-Length` and `Transfer-Encoding`; several or
//! non-numeric `Content-Length`s; a `Transfer-Encoding` other than exactly `chunked`, or any
//! in HTTP/1.0; a malformed chunk size; a head over the hard size cap (431), too many header
//! lines (431), a target over 65 534 bytes (414), anything `httparse` refuses (obs-fold,
//! bare CR, bad tokens; 400). The body is always re-framed for the upstream, so chunk
//! extensions and trailers never travel on.
//!
//! Keep-alive: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `Connection:
//! keep-alive`. A connection carries another request only when the previous body was read to
//! its end (bytes still buffered are discarded by framing, never parsed as a request); when
//! the handler answered without reading the body, the connection is closed after a short
//! lingering read, so the client still receives the answer. Idle connections, and heads that
//! do not arrive in full, are closed after `header_timeout`.

use crate::body::{BoxError, ClientBody, Observed};
use crate::error::{ErrorKind, GatewayError};
use crate::gateway::{self, ConnInfo, Shared};
use crate::proxy::h1::{Chunk, Spans, Step, decode, hex_line, parse_decimal, poll_read_more};
use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{oneshot, watch};

/// A client connection's byte stream (TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Header slots parsed on the stack; more (when the limits allow more) go to the heap.
const STACK_HEADERS: usize = 64;
/// Longest request target (as hyper: 414 beyond).
const MAX_URI: usize = 65_534;
/// The lingering read after answering without reading the body: at most this long…
const LINGER_TIME: Duration = Duration::from_secs(1);
/// …and at most this many bytes.
const LINGER_BYTES: usize = 256 * 1024;
/// Most bytes of pipelined requests read ahead while a request is being handled.
const PIPELINE_CAP: usize = 64 * 1024;
/// Body frames already at hand gathered into the head's write.
const READY_FRAMES: usize = 8;
/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// The HTTP/2 connection preface (h2c with prior knowledge).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connection limits.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A request head must arrive in full within this time, idle time between requests
    /// included.
    pub header_timeout: Duration,
    /// Hard cap on a request head's bytes (431 beyond); the configured, finer limit is the
    /// handler's.
    pub max_head: usize,
    /// Hard cap on a request's header lines (431 beyond).
    pub max_headers: usize,
}

/// The connection's stream and the bytes read from it but not yet used.
pub struct Wire {
    io: Box<dyn Io>,
    buf: BytesMut,
}

impl Wire {
    /// Wraps a stream and the bytes already read from it.
    pub fn new(io: Box<dyn Io>, buf: BytesMut) -> Self {
        Self { io, buf }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_read_more(&mut self.io, &mut self.buf, cx)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Reads more bytes; false when the stream ended (or failed).
    pub async fn read_more(&mut self) -> bool {
        matches!(self.fill().await, Ok(n) if n > 0)
    }

    /// Bytes read and not yet used.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True while what was read so far could still be the HTTP/2 preface.
    pub fn may_be_h2(&self) -> bool {
        let n = self.buf.len().min(H2_PREFACE.len());
        self.buf[..n] == H2_PREFACE[..n]
    }

    /// The stream with the bytes already read in front of it.
    pub fn into_rewind(self) -> Rewind {
        Rewind { pre: self.buf.freeze(), io: self.io }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind {
    pre: Bytes,
    io: Box<dyn Io>,
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The client's side of a protocol switch (WebSocket): resolves to the stream once the `101`
/// answer is written.
/// (Request extensions must be `Clone`; the first taker gets the stream.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Rewind>>>>);

impl OnUpgrade {
    /// The upgraded stream, or `None` when the connection was not switched.
    pub async fn stream(self) -> Option<Rewind> {
        let rx = self.0.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        rx.await.ok()
    }
}

/// How a request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
}

/// A parsed request head and what the connection needs to know about it.
struct Head {
    parts: http::request::Parts,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
    /// The per-request lookups it needs ([`crate::proxy::headers::Seen`]).
    seen: crate::proxy::headers::Seen,
}

/// Where a request body left the connection.
struct Returned {
    wire: Wire,
    /// The body's framing state: `Empty` once read to its end.
    rest: Option<Framing>,
}

/// A client's request body read straight from the connection, which it holds while the
/// handler reads it and hands back when it ends or is dropped.
pub struct NativeBody {
    wire: Option<Wire>,
    back: Arc<Mutex<Option<Returned>>>,
    /// `None` after a failure.
    state: Option<Framing>,
    /// Bytes of the `100 Continue` answer still to write before the first read.
    continue_at: Option<usize>,
}

impl std::fmt::Debug for NativeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NativeBody")
    }
}

#[derive(Debug)]
struct ClientBodyError(&'static str);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {}

impl NativeBody {
    fn give_back(&mut self) {
        if let Some(wire) = self.wire.take() {
            *self.back.lock().unwrap_or_else(|p| p.into_inner()) = Some(Returned { wire, rest: self.state });
        }
    }

    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = None;
        self.give_back();
        Poll::Ready(Some(Err(Box::new(ClientBodyError(why)))))
    }

    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(wire) = self.wire.as_mut() else { return Poll::Ready(Ok(())) };
        while let Some(at) = self.continue_at {
            if at == CONTINUE.len() {
                std::task::ready!(Pin::new(&mut wire.io).poll_flush(cx))?;
                self.continue_at = None;
                break;
            }
            match std::task::ready!(Pin::new(&mut wire.io).poll_write(cx, &CONTINUE[at..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.continue_at = Some(at + n),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for NativeBody {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl Body for NativeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.continue_at.is_some() {
            match this.poll_continue(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return this.fail("the connection failed"),
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            let Some(wire) = this.wire.as_mut() else { return Poll::Ready(None) };
            match &mut this.state {
                None | Some(Framing::Empty) => return Poll::Ready(None),
                Some(Framing::Length(left)) => {
                    if !wire.buf.is_empty() {
                        let n = (wire.buf.len() as u64).min(*left);
                        let data = wire.buf.split_to(n as usize).freeze();
                        *left -= n;
                        if *left == 0 {
                            this.state = Some(Framing::Empty);
                            this.give_back();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Some(Framing::Chunked(chunk)) => match decode(chunk, &mut wire.buf, false) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::End) => {
                        this.state = Some(Framing::Empty);
                        this.give_back();
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(why) => return this.fail(why),
                },
            }
            match wire.poll_fill(cx) {
                Poll::Ready(Ok(0)) => return this.fail("the client closed the connection in the middle of the body"),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return this.fail("the connection failed"),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, None | Some(Framing::Empty))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            None | Some(Framing::Empty) => SizeHint::with_exact(0),
            Some(Framing::Length(n)) => SizeHint::with_exact(n),
            Some(Framing::Chunked(_)) => SizeHint::default(),
        }
    }
}

/// Why a head could not be read.
enum HeadError {
    /// Answer this, then close.
    Refuse(GatewayError),
    /// Close without an answer (the client went away, or sent part of a head and stopped).
    Close,
}

/// Serves HTTP/1.1 requests on `wire` until either side closes, the connection idles past
/// `header_timeout`, or `drain` turns true (in-flight requests finish first).
pub async fn serve(
    wire: Wire,
    shared: Arc<Shared>,
    conn: ConnInfo,
    settings: Arc<Settings>,
    mut drain: watch::Receiver<bool>,
) {
    let mut wire = Some(wire);
    let mut timer = Box::pin(tokio::time::sleep(settings.header_timeout));
    let mut out = Vec::with_capacity(512);
    loop {
        let Some(w) = wire.as_mut() else { return };
        let head = match read_head(w, &mut timer, &settings, &mut drain).await {
            Ok(Some(h)) => h,
            Ok(None) | Err(HeadError::Close) => return,
            Err(HeadError::Refuse(e)) => {
                let resp = crate::gateway::refused(&shared, &conn, None, e);
                let _ = write_response(w, &mut out, resp, Version::HTTP_11, false, false).await;
                linger(w).await;
                return;
            }
        };
        let Head { mut parts, framing, keep_alive, expect_continue, upgrade, seen } = head;
        let head_only = parts.method == Method::HEAD;
        let version = parts.version;
        let mut switch = None;
        if upgrade {
            let (tx, rx) = oneshot::channel();
            parts.extensions.insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
            switch = Some(tx);
        }
        let (body, back) = match framing {
            Framing::Empty => (ClientBody::Empty, None),
            state => {
                let back = Arc::new(Mutex::new(None));
                let body = NativeBody {
                    wire: wire.take(),
                    back: back.clone(),
                    state: Some(state),
                    continue_at: expect_continue.then_some(0),
                };
                (ClientBody::Native(body), Some(back))
            }
        };
        // Built where it is polled: the request's future is several KiB, and a move from one
        // local to another is a copy of all of it per request once panics unwind
        // (bench/EXPERIMENTS.md, "Panics unwind").
        let handler = std::pin::pin!(gateway::handle(
            shared.clone(),
            ConnInfo { seen, ..conn.clone() },
            Request::from_parts(parts, body)
        ));
        let resp = match wire.as_mut() {
            // No body: the connection is ours while the handler runs. A client that leaves
            // cancels the request (the upstream sees its connection dropped); what it sends
            // meanwhile (a pipelined request) is kept, up to the head cap.
            Some(w) => {
                tokio::select! {
                    biased;
                    r = handler => r,
                    () = client_gone(w, PIPELINE_CAP.min(settings.max_head)) => return,
                }
            }
            None => handler.await,
        };
        // The body is gone with the handler's future: the connection comes back.
        let mut body_done = true;
        if let Some(back) = back {
            let returned = back.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some(Returned { wire: mut w, rest }) = returned else { return };
            body_done = finish_buffered(&mut w.buf, rest);
            wire = Some(w);
        }
        let Some(w) = wire.as_mut() else { return };
        let keep = keep_alive && body_done && !*drain.borrow();
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        match write_response(w, &mut out, resp, version, head_only, keep).await {
            Ok(_) if switched => {
                if let (Some(tx), Some(w)) = (switch, wire.take()) {
                    let _ = tx.send(w.into_rewind());
                }
                return;
            }
            Ok(true) => {}
            Ok(false) => {
                if !body_done {
                    linger(w).await;
                } else {
                    let _ = w.io.shutdown().await;
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// Resolves when the client closes (or breaks) the connection; keeps what it sends meanwhile.
async fn client_gone(w: &mut Wire, cap: usize) {
    loop {
        if w.buf.len() >= cap {
            return std::future::pending().await;
        }
        match w.fill().await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Discards what is left of an unread body when it is already buffered; true when the body
/// is then complete (the connection may carry another request).
fn finish_buffered(buf: &mut BytesMut, rest: Option<Framing>) -> bool {
    match rest {
        Some(Framing::Empty) => true,
        Some(Framing::Length(n)) if (buf.len() as u64) >= n => {
            buf.advance(n as usize);
            true
        }
        Some(Framing::Chunked(mut c)) => loop {
            match decode(&mut c, buf, false) {
                Ok(Step::Data(_)) => continue,
                Ok(Step::End) => break true,
                Ok(Step::NeedMore) | Err(_) => break false,
            }
        },
        _ => false,
    }
}

/// Closes after reading (and dropping) what the client is still sending, for a moment: a
/// close with unread bytes would reset the connection and could destroy the answer before
/// the client reads it.
async fn linger(w: &mut Wire) {
    let _ = w.io.shutdown().await;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut seen = 0;
        while seen < LINGER_BYTES {
            w.buf.clear();
            match w.fill().await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen += n,
            }
        }
    })
    .await;
}

/// Waits for a complete head: `Ok(None)` when the connection closes or idles out cleanly.
async fn read_head(
    w: &mut Wire,
    timer: &mut Pin<Box<tokio::time::Sleep>>,
    settings: &Settings,
    drain: &mut watch::Receiver<bool>,
) -> Result<Option<Head>, HeadError> {
    // The timer is not moved for every request (a re-registration in the timer wheel each):
    // it keeps an earlier deadline, and when it fires before this head's deadline it is moved
    // once. Deadlines only grow, so it never fires late.
    let mut deadline = None;
    loop {
        if !w.buf.is_empty()
            && let Some(head) = parse(&mut w.buf, settings).map_err(HeadError::Refuse)?
        {
            return Ok(Some(head));
        }
        let due = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + settings.header_timeout);
        let idle = w.buf.is_empty();
        if idle && *drain.borrow() {
            return Ok(None);
        }
        tokio::select! {
            biased;
            r = w.fill() => match r {
                Ok(0) | Err(_) => return Err(HeadError::Close),
                Ok(_) => {}
            },
            _ = timer.as_mut() => {
                if tokio::time::Instant::now() < due {
                    timer.as_mut().reset(due);
                    continue;
                }
                return if idle {
                    Ok(None)
                } else {
                    Err(HeadError::Refuse(GatewayError::new(
                        ErrorKind::RequestTimeout,
                        "the request head did not arrive in time",
                    )))
                };
            }
            _ = drain.changed(), if idle => return Ok(None),
        }
    }
}

fn bad(why: impl Into<std::borrow::Cow<'static, str>>) -> GatewayError {
    GatewayError::new(ErrorKind::BadRequest, why).closing()
}

fn head_too_large() -> GatewayError {
    GatewayError::new(ErrorKind::HeadersTooLarge, "request header block is too large").closing()
}

/// Parses one request head off the front of `buf` (what the connection does first with each
/// request; public for the benchmarks): `None` when more bytes are needed.
pub fn parse_request(buf: &mut BytesMut, settings: &Settings) -> Result<Option<http::request::Parts>, GatewayError> {
    Ok(parse(buf, settings)?.map(|h| h.parts))
}

/// Parses a complete head off the front of `buf`, or `None` when more bytes are needed.
fn parse(buf: &mut BytesMut, s: &Settings) -> Result<Option<Head>, GatewayError> {
    match parse_with(buf, s, s.max_headers.min(STACK_HEADERS)) {
        Err(None) if s.max_headers > STACK_HEADERS => {
            parse_with(buf, s, s.max_headers).map_err(|e| e.unwrap_or_else(too_many_headers))
        }
        r => r.map_err(|e| e.unwrap_or_else(too_many_headers)),
    }
}

fn too_many_headers() -> GatewayError {
    GatewayError::new(ErrorKind::HeadersTooLarge, "too many request headers").closing()
}

/// Parses with room for `slots` header lines; `Err(None)`: there were more.
fn parse_with(buf: &mut BytesMut, s: &Settings, slots: usize) -> Result<Option<Head>, Option<GatewayError>> {
    // Uninitialised slots, on the stack for the usual few headers.
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let lines: &mut [MaybeUninit<httparse::Header<'_>>] = if slots <= STACK_HEADERS {
        &mut stack[..slots]
    } else {
        heap.resize(slots, MaybeUninit::uninit());
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, lines) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > s.max_head => return Err(Some(head_too_large())),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(None),
        Err(e) => return Err(Some(bad(format!("invalid request head: {e}")))),
    };
    if len > s.max_head {
        return Err(Some(head_too_large()));
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(|_| bad("invalid method"))?;
    let version = if req.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
    let base = buf.as_ptr() as usize;
    let target = req.path.unwrap_or_default();
    if target.len() > MAX_URI {
        return Err(Some(GatewayError::new(ErrorKind::UriTooLong, "request target is too long").closing()));
    }
    let t0 = target.as_ptr() as usize - base;
    let t1 = t0 + target.len();
    let spans = Spans::of(buf, req.headers);
    let mut seen = spans.seen;
    seen.note_size(len, spans.len());
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(t0..t1)).map_err(|_| bad("invalid request target"))?;

    let mut headers = crate::header_map(spans.len() + 4);
    let (mut close, mut keep_alive, mut conn_upgrade, mut has_upgrade, mut expect_continue) =
        (false, false, false, false, false);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut hosts = 0;
    for entry in spans.entries(&head) {
        let (name, value) = entry.map_err(bad)?;
        if name == header::CONTENT_LENGTH {
            if length.is_some() {
                return Err(Some(bad("several Content-Length headers")));
            }
            length = Some(parse_decimal(value.as_bytes()).ok_or_else(|| bad("invalid Content-Length"))?);
        } else if name == header::TRANSFER_ENCODING {
            if chunked || !value.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Some(bad("unsupported Transfer-Encoding")));
            }
            chunked = true;
        } else if name == header::CONNECTION {
            for t in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                conn_upgrade |= t.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name == header::UPGRADE {
            has_upgrade = true;
        } else if name == header::HOST {
            hosts += 1;
            if !crate::pipeline::validate::valid_host(value.as_bytes()) {
                return Err(Some(bad("invalid Host header")));
            }
        } else if name == header::EXPECT {
            expect_continue = value.as_bytes().trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1 (an absolute-form target does not excuse
    // its absence); several are refused in any version.
    if hosts > 1 {
        return Err(Some(bad("several Host headers")));
    }
    if hosts == 0 && version == Version::HTTP_11 {
        return Err(Some(bad("missing Host header")));
    }
    let framing = match (length, chunked) {
        (Some(_), true) => return Err(Some(bad("both Content-Length and Transfer-Encoding"))),
        (_, true) if version == Version::HTTP_10 => {
            return Err(Some(bad("Transfer-Encoding in an HTTP/1.0 request")));
        }
        (_, true) => Framing::Chunked(Chunk::Size),
        (Some(0) | None, false) => Framing::Empty,
        (Some(n), false) => Framing::Length(n),
    };
    let keep_alive = if version == Version::HTTP_11 { !close } else { keep_alive && !close };
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11 && framing != Framing::Empty,
        upgrade: conn_upgrade && has_upgrade && version == Version::HTTP_11,
        seen,
    }))
}

/// Writes a response; `Ok(true)` when the connection may carry another request.
async fn write_response(
    w: &mut Wire,
    out: &mut Vec<u8>,
    resp: Response<Observed>,
    req: Version,
    head_only: bool,
    mut keep: bool,
) -> io::Result<bool> {
    let (mut parts, mut body) = resp.into_parts();
    // Taken before the body is polled: a body that ends finishes (and drops) its record.
    let own = body.own_headers();
    let raw = body.take_raw_headers();
    let status = parts.status.as_u16();
    let informational = parts.status.is_informational();
    let bodiless = head_only || status == 204 || status == 304 || informational;

    // Whatever of the body is ready now goes out with the head in one write.
    let mut ready_at: [Bytes; READY_FRAMES] = Default::default();
    let mut n_ready = 0;
    let mut ended = bodiless;
    if !bodiless {
        while n_ready < READY_FRAMES {
            match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data()
                        && !d.is_empty()
                    {
                        ready_at[n_ready] = d;
                        n_ready += 1;
                    }
                }
                // Nothing is written yet (e.g. a bad chunk size that came with the upstream's
                // head): the client can still get a proper 502.
                Poll::Ready(Some(Err(_))) => return write_bad_upstream(w, out, &mut body).await,
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
    }
    // A HEAD answer carries the length the GET would have, when the map does not already.
    let head_length = (head_only
        && !informational
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
        && raw.as_ref().and_then(|r| r.get(&header::CONTENT_LENGTH)).is_none())
    .then(|| body.size_hint().exact())
    .flatten()
    .filter(|&n| n > 0);
    if bodiless {
        // Not sent, but read to its end when it is at hand (a gateway-made body), so the
        // request is logged as complete.
        for _ in 0..READY_FRAMES {
            match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(Some(Ok(_))) => {}
                _ => break,
            }
        }
    }
    let ready = &ready_at[..n_ready];
    let ready_len: u64 = ready.iter().map(|d| d.len() as u64).sum();
    let length = if bodiless {
        None
    } else if ended {
        Some(ready_len)
    } else {
        // The hint is what is still to come (`http_body`'s contract): the frames taken above
        // are part of the length too.
        body.size_hint().exact().map(|rest| rest + ready_len)
    };
    // Chunked for HTTP/1.1 even on a closing connection: the client can tell a cut body
    // from a complete one. HTTP/1.0 has no chunks: the close ends the body.
    let chunked = !bodiless && length.is_none() && req == Version::HTTP_11;
    if !bodiless && length.is_none() && !chunked {
        keep = false;
    }

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    crate::push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut lines = Lines {
        out,
        keep,
        has_date: false,
        informational,
        bodiless,
        no_length: informational || status == 204,
        own_id: own.is_some(),
        own_timing: own.as_ref().is_some_and(|(_, o)| o.server_timing.is_some()),
    };
    for (name, value) in &parts.headers {
        let name = name.as_str().as_bytes();
        if lines.admits(name, value.as_bytes()) {
            lines.out.extend_from_slice(name);
            lines.out.extend_from_slice(b": ");
            lines.out.extend_from_slice(value.as_bytes());
            lines.out.extend_from_slice(b"\r\n");
        }
    }
    if let Some(raw) = &raw {
        for (name, line) in raw.lines() {
            // What the map holds replaces the upstream's (insert semantics).
            let replaced =
                !parts.headers.is_empty() && std::str::from_utf8(name).is_ok_and(|n| parts.headers.contains_key(n));
            if !replaced && lines.admits(name, &line[name.len() + 1..]) {
                // The line as it came, from the name to the end of the value.
                lines.out.extend_from_slice(line);
                lines.out.extend_from_slice(b"\r\n");
            }
        }
    }
    let Lines { out, keep, has_date, .. } = lines;
    if let Some((request_id, own)) = &own {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(request_id.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some([limit, remaining, reset]) = own.ratelimit {
            for (name, n) in [
                (&b"ratelimit-limit: "[..], limit),
                (b"ratelimit-remaining: ", remaining),
                (b"ratelimit-reset: ", reset),
            ] {
                out.extend_from_slice(name);
                crate::push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
        }
        if let Some((total, upstream)) = own.server_timing {
            out.extend_from_slice(b"server-timing: ");
            crate::observe::push_server_timing(out, total, upstream);
            out.extend_from_slice(b"\r\n");
        }
    }
    if !has_date && !informational {
        out.extend_from_slice(b"date: ");
        date::push(out);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length.or(head_length) {
        out.extend_from_slice(b"content-length: ");
        crate::push_decimal(out, n);
        out.extend_from_slice(b"\r\n");
    } else if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep && !informational {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep && req == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // The head is written: the header map becomes a spare, and the upstream's head (a slice of
    // its connection's read buffer) is let go, so that buffer can be reused for the body.
    crate::recycle_header_map(std::mem::take(&mut parts.headers));
    drop(raw);

    let mut sent = 0u64;
    if chunked {
        write_chunks(w, out, ready, ended).await?;
    } else {
        let mut bufs: [IoSlice<'_>; READY_FRAMES + 1] = [IoSlice::new(&[]); READY_FRAMES + 1];
        bufs[0] = IoSlice::new(out);
        for (slot, d) in bufs[1..].iter_mut().zip(ready) {
            *slot = IoSlice::new(d);
            sent += d.len() as u64;
        }
        write_all(&mut w.io, &mut bufs[..=ready.len()]).await?;
    }
    // The rest of the body as it comes.
    while !ended {
        match http_body_util::BodyExt::frame(&mut body).await {
            Some(Ok(f)) => {
                let Ok(d) = f.into_data() else { continue };
                if d.is_empty() {
                    continue;
                }
                if chunked {
                    out.clear();
                    write_chunks(w, out, std::slice::from_ref(&d), false).await?;
                } else {
                    sent += d.len() as u64;
                    if length.is_some_and(|n| sent > n) {
                        return Err(io::ErrorKind::InvalidData.into());
                    }
                    write_all(&mut w.io, &mut [IoSlice::new(&d)]).await?;
                }
            }
            Some(Err(_)) => return Err(io::ErrorKind::BrokenPipe.into()),
            None => {
                ended = true;
                if chunked {
                    write_all(&mut w.io, &mut [IoSlice::new(b"0\r\n\r\n")]).await?;
                }
            }
        }
    }
    if length.is_some_and(|n| sent != n) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    w.io.flush().await?;
    Ok(keep)
}

/// Answers 502 `bad_upstream_response` in place of a response whose body broke before any of
/// it was written, and closes the connection (what follows on it cannot be trusted).
async fn write_bad_upstream(w: &mut Wire, out: &mut Vec<u8>, body: &mut Observed) -> io::Result<bool> {
    let rid = body.replaced_by(502);
    let rid = rid.as_ref().and_then(|r| r.to_str().ok()).unwrap_or("");
    let json = crate::error::error_json(
        crate::error::ErrorKind::UpstreamBadResponse.code(),
        "the upstream service sent an invalid response",
        rid,
    );
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\n");
    if !rid.is_empty() {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(rid.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    date::push(out);
    out.extend_from_slice(b"\r\ncontent-length: ");
    crate::push_decimal(out, json.len() as u64);
    out.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    write_all(&mut w.io, &mut [IoSlice::new(out), IoSlice::new(&json)]).await?;
    w.io.flush().await?;
    Ok(false)
}

/// Copies header lines into a response head, leaving out what the writer sets itself.
struct Lines<'a> {
    out: &'a mut Vec<u8>,
    /// Whether the connection stays open (a `Connection: close` from the handler ends it).
    keep: bool,
    has_date: bool,
    informational: bool,
    bodiless: bool,
    /// 1xx and 204: no `Content-Length` at all (RFC 9110 §8.6), whatever the upstream sent.
    no_length: bool,
    /// The gateway's `X-Request-Id` follows (it replaces any other).
    own_id: bool,
    /// The gateway's `Server-Timing` follows (it replaces any other).
    own_timing: bool,
}

impl Lines<'_> {
    /// Whether a header (`name` in any case) goes into the head; `value` is read for
    /// `Connection` only.
    fn admits(&mut self, name: &[u8], value: &[u8]) -> bool {
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        // By length first: one comparison at most per header.
        match name.len() {
            10 if !self.informational && is(b"connection") => {
                // The handler asks for a close (e.g. after a framing error); the line is ours.
                self.keep &= !value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                false
            }
            17 if !self.informational && is(b"transfer-encoding") => false,
            14 if is(b"content-length") => self.bodiless && !self.no_length,
            12 if is(b"x-request-id") => !self.own_id,
            13 if is(b"server-timing") => !self.own_timing,
            4 if is(b"date") => {
                self.has_date = true;
                true
            }
            _ => true,
        }
    }
}

/// Writes `out` (a head, or nothing) and `data` as chunks, and the last chunk when `end`.
async fn write_chunks(w: &mut Wire, out: &[u8], data: &[Bytes], end: bool) -> io::Result<()> {
    let mut sizes = [[0u8; 20]; READY_FRAMES];
    let mut lens = [0usize; READY_FRAMES];
    for ((size, len), d) in sizes.iter_mut().zip(lens.iter_mut()).zip(data) {
        *len = hex_line(size, d.len() as u64);
    }
    let mut bufs: Vec<IoSlice<'_>> = Vec::with_capacity(2 + data.len() * 3);
    bufs.push(IoSlice::new(out));
    for ((size, len), d) in sizes.iter().zip(lens.iter()).zip(data) {
        bufs.push(IoSlice::new(&size[..*len]));
        bufs.push(IoSlice::new(d));
        bufs.push(IoSlice::new(b"\r\n"));
    }
    if end {
        bufs.push(IoSlice::new(b"0\r\n\r\n"));
    }
    write_all(&mut w.io, &mut bufs).await
}

async fn write_all(io: &mut Box<dyn Io>, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match io.write_vectored(bufs).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => IoSlice::advance_slices(&mut bufs, n),
        }
    }
    Ok(())
}

/// The `Date` header's value (IMF-fixdate), formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    /// Appends the current date.
    pub fn push(out: &mut Vec<u8>) {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, format(secs));
            }
            out.extend_from_slice(&c.1);
        });
    }

    /// `Sun, 06 Nov 1994 08:49:37 GMT` for `secs` since the Unix epoch.
    pub fn format(secs: u64) -> [u8; 29] {
        const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
        const MONTHS: [&[u8; 3]; 12] =
            [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (year, month, day) = crate::civil_date(days);
        let (year, month, day) = (u64::from(year), month as usize, u64::from(day));
        let mut b = [0u8; 29];
        b[..3].copy_from_slice(DAYS[(days % 7) as usize]);
        b[3..5].copy_from_slice(b", ");
        let two = |v: u64| [b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8];
        b[5..7].copy_from_slice(&two(day));
        b[7] = b' ';
        b[8..11].copy_from_slice(MONTHS[month - 1]);
        b[11] = b' ';
        b[12..14].copy_from_slice(&two(year / 100));
        b[14..16].copy_from_slice(&two(year));
        b[16] = b' ';
        b[17..19].copy_from_slice(&two(rem / 3600));
        b[19] = b':';
        b[20..22].copy_from_slice(&two(rem / 60 % 60));
        b[22] = b':';
        b[23..25].copy_from_slice(&two(rem % 60));
        b[25..].copy_from_slice(b" GMT");
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings { header_timeout: Duration::from_secs(5), max_head: 8 * 1024, max_headers: 100 }
    }

    /// Parses `s` with a `Host` header added when it has none (the host rules have their own
    /// test).
    fn head(s: &str) -> Result<Option<Head>, GatewayError> {
        let with_host = match s.to_ascii_lowercase().contains("\nhost:") {
            true => s.to_string(),
            false => s.replacen("\r\n", "\r\nHost: t\r\n", 1),
        };
        parse(&mut BytesMut::from(with_host.as_str()), &settings())
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        let raw = |s: &str| parse(&mut BytesMut::from(s), &settings());
        for bad in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://gw/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n",
        ] {
            let e = raw(bad).err().unwrap_or_else(|| panic!("accepted: {bad:?}"));
            assert_eq!(e.kind().status(), 400, "{bad:?}");
            assert!(e.message().contains("Host"), "{bad:?}: {}", e.message());
        }
        assert!(raw("GET / HTTP/1.0\r\n\r\n").unwrap().is_some(), "HTTP/1.0 may omit Host");
        assert!(raw("GET / HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap().is_some());
    }

    fn refused(s: &str) -> (u16, String) {
        match head(s) {
            Err(e) => (e.kind().status().as_u16(), e.message().to_string()),
            Ok(_) => panic!("accepted: {s:?}"),
        }
    }

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(&date::format(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&date::format(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&date::format(1_709_210_096), b"Thu, 29 Feb 2024 12:34:56 GMT");
        assert_eq!(&date::format(4_102_444_799), b"Thu, 31 Dec 2099 23:59:59 GMT");
    }

    #[test]
    fn heads_parse_with_their_framing() {
        let h = head("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.parts.uri, "/a?b=1");
        assert_eq!(h.parts.headers.get_all("x-a").iter().count(), 2);
        assert!(h.keep_alive && h.framing == Framing::Empty && !h.upgrade);
        let h = head("POST / HTTP/1.1\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.expect_continue);
        let h = head("POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\nconnection: close\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap();
        assert!(h.keep_alive);
        let h = head("GET /ws HTTP/1.1\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\n\r\n").unwrap();
        assert!(h.unwrap().upgrade);
        assert!(head("GET / HTTP/1.1\r\nhost: x\r\n").unwrap().is_none(), "partial");
    }

    #[test]
    fn ambiguous_framing_and_bad_heads_are_refused() {
        for (raw, status) in [
            ("POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nbad name: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nx : a\r\n\r\n", 400),
            ("GET /\x01 HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\n\r\n", 400),
        ] {
            let (got, msg) = refused(raw);
            assert_eq!(got, status, "{raw:?}: {msg}");
        }
        let many: String = (0..=100).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(refused(&format!("GET / HTTP/1.1\r\n{many}\r\n")).0, 431);
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(9000));
        assert_eq!(refused(&big).0, 431, "an incomplete head past the cap");
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_URI));
        let s = Settings { max_head: 1 << 20, ..settings() };
        let e = parse(&mut BytesMut::from(long.as_str()), &s).err().expect("refused");
        assert_eq!(e.kind().status(), 414);
    }

    #[test]
    fn many_headers_spill_to_the_heap_up_to_the_limit() {
        let many: String = (0..89).map(|i| format!("x-{i}: {i}\r\n")).collect();
        let h = head(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap().unwrap();
        assert_eq!(h.parts.headers.len(), 90, "89 and Host");
        assert_eq!(h.parts.headers["x-88"], "88");
    }

    #[test]
    fn unread_buffered_bodies_are_skipped_by_their_framing() {
        let mut buf = BytesMut::from("abcdeGET");
        assert!(finish_buffered(&mut buf, Some(Framing::Length(5))));
        assert_eq!(&buf[..], b"GET");
        let mut buf = BytesMut::from("abc");
        assert!(!finish_buffered(&mut buf, Some(Framing::Length(5))));
        let mut buf = BytesMut::from("3\r\nabc\r\n0\r\n\r\nGET");
        assert!(finish_buffered(&mut buf, Some(Framing::Chunked(Chunk::Size))));
        assert_eq!(&buf[..], b"GET");
        let mut buf = BytesMut::from("3\r\nab");
        assert!(!finish_buffered(&mut buf, Some(Framing::Chunked(Chunk::Size))));
        assert!(!finish_buffered(&mut BytesMut::new(), None), "a failed body");
    }
}
