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

fn auth(c: &mut Criterion) {
    use b25_gateway::config::security::{ApiKeyConfig, ApiKeysConfig, IssuerConfig, JwtConfig};
    use b25_gateway::config::{AuthConfig, Secret};
    let secret = "bench-secret-0123456789-0123456789-abcdef";
    let yaml_secret: Secret = serde_json::from_value(serde_json::json!(secret)).unwrap();
    let mut cfg = AuthConfig::default();
    let issuer = |cache| JwtConfig {
        issuers: vec![IssuerConfig {
            issuer: "b25-auth".into(),
            audiences: vec!["b25-gateway".into()],
            algorithms: vec!["HS256".into()],
            secret: Some(yaml_secret.clone()),
            public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh: HumanDuration::from_secs(300),
            jwks_min_refresh: HumanDuration::from_secs(10),
            jwks_timeout: HumanDuration::from_secs(2),
        }],
        leeway: HumanDuration::from_secs(5),
        max_token_size: b25_gateway::config::ByteSize::kib(8),
        roles_claim: "roles".into(),
        cache_size: cache,
        forward_token: true,
    };
    let now = jsonwebtoken::get_current_timestamp();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "u", "roles": ["viewer"], "iss": "b25-auth", "aud": "b25-gateway", "iat": now, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for (name, cache) in [("jwt/hs256_verify_cold", 0), ("jwt/hs256_verify_cached", 1000)] {
        cfg.jwt = Some(issuer(cache));
        let a = b25_gateway::auth::Authenticator::new(&cfg, None, &mut Vec::new());
        let v = a.jwt.clone().unwrap();
        c.bench_function(name, |b| b.iter(|| rt.block_on(v.verify(black_box(&token))).unwrap()));
    }
    cfg.jwt = None;
    cfg.api_keys = Some(ApiKeysConfig {
        header: "x-api-key".into(),
        keys: (0..10)
            .map(|i| ApiKeyConfig {
                id: format!("k{i}"),
                sha256: b25_gateway::auth::apikey::hash_hex(&format!("key-{i}")),
                roles: vec!["viewer".into()],
            })
            .collect(),
    });
    let a = b25_gateway::auth::Authenticator::new(&cfg, None, &mut Vec::new());
    let mut h = http::HeaderMap::new();
    h.insert("x-api-key", "key-7".parse().unwrap());
    let m = a.configured();
    c.bench_function("apikey/check_10_keys", |b| b.iter(|| rt.block_on(a.authenticate(black_box(&h), m)).unwrap()));
}

fn headers(c: &mut Criterion) {
    let mut base = http::HeaderMap::new();
    for (k, v) in [
        ("host", "gw.example"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("authorization", "Bearer abc"),
        ("connection", "keep-alive"),
        ("x-forwarded-for", "203.0.113.7"),
    ] {
        base.insert(k, v.parse().unwrap());
    }
    let peer = http::HeaderValue::from_static("127.0.0.1");
    c.bench_function("headers/rewrite_for_upstream", |b| {
        b.iter(|| {
            let mut h = base.clone();
            b25_gateway::proxy::headers::strip_hop_by_hop(&mut h);
            // What the proxied path does: the hop's own headers are computed, not inserted
            // (they are written into the upstream request head).
            let trace = b25_gateway::pipeline::trace::next_hop(&h, b25_gateway::proxy::headers::Seen::UNKNOWN);
            let hop = b25_gateway::proxy::h1::HopHeaders {
                forwarded_for: b25_gateway::proxy::headers::forwarded_for(
                    &h,
                    &peer,
                    b25_gateway::proxy::headers::Seen::UNKNOWN,
                ),
                forwarded_proto: "http",
                forwarded_host: h.get(http::header::HOST).cloned(),
                request_id: peer.clone(),
                traceparent: trace.parent,
                keep_tracestate: trace.keep_state,
                principal: [None; 3],
            };
            black_box((h, hop))
        })
    });
}

fn cache(c: &mut Criterion) {
    use b25_gateway::cache::{Lookup, ResponseCache, request};
    use b25_gateway::config::{CacheConfig, CacheScope, CacheStoreConfig};
    let store = ResponseCache::new(&CacheStoreConfig::default(), None);
    let cfg = CacheConfig { ttl: HumanDuration::from_secs(3600), scope: CacheScope::Public, statuses: vec![200] };
    let route: Arc<str> = "t".into();
    let h = http::HeaderMap::new();
    let host = http::HeaderValue::from_static("gw.example:8080");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let req = request(&route, &cfg, &Method::GET, "/api/v1/market/ticker/BTC", Some("b=2&a=1"), None, Some(&host), &h);
    rt.block_on(store.store(&req, 200, &h, &h, bytes::Bytes::from_static(b"{\"p\":1}")));
    c.bench_function("cache/key_and_hit", |b| {
        b.iter(|| {
            let path = black_box("/api/v1/market/ticker/BTC");
            let r = request(&route, &cfg, &Method::GET, path, Some("b=2&a=1"), None, Some(&host), &h);
            matches!(rt.block_on(store.lookup(&r, &h)), Lookup::Hit(_))
        })
    });
}

fn wire(c: &mut Criterion) {
    use b25_gateway::server::h1::{Settings, parse_request};
    let settings =
        Settings { header_timeout: std::time::Duration::from_secs(10), max_head: 64 * 1024, max_headers: 100 };
    // What wrk sends, plus a bearer token: a typical API request head.
    let head: &[u8] = b"GET /api/v1/market/ticker/BTCUSDT HTTP/1.1\r\nHost: gw.example:8080\r\nUser-Agent: bench/1.0\r\nAccept: application/json\r\nAuthorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl\r\nX-Request-Id: 0192f3a4-1b2c-7d3e-8f40-5a6b7c8d9e0f\r\n\r\n";
    c.bench_function("wire/parse_request_head", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(black_box(head));
            black_box(parse_request(&mut buf, &settings).unwrap().unwrap())
        })
    });
}

criterion_group!(benches, ratelimit, routing, auth, headers, cache, wire);
criterion_main!(benches);
