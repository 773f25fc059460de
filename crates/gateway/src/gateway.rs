//! The request path: one function per stage, in the order a request meets them.
//!
//! ```text
//! request id → gateway endpoints → path normalisation → route match (404/405)
//!   → body limit → header rewrite → upstream (pooled client, timeout) → response headers
//! ```
//! Every exit goes through [`GatewayError::into_response`] or the upstream's response, gets the
//! `X-Request-ID` header, and is observed when its body ends ([`crate::body::Observed`]).

use crate::auth::Principal;
use crate::body::ClientBody;
use crate::body::{BodyFailure, GatewayBody, Observed, RequestBody, UpstreamBody};
use crate::cache::{self, Entry, Lookup, ResponseCache};
use crate::config::ConfigErrors;
use crate::config::HaltMode;
use crate::error::{ErrorKind, GatewayError, Origin};
use crate::halt::Halt;
use crate::idempotency::{self, Begin, IdempotencyStore, Stored};
use crate::observe::{Metrics, OwnHeaders, RequestRecord};
use crate::pipeline::cors::Cors;
use crate::pipeline::validate;
use crate::pipeline::{normalize, request_id};
use crate::proxy::Call;
use crate::proxy::h1::{HopHeaders, PrincipalHeaders};
use crate::proxy::headers;
use crate::ratelimit::gcra::Decision;
use crate::ratelimit::redis::RedisStore;
use crate::ratelimit::{Limited, ceil_secs};
use crate::router::Match;
use crate::snapshot::Route;
use crate::snapshot::Snapshot;
use crate::websocket;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderName;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Route label for requests that matched no route.
const UNMATCHED: &str = "unmatched";
/// Route label for the gateway's own endpoints.
const GATEWAY: &str = "gateway";

/// Reads and validates a config file (see [`Shared::loader`]).
pub type Loader = Box<dyn Fn(&std::path::Path) -> Result<crate::config::Config, ConfigErrors> + Send + Sync>;

/// State shared by every connection of one gateway.
pub struct Shared {
    /// The current config snapshot.
    pub snapshot: ArcSwap<Snapshot>,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// Set once the first health-check round is done.
    pub ready: AtomicBool,
    /// Set when shutdown begins.
    pub draining: AtomicBool,
    /// Shared state in Redis (`state.backend: redis`); it outlives config snapshots.
    pub redis: Option<Arc<RedisStore>>,
    /// The response cache.
    pub cache: Arc<ResponseCache>,
    /// Idempotency records.
    pub idempotency: Arc<IdempotencyStore>,
    /// The trading halt.
    pub halt: Arc<Halt>,
    /// Open WebSocket connections.
    pub ws: Arc<crate::websocket::Tracker>,
    /// The TLS certificate resolver (reloaded with the config).
    pub certs: std::sync::Mutex<Option<Arc<crate::server::tls::CertResolver>>>,
    /// The config file, for reloads.
    pub config_file: std::sync::Mutex<Option<String>>,
    /// How a reload reads the file, when not with [`crate::config::load`] (the demo supplies
    /// its own secrets and API key, as it did at start).
    pub loader: std::sync::OnceLock<Loader>,
    /// Hands a newly bound main listener to the accept loop (a reload that moved it).
    pub rebind: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<tokio::net::TcpListener>>>,
    /// Where the main listener is bound now.
    pub listen_addr: std::sync::Mutex<Option<std::net::SocketAddr>>,
    /// The admin listener's task and address (replaced when a reload moves it).
    pub admin: std::sync::Mutex<(Option<tokio::task::JoinHandle<()>>, Option<std::net::SocketAddr>)>,
    /// Outcome of the last reload (for the admin API).
    pub last_reload: arc_swap::ArcSwap<serde_json::Value>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Hands a newly bound admin listener (or `None`: turn it off) to its supervisor task.
    pub admin_rebind: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Option<tokio::net::TcpListener>>>>,
    unmatched: Arc<str>,
    gateway: Arc<str>,
}

impl Shared {
    /// Shared state around a first snapshot.
    pub fn new(snapshot: Snapshot, metrics: Arc<Metrics>, redis: Option<Arc<RedisStore>>) -> Self {
        let cfg = &snapshot.config;
        let sync = cfg.trading.halt_sync_interval.map_or(crate::halt::DEFAULT_SYNC_INTERVAL, |d| d.get());
        let cache = ResponseCache::new(&cfg.cache, redis.clone());
        cache.sync_every(sync);
        if let Some(r) = &redis {
            r.watch_eviction(sync);
        }
        Self {
            cache,
            idempotency: IdempotencyStore::new(redis.clone()),
            halt: Halt::new(cfg.trading.halted, redis.clone(), metrics.clone(), sync),
            ws: Arc::default(),
            certs: std::sync::Mutex::new(None),
            config_file: std::sync::Mutex::new(None),
            loader: std::sync::OnceLock::new(),
            rebind: std::sync::Mutex::new(None),
            listen_addr: std::sync::Mutex::new(None),
            admin: std::sync::Mutex::new((None, None)),
            last_reload: arc_swap::ArcSwap::from_pointee(serde_json::json!({"status": "none"})),
            reload_lock: tokio::sync::Mutex::new(()),
            admin_rebind: std::sync::Mutex::new(None),
            redis,
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            unmatched: UNMATCHED.into(),
            gateway: GATEWAY.into(),
        }
    }

    /// Ready to serve traffic: started, not draining, and every required service has an
    /// available instance.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire) && self.required_up()
    }

    /// Reloads the config file: parse and validate it fully, build the new snapshot off the
    /// hot path (health checks and JWKS included), then swap it in with one store. Live
    /// requests and WebSockets keep the snapshot they started with. A bad file changes nothing:
    /// the errors are logged, counted and shown by the admin API.
    pub async fn reload(&self) -> Result<(), ConfigErrors> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let file = self.config_file.lock().expect("not poisoned").clone().unwrap_or_default();
        let result = self.build_next(&file).await;
        let now = crate::unix_ms();
        match &result {
            Ok(()) => {
                self.metrics.reload("success");
                tracing::info!(file = %file, "configuration reloaded");
                self.last_reload.store(Arc::new(serde_json::json!({"status": "success", "at_unix_ms": now})));
            }
            Err(e) => {
                self.metrics.reload("failure");
                for err in &e.errors {
                    tracing::error!(file = %file, error = %err, "reload refused; the running configuration stays");
                }
                let errors: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
                self.last_reload
                    .store(Arc::new(serde_json::json!({"status": "failure", "at_unix_ms": now, "errors": errors})));
            }
        }
        result
    }

    async fn build_next(&self, file: &str) -> Result<(), ConfigErrors> {
        let fail = |errors| ConfigErrors { file: file.to_string(), errors };
        let path = std::path::Path::new(file);
        let config = match self.loader.get() {
            Some(load) => load(path)?,
            None => crate::config::load(path)?,
        };
        let runtime = config.runtime_problems();
        if !runtime.is_empty() {
            return Err(fail(runtime));
        }
        let old = self.snapshot.load_full();
        // Where shared state lives (the Redis connection, the halt's sync task) is set up at
        // start: a reload that changes it is refused rather than reported as applied.
        let mut at_start = Vec::new();
        if config.state != old.config.state {
            at_start.push(crate::config::ConfigError::new(
                "state",
                "changed: the shared-state settings are read at start; restart the gateway to apply them",
            ));
        }
        // The listener's protocols and timers, the log subscriber, the file watcher and the
        // shutdown timings are set up once at start too.
        let (new, was) = (&config.server, &old.config.server);
        let start_only = [
            ("trading.halt_sync_interval", config.trading.halt_sync_interval != old.config.trading.halt_sync_interval),
            ("server.tls", new.tls.is_some() != was.tls.is_some()),
            ("server.http2", new.http2 != was.http2),
            ("server.http1", new.http1 != was.http1),
            ("server.workers", new.workers != was.workers),
            ("server.watch_config", new.watch_config != was.watch_config),
            ("server.shutdown_grace", new.shutdown_grace != was.shutdown_grace),
            ("server.shutdown_delay", new.shutdown_delay != was.shutdown_delay),
            ("server.limits.header_timeout", new.limits.header_timeout != was.limits.header_timeout),
            ("logging.level", config.logging.level != old.config.logging.level),
            ("logging.format", config.logging.format != old.config.logging.format),
        ];
        for (path, changed) in start_only {
            if changed {
                at_start.push(crate::config::ConfigError::new(
                    path,
                    "changed: read at start; restart the gateway to apply it",
                ));
            }
        }
        if !at_start.is_empty() {
            return Err(fail(at_start));
        }
        // Moved listeners are bound before anything changes, so a bad address fails the reload.
        let new_main = if config.server.listen != old.config.server.listen {
            Some(bind_for("server.listen", &config.server.listen).await.map_err(|e| fail(vec![e]))?)
        } else {
            None
        };
        let new_admin =
            if config.server.admin_listen != old.config.server.admin_listen && !config.server.admin_listen.is_empty() {
                Some(bind_for("server.admin_listen", &config.server.admin_listen).await.map_err(|e| fail(vec![e]))?)
            } else {
                None
            };
        let admin_off = config.server.admin_listen.is_empty() && !old.config.server.admin_listen.is_empty();
        let halted = (config.trading.halted != old.config.trading.halted).then_some(config.trading.halted);
        let tls = config.server.tls.clone();
        let next = Snapshot::build(config).map_err(fail)?;
        if let (Some(t), Some(r)) = (&tls, self.certs.lock().expect("not poisoned").clone()) {
            r.reload(t).map_err(|e| fail(vec![crate::config::ConfigError::new("server.tls", e.to_string())]))?;
        }
        // Off the hot path: the new upstreams' first health round and JWKS fetch. The keys of a
        // JWKS URL the running config already fetched are carried over first, so a reload while
        // that URL is down keeps the last good keys instead of refusing every token.
        if let Some(j) = &next.auth.jwt {
            if let Some(prev) = &old.auth.jwt {
                j.inherit_jwks_keys(prev);
            }
            j.start_background().await;
        }
        for (name, u) in &next.upstreams {
            if let Some(prev) = old.upstreams.get(name) {
                u.inherit_health(prev);
            }
        }
        futures_util::future::join_all(next.upstreams.values().map(|u| u.check_all())).await;
        for u in next.upstreams.values() {
            u.spawn_health_checks();
        }
        self.metrics.prime(&next);
        next.resolve_metrics(&self.metrics);
        self.snapshot.store(Arc::new(next));
        if let Some(halted) = halted {
            self.apply_config_halt(halted).await;
        }
        if let Some(l) = new_main {
            let addr = l.local_addr().ok();
            if let Some(tx) = self.rebind.lock().expect("not poisoned").as_ref() {
                let _ = tx.send(l);
                *self.listen_addr.lock().expect("not poisoned") = addr;
                tracing::info!(addr = ?addr, "main listener moved");
            }
        }
        if (new_admin.is_some() || admin_off)
            && let Some(tx) = self.admin_rebind.lock().expect("not poisoned").as_ref()
        {
            let _ = tx.send(new_admin);
        }
        Ok(())
    }

    /// A reload changed `trading.halted`: `true` engages the halt (here and, with Redis, on
    /// every instance), as the admin API would; `false` lifts only a halt the config engaged,
    /// never one engaged by the admin API or an emergency stop.
    async fn apply_config_halt(&self, halted: bool) {
        const BY: &str = "config";
        let now = self.halt.info();
        if halted {
            // Already halted by someone else: their who and why stay.
            if !now.halted {
                self.halt.set(true, BY, "trading.halted set to true by a reload").await;
            }
            return;
        }
        if now.halted && now.by != BY {
            tracing::warn!(
                by = %now.by,
                "trading.halted set to false by a reload; the halt engaged by {} stays (lift it with the admin API)",
                now.by
            );
        } else if now.halted {
            self.halt.set(false, BY, "trading.halted set to false by a reload").await;
        }
    }

    fn required_up(&self) -> bool {
        let snap = self.snapshot.load();
        snap.config.server.required_services.iter().all(|s| snap.upstreams.get(s).is_some_and(|u| u.has_available()))
    }
}

/// Facts about the client connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// TCP peer.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Set by the connection's reader when a request head had both `Content-Length` and
    /// `Transfer-Encoding` (hyper hides one of them from the parsed request).
    pub framing_conflict: Arc<AtomicBool>,
    /// The peer's IP as a header value (formatted once per connection, for X-Forwarded-For).
    pub peer_ip: HeaderValue,
    /// The connection already refused every ambiguous body framing (the native HTTP/1.1
    /// connection does, before the handler runs).
    pub framing_checked: bool,
    /// The connection's writer puts the gateway's own response headers into the head itself
    /// (the native HTTP/1.1 connection: [`crate::observe::OwnHeaders`]).
    pub writes_own_headers: bool,
    /// The names the request's connection noted in its head ([`headers::Seen`]; set per
    /// request by the native HTTP/1.1 connection).
    pub seen: headers::Seen,
}

impl ConnInfo {
    /// The facts of a new connection.
    pub fn new(peer: SocketAddr, tls: bool, framing_conflict: Arc<AtomicBool>) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).expect("an IP address is ASCII");
        Self {
            peer,
            tls,
            framing_conflict,
            peer_ip,
            framing_checked: false,
            writes_own_headers: false,
            seen: headers::Seen::UNKNOWN,
        }
    }
}

async fn bind_for(field: &str, addr: &str) -> Result<tokio::net::TcpListener, crate::config::ConfigError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::config::ConfigError::new(field, format!("cannot listen on {addr}: {e}")))
}

/// What the request path tells the response stage besides the response.
#[derive(Default)]
struct Exchange {
    /// A CORS preflight was answered.
    preflight: bool,
    /// The tightest rate-limit decision that let the request through.
    ratelimit: Option<Decision>,
}

/// Finishes the record with 499 if the request is dropped before a response (client gone).
struct Pending(Option<RequestRecord>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut rec) = self.0.take() {
            rec.status = 499;
            rec.aborted = true;
            rec.finish();
        }
    }
}

/// The answer to a request refused before it could be handed to [`handle`] (the native
/// HTTP/1.1 engine, while parsing the head: a malformed request line, a missing Host, too many
/// headers…): the error's JSON with `X-Request-ID`, counted in the metrics and written to the
/// access log like any other request (route `unmatched`; method `-` when unknown).
pub fn refused(shared: &Shared, conn: &ConnInfo, method: Option<Method>, e: GatewayError) -> Response<Observed> {
    let request_id = request_id::generate();
    let snapshot = shared.snapshot.load();
    let access_log = snapshot.config.logging.access_log;
    tracing::debug!(request_id = request_id.to_str().unwrap_or(""), error = %e, "request refused");
    // A head that did not arrive in time held its client for `header_timeout`: that is the
    // request's duration in the access line and the histogram, not the moment of the refusal.
    let waited = (e.kind() == ErrorKind::RequestTimeout).then(|| snapshot.config.server.limits.header_timeout.get());
    let mut resp = e.into_response(&request_id);
    resp.headers_mut().insert(&request_id::X_REQUEST_ID, request_id.clone());
    RequestRecord::started(&shared.metrics);
    let method = method.unwrap_or_else(|| Method::from_bytes(b"-").expect("a token"));
    let mut rec = RequestRecord::new(
        &shared.metrics,
        request_id,
        method,
        shared.unmatched.clone(),
        None,
        conn.peer.ip(),
        access_log,
    );
    if let Some(start) = waited.and_then(|w| rec.start.checked_sub(w)) {
        rec.start = start;
    }
    rec.status = resp.status().as_u16();
    resp.map(|b| Observed::new(b, rec))
}

/// The message of a panic's payload (`panic!` with a literal or a formatted message).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Serves one request. Never fails: every error becomes a JSON response.
pub async fn handle(shared: Arc<Shared>, conn: ConnInfo, req: Request<ClientBody>) -> Response<Observed> {
    let snapshot = shared.snapshot.load_full();
    let request_id = request_id::from_headers(req.headers(), conn.seen);
    let access_log = snapshot.config.logging.access_log;
    RequestRecord::started(&shared.metrics);
    let mut pending = Pending(Some(RequestRecord::new(
        &shared.metrics,
        request_id.clone(),
        req.method().clone(),
        shared.unmatched.clone(),
        access_log.then(|| req.uri().path().into()),
        conn.peer.ip(),
        access_log,
    )));
    let rec = pending.0.as_mut().expect("set above");
    if access_log {
        // The client's trace id for the access line, also when no upstream is asked.
        rec.trace_id = crate::pipeline::trace::incoming(req.headers(), conn.seen);
    }
    let origin = snapshot.cors.as_ref().and_then(|_| req.headers().get(header::ORIGIN).cloned());
    let head = req.method() == Method::HEAD;
    let own_headers = conn.writes_own_headers;
    let mut ex = Exchange::default();
    // A panic (a bug) ends this request with a 500, not the process: the other requests and
    // connections go on. What the request held is released by its guards as on a cancel (an
    // order whose outcome is unknown stays in doubt under its idempotency key).
    // Pinned where it is built: the request's future is large, and moving it into the
    // catching wrapper cost a copy of several KiB per request (bench/EXPERIMENTS.md).
    let outcome = {
        let served = std::pin::pin!(serve(&shared, &snapshot, conn, req, &request_id, rec, &mut ex));
        futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(served)).await
    };
    let mut resp = match outcome {
        Ok(Ok(r)) => r,
        Err(panic) => {
            shared.metrics.panics.inc();
            let rid = request_id.to_str().unwrap_or("");
            let what = panic_text(&*panic);
            tracing::error!(
                request_id = rid,
                route = &*rec.route,
                panic = what,
                "request handling panicked; answered 500"
            );
            GatewayError::new(ErrorKind::Internal, "internal error").into_response(&request_id)
        }
        Ok(Err(e)) => {
            let rid = request_id.to_str().unwrap_or("");
            match e.kind().origin() {
                Origin::Upstream => {
                    tracing::warn!(request_id = rid, route = &*rec.route, error = %e, "upstream failure")
                }
                Origin::Internal => tracing::error!(request_id = rid, error = %e, "internal error"),
                Origin::Downstream => tracing::debug!(request_id = rid, error = %e, "request refused"),
            }
            e.into_response(&request_id)
        }
    };
    if let Some(cors) = &snapshot.cors {
        cors.apply(origin.as_ref(), ex.preflight, resp.headers_mut());
    }
    // No content in an answer to HEAD (RFC 9110 §9.3.2), the gateway's own JSON errors
    // included; the length it would have had stays in Content-Length. (The HTTP/1.1 writers
    // leave the body out themselves; HTTP/2 would send it in DATA frames.)
    if head
        && matches!(resp.body(), GatewayBody::Full(_))
        && let Some(n) = resp.body().size_hint().exact().filter(|&n| n > 0)
    {
        resp.headers_mut().entry(header::CONTENT_LENGTH).or_insert_with(|| crate::decimal_value(n));
        *resp.body_mut() = GatewayBody::empty();
    }
    // A rate-limit 429 already carries the refusing scope's values (as may an upstream's
    // answer); another 429 (a WebSocket connection limit, an upstream's) was not refused by
    // a scope that passed, so it must not say there is budget left.
    let ratelimit = ex.ratelimit.filter(|_| snapshot.ratelimit.headers).filter(|_| {
        resp.status() != http::StatusCode::TOO_MANY_REQUESTS
            && !resp.headers().contains_key(&RATELIMIT_LIMIT)
            && resp.body().raw_headers().and_then(|r| r.get(&RATELIMIT_LIMIT)).is_none()
    });
    let mut rec = pending.0.take().expect("set above");
    let headers_us = rec.start.elapsed().as_micros() as u64;
    rec.headers_us = Some(headers_us);
    // Time to the response headers: the gateway's own share and the upstream's.
    let timing = snapshot.config.logging.server_timing.then_some((headers_us, rec.upstream_us));
    if own_headers {
        rec.own_headers =
            Some(OwnHeaders { ratelimit: ratelimit.as_ref().map(ratelimit_numbers), server_timing: timing });
    } else {
        if let Some(d) = ratelimit {
            ratelimit_headers(resp.headers_mut(), &d);
        }
        resp.headers_mut().insert(&request_id::X_REQUEST_ID, request_id);
        if let Some((total, upstream)) = timing {
            resp.headers_mut().insert(&SERVER_TIMING, server_timing(total, upstream));
        }
    }
    rec.status = resp.status().as_u16();
    resp.map(|b| Observed::new(b, rec))
}

async fn serve(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: ConnInfo,
    req: Request<ClientBody>,
    request_id: &HeaderValue,
    rec: &mut RequestRecord,
    ex: &mut Exchange,
) -> Result<Response<GatewayBody>, GatewayError> {
    let own_headers = conn.writes_own_headers;
    let (mut parts, body) = req.into_parts();
    // Test builds only (`--features fault-injection`): a way to make a request panic.
    #[cfg(feature = "fault-injection")]
    if parts.headers.contains_key("x-fault-panic") {
        panic!("fault injection: x-fault-panic");
    }
    if let Some(resp) = own_endpoint(shared, snapshot, &parts, rec) {
        return resp;
    }
    if conn.framing_conflict.load(Ordering::Acquire) {
        return Err(GatewayError::new(
            ErrorKind::BadRequest,
            "ambiguous framing: Content-Length with Transfer-Encoding, or several Content-Length headers",
        )
        .closing());
    }
    validate::check_limits(&parts, &snapshot.limits, conn.seen)?;
    if !conn.framing_checked {
        validate::check_framing(&parts.headers)?;
        validate::check_host_count(&parts)?;
    }
    if let Some(a) = parts.uri.authority() {
        validate::check_authority(a.as_str(), &parts.headers, parts.version)?;
    }
    // HTTP/2 cookie crumbs go to the HTTP/1.1 upstream as one line (RFC 9113 §8.2.3), and the
    // cache's `Vary: Cookie` sees that line. HTTP/1.1 requests skip even the lookup.
    if parts.version == http::Version::HTTP_2 {
        headers::join_cookie_crumbs(&mut parts.headers);
        // RFC 9113 §8.2.1: a field value that starts or ends with whitespace makes the request
        // malformed (HTTP/1.1 parsing trims it; HTTP/2 carries values as they were sent).
        if parts.headers.values().any(|v| {
            matches!(v.as_bytes().first(), Some(b' ' | b'\t')) || matches!(v.as_bytes().last(), Some(b' ' | b'\t'))
        }) {
            return Err(GatewayError::new(
                ErrorKind::BadRequest,
                "a header value starts or ends with whitespace (malformed HTTP/2 request)",
            ));
        }
    }
    let path = normalize::normalize(parts.uri.path()).map_err(|e| GatewayError::new(ErrorKind::BadRequest, e.0))?;
    // A request target is ASCII (RFC 3986 §2, RFC 9112 §3.2): a raw UTF-8 byte must be sent
    // percent-encoded, so that one resource has one spelling for routes, caches and upstreams.
    if parts.uri.query().is_some_and(|q| !q.is_ascii()) {
        return Err(GatewayError::new(ErrorKind::BadRequest, "non-ASCII byte in the query: percent-encode it"));
    }

    // CORS preflight: answered here, for a path and method the table serves, without auth.
    if let Some(cors) = &snapshot.cors
        && Cors::is_preflight(&parts.method, &parts.headers)
    {
        ex.preflight = true;
        let wanted = parts
            .headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| Method::from_bytes(v.as_bytes()).ok())
            .ok_or_else(|| GatewayError::new(ErrorKind::BadRequest, "invalid Access-Control-Request-Method"))?;
        return match snapshot.routes.lookup(&wanted, &path) {
            Match::Found { route, .. } => {
                rec.route = route.id.clone();
                cors.preflight(&parts.headers)
            }
            Match::MethodNotAllowed { allow } => Err(GatewayError::method_not_allowed(allow.clone())),
            Match::NotFound => Err(GatewayError::new(ErrorKind::NotFound, "no route for this path")),
        };
    }

    let route = match snapshot.routes.lookup(&parts.method, &path) {
        Match::Found { route, .. } => route.clone(),
        Match::MethodNotAllowed { allow } => return Err(GatewayError::method_not_allowed(allow.clone())),
        Match::NotFound => return Err(GatewayError::new(ErrorKind::NotFound, "no route for this path")),
    };
    rec.route = route.id.clone();
    rec.route_metrics = route.metrics.get().cloned();

    // WebSocket upgrades: a browser token moves into Authorization (and out of what is
    // forwarded); a cross-site Origin is refused before anything else.
    let ws = route.config.websocket && websocket::is_upgrade(&parts.method, &parts.headers);
    let mut ws_query = None;
    if ws {
        ws_query = websocket::take_token(&snapshot.config.websocket, &mut parts.headers, parts.uri.query());
        if let Some(origin) = parts.headers.get(header::ORIGIN)
            && !snapshot.cors.as_ref().is_some_and(|c| c.allows(origin))
        {
            shared.metrics.websocket(&route.id, "origin_refused");
            return Err(GatewayError::new(ErrorKind::CorsRejected, "WebSocket origin not allowed"));
        }
    }
    let limiter = &snapshot.ratelimit;
    let redis = shared.redis.as_deref();
    let client_ip = limiter.client_ip(conn.peer.ip(), &parts.headers);
    rec.client_ip = client_ip;

    // Anonymous budgets first: a flood of bad tokens is limited per IP before any signature work.
    if limiter.any_anonymous(&route.limits) {
        limiter
            .check_anonymous(redis, &shared.metrics, client_ip, &route.id, &route.limits, &mut ex.ratelimit)
            .await
            .map_err(too_many)?;
    }

    // Authentication and authorisation before anything about the body is believed.
    let principal = if route.public { None } else { Some(authorize(shared, snapshot, &route, &parts.headers).await?) };
    if let Some(p) = &principal
        && limiter.any_principal(&route.limits)
    {
        limiter
            .check_principal(redis, &shared.metrics, &p.rate_key, route.index, &route.limits, &mut ex.ratelimit)
            .await
            .map_err(too_many)?;
    }

    if route.config.halt == HaltMode::Block && shared.halt.is_halted() {
        return Err(GatewayError::new(ErrorKind::TradingHalted, "trading is halted; cancels and reads still work"));
    }

    if ws {
        // A handshake is a GET without content (RFC 6455 §4.1); one with a body is refused
        // rather than left waiting for an upstream that will not read it.
        if !body.is_end_stream() {
            return Err(GatewayError::new(ErrorKind::BadRequest, "a WebSocket handshake carries no body").closing());
        }
        let path = path.into_owned();
        return websocket_proxy(shared, snapshot, conn, parts, &route, &path, ws_query, principal, request_id).await;
    }

    // The target's authority when it has one (HTTP/2's `:authority`, an absolute-form target:
    // RFC 9112 §3.2.2 and RFC 9113 §8.3.1 put it before `Host`), else `Host`. (The client's
    // `Host` stays in the map but is not sent: the upstream gets its own.) Taken before the
    // cache lookup, whose key holds it: the upstream may build its response from this value.
    let host = request_authority(&parts);

    // Response cache (GET/HEAD routes with a `cache` block).
    let cache_req =
        route.config.cache.as_ref().filter(|_| matches!(parts.method, Method::GET | Method::HEAD)).map(|cc| {
            cache::request(
                &route.id,
                cc,
                &parts.method,
                &path,
                parts.uri.query(),
                principal.as_deref().map(|p| &*p.subject),
                host.as_ref(),
                &parts.headers,
            )
        });
    let mut leader = None;
    if let Some(cr) = &cache_req {
        match shared.cache.lookup(cr, &parts.headers).await {
            Lookup::Hit(e) => {
                shared.metrics.cache(&route.id, "hit");
                return match cache::preconditions(&parts.headers, &e) {
                    cache::Precondition::Pass => Ok(cached_response(&e, cr.head, "HIT")),
                    cache::Precondition::NotModified => Ok(not_modified(&e)),
                    cache::Precondition::Failed => Err(GatewayError::new(
                        ErrorKind::PreconditionFailed,
                        "a precondition of the request (If-Match, If-Unmodified-Since) does not hold",
                    )),
                };
            }
            Lookup::Miss(l) => {
                shared.metrics.cache(&route.id, if cr.bypass { "bypass" } else { "miss" });
                leader = l;
            }
        }
    }

    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH)
        && len.to_str().ok().and_then(|s| s.parse::<u64>().ok()).is_some_and(|n| n > route.max_body)
    {
        return Err(GatewayError::new(ErrorKind::PayloadTooLarge, "request body is larger than this route allows"));
    }
    validate::check_required(&parts.headers, &route.required_headers)?;
    let idem_cfg = route
        .config
        .idempotency
        .as_ref()
        .filter(|_| matches!(parts.method, Method::POST | Method::PUT | Method::PATCH));
    let idem_key = match idem_cfg {
        // Two keys: the gateway and an upstream that reads the other one would not agree on
        // which order this is.
        Some(cfg) => match validate::at_most_one(&parts.headers, &IDEMPOTENCY_KEY, "Idempotency-Key")? {
            Some(v) if idempotency::valid_key(v) => Some(v.clone()),
            Some(_) => {
                return Err(GatewayError::new(
                    ErrorKind::BadRequest,
                    "Idempotency-Key must be 1-255 visible ASCII characters",
                ));
            }
            None if cfg.required => {
                return Err(GatewayError::new(ErrorKind::BadRequest, "this route requires an Idempotency-Key header"));
            }
            None => None,
        },
        None => None,
    };
    let has_body = !body.is_end_stream();
    validate::check_content_type(&parts.headers, has_body, &route.config.content_types)?;

    // The upstream client sends the URI's path and query (origin form); it is only rebuilt
    // when normalisation or a prefix rewrite changed the path.
    let upstream_path = route.rewrite(&path);
    if upstream_path != parts.uri.path() || parts.uri.path_and_query().is_none() {
        let pq = match parts.uri.query() {
            Some(q) => PathAndQuery::try_from(format!("{upstream_path}?{q}")),
            None => PathAndQuery::try_from(upstream_path.as_ref()),
        }
        .map_err(|_| GatewayError::new(ErrorKind::BadRequest, "invalid request target"))?;
        parts.uri = pq.into();
    }

    let h = &mut parts.headers;
    if conn.seen.may_have(headers::Seen::HOP_BY_HOP) {
        headers::strip_hop_by_hop(h);
    }
    strip_identity(snapshot, h);
    if let Some(edit) = &route.request_headers {
        edit.apply(h);
    }
    // What this hop adds goes straight onto the wire (`Expect` is answered here and dropped).
    let trace = crate::pipeline::trace::next_hop(h, conn.seen);
    rec.trace_id = Some(trace.trace);
    let hop = HopHeaders {
        forwarded_for: headers::forwarded_for(h, &conn.peer_ip, conn.seen),
        forwarded_proto: if conn.tls { "https" } else { "http" },
        forwarded_host: host,
        request_id: request_id.clone(),
        traceparent: trace.parent,
        keep_tracestate: trace.keep_state,
        principal: principal_headers(snapshot, principal.as_deref()),
    };

    let buffer =
        (route.config.json || idem_key.is_some()) && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    let mut idem: Option<(String, [u8; 32])> = None;
    let mut taken: Option<TakenKey> = None;
    let (body, replay) = if buffer {
        let guarded = RequestBody::new(body, rec.body_stats(), route.max_body, snapshot.body_idle);
        let bytes = guarded.read_all().await.map_err(body_error)?;
        // An empty body is allowed (start/stop carry none); a present one must be JSON.
        if route.config.json && !bytes.is_empty() {
            validate::check_json(&bytes, route.config.max_json_depth)?;
        }
        if let Some(key) = &idem_key {
            let scope = idempotency::scope(&route.id, principal.as_deref().map(|p| &*p.subject), key.as_bytes());
            let hash = idempotency::body_hash(&bytes);
            let inflight_ms = route.timeout.as_millis() as u64 * u64::from(route.upstream.default_attempts()) + 30_000;
            match shared.idempotency.begin(&scope, hash, inflight_ms).await {
                Begin::First => {
                    shared.metrics.idempotency(&route.id, "first");
                    taken = idem_cfg.map(|cfg| TakenKey {
                        store: shared.idempotency.clone(),
                        scope: scope.clone(),
                        hash,
                        ttl_ms: cfg.ttl.get().as_millis() as u64,
                        settled: false,
                    });
                    idem = Some((scope, hash));
                }
                Begin::InFlight => {
                    shared.metrics.idempotency(&route.id, "conflict");
                    return Err(GatewayError::new(
                        ErrorKind::IdempotencyConflict,
                        "a request with this Idempotency-Key is in progress",
                    ));
                }
                Begin::Mismatch => {
                    shared.metrics.idempotency(&route.id, "mismatch");
                    return Err(GatewayError::new(
                        ErrorKind::IdempotencyMismatch,
                        "this Idempotency-Key was used with a different request body",
                    ));
                }
                Begin::Replay(stored) => {
                    shared.metrics.idempotency(&route.id, "replayed");
                    let body = stored.body_for(request_id.to_str().unwrap_or(""));
                    let mut r = stored_response(stored.status, &stored.headers, body);
                    r.headers_mut().insert(&IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                    return Ok(r);
                }
                Begin::Unavailable | Begin::Full => {
                    shared.metrics.idempotency(&route.id, "store_error");
                    return Err(GatewayError::new(
                        ErrorKind::IdempotencyUnavailable,
                        "orders cannot be deduplicated right now; nothing was sent",
                    ));
                }
            }
        }
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let replay = (bytes.len() as u64 <= route.upstream.max_replay_body()).then(|| bytes.clone());
        (UpstreamBody::Full(bytes), replay)
    } else if !has_body {
        // Nothing to stream: an empty body that a retry can send again.
        (UpstreamBody::Full(Bytes::new()), Some(Bytes::new()))
    } else {
        (UpstreamBody::Stream(RequestBody::new(body, rec.body_stats(), route.max_body, snapshot.body_idle)), None)
    };

    let hash_key = consistent_hash_key(&route, &parts.headers, principal.as_deref());
    // The request headers a cached response may Vary on (only kept for cacheable routes).
    let req_headers_for_vary = if cache_req.is_some() { parts.headers.clone() } else { http::HeaderMap::new() };
    let req = Request::from_parts(parts, body);
    let sent = Instant::now();
    let client_body = rec.body.clone();
    let call = Call {
        timeout: route.timeout,
        attempts: route.config.retry_attempts.unwrap_or_else(|| route.upstream.default_attempts()).max(1),
        replay,
        hash_key: hash_key.as_deref().map(str::as_bytes),
        deduplicated: idem.is_some(),
        metrics: &shared.metrics,
        hop: Some(&hop),
        sent,
        client_body: client_body.as_deref(),
    };
    let mut took = Duration::ZERO;
    let result = route.upstream.forward(req, call, &mut took).await;
    rec.upstream_us = Some(took.as_micros() as u64);
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            let e = match rec.body.as_ref().map_or(BodyFailure::None, |b| b.failure()) {
                // The client's body broke the exchange, not the upstream.
                BodyFailure::None => {
                    if e.kind().origin() == Origin::Upstream {
                        shared.metrics.upstream_error(&route.upstream.name, e.kind().code());
                    }
                    e
                }
                f => body_error(f),
            };
            if let (Some((scope, hash)), Some(cfg)) = (&idem, idem_cfg) {
                if e.kind().request_not_sent() {
                    // Nothing reached the upstream: the client may try again with the key.
                    shared.idempotency.release(scope).await;
                    settled(&mut taken);
                } else {
                    // The outcome is unknown: a retry with this key replays this error
                    // instead of risking a second order.
                    let stored = Stored::gateway_error(e.kind(), e.message());
                    shared.idempotency.complete(scope, *hash, stored, cfg.ttl.get().as_millis() as u64).await;
                    settled(&mut taken);
                }
            }
            return Err(e);
        }
    };
    let (mut parts, mut body) = resp.into_parts();
    // The upstream's header lines go to the client as they came (the native HTTP/1.1 writer
    // copies them) unless a stage below reads or changes them, or hyper writes the response.
    if !own_headers
        || idem.is_some()
        || cache_req.is_some()
        || snapshot.cors.is_some()
        || route.response_headers.is_some()
    {
        body.headers_into(&mut parts.headers)?;
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    // Whether the cache may keep the response is the upstream's say (its Cache-Control), not
    // the route's edits: an edit that tells browsers `no-store` must not turn the gateway's
    // own cache off.
    let cacheable =
        cache_req.as_ref().is_some_and(|cr| shared.cache.storable(cr, parts.status.as_u16(), &parts.headers));
    // Before anything keeps the response (the cache, an idempotency record), so a replay
    // carries the same headers.
    if let Some(edit) = &route.response_headers {
        edit.apply(&mut parts.headers);
    }
    let status = parts.status;

    if route.config.engage_halt && status.is_success() {
        let by = principal.as_deref().map_or("anonymous", |p| &*p.subject);
        shared.halt.set(true, by, &format!("{} succeeded", route.id)).await;
    }

    if let (Some((scope, hash)), Some(cfg)) = (&idem, idem_cfg) {
        if status.is_server_error() && cfg.release_on_5xx {
            shared.idempotency.release(scope).await;
            settled(&mut taken);
            return Ok(Response::from_parts(parts, GatewayBody::Upstream(body)));
        }
        let bytes = match crate::body::read_bounded(body, cfg.max_response_size.bytes() as usize).await {
            Ok(Ok(b)) => b,
            failed => {
                // Keep the key taken (the order went through) but say the answer is gone.
                let e = match failed {
                    Err(_) => {
                        // Cut off (the upstream closed, or stalled past response_idle_timeout).
                        shared.metrics.upstream_error(&route.upstream.name, ErrorKind::UpstreamReset.code());
                        GatewayError::new(
                            ErrorKind::UpstreamReset,
                            "the upstream response was cut off; the order may have been placed: look it up",
                        )
                    }
                    _ => GatewayError::new(
                        ErrorKind::UpstreamBadResponse,
                        "the upstream response could not be kept for replay",
                    ),
                };
                let stored = Stored::gateway_error(e.kind(), e.message());
                shared.idempotency.complete(scope, *hash, stored, cfg.ttl.get().as_millis() as u64).await;
                settled(&mut taken);
                return Err(e);
            }
        };
        let stored = Stored {
            status: status.as_u16(),
            headers: headers::kept_for_replay(&parts.headers),
            body: bytes.clone(),
            gateway_error: false,
        };
        shared.idempotency.complete(scope, *hash, stored, cfg.ttl.get().as_millis() as u64).await;
        settled(&mut taken);
        return Ok(Response::from_parts(parts, GatewayBody::full(bytes)));
    }

    if let Some(cr) = &cache_req
        && cacheable
    {
        match crate::body::read_bounded(body, shared.cache.max_entry()).await {
            Ok(Ok(bytes)) => {
                let entry =
                    shared.cache.store(cr, status.as_u16(), &parts.headers, &req_headers_for_vary, bytes.clone()).await;
                if let Some(l) = leader.take() {
                    l.complete(Some(entry));
                }
                shared.metrics.cache_bytes.set(shared.cache.weight() as i64);
                parts.headers.insert(&X_CACHE, HeaderValue::from_static(if cr.bypass { "BYPASS" } else { "MISS" }));
                return Ok(Response::from_parts(parts, GatewayBody::full(bytes)));
            }
            Ok(Err(streaming)) => {
                parts.headers.insert(&X_CACHE, HeaderValue::from_static(if cr.bypass { "BYPASS" } else { "MISS" }));
                return Ok(Response::from_parts(parts, streaming));
            }
            Err(_) => {
                return Err(GatewayError::new(ErrorKind::UpstreamReset, "the upstream response was cut off"));
            }
        }
    }
    if let Some(cr) = &cache_req {
        parts.headers.insert(&X_CACHE, HeaderValue::from_static(if cr.bypass { "BYPASS" } else { "MISS" }));
    }
    drop(leader);
    if own_headers {
        // The native HTTP/1.1 writer makes this check itself, with the head in hand.
        return Ok(Response::from_parts(parts, GatewayBody::Upstream(body)));
    }
    match GatewayBody::upstream_checked(body) {
        Ok(body) => Ok(Response::from_parts(parts, body)),
        Err(_) => {
            shared.metrics.upstream_error(&route.upstream.name, ErrorKind::UpstreamBadResponse.code());
            Err(GatewayError::new(ErrorKind::UpstreamBadResponse, "the upstream response body is malformed"))
        }
    }
}

/// The host the client addressed: the target's authority when it has one (HTTP/2, an
/// absolute-form target), else `Host` (checked by [`validate::check_authority`] and
/// [`validate::valid_host`]).
fn request_authority(parts: &http::request::Parts) -> Option<HeaderValue> {
    match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    }
}

/// The idempotency record a request took (`Begin::First`), until it is completed or released.
/// Dropped before that — the client went away while the order was in flight (its request's
/// future is dropped at an await), or an error returned early — the order's outcome is unknown:
/// the record is completed in the background with a 502 that a retry with the key replays,
/// instead of staying in flight until it expires and the key is free for a second order.
struct TakenKey {
    store: Arc<IdempotencyStore>,
    scope: String,
    hash: [u8; 32],
    ttl_ms: u64,
    settled: bool,
}

/// The record was completed or released: nothing left to do on drop.
fn settled(taken: &mut Option<TakenKey>) {
    if let Some(t) = taken {
        t.settled = true;
    }
}

impl Drop for TakenKey {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let stored = Stored::gateway_error(
            ErrorKind::UpstreamReset,
            "the request ended before its outcome was known; the order may have been placed: look it up",
        );
        let (store, scope, hash, ttl) = (self.store.clone(), std::mem::take(&mut self.scope), self.hash, self.ttl_ms);
        rt.spawn(async move { store.complete(&scope, hash, stored, ttl).await });
    }
}

/// `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header).
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Marks a replayed response.
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// `Server-Timing` (W3C).
static SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
/// `HIT`, `MISS` or `BYPASS`.
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// `Server-Timing` as a header value ([`crate::observe::push_server_timing`]).
fn server_timing(total_us: u64, upstream_us: Option<u64>) -> HeaderValue {
    // Assembled in the thread's scratch buffer and cut from the header-value arena: no
    // allocation per response.
    crate::SCRATCH
        .with_borrow_mut(|v| {
            v.clear();
            crate::observe::push_server_timing(v, total_us, upstream_us);
            crate::header_value(v)
        })
        .expect("digits and ASCII")
}

/// A response rebuilt from stored parts.
fn stored_response(status: u16, headers: &[(HeaderName, HeaderValue)], body: Bytes) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    for (n, v) in headers {
        r.headers_mut().append(n.clone(), v.clone());
    }
    r
}

/// A cache hit: the stored response with `X-Cache` and `Age`.
fn cached_response(e: &Entry, head: bool, outcome: &'static str) -> Response<GatewayBody> {
    let mut r = stored_response(e.status, &e.headers, if head { Bytes::new() } else { e.body.clone() });
    hit_headers(&mut r, e, outcome);
    r
}

/// `X-Cache` and `Age` of a response made from a stored entry.
fn hit_headers(r: &mut Response<GatewayBody>, e: &Entry, outcome: &'static str) {
    let now = crate::unix_ms();
    r.headers_mut().insert(&X_CACHE, HeaderValue::from_static(outcome));
    r.headers_mut().insert(header::AGE, HeaderValue::from(now.saturating_sub(e.stored_ms) / 1000));
}

/// A cache hit answered `304 Not Modified`: the stored response's validators and the fields
/// a 304 carries (RFC 9110 §15.4.5), no content.
fn not_modified(e: &Entry) -> Response<GatewayBody> {
    let kept: Vec<(HeaderName, HeaderValue)> = e
        .headers
        .iter()
        .filter(|(n, _)| {
            [
                header::ETAG,
                header::LAST_MODIFIED,
                header::CACHE_CONTROL,
                header::CONTENT_LOCATION,
                header::DATE,
                header::EXPIRES,
                header::VARY,
            ]
            .contains(n)
        })
        .cloned()
        .collect();
    let mut r = stored_response(304, &kept, Bytes::new());
    hit_headers(&mut r, e, "HIT");
    r
}

/// Connects a WebSocket upgrade to the upstream and hands both sides to a relay task.
#[allow(clippy::too_many_arguments)]
async fn websocket_proxy(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: ConnInfo,
    mut parts: http::request::Parts,
    route: &Route,
    path: &str,
    query: Option<String>,
    principal: Option<Arc<Principal>>,
    request_id: &HeaderValue,
) -> Result<Response<GatewayBody>, GatewayError> {
    let cfg = &snapshot.config.websocket;
    // RFC 6455 §4.2.1: one key, the base64 of 16 bytes; anything else is not a WebSocket
    // handshake and gets 400 here rather than being passed to the upstream to judge.
    let key = match validate::at_most_one(&parts.headers, &header::SEC_WEBSOCKET_KEY, "Sec-WebSocket-Key")? {
        Some(k) if websocket::valid_key(k.as_bytes()) => k.clone(),
        None => return Err(GatewayError::new(ErrorKind::BadRequest, "missing Sec-WebSocket-Key")),
        Some(_) => {
            return Err(GatewayError::new(
                ErrorKind::BadRequest,
                "Sec-WebSocket-Key must be one base64-encoded 16-byte value",
            ));
        }
    };
    // RFC 6455 §4.2.2, §4.4: the relay speaks version 13 only; another (or none) is refused
    // with the version it speaks, before the upstream is asked.
    let mut versions = parts.headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    if !matches!((versions.next(), versions.next()), (Some(v), None) if v.as_bytes().trim_ascii() == b"13") {
        return Err(GatewayError::new(
            ErrorKind::BadRequest,
            "unsupported Sec-WebSocket-Version: this gateway speaks 13",
        )
        .with_header(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13")));
    }
    let slot = shared.ws.admit(cfg, principal.as_ref().map(|p| &p.subject)).inspect_err(|_| {
        shared.metrics.websocket(&route.id, "limit");
    })?;
    let client_upgrade = websocket::ClientUpgrade::take(&mut parts.extensions)
        .ok_or_else(|| GatewayError::new(ErrorKind::BadRequest, "this connection cannot be upgraded"))?;
    let upstream_path = route.rewrite(path);
    let target = match query.as_deref().filter(|q| !q.is_empty()) {
        Some(q) => format!("{upstream_path}?{q}"),
        None => upstream_path.into_owned(),
    };
    let host = request_authority(&parts);
    parts.headers.remove(header::HOST);
    let mut h = parts.headers.clone();
    headers::strip_hop_by_hop(&mut h);
    // Compression extensions are not relayed (messages are re-framed by the relay).
    h.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers::set_forwarded(&mut h, &conn.peer_ip, conn.tls, host);
    h.insert(&request_id::X_REQUEST_ID, request_id.clone());
    strip_identity(snapshot, &mut h);
    if let Some(edit) = &route.request_headers {
        edit.apply(&mut h);
    }
    for (name, value) in principal_headers(snapshot, principal.as_deref()).into_iter().flatten() {
        h.insert(name, value.clone());
    }
    let mut req = Request::new(UpstreamBody::Full(Bytes::new()));
    *req.uri_mut() = PathAndQuery::try_from(target)
        .map_err(|_| GatewayError::new(ErrorKind::BadRequest, "invalid request target"))?
        .into();
    *req.headers_mut() = h;
    let mut resp = route.upstream.upgrade(req, route.timeout).await.inspect_err(|_| {
        shared.metrics.websocket(&route.id, "upstream_failed");
    })?;
    let protocol = resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
    match websocket::check_answer(resp.status(), resp.headers(), &key) {
        Ok(true) => {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            shared.metrics.websocket(&route.id, "upgraded");
            let relay = websocket::Relay {
                client: client_upgrade,
                upstream: upstream_upgrade,
                cfg: cfg.clone(),
                principal,
                slot,
                route: route.id.clone(),
                metrics: shared.metrics.clone(),
                shutdown: shared.ws.subscribe(),
            };
            tokio::spawn(relay.run());
            Ok(websocket::switching(&key, protocol.as_ref()))
        }
        Ok(false) => {
            // The upstream refused: pass its answer on, and close the client connection so
            // nothing the client sends next (frames it believed upgraded) is read as a request.
            shared.metrics.websocket(&route.id, "upstream_refused");
            let (mut p, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut p.headers);
            p.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            Ok(Response::from_parts(p, GatewayBody::Hyper(body)))
        }
        Err(e) => {
            shared.metrics.websocket(&route.id, "bad_upstream");
            Err(e.closing())
        }
    }
}

/// Authenticates for `route` and checks its roles: 401 (with `WWW-Authenticate`) or 403.
async fn authorize(
    shared: &Shared,
    snapshot: &Snapshot,
    route: &Route,
    headers: &http::HeaderMap,
) -> Result<Arc<Principal>, GatewayError> {
    let challenge = |error: Option<&str>| {
        let v = match (route.auth.jwt, error) {
            (true, None) => "Bearer realm=\"b25-gateway\"".to_string(),
            (true, Some(e)) => format!("Bearer realm=\"b25-gateway\", error=\"{e}\""),
            (false, _) => "ApiKey realm=\"b25-gateway\"".to_string(),
        };
        HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("Bearer"))
    };
    match snapshot.auth.authenticate(headers, route.auth).await {
        Ok(p) => {
            shared.metrics.auth_attempt(p.method.as_str(), None);
            if p.roles.intersects(route.allowed) {
                Ok(p)
            } else {
                shared.metrics.auth_attempt(p.method.as_str(), Some("forbidden"));
                Err(GatewayError::new(ErrorKind::Forbidden, "your roles do not allow this route"))
            }
        }
        Err(f) if f.missing => {
            shared.metrics.auth_attempt("none", Some(f.reason));
            Err(GatewayError::new(ErrorKind::Unauthenticated, "authentication required")
                .with_header(header::WWW_AUTHENTICATE, challenge(None)))
        }
        Err(f) => {
            let method = if headers.contains_key(header::AUTHORIZATION) { "jwt" } else { "api_key" };
            shared.metrics.auth_attempt(method, Some(f.reason));
            Err(GatewayError::new(ErrorKind::InvalidCredentials, format!("credentials rejected: {}", f.reason))
                .with_header(header::WWW_AUTHENTICATE, challenge(Some("invalid_token"))))
        }
    }
}

/// Removes client-sent principal headers and credentials the upstream must not see, and every
/// header whose name holds an underscore (as nginx does by default, `underscores_in_headers
/// off`): CGI, WSGI, Rack and PHP map `_` and `-` to the same variable, so `X_Auth_Subject` or
/// `Content_Length` would reach such an upstream as the header the gateway strips or sets.
fn strip_identity(snapshot: &Snapshot, h: &mut http::HeaderMap) {
    let a = &snapshot.auth;
    // One pass over the (few) names decides whether a client sent any identity or underscore
    // header; the hashed removals only run when one did.
    let key = a.api_key_header();
    let (mut spoofed, mut underscore) = (false, false);
    for n in h.keys() {
        spoofed |=
            *n == a.subject_header || *n == a.roles_header || *n == a.method_header || key.is_some_and(|k| n == k);
        underscore |= n.as_str().as_bytes().contains(&b'_');
    }
    if underscore {
        let names: Vec<http::HeaderName> = h.keys().filter(|n| n.as_str().contains('_')).cloned().collect();
        for n in names {
            h.remove(n);
        }
    }
    if spoofed {
        h.remove(&a.subject_header);
        h.remove(&a.roles_header);
        h.remove(&a.method_header);
        if let Some(k) = key {
            h.remove(k);
        }
    }
    if a.jwt.as_ref().is_some_and(|j| !j.forward_token) {
        h.remove(header::AUTHORIZATION);
    }
}

/// The authenticated principal's headers for the upstream (subject, roles, method), under
/// the configured names. Proxied requests get them written into the upstream request head
/// ([`HopHeaders`]): three hashed inserts fewer per request.
fn principal_headers<'a>(snapshot: &'a Snapshot, principal: Option<&'a Principal>) -> PrincipalHeaders<'a> {
    let Some(p) = principal else { return [None; 3] };
    let a = &snapshot.auth;
    [
        p.subject_header.as_ref().map(|v| (&a.subject_header, v)),
        p.roles_header.as_ref().map(|v| (&a.roles_header, v)),
        Some((&a.method_header, p.method.header_value())),
    ]
}

/// The consistent-hash key: the configured header, else the configured claim (or subject).
fn consistent_hash_key(route: &Route, headers: &http::HeaderMap, principal: Option<&Principal>) -> Option<String> {
    let up = &route.upstream;
    if let Some(h) = &up.hash_header
        && let Some(v) = headers.get(h).and_then(|v| v.to_str().ok())
    {
        return Some(v.to_string());
    }
    if let Some(claim) = &up.hash_claim {
        let p = principal?;
        let from_claim = p.claims.as_ref().and_then(|c| match c.get(claim) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        });
        return Some(from_claim.unwrap_or_else(|| p.subject.to_string()));
    }
    None
}

/// 429 with `Retry-After` and the `RateLimit-*` headers of the scope that refused.
fn too_many(l: Limited) -> GatewayError {
    let d = l.decision;
    let mut e = GatewayError::new(ErrorKind::TooManyRequests, format!("rate limit exceeded ({})", l.scope))
        .with_header(header::RETRY_AFTER, HeaderValue::from(ceil_secs(d.retry_after).max(1)));
    for (name, value) in ratelimit_values(&d) {
        e = e.with_header(name, value);
    }
    e
}

/// `RateLimit-Limit`, `-Remaining` and `-Reset` (whole seconds, rounded up).
fn ratelimit_numbers(d: &Decision) -> [u64; 3] {
    [u64::from(d.limit), u64::from(d.remaining), ceil_secs(d.reset)]
}

fn ratelimit_values(d: &Decision) -> [(HeaderName, HeaderValue); 3] {
    let [limit, remaining, reset] = ratelimit_numbers(d);
    [
        (RATELIMIT_LIMIT.clone(), crate::decimal_value(limit)),
        (RATELIMIT_REMAINING.clone(), crate::decimal_value(remaining)),
        (RATELIMIT_RESET.clone(), crate::decimal_value(reset)),
    ]
}

fn ratelimit_headers(h: &mut http::HeaderMap, d: &Decision) {
    for (name, value) in ratelimit_values(d) {
        h.insert(name, value);
    }
}

/// IETF `RateLimit-Limit` (draft-ietf-httpapi-ratelimit-headers).
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// IETF `RateLimit-Remaining`.
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// IETF `RateLimit-Reset` (seconds).
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

fn body_error(f: BodyFailure) -> GatewayError {
    match f {
        BodyFailure::TooLarge => {
            GatewayError::new(ErrorKind::PayloadTooLarge, "request body is larger than this route allows").closing()
        }
        BodyFailure::Idle => {
            GatewayError::new(ErrorKind::RequestTimeout, "the request body stopped arriving").closing()
        }
        BodyFailure::Client | BodyFailure::None => {
            GatewayError::new(ErrorKind::BadRequest, "invalid or incomplete request body").closing()
        }
    }
}

/// `/health`, `/health/liveness`, `/health/readiness`, `/version` on the main listener.
fn own_endpoint(
    shared: &Shared,
    snapshot: &Snapshot,
    req: &http::request::Parts,
    rec: &mut RequestRecord,
) -> Option<Result<Response<GatewayBody>, GatewayError>> {
    let path = req.uri.path();
    if !path.starts_with("/health") && path != "/version" {
        return None;
    }
    let resp = match path {
        "/health/liveness" => json(StatusCode::OK, serde_json::json!({"status": "alive"})),
        "/health/readiness" => readiness(shared),
        "/health" => health(shared, snapshot),
        "/version" => json(StatusCode::OK, crate::version::json()),
        _ => return None,
    };
    rec.route = shared.gateway.clone();
    if req.method != Method::GET && req.method != Method::HEAD {
        return Some(Err(GatewayError::method_not_allowed(HeaderValue::from_static("GET, HEAD"))));
    }
    Some(Ok(resp))
}

/// 200 when ready, 503 while starting or draining.
pub fn readiness(shared: &Shared) -> Response<GatewayBody> {
    if shared.is_ready() {
        json(StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        let why = if shared.draining.load(Ordering::Acquire) {
            "draining"
        } else if !shared.ready.load(Ordering::Acquire) {
            "starting"
        } else {
            "required_service_down"
        };
        json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": why}))
    }
}

fn health(shared: &Shared, snapshot: &Snapshot) -> Response<GatewayBody> {
    let services: serde_json::Map<String, serde_json::Value> =
        snapshot.upstreams.iter().map(|(n, u)| (n.clone(), u.health_json())).collect();
    let all_up = services.values().all(|s| s["status"] == "healthy");
    let status = if shared.draining.load(Ordering::Acquire) {
        "draining"
    } else if all_up {
        "ok"
    } else {
        "degraded"
    };
    let code = if status == "draining" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    json(code, serde_json::json!({"status": status, "services": services}))
}

/// A JSON response made by the gateway.
pub fn json(status: StatusCode, v: serde_json::Value) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(serde_json::to_vec(&v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::server_timing;

    #[test]
    fn server_timing_is_milliseconds_with_three_decimals() {
        assert_eq!(server_timing(42, None), "gateway;dur=0.042");
        assert_eq!(server_timing(1_292, Some(1_250)), "gateway;dur=0.042, upstream;dur=1.250");
        assert_eq!(server_timing(12_345_678, Some(0)), "gateway;dur=12345.678, upstream;dur=0.000");
        assert_eq!(server_timing(5, Some(9)), "gateway;dur=0.000, upstream;dur=0.009");
    }
}
