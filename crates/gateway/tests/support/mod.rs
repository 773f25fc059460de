//! Test support: a real gateway in-process on 127.0.0.1:0 in front of real upstreams, and a
//! small HTTP client over real sockets. No mocks, no fixed ports, no sleeps as synchronisation.
#![allow(dead_code)]

use b25_gateway::config;
use b25_gateway::server::{self, GatewayHandle};
use b25_sim::{Service, SimServer};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;

/// The workspace root (for `config/gateway.yaml`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A gateway running in this process.
pub struct TestGateway {
    pub handle: GatewayHandle,
}

impl TestGateway {
    /// Parses `yaml` with `vars` as the only environment, starts it and waits until ready.
    pub async fn start(yaml: &str, vars: &[(&str, String)]) -> Self {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let env = move |name: &str| vars.get(name).cloned();
        let cfg = config::parse(yaml, "test.yaml", &env).unwrap_or_else(|e| panic!("{e}"));
        let handle = server::start(cfg, "test.yaml").await.unwrap_or_else(|e| panic!("{e}"));
        tokio::time::timeout(Duration::from_secs(10), handle.ready()).await.expect("gateway ready");
        Self { handle }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.addr()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }
}

/// A minimal config: `services` is `(name, instance url)`, routes as YAML list items.
pub fn config_yaml(services: &[(&str, String)], routes: &str) -> String {
    let mut y = String::from(
        "server:\n  listen: \"127.0.0.1:0\"\n  admin_listen: \"127.0.0.1:0\"\n  shutdown_grace: 5s\nlogging:\n  level: warn\nservices:\n",
    );
    for (name, url) in services {
        y.push_str(&format!("  {name}:\n    instances: [\"{url}\"]\n    health_check: {{ enabled: false }}\n"));
    }
    y.push_str("routes:\n");
    y.push_str(routes);
    y
}

/// HS256 secret the tests give the shipped config.
pub const TEST_SECRET: &str = "test-secret-0123456789-0123456789-abcdef";
/// The operator API key whose hash the tests give the shipped config.
pub const TEST_API_KEY: &str = "b25_test_operator_key";
/// The CORS origin the tests give the shipped config.
pub const TEST_ORIGIN: &str = "https://dashboard.b25.example";

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims accepted by the shipped config's issuer, with `roles`; `extra` overrides or adds.
pub fn claims(sub: &str, roles: &[&str], extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "sub": sub, "roles": roles, "iss": "b25-auth", "aud": "b25-gateway",
        "iat": now(), "exp": now() + 600,
    });
    if let serde_json::Value::Object(m) = extra {
        for (k, v) in m {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(&k);
            } else {
                c[k] = v;
            }
        }
    }
    c
}

/// An `auth:` section trusting HS256 tokens signed with [`TEST_SECRET`] (see [`token`]).
pub fn test_auth_section() -> String {
    format!(
        "auth:\n  jwt:\n    issuers:\n      - {{ issuer: b25-auth, audiences: [b25-gateway], algorithms: [HS256], secret: \"{TEST_SECRET}\" }}\n"
    )
}

/// An HS256 token signed with `secret`.
pub fn hs256(secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A valid token for the shipped config with these roles.
pub fn token(roles: &[&str]) -> String {
    hs256(TEST_SECRET, &claims(&format!("user-{}", roles.join("-")), roles, serde_json::json!({})))
}

/// `Authorization: Bearer …` value.
pub fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// The shipped config text.
pub fn shipped_yaml() -> String {
    std::fs::read_to_string(repo_root().join("config/gateway.yaml")).unwrap()
}

/// All seven simulated services on free loopback ports.
pub async fn start_sims() -> HashMap<&'static str, SimServer> {
    let mut out = HashMap::new();
    for s in Service::ALL {
        let sim = b25_sim::start(s, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        out.insert(s.name(), sim);
    }
    out
}

/// Env vars that point the shipped config at `sims` and at free ports.
pub fn shipped_env(sims: &HashMap<&'static str, SimServer>) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("B25_GATEWAY_LISTEN", "127.0.0.1:0".to_string()),
        ("B25_GATEWAY_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("B25_GATEWAY_LOG_LEVEL", "warn".to_string()),
        ("B25_JWT_SECRET", TEST_SECRET.to_string()),
        ("B25_OPS_CONSOLE_KEY_SHA256", b25_gateway::auth::apikey::hash_hex(TEST_API_KEY)),
        ("B25_DASHBOARD_ORIGIN", TEST_ORIGIN.to_string()),
    ];
    for (name, var) in [
        ("market-data", "MARKET_DATA_URL"),
        ("order-execution", "ORDER_EXECUTION_URL"),
        ("strategy-engine", "STRATEGY_ENGINE_URL"),
        ("account-monitor", "ACCOUNT_MONITOR_URL"),
        ("risk-manager", "RISK_MANAGER_URL"),
        ("configuration", "CONFIGURATION_URL"),
        ("dashboard", "DASHBOARD_URL"),
    ] {
        v.push((var, sims[name].url()));
    }
    v
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts the gateway's JSON error shape, its code and the echoed request id.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", String::from_utf8_lossy(&self.body));
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        let rid = self.headers.get("x-request-id").expect("x-request-id on errors");
        assert_eq!(v["error"]["request_id"], rid.to_str().unwrap(), "{v}");
    }
}

/// A fresh HTTP/1.1 client connection to `addr` (its driver runs in a task).
pub async fn h1<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    tx
}

/// A fresh HTTP/2 client connection (prior knowledge, clear text) to `addr`.
pub async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// Sends one request on a fresh HTTP/1.1 connection and reads the whole response.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut tx = h1(addr).await;
    let mut req = Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tx.send_request(req.body(Full::new(body.into())).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// GET with no body.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, Method::GET, path, &[], Bytes::new()).await
}

/// A loopback port that nothing listens on (bound, then released).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d =
        std::env::temp_dir().join(format!("b25-gw-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Boxed response body for hand-written upstreams.
pub type UpBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A hand-written HTTP/1.1 upstream on 127.0.0.1:0 running `handler` for every request.
pub async fn upstream<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<UpBody>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

/// A complete body for hand-written upstreams.
pub fn full_body(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A real `redis-server` on a free loopback port, stopped (killed) on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a standalone server.
    pub fn start() -> Self {
        Self::start_with(dead_port(), &[])
    }

    /// Starts a server on `port` with extra arguments, and waits until it says it is ready.
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        let dir = temp_dir(&format!("redis-{port}"));
        let mut s = Self { child: None, port, dir, extra: extra.iter().map(|e| e.to_string()).collect() };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("redis-server must be installed (scripts/test.sh installs it)");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("Ready to accept connections") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(15)).expect("redis-server did not become ready");
        self.child = Some(child);
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three redis-server processes in cluster mode, slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(
                    dead_port(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        // `--cluster create` returns once slots are assigned; wait until every node agrees.
        for n in &nodes {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let info = std::process::Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// Seed node URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}
