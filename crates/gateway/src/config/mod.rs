//! Typed configuration: schema, defaults, `${ENV}` expansion, loading and validation.
//!
//! Loading is a pipeline that collects every problem before giving up, like `nginx -t`:
//! 1. read the file and parse YAML into a tree (a syntax error stops here, with line and column);
//! 2. expand `${VAR}` / `${VAR:-default}` in string values ([`expand`]), naming the path of each
//!    unset variable;
//! 3. deserialize each section, each service and each route on its own, so one bad route does
//!    not hide the errors of the next; unknown fields and bad values are reported with their path
//!    and the walk goes on;
//! 4. check meaning ([`validate`]): unknown services, duplicate ids, conflicting paths, bad URLs.
//!
//! Defaults are `DEFAULT_*` constants with a comment on why that value.

pub mod expand;
pub mod resilience;
pub mod security;
pub mod state;
pub mod units;
mod validate;

pub use security::{AuthConfig, AuthMethod, CorsConfig, Secret};
pub use state::{LimitConfig, RateLimitsConfig, StateConfig};
pub use units::{ByteSize, HumanDuration};

use crate::proxy::headers::{EditSide, HeaderEdit};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Main listener: all interfaces, the conventional alternative HTTP port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Admin listener: loopback only, as Envoy's admin port, because it exposes internals.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Kubernetes' default termination grace period is 30 s; draining must fit inside it.
pub const DEFAULT_SHUTDOWN_GRACE: HumanDuration = HumanDuration::from_secs(25);
/// Time readiness reports 503 before listeners close, so load balancers stop sending first.
pub const DEFAULT_SHUTDOWN_DELAY: HumanDuration = HumanDuration::from_secs(0);
/// Request bodies above this are refused; orders and configs are small JSON documents.
pub const DEFAULT_MAX_BODY: ByteSize = ByteSize::mib(1);
/// Header block limit; 16 KiB fits large JWTs while bounding memory per connection.
pub const DEFAULT_MAX_HEADER_BYTES: ByteSize = ByteSize::kib(16);
/// Maximum number of request headers (hyper's own default is 100).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Longest request target; 8 KiB is what nginx and most CDNs accept.
pub const DEFAULT_MAX_URI_LENGTH: ByteSize = ByteSize::kib(8);
/// A client that stops sending its body for this long is dropped (slow-body protection).
pub const DEFAULT_BODY_IDLE_TIMEOUT: HumanDuration = HumanDuration::from_secs(10);
/// A client must finish sending its headers within this time (slowloris protection).
pub const DEFAULT_HEADER_TIMEOUT: HumanDuration = HumanDuration::from_secs(10);
/// Upstream response-header timeout when neither route nor service sets one.
pub const DEFAULT_UPSTREAM_TIMEOUT: HumanDuration = HumanDuration::from_secs(10);
/// TCP connect timeout to an upstream; loopback or LAN peers answer in well under a second.
pub const DEFAULT_CONNECT_TIMEOUT: HumanDuration = HumanDuration::from_secs(1);
/// Idle pooled upstream connections are closed after this; below common upstream keep-alive
/// timeouts (nginx 75 s, Go 90 s) would be safer, so 30 s.
pub const DEFAULT_POOL_IDLE_TIMEOUT: HumanDuration = HumanDuration::from_secs(30);
/// An upstream response body that sends nothing for this long is cut (nginx's
/// `proxy_read_timeout` is 60 s; Envoy's stream idle timeout 5 min).
pub const DEFAULT_RESPONSE_IDLE_TIMEOUT: HumanDuration = HumanDuration::from_secs(60);
/// Idle pooled connections kept per upstream instance.
pub const DEFAULT_POOL_MAX_IDLE: usize = 512;
/// Health-check path served by every B25 service.
pub const DEFAULT_HEALTH_PATH: &str = "/health";
/// Active health-check interval.
pub const DEFAULT_HEALTH_INTERVAL: HumanDuration = HumanDuration::from_secs(5);
/// Active health-check timeout.
pub const DEFAULT_HEALTH_TIMEOUT: HumanDuration = HumanDuration::from_secs(1);
/// Consecutive failed checks before an instance is marked unhealthy.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;
/// Consecutive passed checks before an unhealthy instance is used again.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;

/// The whole gateway configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, TLS, limits, shutdown.
    #[serde(default)]
    pub server: ServerConfig,
    /// Log level and access log.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Authentication and roles.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Cross-origin resource sharing; absent means no CORS headers and no preflights.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// Where shared state (rate limits, later cache and idempotency) lives.
    #[serde(default)]
    pub state: StateConfig,
    /// Rate limits that apply to every route.
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    /// The response cache's store.
    #[serde(default)]
    pub cache: CacheStoreConfig,
    /// Trading halt.
    #[serde(default)]
    pub trading: TradingConfig,
    /// WebSocket proxying.
    #[serde(default)]
    pub websocket: WebSocketConfig,
    /// Upstream services by name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// The route table.
    pub routes: Vec<RouteConfig>,
}

/// `server:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Main listener address (`host:port`).
    pub listen: String,
    /// Admin listener (`/metrics`, later `/admin/*`); empty string disables it.
    pub admin_listen: String,
    /// TLS termination on the main listener.
    pub tls: Option<TlsConfig>,
    /// Serve HTTP/2 (ALPN `h2` over TLS, prior-knowledge h2c in clear text).
    pub http2: bool,
    /// Which HTTP/1.1 server connection serves clients: `native` (the gateway's own, the
    /// default) or `hyper`. Read at start.
    pub http1: Http1Engine,
    /// In-flight requests get this long to finish after SIGTERM.
    pub shutdown_grace: HumanDuration,
    /// Readiness reports 503 this long before the listeners close.
    pub shutdown_delay: HumanDuration,
    /// Services that must have a healthy instance for readiness to be 200.
    pub required_services: Vec<String>,
    /// Reload automatically when the config file changes (checked every second).
    pub watch_config: bool,
    /// Worker threads serving connections, each with its own single-threaded runtime
    /// (0: one per CPU). Read at start; a reload does not change it.
    pub workers: usize,
    /// Bearer token required by the admin API (`/admin/*`); without it the admin listener
    /// must be on loopback.
    pub admin_token: Option<Secret>,
    /// Client-side limits.
    pub limits: LimitsConfig,
    /// CIDRs of proxies whose X-Forwarded-For is trusted (used by rate limiting).
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            tls: None,
            http2: true,
            http1: Http1Engine::Native,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            shutdown_delay: DEFAULT_SHUTDOWN_DELAY,
            limits: LimitsConfig::default(),
            trusted_proxies: Vec::new(),
            required_services: Vec::new(),
            admin_token: None,
            watch_config: false,
            workers: 0,
        }
    }
}

impl ServerConfig {
    /// The number of worker threads `workers` asks for (0: one per CPU).
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// PEM certificate chain and private key paths.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `server.limits:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body accepted (per-route override in `routes[].max_body`).
    pub max_body: ByteSize,
    /// Largest request header block.
    pub max_header_bytes: ByteSize,
    /// Most request headers (431 above).
    pub max_headers: usize,
    /// Longest request target (path and query) accepted (414 above).
    pub max_uri_length: ByteSize,
    /// A request body that sends nothing for this long is abandoned (408).
    pub body_idle_timeout: HumanDuration,
    /// Time allowed to receive the request headers. For HTTP/1 it also bounds how long an
    /// idle keep-alive connection may wait for its next request (hyper starts the header timer
    /// when it begins waiting for a request head).
    pub header_timeout: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_uri_length: DEFAULT_MAX_URI_LENGTH,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }
}

/// `logging:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG` overrides it.
    pub level: String,
    /// One JSON line per request.
    pub access_log: bool,
    /// `json` (default) or `text` for humans at a terminal.
    pub format: LogFormat,
    /// Add a `Server-Timing` header (gateway and upstream time) to responses.
    pub server_timing: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { level: "info".into(), access_log: true, format: LogFormat::Json, server_timing: true }
    }
}

/// The client-facing HTTP/1.1 implementation.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Http1Engine {
    /// The gateway's own connection (`server/h1.rs`): fewer instructions per request.
    #[default]
    Native,
    /// hyper's server connection.
    Hyper,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable.
    Text,
}

/// One upstream service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Instances: `http://host:port`, or `{ url, weight }`.
    pub instances: Vec<resilience::InstanceConfig>,
    /// Instance choice.
    #[serde(default)]
    pub load_balancing: resilience::LoadBalancingConfig,
    /// Passive ejection of failing instances.
    #[serde(default)]
    pub outlier_detection: resilience::OutlierConfig,
    /// The service's circuit breaker.
    #[serde(default)]
    pub circuit_breaker: resilience::BreakerConfig,
    /// Retries (only where safe; never a POST that may have been sent).
    #[serde(default)]
    pub retry: resilience::RetryConfig,
    /// Time to wait for the response headers (routes may override).
    #[serde(default = "default_upstream_timeout")]
    pub timeout: HumanDuration,
    /// TCP connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Idle pooled connections are closed after this.
    #[serde(default = "default_pool_idle_timeout")]
    pub pool_idle_timeout: HumanDuration,
    /// Most idle pooled connections per instance.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    /// A response body the upstream sends nothing of for this long is cut.
    #[serde(default = "default_response_idle_timeout")]
    pub response_idle_timeout: HumanDuration,
    /// Active health checking.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
}

fn default_upstream_timeout() -> HumanDuration {
    DEFAULT_UPSTREAM_TIMEOUT
}
fn default_connect_timeout() -> HumanDuration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_response_idle_timeout() -> HumanDuration {
    DEFAULT_RESPONSE_IDLE_TIMEOUT
}
fn default_pool_idle_timeout() -> HumanDuration {
    DEFAULT_POOL_IDLE_TIMEOUT
}
fn default_pool_max_idle() -> usize {
    DEFAULT_POOL_MAX_IDLE
}

/// `services.*.health_check:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Turn active checks off (instances are then always considered healthy).
    pub enabled: bool,
    /// Path requested with GET on each instance.
    pub path: String,
    /// Time between checks.
    pub interval: HumanDuration,
    /// Time allowed for one check.
    pub timeout: HumanDuration,
    /// Consecutive failures before an instance is taken out.
    pub unhealthy_threshold: u32,
    /// Consecutive successes before it is used again.
    pub healthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: DEFAULT_HEALTH_PATH.into(),
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
        }
    }
}

/// One route of the table.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique id, used in metrics and logs (never the raw path).
    pub id: String,
    /// Path template: `/api/v1/orders/{id}`; static segments win over parameters.
    pub path: String,
    /// Allowed methods (upper case).
    pub methods: Vec<String>,
    /// Name of the service in `services`.
    pub service: String,
    /// Remove this prefix from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Put this prefix in front of the (stripped) path before forwarding.
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// Upstream response-header timeout for this route (overrides the service's).
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Behaviour while trading is halted.
    #[serde(default)]
    pub halt: HaltMode,
    /// A successful response engages the trading halt (the emergency stop).
    #[serde(default)]
    pub engage_halt: bool,
    /// Total tries for this route (overrides the service's `retry.attempts`).
    #[serde(default)]
    pub retry_attempts: Option<u32>,
    /// Largest request body for this route (overrides `server.limits.max_body`).
    #[serde(default)]
    pub max_body: Option<ByteSize>,
    /// Least roles allowed (enforced by the authentication layer).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Explicitly reachable without authentication.
    #[serde(default)]
    pub public: bool,
    /// Response caching policy.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Idempotency-Key handling (order routes).
    #[serde(default)]
    pub idempotency: Option<IdempotencyConfig>,
    /// The route is a WebSocket endpoint.
    #[serde(default)]
    pub websocket: bool,
    /// Authentication methods accepted (default: every configured method).
    #[serde(default)]
    pub auth: Option<Vec<AuthMethod>>,
    /// Accepted request `Content-Type`s (media type only, parameters ignored); requests with
    /// a body and another type get 415. Empty: any.
    #[serde(default)]
    pub content_types: Vec<String>,
    /// Headers a request must carry (400 otherwise).
    #[serde(default)]
    pub required_headers: Vec<String>,
    /// A body, when present, must be well-formed JSON within `max_json_depth` (400
    /// otherwise); POST/PUT/PATCH bodies are then read whole (bounded by `max_body` and
    /// `body_idle_timeout`) before anything is sent upstream, so a malformed or
    /// ambiguously framed body never reaches the service.
    #[serde(default)]
    pub json: bool,
    /// Deepest JSON nesting accepted on `json` routes.
    #[serde(default = "default_json_depth")]
    pub max_json_depth: usize,
    /// One budget for this route, shared by all callers.
    #[serde(default)]
    pub rate_limit: Option<LimitConfig>,
    /// A budget per principal on this route (e.g. new orders vs cancels get separate budgets
    /// because they are separate routes).
    #[serde(default)]
    pub principal_rate_limit: Option<LimitConfig>,
    /// Headers set on or removed from the request sent upstream. The values may be
    /// credentials for the upstream (`${…}`), so they are never shown.
    #[serde(default)]
    pub request_headers: Option<HeaderEdits<security::Secret>>,
    /// Headers set on or removed from the upstream's response.
    #[serde(default)]
    pub response_headers: Option<HeaderEdits<String>>,
}

/// `routes[].request_headers` and `routes[].response_headers`: what the gateway changes on
/// the way (Kong's request/response transformer, Envoy's `request_headers_to_add`/`_remove`,
/// Traefik's headers middleware).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderEdits<V> {
    /// Each header replaced by this value (added when absent).
    pub set: BTreeMap<String, V>,
    /// Headers removed (every value).
    pub remove: Vec<String>,
}

impl<V> Default for HeaderEdits<V> {
    fn default() -> Self {
        Self { set: BTreeMap::new(), remove: Vec::new() }
    }
}

/// Nesting depth for `json: true` routes: orders are 2–3 levels deep.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 32;

fn default_json_depth() -> usize {
    DEFAULT_MAX_JSON_DEPTH
}

/// `routes[].cache:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Time an entry is served.
    pub ttl: HumanDuration,
    /// `public` (shared) or `private` (keyed by principal).
    #[serde(default)]
    pub scope: CacheScope,
    /// Upstream statuses that are stored.
    #[serde(default = "default_cache_statuses")]
    pub statuses: Vec<u16>,
}

fn default_cache_statuses() -> Vec<u16> {
    vec![200, 203, 204, 301, 404]
}

/// `cache:` section (the response cache's store).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheStoreConfig {
    /// Byte budget of the in-memory cache (entries weighted by size).
    pub max_bytes: ByteSize,
    /// Largest response stored; larger ones pass through.
    pub max_entry_size: ByteSize,
}

impl Default for CacheStoreConfig {
    fn default() -> Self {
        Self { max_bytes: ByteSize::mib(64), max_entry_size: ByteSize::kib(256) }
    }
}

/// `trading:` section.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TradingConfig {
    /// Start with the trading halt engaged.
    pub halted: bool,
    /// How often instances re-read the shared halt state from Redis.
    pub halt_sync_interval: Option<HumanDuration>,
}

/// `websocket:` section: limits and token sources for `websocket: true` routes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// A connection with no message either way for this long is closed.
    pub idle_timeout: HumanDuration,
    /// Longest a connection may live.
    pub max_lifetime: HumanDuration,
    /// Open connections allowed in total.
    pub max_connections: usize,
    /// Open connections allowed per principal.
    pub max_per_principal: usize,
    /// Largest message relayed (frame-aware limit).
    pub max_message_size: ByteSize,
    /// Query parameter that may carry the token for browsers (removed before forwarding).
    pub token_query_param: Option<String>,
    /// `Sec-WebSocket-Protocol` entry prefix that may carry the token (e.g. `bearer.`); the
    /// entry is removed before forwarding.
    pub token_subprotocol_prefix: Option<String>,
    /// Close the connection (code 1008) when the JWT that opened it expires.
    pub close_on_token_expiry: bool,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            idle_timeout: HumanDuration::from_secs(300),
            max_lifetime: HumanDuration::from_secs(24 * 3600),
            max_connections: 10_000,
            max_per_principal: 20,
            max_message_size: ByteSize::mib(1),
            token_query_param: Some("access_token".into()),
            token_subprotocol_prefix: Some("bearer.".into()),
            close_on_token_expiry: true,
        }
    }
}

/// What a route does while trading is halted.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HaltMode {
    /// Keep working (reads, cancels, risk status).
    #[default]
    Allow,
    /// Answer 503 `trading_halted` (new orders, amends, strategy start).
    Block,
}

/// Who may share a cached response.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Shared by every caller.
    #[default]
    Public,
    /// Keyed by the authenticated principal.
    Private,
}

/// `routes[].idempotency:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Refuse requests without an `Idempotency-Key`.
    #[serde(default)]
    pub required: bool,
    /// How long a completed response is replayed.
    #[serde(default = "default_idempotency_ttl")]
    pub ttl: HumanDuration,
    /// A 5xx from the upstream releases the key so the client may retry.
    #[serde(default = "default_true_idem")]
    pub release_on_5xx: bool,
    /// Largest response body stored for replay.
    #[serde(default = "default_idem_max")]
    pub max_response_size: ByteSize,
}

fn default_true_idem() -> bool {
    true
}
fn default_idem_max() -> ByteSize {
    ByteSize::kib(64)
}

fn default_idempotency_ttl() -> HumanDuration {
    HumanDuration::from_secs(24 * 3600)
}

/// One problem in a config file, with the path of the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// `routes[3].service`, or empty for the document itself.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

/// Every problem found in one config file.
#[derive(Clone, Debug)]
pub struct ConfigErrors {
    /// The file, as given.
    pub file: String,
    /// All problems, in document order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(f, "{}: {n} configuration error{}", self.file, if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            writeln!(f, "{}: {e}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The largest config file read (the shipped one is ≈ 20 KiB).
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Reads, expands, parses and validates a config file from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, &expand::ProcessEnv)
}

/// [`load`] with another source of `${VAR}` values (the demo supplies its own secrets).
pub fn load_with(path: &Path, env: &dyn expand::Env) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let fail = |message: String| ConfigErrors { file: file.clone(), errors: vec![ConfigError::new("", message)] };
    // A regular file of bounded size: a device, a FIFO or a huge file given by mistake must not
    // block or exhaust memory before the YAML parser's own budget applies.
    match std::fs::metadata(path) {
        Err(e) => return Err(fail(format!("cannot read file: {e}"))),
        Ok(m) if !m.is_file() => return Err(fail("cannot read file: not a regular file".into())),
        Ok(m) if m.len() > MAX_CONFIG_BYTES => {
            return Err(fail(format!("file too large: {} bytes (at most {MAX_CONFIG_BYTES})", m.len())));
        }
        Ok(_) => {}
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(|e| fail(format!("cannot read file: {e}")))?,
            MAX_CONFIG_BYTES + 1,
        ),
        &mut text,
    )
    .map_err(|e| fail(format!("cannot read file: {e}")))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(format!("file too large (at most {MAX_CONFIG_BYTES} bytes)")));
    }
    parse(&text, &file, env)
}

/// Parses and validates config text; `file` is only used in messages.
pub fn parse(text: &str, file: &str, env: &dyn expand::Env) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors { file: file.to_string(), errors };
    let mut tree: Value = serde_saphyr::from_str(text)
        .map_err(|e| fail(vec![ConfigError::new("", format!("invalid YAML: {}", without_hints(&e.to_string())))]))?;
    let mut errors = Vec::new();
    expand::expand_tree(&mut tree, &mut String::new(), env, &mut errors);
    let config = deserialize_config(tree, &mut errors);
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => Err(fail(errors)),
    }
}

/// Deserializes section by section so that all structural errors are collected.
fn deserialize_config(tree: Value, errors: &mut Vec<ConfigError>) -> Option<Config> {
    let Value::Object(mut root) = tree else {
        errors.push(ConfigError::new("", "the document must be a mapping with services and routes"));
        return None;
    };
    const KNOWN: [&str; 11] = [
        "server",
        "logging",
        "auth",
        "cors",
        "state",
        "rate_limits",
        "cache",
        "trading",
        "websocket",
        "services",
        "routes",
    ];
    for key in root.keys() {
        if !KNOWN.contains(&key.as_str()) {
            errors.push(ConfigError::new(
                key.clone(),
                format!(
                    "unknown field `{key}`, expected one of `server`, `logging`, `auth`, `cors`, `state`, `rate_limits`, `cache`, `trading`, `websocket`, `services`, `routes`"
                ),
            ));
        }
    }
    // A section that fails is replaced by its default (or left out) so the semantic checks
    // still run on everything else; `broken` remembers what was left out.
    let mut broken = validate::Broken::default();
    let server = match root.remove("server") {
        Some(v) => section::<ServerConfig>(v, "server", errors).unwrap_or_else(|| {
            broken.server = true;
            ServerConfig::default()
        }),
        None => ServerConfig::default(),
    };
    let logging = match root.remove("logging") {
        Some(v) => section::<LoggingConfig>(v, "logging", errors).unwrap_or_default(),
        None => LoggingConfig::default(),
    };
    let auth = match root.remove("auth") {
        Some(mut v) => {
            // The lists of issuers and API keys item by item, as routes are: an item that
            // cannot be read (a missing `roles`) is left out and the others are still checked.
            let issuers = take_items::<security::IssuerConfig>(&mut v, ["jwt", "issuers"], "auth.jwt", errors);
            let keys = take_items::<security::ApiKeyConfig>(&mut v, ["api_keys", "keys"], "auth.api_keys", errors);
            match section::<AuthConfig>(v, "auth", errors) {
                Some(mut a) => {
                    if let (Some(jwt), Some(items)) = (a.jwt.as_mut(), issuers) {
                        (jwt.issuers, broken.issuers) = items;
                    }
                    if let (Some(ak), Some(items)) = (a.api_keys.as_mut(), keys) {
                        (ak.keys, broken.keys) = items;
                    }
                    a
                }
                None => {
                    broken.auth = true;
                    AuthConfig::default()
                }
            }
        }
        None => AuthConfig::default(),
    };
    let cors = match root.remove("cors") {
        Some(Value::Null) | None => None,
        Some(v) => section::<CorsConfig>(v, "cors", errors),
    };
    let state = match root.remove("state") {
        Some(v) => section::<StateConfig>(v, "state", errors).unwrap_or_default(),
        None => StateConfig::default(),
    };
    let rate_limits = match root.remove("rate_limits") {
        Some(v) => section::<RateLimitsConfig>(v, "rate_limits", errors).unwrap_or_default(),
        None => RateLimitsConfig::default(),
    };
    let cache = match root.remove("cache") {
        Some(v) => section::<CacheStoreConfig>(v, "cache", errors).unwrap_or_default(),
        None => CacheStoreConfig::default(),
    };
    let trading = match root.remove("trading") {
        Some(v) => section::<TradingConfig>(v, "trading", errors).unwrap_or_default(),
        None => TradingConfig::default(),
    };
    let websocket = match root.remove("websocket") {
        Some(v) => section::<WebSocketConfig>(v, "websocket", errors).unwrap_or_default(),
        None => WebSocketConfig::default(),
    };
    let mut services = BTreeMap::new();
    match root.remove("services") {
        Some(Value::Object(map)) => {
            for (name, v) in map {
                match section::<ServiceConfig>(v, &format!("services.{name}"), errors) {
                    Some(s) => {
                        services.insert(name, s);
                    }
                    None => broken.services.push(name),
                }
            }
        }
        Some(_) => errors.push(ConfigError::new("services", "must be a mapping of service name to service")),
        None => errors.push(ConfigError::new("services", "missing: at least one service is required")),
    }
    let routes = match root.remove("routes") {
        Some(Value::Array(raw)) => {
            let routes;
            (routes, broken.routes) = read_items::<RouteConfig>(raw, "routes", errors);
            routes
        }
        Some(_) => {
            errors.push(ConfigError::new("routes", "must be a list of routes"));
            Vec::new()
        }
        None => {
            errors.push(ConfigError::new("routes", "missing: at least one route is required"));
            Vec::new()
        }
    };
    let config =
        Config { server, logging, auth, cors, state, rate_limits, cache, trading, websocket, services, routes };
    validate::validate(&config, &broken, errors);
    Some(config)
}

/// Takes the list at `value[outer][list]` (when it is a list) out of `value`, leaving an empty
/// one, and deserializes its items one by one (reported as `<prefix>.<list>[i]`): the items
/// read, and where each came from in the file.
fn take_items<T: serde::de::DeserializeOwned>(
    value: &mut Value,
    [outer, list]: [&str; 2],
    prefix: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<(Vec<T>, validate::Items)> {
    let slot = value.get_mut(outer)?.get_mut(list)?;
    if !slot.is_array() {
        return None;
    }
    let Value::Array(raw) = std::mem::replace(slot, Value::Array(Vec::new())) else { return None };
    Some(read_items(raw, &format!("{prefix}.{list}"), errors))
}

/// Deserializes the items of a list one by one (reported as `<name>[i]`): the items read, and
/// where each came from in the file. An item that cannot be read is left out, so the semantic
/// checks still see the others.
fn read_items<T: serde::de::DeserializeOwned>(
    raw: Vec<Value>,
    name: &str,
    errors: &mut Vec<ConfigError>,
) -> (Vec<T>, validate::Items) {
    let mut items = Vec::new();
    let mut from = validate::Items { index: Vec::new(), dropped: false };
    for (i, v) in raw.into_iter().enumerate() {
        match section::<T>(v, &format!("{name}[{i}]"), errors) {
            Some(t) => {
                items.push(t);
                from.index.push(i);
            }
            None => from.dropped = true,
        }
    }
    (items, from)
}

/// Deserializes one section; on error records it, removes the offending key and tries again so
/// every unknown field and bad value of the section is reported.
fn section<T: serde::de::DeserializeOwned>(mut value: Value, prefix: &str, errors: &mut Vec<ConfigError>) -> Option<T> {
    let mut reported: Vec<String> = Vec::new();
    // Each round removes one key, so the loop ends; the cap guards against surprises.
    for _ in 0..64 {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            // Errors were recorded; the cleaned section still goes through the semantic checks.
            Ok(v) => return Some(v),
            Err(e) => {
                let segments: Vec<_> = e.path().iter().cloned().collect();
                let path = join_path(prefix, &segments);
                // An error on a parent of something already reported is a consequence of the
                // removal (e.g. "missing field"); do not report it twice.
                // A "missing field `x`" is a consequence only when `x` itself was removed (a
                // required field whose value was bad); another removed key (an unknown one)
                // leaves the field missing in the file, which is reported.
                let inner = e.inner().to_string();
                let missing = inner.strip_prefix("missing field `").and_then(|m| m.split('`').next());
                let cascade = reported.iter().any(|r| {
                    r.len() > path.len()
                        && r.starts_with(&path)
                        && matches!(r.as_bytes()[path.len()], b'.' | b'[')
                        && missing.is_none_or(|f| r[path.len() + 1..].split(['.', '[']).next() == Some(f))
                });
                // A value the `${…}` expansion already refused is not reported again as a bad
                // value (its text is the unexpanded placeholder).
                let expanded_badly = errors.iter().any(|r| r.path == path);
                if !cascade && !expanded_badly {
                    let mut message = clean_message(&inner);
                    if is_secret_path(&path) {
                        message = unquoted(&message);
                    }
                    errors.push(ConfigError::new(path.clone(), message));
                }
                if cascade || !remove_at(&mut value, &segments) {
                    return None;
                }
                reported.push(path);
            }
        }
    }
    None
}

fn join_path(prefix: &str, segments: &[serde_path_to_error::Segment]) -> String {
    use serde_path_to_error::Segment;
    let mut out = prefix.to_string();
    for s in segments {
        match s {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}

/// Removes the map key at `segments`; only keys (never list items, which would shift indices).
fn remove_at(value: &mut Value, segments: &[serde_path_to_error::Segment]) -> bool {
    use serde_path_to_error::Segment;
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut cur = value;
    for s in parents {
        cur = match (s, cur) {
            (Segment::Map { key }, Value::Object(m)) => match m.get_mut(key) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Seq { index }, Value::Array(a)) => match a.get_mut(*index) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, cur) {
        (Segment::Map { key }, Value::Object(m)) => m.remove(key).is_some(),
        _ => false,
    }
}

/// serde_json's messages end with " at line 0 column 0" when deserializing from a tree.
/// The parser's message in an operator's words: without its position (the path is given) and
/// without the hints it addresses to the programmer using it.
fn clean_message(msg: &str) -> String {
    without_hints(msg.split(" at line ").next().unwrap_or(msg))
}

/// The YAML library's message without the hints it addresses to the programmer using it.
fn without_hints(msg: &str) -> String {
    let msg = msg.split(", set DuplicateKeyPolicy").next().unwrap_or(msg);
    let msg = msg.split("; use from_str_multiple").next().unwrap_or(msg);
    let msg = msg.split("; use Option<").next().unwrap_or(msg);
    let msg = msg.split(" set ignore_binary_tag_for_string").next().unwrap_or(msg);
    let msg = msg.split(" If you just use !!binary").next().unwrap_or(msg);
    msg.trim_end_matches([',', ';', ' '])
        .replace("multiple YAML documents detected", "the file must hold one YAML document")
}

/// Whether the value at `path` is a secret (or may hold one), so that no message quotes it:
/// JWT secrets, the admin token, API-key hashes, Redis URLs (their password).
fn is_secret_path(path: &str) -> bool {
    let last = path.rsplit(['.', '[']).next().unwrap_or(path);
    // The Redis URLs, or a value that stands where the section should be (e.g. a URL given as
    // `redis:` itself); not the section's other keys, whose errors name keys, not values.
    let redis_url = ["state.redis.url", "state.redis.cluster"].iter().any(|p| path.starts_with(p));
    matches!(last, "secret" | "admin_token" | "sha256") || redis_url || matches!(path, "state" | "state.redis")
}

/// `msg` with what it quotes (between backticks or double quotes) left out.
fn unquoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quote = None;
    for c in msg.chars() {
        match quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    quote = Some(c);
                }
            }
        }
    }
    out
}

impl Config {
    /// The effective upstream timeout of `route`.
    pub fn route_timeout(&self, route: &RouteConfig) -> HumanDuration {
        route
            .timeout
            .or_else(|| self.services.get(&route.service).map(|s| s.timeout))
            .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT)
    }

    /// `route`'s header edits, parsed: request and response side, each `None` when empty;
    /// errors as `(path, reason)` with paths under the route (`request_headers.set.x-a`).
    #[allow(clippy::type_complexity)]
    pub fn header_edits(
        &self,
        route: &RouteConfig,
    ) -> (Result<Option<HeaderEdit>, Vec<(String, String)>>, Result<Option<HeaderEdit>, Vec<(String, String)>>) {
        let p = &self.auth.principal_headers;
        let key = self.auth.api_keys.as_ref().map(|k| k.header.as_str());
        // The identity headers and the API key header are the gateway's on the request side.
        let identity = |n: &http::HeaderName| {
            [p.subject.as_str(), p.roles.as_str(), p.method.as_str()]
                .into_iter()
                .chain(key)
                .any(|s| s.eq_ignore_ascii_case(n.as_str()))
        };
        let prefixed = |side: &str, r: Result<Option<HeaderEdit>, Vec<(String, String)>>| {
            r.map_err(|e| e.into_iter().map(|(k, m)| (format!("{side}.{k}"), m)).collect())
        };
        let request = route.request_headers.as_ref().map_or(Ok(None), |e| {
            let set = e.set.iter().map(|(k, v)| (k.as_str(), v.expose()));
            prefixed(
                "request_headers",
                HeaderEdit::new(set, e.remove.iter().map(String::as_str), EditSide::Request, &identity),
            )
        });
        let response = route.response_headers.as_ref().map_or(Ok(None), |e| {
            let set = e.set.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            prefixed(
                "response_headers",
                HeaderEdit::new(set, e.remove.iter().map(String::as_str), EditSide::Response, &|_| false),
            )
        });
        (request, response)
    }

    /// Problems that are fine for `check` but must stop `run` (placeholder secrets).
    pub fn runtime_problems(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        if let Some(jwt) = &self.auth.jwt {
            for (i, iss) in jwt.issuers.iter().enumerate() {
                if iss.secret.as_ref().is_some_and(|s| s.expose() == security::PLACEHOLDER_SECRET) {
                    out.push(ConfigError::new(
                        format!("auth.jwt.issuers[{i}].secret"),
                        "the placeholder secret must be replaced: set B25_JWT_SECRET (at least 32 bytes)",
                    ));
                }
            }
        }
        out
    }

    /// A one-screen summary for `b25-gateway check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let tls = if self.server.tls.is_some() { "https" } else { "http" };
        let _ = writeln!(out, "listeners:");
        let _ = writeln!(out, "  main   {tls}://{}", self.server.listen);
        if !self.server.admin_listen.is_empty() {
            let _ = writeln!(out, "  admin  http://{}", self.server.admin_listen);
        }
        let _ = writeln!(out, "services ({}):", self.services.len());
        for (name, s) in &self.services {
            let urls: Vec<&str> = s.instances.iter().map(|i| i.url()).collect();
            let _ = writeln!(out, "  {name:<18} {} (timeout {})", urls.join(", "), s.timeout);
        }
        let _ = writeln!(out, "routes ({}):", self.routes.len());
        for r in &self.routes {
            let _ = writeln!(out, "  {:<26} {:<16} {:<44} -> {}", r.id, r.methods.join(","), r.path, r.service);
        }
        out
    }
}
