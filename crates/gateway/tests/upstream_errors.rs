//! Upstream failures map to precise statuses with the JSON error body and request id:
//! timeout → 504 (within timeout + 100 ms), refused → 502, reset → 502 or a broken response,
//! garbage → 502, no healthy instance → 503.

mod support;

use http::Method;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTE: &str = "  - { id: t, path: \"/api/v1/market/ticker/{s}\", methods: [GET, POST], service: up, public: true, timeout: 300ms }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_is_504_within_timeout_plus_100ms() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&config_yaml(&[("up", sim.url())], ROUTE), &[]).await;
    let t0 = Instant::now();
    let r = send(gw.addr(), Method::GET, "/api/v1/market/ticker/X", &[("x-sim-delay", "3000")], "").await;
    let took = t0.elapsed();
    r.assert_error(504, "upstream_timeout");
    assert!(took >= Duration::from_millis(300), "answered before the timeout: {took:?}");
    assert!(took < Duration::from_millis(400), "504 took {took:?}, more than timeout + 100ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_502() {
    let url = format!("http://127.0.0.1:{}", dead_port());
    let gw = TestGateway::start(&config_yaml(&[("up", url)], ROUTE), &[]).await;
    let r = get(gw.addr(), "/api/v1/market/ticker/X").await;
    r.assert_error(502, "upstream_unavailable");
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains("127.0.0.1"), "internal address leaked: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_response_is_502() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&config_yaml(&[("up", sim.url())], ROUTE), &[]).await;
    // A POST that may have reached the upstream is never sent twice.
    let r = send(gw.addr(), Method::POST, "/api/v1/market/ticker/X", &[("x-sim-reset", "before-response")], "").await;
    r.assert_error(502, "upstream_reset");
    assert_eq!(sim.hits(), 1, "a POST must not be retried after a reset");
    // A GET is retried once (the service default: 2 tries), then reported.
    let r = send(gw.addr(), Method::GET, "/api/v1/market/ticker/X", &[("x-sim-reset", "before-response")], "").await;
    r.assert_error(502, "upstream_reset");
    assert_eq!(sim.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_response_breaks_the_client_response_without_hanging() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&config_yaml(&[("up", sim.url())], ROUTE), &[]).await;
    let mut tx = h1(gw.addr()).await;
    let req = http::Request::get("/api/v1/market/ticker/X")
        .header("host", "gw")
        .header("x-sim-reset", "mid-body")
        .header("x-sim-chunks", "4")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "headers were already sent");
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the client must see the break, not hang");
    assert!(body.is_err(), "a truncated upstream body must not look complete to the client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_upstream_is_502() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"this is not http\r\n\r\n").await;
            });
        }
    });
    let gw = TestGateway::start(&config_yaml(&[("up", format!("http://{addr}"))], ROUTE), &[]).await;
    get(gw.addr(), "/api/v1/market/ticker/X").await.assert_error(502, "bad_upstream_response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_instance_is_503_without_touching_it() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    sim.knobs().set_health_status(500);
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:0\", admin_listen: \"\" }}\nlogging: {{ level: warn }}\nservices:\n  up:\n    instances: [\"{}\"]\n    health_check: {{ interval: 1h, unhealthy_threshold: 1 }}\nroutes:\n{ROUTE}",
        sim.url()
    );
    // Ready means the first health round is done, so the instance is already known bad.
    let gw = TestGateway::start(&yaml, &[]).await;
    get(gw.addr(), "/api/v1/market/ticker/X").await.assert_error(503, "no_healthy_upstream");
    assert_eq!(sim.hits(), 0);
    let health = get(gw.addr(), "/health").await;
    assert_eq!(health.status, 200);
    let v = health.json();
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["services"]["up"]["status"], "unhealthy");
    assert_eq!(v["services"]["up"]["instances"][0]["last_check_status"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_declared_body_is_413_and_never_forwarded() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let route = "  - { id: t, path: \"/api/v1/market/ticker/{s}\", methods: [POST], service: up, public: true, max_body: 1KiB }\n";
    let gw = TestGateway::start(&config_yaml(&[("up", sim.url())], route), &[]).await;
    let r = send(gw.addr(), Method::POST, "/api/v1/market/ticker/X", &[], vec![b'x'; 2048]).await;
    r.assert_error(413, "payload_too_large");
    assert_eq!(sim.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_endpoints() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&config_yaml(&[("up", sim.url())], ROUTE), &[]).await;
    let v = get(gw.addr(), "/version").await.json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["git_commit"].is_string() && v["build_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(get(gw.addr(), "/health/liveness").await.status, 200);
    assert_eq!(get(gw.addr(), "/health/readiness").await.status, 200);
    let h = get(gw.addr(), "/health").await.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["services"]["up"]["status"], "healthy");
    send(gw.addr(), Method::POST, "/health", &[], "").await.assert_error(405, "method_not_allowed");
    // Metrics on the admin listener, labelled by route id.
    get(gw.addr(), "/api/v1/market/ticker/X").await;
    let m = get(gw.handle.admin_addr().unwrap(), "/metrics").await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains(r#"b25_gateway_http_requests_total{route="t",method="GET",status="200"} 1"#), "{text}");
    assert!(text.contains("b25_gateway_http_request_duration_seconds_bucket{le=\"0.00005\""), "{text}");
}
