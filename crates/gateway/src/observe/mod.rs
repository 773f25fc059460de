//! Observability: Prometheus metrics, the JSON access log, and log set-up.
//!
//! Every request ends in [`RequestRecord::finish`], called when the response body ends or is
//! dropped, so the access line and the duration cover the whole exchange, streaming included.
//! Log lines go through a non-blocking writer: the request thread only formats and queues.

pub(crate) mod access;
mod histogram;

pub use histogram::Histogram;
use http::{HeaderValue, Method};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Request-duration buckets in seconds: from 50 µs (the gateway's own overhead) up to 10 s.
pub const DURATION_BUCKETS: [f64; 17] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Labels of the per-request series. `route` is a route id (or a fixed name such as
/// `unmatched`), never a raw path, and `method` is one of a fixed set, so clients cannot create
/// series at will.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Route id.
    pub route: Arc<str>,
    /// HTTP method, or `OTHER`.
    pub method: &'static str,
    /// Response status.
    pub status: u16,
}

/// Labels of `build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Crate version.
    pub version: &'static str,
    /// Git commit.
    pub commit: &'static str,
}

/// Labels of the per-service upstream series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    /// Service name.
    pub service: Arc<str>,
    /// Error code (`upstream_timeout`, …).
    pub kind: &'static str,
}

/// Labels of the authentication series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// `jwt`, `api_key` or `none`.
    pub method: &'static str,
}

/// Labels of the authentication-failure series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    /// `jwt`, `api_key` or `none`.
    pub method: &'static str,
    /// Fixed reason code (`expired`, `bad_signature`, `missing`, `forbidden`, …).
    pub reason: &'static str,
}

/// Rate-limit scopes (the `scope` label).
pub const RL_SCOPES: [&str; 5] = ["global", "ip", "route", "principal", "principal_route"];
/// Rate-limit outcomes (the `outcome` label).
pub const RL_OUTCOMES: [&str; 4] = ["allowed", "limited", "redis_error_allowed", "redis_error_denied"];
/// Authentication methods (the `method` label).
pub const AUTH_METHODS: [&str; 3] = ["jwt", "api_key", "none"];

/// Labels of the rate-limit series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// `global`, `ip`, `route`, `principal`, `principal_route`.
    pub scope: &'static str,
    /// `allowed`, `limited`, `redis_error_allowed`, `redis_error_denied`.
    pub outcome: &'static str,
}

/// Labels of the Redis error series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisErrorLabels {
    /// `timeout` or `error`.
    pub kind: &'static str,
}

/// Labels of per-instance upstream series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    /// Service name.
    pub service: Arc<str>,
    /// Instance URL from the config.
    pub instance: Arc<str>,
    /// Response status, `0` for a transport failure.
    pub status: u16,
}

/// Labels of per-service series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// Service name.
    pub service: Arc<str>,
}

/// Labels of per-instance ejection series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    /// Service name.
    pub service: Arc<str>,
    /// Instance URL.
    pub instance: Arc<str>,
}

/// Labels of breaker transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// Service name.
    pub service: Arc<str>,
    /// Previous state.
    pub from: &'static str,
    /// New state.
    pub to: &'static str,
}

/// Labels of cache outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// Route id.
    pub route: Arc<str>,
    /// `hit`, `miss`, `bypass`.
    pub outcome: &'static str,
}

/// Labels of idempotency outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdempotencyLabels {
    /// Route id.
    pub route: Arc<str>,
    /// `first`, `replayed`, `conflict`, `mismatch`, `store_error`.
    pub outcome: &'static str,
}

/// Labels of WebSocket outcome series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WsLabels {
    /// Route id.
    pub route: Arc<str>,
    /// `upgraded`, `refused`, `upstream_refused`, `bad_upstream`, `closed`, `token_expired`, …
    pub outcome: &'static str,
}

/// Labels of WebSocket byte series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WsBytesLabels {
    /// Route id.
    pub route: Arc<str>,
    /// `to_upstream` or `to_client`.
    pub direction: &'static str,
}

/// Labels of per-route gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route id.
    pub route: Arc<str>,
}

/// All metric families, registered once per process.
pub struct Metrics {
    registry: Registry,
    requests: Family<HttpLabels, Counter>,
    duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    in_flight: Gauge,
    connections: Gauge,
    auth_attempts: Family<AuthLabels, Counter>,
    auth_failures: Family<AuthFailureLabels, Counter>,
    ratelimit: Family<RateLimitLabels, Counter>,
    /// The rate-limit series, resolved at start ([`RL_SCOPES`] × [`RL_OUTCOMES`]): a decision
    /// counts with one atomic add instead of a locked, hashed family lookup.
    ratelimit_series: [[Counter; RL_OUTCOMES.len()]; RL_SCOPES.len()],
    /// Successful authentications by method ([`AUTH_METHODS`]), resolved at start.
    auth_series: [Counter; AUTH_METHODS.len()],
    redis_errors: Family<RedisErrorLabels, Counter>,
    redis_latency: Histogram,
    upstream_requests: Family<InstanceLabels, Counter>,
    upstream_duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    upstream_connections: Family<ServiceLabels, Counter>,
    breaker_state: Family<ServiceLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    retries: Family<ServiceLabels, Counter>,
    retry_budget_exhausted: Family<ServiceLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    cache: Family<CacheLabels, Counter>,
    idempotency: Family<IdempotencyLabels, Counter>,
    /// Trading halt: 1 when engaged.
    pub halted: Gauge,
    /// Requests whose handling panicked (answered 500).
    pub panics: Counter,
    /// Bytes held by the in-memory response cache.
    pub cache_bytes: Gauge,
    ws_events: Family<WsLabels, Counter>,
    ws_bytes: Family<WsBytesLabels, Counter>,
    ws_active: Family<RouteLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
    admin_requests: Family<ReloadLabels, Counter>,
    request_size: Family<RouteLabels, Histogram, fn() -> Histogram>,
    response_size: Family<RouteLabels, Histogram, fn() -> Histogram>,
    overhead: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

/// Size buckets: 64 B to 16 MiB, ×4.
fn size_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(64.0, 4.0, 10))
}

/// Labels of the reload and admin-request series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure` (reloads); `ok`, `unauthorized`, `refused`, `error` (admin).
    pub outcome: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    /// Creates and registers every family under the `b25_gateway_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("b25_gateway");
        let requests = Family::<HttpLabels, Counter>::default();
        let duration = Family::<HttpLabels, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let in_flight = Gauge::default();
        let connections = Gauge::default();
        let auth_attempts = Family::<AuthLabels, Counter>::default();
        let auth_failures = Family::<AuthFailureLabels, Counter>::default();
        let ratelimit = Family::<RateLimitLabels, Counter>::default();
        let redis_errors = Family::<RedisErrorLabels, Counter>::default();
        let redis_latency = Histogram::new(DURATION_BUCKETS);
        registry.register("ratelimit_decisions", "Rate-limit decisions by scope and outcome", ratelimit.clone());
        registry.register("redis_errors", "Failed or timed-out Redis calls", redis_errors.clone());
        registry.register("redis_call_duration_seconds", "Latency of Redis calls", redis_latency.clone());
        let upstream_requests = Family::<InstanceLabels, Counter>::default();
        let upstream_duration =
            Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        let breaker_state = Family::<ServiceLabels, Gauge>::default();
        let breaker_transitions = Family::<TransitionLabels, Counter>::default();
        let retries = Family::<ServiceLabels, Counter>::default();
        let upstream_connections = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "upstream_connections_opened",
            "New upstream TCP connections per service (a healthy pool reuses them)",
            upstream_connections.clone(),
        );
        let retry_budget_exhausted = Family::<ServiceLabels, Counter>::default();
        let ejections = Family::<EjectionLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Upstream tries by service, instance and status (0: transport failure)",
            upstream_requests.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Time to the upstream's response headers, per try",
            upstream_duration.clone(),
        );
        registry.register(
            "circuit_breaker_state",
            "Breaker state per service: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        registry.register("circuit_breaker_transitions", "Breaker state changes", breaker_transitions.clone());
        registry.register("upstream_retries", "Retries sent per service", retries.clone());
        registry.register(
            "retry_budget_exhausted",
            "Retries refused by the retry budget",
            retry_budget_exhausted.clone(),
        );
        registry.register("outlier_ejections", "Instances ejected by passive outlier detection", ejections.clone());
        let cache = Family::<CacheLabels, Counter>::default();
        let idempotency = Family::<IdempotencyLabels, Counter>::default();
        let halted = Gauge::default();
        let cache_bytes = Gauge::default();
        registry.register("cache_requests", "Response-cache outcomes by route: hit, miss, bypass", cache.clone());
        registry.register("cache_bytes", "Bytes held by the in-memory response cache", cache_bytes.clone());
        registry.register("idempotency_requests", "Idempotency-key outcomes by route", idempotency.clone());
        registry.register("trading_halted", "1 while the trading halt is engaged", halted.clone());
        let ws_events = Family::<WsLabels, Counter>::default();
        let ws_bytes = Family::<WsBytesLabels, Counter>::default();
        let ws_active = Family::<RouteLabels, Gauge>::default();
        registry.register("websocket_events", "WebSocket upgrades and closes by route and outcome", ws_events.clone());
        registry.register(
            "websocket_message_bytes",
            "WebSocket payload bytes relayed by route and direction",
            ws_bytes.clone(),
        );
        registry.register("websocket_connections_active", "Open WebSocket connections by route", ws_active.clone());
        let request_size = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(size_histogram);
        let response_size = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(size_histogram);
        let overhead = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        registry.register("http_request_size_bytes", "Request body bytes by route", request_size.clone());
        registry.register("http_response_size_bytes", "Response body bytes by route", response_size.clone());
        registry.register(
            "gateway_overhead_seconds",
            "Gateway time per proxied request: time to response headers minus the upstream's",
            overhead.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("config_reloads", "Configuration reloads by outcome", reloads.clone());
        for outcome in ["success", "failure"] {
            let _ = reloads.get_or_create(&ReloadLabels { outcome });
        }
        let admin_requests = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "admin_requests",
            "Admin API (/admin/*) requests by outcome: ok, unauthorized (admin token missing or wrong), refused (another 4xx), error",
            admin_requests.clone(),
        );
        for outcome in ["ok", "unauthorized", "refused", "error"] {
            let _ = admin_requests.get_or_create(&ReloadLabels { outcome });
        }
        registry.register("auth_attempts", "Authentication attempts by method", auth_attempts.clone());
        registry.register(
            "auth_failures",
            "Authentication and authorisation failures by method and reason",
            auth_failures.clone(),
        );
        registry.register("http_requests", "HTTP requests by route, method and status", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time from request received to response body finished, by route, method and status",
            duration.clone(),
        );
        registry.register("upstream_errors", "Upstream failures by service and kind", upstream_errors.clone());
        registry.register("http_requests_in_flight", "Requests being served", in_flight.clone());
        registry.register("connections_active", "Open client connections", connections.clone());
        // A gauge rather than an OpenMetrics `info`, which the Prometheus text format lacks.
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION"), commit: crate::version::GIT_COMMIT })
            .set(1);
        registry.register("build_info", "Build information (always 1)", build);
        let panics = Counter::default();
        registry.register(
            "panics",
            "Requests whose handling panicked (a bug): each was answered 500 and the gateway went on",
            panics.clone(),
        );
        registry.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because the output could not keep up",
            access::DROPPED.clone(),
        );
        let ratelimit_series = RL_SCOPES.map(|scope| {
            RL_OUTCOMES.map(|outcome| ratelimit.get_or_create(&RateLimitLabels { scope, outcome }).clone())
        });
        let auth_series = AUTH_METHODS.map(|method| auth_attempts.get_or_create(&AuthLabels { method }).clone());
        Self {
            registry,
            requests,
            duration,
            upstream_errors,
            in_flight,
            connections,
            auth_attempts,
            auth_failures,
            ratelimit,
            ratelimit_series,
            auth_series,
            redis_errors,
            redis_latency,
            upstream_requests,
            upstream_duration,
            upstream_connections,
            breaker_state,
            breaker_transitions,
            retries,
            retry_budget_exhausted,
            ejections,
            cache,
            idempotency,
            halted,
            panics,
            cache_bytes,
            ws_events,
            ws_bytes,
            ws_active,
            reloads,
            admin_requests,
            request_size,
            response_size,
            overhead,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format (0.0.4), for scrapers and tools that do not ask for
    /// OpenMetrics (`promtool check metrics`, curl): counter families are named with their
    /// `_total` suffix, and there is no `# EOF`.
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, service: &Arc<str>, kind: &'static str) {
        self.upstream_errors.get_or_create(&UpstreamErrorLabels { service: service.clone(), kind }).inc();
    }

    /// Counts an authentication attempt, and its failure reason if it failed.
    pub fn auth_attempt(&self, method: &'static str, failure: Option<&'static str>) {
        match failure {
            None => match AUTH_METHODS.iter().position(|&m| m == method) {
                Some(i) => self.auth_series[i].inc(),
                None => self.auth_attempts.get_or_create(&AuthLabels { method }).inc(),
            },
            Some(reason) => {
                if reason != "forbidden" {
                    self.auth_attempts.get_or_create(&AuthLabels { method }).inc();
                }
                self.auth_failures.get_or_create(&AuthFailureLabels { method, reason }).inc()
            }
        };
    }

    /// Counts a rate-limit decision.
    pub fn ratelimit(&self, scope: &'static str, outcome: &'static str) {
        let s = RL_SCOPES.iter().position(|&x| x == scope);
        let o = RL_OUTCOMES.iter().position(|&x| x == outcome);
        match (s, o) {
            (Some(s), Some(o)) => self.ratelimit_series[s][o].inc(),
            _ => self.ratelimit.get_or_create(&RateLimitLabels { scope, outcome }).inc(),
        };
    }

    /// Counts a Redis failure.
    pub fn redis_error(&self, kind: &'static str) {
        self.redis_errors.get_or_create(&RedisErrorLabels { kind }).inc();
    }

    /// Observes a Redis call's latency.
    pub fn redis_latency(&self, d: std::time::Duration) {
        self.redis_latency.observe(d.as_secs_f64());
    }

    /// Counts one upstream try.
    pub fn upstream_request(&self, service: &Arc<str>, instance: &Arc<str>, status: u16) {
        self.upstream_requests
            .get_or_create(&InstanceLabels { service: service.clone(), instance: instance.clone(), status })
            .inc();
    }

    /// Records a breaker transition and the new state.
    pub fn breaker(&self, service: &Arc<str>, from: &'static str, to: &'static str, state: i64) {
        self.breaker_state.get_or_create(&ServiceLabels { service: service.clone() }).set(state);
        self.breaker_transitions.get_or_create(&TransitionLabels { service: service.clone(), from, to }).inc();
    }

    /// Counts a retry.
    pub fn retry(&self, service: &Arc<str>) {
        self.retries.get_or_create(&ServiceLabels { service: service.clone() }).inc();
    }

    /// Counts a retry refused by the budget.
    pub fn retry_budget_exhausted(&self, service: &Arc<str>) {
        self.retry_budget_exhausted.get_or_create(&ServiceLabels { service: service.clone() }).inc();
    }

    /// Counts an outlier ejection.
    pub fn ejection(&self, service: &Arc<str>, instance: &Arc<str>) {
        self.ejections.get_or_create(&EjectionLabels { service: service.clone(), instance: instance.clone() }).inc();
    }

    /// Counts a cache outcome.
    pub fn cache(&self, route: &Arc<str>, outcome: &'static str) {
        self.cache.get_or_create(&CacheLabels { route: route.clone(), outcome }).inc();
    }

    /// Counts an idempotency outcome.
    pub fn idempotency(&self, route: &Arc<str>, outcome: &'static str) {
        self.idempotency.get_or_create(&IdempotencyLabels { route: route.clone(), outcome }).inc();
    }

    /// Counts a WebSocket event.
    pub fn websocket(&self, route: &Arc<str>, outcome: &'static str) {
        self.ws_events.get_or_create(&WsLabels { route: route.clone(), outcome }).inc();
    }

    /// Moves the open-connections gauge of a route.
    pub fn websocket_active(&self, route: &Arc<str>, delta: i64) {
        self.ws_active.get_or_create(&RouteLabels { route: route.clone() }).inc_by(delta);
    }

    /// Counts relayed bytes.
    pub fn websocket_bytes(&self, route: &Arc<str>, to_upstream: u64, to_client: u64) {
        self.ws_bytes
            .get_or_create(&WsBytesLabels { route: route.clone(), direction: "to_upstream" })
            .inc_by(to_upstream);
        self.ws_bytes.get_or_create(&WsBytesLabels { route: route.clone(), direction: "to_client" }).inc_by(to_client);
    }

    /// Counts a reload.
    pub fn reload(&self, outcome: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { outcome }).inc();
    }

    /// Counts an admin API request by outcome.
    pub fn admin_request(&self, outcome: &'static str) {
        self.admin_requests.get_or_create(&ReloadLabels { outcome }).inc();
    }

    /// Creates the series a snapshot will use, at zero, so dashboards and alerts see every
    /// family from the first scrape (prometheus-client omits families without series).
    pub fn prime(&self, snap: &crate::snapshot::Snapshot) {
        for (name, up) in &snap.upstreams {
            let service: Arc<str> = name.as_str().into();
            let _ = self.breaker_state.get_or_create(&ServiceLabels { service: service.clone() });
            let _ = self.retries.get_or_create(&ServiceLabels { service: service.clone() });
            let _ = self.retry_budget_exhausted.get_or_create(&ServiceLabels { service: service.clone() });
            let _ = self.upstream_duration.get_or_create(&ServiceLabels { service: service.clone() });
            for kind in
                ["upstream_unavailable", "upstream_reset", "upstream_timeout", "no_healthy_upstream", "circuit_open"]
            {
                let _ = self.upstream_errors.get_or_create(&UpstreamErrorLabels { service: service.clone(), kind });
            }
            for inst in up.instances() {
                let _ = self
                    .ejections
                    .get_or_create(&EjectionLabels { service: service.clone(), instance: inst.label.clone() });
            }
        }
        for kind in ["error", "timeout", "refused"] {
            let _ = self.redis_errors.get_or_create(&RedisErrorLabels { kind });
        }
        for method in ["jwt", "api_key", "none"] {
            let _ = self.auth_attempts.get_or_create(&AuthLabels { method });
        }
        for r in &snap.config.routes {
            let route: Arc<str> = r.id.as_str().into();
            if r.cache.is_some() {
                for outcome in ["hit", "miss", "bypass"] {
                    let _ = self.cache.get_or_create(&CacheLabels { route: route.clone(), outcome });
                }
            }
            if r.idempotency.is_some() {
                for outcome in ["first", "replayed", "conflict", "mismatch", "store_error"] {
                    let _ = self.idempotency.get_or_create(&IdempotencyLabels { route: route.clone(), outcome });
                }
            }
            if r.websocket {
                let _ = self.ws_active.get_or_create(&RouteLabels { route: route.clone() });
                let _ = self.ws_events.get_or_create(&WsLabels { route: route.clone(), outcome: "upgraded" });
            }
        }
    }

    /// The open-connections gauge.
    pub fn connections(&self) -> &Gauge {
        &self.connections
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A route's metric handles, resolved when the snapshot is built (no label hashing per request).
#[derive(Debug)]
pub struct RouteMetrics {
    request_size: Histogram,
    response_size: Histogram,
    overhead: Histogram,
    /// (requests counter, duration histogram) per common (method, status), filled on first use.
    by_status: Box<[std::sync::OnceLock<(Counter, Histogram)>]>,
}

/// Statuses that get a pre-resolved slot; others use the family lookup.
const COMMON_STATUSES: [u16; 24] = [
    101, 200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 405, 408, 409, 413, 414, 415, 422, 429, 500, 502, 503,
    504,
];
const METHODS: [&str; 10] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "OTHER"];

/// The index of a status in `COMMON_STATUSES`.
fn common_status(status: u16) -> Option<usize> {
    COMMON_STATUSES.iter().position(|x| *x == status)
}

fn slot(method: &'static str, status: u16) -> Option<usize> {
    let m = METHODS.iter().position(|x| *x == method)?;
    Some(m * COMMON_STATUSES.len() + common_status(status)?)
}

impl Metrics {
    /// Resolves the handles of one route.
    pub fn route(&self, route: &Arc<str>) -> Arc<RouteMetrics> {
        let l = RouteLabels { route: route.clone() };
        Arc::new(RouteMetrics {
            request_size: self.request_size.get_or_create_owned(&l),
            response_size: self.response_size.get_or_create_owned(&l),
            overhead: self.overhead.get_or_create_owned(&l),
            by_status: (0..METHODS.len() * COMMON_STATUSES.len()).map(|_| std::sync::OnceLock::new()).collect(),
        })
    }
}

/// One service's pre-resolved upstream series: the time-to-headers histogram, and the
/// per-instance request counters for transport failures (status 0) and common statuses.
pub struct UpstreamMetrics {
    service: Arc<str>,
    instances: Box<[Arc<str>]>,
    duration: Histogram,
    connections: Counter,
    /// `[instance][slot]`: slot 0 is status 0, then `COMMON_STATUSES` in order.
    requests: Box<[Box<[std::sync::OnceLock<Counter>]>]>,
}

impl UpstreamMetrics {
    /// Observes one try's time to response headers.
    pub fn latency(&self, d: std::time::Duration) {
        self.duration.observe(d.as_secs_f64());
    }

    /// Counts a new upstream connection.
    pub fn opened(&self) {
        self.connections.inc();
    }

    /// Counts one try on instance `idx` with its status (0: transport failure).
    pub fn request(&self, metrics: &Metrics, idx: usize, status: u16) {
        let slot = if status == 0 { Some(0) } else { common_status(status).map(|i| i + 1) };
        if let (Some(per), Some(i)) = (self.requests.get(idx), slot) {
            per[i]
                .get_or_init(|| {
                    metrics.upstream_requests.get_or_create_owned(&InstanceLabels {
                        service: self.service.clone(),
                        instance: self.instances[idx].clone(),
                        status,
                    })
                })
                .inc();
        } else {
            let instance = self.instances.get(idx).cloned().unwrap_or_else(|| "".into());
            metrics.upstream_request(&self.service, &instance, status);
        }
    }
}

impl Metrics {
    /// Resolves the upstream series of one service.
    pub fn upstream(&self, service: &Arc<str>, instances: &[Arc<str>]) -> UpstreamMetrics {
        UpstreamMetrics {
            service: service.clone(),
            instances: instances.into(),
            duration: self.upstream_duration.get_or_create_owned(&ServiceLabels { service: service.clone() }),
            connections: self.upstream_connections.get_or_create_owned(&ServiceLabels { service: service.clone() }),
            requests: instances
                .iter()
                .map(|_| (0..=COMMON_STATUSES.len()).map(|_| std::sync::OnceLock::new()).collect())
                .collect(),
        }
    }
}

/// A method as a bounded label value.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// What is known about one request, finished when its response body ends.
pub struct RequestRecord {
    /// When the request arrived.
    pub start: Instant,
    /// Its request id.
    pub request_id: HeaderValue,
    /// Its method.
    pub method: Method,
    /// Route id label.
    pub route: Arc<str>,
    /// The path as received (only kept when the access log is on).
    pub path: Option<Box<str>>,
    /// Response status.
    pub status: u16,
    /// Time to the upstream's response headers, if an upstream was called.
    pub upstream_us: Option<u64>,
    /// The client (TCP peer).
    pub client_ip: IpAddr,
    /// Request body bytes (counted as they stream) and how the body ended; `None` until a
    /// body is read (most requests have none: no allocation for them).
    pub body: Option<Arc<crate::body::BodyStats>>,
    /// Response body bytes.
    pub bytes_out: u64,
    /// The response body ended with an error or the client went away.
    pub aborted: bool,
    /// Where to count.
    pub metrics: Arc<Metrics>,
    /// Whether to write the access line.
    pub access_log: bool,
    /// W3C trace id, when the request went upstream.
    pub trace_id: Option<crate::pipeline::trace::TraceId>,
    /// Time to the response headers (µs).
    pub headers_us: Option<u64>,
    /// The matched route's pre-resolved handles.
    pub route_metrics: Option<Arc<RouteMetrics>>,
    /// The gateway's own response headers (`X-Request-Id`, `RateLimit-*`) are for the
    /// connection's writer to put in the head, not in the response's header map: see
    /// [`OwnHeaders`].
    pub own_headers: Option<OwnHeaders>,
}

/// The gateway's own response headers, written by the native HTTP/1.1 connection straight
/// into the response head (as the hop's headers are on the upstream leg) instead of being
/// inserted into the response's `HeaderMap`: three `RateLimit-*` values formatted into
/// header values and four hashed inserts were ≈ 2k instructions per request (callgrind,
/// gw-full); `Server-Timing` likewise. HTTP/2 responses (hyper's writer) keep them in the map.
#[derive(Debug, Clone, Copy)]
pub struct OwnHeaders {
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds), when the
    /// response carries the rate-limit headers.
    pub ratelimit: Option<[u64; 3]>,
    /// `Server-Timing`: time to the response headers and the upstream's share (µs), when
    /// `logging.server_timing` is on.
    pub server_timing: Option<(u64, Option<u64>)>,
}

/// `gateway;dur=0.042, upstream;dur=1.250` (milliseconds, three decimals; the gateway's
/// share is the total minus the upstream's) without the formatting machinery: this runs on
/// every response.
pub fn push_server_timing(out: &mut Vec<u8>, total_us: u64, upstream_us: Option<u64>) {
    fn ms(out: &mut Vec<u8>, us: u64) {
        crate::push_decimal(out, us / 1000);
        let frac = us % 1000;
        out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }
    out.extend_from_slice(b"gateway;dur=");
    ms(out, total_us.saturating_sub(upstream_us.unwrap_or(0)));
    if let Some(up) = upstream_us {
        out.extend_from_slice(b", upstream;dur=");
        ms(out, up);
    }
}

impl RequestRecord {
    /// The request body's shared counters, made on first use.
    pub fn body_stats(&mut self) -> Arc<crate::body::BodyStats> {
        self.body.get_or_insert_with(Default::default).clone()
    }

    /// Request body bytes received so far.
    pub fn bytes_in(&self) -> u64 {
        self.body.as_ref().map_or(0, |b| b.bytes.load(Ordering::Relaxed))
    }

    /// Records metrics and writes the access log line.
    pub fn finish(self) {
        let elapsed = self.start.elapsed();
        let method = method_label(&self.method);
        let fast = self.route_metrics.as_ref().zip(slot(method, self.status));
        match fast {
            // Pre-resolved handles: no label hashing, no lock.
            Some((rm, i)) => {
                let (c, h) = rm.by_status[i].get_or_init(|| {
                    let labels = HttpLabels { route: self.route.clone(), method, status: self.status };
                    (
                        self.metrics.requests.get_or_create_owned(&labels),
                        self.metrics.duration.get_or_create_owned(&labels),
                    )
                });
                c.inc();
                h.observe(elapsed.as_secs_f64());
            }
            None => {
                let labels = HttpLabels { route: self.route.clone(), method, status: self.status };
                self.metrics.requests.get_or_create(&labels).inc();
                self.metrics.duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
            }
        }
        let rm = match &self.route_metrics {
            Some(rm) => rm.clone(),
            None => self.metrics.route(&self.route),
        };
        rm.request_size.observe(self.bytes_in() as f64);
        rm.response_size.observe(self.bytes_out as f64);
        if let Some(up) = self.upstream_us
            && let Some(head) = self.headers_us
        {
            rm.overhead.observe(head.saturating_sub(up) as f64 / 1e6);
        }
        self.metrics.in_flight.dec();
        if self.access_log && access::enabled() {
            let line = access::Line {
                request_id: self.request_id.as_bytes(),
                method: self.method.as_str(),
                route: &self.route,
                path: self.path.as_deref().unwrap_or(""),
                status: self.status,
                bytes_in: self.bytes_in(),
                bytes_out: self.bytes_out,
                duration_us: elapsed.as_micros() as u64,
                upstream_us: self.upstream_us,
                client_ip: self.client_ip,
                trace_id: self.trace_id.as_ref().map(|t| t.as_str()),
                aborted: self.aborted,
            };
            if access::write(&line) {
                return;
            }
            tracing::info!(
                target: "access",
                request_id = self.request_id.to_str().unwrap_or(""),
                method = self.method.as_str(),
                route = &*self.route,
                path = self.path.as_deref().unwrap_or(""),
                status = self.status,
                bytes_in = self.bytes_in(),
                bytes_out = self.bytes_out,
                duration_us = elapsed.as_micros() as u64,
                upstream_us = self.upstream_us,
                client_ip = %self.client_ip,
                trace_id = self.trace_id.as_ref().map(|t| t.as_str()),
                aborted = self.aborted,
            );
        }
    }

    /// The record of a request arriving now, before anything about it is measured.
    pub fn new(
        metrics: &Arc<Metrics>,
        request_id: HeaderValue,
        method: Method,
        route: Arc<str>,
        path: Option<Box<str>>,
        client_ip: IpAddr,
        access_log: bool,
    ) -> Self {
        Self {
            start: Instant::now(),
            request_id,
            method,
            route,
            path,
            status: 0,
            upstream_us: None,
            client_ip,
            body: None,
            bytes_out: 0,
            aborted: false,
            metrics: metrics.clone(),
            access_log,
            trace_id: None,
            headers_us: None,
            route_metrics: None,
            own_headers: None,
        }
    }

    /// Marks the request as in flight (paired with the decrement in [`finish`](Self::finish)).
    pub fn started(metrics: &Metrics) {
        metrics.in_flight.inc();
    }

    /// Requests currently in flight.
    pub fn in_flight(metrics: &Metrics) -> i64 {
        metrics.in_flight.get()
    }
}

/// Lines queued for the log writer thread (the access log has its own queue).
const LOG_QUEUE_LINES: usize = 4096;

/// The log writers; keep it alive to flush at exit.
pub struct LogGuard {
    _access: Option<access::Guard>,
    _events: tracing_appender::non_blocking::WorkerGuard,
}

/// Installs the global subscriber: JSON (or text) lines through a non-blocking stdout writer,
/// and the access log's own writer. `RUST_LOG` overrides the configured level.
pub fn init_logging(cfg: &crate::config::LoggingConfig) -> LogGuard {
    use tracing_subscriber::EnvFilter;
    // The queue to the writer thread is allocated (and touched) whole at start: the default
    // 128 000 lines were 4 MiB of resident memory on an idle gateway. The access log has its
    // own queue (observe/access.rs); beyond the queue, lines are dropped, never the request
    // thread blocked.
    // Lines are written in batches (the writer thread flushes when its queue is empty): not a
    // `write` system call per line.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()));
    let access = access::install(cfg.format == crate::config::LogFormat::Json);
    // The access log has its own switch (`logging.access_log`, read per request): its lines
    // pass whatever `logging.level` is. `RUST_LOG` replaces both (`access=off` silences it).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let f = EnvFilter::new(&cfg.level);
        match "access=info".parse() {
            Ok(d) => f.add_directive(d),
            Err(_) => f,
        }
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = match cfg.format {
        crate::config::LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init()
        }
        // Colours only for a terminal: a file or a log collector gets plain text.
        crate::config::LogFormat::Text => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())).try_init()
        }
    };
    access::decide_enabled();
    // A panic is logged as an error line in the configured format (not the default hook's
    // text on stderr), with where it happened; the request or task it ended is logged too.
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            location = %location,
            panic = crate::gateway::panic_text(info.payload()),
            "panic"
        );
    }));
    LogGuard { _access: access, _events: guard }
}

/// Converts prometheus-client's OpenMetrics text to the Prometheus text format.
pub fn to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        om.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}
