//! Upstreams: per-service pooled clients, instance choice, active health checks, and the
//! forwarding of one request.
//!
//! One [`Upstream`] per service is built with the config snapshot; a route holds an
//! `Arc<Upstream>`, so nothing is looked up by name per request. Instance choice is round robin
//! over healthy instances on an atomic counter (no lock). Load-balancing strategies, passive
//! outlier detection, breakers and retries build on this in the resilience work.

pub mod headers;

use crate::body::UpstreamBody as Body;
use crate::config::{HealthCheckConfig, ServiceConfig};
use crate::error::{ErrorKind, GatewayError};
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// TCP keepalive probes on upstream connections find dead peers on idle pooled connections.
const UPSTREAM_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The request body type sent upstream.
pub type UpstreamBody = Body;

/// One instance of a service, with its health.
#[derive(Debug)]
pub struct Instance {
    /// As written in the config (`http://127.0.0.1:8081`).
    pub url: String,
    scheme: Scheme,
    authority: Authority,
    healthy: AtomicBool,
    consecutive_ok: AtomicU32,
    consecutive_fail: AtomicU32,
    /// Milliseconds since the Unix epoch of the last completed check (0: never).
    last_check_ms: AtomicU64,
    /// Status of the last check (0: no HTTP answer).
    last_status: AtomicU32,
}

/// What a valid instance URL is made of.
pub struct ParsedInstance {
    scheme: Scheme,
    authority: Authority,
}

impl Instance {
    /// Checks an instance URL: `http://host:port`, no path, query or credentials.
    pub fn parse(url: &str) -> Result<ParsedInstance, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| format!("{url:?}: a scheme is required (http://)"))?;
        if scheme != Scheme::HTTP {
            return Err(format!("{url:?}: only http:// upstreams are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| format!("{url:?}: a host is required"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: credentials in upstream URLs are not allowed"));
        }
        if authority.port_u16().is_none() {
            return Err(format!("{url:?}: a port is required"));
        }
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/" && !pq.as_str().is_empty()) {
            return Err(format!("{url:?}: an instance URL has no path or query (use routes[].add_prefix)"));
        }
        Ok(ParsedInstance { scheme, authority })
    }

    fn new(url: &str) -> Result<Self, String> {
        let p = Self::parse(url)?;
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            scheme: p.scheme,
            authority: p.authority,
            healthy: AtomicBool::new(true),
            consecutive_ok: AtomicU32::new(0),
            consecutive_fail: AtomicU32::new(0),
            last_check_ms: AtomicU64::new(0),
            last_status: AtomicU32::new(0),
        })
    }

    /// Whether the last health checks passed (true until checks say otherwise).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn uri(&self, pq: PathAndQuery) -> Result<Uri, http::Error> {
        Uri::builder().scheme(self.scheme.clone()).authority(self.authority.clone()).path_and_query(pq).build()
    }
}

/// A service: its instances, pooled client and health checking.
pub struct Upstream {
    /// The service name.
    pub name: Arc<str>,
    instances: Box<[Arc<Instance>]>,
    next: AtomicUsize,
    client: Client<HttpConnector, UpstreamBody>,
    health: HealthCheckConfig,
    health_client: Client<HttpConnector, Empty<Bytes>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("name", &self.name).field("instances", &self.instances).finish()
    }
}

fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(connect_timeout));
    c.set_keepalive(Some(UPSTREAM_TCP_KEEPALIVE));
    c
}

impl Upstream {
    /// Builds the service's client and instances (validated config: instance URLs parse).
    pub fn new(name: &str, cfg: &ServiceConfig) -> Result<Self, String> {
        let instances = cfg.instances.iter().map(|u| Instance::new(u).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout.get())
            .pool_max_idle_per_host(cfg.pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector(cfg.connect_timeout.get()));
        let health_client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .pool_timer(TokioTimer::new())
            .build(connector(cfg.health_check.timeout.get()));
        Ok(Self {
            name: name.into(),
            instances: instances.into(),
            next: AtomicUsize::new(0),
            client,
            health: cfg.health_check.clone(),
            health_client,
        })
    }

    /// The instances, in config order.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    /// Round robin over healthy instances; `None` when every instance is unhealthy.
    pub fn pick(&self) -> Option<&Arc<Instance>> {
        let n = self.instances.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| &self.instances[(start + i) % n]).find(|inst| inst.is_healthy())
    }

    /// Sends `req` (whose URI holds only path and query) to an instance and waits for the
    /// response headers for at most `timeout`. The body streams; nothing is buffered.
    pub async fn forward(
        &self,
        mut req: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, GatewayError> {
        let inst = self.pick().ok_or_else(|| {
            GatewayError::new(ErrorKind::NoHealthyUpstream, "no healthy instance of the service")
                .with_detail(&self.name)
        })?;
        let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = inst
            .uri(pq)
            .map_err(|e| GatewayError::new(ErrorKind::Internal, "cannot build upstream request").with_detail(e))?;
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e).with_detail(format!("{}: {}", inst.url, error_chain(&e)))),
            Err(_) => Err(GatewayError::new(ErrorKind::UpstreamTimeout, "the upstream service did not answer in time")
                .with_detail(format!("{} after {timeout:?}", inst.url))),
        }
    }

    /// Runs one round of health checks on every instance, concurrently.
    pub async fn check_all(&self) {
        if !self.health.enabled {
            return;
        }
        let checks = self.instances.iter().map(|inst| self.check(inst));
        futures_util::future::join_all(checks).await;
    }

    async fn check(&self, inst: &Instance) {
        let uri = format!("{}{}", inst.url, self.health.path);
        let status = match uri.parse::<Uri>() {
            Ok(uri) => {
                let req = Request::get(uri).body(Empty::new()).expect("valid request");
                match tokio::time::timeout(self.health.timeout.get(), self.health_client.request(req)).await {
                    Ok(Ok(resp)) => resp.status().as_u16(),
                    _ => 0,
                }
            }
            Err(_) => 0,
        };
        let ok = (200..300).contains(&status);
        inst.last_status.store(status as u32, Ordering::Relaxed);
        inst.last_check_ms.store(unix_ms(), Ordering::Relaxed);
        if ok {
            inst.consecutive_fail.store(0, Ordering::Relaxed);
            let n = inst.consecutive_ok.fetch_add(1, Ordering::Relaxed) + 1;
            if !inst.is_healthy() && n >= self.health.healthy_threshold {
                inst.healthy.store(true, Ordering::Relaxed);
                tracing::info!(service = %self.name, instance = %inst.url, "instance healthy again");
            }
        } else {
            inst.consecutive_ok.store(0, Ordering::Relaxed);
            let n = inst.consecutive_fail.fetch_add(1, Ordering::Relaxed) + 1;
            if inst.is_healthy() && n >= self.health.unhealthy_threshold {
                inst.healthy.store(false, Ordering::Relaxed);
                tracing::warn!(service = %self.name, instance = %inst.url, status, "instance unhealthy");
            }
        }
    }

    /// Starts the periodic health checks; they stop when the upstream is dropped (the config
    /// snapshot that owned it was replaced).
    pub fn spawn_health_checks(self: &Arc<Self>) {
        if !self.health.enabled {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let interval = self.health.interval.get();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first round is run by the caller before readiness
            loop {
                tick.tick().await;
                let Some(up) = weak.upgrade() else { return };
                up.check_all().await;
            }
        });
    }

    /// JSON for `GET /health`.
    pub fn health_json(&self) -> serde_json::Value {
        let instances: Vec<_> = self
            .instances
            .iter()
            .map(|i| {
                let checked = i.last_check_ms.load(Ordering::Relaxed);
                serde_json::json!({
                    "url": i.url,
                    "healthy": i.is_healthy(),
                    "last_check_status": i.last_status.load(Ordering::Relaxed),
                    "last_check_unix_ms": if checked == 0 { serde_json::Value::Null } else { checked.into() },
                })
            })
            .collect();
        let healthy = self.instances.iter().filter(|i| i.is_healthy()).count();
        serde_json::json!({
            "status": if healthy > 0 { "healthy" } else { "unhealthy" },
            "healthy_instances": healthy,
            "instances": instances,
        })
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Maps a client error to the kind that says where it failed.
fn classify(e: &hyper_util::client::legacy::Error) -> GatewayError {
    if e.is_connect() {
        return GatewayError::new(ErrorKind::UpstreamConnect, "could not connect to the upstream service");
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() {
                return GatewayError::new(
                    ErrorKind::UpstreamBadResponse,
                    "the upstream service sent an invalid response",
                );
            }
            break;
        }
        src = s.source();
    }
    GatewayError::new(
        ErrorKind::UpstreamReset,
        "the upstream service closed the connection without a complete response",
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
