//! Resilience over real sockets: instance failure and return, the circuit breaker, order
//! safety against every failure shape, consistent hashing and the retry budget.

mod support;

use http::Method;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TICKER: &str = "  - { id: t, path: \"/api/v1/market/ticker/{s}\", methods: [GET], service: up, public: true }\n";

fn service_yaml(instances: &[String], extra: &str, routes: &str) -> String {
    let list: Vec<String> = instances.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "server: {{ listen: \"127.0.0.1:0\", admin_listen: \"127.0.0.1:0\" }}\nlogging: {{ level: warn }}\nservices:\n  up:\n    instances: [{}]\n{extra}routes:\n{routes}",
        list.join(", ")
    )
}

async fn metrics(gw: &TestGateway) -> String {
    String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/metrics").await.body).to_string()
}

fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

async fn sims(n: usize) -> Vec<b25_sim::SimServer> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_routed_around_and_used_again_when_back() {
    let mut s = sims(3).await;
    let urls: Vec<String> = s.iter().map(|x| x.url()).collect();
    let extra = "    health_check: { interval: 100ms, timeout: 200ms, unhealthy_threshold: 1, healthy_threshold: 1 }\n    retry: { attempts: 3 }\n";
    let gw = TestGateway::start(&service_yaml(&urls, extra, TICKER), &[]).await;
    for _ in 0..30 {
        assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200);
    }
    assert!(s.iter().all(|x| x.hits() == 10), "round robin spreads evenly");
    let dead = s.pop().unwrap();
    let dead_addr = dead.addr();
    dead.shutdown().await;
    // During the kill: no GET fails (a try on the dead instance is retried on another).
    for _ in 0..60 {
        let r = get(gw.addr(), "/api/v1/market/ticker/X").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    // After detection no request goes to it: its failed tries stop growing.
    let dead_label = format!("instance=\"{}\"", urls[2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = get(gw.addr(), "/health").await.json();
        if h["services"]["up"]["instances"][2]["healthy"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "the dead instance was never detected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics(&gw).await;
    let before = metric_value(&m, &format!("b25_gateway_upstream_requests_total{{service=\"up\",{dead_label}"));
    for _ in 0..40 {
        assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200);
    }
    let after =
        metric_value(&metrics(&gw).await, &format!("b25_gateway_upstream_requests_total{{service=\"up\",{dead_label}"));
    assert_eq!(before, after, "requests still went to the dead instance");
    // It comes back on the same address and is used again.
    let listener = TcpListener::bind(dead_addr).await.unwrap();
    let back = b25_sim::start_with(b25_sim::Service::MarketData, listener, Default::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while back.hits() == 0 {
        assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200);
        assert!(Instant::now() < deadline, "the instance that came back is never used");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_trips_fails_fast_probes_boundedly_and_recovers() {
    let s = sims(1).await;
    s[0].knobs().set_error_status(Some(503));
    let extra = "    health_check: { enabled: false }\n    outlier_detection: { enabled: false }\n    circuit_breaker: { consecutive_failures: 5, open_interval: 300ms, max_open_interval: 300ms, half_open_probes: 2 }\n    retry: { attempts: 2, budget_ratio: 0.2, min_retries_per_second: 0 }\n";
    let gw = TestGateway::start(&service_yaml(&[s[0].url()], extra, TICKER), &[]).await;
    let mut open = 0;
    for _ in 0..100 {
        let r = get(gw.addr(), "/api/v1/market/ticker/X").await;
        assert_eq!(r.status, 503);
        if r.json()["error"]["code"] == "circuit_open" {
            open += 1;
            assert!(r.headers.contains_key("retry-after"));
        }
    }
    assert!(open >= 90, "the breaker should be open for most requests, was for {open}");
    assert!(s[0].hits() as f64 <= 1.2 * 100.0, "{} upstream attempts for 100 requests", s[0].hits());
    // While open: answered without the upstream, quickly.
    let hits = s[0].hits();
    let t0 = Instant::now();
    for _ in 0..20 {
        get(gw.addr(), "/api/v1/market/ticker/X").await.assert_error(503, "circuit_open");
    }
    assert_eq!(s[0].hits(), hits, "an open breaker let requests through");
    assert!(t0.elapsed() < Duration::from_millis(250), "fail-fast took {:?} for 20 requests", t0.elapsed());
    // Half-open: concurrent requests, at most `half_open_probes` reach the upstream.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let before = s[0].hits();
    let addr = gw.addr();
    let results = futures_util::future::join_all((0..10).map(|_| get(addr, "/api/v1/market/ticker/X"))).await;
    assert!(results.iter().all(|r| r.status == 503));
    assert!(s[0].hits() - before <= 2, "{} probes went through", s[0].hits() - before);
    // Recovery closes it.
    s[0].knobs().set_error_status(None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if get(gw.addr(), "/api/v1/market/ticker/X").await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics(&gw).await;
    assert!(m.contains("b25_gateway_circuit_breaker_state{service=\"up\"} 0"), "{m}");
    assert!(m.contains("b25_gateway_circuit_breaker_transitions_total{service=\"up\",from=\"closed\",to=\"open\"}"));
}

/// A hand-written order service that misbehaves on demand (`x-fault` header) and counts how
/// many times each client order id arrived.
struct FaultUpstream {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<HashMap<String, u32>>>,
}

async fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some((head, buf[head_end..head_end + len].to_vec()))
}

async fn fault_upstream() -> FaultUpstream {
    fault_upstream_on("127.0.0.1:0".parse().unwrap()).await
}

async fn fault_upstream_on(addr: std::net::SocketAddr) -> FaultUpstream {
    let l = TcpListener::bind(addr).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while let Some((head, body)) = read_request(&mut s).await {
                    n += 1;
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if let Some(id) = v["client_order_id"].as_str() {
                        *seen.lock().unwrap().entry(id.to_string()).or_default() += 1;
                    }
                    let fault = head.lines().find_map(|l| l.strip_prefix("x-fault:").map(|v| v.trim().to_string()));
                    let ok = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    match fault.as_deref() {
                        Some("reset") => return, // read the order, then drop the connection
                        Some("502") => {
                            let _ = s.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n").await;
                        }
                        Some("hang") => {
                            std::future::pending::<()>().await;
                        }
                        // The order's first delivery hangs, any later one is refused with 503.
                        Some("hang-then-503") => {
                            let id = v["client_order_id"].as_str().unwrap_or_default().to_string();
                            if seen.lock().unwrap()[&id] == 1 {
                                std::future::pending::<()>().await;
                            }
                            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
                        }
                        // Answer the first request on a connection; close on the second after
                        // reading it (the keep-alive race, at its worst: processed, unanswered).
                        Some("second-close") if n >= 2 => return,
                        // Answer, then close the kept-alive connection while it idles.
                        Some("close-after") => {
                            let _ = s.write_all(ok).await;
                            return;
                        }
                        _ => {
                            let _ = s.write_all(ok).await;
                        }
                    }
                }
            });
        }
    });
    FaultUpstream { addr, seen }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_never_sent_twice_whatever_the_upstream_does() {
    let up = fault_upstream().await;
    let extra = "    health_check: { enabled: false }\n    outlier_detection: { enabled: false }\n    circuit_breaker: { enabled: false }\n    retry: { attempts: 3, min_retries_per_second: 100 }\n";
    let routes = "  - { id: orders, path: \"/api/v1/orders\", methods: [POST], service: up, public: true, json: true, timeout: 500ms }\n";
    // One worker, so one upstream pool: the keep-alive sequences below depend on which
    // pooled connection the next order takes.
    let yaml = service_yaml(&[format!("http://{}", up.addr)], extra, routes)
        .replace("admin_listen: \"127.0.0.1:0\" }", "admin_listen: \"127.0.0.1:0\", workers: 1 }");
    let gw = TestGateway::start(&yaml, &[]).await;
    let order =
        |id: &str| format!(r#"{{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":1,"client_order_id":"{id}"}}"#);
    let post = |id: String, fault: &'static str| {
        let addr = gw.addr();
        async move {
            let h = [("content-type", "application/json"), ("x-fault", fault)];
            send(addr, Method::POST, "/api/v1/orders", &h, order(&id)).await
        }
    };
    // (a) reset after reading the body, (b) 502, (c) hang past the timeout.
    post("a".into(), "reset").await.assert_error(502, "upstream_reset");
    let b = post("b".into(), "502").await;
    assert_eq!(b.status, 502);
    post("c".into(), "hang").await.assert_error(504, "upstream_timeout");
    // (d) the upstream closes a kept-alive connection as the next request arrives.
    assert_eq!(post("d1".into(), "second-close").await.status, 201);
    let d2 = post("d2".into(), "second-close").await;
    assert!(d2.status == 201 || d2.status == 502, "d2: {}", d2.status);
    // And an idle keep-alive connection closed by the upstream before reuse: the next order
    // goes out once, on a new connection.
    for i in 0..5 {
        let r = post(format!("e{i}"), "close-after").await;
        assert!(r.status == 201 || r.status == 502, "e{i}: {}", r.status);
    }
    let seen = up.seen.lock().unwrap().clone();
    for (id, n) in &seen {
        assert_eq!(*n, 1, "order {id} reached the upstream {n} times");
    }
    for id in ["a", "b", "c", "d1", "e0", "e4"] {
        assert!(seen.contains_key(id), "order {id} never arrived");
    }
}

/// A keyed order whose first try may have reached the upstream (reset after the upstream read
/// it, or no answer in time) keeps its key whatever the gateway's own retry then gets: refused
/// (the service died), the breaker open, or a 503. The client gets the in-doubt 502/504, and its
/// retry with the same key replays that instead of placing the order again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_order_in_doubt_keeps_its_key_whatever_the_retry_gets() {
    let routes = "  - { id: orders, path: \"/api/v1/orders\", methods: [POST], service: up, public: true, json: true, timeout: 3s, idempotency: { required: true, ttl: 1h } }\n";
    let gateway = |addr: std::net::SocketAddr, breaker: &str, retry: &str| {
        let extra = format!(
            "    health_check: {{ enabled: false }}\n    outlier_detection: {{ enabled: false }}\n    circuit_breaker: {breaker}\n    retry: {retry}\n"
        );
        service_yaml(&[format!("http://{addr}")], &extra, routes)
    };
    let order =
        |id: &str| format!(r#"{{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":1,"client_order_id":"{id}"}}"#);
    let post = |addr: std::net::SocketAddr, key: &'static str, fault: &'static str, id: &'static str| async move {
        let h = [("content-type", "application/json"), ("idempotency-key", key), ("x-fault", fault)];
        send(addr, Method::POST, "/api/v1/orders", &h, order(id)).await
    };

    // (a) The order service reads the order and dies: the retry finds the port closed.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let gw =
        TestGateway::start(&gateway(addr, "{ enabled: false }", "{ attempts: 2, min_retries_per_second: 100 }"), &[])
            .await;
    let crash = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        read_request(&mut s).await.unwrap();
        // The port closes before the connection does: the retry is refused.
        drop(l);
        drop(s);
    });
    let first = post(gw.addr(), "k-a", "", "a").await;
    crash.await.unwrap();
    first.assert_error(502, "upstream_reset");
    // The service comes back on its port; the client retries with the key.
    let back = fault_upstream_on(addr).await;
    let again = post(gw.addr(), "k-a", "", "a").await;
    assert_eq!(again.status, 502, "the in-doubt order was placed again");
    again.assert_error(502, "upstream_reset");
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert!(back.seen.lock().unwrap().is_empty(), "the order reached the upstream a second time");

    // (b) The first try is reset after the upstream read it, which opens the breaker: the retry
    // finds it open.
    let up = fault_upstream().await;
    let gw = TestGateway::start(
        &gateway(up.addr, "{ consecutive_failures: 1 }", "{ attempts: 2, min_retries_per_second: 100 }"),
        &[],
    )
    .await;
    post(gw.addr(), "k-b", "reset", "b").await.assert_error(502, "upstream_reset");
    let again = post(gw.addr(), "k-b", "", "b").await;
    assert_eq!(again.headers["idempotent-replayed"], "true", "status {}", again.status);
    assert_eq!(up.seen.lock().unwrap()["b"], 1);

    // (c) The first try gets no answer in time; the retry gets a 503.
    let up = fault_upstream().await;
    let gw = TestGateway::start(
        &gateway(up.addr, "{ enabled: false }", "{ attempts: 2, per_try_timeout: 300ms, min_retries_per_second: 100 }"),
        &[],
    )
    .await;
    post(gw.addr(), "k-c", "hang-then-503", "c").await.assert_error(504, "upstream_timeout");
    let again = post(gw.addr(), "k-c", "", "c").await;
    again.assert_error(504, "upstream_timeout");
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(up.seen.lock().unwrap()["c"], 2, "the first try and the gateway's retry, nothing more");
}

/// A try abandoned because its client went away gives back what it held: the instance's
/// in-flight count (else `least_request` shuns the instance for good) and, when it was the
/// half-open breaker's probe, the probe slot (else every later request gets 503 `circuit_open`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_abandoned_by_its_client_gives_back_its_probe_and_in_flight_count() {
    let up = fault_upstream().await;
    let extra = "    health_check: { enabled: false }\n    outlier_detection: { enabled: false }\n    circuit_breaker: { consecutive_failures: 1, open_interval: 1ms, half_open_probes: 1 }\n    retry: { attempts: 1 }\n";
    let routes = "  - { id: t, path: \"/t\", methods: [GET], service: up, public: true, timeout: 30s }\n";
    let gw = TestGateway::start(&service_yaml(&[format!("http://{}", up.addr)], extra, routes), &[]).await;
    let admin = gw.handle.admin_addr().unwrap();
    let services = || async move {
        let v = get(admin, "/admin/services").await.json();
        let up = v["services"]["up"].clone();
        (up["instances"][0]["in_flight"].as_u64().unwrap(), up["circuit_breaker"].as_str().unwrap().to_string())
    };
    // A reset opens the breaker (one failure is enough here).
    send(gw.addr(), Method::GET, "/t", &[("x-fault", "reset")], "").await.assert_error(502, "upstream_reset");
    assert_eq!(services().await.1, "open");
    // The next request is the half-open probe; the upstream holds it, and its client leaves.
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"GET /t HTTP/1.1\r\nHost: gw\r\nX-Fault: hang\r\n\r\n").await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while services().await != (1, "half_open".to_string()) {
        assert!(Instant::now() < until, "the probe never reached the upstream: {:?}", services().await);
        tokio::task::yield_now().await;
    }
    drop(c);
    // The gateway notices the client is gone and drops the try.
    while services().await.0 != 0 {
        assert!(Instant::now() < until, "the abandoned try is still counted in flight: {:?}", services().await);
        tokio::task::yield_now().await;
    }
    // The probe slot is free: the next request is let through and closes the breaker.
    let r = send(gw.addr(), Method::GET, "/t", &[], "").await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(services().await, (0, "closed".to_string()));
}

/// A keyed order whose client goes away while the upstream holds it, on a connection whose
/// requests are cancelled when their client leaves (HTTP/2: the stream is reset; the native
/// HTTP/1.1 engine instead finishes a request that has a body): its outcome is unknown, so its
/// record is completed as in doubt (502) instead of staying in flight until it expires and the
/// key is free for a second order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_order_whose_client_leaves_mid_flight_keeps_its_key() {
    let up = fault_upstream().await;
    let extra = "    health_check: { enabled: false }\n    outlier_detection: { enabled: false }\n    circuit_breaker: { enabled: false }\n    retry: { attempts: 1 }\n";
    let routes = "  - { id: orders, path: \"/api/v1/orders\", methods: [POST], service: up, public: true, json: true, timeout: 30s, idempotency: { required: true, ttl: 1h } }\n";
    let gw = TestGateway::start(&service_yaml(&[format!("http://{}", up.addr)], extra, routes), &[]).await;
    let order = r#"{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":1,"client_order_id":"gone"}"#;
    let mut tx = h2c::<http_body_util::Full<bytes::Bytes>>(gw.addr()).await;
    let req = http::Request::post(format!("http://{}/api/v1/orders", gw.addr()))
        .header("content-type", "application/json")
        .header("idempotency-key", "k-gone")
        .header("x-fault", "hang")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(order.as_bytes())))
        .unwrap();
    let pending = tokio::spawn(tx.send_request(req));
    let until = Instant::now() + Duration::from_secs(10);
    while up.seen.lock().unwrap().get("gone").copied() != Some(1) {
        assert!(Instant::now() < until, "the order never reached the upstream");
        tokio::task::yield_now().await;
    }
    // The client gives up: its stream is reset.
    pending.abort();
    drop(tx);
    // The retry with the key: 409 while the first is still in flight, then the in-doubt answer.
    let r = loop {
        let h = [("content-type", "application/json"), ("idempotency-key", "k-gone")];
        let r = send(gw.addr(), Method::POST, "/api/v1/orders", &h, order).await;
        if r.status != 409 {
            break r;
        }
        assert!(Instant::now() < until, "the record stayed in flight after its client left");
        tokio::task::yield_now().await;
    };
    // The replayed error names the request it answers, as every gateway error does.
    r.assert_error(502, "upstream_reset");
    assert_eq!(r.headers["idempotent-replayed"], "true");
    assert_eq!(up.seen.lock().unwrap()["gone"], 1, "the order was placed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_an_account_on_one_instance_and_moves_only_its_share() {
    let s = sims(3).await;
    let urls: Vec<String> = s.iter().map(|x| x.url()).collect();
    let extra = "    load_balancing: { policy: consistent_hash, hash_header: x-account-id }\n    health_check: { interval: 100ms, timeout: 200ms, unhealthy_threshold: 1 }\n";
    let gw = TestGateway::start(&service_yaml(&urls, extra, TICKER), &[]).await;
    for _ in 0..1000 {
        let r = send(gw.addr(), Method::GET, "/api/v1/market/ticker/X", &[("x-account-id", "acct-7")], "").await;
        assert_eq!(r.status, 200);
    }
    let hits: Vec<u64> = s.iter().map(|x| x.hits()).collect();
    assert_eq!(hits.iter().filter(|h| **h == 1000).count(), 1, "one account, one instance: {hits:?}");
    for x in &s {
        x.clear_requests();
    }
    let accounts: Vec<String> = (0..300).map(|i| format!("acct-{i}")).collect();
    let owner = |s: &[b25_sim::SimServer]| -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (i, x) in s.iter().enumerate() {
            for r in x.requests() {
                m.insert(r.headers["x-account-id"].to_str().unwrap().to_string(), i);
            }
        }
        m
    };
    for a in &accounts {
        send(gw.addr(), Method::GET, "/api/v1/market/ticker/X", &[("x-account-id", a)], "").await;
    }
    let before = owner(&s);
    for x in &s {
        x.clear_requests();
    }
    // Instance 1 leaves (health checks fail).
    s[1].knobs().set_health_status(500);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(gw.addr(), "/health").await.json()["services"]["up"]["instances"][1]["healthy"] != false {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for a in &accounts {
        send(gw.addr(), Method::GET, "/api/v1/market/ticker/X", &[("x-account-id", a)], "").await;
    }
    let after = owner(&s);
    let mut moved = 0;
    for a in &accounts {
        if before[a] == 1 {
            assert_ne!(after[a], 1);
            moved += 1;
        } else {
            assert_eq!(after[a], before[a], "{a} moved although its instance stayed");
        }
    }
    assert!(moved > 30 && moved < 200, "instance 1 owned {moved} of 300 accounts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_attempts_under_total_failure() {
    let s = sims(1).await;
    s[0].knobs().set_error_status(Some(503));
    let extra = "    health_check: { enabled: false }\n    outlier_detection: { enabled: false }\n    circuit_breaker: { enabled: false }\n    retry: { attempts: 3, backoff_base: 1ms, backoff_max: 1ms, budget_ratio: 0.2, min_retries_per_second: 0 }\n";
    let gw = TestGateway::start(&service_yaml(&[s[0].url()], extra, TICKER), &[]).await;
    for _ in 0..200 {
        assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 503);
    }
    let attempts = s[0].hits();
    assert!(attempts >= 200, "every request is tried once");
    assert!(attempts <= 240, "{attempts} attempts for 200 requests exceed the 20 % budget");
    let m = metrics(&gw).await;
    assert!(metric_value(&m, "b25_gateway_retry_budget_exhausted_total") > 0.0);
    assert!(metric_value(&m, "b25_gateway_upstream_retries_total") > 0.0);
}

/// A retry the circuit breaker refuses is not sent and not counted as sent, and the client gets
/// the upstream's own answer (its 503), not the gateway's reason for not asking again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_refused_by_the_breaker_is_not_counted_and_the_upstreams_answer_stands() {
    let s = sims(1).await;
    s[0].knobs().set_error_status(Some(503));
    let extra = "    health_check: { enabled: false }\n    outlier_detection: { enabled: false }\n    circuit_breaker: { consecutive_failures: 1, open_interval: 30s }\n    retry: { attempts: 2, backoff_base: 1ms, backoff_max: 1ms, budget_ratio: 1.0, min_retries_per_second: 100 }\n";
    let gw = TestGateway::start(&service_yaml(&[s[0].url()], extra, TICKER), &[]).await;
    let r = get(gw.addr(), "/api/v1/market/ticker/X").await;
    assert_eq!(r.status, 503);
    assert!(!String::from_utf8_lossy(&r.body).contains("circuit_open"), "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(s[0].hits(), 1, "one try: the breaker opened on it");
    let m = metrics(&gw).await;
    assert_eq!(metric_value(&m, "b25_gateway_upstream_retries_total"), 0.0, "a retry never sent was counted");
    // The next request meets the open breaker: the gateway's own 503.
    let r = get(gw.addr(), "/api/v1/market/ticker/X").await;
    r.assert_error(503, "circuit_open");
    assert_eq!(s[0].hits(), 1);
}

/// An instance is judged by its first health check: one that is dead at start (or that a
/// reload adds) gets no traffic and does not count as available for readiness, without
/// waiting for `unhealthy_threshold` rounds. An instance the running config already knew
/// keeps its state across a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_gets_no_traffic_from_its_first_failed_check() {
    let live = sims(1).await.pop().unwrap();
    let dead = format!("http://127.0.0.1:{}", dead_port());
    // One round only (the next is an hour away), the default thresholds (2).
    let extra = "    health_check: { interval: 1h, timeout: 500ms }\n    outlier_detection: { enabled: false }\n    retry: { attempts: 1 }\n";
    let dir = temp_dir("first-check");
    let file = dir.join("gw.yaml");
    let text = |instances: &[String], required: &str| {
        service_yaml(instances, extra, TICKER).replace(
            "admin_listen: \"127.0.0.1:0\" }",
            &format!("admin_listen: \"127.0.0.1:0\", required_services: [{required}] }}"),
        )
    };
    // Readiness with a required service whose only instance is dead.
    std::fs::write(&file, text(std::slice::from_ref(&dead), "up")).unwrap();
    let cfg = b25_gateway::config::load(&file).unwrap();
    let gw = b25_gateway::server::start(cfg, &file.display().to_string()).await.unwrap();
    gw.ready().await;
    let r = get(gw.admin_addr().unwrap(), "/health/readiness").await;
    assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (503, "required_service_down".into()));
    gw.shutdown();
    gw.wait().await;
    // A live and a dead instance: every request goes to the live one.
    std::fs::write(&file, text(&[live.url(), dead.clone()], "")).unwrap();
    let cfg = b25_gateway::config::load(&file).unwrap();
    let gw = b25_gateway::server::start(cfg, &file.display().to_string()).await.unwrap();
    gw.ready().await;
    for _ in 0..10 {
        assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200);
    }
    assert_eq!(live.hits(), 10);
    // A reload that adds another dead instance: it gets nothing either.
    let dead2 = format!("http://127.0.0.1:{}", dead_port());
    std::fs::write(&file, text(&[live.url(), dead.clone(), dead2], "")).unwrap();
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..10 {
        assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200);
    }
    assert_eq!(live.hits(), 20);
    let h = get(gw.addr(), "/health").await.json();
    let healthy: Vec<_> =
        h["services"]["up"]["instances"].as_array().unwrap().iter().map(|i| i["healthy"].clone()).collect();
    assert_eq!(healthy, [true, false, false], "{h}");
}

/// A panic while serving a request (a bug; here injected by `x-fault-panic`, which exists only
/// with the `fault-injection` feature the test suite builds with) ends that request with a
/// 500, not the process: a request in flight on another connection completes, the panicking
/// connection and an HTTP/2 connection's other streams go on, nothing reaches the upstream for
/// the panicked request, and it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_ends_only_its_request() {
    use http_body_util::BodyExt;
    let hits = Arc::new(Mutex::new(Vec::<String>::new()));
    let (release, held) = tokio::sync::watch::channel(false);
    let (h, held) = (hits.clone(), held.clone());
    let up = upstream(move |req| {
        let (hits, mut held) = (h.clone(), held.clone());
        async move {
            hits.lock().unwrap().push(req.uri().path().to_string());
            if req.uri().path().ends_with("/HELD") {
                let _ = held.wait_for(|r| *r).await;
            }
            http::Response::new(full_body("{\"ok\":true}"))
        }
    })
    .await;
    let yaml = service_yaml(
        &[format!("http://{up}")],
        "    health_check: { enabled: false }\n",
        &format!("{TICKER}  - {{ id: o, path: \"/o\", methods: [POST], service: up, public: true }}\n"),
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    // A request held at the upstream on its own connection while the panic happens.
    let addr = gw.addr();
    let in_flight = tokio::spawn(async move { get(addr, "/api/v1/market/ticker/HELD").await });
    let until = Instant::now() + Duration::from_secs(10);
    while !hits.lock().unwrap().iter().any(|p| p.ends_with("/HELD")) {
        assert!(Instant::now() < until, "the held request never reached the upstream");
        tokio::task::yield_now().await;
    }
    // HTTP/1.1: the panicking request gets a 500 and its connection serves the next one.
    let mut tx = h1::<http_body_util::Full<bytes::Bytes>>(gw.addr()).await;
    for (panics, path) in [(true, "/o"), (false, "/api/v1/market/ticker/A")] {
        let mut req = http::Request::builder().method(if panics { Method::POST } else { Method::GET }).uri(path);
        req = req.header("host", "gw.test");
        if panics {
            req = req.header("x-fault-panic", "1");
        }
        let resp = tx.send_request(req.body(Default::default()).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        let r = Reply { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() };
        if panics {
            r.assert_error(500, "internal_error");
        } else {
            assert_eq!(r.status, 200);
        }
    }
    // HTTP/2: one stream panics, the connection's other stream is answered.
    let mut h2 = h2c::<http_body_util::Full<bytes::Bytes>>(gw.addr()).await;
    let req = |panics: bool, path: &str| {
        let mut b = http::Request::builder().uri(format!("http://gw.test{path}"));
        if panics {
            b = b.header("x-fault-panic", "1");
        }
        b.body(Default::default()).unwrap()
    };
    let (a, b) = tokio::join!(
        h2.send_request(req(true, "/api/v1/market/ticker/B")),
        h2.clone().send_request(req(false, "/api/v1/market/ticker/C"))
    );
    assert_eq!(a.unwrap().status(), 500);
    assert_eq!(b.unwrap().status(), 200);
    // The held request completes: the process and its other connections went on.
    release.send(true).unwrap();
    assert_eq!(in_flight.await.unwrap().status, 200);
    let seen = hits.lock().unwrap().clone();
    assert!(!seen.iter().any(|p| p == "/o" || p.ends_with("/B")), "a panicked request reached the upstream: {seen:?}");
    assert_eq!(metric_value(&metrics(&gw).await, "b25_gateway_panics_total"), 2.0);
}

/// A client whose streamed body is still arriving when the route's timeout passes gets 408
/// (its own slowness), and the upstream is not blamed: no breaker failure, no outlier
/// record, no upstream error counted. Five such clients must not open the breaker for
/// everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_charged_to_the_upstream() {
    use http_body_util::BodyExt;
    let up = upstream(|req| async move {
        // Reads what arrives (the body never completes for the slow clients).
        let _ = req.into_body().collect().await;
        http::Response::new(full_body("{\"ok\":true}"))
    })
    .await;
    let extra = "    health_check: { enabled: false }\n    outlier_detection: { consecutive_failures: 2 }\n    circuit_breaker: { consecutive_failures: 3, open_interval: 1m }\n";
    let routes = format!(
        "{TICKER}  - {{ id: d, path: \"/d/{{x}}\", methods: [DELETE], service: up, public: true, timeout: 300ms }}\n"
    );
    let yaml = service_yaml(&[format!("http://{up}")], extra, &routes).replace(
        "admin_listen: \"127.0.0.1:0\" }",
        "admin_listen: \"127.0.0.1:0\", limits: { body_idle_timeout: 30s } }",
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    for i in 0..6 {
        // Half the declared body, then nothing more until the answer comes.
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let head = format!("DELETE /d/{i} HTTP/1.1\r\nhost: gw.test\r\ncontent-length: 6\r\n\r\nabc");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(text.starts_with("HTTP/1.1 408"), "slow upload {i}: {text}");
    }
    let r = get(gw.addr(), "/api/v1/market/ticker/X").await;
    assert_eq!(r.status, 200, "the slow clients opened the breaker: {}", String::from_utf8_lossy(&r.body));
    let m = metrics(&gw).await;
    assert_eq!(metric_value(&m, "b25_gateway_upstream_errors_total"), 0.0, "{m}");
    assert_eq!(metric_value(&m, "b25_gateway_outlier_ejections_total"), 0.0, "{m}");
    assert!(m.contains("b25_gateway_circuit_breaker_state{service=\"up\"} 0"), "{m}");
}
