//! Operations: hot reload under load (routes added and removed, a WebSocket kept open), an
//! invalid reload refused and reported, a TLS certificate replaced by a reload, W3C trace
//! context and Server-Timing.

mod support;

use futures_util::{SinkExt, StreamExt};
use http::Method;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use support::*;

fn cfg_text(sim: &str, dash: &str, extra_route: bool, tls: &str) -> String {
    let extra = if extra_route {
        "  - { id: extra, path: \"/api/v1/market/trades/{s}\", methods: [GET], service: md, public: true }\n"
    } else {
        ""
    };
    let auth = test_auth_section();
    format!(
        r#"server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0"{tls} }}
logging: {{ level: warn }}
{auth}services:
  md: {{ instances: ["{sim}"], health_check: {{ enabled: false }} }}
  dash: {{ instances: ["{dash}"], health_check: {{ enabled: false }} }}
routes:
  - {{ id: t, path: "/api/v1/market/ticker/{{s}}", methods: [GET], service: md, public: true }}
  - {{ id: ws, path: /ws, methods: [GET], service: dash, roles: [viewer], websocket: true }}
{extra}"#
    )
}

async fn start_from_file(file: &std::path::Path) -> b25_gateway::server::GatewayHandle {
    let cfg = b25_gateway::config::load(file).unwrap_or_else(|e| panic!("{e}"));
    let h = b25_gateway::server::start(cfg, &file.display().to_string()).await.unwrap();
    h.ready().await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_drop_nothing() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dash = b25_sim::start(b25_sim::Service::Dashboard, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = temp_dir("reload");
    let file = dir.join("gw.yaml");
    std::fs::write(&file, cfg_text(&sim.url(), &dash.url(), false, "")).unwrap();
    let gw = start_from_file(&file).await;
    let addr = gw.addr();
    // A WebSocket opened before the reloads.
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/ws"))
            .unwrap();
    req.headers_mut().insert("authorization", bearer(&token(&["viewer"])).parse().unwrap());
    let (mut ws, _) =
        tokio_tungstenite::client_async(req, tokio::net::TcpStream::connect(addr).await.unwrap()).await.unwrap();
    // Continuous traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
        tokio::spawn(async move {
            let mut tx = h1::<http_body_util::Empty<bytes::Bytes>>(addr).await;
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get("/api/v1/market/ticker/X")
                    .header("host", "gw")
                    .body(http_body_util::Empty::new())
                    .unwrap();
                match tx.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        tx = h1(addr).await;
                    }
                }
            }
        })
    };
    for i in 0..20 {
        let with_extra = i % 2 == 0;
        std::fs::write(&file, cfg_text(&sim.url(), &dash.url(), with_extra, "")).unwrap();
        gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
        let r = get(addr, "/api/v1/market/trades/X").await;
        assert_eq!(r.status, if with_extra { 200 } else { 404 }, "reload {i}: the route table did not change");
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(bad.load(Ordering::Relaxed), 0, "a request failed during the reloads");
    ws.send(tokio_tungstenite::tungstenite::Message::text("still here")).await.unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        if m.to_text().unwrap() == "still here" {
            break;
        }
    }
    let m = String::from_utf8_lossy(&get(gw.admin_addr().unwrap(), "/metrics").await.body).to_string();
    assert!(m.contains("b25_gateway_config_reloads_total{outcome=\"success\"} 20"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_old_config_and_says_so() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = temp_dir("badreload");
    let file = dir.join("gw.yaml");
    std::fs::write(&file, cfg_text(&sim.url(), &sim.url(), true, "")).unwrap();
    let gw = start_from_file(&file).await;
    std::fs::write(&file, "services: { md: { instances: [\"ftp://x\"] } }\nroutes: [ { id: t, path: /x, methods: [GET], service: nope, public: true } ]\n").unwrap();
    let admin = gw.admin_addr().unwrap();
    let r = send(admin, Method::POST, "/admin/reload", &[], "").await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["status"], "failure");
    assert!(r.json()["errors"].to_string().contains("unknown service"), "{}", r.json());
    assert_eq!(get(gw.addr(), "/api/v1/market/trades/X").await.status, 200, "the old config still serves");
    assert_eq!(get(admin, "/admin/reload").await.json()["status"], "failure");
    let m = String::from_utf8_lossy(&get(admin, "/metrics").await.body).to_string();
    assert!(m.contains("b25_gateway_config_reloads_total{outcome=\"failure\"} 1"), "{m}");
    // The admin API shows the running config, secrets redacted.
    let c = get(admin, "/admin/config").await;
    assert!(!String::from_utf8_lossy(&c.body).contains(TEST_SECRET));
    assert!(String::from_utf8_lossy(&c.body).contains("<redacted>"));
    assert_eq!(get(admin, "/admin/routes").await.json()["routes"].as_array().unwrap().len(), 3);
    assert!(get(admin, "/admin/services").await.json()["services"]["md"]["circuit_breaker"].is_string());
}

/// Where shared state lives is set up at start: a reload that changes `state` is refused (and
/// says to restart) instead of being reported as applied while nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_moves_shared_state_is_refused_and_says_to_restart() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = temp_dir("statereload");
    let file = dir.join("gw.yaml");
    let text = cfg_text(&sim.url(), &sim.url(), false, "");
    std::fs::write(&file, &text).unwrap();
    let gw = start_from_file(&file).await;
    let moved = text.replacen(
        "services:",
        &format!("state: {{ backend: redis, redis: {{ url: \"redis://127.0.0.1:{}\" }} }}\nservices:", dead_port()),
        1,
    );
    std::fs::write(&file, moved).unwrap();
    let admin = gw.admin_addr().unwrap();
    let r = send(admin, Method::POST, "/admin/reload", &[], "").await;
    assert_eq!(r.status, 422);
    assert!(r.json()["errors"].to_string().contains("restart"), "{}", r.json());
    assert_eq!(get(admin, "/admin/config").await.json()["state"]["backend"], "memory", "the running config stays");
    assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200);
}

/// The other settings read once at start (TLS on or off, the protocols, timers, the log
/// subscriber, the watcher): a reload that changes one is refused, names it and says to
/// restart; the running config and listener stay as they were (plain HTTP stays plain HTTP,
/// and `/admin/config` does not claim TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_setting_read_at_start_is_refused_by_name() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = temp_dir("startonly");
    let file = dir.join("gw.yaml");
    let text = cfg_text(&sim.url(), &sim.url(), false, "");
    std::fs::write(&file, &text).unwrap();
    let gw = start_from_file(&file).await;
    let admin = gw.admin_addr().unwrap();
    cert(&dir, "a");
    let tls = format!(", tls: {{ cert: {:?}, key: {:?} }}", dir.join("cert.pem"), dir.join("key.pem"));
    let server = "server: { listen: \"127.0.0.1:0\", admin_listen: \"127.0.0.1:0\"";
    for (changed, path) in [
        (text.replacen(server, &format!("{server}{tls}"), 1), "server.tls"),
        (text.replacen(server, &format!("{server}, http2: false"), 1), "server.http2"),
        (text.replacen(server, &format!("{server}, watch_config: true"), 1), "server.watch_config"),
        (text.replacen(server, &format!("{server}, shutdown_grace: 1s"), 1), "server.shutdown_grace"),
        (
            text.replacen(server, &format!("{server}, limits: {{ header_timeout: 1s }}"), 1),
            "server.limits.header_timeout",
        ),
        (text.replacen("logging: { level: warn }", "logging: { level: error }", 1), "logging.level"),
        (text.replacen("logging: { level: warn }", "logging: { level: warn, format: text }", 1), "logging.format"),
    ] {
        assert_ne!(changed, text, "{path}: the test did not change the file");
        std::fs::write(&file, &changed).unwrap();
        let r = send(admin, Method::POST, "/admin/reload", &[], "").await;
        assert_eq!(r.status, 422, "{path}: {}", r.json());
        let errors = r.json()["errors"].to_string();
        assert!(errors.contains(path) && errors.contains("restart"), "{path}: {errors}");
        let running = get(admin, "/admin/config").await.json();
        assert!(running["server"]["tls"].is_null(), "{path}: {running}");
        assert_eq!(running["logging"]["level"], "warn");
        // Still plain HTTP on the same listener.
        assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200, "{path}");
    }
    // A change that a reload does apply still goes through.
    std::fs::write(&file, text.replacen("logging: { level: warn }", "logging: { level: warn, access_log: false }", 1))
        .unwrap();
    assert_eq!(send(admin, Method::POST, "/admin/reload", &[], "").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_hides_the_redis_password_and_says_which_methods_it_answers() {
    let redis = RedisServer::start_with(dead_port(), &["--requirepass", "R3dis-Pa55word"]);
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = redis.url().replace("redis://", "redis://default:R3dis-Pa55word@");
    let yaml = cfg_text(&sim.url(), &sim.url(), false, "").replacen(
        "services:",
        &format!("state: {{ backend: redis, redis: {{ url: \"{url}\" }} }}\nrate_limits: {{ per_ip: {{ rate: 1000 }} }}\nservices:"),
        1,
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    // The password works (the Redis-backed limit reached Redis), and is shown nowhere.
    assert_eq!(get(gw.addr(), "/api/v1/market/ticker/BTCUSDT").await.status, 200);
    let admin = gw.handle.admin_addr().unwrap();
    assert_eq!(get(admin, "/admin/stats").await.json()["redis"], "up");
    let c = get(admin, "/admin/config").await;
    let text = String::from_utf8_lossy(&c.body);
    assert!(!text.contains("R3dis-Pa55word"), "{text}");
    assert_eq!(c.json()["state"]["redis"]["url"], url.replace("R3dis-Pa55word", "<redacted>"));
    // 405 lists exactly the methods each admin endpoint answers.
    for (method, path, allow) in [
        (Method::GET, "/admin/cache/invalidate", "POST"),
        (Method::DELETE, "/admin/halt", "GET, POST, PUT"),
        (Method::PUT, "/admin/reload", "GET, POST"),
        (Method::POST, "/admin/config", "GET"),
        (Method::DELETE, "/admin/routes", "GET"),
        (Method::POST, "/admin/stats", "GET"),
    ] {
        let r = send(admin, method.clone(), path, &[], "").await;
        r.assert_error(405, "method_not_allowed");
        assert_eq!(r.headers["allow"], allow, "{method} {path}");
    }
    // And each listed method is answered (not 405).
    for (method, path, body) in [
        (Method::PUT, "/admin/halt", r#"{"halted": false}"#),
        (Method::POST, "/admin/cache/invalidate", r#"{"all": true}"#),
        (Method::GET, "/admin/stats", ""),
    ] {
        let r = send(admin, method.clone(), path, &[("content-type", "application/json")], body).await;
        assert_ne!(r.status, 405, "{method} {path}");
    }
}

fn cert(dir: &std::path::Path, name: &str) -> (rustls::pki_types::CertificateDer<'static>, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    (ck.cert.der().clone(), name.into())
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_after_reload_and_old_connections_live_on() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = temp_dir("certreload");
    let (old, _) = cert(&dir, "a");
    let tls = format!(", tls: {{ cert: \"{0}/cert.pem\", key: \"{0}/key.pem\" }}", dir.display());
    let file = dir.join("gw.yaml");
    std::fs::write(&file, cfg_text(&sim.url(), &sim.url(), false, &tls)).unwrap();
    let gw = start_from_file(&file).await;
    let conn1 = tls_connect(gw.addr(), std::slice::from_ref(&old)).await;
    assert_eq!(conn1.get_ref().1.peer_certificates().unwrap()[0], old);
    let (mut tx1, c1) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn1)).await.unwrap();
    tokio::spawn(c1);
    let (new, _) = cert(&dir, "b");
    gw.reload().await.unwrap();
    let conn2 = tls_connect(gw.addr(), &[old.clone(), new.clone()]).await;
    assert_eq!(conn2.get_ref().1.peer_certificates().unwrap()[0], new, "new handshakes get the new certificate");
    let req = http::Request::get("/api/v1/market/ticker/X")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(tx1.send_request(req).await.unwrap().status(), 200, "the old connection lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_is_propagated_or_created_and_server_timing_is_sent() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw = TestGateway::start(
        &config_yaml(
            &[("up", sim.url())],
            "  - { id: t, path: \"/api/v1/market/ticker/{s}\", methods: [GET], service: up, public: true }\n",
        ),
        &[],
    )
    .await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = send(
        gw.addr(),
        Method::GET,
        "/api/v1/market/ticker/X",
        &[("traceparent", incoming), ("tracestate", "b25=1")],
        "",
    )
    .await;
    let st = r.headers["server-timing"].to_str().unwrap();
    assert!(st.contains("gateway;dur=") && st.contains("upstream;dur="), "{st}");
    let rec = sim.requests().pop().unwrap();
    let out = rec.headers["traceparent"].to_str().unwrap();
    assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{out}");
    assert!(!out.contains("00f067aa0ba902b7"), "a new parent id: {out}");
    assert_eq!(rec.headers["tracestate"], "b25=1");
    get(gw.addr(), "/api/v1/market/ticker/X").await;
    let created = sim.requests().pop().unwrap().headers["traceparent"].to_str().unwrap().to_string();
    assert!(b25_gateway::pipeline::trace::parse(&created).is_some(), "{created}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_config_file_reloads_itself() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = temp_dir("watch");
    let file = dir.join("gw.yaml");
    let text = |extra| cfg_text(&sim.url(), &sim.url(), extra, ", watch_config: true");
    std::fs::write(&file, text(false)).unwrap();
    let gw = start_from_file(&file).await;
    assert_eq!(get(gw.addr(), "/api/v1/market/trades/X").await.status, 404);
    std::fs::write(&file, text(true)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get(gw.addr(), "/api/v1/market/trades/X").await.status != 200 {
        assert!(std::time::Instant::now() < deadline, "the changed file was never picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_listeners() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = temp_dir("move");
    let file = dir.join("gw.yaml");
    std::fs::write(&file, cfg_text(&sim.url(), &sim.url(), false, "")).unwrap();
    let gw = start_from_file(&file).await;
    let (old_main, old_admin) = (gw.addr(), gw.admin_addr().unwrap());
    let (p1, p2) = (dead_port(), dead_port());
    let moved = cfg_text(&sim.url(), &sim.url(), false, "").replace(
        "listen: \"127.0.0.1:0\", admin_listen: \"127.0.0.1:0\"",
        &format!("listen: \"127.0.0.1:{p1}\", admin_listen: \"127.0.0.1:{p2}\""),
    );
    std::fs::write(&file, moved).unwrap();
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gw.addr().port(), p1);
    assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200, "the new main listener serves");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(old_main).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "the old main listener still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw.admin_addr().unwrap().port() != p2 || tokio::net::TcpStream::connect(("127.0.0.1", p2)).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the admin listener did not move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(gw.admin_addr().unwrap(), "/health/liveness").await.status, 200);
    assert!(tokio::net::TcpStream::connect(old_admin).await.is_err(), "the old admin listener still accepts");
    // A reload to an address that cannot be bound changes nothing.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().port();
    let bad =
        std::fs::read_to_string(&file).unwrap().replace(&format!("127.0.0.1:{p1}"), &format!("127.0.0.1:{taken}"));
    std::fs::write(&file, bad).unwrap();
    assert!(gw.reload().await.is_err());
    assert_eq!(get(gw.addr(), "/api/v1/market/ticker/X").await.status, 200);
}

/// The admin token guards `/admin/*`: missing or wrong → 401 with a challenge, never the
/// endpoint; every admin call is counted by outcome (a guessed token shows), and a scrape
/// endpoint answers only GET and HEAD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_refusals_are_counted_and_scrape_endpoints_only_read() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let yaml =
        config_yaml(&[("md", sim.url())], "  - { id: t, path: \"/t\", methods: [GET], service: md, public: true }\n")
            .replace("  shutdown_grace: 5s\n", "  shutdown_grace: 5s\n  admin_token: \"0123456789abcdef-admin\"\n");
    let gw = TestGateway::start(&yaml, &[]).await;
    let admin = gw.handle.admin_addr().unwrap();
    let count = |text: &str, outcome: &str| -> f64 {
        let prefix = format!("b25_gateway_admin_requests_total{{outcome=\"{outcome}\"}}");
        text.lines().find(|l| l.starts_with(&prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(-1.0)
    };
    let body = r#"{"halted":true,"by":"t","reason":"t"}"#;
    for auth in [None, Some("Bearer wrong-token-0123456789"), Some("bearer 0123456789abcdef-admin")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let r = send(admin, Method::POST, "/admin/halt", &headers, body).await;
        r.assert_error(401, "unauthenticated");
        assert!(r.headers.contains_key("www-authenticate"));
    }
    let r = send(admin, Method::GET, "/admin/halt", &[("authorization", "Bearer 0123456789abcdef-admin")], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["halted"], false, "a refused call changed the halt");
    let m = String::from_utf8_lossy(&get(admin, "/metrics").await.body).to_string();
    assert_eq!(count(&m, "unauthorized"), 3.0, "{m}");
    assert_eq!(count(&m, "ok"), 1.0);
    for path in ["/metrics", "/health/readiness", "/health/liveness"] {
        let r = send(admin, Method::POST, path, &[], "").await;
        assert_eq!(r.status, 405, "{path}");
    }
}

/// `trading.halted` changed by a reload is applied, not just shown: `true` engages the halt,
/// `false` lifts a halt the config engaged but never one the admin API engaged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_trading_halted_engages_the_halt_and_lifts_only_its_own() {
    let orders = b25_sim::start(b25_sim::Service::OrderExecution, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = temp_dir("reload-halt");
    let file = dir.join("gw.yaml");
    let text = |halted: bool| {
        format!(
            r#"server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0" }}
logging: {{ level: warn }}
trading: {{ halted: {halted} }}
services:
  orders: {{ instances: ["{}"], health_check: {{ enabled: false }} }}
routes:
  - {{ id: create, path: /api/v1/orders, methods: [POST], service: orders, public: true, halt: block }}
"#,
            orders.url()
        )
    };
    std::fs::write(&file, text(false)).unwrap();
    let gw = start_from_file(&file).await;
    let (addr, admin) = (gw.addr(), gw.admin_addr().unwrap());
    let order = |id: &'static str| async move {
        let body = format!(r#"{{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":1,"client_order_id":"{id}"}}"#);
        send(addr, Method::POST, "/api/v1/orders", &[("content-type", "application/json")], body).await
    };
    let reload = |halted: bool| {
        let (file, gw) = (&file, &gw);
        async move {
            std::fs::write(file, text(halted)).unwrap();
            gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
        }
    };
    assert_eq!(order("o1").await.status, 201);
    reload(true).await;
    order("o2").await.assert_error(503, "trading_halted");
    let h = get(admin, "/admin/halt").await.json();
    assert_eq!((h["halted"].as_bool(), h["by"].as_str()), (Some(true), Some("config")), "{h}");
    reload(false).await;
    assert_eq!(order("o3").await.status, 201, "the config's own halt is lifted by the config");
    // Engaged by the admin API: a reload with `halted: true` then `false` leaves it engaged.
    let r = send(admin, Method::POST, "/admin/halt", &[], r#"{"halted":true,"by":"desk","reason":"drill"}"#).await;
    assert_eq!(r.status, 200);
    reload(true).await;
    reload(false).await;
    order("o4").await.assert_error(503, "trading_halted");
    assert_eq!(get(admin, "/admin/halt").await.json()["by"], "desk");
    let placed: Vec<_> = orders.orders().iter().map(|o| o["client_order_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(placed, ["o1", "o3"]);
}
