//! The request path: one function per stage, in the order a request meets them.
//!
//! ```text
//! request id → gateway endpoints → path normalisation → route match (404/405)
//!   → body limit → header rewrite → upstream (pooled client, timeout) → response headers
//! ```
//! Every exit goes through [`GatewayError::into_response`] or the upstream's response, gets the
//! `X-Request-ID` header, and is observed when its body ends ([`crate::body::Observed`]).

use crate::auth::Principal;
use crate::body::{BodyFailure, BodyStats, GatewayBody, Observed, RequestBody, UpstreamBody};
use crate::error::{ErrorKind, GatewayError, Origin};
use crate::observe::{Metrics, RequestRecord};
use crate::pipeline::cors::Cors;
use crate::pipeline::validate;
use crate::pipeline::{normalize, request_id};
use crate::proxy::Call;
use crate::proxy::headers;
use crate::ratelimit::gcra::Decision;
use crate::ratelimit::redis::RedisStore;
use crate::ratelimit::{Limited, ceil_secs};
use crate::router::Match;
use crate::snapshot::Route;
use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderName;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Route label for requests that matched no route.
const UNMATCHED: &str = "unmatched";
/// Route label for the gateway's own endpoints.
const GATEWAY: &str = "gateway";

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
    unmatched: Arc<str>,
    gateway: Arc<str>,
}

impl Shared {
    /// Shared state around a first snapshot.
    pub fn new(snapshot: Snapshot, metrics: Arc<Metrics>, redis: Option<Arc<RedisStore>>) -> Self {
        Self {
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

/// Serves one request. Never fails: every error becomes a JSON response.
pub async fn handle(shared: Arc<Shared>, conn: ConnInfo, req: Request<Incoming>) -> Response<Observed> {
    let snapshot = shared.snapshot.load_full();
    let request_id = request_id::from_headers(req.headers());
    let access_log = snapshot.config.logging.access_log;
    RequestRecord::started(&shared.metrics);
    let mut pending = Pending(Some(RequestRecord {
        start: Instant::now(),
        request_id: request_id.clone(),
        method: req.method().clone(),
        route: shared.unmatched.clone(),
        path: access_log.then(|| req.uri().path().into()),
        status: 0,
        upstream_us: None,
        client_ip: conn.peer.ip(),
        body: Arc::new(BodyStats::default()),
        bytes_out: 0,
        aborted: false,
        metrics: shared.metrics.clone(),
        access_log,
    }));
    let rec = pending.0.as_mut().expect("set above");
    let origin = snapshot.cors.as_ref().and_then(|_| req.headers().get(header::ORIGIN).cloned());
    let mut ex = Exchange::default();
    let mut resp = match serve(&shared, &snapshot, conn, req, &request_id, rec, &mut ex).await {
        Ok(r) => r,
        Err(e) => {
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
    // A 429 already carries the refusing scope's values.
    if let Some(d) = ex.ratelimit.filter(|_| snapshot.ratelimit.headers)
        && !resp.headers().contains_key(&RATELIMIT_LIMIT)
    {
        ratelimit_headers(resp.headers_mut(), &d);
    }
    resp.headers_mut().insert(&request_id::X_REQUEST_ID, request_id);
    let mut rec = pending.0.take().expect("set above");
    rec.status = resp.status().as_u16();
    resp.map(|b| Observed::new(b, rec))
}

async fn serve(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: ConnInfo,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    rec: &mut RequestRecord,
    ex: &mut Exchange,
) -> Result<Response<GatewayBody>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    if let Some(resp) = own_endpoint(shared, snapshot, &parts, rec) {
        return resp;
    }
    if conn.framing_conflict.load(Ordering::Acquire) {
        return Err(GatewayError::new(ErrorKind::BadRequest, "both Content-Length and Transfer-Encoding").closing());
    }
    validate::check_limits(&parts, &snapshot.limits)?;
    validate::check_framing(&parts.headers)?;
    let path = normalize::normalize(parts.uri.path()).map_err(|e| GatewayError::new(ErrorKind::BadRequest, e.0))?;

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

    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH)
        && len.to_str().ok().and_then(|s| s.parse::<u64>().ok()).is_some_and(|n| n > route.max_body)
    {
        return Err(GatewayError::new(ErrorKind::PayloadTooLarge, "request body is larger than this route allows"));
    }
    validate::check_required(&parts.headers, &route.required_headers)?;
    let has_body = !body.is_end_stream();
    validate::check_content_type(&parts.headers, has_body, &route.config.content_types)?;

    // HTTP/2 clients send `:authority` instead of `Host`.
    let host = parts
        .headers
        .remove(header::HOST)
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let upstream_path = route.rewrite(&path);
    let pq = match parts.uri.query() {
        Some(q) => PathAndQuery::try_from(format!("{upstream_path}?{q}")),
        None => PathAndQuery::try_from(upstream_path.as_ref()),
    }
    .map_err(|_| GatewayError::new(ErrorKind::BadRequest, "invalid request target"))?;
    parts.uri = pq.into();

    let h = &mut parts.headers;
    headers::strip_hop_by_hop(h);
    h.remove(header::EXPECT); // 100-continue is answered by this hop
    headers::set_forwarded(h, conn.peer.ip(), conn.tls, host);
    h.insert(&request_id::X_REQUEST_ID, request_id.clone());
    set_principal(snapshot, h, principal.as_deref());

    let guarded = RequestBody::new(body, rec.body.clone(), route.max_body, snapshot.body_idle);
    let (body, replay) = if route.config.json && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        let bytes = guarded.read_all().await.map_err(body_error)?;
        // An empty body is allowed (start/stop carry none); a present one must be JSON.
        if !bytes.is_empty() {
            validate::check_json(&bytes, route.config.max_json_depth)?;
        }
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let replay = (bytes.len() as u64 <= route.upstream.max_replay_body()).then(|| bytes.clone());
        (UpstreamBody::Full(Full::new(bytes)), replay)
    } else if !has_body {
        // Nothing to stream: an empty body that a retry can send again.
        (UpstreamBody::Full(Full::new(Bytes::new())), Some(Bytes::new()))
    } else {
        (UpstreamBody::Stream(guarded), None)
    };

    let hash_key = consistent_hash_key(&route, &parts.headers, principal.as_deref());
    let req = Request::from_parts(parts, body);
    let sent = Instant::now();
    let call = Call {
        timeout: route.timeout,
        attempts: route.config.retry_attempts.unwrap_or_else(|| route.upstream.default_attempts()).max(1),
        replay,
        hash_key: hash_key.as_deref().map(str::as_bytes),
        deduplicated: false,
        metrics: &shared.metrics,
    };
    let result = route.upstream.forward(req, call).await;
    rec.upstream_us = Some(sent.elapsed().as_micros() as u64);
    let resp = result.map_err(|e| match rec.body.failure() {
        // The client's body broke the exchange, not the upstream.
        BodyFailure::None => {
            shared.metrics.upstream_error(&route.upstream.name, e.kind().code());
            e
        }
        f => body_error(f),
    })?;
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, GatewayBody::Upstream(body)))
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

/// Removes client-sent principal headers and credentials the upstream must not see, then
/// adds the authenticated principal.
fn set_principal(snapshot: &Snapshot, h: &mut http::HeaderMap, principal: Option<&Principal>) {
    let a = &snapshot.auth;
    h.remove(&a.subject_header);
    h.remove(&a.roles_header);
    h.remove(&a.method_header);
    if let Some(k) = a.api_key_header() {
        h.remove(k);
    }
    if a.jwt.as_ref().is_some_and(|j| !j.forward_token) {
        h.remove(header::AUTHORIZATION);
    }
    if let Some(p) = principal {
        if let Some(v) = &p.subject_header {
            h.insert(&a.subject_header, v.clone());
        }
        if let Some(v) = &p.roles_header {
            h.insert(&a.roles_header, v.clone());
        }
        h.insert(&a.method_header, HeaderValue::from_static(p.method.as_str()));
    }
}

/// The consistent-hash key: the configured header, else the configured claim (or subject).
fn consistent_hash_key(route: &Route, headers: &http::HeaderMap, principal: Option<&Principal>) -> Option<String> {
    let up = &route.upstream;
    if let Some(h) = &up.hash_header
        && let Some(v) = headers.get(h).and_then(|v| v.to_str().ok())
    {
        return Some(v.to_string());
    }
    if up.hash_claim.is_some() {
        return principal.map(|p| p.rate_key.to_string());
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

fn ratelimit_values(d: &Decision) -> [(HeaderName, HeaderValue); 3] {
    [
        (RATELIMIT_LIMIT.clone(), HeaderValue::from(d.limit)),
        (RATELIMIT_REMAINING.clone(), HeaderValue::from(d.remaining)),
        (RATELIMIT_RESET.clone(), HeaderValue::from(ceil_secs(d.reset))),
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
