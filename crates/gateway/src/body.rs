//! The response body type: an upstream's streaming body or a small body the gateway made.
//!
//! An enum instead of a boxed trait object keeps the hot path free of a heap allocation per
//! response; both variants are `Unpin`, so no projection is needed.

use crate::proxy::h1::ResponseBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body: streamed from an upstream or made by the gateway.
#[derive(Debug)]
pub enum GatewayBody {
    /// Streamed from the upstream as it arrives; never buffered whole.
    Upstream(ResponseBody),
    /// An upstream answer read by hyper (a refused WebSocket handshake).
    Hyper(Incoming),
    /// A complete body made by the gateway (errors, health, metrics, cache hits).
    Full(Full<Bytes>),
    /// Bytes already read from an upstream body, then the rest of it.
    Prefixed(Option<Bytes>, ResponseBody),
}

impl GatewayBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Full::new(b.into()))
    }
    /// An empty body.
    pub fn empty() -> Self {
        Self::Full(Full::new(Bytes::new()))
    }
    /// The upstream's header lines when they were not put into the response's map
    /// ([`crate::proxy::h1::RawHeaders`]).
    pub fn raw_headers(&self) -> Option<&crate::proxy::h1::RawHeaders> {
        match self {
            Self::Upstream(b) => b.raw_headers(),
            _ => None,
        }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Upstream(b) => Pin::new(b).poll_frame(cx),
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Self::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            Self::Prefixed(prefix, rest) => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(b) => b.is_end_stream(),
            Self::Hyper(b) => b.is_end_stream(),
            Self::Full(b) => b.is_end_stream(),
            Self::Prefixed(p, rest) => p.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(b) => b.size_hint(),
            Self::Hyper(b) => b.size_hint(),
            Self::Full(b) => b.size_hint(),
            Self::Prefixed(..) => SizeHint::default(),
        }
    }
}

impl GatewayBody {
    /// An upstream body about to be answered on a connection whose head hyper writes (HTTP/2,
    /// the hyper HTTP/1.1 engine), looked at once without waiting: a body already broken in
    /// the bytes that came with its head (a bad chunk size) is an error now, while a 502 can
    /// still be sent instead of a reset stream. What the look read is kept in front.
    pub fn upstream_checked(mut body: ResponseBody) -> Result<Self, BoxError> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
            std::task::Poll::Ready(Some(Err(e))) => Err(e),
            std::task::Poll::Ready(Some(Ok(frame))) => Ok(Self::Prefixed(frame.into_data().ok(), body)),
            std::task::Poll::Ready(None) | std::task::Poll::Pending => Ok(Self::Upstream(body)),
        }
    }
}

/// Reads an upstream body up to `max` bytes: `Ok(bytes)` when it fits, otherwise a body that
/// replays what was read and streams the rest (nothing is lost, nothing buffered beyond `max`).
pub async fn read_bounded(mut body: ResponseBody, max: usize) -> Result<Result<Bytes, GatewayBody>, BoxError> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame?.into_data() {
            buf.extend_from_slice(&d);
            if buf.len() > max {
                return Ok(Err(GatewayBody::Prefixed(Some(buf.freeze()), body)));
            }
        }
    }
    Ok(Ok(buf.freeze()))
}

/// The response body as the client sees it: counts bytes out and, when the body ends or is
/// dropped (client gone), finishes the request's access log line and metrics.
pub struct Observed {
    inner: GatewayBody,
    record: Option<crate::observe::RequestRecord>,
}

impl Observed {
    /// Wraps a response body with the record to finish when it ends.
    pub fn new(inner: GatewayBody, record: crate::observe::RequestRecord) -> Self {
        Self { inner, record: Some(record) }
    }

    /// Takes the upstream's header lines when they were not put into the response's map: the
    /// writer copies them into the head after the map's.
    pub fn take_raw_headers(&mut self) -> Option<crate::proxy::h1::RawHeaders> {
        match &mut self.inner {
            GatewayBody::Upstream(b) => b.take_raw_headers(),
            _ => None,
        }
    }

    /// The body broke before any byte of the response was written: the client is answered
    /// with `status` instead, and the request is recorded so. Returns the request id.
    pub fn replaced_by(&mut self, status: u16) -> Option<http::HeaderValue> {
        let rec = self.record.as_mut()?;
        rec.status = status;
        Some(rec.request_id.clone())
    }

    /// The request id and the gateway's other own headers, when the connection's writer is
    /// to put them into the head ([`crate::observe::OwnHeaders`]).
    pub fn own_headers(&self) -> Option<(http::HeaderValue, crate::observe::OwnHeaders)> {
        let rec = self.record.as_ref()?;
        Some((rec.request_id.clone(), rec.own_headers?))
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(rec)) = (f.data_ref(), this.record.as_mut()) {
                    rec.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(rec) = this.record.as_mut() {
                    rec.aborted = true;
                }
            }
            Poll::Ready(None) => {
                if let Some(rec) = this.record.take() {
                    rec.finish();
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(mut rec) = self.record.take() {
            // hyper drops a body without polling it when it knows it is empty (e.g. HEAD,
            // 204) — that is a completed response, not an abort.
            if !self.inner.is_end_stream() {
                rec.aborted = true;
            }
            rec.finish();
        }
    }
}

/// Boxed error for request bodies sent upstream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a client's request body was abandoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BodyFailure {
    /// Nothing wrong (yet).
    None = 0,
    /// More bytes than the route allows.
    TooLarge = 1,
    /// The client sent nothing for `body_idle_timeout`.
    Idle = 2,
    /// Broken framing or the client went away.
    Client = 3,
}

/// What the request body did, shared between the body (writer) and the request path (reader).
#[derive(Debug, Default)]
pub struct BodyStats {
    /// Bytes received from the client.
    pub bytes: std::sync::atomic::AtomicU64,
    failure: std::sync::atomic::AtomicU8,
    /// The last read found nothing from the client yet (the gateway waits on the client).
    waiting: std::sync::atomic::AtomicBool,
}

impl BodyStats {
    /// Why the body failed, if it did.
    pub fn failure(&self) -> BodyFailure {
        match self.failure.load(std::sync::atomic::Ordering::Acquire) {
            1 => BodyFailure::TooLarge,
            2 => BodyFailure::Idle,
            3 => BodyFailure::Client,
            _ => BodyFailure::None,
        }
    }
    /// The client is what the exchange waits on: its body failed, or the gateway's last read
    /// of it found nothing yet (a body still arriving, not one the upstream stopped taking).
    /// A try that fails or times out then is not the upstream's fault.
    pub fn client_holds_up(&self) -> bool {
        self.failure() != BodyFailure::None || self.waiting.load(std::sync::atomic::Ordering::Acquire)
    }
    fn fail(&self, f: BodyFailure) {
        self.failure.store(f as u8, std::sync::atomic::Ordering::Release);
    }
}

#[derive(Debug)]
struct BodyError(&'static str);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyError {}

/// A request body read by hyper, whose last byte is handed on only once the stream has ended
/// cleanly.
///
/// HTTP/2 checks a `content-length` against the DATA frames only as they arrive (RFC 9113
/// §8.1.1): a stream that declares 5 bytes and sends 6 is reset when the sixth arrives, after
/// the first five were read. Forwarded at once, those five would complete a
/// Content-Length-framed request upstream: an order executed for a client that was told its
/// stream failed. So the last byte of a data frame of a body with a declared length is held
/// back until the next frame shows the end (nothing is held when the frame itself ends the
/// stream, the usual case, nor for a body of unknown length, which goes upstream chunked and
/// whose cut an upstream sees as incomplete anyway), and a declared
/// length of 0 on a stream still open is not passed on as a length at all (the body goes
/// upstream chunked, ended only when the client's stream ends cleanly). A malformed stream thus
/// reaches the upstream only as an incomplete request, which it does not act on.
#[derive(Debug)]
pub struct HeldBody {
    inner: Incoming,
    /// The body has a declared length (so it goes upstream Content-Length-framed). A body of
    /// unknown length goes chunked, and an upstream sees a cut stream as incomplete anyway:
    /// nothing is held (a streaming client waiting for an answer to what it sent is not kept
    /// waiting for a byte).
    hold: bool,
    /// The last byte of the data so far, until the stream is seen to end.
    held: Option<Bytes>,
    /// A frame that came while `held` had to go first.
    next: Option<Frame<Bytes>>,
}

impl HeldBody {
    /// Wraps hyper's body.
    pub fn new(inner: Incoming) -> Self {
        let hold = inner.size_hint().exact().is_some_and(|n| n > 0);
        Self { inner, hold, held: None, next: None }
    }

    /// `held` (if any) goes out now and `then` after it.
    fn release_then(&mut self, then: Frame<Bytes>) -> Frame<Bytes> {
        match self.held.take() {
            Some(h) => {
                self.next = Some(then);
                Frame::data(h)
            }
            None => then,
        }
    }
}

impl Body for HeldBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.next.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                // Ended cleanly: what was held goes now.
                Poll::Ready(None) => return Poll::Ready(this.held.take().map(|h| Ok(Frame::data(h)))),
                Poll::Ready(Some(Err(e))) => {
                    this.held = None;
                    return Poll::Ready(Some(Err(BoxError::from(e))));
                }
                Poll::Ready(Some(Ok(f))) => f,
            };
            let mut data = match frame.into_data() {
                Ok(d) if d.is_empty() => continue,
                Ok(d) => d,
                // Trailers come last.
                Err(trailers) => return Poll::Ready(Some(Ok(this.release_then(trailers)))),
            };
            if !this.hold || this.inner.is_end_stream() {
                return Poll::Ready(Some(Ok(this.release_then(Frame::data(data)))));
            }
            let last = data.split_off(data.len() - 1);
            let before = this.held.replace(last);
            match (before, data.is_empty()) {
                (Some(b), true) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                (Some(b), false) => {
                    this.next = Some(Frame::data(data));
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                (None, true) => continue,
                (None, false) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.next.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        // A length of 0 on a stream still open: not a length the upstream may rely on.
        if inner.exact() == Some(0) && !self.inner.is_end_stream() {
            return SizeHint::default();
        }
        let extra = self.held.as_ref().map_or(0, |h| h.len() as u64)
            + self.next.as_ref().and_then(|f| f.data_ref()).map_or(0, |d| d.len() as u64);
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + extra);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

/// A client's request body as the connection delivered it.
#[derive(Debug)]
pub enum ClientBody {
    /// No body (no length, or a zero length).
    Empty,
    /// Read by hyper (HTTP/2, and HTTP/1.1 with `server.http1: hyper`).
    Hyper(HeldBody),
    /// Read by the gateway's own HTTP/1.1 connection.
    Native(crate::server::h1::NativeBody),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Self::Native(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Hyper(b) => b.is_end_stream(),
            Self::Native(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Hyper(b) => b.size_hint(),
            Self::Native(b) => b.size_hint(),
        }
    }
}

/// The client's body on its way upstream: streamed, counted, capped at the route's `max_body`
/// (chunked bodies included: the stream is cut the moment it grows past the cap, so the
/// upstream never receives a complete oversized request), and abandoned when the client stops
/// sending for `body_idle_timeout`.
pub struct RequestBody {
    inner: ClientBody,
    stats: std::sync::Arc<BodyStats>,
    max: u64,
    idle: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl RequestBody {
    /// Wraps a client body.
    pub fn new(inner: ClientBody, stats: std::sync::Arc<BodyStats>, max: u64, idle: std::time::Duration) -> Self {
        Self { inner, stats, max, idle, timer: None }
    }

    /// Reads the whole body (bounded by the cap and the idle timeout).
    pub async fn read_all(mut self) -> Result<Bytes, BodyFailure> {
        use http_body_util::BodyExt;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = self.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                Err(_) => return Err(self.stats.failure()),
            }
        }
        Ok(buf.freeze())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::sync::atomic::Ordering;
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if this.timer.is_some() {
                    this.stats.waiting.store(false, Ordering::Release);
                }
                if let Some(d) = f.data_ref() {
                    let n = this.stats.bytes.fetch_add(d.len() as u64, Ordering::Relaxed) + d.len() as u64;
                    if n > this.max {
                        this.stats.fail(BodyFailure::TooLarge);
                        return Poll::Ready(Some(Err(Box::new(BodyError("request body too large")))));
                    }
                }
                this.timer = None;
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.stats.fail(BodyFailure::Client);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                if this.timer.is_some() {
                    this.stats.waiting.store(false, Ordering::Release);
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = this.idle;
                if this.timer.is_none() {
                    this.stats.waiting.store(true, Ordering::Release);
                }
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if timer.as_mut().poll(cx).is_ready() {
                    this.stats.fail(BodyFailure::Idle);
                    return Poll::Ready(Some(Err(Box::new(BodyError("request body idle timeout")))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body sent upstream: the client's stream, or bytes already read and validated.
pub enum UpstreamBody {
    /// Streamed as it arrives.
    Stream(RequestBody),
    /// Read whole first (JSON validation), or empty; kept whole for a replay.
    Full(Bytes),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Stream(b) => Pin::new(b).poll_frame(cx),
            Self::Full(b) if b.is_empty() => Poll::Ready(None),
            Self::Full(b) => Poll::Ready(Some(Ok(Frame::data(std::mem::take(b))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Stream(b) => b.is_end_stream(),
            Self::Full(b) => b.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Stream(b) => b.size_hint(),
            Self::Full(b) => SizeHint::with_exact(b.len() as u64),
        }
    }
}
