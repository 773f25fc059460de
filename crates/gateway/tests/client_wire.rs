//! The client-facing HTTP/1.1 connection over raw sockets, on both engines (`server.http1:
//! native`, the default, and `hyper`): pipelining, request bodies (length, chunked, `Expect:
//! 100-continue`), answers that do not read the body, HTTP/1.0 keep-alive, HEAD, streamed
//! answers, and the refusals a client sees on a broken or stalled head.

mod support;

use bytes::Bytes;
use http::Response;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);
const ENGINES: [&str; 2] = ["native", "hyper"];

/// An upstream that answers `METHOD PATH te=… cl=… body=…` and counts requests.
async fn echo() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let addr = upstream(move |req| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
            let (te, cl) = (h("transfer-encoding"), h("content-length"));
            let line = format!("{} {}", req.method(), req.uri().path());
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let text = format!("{line} te={te} cl={cl} body={}", String::from_utf8_lossy(&body));
            Response::new(full_body(text))
        }
    })
    .await;
    (addr, hits)
}

async fn gateway(engine: &str, up: std::net::SocketAddr) -> TestGateway {
    let yaml = config_yaml(
        &[("up", format!("http://{up}"))],
        "  - { id: r, path: \"/r/{x}\", methods: [GET, HEAD, POST], service: up, public: true }\n  \
           - { id: g, path: \"/get-only\", methods: [GET], service: up, public: true }\n",
    )
    .replace(
        "  shutdown_grace: 5s\n",
        &format!("  shutdown_grace: 5s\n  http1: {engine}\n  limits: {{ header_timeout: 500ms }}\n"),
    );
    TestGateway::start(&yaml, &[]).await
}

/// Writes `bytes`, then reads until the gateway closes.
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("the gateway closes").unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

/// Reads one response with a `content-length` body off `s`.
async fn read_one(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "closed in the head: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length: ")).map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut body)).await.unwrap().unwrap();
    buf.extend_from_slice(&body);
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    for engine in ENGINES {
        let (up, hits) = echo().await;
        let gw = gateway(engine, up).await;
        let text = exchange(
            gw.addr(),
            b"GET /r/1 HTTP/1.1\r\nHost: gw\r\n\r\nGET /r/2 HTTP/1.1\r\nHost: gw\r\n\r\nGET /r/3 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{engine}: {text}");
        let (a, b, c) =
            (text.find("GET /r/1 ").unwrap(), text.find("GET /r/2 ").unwrap(), text.find("GET /r/3 ").unwrap());
        assert!(a < b && b < c, "{engine}: out of order: {text}");
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_reach_the_upstream_reframed() {
    for engine in ENGINES {
        let (up, _) = echo().await;
        let gw = gateway(engine, up).await;
        let text = exchange(
            gw.addr(),
            b"POST /r/1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        .await;
        assert!(text.contains("POST /r/1 te=- cl=5 body=hello"), "{engine}: {text}");
        // Chunked, with an extension and a trailer that do not travel on; then a second
        // request on the same connection proves the body ended exactly where it should.
        let text = exchange(
            gw.addr(),
            b"POST /r/1 HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\nGET /r/2 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(text.contains("te=chunked cl=- body=hello world"), "{engine}: {text}");
        assert!(text.contains("GET /r/2 te=- cl=- body="), "{engine}: {text}");
        assert!(!text.contains("ext=1") && !text.contains("x-trailer"), "{engine}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_written_a_byte_at_a_time_is_read_the_same() {
    for engine in ENGINES {
        let (up, _) = echo().await;
        let gw = gateway(engine, up).await;
        let raw = b"POST /r/1 HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\nGET /r/2 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        for b in raw {
            s.write_all(std::slice::from_ref(b)).await.unwrap();
            s.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("the gateway closes").unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("POST /r/1 te=chunked cl=- body=wikipedia"), "{engine}: {text}");
        assert!(text.contains("GET /r/2 te=- cl=- body="), "{engine}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_gets_100_then_the_answer() {
    for engine in ENGINES {
        let (up, _) = echo().await;
        let gw = gateway(engine, up).await;
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(b"POST /r/1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let mut interim = [0u8; 25];
        tokio::time::timeout(WAIT, s.read_exact(&mut interim)).await.expect("100 Continue").unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n", "{engine}");
        s.write_all(b"hello").await.unwrap();
        let text = read_one(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("body=hello"), "{engine}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_reading_the_body_arrives_whole() {
    for engine in ENGINES {
        let (up, hits) = echo().await;
        let gw = gateway(engine, up).await;
        // 405 before the body is read; the client is still sending 128 KiB.
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let body = vec![b'x'; 128 * 1024];
        s.write_all(
            format!("POST /get-only HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
        )
        .await
        .unwrap();
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&body).await;
            wr
        });
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, rd.read_to_end(&mut buf)).await.expect("answered and closed").unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 405"), "{engine}: {text}");
        assert!(text.contains("method_not_allowed") && text.contains("request_id"), "{engine}: {text}");
        let _ = writer.await;
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_keeps_alive_only_when_asked() {
    for engine in ENGINES {
        let (up, _) = echo().await;
        let gw = gateway(engine, up).await;
        // (hyper answers an HTTP/1.0 request with an HTTP/1.0 status line, the native engine
        // with HTTP/1.1: both are allowed.)
        let ok = |t: &str| t.starts_with("HTTP/1.") && t.get(8..13) == Some(" 200 ");
        let text = exchange(gw.addr(), b"GET /r/1 HTTP/1.0\r\n\r\n").await;
        assert!(ok(&text) && text.ends_with("body="), "{engine}: {text}");
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        for i in 0..2 {
            s.write_all(format!("GET /r/{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes()).await.unwrap();
            let text = read_one(&mut s).await;
            assert!(ok(&text), "{engine}: {text}");
            assert!(text.to_ascii_lowercase().contains("connection: keep-alive"), "{engine}: {text}");
            assert!(text.contains(&format!("GET /r/{i} ")), "{engine}: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_keep_the_length_and_carry_no_body() {
    for engine in ENGINES {
        let (up, _) = echo().await;
        let gw = gateway(engine, up).await;
        let text = exchange(gw.addr(), b"HEAD /r/1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{engine}: {text}");
        assert!(text.ends_with("\r\n\r\n"), "{engine}: a HEAD answer has no body: {text:?}");
        assert!(text.to_ascii_lowercase().contains("content-length: "), "{engine}: {text}");
        // The gateway's own answer to a HEAD: the JSON error's length, no body.
        let text = exchange(gw.addr(), b"HEAD /nowhere HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 404"), "{engine}: {text}");
        assert!(text.ends_with("\r\n\r\n"), "{engine}: a HEAD answer has no body: {text:?}");
        assert!(text.to_ascii_lowercase().contains("content-length: "), "{engine}: {text}");
    }
}

/// Writes `bytes`, reads until the answer holds `first`, calls `then`, reads until the close.
async fn exchange_in_two(addr: std::net::SocketAddr, bytes: &[u8], first: &str, then: impl FnOnce()) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&buf).contains(first) {
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed before {first:?}: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    then();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("the gateway closes").unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answers_are_chunked_for_http11_and_close_delimited_for_http10() {
    // The upstream sends a first part, then the rest once the client has seen the first: the
    // gateway cannot know the length when it writes the head.
    let (release, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let up = upstream(move |_req| {
        let rx = rx.clone();
        async move {
            let (tx, body) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            tokio::spawn(async move {
                tx.send(Ok(Frame::data(Bytes::from_static(b"alpha;")))).await.unwrap();
                rx.lock().await.recv().await;
                for part in ["beta;", "gamma"] {
                    tx.send(Ok(Frame::data(Bytes::from_static(part.as_bytes())))).await.unwrap();
                }
            });
            let stream = futures_util::stream::unfold(body, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
            Response::new(StreamBody::new(stream).boxed())
        }
    })
    .await;
    for engine in ENGINES {
        let gw = gateway(engine, up).await;
        let go = || release.send(()).unwrap();
        let text =
            exchange_in_two(gw.addr(), b"GET /r/1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", "alpha;", go)
                .await;
        assert!(text.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{engine}: {text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let mut decoded = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size line");
            let n = usize::from_str_radix(size, 16).unwrap();
            if n == 0 {
                break;
            }
            decoded.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        assert_eq!(decoded, "alpha;beta;gamma", "{engine}");
        let text = exchange_in_two(gw.addr(), b"GET /r/1 HTTP/1.0\r\n\r\n", "alpha;", go).await;
        assert!(text.get(8..13) == Some(" 200 "), "{engine}: {text}");
        assert!(!text.to_ascii_lowercase().contains("transfer-encoding"), "{engine}: {text}");
        assert!(!text.to_ascii_lowercase().contains("content-length"), "{engine}: {text}");
        assert!(text.ends_with("\r\n\r\nalpha;beta;gamma"), "{engine}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_stalled_heads_get_a_json_error_and_a_close() {
    let (up, hits) = echo().await;
    let gw = gateway("native", up).await;
    for raw in [
        &b"BL\x01AH / HTTP/1.1\r\nHost: gw\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET /r/1 HTTP/1.1\r\nHost: gw\r\nBad Name: v\r\n\r\n",
        b"GET /r/1 HTTP/1.1\r\n\r\n",
        b"GET /r/1 HTTP/1.1\r\nHost: gw\r\nHost: evil\r\n\r\n",
    ] {
        let text = exchange(gw.addr(), raw).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("\"code\":\"bad_request\"") && text.contains("\"request_id\""), "{text}");
        assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
        // Its request id is in the head too, as for every other answer.
        let id = text
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-request-id: ").map(str::to_string))
            .unwrap_or_else(|| panic!("no X-Request-ID: {text}"));
        assert!(text.contains(&format!("\"request_id\":\"{id}\"")), "{text}");
    }
    // Part of a head, then nothing: 408 after header_timeout.
    let text = exchange(gw.addr(), b"GET /r/1 HTTP/1.1\r\nHost: gw\r\n").await;
    assert!(text.starts_with("HTTP/1.1 408") && text.contains("request_timeout"), "{text}");
    // A head over the hard cap: 431 before it is complete.
    let big = format!("GET /r/1 HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n", "a".repeat(3 << 20));
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut rd, mut wr) = s.split();
    let (_, text) = tokio::join!(wr.write_all(big.as_bytes()), async {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, rd.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).to_string()
    });
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // Each refusal is counted like any other request (route `unmatched`).
    let m = String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/metrics").await.body).to_string();
    let count = |status: u16| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("b25_gateway_http_requests_total{") && l.contains("route=\"unmatched\""))
            .filter(|l| l.contains(&format!("status=\"{status}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!((count(400), count(408), count(431)), (5.0, 1.0, 1.0), "{m}");
    // The 408's duration is the time its client was held (header_timeout, 500 ms), not the
    // moment of the refusal: the refusals' durations add up to at least that.
    let held: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("b25_gateway_http_request_duration_seconds_sum{") && l.contains("route=\"unmatched\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(held >= 0.45, "the refusals took {held} s in all: {m}");
}

/// RFC 9112 §3.2 and §6.3 on every engine: an HTTP/1.1 request without Host, with two Hosts, or
/// with two Content-Length lines (equal ones included, which hyper folds into one) is a 400 and
/// never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_length_rules_hold_on_every_engine() {
    for engine in ENGINES {
        let (up, hits) = echo().await;
        let gw = gateway(engine, up).await;
        for raw in [
            &b"GET /r/1 HTTP/1.1\r\n\r\n"[..],
            b"GET /r/1 HTTP/1.1\r\nHost: gw\r\nHost: evil\r\n\r\n",
            b"POST /r/1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        ] {
            let text = exchange(gw.addr(), raw).await;
            assert!(text.starts_with("HTTP/1.1 400"), "{engine}: {}\n{text}", String::from_utf8_lossy(raw));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0, "{engine}: a malformed request reached the upstream");
    }
}

/// An answer to HEAD has no content (RFC 9110 §9.3.2) over HTTP/2 too, the gateway's own
/// JSON errors included: the length they would have had stays in `content-length`, and no
/// DATA frame carries them (a client would see a protocol error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_have_no_content_over_http2() {
    let (up, hits) = echo().await;
    let gw = gateway("native", up).await;
    let mut tx = h2c::<http_body_util::Empty<Bytes>>(gw.addr()).await;
    for (path, status) in [("/nope", 404), ("/get-only", 405), ("/r/x", 200)] {
        let req = http::Request::head(format!("http://gw.test{path}")).body(http_body_util::Empty::new()).unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let length: usize = resp.headers()["content-length"].to_str().unwrap().parse().unwrap();
        assert!(resp.headers().contains_key("x-request-id"), "{path}");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("a clean stream").to_bytes();
        assert!(body.is_empty(), "{path}: content in a HEAD answer: {body:?}");
        if status != 200 {
            assert!(length > 20, "{path}: the JSON error's length is kept: {:?}", parts.headers);
        }
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "only the routed HEAD reached the upstream");
}
