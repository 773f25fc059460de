//! Upstreams: per-service pooled clients, instance choice, health (active checks and passive
//! outlier ejection), the circuit breaker, and forwarding with retries that are safe for
//! order flow.
//!
//! One [`Upstream`] per service is built with the config snapshot; a route holds an
//! `Arc<Upstream>`, so nothing is looked up by name per request. Instance choice, health,
//! breaker and retry budget are atomics: no lock on the request path.
//!
//! Retry rules (the order-safety contract):
//! - a try that failed before any byte reached the upstream (connect refused or timed out) may
//!   be retried for any method, on another instance;
//! - GET/HEAD/OPTIONS/PUT/DELETE are also retried after a reset before a response, a per-try
//!   timeout, or a status listed in `retry_on_status` (503 `Retry-After` is honoured within
//!   the deadline);
//! - POST/PATCH are never retried once a byte may have been sent, unless the caller says the
//!   request carries an idempotency key the gateway deduplicates;
//! - only bodies kept for replay (empty, or read whole and within `max_replay_body`) are retried;
//! - retries spend a budget (a share of recent requests), so a failing service never sees a
//!   retry storm.
//!
//! The pool re-sends a request only when its first write on a pooled connection failed (not a
//! byte left), which keeps POSTs single; idle connections the upstream closed are dropped at
//! checkout, before anything is written.

pub mod balance;
pub mod breaker;
pub mod h1;
pub mod headers;
pub mod pool;

use crate::body::UpstreamBody as Body;
use crate::config::resilience::{OutlierConfig, RetryConfig};
use crate::config::{HealthCheckConfig, ServiceConfig};
use crate::error::{ErrorKind, GatewayError};
use crate::observe::Metrics;
use balance::Balancer;
use breaker::{Breaker, State};
use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri, Version, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// TCP keepalive probes on upstream connections find dead peers on idle pooled connections.
pub(crate) const UPSTREAM_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The request body type sent upstream.
pub type UpstreamBody = Body;

/// One instance of a service, with its health.
#[derive(Debug)]
pub struct Instance {
    /// As written in the config (`http://127.0.0.1:8081`).
    pub url: String,
    /// Metric label.
    pub label: Arc<str>,
    /// Relative share of traffic.
    pub weight: u32,
    authority: Authority,
    /// `Host` sent upstream (the instance's `host:port`).
    host: http::HeaderValue,
    healthy: AtomicBool,
    consecutive_ok: AtomicU32,
    consecutive_fail: AtomicU32,
    /// Milliseconds since the Unix epoch of the last completed check (0: never).
    last_check_ms: AtomicU64,
    /// Status of the last check (0: no HTTP answer).
    last_status: AtomicU32,
    /// Requests in flight (least-request balancing).
    pub inflight: AtomicUsize,
    passive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
}

/// What a valid instance URL is made of.
pub struct ParsedInstance {
    authority: Authority,
}

impl Instance {
    /// Checks an instance URL: `http://host:port`, no path, query or credentials.
    pub fn parse(url: &str) -> Result<ParsedInstance, String> {
        // Messages quote the URL with any password it carries (from `${…}`) redacted.
        let shown = crate::config::state::redact_url(url);
        let uri: Uri = url.parse().map_err(|e| format!("{shown:?} is not a URL: {e}"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| format!("{shown:?}: a scheme is required (http://)"))?;
        if scheme != Scheme::HTTP {
            return Err(format!("{shown:?}: only http:// upstreams are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| format!("{shown:?}: a host is required"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{shown:?}: credentials in upstream URLs are not allowed"));
        }
        if authority.host().is_empty() {
            return Err(format!("{shown:?}: a host is required"));
        }
        if authority.port_u16().is_none() {
            return Err(format!("{shown:?}: a port is required"));
        }
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/" && !pq.as_str().is_empty()) {
            return Err(format!("{shown:?}: an instance URL has no path or query (use routes[].add_prefix)"));
        }
        Ok(ParsedInstance { authority })
    }

    /// An instance from a URL and weight.
    pub fn new(url: &str, weight: u32) -> Result<Self, String> {
        let p = Self::parse(url)?;
        let host = http::HeaderValue::from_str(p.authority.as_str()).map_err(|e| format!("{url:?}: {e}"))?;
        let url = url.trim_end_matches('/').to_string();
        Ok(Self {
            label: url.as_str().into(),
            url,
            weight: weight.max(1),
            host,
            authority: p.authority,
            healthy: AtomicBool::new(true),
            consecutive_ok: AtomicU32::new(0),
            consecutive_fail: AtomicU32::new(0),
            last_check_ms: AtomicU64::new(0),
            last_status: AtomicU32::new(0),
            inflight: AtomicUsize::new(0),
            passive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        })
    }

    /// Whether the last active health checks passed (true until checks say otherwise).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether passive outlier detection has taken the instance out at `now_ms`.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Healthy and not ejected.
    pub fn available(&self, now_ms: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now_ms)
    }

    #[cfg(test)]
    pub(crate) fn eject_for_test(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }
}

/// Retry budget (after Linkerd and Finagle): each request deposits `ratio` of a retry, each
/// retry withdraws one; plus `min_per_second` retries always available per second.
struct RetryBudget {
    balance_milli: AtomicI64,
    deposit_milli: i64,
    cap_milli: i64,
    min_per_second: u32,
    second: AtomicU64,
    used_this_second: AtomicU32,
}

impl RetryBudget {
    fn new(cfg: &RetryConfig) -> Self {
        let deposit = (cfg.budget_ratio.clamp(0.0, 10.0) * 1000.0) as i64;
        Self {
            balance_milli: AtomicI64::new(0),
            deposit_milli: deposit,
            cap_milli: (deposit * 100).max(10_000),
            min_per_second: cfg.min_retries_per_second,
            second: AtomicU64::new(0),
            used_this_second: AtomicU32::new(0),
        }
    }

    fn deposit(&self) {
        let b = self.balance_milli.fetch_add(self.deposit_milli, Ordering::Relaxed) + self.deposit_milli;
        if b > self.cap_milli {
            self.balance_milli.fetch_min(self.cap_milli, Ordering::Relaxed);
        }
    }

    fn withdraw(&self, now_ms: u64) -> bool {
        let sec = now_ms / 1000;
        if self.second.swap(sec, Ordering::Relaxed) != sec {
            self.used_this_second.store(0, Ordering::Relaxed);
        }
        if self.used_this_second.fetch_add(1, Ordering::Relaxed) < self.min_per_second {
            return true;
        }
        self.used_this_second.fetch_sub(1, Ordering::Relaxed);
        let mut cur = self.balance_milli.load(Ordering::Relaxed);
        loop {
            if cur < 1000 {
                return false;
            }
            match self.balance_milli.compare_exchange_weak(cur, cur - 1000, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(a) => cur = a,
            }
        }
    }
}

/// How one request is to be forwarded.
pub struct Call<'a> {
    /// Overall deadline for the response headers (the route timeout).
    pub timeout: Duration,
    /// Total tries allowed (1 = no retry).
    pub attempts: u32,
    /// The body again, for a retry (`None`: the body streams and cannot be replayed).
    pub replay: Option<Bytes>,
    /// Consistent-hash key.
    pub hash_key: Option<&'a [u8]>,
    /// The request carries an idempotency key that the gateway deduplicates, so even a POST
    /// may be retried.
    pub deduplicated: bool,
    /// Metric families.
    pub metrics: &'a Metrics,
    /// Headers this hop adds (written into the request head, not the map).
    pub hop: Option<&'a h1::HopHeaders<'a>>,
    /// The caller's clock reading when it hands the request over (the first try starts then).
    pub sent: Instant,
    /// The client's body while it streams: a try that fails or times out while the gateway
    /// waits on the client (a slow or broken upload) is not charged to the upstream.
    pub client_body: Option<&'a crate::body::BodyStats>,
}

/// A service: its instances, pooled client, balancer, breaker, health and retry policy.
pub struct Upstream {
    /// The service name.
    pub name: Arc<str>,
    instances: Box<[Arc<Instance>]>,
    balancer: Balancer,
    breaker: Breaker,
    budget: RetryBudget,
    retry: RetryConfig,
    outlier: OutlierConfig,
    /// Connection pools, `[worker][instance]` flattened (worker 0: any other thread), so a
    /// connection's task, its pool and the requests using it stay on one thread.
    pools: Box<[Arc<pool::Pool>]>,
    health: HealthCheckConfig,
    health_client: Client<HttpConnector, Empty<Bytes>>,
    /// The hash header name (consistent hashing).
    pub hash_header: Option<http::HeaderName>,
    /// The hash claim (consistent hashing).
    pub hash_claim: Option<String>,
    base: Instant,
    epoch_ms: u64,
    /// Series resolved on first use (the metrics registry is not known at build time).
    metrics: std::sync::OnceLock<crate::observe::UpstreamMetrics>,
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

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// A breaker permit held by a try. A try that ends without an outcome — its future dropped
/// because the client went away, or no instance to send it to — gives a half-open probe slot
/// back on drop: otherwise the breaker stayed half-open with every slot taken, refusing the
/// service for good.
struct Held<'a> {
    breaker: &'a Breaker,
    permit: Option<breaker::Permit>,
}

impl Held<'_> {
    /// The permit, to record the try's outcome with.
    fn take(&mut self) -> breaker::Permit {
        self.permit.take().expect("a try's outcome is recorded once")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.breaker.abandon(p);
        }
    }
}

/// An instance's in-flight count for one try, given back on drop: a try cancelled by the
/// client's going away (its future dropped mid-await) must not leave the instance looking busy
/// to `least_request` and `/admin/services` for ever.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Failure {
    /// An upstream answer with a retryable status.
    Status(Box<Response<h1::ResponseBody>>),
    /// A transport failure; `not_sent` when no byte can have reached the upstream.
    Error(GatewayError, bool),
}

impl Failure {
    /// What the call returns when this try is its last.
    fn into_result(self) -> Result<Response<h1::ResponseBody>, GatewayError> {
        match self {
            Failure::Status(resp) => Ok(*resp),
            Failure::Error(e, _) => Err(e),
        }
    }
}

impl Upstream {
    /// Builds the service's instances and connection pools (one per worker thread and
    /// instance, plus one per instance for other threads; validated config: URLs parse).
    pub fn new(name: &str, cfg: &ServiceConfig, workers: usize) -> Result<Self, String> {
        let instances = cfg
            .instances
            .iter()
            .map(|i| Instance::new(i.url(), i.weight()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let pool_cfg = pool::PoolConfig {
            connect_timeout: cfg.connect_timeout.get(),
            idle_timeout: cfg.pool_idle_timeout.get(),
            max_idle: cfg.pool_max_idle,
            response_idle_timeout: cfg.response_idle_timeout.get(),
        };
        let pools = (0..=workers)
            .flat_map(|_| instances.iter().map(|i| pool::Pool::new(i.authority.as_str(), pool_cfg.clone())))
            .collect();
        let health_client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .pool_timer(TokioTimer::new())
            .build(connector(cfg.health_check.timeout.get()));
        let lb = &cfg.load_balancing;
        Ok(Self {
            name: name.into(),
            balancer: Balancer::new(lb.policy, &instances),
            instances: instances.into(),
            breaker: Breaker::new(&cfg.circuit_breaker),
            budget: RetryBudget::new(&cfg.retry),
            retry: cfg.retry.clone(),
            outlier: cfg.outlier_detection.clone(),
            pools,
            health: cfg.health_check.clone(),
            health_client,
            hash_header: lb.hash_header.as_deref().and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            hash_claim: lb.hash_claim.clone(),
            base: Instant::now(),
            epoch_ms: crate::unix_ms(),
            metrics: std::sync::OnceLock::new(),
        })
    }

    fn series(&self, metrics: &Metrics) -> &crate::observe::UpstreamMetrics {
        self.metrics.get_or_init(|| {
            let labels: Vec<Arc<str>> = self.instances.iter().map(|i| i.label.clone()).collect();
            metrics.upstream(&self.name, &labels)
        })
    }

    /// This thread's pool for instance `idx`.
    fn pool(&self, idx: usize) -> &Arc<pool::Pool> {
        let n = self.instances.len();
        let workers = self.pools.len() / n;
        &self.pools[crate::server::workers::index().min(workers - 1) * n + idx]
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// Milliseconds since the Unix epoch at `t` (from a clock reading already taken).
    fn ms_at(&self, t: Instant) -> u64 {
        self.epoch_ms + t.saturating_duration_since(self.base).as_millis() as u64
    }

    /// The instances, in config order.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    /// True when at least one instance can take traffic.
    pub fn has_available(&self) -> bool {
        let now = self.now_ms();
        self.instances.iter().any(|i| i.available(now))
    }

    /// The breaker's state.
    pub fn breaker_state(&self) -> State {
        self.breaker.state()
    }

    /// The retry attempts configured for the service.
    pub fn default_attempts(&self) -> u32 {
        self.retry.attempts.max(1)
    }

    /// Largest body kept for a replay.
    pub fn max_replay_body(&self) -> u64 {
        self.retry.max_replay_body.bytes()
    }

    fn transition(&self, t: breaker::Transition, metrics: &Metrics) {
        if let Some((from, to)) = t {
            match to {
                State::Open => tracing::warn!(service = %self.name, from = from.as_str(), "circuit breaker open"),
                _ => tracing::info!(service = %self.name, from = from.as_str(), to = to.as_str(), "circuit breaker"),
            }
            metrics.breaker(&self.name, from.as_str(), to.as_str(), to as i64);
        }
    }

    fn passive(&self, idx: usize, ok: bool, now_ms: u64, metrics: &Metrics) {
        let inst = &self.instances[idx];
        if ok {
            inst.passive_failures.store(0, Ordering::Relaxed);
            return;
        }
        if !self.outlier.enabled {
            return;
        }
        let n = inst.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < self.outlier.consecutive_failures || inst.is_ejected(now_ms) {
            return;
        }
        let ejected = self.instances.iter().filter(|i| i.is_ejected(now_ms)).count();
        let allowed = self.instances.len() * self.outlier.max_ejection_percent as usize / 100;
        if ejected >= allowed {
            return;
        }
        let k = inst.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let t = (self.outlier.base_ejection.get().as_millis() as u64)
            .saturating_mul(1 << k)
            .min(self.outlier.max_ejection.get().as_millis() as u64);
        inst.ejected_until_ms.store(now_ms + t, Ordering::Relaxed);
        inst.passive_failures.store(0, Ordering::Relaxed);
        metrics.ejection(&self.name, &inst.label);
        tracing::warn!(service = %self.name, instance = %inst.url, ejected_for_ms = t, "instance ejected after consecutive failures");
    }

    /// Sends `req` (whose URI holds only path and query) and waits for the response headers,
    /// retrying where it is safe (see the module docs). The body streams; nothing is buffered
    /// here. The first try starts at `call.sent`; `took` is set to the time from then until
    /// the last try ended (the clock reading and subtraction the caller would otherwise repeat).
    pub async fn forward(
        &self,
        req: Request<Body>,
        call: Call<'_>,
        took: &mut Duration,
    ) -> Result<Response<h1::ResponseBody>, GatewayError> {
        let started = call.sent;
        *took = Duration::ZERO;
        // Capped: an absurd configured timeout must not overflow `Instant` (a panic per request).
        let timeout = call.timeout.min(Duration::from_secs(86_400));
        let deadline = started + timeout;
        // The parts stay here across tries (no copy of the headers for a retry); their header
        // map becomes a spare when the call ends.
        let (parts, body) = req.into_parts();
        let parts = SpareOnDrop(parts);
        let mut body = Some(body);
        let mut exclude = None;
        self.budget.deposit();
        let metrics = call.metrics;
        let series = self.series(metrics);
        // The first failure of a POST/PATCH try that may have reached the upstream (sent, no
        // answer). Once there is one, the order's outcome is unknown whatever a later try gets:
        // a later failure that sent nothing, or a 5xx, must not stand for the call (the caller
        // would free the Idempotency-Key, and the client's retry would place the order again).
        let mut in_doubt: Option<GatewayError> = None;
        let settle = |result: Result<Response<h1::ResponseBody>, GatewayError>, in_doubt: Option<GatewayError>| {
            let Some(doubt) = in_doubt else { return result };
            match &result {
                Ok(r) if r.status().is_server_error() => Err(doubt),
                Err(e) if e.kind().request_not_sent() => Err(doubt),
                _ => result,
            }
        };

        // The previous try's failure, while a retry is prepared: if the retry cannot be sent
        // (the breaker opened, no instance left), the client gets what the upstream said (its
        // 503, the reset), not the gateway's reason for not asking again.
        let mut last: Option<Failure> = None;
        for attempt in 0..call.attempts.max(1) {
            // Clock readings are reused: one when the try starts, one when it ends.
            let sent = if attempt == 0 { started } else { Instant::now() };
            let now_ms = self.ms_at(sent);
            let (permit, t) = self.breaker.acquire(now_ms);
            self.transition(t, metrics);
            let mut permit = match permit {
                Ok(p) => Held { breaker: &self.breaker, permit: Some(p) },
                Err(wait_ms) => {
                    let e = GatewayError::new(ErrorKind::CircuitOpen, "the service is failing; try again shortly")
                        .with_header(header::RETRY_AFTER, http::HeaderValue::from(wait_ms.div_ceil(1000).max(1)))
                        .with_detail(&self.name);
                    return settle(last.map_or(Err(e), Failure::into_result), in_doubt);
                }
            };
            let Some(idx) = self.balancer.pick(&self.instances, call.hash_key, now_ms, exclude) else {
                let e = GatewayError::new(ErrorKind::NoHealthyUpstream, "no healthy instance of the service")
                    .with_detail(&self.name);
                return settle(last.map_or(Err(e), Failure::into_result), in_doubt);
            };
            if attempt > 0 {
                // Counted when it is sent (`upstream_retries_total`: retries sent).
                last = None;
                metrics.retry(&self.name);
            }
            let inst = &self.instances[idx];
            // This try's body: the original the first time, the kept bytes after.
            let body = body.take().unwrap_or_else(|| Body::Full(call.replay.clone().unwrap_or_default()));
            // The path and query are sent (origin form), whatever form the URI has; `Host` is
            // the instance's (written by the client, not set in the map).

            let remaining = if attempt == 0 { timeout } else { deadline.saturating_duration_since(sent) };
            let per_try = self.retry.per_try_timeout.map_or(remaining, |p| p.get().min(remaining));
            let inflight = InFlight::enter(&inst.inflight);
            // Deadline from the clock reading of the try's start (no second reading).
            let send = std::pin::pin!(self.pool(idx).send(&parts, call.hop, body, sent, || series.opened()));
            let result = crate::deadline::timeout_at(sent + per_try, send).await;
            drop(inflight);
            let ended = Instant::now();
            let this_try = ended.saturating_duration_since(sent);
            *took = if attempt == 0 { this_try } else { ended.saturating_duration_since(started) };
            series.latency(this_try);
            let now_ms = self.ms_at(ended);

            // The client held the exchange up (its body still arriving when the deadline
            // passed, or broken): not the upstream's failure, so no breaker or outlier
            // record and no retry. The breaker's permit is given back unused.
            if !matches!(result, Ok(Ok(_))) && call.client_body.is_some_and(crate::body::BodyStats::client_holds_up) {
                let e = match result {
                    Ok(Err(ge)) => ge,
                    _ => GatewayError::new(
                        ErrorKind::RequestTimeout,
                        "the request body did not arrive within the route's timeout",
                    )
                    .closing(),
                };
                return settle(Err(e), in_doubt);
            }
            let failure = match result {
                Ok(Ok(resp)) if !self.retry.retry_on_status.contains(&resp.status().as_u16()) => {
                    let server_error = resp.status().is_server_error();
                    series.request(metrics, idx, resp.status().as_u16());
                    // 5xx other than the retryable ones still count against the breaker.
                    let t = self.breaker.record(permit.take(), !server_error, now_ms);
                    self.transition(t, metrics);
                    self.passive(idx, true, now_ms, metrics);
                    return settle(Ok(resp), in_doubt);
                }
                Ok(Ok(resp)) => {
                    series.request(metrics, idx, resp.status().as_u16());
                    Failure::Status(Box::new(resp))
                }
                Ok(Err(ge)) => {
                    series.request(metrics, idx, 0);
                    let not_sent = ge.kind().request_not_sent();
                    Failure::Error(ge, not_sent)
                }
                Err(_) => {
                    series.request(metrics, idx, 0);
                    let ge =
                        GatewayError::new(ErrorKind::UpstreamTimeout, "the upstream service did not answer in time")
                            .with_detail(format!("{} after {per_try:?}", inst.url));
                    Failure::Error(ge, false)
                }
            };
            let t = self.breaker.record(permit.take(), false, now_ms);
            self.transition(t, metrics);
            self.passive(idx, false, now_ms, metrics);

            let not_sent = matches!(failure, Failure::Error(_, true));
            let safe = not_sent || idempotent(&parts.method) || call.deduplicated;
            let left = deadline.saturating_duration_since(ended);
            let wants_retry = attempt + 1 < call.attempts && safe && !left.is_zero();
            let replayable = call.replay.is_some();
            if wants_retry && !replayable {
                tracing::debug!(service = %self.name, "request body streams and cannot be replayed: not retried");
            }
            let retry = wants_retry && replayable && {
                let ok = self.budget.withdraw(now_ms);
                if !ok {
                    metrics.retry_budget_exhausted(&self.name);
                }
                ok
            };
            if !retry {
                return settle(failure.into_result(), in_doubt);
            }
            // Wait: an upstream's Retry-After on 503 if it fits the deadline, else backoff
            // with full jitter.
            let mut wait = backoff(&self.retry, attempt);
            if let Failure::Status(resp) = &failure
                && resp.status() == http::StatusCode::SERVICE_UNAVAILABLE
                && let Some(ra) = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .map(http::HeaderValue::as_bytes)
                    .or_else(|| resp.body().raw_headers().and_then(|r| r.get(&header::RETRY_AFTER)))
                    .and_then(|v| h1::parse_decimal(v.trim_ascii()))
            {
                let ra = Duration::from_secs(ra);
                if ra >= left {
                    return settle(failure.into_result(), in_doubt);
                }
                wait = ra;
            }
            match failure {
                Failure::Error(e, false) if in_doubt.is_none() && !idempotent(&parts.method) => in_doubt = Some(e),
                f => last = Some(f),
            }
            tokio::time::sleep(wait.min(left)).await;
            exclude = Some(idx);
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Sends an upgrade request (no retry: a WebSocket handshake is not replayed) and returns
    /// the upstream's answer, whatever its status.
    pub async fn upgrade(&self, mut req: Request<Body>, timeout: Duration) -> Result<Response<Incoming>, GatewayError> {
        let now_ms = self.now_ms();
        let Some(idx) = self.balancer.pick(&self.instances, None, now_ms, None) else {
            return Err(GatewayError::new(ErrorKind::NoHealthyUpstream, "no healthy instance of the service"));
        };
        let inst = &self.instances[idx];
        *req.version_mut() = Version::HTTP_11;
        req.headers_mut().insert(header::HOST, inst.host.clone());
        // A connection of its own, never pooled: after a 101 it belongs to the relay.
        let pool = self.pool(idx);
        let send = async {
            let mut tx = pool.connect_upgradable().await?;
            tx.send_request(req).await.map_err(|e| pool::classify(&e, false))
        };
        match tokio::time::timeout(timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::new(ErrorKind::UpstreamTimeout, "the upstream service did not answer in time")),
        }
    }

    /// Takes the health-check state of the instances `prev` (the running snapshot's upstream
    /// of the same name) also has, so a reload keeps what the checks learned: a healthy
    /// instance is not judged by one check again, an unhealthy one stays out until it passes
    /// `healthy_threshold` checks.
    pub fn inherit_health(&self, prev: &Upstream) {
        for inst in &self.instances {
            let Some(old) = prev.instances.iter().find(|o| o.url == inst.url) else { continue };
            inst.healthy.store(old.healthy.load(Ordering::Relaxed), Ordering::Relaxed);
            for (new, was) in
                [(&inst.consecutive_ok, &old.consecutive_ok), (&inst.consecutive_fail, &old.consecutive_fail)]
            {
                new.store(was.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            inst.last_status.store(old.last_status.load(Ordering::Relaxed), Ordering::Relaxed);
            inst.last_check_ms.store(old.last_check_ms.load(Ordering::Relaxed), Ordering::Relaxed);
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
        // An instance never checked before is judged by its first check alone (Envoy's
        // "pending first health check"): a dead instance is not sent traffic, nor counted as
        // available for readiness, until `unhealthy_threshold` rounds have failed.
        let first = inst.last_check_ms.swap(crate::unix_ms().max(1), Ordering::Relaxed) == 0;
        if ok {
            inst.consecutive_fail.store(0, Ordering::Relaxed);
            let n = inst.consecutive_ok.fetch_add(1, Ordering::Relaxed) + 1;
            if !inst.is_healthy() && n >= self.health.healthy_threshold {
                inst.healthy.store(true, Ordering::Relaxed);
                // Back from the dead: forget passive ejections too.
                inst.ejected_until_ms.store(0, Ordering::Relaxed);
                inst.passive_failures.store(0, Ordering::Relaxed);
                tracing::info!(service = %self.name, instance = %inst.url, "instance healthy again");
            }
        } else {
            inst.consecutive_ok.store(0, Ordering::Relaxed);
            let n = inst.consecutive_fail.fetch_add(1, Ordering::Relaxed) + 1;
            if inst.is_healthy() && (first || n >= self.health.unhealthy_threshold) {
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
        let now = self.now_ms();
        let instances: Vec<_> = self
            .instances
            .iter()
            .map(|i| {
                let checked = i.last_check_ms.load(Ordering::Relaxed);
                serde_json::json!({
                    "url": i.url,
                    "weight": i.weight,
                    "healthy": i.is_healthy(),
                    "ejected": i.is_ejected(now),
                    "in_flight": i.inflight.load(Ordering::Relaxed),
                    "last_check_status": i.last_status.load(Ordering::Relaxed),
                    "last_check_unix_ms": if checked == 0 { serde_json::Value::Null } else { checked.into() },
                })
            })
            .collect();
        let available = self.instances.iter().filter(|i| i.available(now)).count();
        serde_json::json!({
            "status": if available > 0 { "healthy" } else { "unhealthy" },
            "healthy_instances": available,
            "circuit_breaker": self.breaker.state().as_str(),
            "instances": instances,
        })
    }
}

/// A request's parts whose header map is kept as a spare ([`crate::recycle_header_map`]) when
/// they are dropped.
struct SpareOnDrop(http::request::Parts);

impl std::ops::Deref for SpareOnDrop {
    type Target = http::request::Parts;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for SpareOnDrop {
    fn drop(&mut self) {
        crate::recycle_header_map(std::mem::take(&mut self.0.headers));
    }
}

/// Full jitter: a random wait in `[0, min(max, base·2^attempt)]`.
fn backoff(r: &RetryConfig, attempt: u32) -> Duration {
    let cap = r.backoff_base.get().saturating_mul(1 << attempt.min(16)).min(r.backoff_max.get());
    let nanos = cap.as_nanos() as u64;
    if nanos == 0 { Duration::ZERO } else { Duration::from_nanos(balance::random() % (nanos + 1)) }
}
