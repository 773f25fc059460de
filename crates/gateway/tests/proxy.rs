//! Proxy behaviour over real sockets: streaming both ways, hop-by-hop headers, forwarding
//! headers, request ids, client disconnects, HTTP/2 (h2c).

mod support;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn one_route(url: String, extra: &str) -> String {
    config_yaml(
        &[("up", url)],
        &format!("  - {{ id: r, path: \"/r/{{x}}\", methods: [GET, POST], service: up, public: true{extra} }}\n"),
    )
}

/// A route to the simulated market-data ticker.
fn sim_route(url: String) -> String {
    config_yaml(
        &[("up", url)],
        "  - { id: t, path: \"/api/v1/market/ticker/{s}\", methods: [GET, POST], service: up, public: true }\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_first_bytes_arrive_before_upstream_finishes() {
    // The upstream sends one chunk, then waits until the test says the client got it.
    let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = std::sync::Arc::new(tokio::sync::Mutex::new(release_rx));
    let up = upstream(move |_req| {
        let release_rx = release_rx.clone();
        async move {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            tokio::spawn(async move {
                tx.send(Ok(Frame::data(Bytes::from_static(b"first-chunk;")))).await.unwrap();
                release_rx.lock().await.recv().await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"rest")))).await.unwrap();
            });
            let body = StreamBody::new(tokio_stream(rx)).boxed();
            Response::new(body)
        }
    })
    .await;
    let gw = TestGateway::start(&one_route(format!("http://{up}"), ""), &[]).await;
    let mut tx = h1(gw.addr()).await;
    let req = Request::get("/r/1").header("host", "gw").body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let resp = tokio::time::timeout(WAIT, tx.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first chunk arrives while the upstream is still sending")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first-chunk;");
    release_tx.send(()).unwrap();
    let rest = tokio::time::timeout(WAIT, body.collect()).await.unwrap().unwrap().to_bytes();
    assert_eq!(rest, "rest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_reaches_upstream_before_client_finishes() {
    // The upstream reports the first body frame it sees; the client only sends the rest after.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Bytes>();
    let up = upstream(move |req: Request<hyper::body::Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut all = Vec::new();
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    let _ = seen_tx.send(d.clone());
                    all.extend_from_slice(&d);
                }
            }
            Response::new(full_body(all))
        }
    })
    .await;
    let gw = TestGateway::start(&one_route(format!("http://{up}"), ""), &[]).await;
    let mut tx = h1(gw.addr()).await;
    let (body_tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let req = Request::post("/r/1").header("host", "gw").body(StreamBody::new(tokio_stream(body_rx))).unwrap();
    let resp = tokio::spawn(async move { tx.send_request(req).await });
    body_tx.send(Ok(Frame::data(Bytes::from_static(b"part-one;")))).await.unwrap();
    let seen = tokio::time::timeout(WAIT, seen_rx.recv())
        .await
        .expect("upstream got the first part while the client is still sending")
        .unwrap();
    assert_eq!(seen, "part-one;");
    body_tx.send(Ok(Frame::data(Bytes::from_static(b"part-two")))).await.unwrap();
    drop(body_tx);
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed, "part-one;part-two");
}

/// An mpsc receiver as a `Stream` (no extra dependency).
fn tokio_stream<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_never_reach_upstream_and_xff_ends_with_peer() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&sim_route(sim.url()), &[]).await;
    // Raw bytes so nothing in a client library rewrites the headers.
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(
        b"GET /api/v1/market/ticker/1?x=1 HTTP/1.1\r\nHost: gw.example\r\nConnection: keep-alive, X-Hop-Secret, close\r\n\
          Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
          Proxy-Connection: keep-alive\r\nX-Hop-Secret: do-not-forward\r\nX-Forwarded-For: 203.0.113.9\r\n\
          X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Port: 8443\r\n\
          X-Forwarded-Prefix: /evil\r\nX-Forwarded-Server: evil\r\nX-End-To-End: kept\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let rec = sim.requests().pop().unwrap();
    for h in ["connection", "keep-alive", "te", "proxy-authorization", "proxy-connection", "x-hop-secret", "upgrade"] {
        assert!(!rec.headers.contains_key(h), "upstream saw {h}: {:?}", rec.headers.get(h));
    }
    assert_eq!(rec.headers["x-end-to-end"], "kept");
    let xff = rec.headers["x-forwarded-for"].to_str().unwrap();
    assert_eq!(xff, "203.0.113.9, 127.0.0.1", "XFF must end with the real peer");
    assert_eq!(rec.headers["x-forwarded-proto"], "http");
    assert_eq!(rec.headers["x-forwarded-host"], "gw.example");
    // The client's word on the other X-Forwarded-* names frameworks build URLs from is dropped.
    for h in ["x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server"] {
        assert!(!rec.headers.contains_key(h), "upstream saw the client's {h}: {:?}", rec.headers.get(h));
    }
    assert_eq!(rec.headers.get_all("x-forwarded-proto").iter().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_from_responses() {
    let up = upstream(|_req| async {
        Response::builder()
            .header("connection", "x-up-private")
            .header("x-up-private", "secret")
            .header("keep-alive", "timeout=99")
            .header("x-up-public", "ok")
            .body(full_body("hi"))
            .unwrap()
    })
    .await;
    let gw = TestGateway::start(&one_route(format!("http://{up}"), ""), &[]).await;
    let r = get(gw.addr(), "/r/1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-up-public"], "ok");
    assert!(!r.headers.contains_key("x-up-private"));
    assert!(!r.headers.contains_key("keep-alive"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_kept_when_sane_and_replaced_otherwise() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&sim_route(sim.url()), &[]).await;
    let r = send(gw.addr(), Method::GET, "/api/v1/market/ticker/1", &[("x-request-id", "client.id-42_ok")], "").await;
    assert_eq!(r.headers["x-request-id"], "client.id-42_ok");
    assert_eq!(sim.requests().pop().unwrap().headers["x-request-id"], "client.id-42_ok");
    let long = "a".repeat(129);
    for bad in ["has space", "semi;colon", "quote\"d", long.as_str()] {
        let r = send(gw.addr(), Method::GET, "/api/v1/market/ticker/1", &[("x-request-id", bad)], "").await;
        let id = r.headers["x-request-id"].to_str().unwrap().to_string();
        assert_ne!(id, bad);
        assert_eq!(id.len(), 36, "a UUID replaces {bad:?}");
        assert_eq!(sim.requests().pop().unwrap().headers["x-request-id"], id.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_request_id_replaces_the_upstreams_on_both_protocols() {
    // HTTP/1.1 responses get the id written into the head by the connection, HTTP/2 ones
    // from the header map: either way exactly one, the gateway's.
    let up = upstream(|_req| async {
        Response::builder().header("x-request-id", "made-upstream").header("x-up", "1").body(full_body("ok")).unwrap()
    })
    .await;
    let gw = TestGateway::start(&one_route(format!("http://{up}"), ""), &[]).await;
    let r = send(gw.addr(), Method::GET, "/r/1", &[("x-request-id", "client-7")], "").await;
    assert_eq!(r.status, 200);
    let ids: Vec<_> = r.headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids, ["client-7"]);
    assert_eq!(r.headers["x-up"], "1");

    let mut tx = h2c(gw.addr()).await;
    let req = Request::get(format!("http://{}/r/2", gw.addr()))
        .header("x-request-id", "client-8")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let ids: Vec<_> = resp.headers().get_all("x-request-id").iter().collect();
    assert_eq!(ids, ["client-8"]);
}

/// An upstream that answers every request on a connection with `answer`, byte for byte.
async fn fixed_upstream(answer: &'static [u8]) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_header_lines_pass_through_without_hop_by_hop_ones_on_both_protocols() {
    // No Connection header: the HTTP/1.1 writer copies the upstream's lines as they came
    // (no header map); HTTP/2 gets them through the map. The same headers either way.
    let up = fixed_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
          Trailer: x-t\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\nX-Multi: a\r\nx-multi: b\r\n\
          Server-Timing: db;dur=5\r\nX-Request-Id: made-upstream\r\nX-Spaced:   v w  \r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let gw = TestGateway::start(&one_route(format!("http://{up}"), ""), &[]).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    for i in 0..2 {
        s.write_all(format!("GET /r/{i} HTTP/1.1\r\nHost: gw\r\nX-Request-Id: client-{i}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut wire = Vec::new();
        let mut chunk = [0u8; 4096];
        while !wire.ends_with(b"\r\n\r\nok") {
            let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&wire));
            wire.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8(wire).unwrap();
        let head = text.strip_suffix("\r\n\r\nok").unwrap();
        let lines: Vec<&str> = head.split("\r\n").skip(1).collect();
        let named = |n: &str| -> Vec<&str> {
            lines
                .iter()
                .filter_map(|l| l.split_once(':'))
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.trim())
                .collect()
        };
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        for hop in ["keep-alive", "te", "trailer", "upgrade", "proxy-authenticate", "transfer-encoding"] {
            assert!(named(hop).is_empty(), "{hop} leaked: {head}");
        }
        assert_eq!(named("x-multi"), ["a", "b"], "{head}");
        assert_eq!(named("content-type"), ["application/json"]);
        assert_eq!(named("x-spaced"), ["v w"]);
        assert_eq!(named("content-length"), ["2"]);
        assert_eq!(named("x-request-id"), [format!("client-{i}").as_str()]);
        let timing = named("server-timing");
        assert!(timing.len() == 1 && timing[0].starts_with("gateway;dur="), "{head}");
        assert_eq!(named("date").len(), 1);
    }

    let mut tx = h2c(gw.addr()).await;
    let req = Request::get(format!("http://{}/r/2", gw.addr())).body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let h = resp.headers();
    for hop in ["keep-alive", "te", "trailer", "upgrade", "proxy-authenticate"] {
        assert!(!h.contains_key(hop), "{hop} leaked over HTTP/2");
    }
    assert_eq!(h.get_all("x-multi").iter().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(h["x-spaced"], "v w");
    let timing: Vec<_> = h.get_all("server-timing").iter().collect();
    assert!(timing.len() == 1 && timing[0].to_str().unwrap().starts_with("gateway;dur="));
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_is_canonicalised_or_refused_before_matching() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&sim_route(sim.url()), &[]).await;
    let r = get(gw.addr(), "/api/v1/%6Darket/ticker/abc").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sim.requests().pop().unwrap().uri.path(),
        "/api/v1/market/ticker/abc",
        "what is matched is what is forwarded"
    );
    for bad in [
        "/api/v1/market/../market/ticker/1",
        "/api/v1//market/ticker/1",
        "/api/v1/market/ticker/%2e%2e",
        "/api/v1/market/ticker/a%2fb",
        "/api/v1/market/ticker/a;x",
        "/api/v1/market/ticker/a%5cb",
    ] {
        get(gw.addr(), bad).await.assert_error(400, "bad_request");
    }
    assert_eq!(sim.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_strip_and_add_rewrite_the_upstream_path() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let routes = "  - { id: a, path: \"/ext/market/ticker/{s}\", methods: [GET], service: up, public: true, strip_prefix: /ext, add_prefix: /api/v1 }\n";
    let gw = TestGateway::start(&config_yaml(&[("up", sim.url())], routes), &[]).await;
    let r = get(gw.addr(), "/ext/market/ticker/BTC?d=1").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let rec = sim.requests().pop().unwrap();
    assert_eq!(rec.uri.path(), "/api/v1/market/ticker/BTC");
    assert_eq!(rec.uri.query(), Some("d=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_request() {
    // The upstream handler holds a guard; when the gateway drops the upstream connection, hyper
    // drops the handler future and the guard reports it.
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<()>();
    let (dropped_tx, dropped_rx) = std::sync::mpsc::channel::<()>();
    let dropped_rx = std::sync::Arc::new(std::sync::Mutex::new(Some(dropped_rx)));
    struct Guard(std::sync::mpsc::Sender<()>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let up = upstream(move |_req| {
        let started_tx = started_tx.clone();
        let dropped_tx = dropped_tx.clone();
        async move {
            let _g = Guard(dropped_tx);
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
            Response::new(full_body(""))
        }
    })
    .await;
    let gw = TestGateway::start(&one_route(format!("http://{up}"), ", timeout: 60s"), &[]).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET /r/1 HTTP/1.1\r\nHost: gw\r\n\r\n").await.unwrap();
    tokio::time::timeout(WAIT, started_rx.recv()).await.unwrap().unwrap();
    drop(s);
    let rx = dropped_rx.lock().unwrap().take().unwrap();
    let got = tokio::task::spawn_blocking(move || rx.recv_timeout(WAIT)).await.unwrap();
    assert!(got.is_ok(), "the upstream request was not cancelled when the client left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_h2c() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&sim_route(sim.url()), &[]).await;
    let mut tx = h2c(gw.addr()).await;
    let req = Request::post(format!("http://{}/api/v1/market/ticker/7?a=b", gw.addr()))
        .body(http_body_util::Full::new(Bytes::from_static(b"h2-body")))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    // The simulated ticker answers GET only; the POST still proves the h2 request crossed.
    assert_eq!(resp.headers()["x-sim-service"], "market-data");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert!(resp.headers().contains_key("x-request-id"));
    let rec = sim.requests().pop().unwrap();
    assert_eq!(rec.uri.path(), "/api/v1/market/ticker/7");
    assert_eq!(rec.uri.query(), Some("a=b"));
    assert_eq!(rec.body, "h2-body");
    assert_eq!(rec.headers["x-forwarded-host"], gw.addr().to_string().as_str());
}

/// The host the client addressed is the target's authority when there is one: HTTP/2's
/// `:authority` (a different `Host` beside it, or user information in it, is a malformed
/// request) and an HTTP/1.1 absolute-form target (its `Host` is ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_targets_authority_is_the_forwarded_host() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&sim_route(sim.url()), &[]).await;
    let mut tx = h2c(gw.addr()).await;
    let h2 = |authority: &str, host: Option<&str>| {
        let mut r = Request::get(format!("http://{authority}/api/v1/market/ticker/A"));
        if let Some(h) = host {
            r = r.header("host", h);
        }
        r.body(http_body_util::Empty::<Bytes>::new()).unwrap()
    };
    let ok = tx.send_request(h2("gw.example", Some("GW.example"))).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(sim.requests().pop().unwrap().headers["x-forwarded-host"], "gw.example");
    for (authority, host) in [("gw.example", Some("other.example")), ("user@gw.example", None)] {
        let r = tx.send_request(h2(authority, host)).await.unwrap();
        assert_eq!(r.status(), 400, "{authority} with Host {host:?}");
    }
    assert_eq!(sim.requests().len(), 1, "a malformed authority reached the upstream");
    // HTTP/1.1, absolute form: the target's authority, not Host.
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET http://gw.example:8443/api/v1/market/ticker/B HTTP/1.1\r\nHost: other.example\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    assert_eq!(sim.requests().pop().unwrap().headers["x-forwarded-host"], "gw.example:8443");
    s.write_all(b"GET http://user@gw.example/api/v1/market/ticker/B HTTP/1.1\r\nHost: gw.example\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 400"), "{}", String::from_utf8_lossy(&buf[..n]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_reach_the_upstream_as_one_cookie_line() {
    // RFC 9113 §8.2.3: several `cookie` fields are joined with "; " before an HTTP/1.1 hop.
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&sim_route(sim.url()), &[]).await;
    let mut tx = h2c(gw.addr()).await;
    let req = Request::get(format!("http://{}/api/v1/market/ticker/7", gw.addr()))
        .header("cookie", "a=1")
        .header("x-other", "x")
        .header("cookie", "session=S; b=2")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let rec = sim.requests().pop().unwrap();
    let cookies: Vec<_> = rec.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; session=S; b=2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_after_header_timeout() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let yaml = sim_route(sim.url())
        .replace("  shutdown_grace: 5s\n", "  shutdown_grace: 5s\n  limits: { header_timeout: 300ms }\n");
    let gw = TestGateway::start(&yaml, &[]).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET /api/v1/market/ticker/A HTTP/1.1\r\nHost: gw\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Keep-alive: the connection stays open, then the gateway closes it when no new request
    // head arrives within header_timeout. Reading returns EOF (0) — never hangs.
    let mut total = 0;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection was never closed");
}

/// An upstream that counts the TCP connections it accepted and signals each one that the
/// gateway closes; it answers every request 200 with the `Host` it received.
struct CountingUpstream {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: tokio::sync::watch::Receiver<usize>,
}

async fn counting_upstream() -> CountingUpstream {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (closed_tx, closed) = tokio::sync::watch::channel(0usize);
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let host = req.headers().get("host").cloned();
                    let mut r = Response::new(full_body("ok"));
                    if let Some(h) = host {
                        r.headers_mut().insert("x-seen-host", h);
                    }
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                closed_tx.send_modify(|n| *n += 1);
            });
        }
    });
    CountingUpstream { addr, accepted, closed }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_reused() {
    use std::sync::atomic::Ordering;
    let up = counting_upstream().await;
    let yaml = one_route(format!("http://{}", up.addr), "")
        .replace("  shutdown_grace: 5s\n", "  shutdown_grace: 5s\n  workers: 2\n");
    let gw = TestGateway::start(&yaml, &[]).await;
    // Sequential requests, each on a new client connection (spread over both workers).
    for _ in 0..100 {
        let r = get(gw.addr(), "/r/1").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-seen-host"], up.addr.to_string().as_str(), "Host is the instance's host:port");
    }
    let opened = up.accepted.load(Ordering::SeqCst);
    assert!((1..=2).contains(&opened), "100 sequential requests used {opened} upstream connections");
    // Concurrent requests need more connections, then reuse them.
    let burst = || futures_util::future::join_all((0..16).map(|_| get(gw.addr(), "/r/1")));
    for r in burst().await {
        assert_eq!(r.status, 200);
    }
    let after_first = up.accepted.load(Ordering::SeqCst);
    assert!(after_first <= 16 + 2, "{after_first}");
    for _ in 0..5 {
        for r in burst().await {
            assert_eq!(r.status, 200);
        }
    }
    // At most 16 requests are ever in flight, so with reuse the pools never need more than 16
    // connections (plus the sequential phase's): 96 burst requests must not open ~96. (How
    // many the first burst needed depends on how concurrent it happened to be.)
    let after = up.accepted.load(Ordering::SeqCst);
    assert!(after <= 16 + 2, "bursts reuse the pooled connections: {after_first} after the first, {after} after six");
    // The gateway counts what it opened.
    let m = String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/metrics").await.body).to_string();
    let line =
        m.lines().find(|l| l.starts_with("b25_gateway_upstream_connections_opened_total{service=\"up\"}")).unwrap();
    assert_eq!(line.rsplit(' ').next().unwrap().parse::<usize>().unwrap(), after, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_closed_after_the_pool_idle_timeout() {
    let mut up = counting_upstream().await;
    let yaml = one_route(format!("http://{}", up.addr), "").replace(
        "health_check: { enabled: false }\n",
        "health_check: { enabled: false }\n    pool_idle_timeout: 300ms\n",
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    assert_eq!(get(gw.addr(), "/r/1").await.status, 200);
    // With no further traffic, the gateway closes the pooled connection on its own.
    tokio::time::timeout(WAIT, up.closed.wait_for(|n| *n >= 1)).await.expect("idle connection closed").unwrap();
    // And the next request opens a new one and succeeds.
    assert_eq!(get(gw.addr(), "/r/1").await.status, 200);
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Raw HTTP/2 frames, for requests no well-behaved client library will send.
mod raw_h2 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// HPACK literals without indexing, new names, no Huffman (every string < 127 bytes).
    pub fn headers(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in fields {
            out.push(0);
            out.push(n.len() as u8);
            out.extend(n.as_bytes());
            out.push(v.len() as u8);
            out.extend(v.as_bytes());
        }
        out
    }

    /// A connection past the preface and the settings exchange.
    pub async fn connect(addr: std::net::SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        s
    }

    /// The next frame that concerns `stream` (or the connection's end: GOAWAY), answering
    /// the server's SETTINGS on the way.
    pub async fn next_for(s: &mut TcpStream, stream: u32) -> u8 {
        loop {
            let mut head = [0u8; 9];
            if s.read_exact(&mut head).await.is_err() {
                return GOAWAY;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            s.read_exact(&mut payload).await.unwrap();
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if kind == SETTINGS && flags & 1 == 0 {
                s.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
            } else if kind == GOAWAY || (id == stream && matches!(kind, HEADERS | RST_STREAM)) {
                return kind;
            }
        }
    }
}

/// RFC 9113 §8.1.1: a request whose `content-length` differs from its DATA is malformed and
/// must not be forwarded. h2 finds the difference only when the extra byte comes (or the
/// stream ends early), after the declared bytes were read: the upstream must not have
/// received a complete request by then (it would act on it, an order placed for a client that
/// was told its stream failed). Well-formed streams that end late still go through whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_content_length_mismatch_never_reaches_the_upstream_as_a_complete_request() {
    use raw_h2::*;
    // Each request at the upstream, by path: its head seen, then its body read whole (Ok) or
    // cut (Err).
    let (head_tx, mut head_rx) = mpsc::unbounded_channel::<String>();
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Result<Bytes, ()>)>();
    let up = upstream(move |req: Request<hyper::body::Incoming>| {
        let (tx, head_tx) = (tx.clone(), head_tx.clone());
        async move {
            let path = req.uri().path().to_string();
            let _ = head_tx.send(path.clone());
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).map_err(|_| ());
            let _ = tx.send((path, body));
            Response::new(full_body("ok"))
        }
    })
    .await;
    let routes = "  - { id: r, path: \"/r/{x}\", methods: [POST, DELETE], service: up, public: true }\n";
    let gw = TestGateway::start(&config_yaml(&[("up", format!("http://{up}"))], routes), &[]).await;
    let data = |frames: &[(&[u8], bool)]| {
        frames.iter().flat_map(|(b, end)| frame(DATA, if *end { END_STREAM } else { 0 }, 1, b)).collect::<Vec<u8>>()
    };
    // (method, declared length, DATA sent first, DATA sent once the upstream has the head)
    type Frames<'a> = &'a [(&'a [u8], bool)];
    let cases: [(&str, &str, Frames, Frames, bool); 5] = [
        ("POST", "5", &[(b"hello", false)], &[(b"X", true)], true),
        ("DELETE", "0", &[], &[(b"abc", true)], true),
        ("POST", "5", &[(b"hel", false)], &[(b"", true)], true),
        ("POST", "5", &[(b"hel", false)], &[(b"lo", false), (b"", true)], false),
        ("DELETE", "0", &[], &[(b"", true)], false),
    ];
    for (i, (method, cl, first, rest, malformed)) in cases.into_iter().enumerate() {
        let path = format!("/r/case{i}");
        let case = format!("{method} content-length {cl}, DATA {first:?} then {rest:?}");
        let mut s = connect(gw.addr()).await;
        let fields =
            [(":method", method), (":scheme", "http"), (":path", &path), (":authority", "gw"), ("content-length", cl)];
        let mut out = frame(HEADERS, END_HEADERS, 1, &headers(&fields));
        out.extend(data(first));
        s.write_all(&out).await.unwrap();
        // The gateway streams: the upstream has the head (and what it may have of the body)
        // before the client's stream is over.
        let at_upstream = tokio::time::timeout(WAIT, head_rx.recv()).await.expect("head forwarded").unwrap();
        assert_eq!(at_upstream, path);
        s.write_all(&data(rest)).await.unwrap();
        let answer = tokio::time::timeout(WAIT, next_for(&mut s, 1)).await.expect("an answer");
        let (p, outcome) = tokio::time::timeout(WAIT, rx.recv()).await.expect("the upstream's outcome").unwrap();
        assert_eq!(p, path);
        if malformed {
            assert!(matches!(answer, RST_STREAM | GOAWAY), "{case}: answered {answer}");
            assert!(outcome.is_err(), "{case}: the upstream got a complete request: {outcome:?}");
        } else {
            assert_eq!(answer, HEADERS, "{case}");
            let want: &[u8] = if cl == "5" { b"hello" } else { b"" };
            assert_eq!(outcome.as_deref(), Ok(want), "{case}");
        }
    }
}

/// RFC 9113 §8.2.1: a field value with leading or trailing whitespace makes an HTTP/2 request
/// malformed: 400, nothing forwarded. (HTTP/1.1 parsing trims it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_values_with_surrounding_whitespace_are_refused() {
    use raw_h2::*;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let up = upstream(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(req.uri().path().to_string());
            Response::new(full_body("ok"))
        }
    })
    .await;
    let gw = TestGateway::start(&one_route(format!("http://{up}"), ""), &[]).await;
    for (i, value) in [" leading", "trailing ", "\tleading-tab", "fine"].into_iter().enumerate() {
        let path = format!("/r/v{i}");
        let mut s = connect(gw.addr()).await;
        let fields = [(":method", "GET"), (":scheme", "http"), (":path", &path), (":authority", "gw"), ("x-a", value)];
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &headers(&fields))).await.unwrap();
        let answer = tokio::time::timeout(WAIT, next_for(&mut s, 1)).await.expect("an answer");
        assert!(matches!(answer, HEADERS | RST_STREAM), "{value:?}: {answer}");
    }
    // Only the well-formed one reached the upstream (and it is the last one sent).
    assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap(), "/r/v3");
    assert!(rx.try_recv().is_err());
}

/// An HTTP/2 upload of unknown length streams through whole: what the client sent reaches the
/// upstream before the client ends its stream (nothing held back waiting for the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upload_of_unknown_length_is_not_held_back() {
    use raw_h2::*;
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let up = upstream(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let mut body = req.into_body();
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    let _ = tx.send(d);
                }
            }
            Response::new(full_body("ok"))
        }
    })
    .await;
    let gw = TestGateway::start(&one_route(format!("http://{up}"), ""), &[]).await;
    let mut s = connect(gw.addr()).await;
    let fields = [(":method", "POST"), (":scheme", "http"), (":path", "/r/stream"), (":authority", "gw")];
    let mut out = frame(HEADERS, END_HEADERS, 1, &headers(&fields));
    out.extend(frame(DATA, 0, 1, b"abc"));
    s.write_all(&out).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let d =
            tokio::time::timeout(WAIT, rx.recv()).await.expect("the bytes sent so far reached the upstream").unwrap();
        got.extend_from_slice(&d);
    }
    assert_eq!(got, b"abc");
    s.write_all(&frame(DATA, END_STREAM, 1, b"")).await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, next_for(&mut s, 1)).await.unwrap(), HEADERS);
}

/// A route's `request_headers` and `response_headers`: set (replacing the client's or the
/// upstream's values) and remove, on HTTP/1.1 and HTTP/2; the response edits are kept with a
/// cached response (a hit carries them); request values, which may be upstream credentials
/// from `${…}`, are not shown by /admin/config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_set_and_remove_request_and_response_headers() {
    let (tx, mut seen) = mpsc::unbounded_channel::<http::HeaderMap>();
    let up = upstream(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            tx.send(req.headers().clone()).unwrap();
            Response::builder()
                .header("server", "upstream/1.0")
                .header("cache-control", "public, max-age=60")
                .header("x-kept", "yes")
                .body(full_body("{}"))
                .unwrap()
        }
    })
    .await;
    let edits = ", request_headers: { set: { X-Upstream-Token: \"${UP_TOKEN}\", x-api-version: \"2\" }, remove: [authorization, x-debug] }, \
                 response_headers: { set: { Cache-Control: no-store }, remove: [server] }";
    let yaml = one_route(format!("http://{up}"), edits).replace(
        "routes:\n",
        "routes:\n  - { id: c, path: \"/c\", methods: [GET], service: up, public: true, cache: { ttl: 30s }, response_headers: { set: { cache-control: no-store }, remove: [server, x-kept] } }\n",
    );
    let gw = TestGateway::start(&yaml, &[("UP_TOKEN", "s3cret-upstream-token".to_string())]).await;
    let client =
        [("authorization", "Bearer client-token"), ("x-debug", "1"), ("x-api-version", "1"), ("x-other", "kept")];
    let r = send(gw.addr(), Method::GET, "/r/1", &client, "").await;
    let h2 = {
        let mut tx = h2c::<http_body_util::Empty<Bytes>>(gw.addr()).await;
        let mut req = Request::get("http://gw.test/r/2");
        for (k, v) in client {
            req = req.header(k, v);
        }
        tx.send_request(req.body(http_body_util::Empty::new()).unwrap()).await.unwrap()
    };
    for (headers, status) in [(&r.headers, r.status), (h2.headers(), h2.status())] {
        assert_eq!(status, 200);
        assert_eq!(headers["cache-control"], "no-store", "set replaces the upstream's value");
        assert_eq!(headers.get_all("cache-control").iter().count(), 1);
        assert!(!headers.contains_key("server"), "removed: {headers:?}");
        assert_eq!(headers["x-kept"], "yes");
        let up = seen.recv().await.unwrap();
        assert_eq!(up["x-upstream-token"], "s3cret-upstream-token");
        assert_eq!(up.get_all("x-api-version").iter().collect::<Vec<_>>(), ["2"], "set replaces the client's value");
        assert!(!up.contains_key("authorization") && !up.contains_key("x-debug"), "removed: {up:?}");
        assert_eq!(up["x-other"], "kept");
    }
    // A cached response: the miss and the hit carry the edits, and an edit telling browsers
    // `no-store` does not turn the gateway's cache off (the upstream said it may be kept).
    for expect in ["MISS", "HIT"] {
        let r = get(gw.addr(), "/c").await;
        assert_eq!(r.headers["x-cache"], expect);
        assert_eq!(r.headers["cache-control"], "no-store");
        assert!(!r.headers.contains_key("server") && !r.headers.contains_key("x-kept"), "{expect}: {:?}", r.headers);
    }
    let config = String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/admin/config").await.body).to_string();
    assert!(!config.contains("s3cret-upstream-token"), "{config}");
    assert!(config.contains("<redacted>"), "{config}");
}

/// A cache hit evaluates the request's preconditions (RFC 9110 §13.2.2, RFC 9111 §4.3.2) as
/// the origin would: the answer does not depend on whether the entry was there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_evaluate_preconditions() {
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let up = upstream(move |req: Request<hyper::body::Incoming>| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // `/n`: a response with no validators at all.
        let plain = req.uri().path() == "/n";
        async move {
            let b = Response::builder().header("cache-control", "max-age=60");
            let b = if plain {
                b
            } else {
                b.header("etag", "\"v1\"").header("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT")
            };
            b.body(full_body("{\"price\":1}")).unwrap()
        }
    })
    .await;
    let yaml = config_yaml(
        &[("up", format!("http://{up}"))],
        "  - { id: c, path: \"/c\", methods: [GET, HEAD], service: up, public: true, cache: { ttl: 30s } }\n  \
           - { id: plain, path: \"/n\", methods: [GET], service: up, public: true, cache: { ttl: 30s } }\n",
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    assert_eq!(get(gw.addr(), "/c").await.headers["x-cache"], "MISS");
    // Without a modification date, If-Unmodified-Since is ignored (RFC 9110 §13.1.4), and
    // without an ETag, If-None-Match never matches: the stored 200 either way.
    assert_eq!(get(gw.addr(), "/n").await.headers["x-cache"], "MISS");
    for (name, value) in [("if-unmodified-since", "Mon, 14 Nov 1994 12:45:26 GMT"), ("if-none-match", "\"v1\"")] {
        let r = send(gw.addr(), Method::GET, "/n", &[(name, value)], "").await;
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.headers["x-cache"], "HIT", "{name}");
    }
    let cases: [(&str, &str, u16); 11] = [
        ("if-none-match", "\"v1\"", 304),
        ("if-none-match", "W/\"v1\"", 304),
        ("if-none-match", "\"v0\", \"v1\"", 304),
        ("if-none-match", "*", 304),
        ("if-none-match", "\"v2\"", 200),
        ("if-match", "\"v1\"", 200),
        ("if-match", "\"other\"", 412),
        ("if-match", "W/\"v1\"", 412),
        ("if-modified-since", "Tue, 15 Nov 1994 12:45:26 GMT", 304),
        ("if-modified-since", "Mon, 14 Nov 1994 12:45:26 GMT", 200),
        ("if-unmodified-since", "Mon, 14 Nov 1994 12:45:26 GMT", 412),
    ];
    for (name, value, status) in cases {
        let r = send(gw.addr(), Method::GET, "/c", &[(name, value)], "").await;
        match status {
            304 => {
                assert_eq!(r.status, 304, "{name}: {value}");
                assert!(r.body.is_empty(), "{name}: {value}");
                assert_eq!(r.headers["etag"], "\"v1\"");
                assert_eq!(r.headers["x-cache"], "HIT");
            }
            412 => r.assert_error(412, "precondition_failed"),
            _ => {
                assert_eq!(r.status, 200, "{name}: {value}");
                assert_eq!(&r.body[..], b"{\"price\":1}");
            }
        }
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2, "every answer came from the cache");
}
