//! Observability checked by real tools: `/metrics` after traffic on every route passes
//! `promtool check metrics`, and every metric the Grafana dashboard and the alert rules query
//! exists in a live `/metrics`. (Dockerfile, Kubernetes manifests, rule unit tests and the
//! OpenAPI document are checked by scripts/check-deploy.sh, run by the test command.)

mod support;

use b25_gateway::config;
use http::Method;
use std::collections::HashMap;
use support::*;

async fn traffic_everywhere() -> (HashMap<&'static str, b25_sim::SimServer>, TestGateway, String) {
    let sims = start_sims().await;
    let env = shipped_env(&sims);
    let gw = TestGateway::start(&shipped_yaml(), &env).await;
    let vars: HashMap<_, _> = env.iter().cloned().collect();
    let cfg = config::parse(&shipped_yaml(), "gateway.yaml", &|n: &str| vars.get(n).cloned()).unwrap();
    let admin = bearer(&token(&["admin"]));
    for route in &cfg.routes {
        let path = route.path.replace("{symbol}", "BTCUSDT").replace("{id}", "ord-1").replace("{key}", "k");
        let method = Method::from_bytes(route.methods[0].as_bytes()).unwrap();
        let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) { "{}" } else { "" };
        let h = [("authorization", admin.as_str()), ("content-type", "application/json")];
        send(gw.addr(), method.clone(), &path, &h, body).await;
        send(gw.addr(), method, &path, &h, body).await; // cache hits, replays
        send(gw.addr(), Method::GET, &path, &[], "").await; // 401s / 405s
    }
    get(gw.addr(), "/nope").await;
    let text = String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/metrics").await.body).to_string();
    (sims, gw, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_after_traffic_on_every_route() {
    let (_sims, _gw, text) = traffic_everywhere().await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/test.sh installs the Debian package prometheus)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Labels are route ids, never raw paths: a burst of random paths adds no series.
    for required in ["route=\"market-ticker\"", "route=\"unmatched\"", "b25_gateway_build_info"] {
        assert!(text.contains(required), "{required} missing");
    }
    assert!(!text.contains("/api/v1/"), "a raw path leaked into a label");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_paths_create_no_new_series() {
    let (_sims, gw, before) = traffic_everywhere().await;
    for i in 0..2000 {
        get(gw.addr(), &format!("/random/{i}/x{}", i * 7)).await;
    }
    let after = String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/metrics").await.body).to_string();
    let series = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(series(&before), series(&after), "random paths created series");
}

/// Metric names used in PromQL expressions (b25_gateway_*), without histogram suffixes.
fn names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let needle = "b25_gateway_";
    let mut i = 0;
    while let Some(p) = text[i..].find(needle) {
        let start = i + p;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.push(text[start..end].to_string());
        i = end;
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_exists() {
    let (_sims, gw, _) = traffic_everywhere().await;
    // A WebSocket and a breaker-worthy failure so those families have series.
    let live = String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/metrics").await.body).to_string();
    let exported: std::collections::HashSet<String> = live
        .lines()
        .filter(|l| l.starts_with("# TYPE ") || l.starts_with("# HELP "))
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    let known = |n: &str| {
        exported.contains(n)
            || ["_bucket", "_sum", "_count"].iter().any(|s| n.strip_suffix(s).is_some_and(|b| exported.contains(b)))
    };
    let root = repo_root();
    for file in ["deploy/grafana/b25-gateway.json", "deploy/prometheus/alerts.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let names = names_in(&text);
        assert!(!names.is_empty(), "{file} queries no gateway metric");
        for n in names {
            assert!(known(&n), "{file} queries {n}, which the gateway does not export");
        }
    }
}
