//! End-to-end tests of the simulated services over real sockets.

use std::net::SocketAddr;
use std::time::Duration;

use b25_sim::{ResetMode, Service, SimOptions, SimServer};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

async fn sim(service: Service) -> SimServer {
    b25_sim::start(service, "127.0.0.1:0".parse().unwrap()).await.expect("start sim")
}

/// Opens a fresh HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

fn build(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

/// Sends one request on a new connection and returns the response head + streaming body.
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<http::Response<Incoming>, hyper::Error> {
    let mut sender = connect(addr).await;
    sender.send_request(build(addr, method, path, headers, body)).await
}

/// Sends one request and returns status, headers and the JSON body.
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Value) {
    let resp = send(addr, method, path, headers, body).await.expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("invalid JSON {e}: {}", String::from_utf8_lossy(&bytes)));
    (parts.status, parts.headers, json)
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, Value) {
    let (s, _, v) = call(addr, Method::GET, path, &[], "").await;
    (s, v)
}

#[tokio::test]
async fn health_on_every_service() {
    for service in Service::ALL {
        let server = sim(service).await;
        assert_eq!(server.service(), service);
        assert_eq!(server.url(), format!("http://{}", server.addr()));
        for path in ["/health", "/api/v1/health"] {
            let (status, headers, body) = call(server.addr(), Method::GET, path, &[], "").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, json!({ "status": "ok", "service": service.name() }));
            assert_eq!(headers["x-sim-service"], service.name());
            assert_eq!(headers["content-type"], "application/json");
        }
        // Knobs never affect /health, only its own status knob does.
        server.knobs().set_error_status(Some(500));
        server.knobs().set_reset(Some(ResetMode::BeforeResponse));
        server.knobs().set_health_status(503);
        let (status, body) = get(server.addr(), "/health").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["service"], service.name());
        assert_eq!(server.health_hits(), 3);
        assert_eq!(server.hits(), 0);
        assert!(server.requests().is_empty());
        assert!(server.wait_for_health_hits(3, WAIT).await);
    }
}

#[tokio::test]
async fn order_create_get_cancel() {
    let server = sim(Service::OrderExecution).await;
    let addr = server.addr();
    let order = r#"{"symbol":"BTCUSDT","side":"buy","quantity":0.5,"price":65000.5,"client_order_id":"c-1"}"#;
    let (status, headers, created) =
        call(addr, Method::POST, "/api/v1/orders", &[("content-type", "application/json")], order).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["x-sim-service"], "order-execution");
    assert_eq!(created["id"], "ord-1");
    assert_eq!(created["status"], "open");
    assert_eq!(created["symbol"], "BTCUSDT");
    assert_eq!(created["client_order_id"], "c-1");

    let (status, fetched) = get(addr, "/api/v1/orders/ord-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, created);
    let (_, active) = get(addr, "/orders/active").await;
    assert_eq!(active["count"], 1);

    let (status, _, patched) = call(addr, Method::PATCH, "/api/v1/orders/ord-1", &[], r#"{"price":64000}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched["price"], 64000.0);
    assert_eq!(patched["quantity"], 0.5);

    let (status, _, cancelled) = call(addr, Method::DELETE, "/api/v1/orders/ord-1", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cancelled["status"], "cancelled");
    let (_, fetched) = get(addr, "/api/v1/orders/ord-1").await;
    assert_eq!(fetched["status"], "cancelled");
    let (_, active) = get(addr, "/api/v1/orders/active").await;
    assert_eq!(active["count"], 0);
    let (_, history) = get(addr, "/api/v1/orders/history").await;
    assert_eq!(history["count"], 1);

    // Same client_order_id again: stored again.
    let (status, _, second) = call(addr, Method::POST, "/orders", &[], order).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(second["id"], "ord-2");
    let orders = server.orders();
    assert_eq!(orders.len(), 2);
    assert_eq!(orders[0]["status"], "cancelled");
    assert_eq!(orders[1]["client_order_id"], "c-1");

    let (status, _, err) = call(addr, Method::POST, "/api/v1/orders", &[], "{nope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err["error"].is_string());
    let (status, _, err) =
        call(addr, Method::POST, "/api/v1/orders", &[], r#"{"symbol":"BTCUSDT","side":"buy","price":1}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"], "missing field: quantity");
    let (status, err) = get(addr, "/api/v1/orders/ord-42").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err["error"].is_string());
    assert_eq!(server.orders().len(), 2);
    // Other services hold no orders.
    assert!(sim(Service::MarketData).await.orders().is_empty());
}

#[tokio::test]
async fn routes_prefix_404_405() {
    let md = sim(Service::MarketData).await;
    for path in ["/api/v1/market/ticker/ETHUSDT", "/market/ticker/ETHUSDT"] {
        let (status, body) = get(md.addr(), path).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["symbol"], "ETHUSDT");
        assert!(body["last_price"].as_f64().unwrap() > 1000.0);
    }
    let (status, body) = get(md.addr(), "/api/v1/market/orderbook/SOLUSDT").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["symbol"], "SOLUSDT");
    assert!(body["bids"][0][0].as_f64().unwrap() < body["asks"][0][0].as_f64().unwrap());

    let (status, body) = get(md.addr(), "/api/v1/orders/active").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({ "error": "not found" }));
    let (status, headers, _) = call(md.addr(), Method::DELETE, "/api/v1/market/symbols", &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET");

    let risk = sim(Service::RiskManager).await;
    let (status, _, limits) = call(risk.addr(), Method::PUT, "/api/v1/risk/limits", &[], r#"{"max_leverage":3}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(limits["max_leverage"], 3);
    let (status, _, stop) = call(risk.addr(), Method::POST, "/api/v1/risk/emergency-stop", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stop["activated"], true);
    let (_, st) = get(risk.addr(), "/api/v1/risk/status").await;
    assert_eq!(st["status"], "emergency_stop");
}

#[tokio::test]
async fn status_knobs() {
    let server = sim(Service::AccountMonitor).await;
    let addr = server.addr();
    let (status, headers, body) =
        call(addr, Method::GET, "/api/v1/account/balance", &[("x-sim-status", "503")], "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["status"], 503);
    assert!(body["error"].is_string());

    server.knobs().set_error_status(Some(502));
    let (status, _) = get(addr, "/api/v1/account/pnl").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // The header overrides the service-wide knob.
    let (status, _, _) = call(addr, Method::GET, "/api/v1/account/pnl", &[("x-sim-status", "429")], "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    server.knobs().set_error_status(None);
    let (status, body) = get(addr, "/api/v1/account/pnl").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["total"].is_number());
    assert_eq!(server.hits(), 4);
}

#[tokio::test]
async fn delay_knobs() {
    let server = sim(Service::Configuration).await;
    let addr = server.addr();
    let start = Instant::now();
    let (status, _, _) = call(addr, Method::GET, "/api/v1/config", &[("x-sim-delay", "150")], "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(150));

    server.knobs().set_latency(Duration::from_millis(120));
    let start = Instant::now();
    let (status, _) = get(addr, "/api/v1/config").await;
    assert_eq!(status, StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(120));
    // The header overrides the knob (0 = no delay); just check it still answers.
    let (status, _, _) = call(addr, Method::GET, "/api/v1/config", &[("x-sim-delay", "0")], "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn reset_before_response() {
    let server = sim(Service::OrderExecution).await;
    let addr = server.addr();
    let body = r#"{"symbol":"BTCUSDT","side":"sell","quantity":1,"price":2}"#;
    let result = send(addr, Method::POST, "/api/v1/orders", &[("x-sim-reset", "before-response")], body).await;
    assert!(result.is_err(), "expected a connection error, got {result:?}");
    // The request was read completely and recorded before the reset.
    assert!(server.wait_for_hits(1, WAIT).await);
    let recorded = server.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].body, Bytes::from(body));

    server.knobs().set_reset(Some(ResetMode::BeforeResponse));
    assert!(send(addr, Method::GET, "/orders/active", &[], "").await.is_err());
    // Per-request override of the service-wide reset.
    let (status, _, _) = call(addr, Method::GET, "/orders/active", &[("x-sim-reset", "none")], "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.hits(), 3);
}

/// Reads the body frame by frame: (data chunks, whether it ended with an error).
async fn read_frames(mut body: Incoming) -> (Vec<Bytes>, bool) {
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    chunks.push(data);
                }
            }
            Err(_) => return (chunks, true),
        }
    }
    (chunks, false)
}

#[tokio::test]
async fn reset_mid_body() {
    let server = sim(Service::Dashboard).await;
    let addr = server.addr();
    let resp = send(addr, Method::GET, "/api/v1/dashboard/summary", &[("x-sim-reset", "mid-body")], "")
        .await
        .expect("headers arrive");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("content-length").is_none());
    let (chunks, failed) = read_frames(resp.into_body()).await;
    assert!(failed, "body must end with an error");
    let received: Vec<u8> = chunks.concat();
    assert!(!received.is_empty(), "a first chunk is sent");
    assert!(serde_json::from_slice::<Value>(&received).is_err(), "body is truncated");

    server.knobs().set_reset(Some(ResetMode::MidBody));
    let resp = send(addr, Method::GET, "/api/v1/dashboard/status", &[], "").await.unwrap();
    let (_, failed) = read_frames(resp.into_body()).await;
    assert!(failed);
}

#[tokio::test]
async fn chunked_bodies() {
    let server = sim(Service::AccountMonitor).await;
    let start = Instant::now();
    let resp = send(
        server.addr(),
        Method::GET,
        "/api/v1/account/summary",
        &[("x-sim-chunks", "4"), ("x-sim-chunk-delay", "40")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("content-length").is_none());
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let mut arrivals = 0;
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame.expect("frame").into_data() {
            arrivals += 1;
            data.extend_from_slice(&chunk);
        }
    }
    assert_eq!(arrivals, 4, "four separate chunks");
    // Three 40 ms pauses between the four chunks.
    assert!(start.elapsed() >= Duration::from_millis(120));
    let json: Value = serde_json::from_slice(&data).expect("complete JSON");
    assert!(json["equity"].is_number());
}

#[tokio::test]
async fn recording_and_echo() {
    let server = sim(Service::Configuration).await;
    let addr = server.addr();
    let (status, _, body) = call(
        addr,
        Method::PUT,
        "/api/v1/config/risk.max?x=1&y=two",
        &[("x-custom", "abc"), ("content-type", "application/json")],
        r#"{"v":42}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["key"], "risk.max");
    assert_eq!(body["value"], json!({ "v": 42 }));
    let (_, stored) = get(addr, "/config/risk.max").await;
    assert_eq!(stored["value"]["v"], 42);

    let recorded = server.requests();
    assert_eq!(recorded.len(), 2);
    let r = &recorded[0];
    assert_eq!(r.method, Method::PUT);
    assert_eq!(r.uri.path(), "/api/v1/config/risk.max");
    assert_eq!(r.uri.query(), Some("x=1&y=two"));
    assert_eq!(r.headers["x-custom"], "abc");
    assert_eq!(r.body, Bytes::from_static(br#"{"v":42}"#));
    assert!(r.peer.ip().is_loopback());
    assert_eq!(recorded[1].method, Method::GET);

    let (status, _, echo) =
        call(addr, Method::POST, "/api/v1/anything?q=1", &[("x-sim-echo", "1"), ("x-trace", "t-1")], "hello").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/api/v1/anything");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(echo["headers"]["x-trace"], "t-1");
    assert_eq!(echo["body"], "hello");

    server.knobs().set_record(false);
    get(addr, "/config").await;
    assert_eq!(server.hits(), 4);
    assert_eq!(server.requests().len(), 3);
    assert!(server.wait_for_hits(4, WAIT).await);
    assert!(!server.wait_for_hits(5, Duration::from_millis(20)).await);
    server.clear_requests();
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn wait_for_hits_is_notified() {
    let server = sim(Service::StrategyEngine).await;
    let addr = server.addr();
    let waiter = server.wait_for_hits(3, WAIT);
    let client = async {
        for _ in 0..3 {
            let (status, body) = get(addr, "/api/v1/strategies").await;
            assert_eq!(status, StatusCode::OK);
            assert!(body["strategies"].is_array());
        }
    };
    let (reached, ()) = tokio::join!(waiter, client);
    assert!(reached);
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let server = sim(Service::MarketData).await;
    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let uri = format!("{}/api/v1/market/symbols", server.url());
    let resp = client.get(uri.parse().unwrap()).await.expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-sim-service"], "market-data");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert!(json["symbols"].as_array().unwrap().len() >= 3);
}

#[tokio::test]
async fn websocket_ticker_and_echo() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = SimOptions { ticker_interval: Duration::from_millis(20), ..SimOptions::default() };
    let server = b25_sim::start_with(Service::Dashboard, listener, options).await.unwrap();
    let addr = server.addr();

    // Plain GET is refused with 426.
    let (status, _) = get(addr, "/ws").await;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);

    for path in ["/ws", "/api/v1/ws"] {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut ws, resp) =
            tokio_tungstenite::client_async(format!("ws://{addr}{path}"), stream).await.expect("websocket handshake");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(resp.headers()["x-sim-service"], "dashboard");

        // Two tickers with increasing seq.
        let mut seqs = Vec::new();
        while seqs.len() < 2 {
            let msg = ws.next().await.expect("message").expect("ok");
            let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
            assert_eq!(v["type"], "ticker");
            assert_eq!(v["symbol"], "BTCUSDT");
            assert!(v["price"].as_f64().unwrap() > 1000.0);
            seqs.push(v["seq"].as_u64().unwrap());
        }
        assert!(seqs[1] > seqs[0]);

        // Echo (in order), interleaved with tickers; ping gets a pong.
        ws.send(Message::text("hello")).await.unwrap();
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        ws.send(Message::Ping(Bytes::from_static(b"p"))).await.unwrap();
        let mut echoes = Vec::new();
        let mut pong = false;
        while echoes.len() < 2 || !pong {
            match ws.next().await.expect("message").expect("ok") {
                Message::Text(t) if t.as_str().contains("\"ticker\"") => {}
                Message::Pong(p) => {
                    assert_eq!(&p[..], b"p");
                    pong = true;
                }
                other => echoes.push(other),
            }
        }
        assert_eq!(echoes[0], Message::text("hello"));
        assert_eq!(echoes[1], Message::binary(vec![1u8, 2, 3]));

        ws.close(None).await.unwrap();
        while let Some(msg) = ws.next().await {
            if msg.is_err() {
                break;
            }
        }
    }
    // 1 plain GET + 2 upgrades.
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn shutdown_closes_everything() {
    let server = sim(Service::RiskManager).await;
    let addr = server.addr();
    let mut keepalive = connect(addr).await;
    let resp = keepalive.send_request(build(addr, Method::GET, "/api/v1/risk/limits", &[], "")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();

    server.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    // The idle keep-alive connection was closed too.
    let _ = keepalive.ready().await;
    let result = keepalive.send_request(build(addr, Method::GET, "/api/v1/risk/limits", &[], "")).await;
    assert!(result.is_err());
}
