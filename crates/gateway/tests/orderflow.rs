//! Response caching, idempotency keys and the trading halt, over real sockets (memory and a
//! real Redis shared by two instances).

mod support;

use http::Method;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use support::*;

/// The order routes and a publicly cached GET route (`/api/v1/orders/active`) with state in
/// the Redis at `redis`; `opts` is added to `state.redis`, `more` after the `state` section.
fn on_redis(up: &str, redis: &str, opts: &str, more: &str) -> String {
    let state = format!("state: {{ backend: redis, redis: {{ url: \"{redis}\", timeout: 300ms{opts} }} }}\n{more}");
    let routes = format!(
        "{ORDERS}  - {{ id: active, path: \"/api/v1/orders/active\", methods: [GET], service: up, roles: [viewer], cache: {{ ttl: 30s, scope: public }} }}\n"
    );
    yaml(up, &state, &routes)
}

fn yaml(up: &str, state: &str, routes: &str) -> String {
    let auth = test_auth_section();
    format!(
        r#"server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0" }}
logging: {{ level: warn }}
{auth}{state}
services:
  up: {{ instances: ["{up}"], health_check: {{ enabled: false }} }}
routes:
{routes}"#
    )
}

fn who(sub: &str) -> String {
    bearer(&hs256(TEST_SECRET, &claims(sub, &["viewer", "operator"], serde_json::json!({}))))
}

/// An upstream that answers with the principal it was told about, with a cache-friendly
/// `Cache-Control: max-age=60` (no `private`), and counts its hits.
async fn account_upstream(cache_control: &'static str) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let addr = upstream(move |req: http::Request<hyper::body::Incoming>| {
        let n = h.fetch_add(1, Ordering::SeqCst) + 1;
        let sub = req.headers().get("x-auth-subject").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        async move {
            http::Response::builder()
                .header("cache-control", cache_control)
                .header("content-type", "application/json")
                .body(full_body(format!(r#"{{"owner":"{sub}","n":{n}}}"#)))
                .unwrap()
        }
    })
    .await;
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_cache_never_serves_one_principal_to_another() {
    let (addr, hits) = account_upstream("max-age=60").await;
    let routes = "  - { id: bal, path: \"/api/v1/account/balance\", methods: [GET], service: up, roles: [viewer], cache: { ttl: 10s, scope: private } }\n";
    let gw = TestGateway::start(&yaml(&format!("http://{addr}"), "", routes), &[]).await;
    let (a, b) = (who("alice"), who("bob"));
    let ra = send(gw.addr(), Method::GET, "/api/v1/account/balance", &[("authorization", &a)], "").await;
    let rb = send(gw.addr(), Method::GET, "/api/v1/account/balance", &[("authorization", &b)], "").await;
    assert_eq!(ra.json()["owner"], "alice");
    assert_eq!(rb.json()["owner"], "bob", "bob got someone else's body");
    assert_eq!(rb.headers["x-cache"], "MISS");
    let ra2 = send(gw.addr(), Method::GET, "/api/v1/account/balance", &[("authorization", &a)], "").await;
    assert_eq!(ra2.headers["x-cache"], "HIT");
    assert_eq!(ra2.json()["owner"], "alice");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_cache_hit_ttl_single_flight_no_store_and_invalidation() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let routes = "  - { id: sym, path: \"/api/v1/market/symbols\", methods: [GET, HEAD], service: up, public: true, cache: { ttl: 400ms, scope: public } }\n";
    let gw = TestGateway::start(&yaml(&sim.url(), "", routes), &[]).await;
    let first = get(gw.addr(), "/api/v1/market/symbols").await;
    assert_eq!(first.headers["x-cache"], "MISS");
    let second = get(gw.addr(), "/api/v1/market/symbols").await;
    assert_eq!(second.headers["x-cache"], "HIT");
    assert!(second.headers.contains_key("age"));
    assert_eq!(second.body, first.body);
    assert_eq!(sim.hits(), 1);
    // HEAD is served from the GET entry.
    let head = send(gw.addr(), Method::HEAD, "/api/v1/market/symbols", &[], "").await;
    assert_eq!(head.headers["x-cache"], "HIT");
    // Client no-cache bypasses the lookup.
    let by = send(gw.addr(), Method::GET, "/api/v1/market/symbols", &[("cache-control", "no-cache")], "").await;
    assert_eq!(by.headers["x-cache"], "BYPASS");
    assert_eq!(sim.hits(), 2);
    // After the TTL: a miss again.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(get(gw.addr(), "/api/v1/market/symbols").await.headers["x-cache"], "MISS");
    assert_eq!(sim.hits(), 3);
    // Invalidation through the admin API.
    assert_eq!(get(gw.addr(), "/api/v1/market/symbols").await.headers["x-cache"], "HIT");
    let admin = gw.handle.admin_addr().unwrap();
    let r = send(admin, Method::POST, "/admin/cache/invalidate", &[], r#"{"route":"sym"}"#).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(get(gw.addr(), "/api/v1/market/symbols").await.headers["x-cache"], "MISS");
    send(admin, Method::POST, "/admin/cache/invalidate", &[], r#"{"prefix":"/api/v1/market"}"#).await;
    assert_eq!(get(gw.addr(), "/api/v1/market/symbols").await.headers["x-cache"], "MISS");
    send(admin, Method::POST, "/admin/cache/invalidate", &[], r#"{"all":true}"#).await;
    assert_eq!(get(gw.addr(), "/api/v1/market/symbols").await.headers["x-cache"], "MISS");
    assert_eq!(sim.hits(), 6);

    // 100 concurrent misses for one key: one upstream request.
    sim.knobs().set_latency(Duration::from_millis(200));
    send(admin, Method::POST, "/admin/cache/invalidate", &[], r#"{"all":true}"#).await;
    let before = sim.hits();
    let addr = gw.addr();
    let replies = futures_util::future::join_all((0..100).map(|_| get(addr, "/api/v1/market/symbols"))).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(sim.hits() - before, 1, "single flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_and_private_responses_are_not_cached_publicly() {
    for cc in ["no-store", "private, max-age=60"] {
        let (addr, hits) = account_upstream(cc).await;
        let routes = "  - { id: p, path: \"/api/v1/market/ticker/{s}\", methods: [GET], service: up, public: true, cache: { ttl: 10s, scope: public } }\n";
        let gw = TestGateway::start(&yaml(&format!("http://{addr}"), "", routes), &[]).await;
        for _ in 0..3 {
            let r = get(gw.addr(), "/api/v1/market/ticker/X").await;
            assert_eq!(r.headers["x-cache"], "MISS", "{cc}");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 3, "{cc} was cached");
    }
}

/// An upstream that answers with what it received about the client: `X-Forwarded-Host` and
/// every `X-Lang` and `Cookie` line (`|` between lines), with `Vary: X-Lang, Cookie` and a
/// cache-friendly `Cache-Control`; counts its hits.
async fn echo_upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let addr = upstream(move |req: http::Request<hyper::body::Incoming>| {
        h.fetch_add(1, Ordering::SeqCst);
        let lines =
            |n: &str| req.headers().get_all(n).iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>().join("|");
        let body = format!("host={} lang={} cookie={}", lines("x-forwarded-host"), lines("x-lang"), lines("cookie"));
        async move {
            http::Response::builder()
                .header("cache-control", "max-age=60")
                .header("vary", "X-Lang, Cookie")
                .body(full_body(body))
                .unwrap()
        }
    })
    .await;
    (addr, hits)
}

const ECHO_ROUTE: &str =
    "  - { id: e, path: \"/e/{x}\", methods: [GET], service: up, public: true, cache: { ttl: 30s, scope: public } }\n";

/// `X-Cache` and the body of a reply.
fn outcome(r: &Reply) -> (String, String) {
    (r.headers["x-cache"].to_str().unwrap().to_owned(), String::from_utf8_lossy(&r.body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_compares_every_line_of_a_repeated_header() {
    let (up, hits) = echo_upstream().await;
    let gw = TestGateway::start(&yaml(&format!("http://{up}"), "", ECHO_ROUTE), &[]).await;
    let addr = gw.addr();
    let lang = |langs: &'static [&'static str]| {
        let headers: Vec<_> = langs.iter().map(|l| ("x-lang", *l)).collect();
        async move { outcome(&send(addr, Method::GET, "/e/v", &headers, "").await) }
    };
    let body = |langs: &str| format!("host={addr} lang={langs} cookie=");
    assert_eq!(lang(&["en", "fr"]).await, ("MISS".into(), body("en|fr")));
    // Same first line, different second one: another variant (RFC 9111 §4.1).
    assert_eq!(lang(&["en", "de"]).await, ("MISS".into(), body("en|de")), "served another request's variant");
    assert_eq!(lang(&["en", "de"]).await, ("HIT".into(), body("en|de")));
    // The same field on one line is the same field.
    assert_eq!(lang(&["en, de"]).await, ("HIT".into(), body("en|de")));
    assert_eq!(lang(&["en"]).await.0, "MISS");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_select_the_variant_as_one_cookie() {
    let (up, hits) = echo_upstream().await;
    let gw = TestGateway::start(&yaml(&format!("http://{up}"), "", ECHO_ROUTE), &[]).await;
    let addr = gw.addr();
    let mut tx = h2c(addr).await;
    let mut h2 = async |crumbs: &[&str]| {
        let mut req = http::Request::get(format!("http://{addr}/e/c"));
        for c in crumbs {
            req = req.header("cookie", *c);
        }
        let resp = tx.send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
        let cache = resp.headers()["x-cache"].to_str().unwrap().to_owned();
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        (cache, String::from_utf8_lossy(&body).into_owned())
    };
    let body = |cookie: &str| format!("host={addr} lang= cookie={cookie}");
    // The upstream gets one Cookie line (RFC 9113 §8.2.3).
    let alice = h2(&["theme=dark", "session=ALICE-SECRET"]).await;
    assert_eq!(alice, ("MISS".into(), body("theme=dark; session=ALICE-SECRET")));
    let bob = h2(&["theme=dark", "session=BOB"]).await;
    assert_eq!(bob, ("MISS".into(), body("theme=dark; session=BOB")), "bob was served alice's response");
    // Bob's crumbs, then the same cookie on one HTTP/1.1 line: his entry.
    assert_eq!(h2(&["theme=dark", "session=BOB"]).await.0, "HIT");
    let one_line = send(addr, Method::GET, "/e/c", &[("cookie", "theme=dark; session=BOB")], "").await;
    assert_eq!(outcome(&one_line), ("HIT".into(), body("theme=dark; session=BOB")));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// GET `path` on a fresh HTTP/1.1 connection with `host` as its `Host` (not the gateway's
/// address, as [`send`] gives) and `headers`.
async fn get_at(addr: std::net::SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut tx = h1(addr).await;
    let mut req = http::Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tx.send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

async fn get_for_host(addr: std::net::SocketAddr, path: &str, host: &str) -> (String, String) {
    outcome(&get_at(addr, host, path, &[]).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_forwarded_upstream_is_part_of_the_cache_key() {
    let (up, hits) = echo_upstream().await;
    let gw = TestGateway::start(&yaml(&format!("http://{up}"), "", ECHO_ROUTE), &[]).await;
    let addr = gw.addr();
    let body = |host: &str| format!("host={host} lang= cookie=");
    // An attacker's Host reaches the upstream as X-Forwarded-Host ...
    assert_eq!(get_for_host(addr, "/e/h", "evil.example").await, ("MISS".into(), body("evil.example")));
    // ... and its response is never served for another host.
    assert_eq!(get_for_host(addr, "/e/h", "gw.example").await, ("MISS".into(), body("gw.example")), "poisoned");
    // Host names are case-insensitive: one entry per host.
    assert_eq!(get_for_host(addr, "/e/h", "GW.Example").await, ("HIT".into(), body("gw.example")));
    assert_eq!(get_for_host(addr, "/e/h", "evil.example").await, ("HIT".into(), body("evil.example")));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_cache_control_directives_bypass_in_any_case() {
    let (up, hits) = echo_upstream().await;
    let gw = TestGateway::start(&yaml(&format!("http://{up}"), "", ECHO_ROUTE), &[]).await;
    let addr = gw.addr();
    let with = |name: &'static str, value: &'static str| async move {
        send(addr, Method::GET, "/e/cc", &[(name, value)], "").await.headers["x-cache"].to_str().unwrap().to_owned()
    };
    assert_eq!(get(addr, "/e/cc").await.headers["x-cache"], "MISS");
    for cc in ["No-Cache", "NO-STORE", "max-age=0, No-Cache", "no-cache"] {
        assert_eq!(with("cache-control", cc).await, "BYPASS", "{cc}");
    }
    assert_eq!(with("pragma", "No-Cache").await, "BYPASS");
    // A directive is matched by name, not as a substring.
    for cc in ["x-no-cache-foo", "max-age=0", "foo=no-cache"] {
        assert_eq!(with("cache-control", cc).await, "HIT", "{cc}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 6);
}

const ORDERS: &str = "  - { id: create, path: \"/api/v1/orders\", methods: [POST], service: up, roles: [operator], json: true, idempotency: { required: true, ttl: 1h }, halt: block }\n  - { id: cancel, path: \"/api/v1/orders/{id}\", methods: [DELETE], service: up, roles: [operator], halt: allow }\n  - { id: get, path: \"/api/v1/orders/{id}\", methods: [GET], service: up, roles: [viewer] }\n  - { id: stop, path: \"/api/v1/risk/emergency-stop\", methods: [POST], service: up, roles: [operator], engage_halt: true }\n";

fn order(id: &str) -> String {
    format!(r#"{{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":100,"client_order_id":"{id}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_replays_conflicts_and_mismatches() {
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&yaml(&sim.url(), "", ORDERS), &[]).await;
    let op = who("trader-1");
    let h = |key: &'static str| {
        [("authorization", op.clone()), ("content-type", "application/json".into()), ("idempotency-key", key.into())]
    };
    let post = |key: &'static str, body: String| {
        let hs = h(key);
        let addr = gw.addr();
        async move {
            let refs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send(addr, Method::POST, "/api/v1/orders", &refs, body).await
        }
    };
    let first = post("k-1", order("c1")).await;
    assert_eq!(first.status, 201);
    let again = post("k-1", order("c1")).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body, "identical response");
    assert_eq!(sim.hits(), 1);
    post("k-1", order("other")).await.assert_error(422, "idempotency_key_reused");
    // Missing key on a route that requires one.
    let refs = [("authorization", op.as_str()), ("content-type", "application/json")];
    send(gw.addr(), Method::POST, "/api/v1/orders", &refs, order("x")).await.assert_error(400, "bad_request");
    // Two keys (a new one and one already used): refused, nothing sent upstream, no key taken.
    for second in ["k-1", "k-9"] {
        let refs = [
            ("authorization", op.as_str()),
            ("content-type", "application/json"),
            ("idempotency-key", "k-8"),
            ("idempotency-key", second),
        ];
        let r = send(gw.addr(), Method::POST, "/api/v1/orders", &refs, order("two-keys")).await;
        r.assert_error(400, "bad_request");
        assert!(String::from_utf8_lossy(&r.body).contains("more than one Idempotency-Key"));
    }
    assert_eq!(sim.hits(), 1, "an order with two keys reached the upstream");
    assert_eq!(post("k-8", order("c8")).await.status, 201, "the refused request took its first key");
    assert_eq!(sim.hits(), 2);
    // 20 at once: one reaches the upstream, the others get 409 or the replay.
    sim.knobs().set_latency(Duration::from_millis(150));
    let replies = futures_util::future::join_all((0..20).map(|_| post("k-2", order("c2")))).await;
    let created = replies.iter().filter(|r| r.status == 201).count();
    let conflicts = replies.iter().filter(|r| r.status == 409).count();
    assert_eq!(created + conflicts, 20, "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(created >= 1);
    assert_eq!(sim.hits(), 3, "the concurrent duplicates reached the upstream");
    assert_eq!(sim.orders().iter().filter(|o| o["client_order_id"] == "c2").count(), 1);
    // Another principal's key space is separate.
    let other = who("trader-2");
    let refs = [("authorization", other.as_str()), ("content-type", "application/json"), ("idempotency-key", "k-1")];
    assert_eq!(send(gw.addr(), Method::POST, "/api/v1/orders", &refs, order("c3")).await.status, 201);
    // Four keys are held: k-1, k-8 and k-2 of trader-1, k-1 of trader-2.
    let stats = get(gw.handle.admin_addr().unwrap(), "/admin/stats").await;
    let stats: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
    assert_eq!(stats["idempotency_records"], 4, "{stats}");
}

/// With Redis, an instance that has not read the shared halt yet (Redis down at its start, or
/// still connecting) refuses orders rather than take them during a halt another instance
/// engaged; once it has read Redis, the stored state (or the config's, when none) applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_blocks_orders_until_it_has_read_the_shared_halt() {
    let port = dead_port();
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let state = format!(
        "state: {{ backend: redis, redis: {{ url: \"redis://127.0.0.1:{port}\", timeout: 50ms, retry_interval: 50ms }} }}\n"
    );
    let routes = "  - { id: create, path: \"/api/v1/orders\", methods: [POST], service: up, roles: [operator], json: true, halt: block }\n  - { id: get, path: \"/api/v1/orders/{id}\", methods: [GET], service: up, roles: [viewer] }\n";
    let gw = TestGateway::start(&yaml(&sim.url(), &state, routes), &[]).await;
    let op = who("trader-1");
    let post = |id: &'static str| {
        let (addr, op) = (gw.addr(), op.clone());
        async move {
            let h = [("authorization", op.as_str()), ("content-type", "application/json")];
            send(addr, Method::POST, "/api/v1/orders", &h, order(id)).await
        }
    };
    post("early").await.assert_error(503, "trading_halted");
    assert_eq!(sim.hits(), 0, "an order went out before the shared halt was known");
    let read = send(gw.addr(), Method::GET, "/api/v1/orders/1", &[("authorization", op.as_str())], "").await;
    assert_ne!(read.status, 503, "reads are not held back");
    // Redis comes up holding no halt: the config's state (not halted) applies at the first read.
    let _redis = RedisServer::start_with(port, &[]);
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = post("later").await;
        if r.status == 201 {
            break;
        }
        r.assert_error(503, "trading_halted");
        assert!(std::time::Instant::now() < until, "orders still refused after Redis came up");
        tokio::task::yield_now().await;
    }
}

/// Subjects and keys may contain `:`: one principal's key must never name another's record,
/// in memory or in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_records_of_principals_with_colons_never_meet() {
    let redis = RedisServer::start();
    for state in [String::new(), format!("state: {{ backend: redis, redis: {{ url: \"{}\" }} }}\n", redis.url())] {
        let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let gw = TestGateway::start(&yaml(&sim.url(), &state, ORDERS), &[]).await;
        let post = |sub: &str, key: &str, id: &str| {
            let auth = who(sub);
            let (key, body, addr) = (key.to_string(), order(id), gw.addr());
            async move {
                let h =
                    [("authorization", auth.as_str()), ("content-type", "application/json"), ("idempotency-key", &key)];
                send(addr, Method::POST, "/api/v1/orders", &h, body).await
            }
        };
        assert_eq!(post("urn:acct", "k9", "first").await.status, 201);
        for (sub, key) in [("urn", "acct:k9"), ("urn:", "acct:k9"), ("urn:acct:k9", "x"), ("8.urn:acct", "k9")] {
            let r = post(sub, key, &format!("{sub}/{key}")).await;
            assert_eq!(r.status, 201, "{sub} {key}: {state}");
            assert!(
                !r.headers.contains_key("idempotent-replayed"),
                "{sub} {key} got another principal's order: {state}"
            );
        }
        assert_eq!(sim.hits(), 5, "{state}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_fails_closed_when_redis_is_down() {
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let state =
        format!("state: {{ backend: redis, redis: {{ url: \"redis://127.0.0.1:{}\", timeout: 50ms }} }}", dead_port());
    // (No `halt: block` here: with Redis down the unread shared halt would refuse the order first.)
    let gw = TestGateway::start(&yaml(&sim.url(), &state, &ORDERS.replace(", halt: block", "")), &[]).await;
    let op = who("trader-1");
    let refs = [("authorization", op.as_str()), ("content-type", "application/json"), ("idempotency-key", "k")];
    send(gw.addr(), Method::POST, "/api/v1/orders", &refs, order("c"))
        .await
        .assert_error(503, "idempotency_unavailable");
    assert_eq!(sim.hits(), 0, "an order went out without its deduplication");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_cache_and_idempotency_through_redis() {
    let redis = RedisServer::start();
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let config = on_redis(&sim.url(), &redis.url(), "", "");
    let a = TestGateway::start(&config, &[]).await;
    let b = TestGateway::start(&config, &[]).await;
    let v = who("viewer-1");
    // Behind one load balancer both instances see the same Host (part of the key).
    let active = async |gw: &TestGateway| {
        get_at(gw.addr(), "api.b25.example", "/api/v1/orders/active", &[("authorization", &v)]).await
    };
    let ra = active(&a).await;
    assert_eq!(ra.headers["x-cache"], "MISS");
    let rb = active(&b).await;
    assert_eq!(rb.headers["x-cache"], "HIT", "instance b did not see a's cache entry");
    assert_eq!(rb.body, ra.body);
    let op = who("trader-1");
    let refs = [("authorization", op.as_str()), ("content-type", "application/json"), ("idempotency-key", "shared-1")];
    let first = send(a.addr(), Method::POST, "/api/v1/orders", &refs, order("s1")).await;
    assert_eq!(first.status, 201);
    let second = send(b.addr(), Method::POST, "/api/v1/orders", &refs, order("s1")).await;
    assert_eq!(second.status, 201);
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert_eq!(second.body, first.body);
    assert_eq!(sim.orders().iter().filter(|o| o["client_order_id"] == "s1").count(), 1);
    // The trading halt is shared too (within the sync interval).
    let r = send(
        a.handle.admin_addr().unwrap(),
        Method::POST,
        "/admin/halt",
        &[],
        r#"{"halted":true,"by":"test","reason":"drill"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let refs2 = [("authorization", op.as_str()), ("content-type", "application/json"), ("idempotency-key", "shared-2")];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = send(b.addr(), Method::POST, "/api/v1/orders", &refs2, order("s2")).await;
        if r.status == 503 {
            r.assert_error(503, "trading_halted");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the halt never reached instance b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One invalidation call reaches every instance: b's own memory copy is not served after a's
/// call (the marker is shared through Redis), nor by an instance started after the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_invalidation_on_one_instance_reaches_every_instance_through_redis() {
    let redis = RedisServer::start();
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let state = format!("state: {{ backend: redis, redis: {{ url: \"{}\", timeout: 300ms }} }}", redis.url());
    let routes = "  - { id: sym, path: \"/api/v1/market/symbols\", methods: [GET], service: up, public: true, cache: { ttl: 1h, scope: public } }\n  - { id: tick, path: \"/api/v1/market/ticker/{symbol}\", methods: [GET], service: up, public: true, cache: { ttl: 1h, scope: public } }\n";
    let config = yaml(&sim.url(), &state, routes);
    let a = TestGateway::start(&config, &[]).await;
    let b = TestGateway::start(&config, &[]).await;
    let at = async |gw: &TestGateway, path: &str| get_at(gw.addr(), "api.b25.example", path, &[]).await;
    let until_miss = async |gw: &TestGateway, path: &str, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = at(gw, path).await;
            assert_eq!(r.status, 200);
            if r.headers["x-cache"] == "MISS" {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: still served from cache");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Each kind of marker: b holds its own copy in memory (stored by b), a reads it from Redis.
    for (path, body) in [
        ("/api/v1/market/symbols", r#"{"route":"sym"}"#),
        ("/api/v1/market/ticker/BTCUSDT", r#"{"prefix":"/api/v1/market/ticker/"}"#),
        ("/api/v1/market/symbols", r#"{"all":true}"#),
    ] {
        at(&b, path).await;
        assert_eq!(at(&b, path).await.headers["x-cache"], "HIT", "{body}");
        assert_eq!(at(&a, path).await.headers["x-cache"], "HIT", "{body}: a did not see b's entry");
        let r = send(a.handle.admin_addr().unwrap(), Method::POST, "/admin/cache/invalidate", &[], body).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["shared"], true, "{body}");
        // b stops serving its memory copy within the sync interval (a is not asked first: its
        // fresh entry, shared through Redis, would be a legitimate hit for b).
        until_miss(&b, path, body).await;
    }
    // An instance started after the call does not serve an entry Redis still holds (a key on a
    // Redis Cluster node the call's SCAN did not reach: put back here by hand).
    assert_eq!(at(&b, "/api/v1/market/symbols").await.headers["x-cache"], "HIT");
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*:c:GET sym *").query(&mut con).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let dump: Vec<u8> = redis::cmd("DUMP").arg(&keys[0]).query(&mut con).unwrap();
    let r =
        send(b.handle.admin_addr().unwrap(), Method::POST, "/admin/cache/invalidate", &[], r#"{"route":"sym"}"#).await;
    assert_eq!(r.json()["shared"], true);
    assert_eq!(r.json()["redis_keys_deleted"], 1);
    redis::cmd("RESTORE").arg(&keys[0]).arg(0).arg(dump).query::<()>(&mut con).unwrap();
    let c = TestGateway::start(&config, &[]).await;
    assert_eq!(at(&c, "/api/v1/market/symbols").await.headers["x-cache"], "MISS", "c served an invalidated entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trading_halt_blocks_new_orders_only_and_emergency_stop_engages_it() {
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let risk = b25_sim::start(b25_sim::Service::RiskManager, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let config = yaml(
        &sim.url(),
        "",
        &ORDERS.replace(
            "id: stop, path: \"/api/v1/risk/emergency-stop\", methods: [POST], service: up",
            "id: stop, path: \"/api/v1/risk/emergency-stop\", methods: [POST], service: risk",
        ),
    )
    .replace(
        "routes:\n",
        &format!("  risk: {{ instances: [\"{}\"], health_check: {{ enabled: false }} }}\nroutes:\n", risk.url()),
    );
    let gw = TestGateway::start(&config, &[]).await;
    let admin = gw.handle.admin_addr().unwrap();
    let op = who("trader-1");
    let post = |key: &'static str| {
        let op = op.clone();
        let addr = gw.addr();
        async move {
            let refs = [("authorization", op.as_str()), ("content-type", "application/json"), ("idempotency-key", key)];
            send(addr, Method::POST, "/api/v1/orders", &refs, order(key)).await
        }
    };
    assert_eq!(post("h1").await.status, 201);
    let r = send(admin, Method::POST, "/admin/halt", &[], r#"{"halted":true,"by":"risk-desk","reason":"drill"}"#).await;
    assert_eq!(r.json()["halted"], true);
    assert_eq!(r.json()["by"], "risk-desk");
    let hits = sim.hits();
    post("h2").await.assert_error(503, "trading_halted");
    assert_eq!(sim.hits(), hits, "a blocked order reached the upstream");
    let auth = [("authorization", op.as_str())];
    assert_eq!(
        send(gw.addr(), Method::DELETE, "/api/v1/orders/ord-1", &auth, "").await.status,
        200,
        "cancels still work"
    );
    assert_eq!(send(gw.addr(), Method::GET, "/api/v1/orders/ord-1", &auth, "").await.status, 200, "reads still work");
    let m = String::from_utf8_lossy(&get(admin, "/metrics").await.body).to_string();
    assert!(m.contains("b25_gateway_trading_halted 1"), "{m}");
    // Lifting it restores order flow.
    send(admin, Method::POST, "/admin/halt", &[], r#"{"halted":false,"by":"risk-desk","reason":"drill over"}"#).await;
    assert_eq!(post("h3").await.status, 201);
    // A successful emergency stop through the gateway engages it.
    let r = send(gw.addr(), Method::POST, "/api/v1/risk/emergency-stop", &[("authorization", op.as_str())], "").await;
    assert!(r.status.is_success(), "{}", r.status);
    assert_eq!(get(admin, "/admin/halt").await.json()["halted"], true);
    post("h4").await.assert_error(503, "trading_halted");
}

/// A Redis that refuses one command (out of memory on a cache write) is not an outage: the
/// idempotency record still in Redis is replayed, not answered 503 for `retry_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_cache_write_does_not_switch_off_the_shared_state() {
    let redis = RedisServer::start();
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(&on_redis(&sim.url(), &redis.url(), ", retry_interval: 1h", ""), &[]).await;
    let op = who("trader-1");
    let refs = [("authorization", op.as_str()), ("content-type", "application/json"), ("idempotency-key", "oom-1")];
    assert_eq!(send(gw.addr(), Method::POST, "/api/v1/orders", &refs, order("m1")).await.status, 201);
    // Redis is now full and refuses writes.
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("SET").arg("filler").arg(vec![b'x'; 2 << 20]).query::<()>(&mut con).unwrap();
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1mb").query::<()>(&mut con).unwrap();
    let r = send(gw.addr(), Method::GET, "/api/v1/orders/active", &[("authorization", &op)], "").await;
    assert_eq!(r.status, 200, "a cache write Redis refused is no error for the client");
    let again = send(gw.addr(), Method::POST, "/api/v1/orders", &refs, order("m1")).await;
    assert_eq!(again.status, 201, "{}", String::from_utf8_lossy(&again.body));
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(sim.orders().iter().filter(|o| o["client_order_id"] == "m1").count(), 1);
}

/// Redis's memory policy is re-read every sync interval: a Redis switched to evicting at run
/// time (`CONFIG SET`) stops getting cache entries, and gets them again once switched back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_policy_changed_at_run_time_is_noticed() {
    let redis = RedisServer::start_with(dead_port(), &[]);
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let config = on_redis(&sim.url(), &redis.url(), "", "trading: { halt_sync_interval: 20ms }");
    let gw = TestGateway::start(&config, &[]).await;
    let v = who("viewer-1");
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let mut n = 0;
    // A fresh (uncached) URL each time; true when its entry went to Redis.
    let mut shared_entry = async |con: &mut redis::Connection| {
        n += 1;
        let r = get_at(gw.addr(), "api.b25.example", &format!("/api/v1/orders/active?n={n}"), &[("authorization", &v)])
            .await;
        assert_eq!(r.headers["x-cache"], "MISS");
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("*:c:*n={n}*")).query(con).unwrap();
        !keys.is_empty()
    };
    assert!(shared_entry(&mut con).await, "a noeviction Redis gets cache entries");
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("64mb").query::<()>(&mut con).unwrap();
    redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("allkeys-lru").query::<()>(&mut con).unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while shared_entry(&mut con).await {
        assert!(std::time::Instant::now() < until, "cache entries still written to an evicting Redis");
    }
    // Once noticed, every later miss stays out of Redis.
    for _ in 0..3 {
        assert!(!shared_entry(&mut con).await, "a cache entry written to an evicting Redis");
    }
    redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query::<()>(&mut con).unwrap();
    while !shared_entry(&mut con).await {
        assert!(std::time::Instant::now() < until, "cache entries never shared again after noeviction");
    }
}

/// A Redis that evicts keys when full gets no response-cache entries (they would push out
/// idempotency records and the halt), and a halt whose key Redis lost is written back by an
/// instance that holds it, so an instance started afterwards starts halted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_gets_no_cache_entries_and_a_lost_halt_is_written_back() {
    let redis = RedisServer::start_with(dead_port(), &["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    let sim = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let config = on_redis(&sim.url(), &redis.url(), "", "trading: { halt_sync_interval: 20ms }");
    let a = TestGateway::start(&config, &[]).await;
    let v = who("viewer-1");
    let r = get_at(a.addr(), "api.b25.example", "/api/v1/orders/active", &[("authorization", &v)]).await;
    assert_eq!(r.headers["x-cache"], "MISS");
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let cached: Vec<String> = redis::cmd("KEYS").arg("*:c:*").query(&mut con).unwrap();
    assert!(cached.is_empty(), "cache entries written to an evicting Redis: {cached:?}");
    // The halt, engaged on a, then lost by Redis (evicted, flushed, restarted empty).
    let admin = a.handle.admin_addr().unwrap();
    let r = send(admin, Method::POST, "/admin/halt", &[], r#"{"halted":true,"by":"desk","reason":"incident"}"#).await;
    assert_eq!(r.status, 200);
    redis::cmd("FLUSHALL").query::<()>(&mut con).unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while redis::cmd("EXISTS").arg("b25gw:halt:state").query::<u32>(&mut con).unwrap() == 0 {
        assert!(std::time::Instant::now() < until, "the halt was never written back");
        tokio::task::yield_now().await;
    }
    let b = TestGateway::start(&config, &[]).await;
    let op = who("trader-1");
    let refs = [("authorization", op.as_str()), ("content-type", "application/json"), ("idempotency-key", "h-1")];
    send(b.addr(), Method::POST, "/api/v1/orders", &refs, order("h1")).await.assert_error(503, "trading_halted");
    assert_eq!(get(b.handle.admin_addr().unwrap(), "/admin/halt").await.json()["by"], "desk");
    assert!(sim.orders().is_empty());
}
