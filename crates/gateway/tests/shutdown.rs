//! Graceful shutdown of the real binary: SIGTERM → readiness 503 while draining, the slow
//! in-flight request completes, the process exits 0; past the grace period the cut is logged.

mod support;

use http::Method;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use support::*;

struct Gw {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Gw {
    fn spawn(sim_url: &str, grace: &str, delay: &str) -> Gw {
        Self::spawn_logging(sim_url, grace, delay, "info")
    }

    /// With `logging.level` set to `level`. Below `info` the start lines are not written: the
    /// main listener then takes a port found free here and is waited for by connecting.
    fn spawn_logging(sim_url: &str, grace: &str, delay: &str, level: &str) -> Gw {
        Self::spawn_with(sim_url, grace, delay, level, None)
    }

    /// As [`Self::spawn_logging`], with `RUST_LOG` set to `rust_log` when given.
    fn spawn_with(sim_url: &str, grace: &str, delay: &str, level: &str, rust_log: Option<&str>) -> Gw {
        let quiet = level != "info";
        let listen = if quiet {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        } else {
            "127.0.0.1:0".to_string()
        };
        let dir = temp_dir("shutdown");
        let file = dir.join("gw.yaml");
        std::fs::write(
            &file,
            format!(
                "server: {{ listen: \"{listen}\", admin_listen: \"127.0.0.1:0\", shutdown_grace: {grace}, shutdown_delay: {delay} }}\n\
                 logging: {{ level: \"{level}\" }}\n\
                 services:\n  up: {{ instances: [\"{sim_url}\"], health_check: {{ enabled: false }} }}\n\
                 routes:\n  - {{ id: t, path: \"/api/v1/market/ticker/{{s}}\", methods: [GET], service: up, public: true, timeout: 30s }}\n"
            ),
        )
        .unwrap();
        let mut child = run_binary_env(&file, rust_log);
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut gw = Gw {
            child,
            lines,
            seen: Vec::new(),
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
        };
        if quiet {
            gw.addr = listen.parse().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while std::net::TcpStream::connect(gw.addr).is_err() {
                assert!(std::time::Instant::now() < deadline, "the gateway did not start listening");
                std::thread::yield_now();
            }
            return gw;
        }
        let listening = gw.wait_for("\"listening\"");
        let v: serde_json::Value = serde_json::from_str(&listening).unwrap();
        gw.addr = v["addr"].as_str().unwrap().parse().unwrap();
        gw.admin = v["admin"].as_str().unwrap().parse().unwrap();
        gw.wait_for("\"ready\"");
        gw
    }

    /// Waits for a log line containing `needle` (the log is the synchronisation, not time).
    fn wait_for(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            match self.lines.recv_timeout(Duration::from_secs(15)) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(e) => panic!("no log line with {needle}: {e}"),
            }
        }
    }

    fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("gateway did not exit within 15 s");
    }
}

/// `b25-gateway run --config file`, stdout piped, `RUST_LOG` unset.
fn run_binary(file: &std::path::Path) -> Child {
    run_binary_env(file, None)
}

/// As [`run_binary`], with `RUST_LOG` set to `rust_log` when given.
fn run_binary_env(file: &std::path::Path, rust_log: Option<&str>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_b25-gateway"));
    cmd.args(["run", "--config"]).arg(file).env_remove("RUST_LOG");
    if let Some(v) = rust_log {
        cmd.env("RUST_LOG", v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap()
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut gw = tokio::task::block_in_place(|| Gw::spawn(&sim.url(), "10s", "1s"));
    let addr = gw.addr;
    assert_eq!(get(addr, "/health/readiness").await.status, 200);
    let slow = tokio::spawn(async move {
        send(addr, Method::GET, "/api/v1/market/ticker/SLOW", &[("x-sim-delay", "1500")], "").await
    });
    assert!(sim.wait_for_hits(1, Duration::from_secs(10)).await, "slow request reached the upstream");
    gw.sigterm();
    tokio::task::block_in_place(|| gw.wait_for("draining"));
    // Both listeners say 503 during the drain (the main one until shutdown_delay ends).
    let main_ready = get(addr, "/health/readiness").await;
    assert_eq!(main_ready.status, 503);
    assert_eq!(main_ready.json()["status"], "draining");
    assert_eq!(get(gw.admin, "/health/readiness").await.status, 503);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "the in-flight request completes during the drain");
    assert_eq!(slow.json()["symbol"], "SLOW");
    // One JSON access line per request, with the fields operators grep for.
    let rid = slow.headers["x-request-id"].to_str().unwrap().to_string();
    let line = tokio::task::block_in_place(|| gw.wait_for(&format!("\"request_id\":\"{rid}\"")));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["target"], "access");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["route"], "t");
    assert_eq!(v["path"], "/api/v1/market/ticker/SLOW");
    assert_eq!(v["status"], 200);
    assert_eq!(v["client_ip"], "127.0.0.1");
    assert!(v["bytes_out"].as_u64().unwrap() > 0);
    assert!(v["duration_us"].as_u64().unwrap() >= 1_500_000);
    assert!(v["upstream_us"].as_u64().unwrap() >= 1_500_000);
    assert!(v["timestamp"].is_string());
    assert_eq!(v["trace_id"].as_str().map(str::len), Some(32), "the trace id is in the access log");
    let status = tokio::task::block_in_place(|| gw.wait_exit());
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_are_written_whatever_the_log_level() {
    // `logging.level: error`: the access log has its own switch and still writes a line per
    // request.
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut gw = tokio::task::block_in_place(|| Gw::spawn_logging(&sim.url(), "5s", "0s", "error"));
    let r = get(gw.addr, "/api/v1/market/ticker/BTC").await;
    assert_eq!(r.status, 200);
    let rid = r.headers["x-request-id"].to_str().unwrap().to_string();
    let line = tokio::task::block_in_place(|| gw.wait_for(&format!("\"request_id\":\"{rid}\"")));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["target"], "access");
    assert_eq!(v["path"], "/api/v1/market/ticker/BTC");
    assert_eq!(v["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_running_at_the_deadline_are_cut_and_logged() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut gw = tokio::task::block_in_place(|| Gw::spawn(&sim.url(), "200ms", "0s"));
    let addr = gw.addr;
    let _stuck = tokio::spawn(async move {
        let mut tx = h1(addr).await;
        let req = http::Request::get("/api/v1/market/ticker/X")
            .header("host", "gw")
            .header("x-sim-delay", "20000")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        tx.send_request(req).await
    });
    assert!(sim.wait_for_hits(1, Duration::from_secs(10)).await);
    gw.sigterm();
    let line = tokio::task::block_in_place(|| gw.wait_for("shutdown grace period over"));
    assert!(line.contains("\"requests_cut\":1"), "{line}");
    let status = tokio::task::block_in_place(|| gw.wait_exit());
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_access_line_is_written_before_exit() {
    // Access lines are batched per worker thread (handed over at 16 KiB or 50 ms): a SIGTERM
    // right after the last answer still gets every line out, each exactly once.
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut gw = tokio::task::block_in_place(|| Gw::spawn_logging(&sim.url(), "5s", "0s", "error"));
    let addr = gw.addr;
    // Several batches' worth, from concurrent clients (both worker threads get some).
    let clients: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..150 {
                    let r = get(addr, &format!("/api/v1/market/ticker/C{c}N{i}")).await;
                    assert_eq!(r.status, 200);
                    ids.push(r.headers["x-request-id"].to_str().unwrap().to_string());
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for c in clients {
        ids.extend(c.await.unwrap());
    }
    gw.sigterm();
    let status = tokio::task::block_in_place(|| gw.wait_exit());
    assert_eq!(status.code(), Some(0));
    // The reader thread ends at the pipe's end: everything the process wrote is here.
    let mut count = std::collections::HashMap::new();
    for line in gw.lines.iter() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["target"] == "access"
        {
            *count.entry(v["request_id"].as_str().unwrap().to_string()).or_insert(0) += 1;
        }
    }
    for id in &ids {
        assert_eq!(count.get(id), Some(&1), "access line of {id}");
    }
    assert_eq!(count.len(), ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_access_off_silences_the_access_log() {
    // Whether access lines pass the filter is decided once at start: `RUST_LOG` still rules.
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut gw =
        tokio::task::block_in_place(|| Gw::spawn_with(&sim.url(), "5s", "0s", "error", Some("info,access=off")));
    for i in 0..20 {
        assert_eq!(get(gw.addr, &format!("/api/v1/market/ticker/Q{i}")).await.status, 200);
    }
    gw.sigterm();
    let status = tokio::task::block_in_place(|| gw.wait_exit());
    assert_eq!(status.code(), Some(0));
    let lines: Vec<String> = gw.lines.iter().collect();
    // The filter let the gateway's own info lines through, not one access line.
    assert!(lines.iter().any(|l| l.contains("\"listening\"")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("\"target\":\"access\"")), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stdout_drops_access_lines_and_never_holds_requests() {
    // Nobody reads the gateway's stdout: once the pipe, the writer's buffer and its queue of
    // batches are full, access lines are dropped and counted, and requests go on.
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (addr, admin) = (free(), free());
    let dir = temp_dir("stalled-stdout");
    let file = dir.join("gw.yaml");
    std::fs::write(
        &file,
        format!(
            "server: {{ listen: \"{addr}\", admin_listen: \"{admin}\" }}\n\
             logging: {{ level: error }}\n\
             services:\n  up: {{ instances: [\"{}\"], health_check: {{ enabled: false }} }}\n\
             routes:\n  - {{ id: t, path: \"/api/v1/market/ticker/{{s}}\", methods: [GET], service: up, public: true }}\n",
            sim.url()
        ),
    )
    .unwrap();
    let mut child = run_binary(&file);
    let _unread = child.stdout.take().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "the gateway did not start listening");
        std::thread::yield_now();
    }
    let dropped = |m: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix("b25_gateway_access_log_dropped_lines_total "))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    // ≈ 4.2 MiB of queue and buffers at ≈ 300 bytes a line: keep going until lines are dropped.
    let mut sent = 0;
    loop {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                tokio::spawn(async move {
                    let mut tx = h1::<http_body_util::Empty<bytes::Bytes>>(addr).await;
                    for _ in 0..1000 {
                        let req = http::Request::get("/api/v1/market/ticker/BTCUSDT")
                            .header("host", "gw")
                            .body(http_body_util::Empty::new())
                            .unwrap();
                        let r = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
                            .await
                            .expect("a request was held up")
                            .unwrap();
                        assert_eq!(r.status(), 200);
                        http_body_util::BodyExt::collect(r.into_body()).await.unwrap();
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        sent += 4000;
        let m = String::from_utf8_lossy(&get(admin, "/metrics").await.body).to_string();
        if dropped(&m) > 0 {
            assert!(dropped(&m) < sent, "{} of {sent} dropped", dropped(&m));
            break;
        }
        assert!(sent < 60_000, "no access line dropped after {sent} requests with stdout stalled");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A request the gateway answers itself (a 404, a 401) still records the client's trace id in
/// its access line, and an admin API call is logged (target `admin`, no token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_clients_trace_id_and_admin_calls_are_logged() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut gw = tokio::task::block_in_place(|| Gw::spawn(&sim.url(), "5s", "0s"));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{trace}-00f067aa0ba902b7-01");
    let r = send(gw.addr, Method::GET, "/nope", &[("traceparent", &tp)], "").await;
    assert_eq!(r.status, 404);
    let rid = r.headers["x-request-id"].to_str().unwrap().to_string();
    let line = tokio::task::block_in_place(|| gw.wait_for(&format!("\"request_id\":\"{rid}\"")));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!((v["status"].as_u64(), v["trace_id"].as_str()), (Some(404), Some(trace)), "{line}");
    // An invalid traceparent records none (no trace was started for a refusal).
    let r = send(
        gw.addr,
        Method::GET,
        "/nope",
        &[("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")],
        "",
    )
    .await;
    let rid = r.headers["x-request-id"].to_str().unwrap().to_string();
    let line = tokio::task::block_in_place(|| gw.wait_for(&format!("\"request_id\":\"{rid}\"")));
    assert!(serde_json::from_str::<serde_json::Value>(&line).unwrap().get("trace_id").is_none(), "{line}");
    let r = send(gw.admin, Method::POST, "/admin/cache/invalidate", &[], r#"{"all":true}"#).await;
    assert_eq!(r.status, 200);
    let rid = r.headers["x-request-id"].to_str().unwrap().to_string();
    let line = tokio::task::block_in_place(|| gw.wait_for(&format!("\"request_id\":\"{rid}\"")));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["target"], "admin", "{line}");
    assert_eq!(v["fields"]["path"].as_str().or(v["path"].as_str()), Some("/admin/cache/invalidate"), "{line}");
}
