//! Every route of the shipped `config/gateway.yaml` reaches the right simulated service with
//! method, path parameters, query string and body intact.

mod support;

use b25_gateway::config;
use http::Method;
use support::*;

fn concrete(template: &str, n: usize) -> String {
    template
        .replace("{symbol}", &format!("SYM{n}USDT"))
        .replace("{id}", &format!("id-{n}"))
        .replace("{key}", &format!("key.{n}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_route_reaches_its_service_intact() {
    let sims = start_sims().await;
    let env = shipped_env(&sims);
    let yaml = shipped_yaml();
    let vars: std::collections::HashMap<_, _> = env.iter().cloned().collect();
    let cfg = config::parse(&yaml, "gateway.yaml", &|n: &str| vars.get(n).cloned()).unwrap();
    assert!(cfg.routes.len() >= 34, "the whole B25 table is shipped");
    let gw = TestGateway::start(&yaml, &env).await;
    let admin = token(&["admin"]);

    for (n, route) in cfg.routes.iter().enumerate() {
        let sim = &sims[route.service.as_str()];
        let method = Method::from_bytes(route.methods[0].as_bytes()).unwrap();
        let path = concrete(&route.path, n);
        let query = format!("route={}&q=a%20b&n={n}", route.id);
        let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            format!(r#"{{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":100,"marker":"{}-{n}"}}"#, route.id)
        } else {
            String::new()
        };
        let before = sim.hits();
        let auth = bearer(&admin);
        let reply = send(
            gw.addr(),
            method.clone(),
            &format!("{path}?{query}"),
            &[("content-type", "application/json"), ("authorization", &auth)],
            body.clone(),
        )
        .await;
        assert!(reply.headers.contains_key("x-request-id"), "{}: no request id", route.id);
        assert_eq!(
            reply.headers.get("x-sim-service").map(|v| v.to_str().unwrap()),
            Some(route.service.as_str()),
            "{} went to the wrong service (status {})",
            route.id,
            reply.status
        );
        assert_eq!(sim.hits(), before + 1, "{}: exactly one upstream request", route.id);
        let rec = sim.requests().pop().expect("recorded");
        assert_eq!(rec.method, method, "{}", route.id);
        let mut expected = path.clone();
        if let Some(strip) = &route.strip_prefix {
            expected = expected.strip_prefix(strip.as_str()).unwrap_or(&expected).to_string();
        }
        if let Some(add) = &route.add_prefix {
            expected = format!("{}{}", add.trim_end_matches('/'), expected);
        }
        assert_eq!(rec.uri.path(), expected, "{}: path and parameters", route.id);
        assert_eq!(rec.uri.query(), Some(query.as_str()), "{}: query string", route.id);
        assert_eq!(rec.body, body.as_bytes(), "{}: body", route.id);
        assert_eq!(
            rec.headers.get("x-request-id"),
            reply.headers.get("x-request-id"),
            "{}: the upstream sees the request id the client gets",
            route.id
        );
        // Every other service saw nothing of this request.
        for (name, other) in &sims {
            if *name != route.service {
                assert!(
                    other.requests().iter().all(|r| r.uri.query() != Some(query.as_str())),
                    "{} leaked to {name}",
                    route.id
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_lifecycle_through_the_gateway() {
    let sims = start_sims().await;
    let env = shipped_env(&sims);
    let yaml = shipped_yaml();
    let gw = TestGateway::start(&yaml, &env).await;
    let op = bearer(&token(&["operator"]));
    let auth = [("authorization", op.as_str())];
    let created = send(
        gw.addr(),
        Method::POST,
        "/api/v1/orders",
        &[("content-type", "application/json"), ("authorization", &op)],
        r#"{"symbol":"ETHUSDT","side":"sell","quantity":2,"price":3000}"#,
    )
    .await;
    assert_eq!(created.status, 201);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let got = send(gw.addr(), Method::GET, &format!("/api/v1/orders/{id}"), &auth, "").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["symbol"], "ETHUSDT");
    let cancelled = send(gw.addr(), Method::DELETE, &format!("/api/v1/orders/{id}"), &auth, "").await;
    assert_eq!(cancelled.status, 200);
    assert_eq!(cancelled.json()["status"], "cancelled");
    // Static segment wins over the parameter.
    let active = send(gw.addr(), Method::GET, "/api/v1/orders/active", &auth, "").await;
    assert_eq!(active.status, 200);
    assert!(active.json()["orders"].is_array());
    assert_eq!(sims["order-execution"].requests().last().unwrap().uri.path(), "/api/v1/orders/active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_404_wrong_method_405_with_allow() {
    let sims = start_sims().await;
    let env = shipped_env(&sims);
    let yaml = shipped_yaml();
    let gw = TestGateway::start(&yaml, &env).await;
    get(gw.addr(), "/api/v1/nope").await.assert_error(404, "not_found");
    let r = send(gw.addr(), Method::POST, "/api/v1/orders/123", &[], "{}").await;
    r.assert_error(405, "method_not_allowed");
    let allow = r.headers["allow"].to_str().unwrap();
    for m in ["GET", "PATCH", "DELETE"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }
    assert!(!allow.contains("POST"));
    let r = send(gw.addr(), Method::DELETE, "/api/v1/market/symbols", &[], "").await;
    r.assert_error(405, "method_not_allowed");
    assert_eq!(r.headers["allow"], "GET");
    let total: u64 = sims.values().map(|s| s.hits()).sum();
    assert_eq!(total, 0, "refused requests never reach an upstream");
}
