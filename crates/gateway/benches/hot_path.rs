//! Micro-benchmarks of hot-path pieces (criterion). Run: `cargo bench -p b25-gateway`.
//! Figures are reported in bench/RESULTS.md and the issue closing notes.

use b25_gateway::config::{HumanDuration, LimitConfig, RateLimitsConfig};
use b25_gateway::observe::Metrics;
use b25_gateway::pipeline::normalize::normalize;
use b25_gateway::ratelimit::{RateLimiter, RouteLimits};
use b25_gateway::router::{RouteSpec, RouteTable};
use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

fn ratelimit(c: &mut Criterion) {
    let cfg = RateLimitsConfig {
        per_ip: Some(LimitConfig { rate: 1_000_000_000, per: HumanDuration::from_secs(1), burst: Some(1_000_000) }),
        ..Default::default()
    };
    let limiter = RateLimiter::new(&cfg, &[], &mut Vec::new());
    let metrics = Metrics::new();
    let route = RouteLimits::default();
    let id: Arc<str> = "r".into();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    c.bench_function("ratelimit/per_ip_memory_check", |b| {
        b.iter(|| {
            let mut t = None;
            rt.block_on(limiter.check_anonymous(None, &metrics, black_box(ip), &id, &route, &mut t)).unwrap();
            black_box(t)
        })
    });
    let budget = b25_gateway::ratelimit::gcra::Rate::new(&LimitConfig {
        rate: 1_000_000_000,
        per: HumanDuration::from_secs(1),
        burst: Some(1_000_000),
    });
    let tat = std::sync::atomic::AtomicU64::new(0);
    let mut now = 1_000_000_000_000u64;
    c.bench_function("ratelimit/gcra_atomic_check", |b| {
        b.iter(|| {
            now += 10;
            black_box(b25_gateway::ratelimit::gcra::check(&tat, black_box(now), &budget))
        })
    });
}

fn routing(c: &mut Criterion) {
    let templates = [
        "/api/v1/market/symbols",
        "/api/v1/market/orderbook/{symbol}",
        "/api/v1/market/ticker/{symbol}",
        "/api/v1/orders",
        "/api/v1/orders/active",
        "/api/v1/orders/{id}",
        "/api/v1/strategies/{id}/status",
        "/api/v1/account/balance",
        "/api/v1/risk/emergency-stop",
        "/api/v1/config/{key}",
    ];
    let table = RouteTable::build(templates.iter().enumerate().map(|(i, t)| RouteSpec {
        config_path: format!("routes[{i}]"),
        id: t,
        template: t,
        methods: vec![Method::GET],
        value: i,
    }))
    .unwrap();
    c.bench_function("router/match_param_route", |b| {
        b.iter(|| {
            matches!(
                table.lookup(&Method::GET, black_box("/api/v1/orders/ord-12345")),
                b25_gateway::router::Match::Found { .. }
            )
        })
    });
    c.bench_function("normalize/clean_path", |b| {
        b.iter(|| normalize(black_box("/api/v1/market/ticker/BTCUSDT")).is_ok())
    });
    c.bench_function("normalize/percent_decoded_path", |b| {
        b.iter(|| normalize(black_box("/api/v1/%6Darket/ticker/BTCUSDT")).is_ok())
    });
}

criterion_group!(benches, ratelimit, routing);
criterion_main!(benches);
