//! Response body used by every simulated service: either a complete buffer or a
//! chunked stream with optional inter-chunk delays and an optional injected failure.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// Minimum pause between the first chunk and the injected error of a mid-body reset, so the
/// headers and the first chunk reach the socket before the connection is aborted.
const MID_BODY_PAUSE: Duration = Duration::from_millis(10);

/// Body of a simulated response.
#[derive(Debug)]
pub(crate) enum SimBody {
    /// Whole body at once (sent with `content-length`).
    Full(Option<Bytes>),
    /// Streamed body (sent chunked, without `content-length`).
    Chunks(ChunkStream),
}

#[derive(Debug)]
pub(crate) struct ChunkStream {
    chunks: VecDeque<Bytes>,
    delay: Duration,
    fail: bool,
    pause: Option<Pin<Box<Sleep>>>,
}

impl SimBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() { Self::Full(None) } else { Self::Full(Some(bytes)) }
    }

    pub(crate) fn empty() -> Self {
        Self::Full(None)
    }

    /// Streams `bytes` as `n` chunks (padding with trailing spaces when the body is shorter
    /// than `n` bytes, which keeps JSON valid) with `delay` between consecutive chunks.
    pub(crate) fn chunked(bytes: Bytes, n: usize, delay: Duration) -> Self {
        Self::Chunks(ChunkStream { chunks: split(bytes, n.max(1)), delay, fail: false, pause: None })
    }

    /// Sends the first of `n` chunks (`n` at least 2), then fails the body so the server aborts
    /// the connection (HTTP/1) or resets the stream (HTTP/2).
    pub(crate) fn truncated(bytes: Bytes, n: usize, delay: Duration) -> Self {
        let mut chunks = split(bytes, n.max(2));
        chunks.truncate(1);
        Self::Chunks(ChunkStream { chunks, delay: delay.max(MID_BODY_PAUSE), fail: true, pause: None })
    }

    /// Returns the complete body bytes if this is a full body.
    pub(crate) fn into_full(self) -> Option<Bytes> {
        match self {
            Self::Full(b) => Some(b.unwrap_or_default()),
            Self::Chunks(_) => None,
        }
    }
}

fn split(mut bytes: Bytes, n: usize) -> VecDeque<Bytes> {
    if bytes.len() < n {
        let mut padded = Vec::with_capacity(n);
        padded.extend_from_slice(&bytes);
        padded.resize(n, b' ');
        bytes = Bytes::from(padded);
    }
    let len = bytes.len();
    let mut out = VecDeque::with_capacity(n);
    let mut start = 0;
    for i in 1..=n {
        let end = len * i / n;
        out.push_back(bytes.slice(start..end));
        start = end;
    }
    out
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Chunks(s) => {
                if let Some(pause) = s.pause.as_mut() {
                    ready!(pause.as_mut().poll(cx));
                    s.pause = None;
                }
                match s.chunks.pop_front() {
                    Some(chunk) => {
                        if (!s.chunks.is_empty() || s.fail) && !s.delay.is_zero() {
                            s.pause = Some(Box::pin(tokio::time::sleep(s.delay)));
                        }
                        Poll::Ready(Some(Ok(Frame::data(chunk))))
                    }
                    None if s.fail => Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "b25-sim: injected mid-body reset",
                    )))),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Chunks(s) => s.chunks.is_empty() && !s.fail,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Chunks(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything() {
        let parts = split(Bytes::from_static(b"abcdefghij"), 3);
        assert_eq!(parts.len(), 3);
        let joined: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(joined, b"abcdefghij");
        assert!(parts.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn split_pads_short_bodies() {
        let parts = split(Bytes::from_static(b"{}"), 4);
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|p| p.len() == 1));
    }
}
