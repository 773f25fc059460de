//! The response body type: an upstream's streaming body or a small body the gateway made.
//!
//! An enum instead of a boxed trait object keeps the hot path free of a heap allocation per
//! response; both variants are `Unpin`, so no projection is needed.

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
    Upstream(Incoming),
    /// A complete body made by the gateway (errors, health, metrics).
    Full(Full<Bytes>),
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
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Upstream(b) => Pin::new(b).poll_frame(cx),
            Self::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(b) => b.is_end_stream(),
            Self::Full(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(b) => b.size_hint(),
            Self::Full(b) => b.size_hint(),
        }
    }
}

/// A body wrapper that counts the bytes that pass through it into a shared counter.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<B> Counted<B> {
    /// Wraps `inner`; every data frame adds its length to `count`.
    pub fn new(inner: B, count: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            this.count
                .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
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

/// The response body as the client sees it: counts bytes out and, when the body ends or is
/// dropped (client gone), finishes the request's access log line and metrics.
pub struct Observed {
    inner: GatewayBody,
    record: Option<crate::observe::RequestRecord>,
}

impl Observed {
    /// Wraps a response body with the record to finish when it ends.
    pub fn new(inner: GatewayBody, record: crate::observe::RequestRecord) -> Self {
        Self {
            inner,
            record: Some(record),
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
