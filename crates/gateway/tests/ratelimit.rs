//! Rate limits over real sockets: GCRA exactness in memory, on one Redis and on a Redis
//! Cluster; one limit shared by two instances; client-IP keys and spoofed forwarding headers;
//! Redis killed mid-load; separate budgets for cancels; bounded memory.

mod support;

use http::Method;
use std::time::{Duration, Instant};
use support::*;

fn yaml(sim: &str, state: &str, rate_limits: &str, routes: &str, trusted: &str) -> String {
    let auth = test_auth_section();
    format!(
        r#"server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0", trusted_proxies: [{trusted}] }}
logging: {{ level: warn }}
{auth}{state}
rate_limits:
{rate_limits}
services:
  up: {{ instances: ["{sim}"], health_check: {{ enabled: false }} }}
routes:
{routes}"#
    )
}

const PUBLIC: &str = "  - { id: t, path: \"/api/v1/market/ticker/{s}\", methods: [GET], service: up, public: true }\n";
const ORDERS: &str = "  - { id: create, path: \"/api/v1/orders\", methods: [POST], service: up, roles: [operator], principal_rate_limit: { rate: 1, per: 10s, burst: 3 } }\n  - { id: cancel, path: \"/api/v1/orders/{id}\", methods: [DELETE], service: up, roles: [operator], principal_rate_limit: { rate: 1, per: 10s, burst: 3 } }\n";

/// Sends `n` requests back to back; returns (successes, elapsed, the 429 replies).
async fn burst(addr: std::net::SocketAddr, n: usize, headers: &[(&str, &str)]) -> (usize, Duration, Vec<Reply>) {
    let t0 = Instant::now();
    let mut ok = 0;
    let mut limited = Vec::new();
    for _ in 0..n {
        let r = send(addr, Method::GET, "/api/v1/market/ticker/X", headers, "").await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => limited.push(r),
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    (ok, t0.elapsed(), limited)
}

/// B successes plus at most what refilled during the run (rate N per second).
fn assert_exact(ok: usize, elapsed: Duration, n_per_s: f64, b: usize) {
    let refill = (elapsed.as_secs_f64() * n_per_s).ceil() as usize;
    assert!(ok >= b && ok <= b + refill, "{ok} successes, expected {b} (+ up to {refill} refilled in {elapsed:?})");
}

fn assert_429(r: &Reply) {
    r.assert_error(429, "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(r.headers.contains_key("ratelimit-limit"));
    assert_eq!(r.headers["ratelimit-remaining"], "0");
    assert!(r.headers.contains_key("ratelimit-reset"));
}

const N: u32 = 2;
const B: usize = 10;

fn per_ip() -> String {
    format!("  per_ip: {{ rate: {N}, per: 1s, burst: {B} }}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_exactness_in_memory() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&yaml(&sim.url(), "", &per_ip(), PUBLIC, ""), &[]).await;
    let (ok, elapsed, limited) = burst(gw.addr(), N as usize + B + 20, &[]).await;
    assert_exact(ok, elapsed, N as f64, B);
    assert_eq!(ok + limited.len(), N as usize + B + 20);
    assert_429(&limited[0]);
    assert_eq!(sim.hits() as usize, ok, "refused requests never reach the upstream");
    // Successful responses carry the tightest scope's headers too.
    let sim2 = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw2 = TestGateway::start(&yaml(&sim2.url(), "", &per_ip(), PUBLIC, ""), &[]).await;
    let r = get(gw2.addr(), "/api/v1/market/ticker/X").await;
    assert_eq!(r.status, 200);
    for (name, want) in [("ratelimit-limit", B.to_string()), ("ratelimit-remaining", (B - 1).to_string())] {
        let got: Vec<_> = r.headers.get_all(name).iter().collect();
        assert_eq!(got, [want.as_str()], "{name}");
    }
    let reset: u64 = r.headers["ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert!((1..=B as u64 / N as u64 + 1).contains(&reset), "reset {reset}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_exactness_on_redis() {
    let redis = RedisServer::start();
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let state = format!("state: {{ backend: redis, redis: {{ url: \"{}\", timeout: 200ms }} }}", redis.url());
    let gw = TestGateway::start(&yaml(&sim.url(), &state, &per_ip(), PUBLIC, ""), &[]).await;
    let (ok, elapsed, limited) = burst(gw.addr(), N as usize + B + 20, &[]).await;
    assert_exact(ok, elapsed, N as f64, B);
    assert_429(&limited[0]);
    // The state really is in Redis.
    let keys = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "keys", "b25gw:rl:*"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&keys.stdout).contains("b25gw:rl:ip:127.0.0.1"), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_exactness_on_redis_cluster() {
    let cluster = tokio::task::block_in_place(RedisCluster::start);
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let state = format!("state: {{ backend: redis, redis: {{ cluster: [{}], timeout: 500ms }} }}", nodes.join(", "));
    let gw = TestGateway::start(&yaml(&sim.url(), &state, &per_ip(), PUBLIC, ""), &[]).await;
    wait_for_redis(&gw).await;
    let (ok, elapsed, limited) = burst(gw.addr(), N as usize + B + 20, &[]).await;
    assert_exact(ok, elapsed, N as f64, B);
    assert_429(&limited[0]);
}

/// Waits until the gateway's Redis connection answers (the cluster connects in the background).
async fn wait_for_redis(gw: &TestGateway) {
    let redis = gw.handle.shared().redis.clone().unwrap();
    let rate = b25_gateway::ratelimit::gcra::Rate::new(&b25_gateway::config::LimitConfig {
        rate: 1000,
        per: b25_gateway::config::HumanDuration::from_secs(1),
        burst: Some(1000),
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if redis.check("probe", &rate).await.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "the gateway never reached Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_per_principal_limit() {
    let redis = RedisServer::start();
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let state = format!("state: {{ backend: redis, redis: {{ url: \"{}\", timeout: 200ms }} }}", redis.url());
    let limits = format!("  per_principal: {{ rate: {N}, per: 1s, burst: {B} }}");
    let route = "  - { id: t, path: \"/api/v1/market/ticker/{s}\", methods: [GET], service: up, roles: [viewer] }\n";
    let a = TestGateway::start(&yaml(&sim.url(), &state, &limits, route, ""), &[]).await;
    let b = TestGateway::start(&yaml(&sim.url(), &state, &limits, route, ""), &[]).await;
    let auth = bearer(&token(&["viewer"]));
    let t0 = Instant::now();
    let mut ok = 0;
    for i in 0..(2 * B + 10) {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = send(gw.addr(), Method::GET, "/api/v1/market/ticker/X", &[("authorization", &auth)], "").await;
        if r.status == 200 {
            ok += 1;
        } else {
            assert_429(&r);
        }
    }
    assert_exact(ok, t0.elapsed(), N as f64, B);
    // Another principal has its own budget.
    let other = bearer(&hs256(TEST_SECRET, &claims("someone-else", &["viewer"], serde_json::json!({}))));
    let r = send(a.addr(), Method::GET, "/api/v1/market/ticker/X", &[("authorization", &other)], "").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_forwarding_headers_do_not_change_the_ip_key() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let limits = "  per_ip: { rate: 1, per: 10s, burst: 3 }";
    // Untrusted peer: every spoofed header is ignored, the key stays 127.0.0.1.
    let gw = TestGateway::start(&yaml(&sim.url(), "", limits, PUBLIC, ""), &[]).await;
    let mut ok = 0;
    for i in 0..10 {
        let fake = format!("203.0.113.{i}");
        let r = send(
            gw.addr(),
            Method::GET,
            "/api/v1/market/ticker/X",
            &[("x-forwarded-for", &fake), ("x-real-ip", &fake), ("forwarded", &format!("for={fake}"))],
            "",
        )
        .await;
        ok += usize::from(r.status == 200);
    }
    assert_eq!(ok, 3);
    // From a trusted proxy the right-most untrusted X-Forwarded-For address is the key.
    let gw = TestGateway::start(&yaml(&sim.url(), "", limits, PUBLIC, "\"127.0.0.1/32\""), &[]).await;
    for i in 0..10 {
        let xff = format!("198.51.100.{i}, 127.0.0.1");
        let r = send(gw.addr(), Method::GET, "/api/v1/market/ticker/X", &[("x-forwarded-for", &xff)], "").await;
        assert_eq!(r.status, 200, "client {i} has its own budget");
    }
    let same = [("x-forwarded-for", "198.51.100.200")];
    let (ok, _, _) = burst(gw.addr(), 6, &same).await;
    assert_eq!(ok, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_have_their_own_budget() {
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&yaml(&sim.url(), "", "  headers: true", ORDERS, ""), &[]).await;
    let op = bearer(&token(&["operator"]));
    let h = [("authorization", op.as_str()), ("content-type", "application/json")];
    let body = r#"{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":1}"#;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(send(gw.addr(), Method::POST, "/api/v1/orders", &h, body).await.status.as_u16());
        }
        v
    };
    assert_eq!(statuses, [201, 201, 201, 429, 429]);
    // New orders are exhausted; cancels still go through.
    let r = send(gw.addr(), Method::DELETE, "/api/v1/orders/ord-1", &h, "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_falls_back_quickly_and_recovers() {
    let mut redis = RedisServer::start();
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let state = format!(
        "state: {{ backend: redis, redis: {{ url: \"{}\", timeout: 50ms, retry_interval: 200ms }} }}",
        redis.url()
    );
    // A slow refill keeps the key alive in Redis long enough to look at it (its TTL is the
    // time until the bucket is full again).
    let limits = "  per_ip: { rate: 1, per: 10s, burst: 1000 }\n  on_redis_error: local";
    let gw = TestGateway::start(&yaml(&sim.url(), &state, limits, PUBLIC, ""), &[]).await;
    for _ in 0..5 {
        assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200);
    }
    tokio::task::block_in_place(|| redis.kill());
    // While Redis is gone: every request answers within the Redis timeout plus a margin, and
    // the local limiter applies.
    for _ in 0..30 {
        let t0 = Instant::now();
        let r = get(gw.addr(), "/api/v1/market/ticker/X").await;
        let took = t0.elapsed();
        assert_eq!(r.status, 200);
        assert!(took < Duration::from_millis(50 + 250), "a request waited {took:?} on a dead Redis");
    }
    let m = String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/metrics").await.body).to_string();
    assert!(m.contains("b25_gateway_redis_errors_total"), "{m}");
    // Redis comes back: limits are shared through it again.
    tokio::task::block_in_place(|| redis.restart());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        get(gw.addr(), "/api/v1/market/ticker/X").await;
        let keys = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "keys", "b25gw:rl:*"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&keys.stdout).contains("b25gw:rl:ip:") {
            break;
        }
        assert!(Instant::now() < deadline, "limits never went back to Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_deny_or_allow() {
    let port = dead_port();
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let state = format!("state: {{ backend: redis, redis: {{ url: \"redis://127.0.0.1:{port}\", timeout: 50ms }} }}");
    let deny = TestGateway::start(
        &yaml(&sim.url(), &state, "  per_ip: { rate: 10, burst: 10 }\n  on_redis_error: deny", PUBLIC, ""),
        &[],
    )
    .await;
    get(deny.addr(), "/api/v1/market/ticker/X").await.assert_error(429, "rate_limited");
    let allow = TestGateway::start(
        &yaml(&sim.url(), &state, "  per_ip: { rate: 1, burst: 1 }\n  on_redis_error: allow", PUBLIC, ""),
        &[],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(allow.addr(), "/api/v1/market/ticker/X").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_100k_distinct_keys() {
    use b25_gateway::config::{HumanDuration, LimitConfig, RateLimitsConfig};
    let cfg = RateLimitsConfig {
        per_ip: Some(LimitConfig { rate: 10, per: HumanDuration::from_secs(1), burst: Some(10) }),
        max_keys: 10_000,
        ..Default::default()
    };
    let mut errors = Vec::new();
    let limiter = b25_gateway::ratelimit::RateLimiter::new(&cfg, &[], &mut errors);
    assert!(errors.is_empty());
    let metrics = b25_gateway::observe::Metrics::new();
    let route = b25_gateway::ratelimit::RouteLimits::default();
    let id: std::sync::Arc<str> = "r".into();
    for i in 0..100_000u32 {
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let mut t = None;
        limiter.check_anonymous(None, &metrics, ip, &id, &route, &mut t).await.unwrap();
    }
    assert!(limiter.tracked_keys() <= 10_000, "{} keys tracked", limiter.tracked_keys());
    assert!(limiter.tracked_keys() > 1_000, "the cache should still hold recent keys");
}
