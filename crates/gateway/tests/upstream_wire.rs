//! The upstream leg's HTTP/1.1 client against a hand-written upstream that writes exact bytes:
//! every response framing (length, chunked with trailers, until close, none), interim 1xx
//! answers, heads split across writes, ambiguous framing refused (502, never guessed),
//! and connection reuse only when the previous response ended exactly where it said.

mod support;

use http::Method;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const ROUTE: &str = "  - { id: w, path: \"/w/{case}\", methods: [GET, HEAD, POST], service: up, public: true, timeout: 5s, retry_attempts: 1 }\n";

/// A scripted upstream: answers each request with the raw bytes its path names.
struct Wire {
    url: String,
    /// Connections accepted so far.
    conns: Arc<AtomicUsize>,
    /// A message each time the upstream closed a connection on purpose.
    closed: mpsc::UnboundedReceiver<()>,
    /// Lets the `half` case send the rest of its body.
    rest: Arc<tokio::sync::Notify>,
}

/// Reads one request (head and `content-length` body); `None` at EOF.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .map_or(0, |v| v.parse::<usize>().unwrap());
            while buf.len() < end + 4 + len {
                let mut more = [0u8; 4096];
                let n = s.read(&mut more).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&more[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            buf.drain(..end + 4 + len);
            let target = head.split(' ').nth(1).unwrap_or_default().to_string();
            return Some((target, body));
        }
        let mut more = [0u8; 4096];
        let n = s.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&more[..n]);
    }
}

async fn wire() -> Wire {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let conns = Arc::new(AtomicUsize::new(0));
    let (tx, closed) = mpsc::unbounded_channel();
    let counter = conns.clone();
    let rest = Arc::new(tokio::sync::Notify::new());
    let rest2 = rest.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            let rest = rest2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((target, body)) = read_request(&mut s, &mut buf).await {
                    let case = target.rsplit('/').next().unwrap_or_default().to_string();
                    let out: &[u8] = match case.as_str() {
                        "length" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                        "chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=x\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
                        "extra" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nforged",
                        "until-close" => b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
                        "continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                        "head" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
                        "no-content" => b"HTTP/1.1 204 No Content\r\n\r\n",
                        // A length on a 204 (RFC 9110 §8.6 forbids it): not relayed.
                        "no-content-length" => b"HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
                        "te-and-cl" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                        "two-lengths" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
                        "status-999" => b"HTTP/1.1 999 Whatever\r\ncontent-length: 0\r\n\r\n",
                        "bad-chunk" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                        "te-gzip" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                        "te-gzip-only" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nhello",
                        "switch" => b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
                        "echo" => {
                            let r = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            s.write_all(r.as_bytes()).await.unwrap();
                            continue;
                        }
                        // 2000 bytes declared, 1500 sent with the head, the rest when the
                        // test says so (the client has the head by then).
                        "half" => {
                            let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\n\r\n".to_vec();
                            r.extend(std::iter::repeat_n(b'a', 1500));
                            s.write_all(&r).await.unwrap();
                            rest.notified().await;
                            s.write_all(&[b'b'; 500]).await.unwrap();
                            continue;
                        }
                        "split" => {
                            for part in [&b"HTTP/1.1 20"[..], b"0 OK\r\ncontent-le", b"ngth: 4\r\n\r", b"\nab", b"cd"] {
                                s.write_all(part).await.unwrap();
                                s.flush().await.unwrap();
                                tokio::task::yield_now().await;
                            }
                            continue;
                        }
                        "then-close" => {
                            // A keep-alive answer, then the upstream drops the idle connection.
                            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
                            drop(s);
                            let _ = tx.send(());
                            return;
                        }
                        _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
                    };
                    if s.write_all(out).await.is_err() {
                        return;
                    }
                    if case == "until-close" {
                        return;
                    }
                }
            });
        }
    });
    Wire { url, conns, closed, rest }
}

async fn gateway(w: &Wire) -> TestGateway {
    // One worker: every request uses the same connection pool.
    // No breaker: the broken answers below are many failures in a row, each to be seen as is.
    let yaml = config_yaml(&[("up", w.url.clone())], ROUTE).replace("server:\n", "server:\n  workers: 1\n").replace(
        "health_check: { enabled: false }",
        "health_check: { enabled: false }\n    circuit_breaker: { enabled: false }",
    );
    TestGateway::start(&yaml, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_is_relayed_and_connections_reused_only_when_clean() {
    let mut w = wire().await;
    let gw = gateway(&w).await;
    let conns = || w.conns.load(Ordering::SeqCst);
    let body = |r: &Reply| String::from_utf8_lossy(&r.body).to_string();

    let r = get(gw.addr(), "/w/length").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "hello"));
    let r = get(gw.addr(), "/w/chunked").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "hello world"));
    let r = get(gw.addr(), "/w/split").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "abcd"));
    let r = get(gw.addr(), "/w/continue").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "ok"), "1xx interim answers are skipped");
    let r = send(gw.addr(), Method::HEAD, "/w/head", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let r = get(gw.addr(), "/w/no-content").await;
    assert_eq!(r.status, 204);
    let r = get(gw.addr(), "/w/no-content-length").await;
    assert_eq!(r.status, 204);
    assert!(!r.headers.contains_key("content-length"), "a 204 with a Content-Length: {:?}", r.headers);
    let r = send(gw.addr(), Method::POST, "/w/echo", &[("content-type", "text/plain")], "order-1").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "order-1"));
    assert_eq!(conns(), 1, "clean responses of every framing leave the connection reusable");

    // Bytes past the declared length: the body stops at the length, and the connection is
    // not reused (its leftovers must never be read as the next response).
    let r = get(gw.addr(), "/w/extra").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "ok"));
    let r = get(gw.addr(), "/w/length").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "hello"), "no forged response relayed");
    assert_eq!(conns(), 2);

    // A body delimited by the close: complete, and that connection is gone.
    let r = get(gw.addr(), "/w/until-close").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "until the end"));
    let r = get(gw.addr(), "/w/length").await;
    assert_eq!(r.status, 200);
    assert_eq!(conns(), 3);

    // The upstream closes an idle pooled connection: the next order (a POST, never retried)
    // goes out on a fresh connection instead of failing.
    let r = get(gw.addr(), "/w/then-close").await;
    assert_eq!(r.status, 200);
    w.closed.recv().await.unwrap();
    let r = send(gw.addr(), Method::POST, "/w/echo", &[("content-type", "text/plain")], "order-2").await;
    assert_eq!((r.status.as_u16(), body(&r).as_str()), (200, "order-2"), "a closed idle connection is not used");
    assert_eq!(conns(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_broken_upstream_framing_is_502_not_guessed() {
    let w = wire().await;
    let gw = gateway(&w).await;
    // (A broken chunk size that comes with the head: nothing was written to the client yet,
    // so it gets the 502 too.)
    for case in ["te-and-cl", "two-lengths", "switch", "status-999", "te-gzip", "te-gzip-only", "bad-chunk"] {
        let r = get(gw.addr(), &format!("/w/{case}")).await;
        r.assert_error(502, "bad_upstream_response");
        // The same over HTTP/2, whose response head hyper writes: a 502, not a reset stream.
        let mut tx = h2c::<http_body_util::Empty<bytes::Bytes>>(gw.addr()).await;
        let req = http::Request::get(format!("http://{}/w/{case}", gw.addr())).body(Default::default()).unwrap();
        let resp = tx.send_request(req).await.unwrap_or_else(|e| panic!("{case} over HTTP/2: {e}"));
        let (parts, body) = resp.into_parts();
        let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
        let r = Reply { status: parts.status, headers: parts.headers, body };
        r.assert_error(502, "bad_upstream_response");
    }
    // The gateway is still fine.
    let r = get(gw.addr(), "/w/length").await;
    assert_eq!(r.status, 200);
}

/// Part of a body that came with the upstream's head is part of the length the client is told:
/// the head says 2000 while 1500 bytes are at hand, and the connection carries the next
/// response cleanly (a short length would put the rest of the body where the next response
/// is read: a forged response).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_partly_at_hand_is_announced_whole() {
    let w = wire().await;
    let gw = gateway(&w).await;
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"GET /w/half HTTP/1.1\r\nhost: gw\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut more = [0u8; 4096];
        let n = c.read(&mut more).await.unwrap();
        assert!(n > 0, "closed before the head");
        buf.extend_from_slice(&more[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    assert!(head.contains("content-length: 2000\r\n"), "{head}");
    w.rest.notify_one();
    while buf.len() < head_end + 2000 {
        let mut more = [0u8; 4096];
        let n = c.read(&mut more).await.unwrap();
        assert!(n > 0, "closed before the end of the body");
        buf.extend_from_slice(&more[..n]);
    }
    let body = &buf[head_end..head_end + 2000];
    assert!(body[..1500].iter().all(|&b| b == b'a') && body[1500..].iter().all(|&b| b == b'b'));
    assert_eq!(buf.len(), head_end + 2000, "bytes past the announced length");
    // The same connection answers the next request with its own response.
    c.write_all(b"GET /w/length HTTP/1.1\r\nhost: gw\r\n\r\n").await.unwrap();
    let mut next = Vec::new();
    while !next.ends_with(b"hello") {
        let mut more = [0u8; 4096];
        let n = c.read(&mut more).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&next));
        next.extend_from_slice(&more[..n]);
    }
    assert!(next.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&next));
}

/// An upstream that stops in the middle of its body (1500 of 2000 bytes, then nothing) is cut
/// after `response_idle_timeout`: the client gets the bytes that came, then the end of the
/// connection, instead of waiting for as long as the upstream keeps the socket open. The
/// broken upstream connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_body_that_stalls_is_cut_after_the_idle_timeout() {
    let w = wire().await;
    let yaml = config_yaml(&[("up", w.url.clone())], ROUTE).replace(
        "health_check: { enabled: false }",
        "health_check: { enabled: false }\n    response_idle_timeout: 300ms",
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"GET /w/half HTTP/1.1\r\nhost: gw\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), c.read_to_end(&mut got))
        .await
        .expect("the stalled response was never cut")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = &got[got.windows(4).position(|x| x == b"\r\n\r\n").unwrap() + 4..];
    assert_eq!(body.len(), 1500, "the bytes that came, and no more");
    // The route still works on a fresh upstream connection.
    let r = get(gw.addr(), "/w/length").await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello"[..]));
    assert_eq!(w.conns.load(Ordering::SeqCst), 2, "the cut connection was not reused");
}
