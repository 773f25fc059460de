//! WebSocket and streaming over real sockets with tokio-tungstenite clients.

mod support;

use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const WAIT: Duration = Duration::from_secs(10);

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).await.unwrap();
    tokio_tungstenite::client_async(req, stream).await.map(|(ws, _)| ws)
}

fn status_of(e: &tokio_tungstenite::tungstenite::Error) -> u16 {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => r.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

async fn shipped() -> (HashMap<&'static str, b25_sim::SimServer>, TestGateway) {
    let sims = start_sims().await;
    let env = shipped_env(&sims);
    let gw = TestGateway::start(&shipped_yaml(), &env).await;
    (sims, gw)
}

/// Next non-ticker message.
async fn next_echo(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.expect("a message").expect("open").expect("valid");
        if let Message::Text(t) = &m
            && t.contains("\"type\":\"ticker\"")
        {
            continue;
        }
        return m;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_stream_and_1000_echoes_in_order() {
    let (sims, gw) = shipped().await;
    let auth = bearer(&token(&["viewer"]));
    let mut ws = connect(gw.addr(), "/ws", &[("authorization", &auth)]).await.expect("upgrade");
    // The simulator's ticker stream arrives through the gateway.
    let first = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("ticker"), "{first:?}");
    for i in 0..1000 {
        ws.send(Message::text(format!("m-{i}"))).await.unwrap();
    }
    for i in 0..1000 {
        assert_eq!(next_echo(&mut ws).await.to_text().unwrap(), format!("m-{i}"));
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(next_echo(&mut ws).await.into_data().as_ref(), &[1, 2, 3]);
    // The upstream saw the principal, not the client's credentials in the query.
    let rec = sims["dashboard"].requests().into_iter().find(|r| r.uri.path() == "/ws").unwrap();
    assert_eq!(rec.headers["x-auth-subject"], "user-viewer");
    // Browser tokens: query parameter and subprotocol; neither reaches the upstream.
    let t = token(&["viewer"]);
    let mut ws2 = connect(gw.addr(), &format!("/ws?access_token={t}&x=1"), &[]).await.expect("query token");
    ws2.send(Message::text("q")).await.unwrap();
    assert_eq!(next_echo(&mut ws2).await.to_text().unwrap(), "q");
    let proto = format!("bearer.{t}, b25.v1");
    let mut ws3 = connect(gw.addr(), "/api/v1/market/stream", &[("sec-websocket-protocol", &proto)]).await;
    // The upstream does not pick a protocol, so a strict client may refuse; what matters is the
    // gateway accepted the token and never forwarded it.
    if let Ok(ws3) = ws3.as_mut() {
        let _ = ws3.close(None).await;
    }
    for r in sims["dashboard"].requests() {
        assert!(!r.uri.query().unwrap_or("").contains("access_token"), "query token forwarded: {:?}", r.uri);
        let p = r.headers.get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        assert!(!p.contains("bearer."), "subprotocol token forwarded: {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_never_reach_the_upstream() {
    let (sims, gw) = shipped().await;
    assert_eq!(status_of(&connect(gw.addr(), "/ws", &[]).await.unwrap_err()), 401);
    assert_eq!(status_of(&connect(gw.addr(), "/ws", &[("authorization", "Bearer nope")]).await.unwrap_err()), 401);
    let auth = bearer(&token(&["viewer"]));
    let evil = connect(gw.addr(), "/ws", &[("authorization", &auth), ("origin", "https://evil.example")]).await;
    assert_eq!(status_of(&evil.unwrap_err()), 403);
    let ok_origin = connect(gw.addr(), "/ws", &[("authorization", &auth), ("origin", TEST_ORIGIN)]).await;
    assert!(ok_origin.is_ok(), "the dashboard origin is allowed");
    assert_eq!(sims["dashboard"].hits(), 1, "only the allowed upgrade reached the upstream");
    // Wrong role.
    let sim = b25_sim::start(b25_sim::Service::Dashboard, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:0\", admin_listen: \"\" }}\nlogging: {{ level: warn }}\nauth:\n  jwt:\n    issuers:\n      - {{ issuer: b25-auth, audiences: [b25-gateway], algorithms: [HS256], secret: \"{TEST_SECRET}\" }}\nservices:\n  d: {{ instances: [\"{}\"], health_check: {{ enabled: false }} }}\nroutes:\n  - {{ id: ws, path: /ws, methods: [GET], service: d, roles: [admin], websocket: true }}\n",
        sim.url()
    );
    let gw2 = TestGateway::start(&yaml, &[]).await;
    assert_eq!(status_of(&connect(gw2.addr(), "/ws", &[("authorization", &auth)]).await.unwrap_err()), 403);
    assert_eq!(sim.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closes_when_the_token_expires() {
    let (_sims, gw) = shipped().await;
    let t = hs256(TEST_SECRET, &claims("short-lived", &["viewer"], serde_json::json!({"exp": now() + 2})));
    let mut ws = connect(gw.addr(), "/ws", &[("authorization", &bearer(&t))]).await.expect("upgrade");
    let t0 = Instant::now();
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let took = t0.elapsed();
    assert_eq!(close.unwrap().code, CloseCode::Policy, "1008 on token expiry");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "closed after {took:?}");
}

/// A raw upstream that answers every upgrade with `answer` and counts request heads.
async fn raw_upstream(answer: &'static str) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(p) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        seen.drain(..p + 4);
                        let _ = s.write_all(answer.as_bytes()).await;
                    }
                }
            });
        }
    });
    (addr, heads)
}

fn one_ws_route(url: &str) -> String {
    format!(
        "server: {{ listen: \"127.0.0.1:0\", admin_listen: \"\" }}\nlogging: {{ level: warn }}\nauth:\n  jwt:\n    issuers:\n      - {{ issuer: b25-auth, audiences: [b25-gateway], algorithms: [HS256], secret: \"{TEST_SECRET}\" }}\nservices:\n  d: {{ instances: [\"{url}\"], health_check: {{ enabled: false }} }}\nroutes:\n  - {{ id: ws, path: /ws, methods: [GET], service: d, roles: [viewer], websocket: true }}\n  - {{ id: secret, path: /secret, methods: [GET], service: d, roles: [admin] }}\n"
    )
}

/// A WebSocket upstream on 127.0.0.1:0 that echoes text and binary messages, starts the
/// closing handshake itself on the text `close please`, and reports on the channel what it
/// read: `close <code>` for each Close, `end` when the connection ended cleanly after that,
/// `error …` otherwise.
async fn ws_upstream() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.as_str() == "close please" => {
                            let f = CloseFrame { code: CloseCode::Normal, reason: "done".into() };
                            let _ = ws.send(Message::Close(Some(f))).await;
                        }
                        // A Close with a code no endpoint may send (RFC 6455 §7.4).
                        Some(Ok(Message::Text(t))) if t.as_str() == "bad close please" => {
                            let f = CloseFrame { code: CloseCode::from(5000), reason: "".into() };
                            let _ = ws.send(Message::Close(Some(f))).await;
                        }
                        Some(Ok(Message::Close(f))) => {
                            let _ = tx.send(format!("close {:?}", f.map(|f| u16::from(f.code))));
                        }
                        Some(Ok(m)) if m.is_text() || m.is_binary() => {
                            let _ = ws.send(m).await;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            let _ = tx.send(format!("error {e}"));
                            return;
                        }
                        None => {
                            let _ = tx.send("end".into());
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// The closing handshake is completed on both legs whichever side starts it (RFC 6455 §5.5.1):
/// the side that sent a Close gets one back, not a dropped connection; and a ping is answered
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_either_side_is_answered_and_a_ping_once() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    async fn next(ws: &mut Ws) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
        tokio::time::timeout(WAIT, ws.next()).await.expect("in time")
    }
    let (addr, mut saw) = ws_upstream().await;
    let gw = TestGateway::start(&one_ws_route(&format!("http://{addr}")), &[]).await;
    let auth = bearer(&token(&["viewer"]));

    // A ping: one pong, then the echo.
    let mut ws = connect(gw.addr(), "/ws", &[("authorization", &auth)]).await.expect("upgrade");
    ws.send(Message::Ping(vec![7u8].into())).await.unwrap();
    ws.send(Message::text("after the ping")).await.unwrap();
    let mut pongs = 0;
    loop {
        match next(&mut ws).await.unwrap().unwrap() {
            Message::Pong(_) => pongs += 1,
            Message::Text(t) => {
                assert_eq!(t.as_str(), "after the ping");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pongs, 1, "a ping answered {pongs} times");

    // The client closes: it gets a Close back, and the upstream saw the client's Close.
    ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() }))).await.unwrap();
    match next(&mut ws).await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("the client's Close was not answered: {other:?}"),
    }
    assert_eq!(saw.recv().await.unwrap(), "close Some(1000)");
    assert_eq!(saw.recv().await.unwrap(), "end");

    // The upstream closes: the client gets its Close, and the upstream gets the client's reply.
    let mut ws = connect(gw.addr(), "/ws", &[("authorization", &auth)]).await.expect("upgrade");
    ws.send(Message::text("close please")).await.unwrap();
    match next(&mut ws).await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.reason.as_str(), "done"),
        other => panic!("the upstream's Close was not relayed: {other:?}"),
    }
    // Reading on sends the client's reply (tungstenite queued it) and sees the end.
    while let Some(Ok(_)) = next(&mut ws).await {}
    assert_eq!(saw.recv().await.unwrap(), "close Some(1000)", "the upstream's Close got no reply");
    assert_eq!(saw.recv().await.unwrap(), "end");
}

/// A Close with an invalid code is the sender's protocol violation: the sender gets 1002 (from
/// its own leg), and the other side is not told it violated anything: the upstream gets a
/// Close without a code, the client 1011 `upstream gone` (as for every upstream violation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_close_code_is_not_blamed_on_the_other_side() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let (addr, mut saw) = ws_upstream().await;
    let gw = TestGateway::start(&one_ws_route(&format!("http://{addr}")), &[]).await;
    let auth = bearer(&token(&["viewer"]));
    for code in [0u16, 1005, 1006, 5000] {
        let mut ws = connect(gw.addr(), "/ws", &[("authorization", &auth)]).await.expect("upgrade");
        ws.send(Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: "".into() }))).await.unwrap();
        match tokio::time::timeout(WAIT, ws.next()).await.expect("in time") {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Protocol, "{code}"),
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(saw.recv().await.unwrap(), "close None", "{code}: the upstream was blamed");
        while let Some(m) = saw.recv().await {
            if m == "end" || m.starts_with("error") {
                break;
            }
        }
    }
    let mut ws = connect(gw.addr(), "/ws", &[("authorization", &auth)]).await.expect("upgrade");
    ws.send(Message::text("bad close please")).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.expect("in time") {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Error, "the client was blamed"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_does_not_switch_or_answers_badly_is_502() {
    let auth = bearer(&token(&["viewer"]));
    for answer in [
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n",
    ] {
        let (addr, _) = raw_upstream(answer).await;
        let gw = TestGateway::start(&one_ws_route(&format!("http://{addr}")), &[]).await;
        let err = connect(gw.addr(), "/ws", &[("authorization", &auth)]).await.unwrap_err();
        assert_eq!(status_of(&err), 502, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_is_passed_on_and_nothing_pipelined_after_it_slips_through() {
    let (addr, heads) = raw_upstream("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n").await;
    let gw = TestGateway::start(&one_ws_route(&format!("http://{addr}")), &[]).await;
    let auth = bearer(&token(&["viewer"]));
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nGET /secret HTTP/1.1\r\nHost: gw\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("closed").unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.matches("HTTP/1.1 ").count() <= 2, "{text}");
    assert!(!text.contains("HTTP/1.1 200"), "the pipelined request was answered with success: {text}");
    assert_eq!(heads.load(std::sync::atomic::Ordering::SeqCst), 1, "the pipelined request reached the upstream");
}

/// Handshakes whose `Sec-WebSocket-Key` is not one base64 16-byte value: 400 from the gateway,
/// nothing sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_websocket_keys_get_400_and_never_reach_the_upstream() {
    let (addr, heads) = raw_upstream("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await;
    let gw = TestGateway::start(&one_ws_route(&format!("http://{addr}")), &[]).await;
    let auth = bearer(&token(&["viewer"]));
    for (keys, body) in [
        ("Sec-WebSocket-Key: abc\r\n", ""),
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n", ""),
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZWU=\r\n", ""),
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n", ""),
        // A well-formed key but a body: not a handshake either.
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 5\r\n", "hello"),
    ] {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n{keys}Connection: close\r\n\r\n{body}"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("closed").unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 400"), "{keys}: {text}");
        assert!(text.contains("Sec-WebSocket-Key") || text.contains("carries no body"), "{text}");
    }
    assert_eq!(heads.load(std::sync::atomic::Ordering::SeqCst), 0, "a malformed handshake reached the upstream");
    // A version other than 13, none, or two: 400 naming the version spoken (RFC 6455 §4.4).
    for version in ["Sec-WebSocket-Version: 8\r\n", "", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 8\r\n"] {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{version}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("closed").unwrap();
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 400"), "{version}: {text}");
        assert!(text.contains("sec-websocket-version: 13\r\n"), "{version}: {text}");
    }
    assert_eq!(heads.load(std::sync::atomic::Ordering::SeqCst), 0, "an unsupported version reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_50_websockets_with_going_away() {
    let (_sims, gw) = shipped().await;
    let mut clients = Vec::new();
    // One principal may hold 20 (websocket.max_per_principal); the 21st is refused.
    let one = bearer(&token(&["viewer"]));
    for _ in 0..20 {
        clients.push(connect(gw.addr(), "/ws", &[("authorization", &one)]).await.expect("upgrade"));
    }
    let refused = connect(gw.addr(), "/ws", &[("authorization", &one)]).await.unwrap_err();
    assert_eq!(status_of(&refused), 429);
    // Refused by the connection limit, not a rate limit: no rate-limit scope's budget is shown.
    if let tokio_tungstenite::tungstenite::Error::Http(r) = &refused {
        assert!(!r.headers().contains_key("ratelimit-remaining"), "{:?}", r.headers());
    }
    for i in 0..30 {
        let t = bearer(&hs256(TEST_SECRET, &claims(&format!("user-{i}"), &["viewer"], serde_json::json!({}))));
        clients.push(connect(gw.addr(), "/ws", &[("authorization", &t)]).await.expect("upgrade"));
    }
    assert_eq!(gw.handle.shared().ws.active(), 50);
    let TestGateway { handle } = gw;
    handle.shutdown();
    let readers = clients.into_iter().map(|mut ws| async move {
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| f.code),
                Ok(Some(Ok(_))) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    });
    let codes = futures_util::future::join_all(readers).await;
    assert!(codes.iter().all(|c| *c == Some(CloseCode::Away)), "{codes:?}");
    tokio::time::timeout(WAIT, handle.wait()).await.expect("the gateway stopped after closing them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_pass_through_unbuffered() {
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    let (tx_release, rx_release) = tokio::sync::oneshot::channel::<()>();
    let rx_release = std::sync::Arc::new(tokio::sync::Mutex::new(Some(rx_release)));
    let up = upstream(move |_req| {
        let rx = rx_release.clone();
        async move {
            let (tx, rx_body) = tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, std::io::Error>>(4);
            tokio::spawn(async move {
                tx.send(Ok(Frame::data(bytes::Bytes::from_static(b"event: tick\ndata: 1\n\n")))).await.unwrap();
                if let Some(r) = rx.lock().await.take() {
                    let _ = r.await;
                }
                tx.send(Ok(Frame::data(bytes::Bytes::from_static(b"data: 2\n\n")))).await.unwrap();
            });
            let mut rx_body = rx_body;
            let stream = futures_util::stream::poll_fn(move |cx| rx_body.poll_recv(cx));
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
    })
    .await;
    let yaml = config_yaml(
        &[("up", format!("http://{up}"))],
        "  - { id: sse, path: /events, methods: [GET], service: up, public: true }\n",
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    let mut tx = h1::<http_body_util::Empty<bytes::Bytes>>(gw.addr()).await;
    let resp = tx
        .send_request(http::Request::get("/events").header("host", "gw").body(http_body_util::Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first =
        tokio::time::timeout(WAIT, body.frame()).await.expect("first event before the stream ends").unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "event: tick\ndata: 1\n\n");
    tx_release.send(()).unwrap();
    let rest = tokio::time::timeout(WAIT, body.collect()).await.unwrap().unwrap().to_bytes();
    assert_eq!(rest, "data: 2\n\n");
}
