//! A read-side watcher for HTTP/1 framing conflicts hyper hides (`Content-Length` with
//! `Transfer-Encoding`, and several `Content-Length` lines, which hyper folds into one when they
//! are equal).
//!
//! When a request carries both `Content-Length` and `Transfer-Encoding`, hyper follows RFC 9112
//! (chunked wins), drops `Content-Length` from the parsed headers and turns keep-alive off. That
//! is safe for hyper itself, but the gateway's policy is stricter — such a request is a
//! smuggling attempt and must be refused with 400 — and the handler can no longer see it. This
//! wrapper looks at the raw bytes: at each line start it compares the header name with the two
//! framing headers (ASCII case-insensitive); a blank line ends a header block, and a block with
//! both marks the connection. The handler checks the mark before anything else.
//!
//! Cost: at most the first 18 bytes of each line are looked at one by one, the rest of a line
//! (and a body without newlines) is skipped with `memchr`; no allocation; HTTP/2 connections (the preface) are
//! not scanned.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const CL: &[u8] = b"content-length:";
const TE: &[u8] = b"transfer-encoding:";
/// Longest prefix we must remember across reads (the longer header name).
const NAME_MAX: usize = 18;

pin_project_lite::pin_project! {
    /// An I/O stream whose reads are watched for framing conflicts.
    pub struct Sniff<T> {
        #[pin]
        inner: T,
        flag: Arc<AtomicBool>,
        // Bytes of the current line seen so far (up to NAME_MAX), lower-cased.
        line: [u8; NAME_MAX],
        line_len: usize,
        at_line_start: bool,
        blank_line: bool,
        saw_cl: bool,
        // A second `Content-Length` line in the same block (hyper folds equal ones into one).
        two_cl: bool,
        saw_te: bool,
        first: bool,
        off: bool,
    }
}

impl<T> Sniff<T> {
    /// Wraps `inner`; `flag` is set when a header block has both framing headers, or two
    /// `Content-Length` lines.
    pub fn new(inner: T, flag: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            flag,
            line: [0; NAME_MAX],
            line_len: 0,
            at_line_start: true,
            blank_line: false,
            saw_cl: false,
            two_cl: false,
            saw_te: false,
            first: true,
            off: false,
        }
    }
}

impl<T: AsyncRead> AsyncRead for Sniff<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if *this.off {
            return r;
        }
        let new = &buf.filled()[before..];
        if *this.first && !new.is_empty() {
            *this.first = false;
            if new.starts_with(b"PRI * HTTP/2") {
                *this.off = true;
                return r;
            }
        }
        let mut i = 0;
        while i < new.len() {
            if !*this.at_line_start {
                // Past the header name (or in a body): jump to the next line.
                let Some(p) = memchr::memchr(b'\n', &new[i..]) else { break };
                i += p + 1;
                *this.at_line_start = true;
                *this.blank_line = true;
                *this.line_len = 0;
                continue;
            }
            let b = new[i];
            i += 1;
            match b {
                b'\n' => {
                    if *this.blank_line {
                        // End of a header block (or a blank line in a body: harmless).
                        if (*this.saw_cl && *this.saw_te) || *this.two_cl {
                            this.flag.store(true, Ordering::Release);
                        }
                        *this.saw_cl = false;
                        *this.two_cl = false;
                        *this.saw_te = false;
                    }
                    *this.blank_line = true;
                    *this.line_len = 0;
                }
                b'\r' => {}
                _ => {
                    *this.blank_line = false;
                    if *this.line_len == NAME_MAX {
                        *this.at_line_start = false;
                        continue;
                    }
                    this.line[*this.line_len] = b.to_ascii_lowercase();
                    *this.line_len += 1;
                    let l = &this.line[..*this.line_len];
                    if b == b':' {
                        if l == CL {
                            *this.two_cl |= *this.saw_cl;
                            *this.saw_cl = true;
                        } else if l == TE {
                            *this.saw_te = true;
                        }
                        *this.at_line_start = false;
                    } else if !(CL.starts_with(l) || TE.starts_with(l)) {
                        *this.at_line_start = false;
                    }
                }
            }
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for Sniff<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn scan(chunks: &[&[u8]]) -> bool {
        let flag = Arc::new(AtomicBool::new(false));
        let mut b = tokio_test_reader(chunks);
        let mut s = Sniff::new(&mut b, flag.clone());
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        flag.load(Ordering::Acquire)
    }

    /// Yields one chunk per read, so state carried across reads is exercised.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if let Some(mut c) = self.0.pop_front() {
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                if n < c.len() {
                    self.0.push_front(c.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    fn tokio_test_reader(chunks: &[&[u8]]) -> impl AsyncRead + Unpin {
        Chunks(chunks.iter().map(|c| c.to_vec()).collect())
    }

    #[tokio::test]
    async fn finds_the_conflict_wherever_the_reads_split_the_bytes() {
        let smuggle: &[u8] =
            b"GET / HTTP/1.1\r\nUser-Agent: a-long-value-with: colons\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        let clean: &[u8] = b"POST / HTTP/1.1\r\nX-Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\nab\ncd";
        for cut in 1..smuggle.len() {
            assert!(scan(&[&smuggle[..cut], &smuggle[cut..]]).await, "split at {cut}");
        }
        for cut in 1..clean.len() {
            assert!(!scan(&[&clean[..cut], &clean[cut..]]).await, "split at {cut}");
        }
        let bytewise: Vec<&[u8]> = smuggle.chunks(1).collect();
        assert!(scan(&bytewise).await);
    }

    #[tokio::test]
    async fn detects_both_framing_headers_in_one_block() {
        assert!(scan(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]).await);
        assert!(scan(&[b"POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\nCONTENT-length: 4\r\n\r\n"]).await);
        assert!(!scan(&[b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"]).await);
        assert!(!scan(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]).await);
        // Separate requests on one connection are separate blocks.
        assert!(
            !scan(&[
                b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            ])
            .await
        );
        assert!(!scan(&[b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nX-Transfer-Encoding: x\r\n\r\n"]).await);
        assert!(!scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ncontent-length:\ntransfer-encoding:\n\n"]).await);
        // Two Content-Length lines, equal or not (hyper folds equal ones into one).
        assert!(scan(&[b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n{}"]).await);
        assert!(
            !scan(&[b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"])
                .await
        );
    }
}
