//! Simulated backend services of the B25 high-frequency-trading system.
//!
//! Each of the seven B25 services ([`Service`]) can be started as an HTTP server
//! ([`start`] / [`start_with`]) that speaks HTTP/1.1 and h2c, answers every route of the B25
//! API table with plausible JSON (with or without the `/api/v1` prefix), records what it
//! received ([`SimServer::requests`]) and can inject faults, either service-wide through
//! [`Knobs`] or per request through headers:
//!
//! | header                                  | effect                                                        |
//! |-----------------------------------------|---------------------------------------------------------------|
//! | `x-sim-delay: <ms>`                     | wait before sending the response headers                      |
//! | `x-sim-status: <code>`                  | answer with that status and a JSON error body                 |
//! | `x-sim-reset: before-response`          | read and record the request, then abort without a response    |
//! | `x-sim-reset: mid-body`                 | send headers and a first body chunk, then abort               |
//! | `x-sim-reset: none`                     | disable a service-wide reset for this request                 |
//! | `x-sim-chunks: N`, `x-sim-chunk-delay`  | stream the body as `N` chunks with `<ms>` between them        |
//! | `x-sim-echo: 1`                         | answer with a JSON echo of the request                        |
//!
//! Per-request headers override the service-wide knobs. `/health` is never affected by knobs
//! and is not recorded. The dashboard service also serves a WebSocket at `/ws` that pushes
//! ticker messages and echoes client messages.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod body;
mod routes;
mod ws;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::body::SimBody;

/// Maximum number of recorded requests kept per server (oldest are dropped first).
pub const MAX_RECORDED: usize = 10_000;

/// The seven B25 backend services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// Market data: symbols, order books, trades and tickers.
    MarketData,
    /// Order execution: order entry, amendment and cancellation.
    OrderExecution,
    /// Strategy engine: trading strategy lifecycle.
    StrategyEngine,
    /// Account monitor: balances, positions and P&L.
    AccountMonitor,
    /// Risk manager: limits, status and the emergency stop.
    RiskManager,
    /// Configuration: key/value settings.
    Configuration,
    /// Dashboard: status summaries and the live WebSocket feed.
    Dashboard,
}

impl Service {
    /// Every service, in port order.
    pub const ALL: [Service; 7] = [
        Service::MarketData,
        Service::OrderExecution,
        Service::StrategyEngine,
        Service::AccountMonitor,
        Service::RiskManager,
        Service::Configuration,
        Service::Dashboard,
    ];

    /// The service's canonical name, e.g. `"market-data"`.
    pub fn name(self) -> &'static str {
        match self {
            Service::MarketData => "market-data",
            Service::OrderExecution => "order-execution",
            Service::StrategyEngine => "strategy-engine",
            Service::AccountMonitor => "account-monitor",
            Service::RiskManager => "risk-manager",
            Service::Configuration => "configuration",
            Service::Dashboard => "dashboard",
        }
    }

    /// Parses a canonical service name (as returned by [`Service::name`]).
    pub fn from_name(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The port the service conventionally listens on: 8081 (market-data) ..= 8087 (dashboard).
    pub fn default_port(self) -> u16 {
        8081 + self.index() as u16
    }

    /// Position of the service in [`Service::ALL`].
    fn index(self) -> usize {
        Service::ALL.iter().position(|s| *s == self).unwrap_or_default()
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request received by a simulated service (everything except `/health`).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Request method.
    pub method: Method,
    /// Path and query exactly as received.
    pub uri: Uri,
    /// Request headers as received.
    pub headers: HeaderMap,
    /// The complete request body.
    pub body: Bytes,
    /// Address of the client that sent the request.
    pub peer: SocketAddr,
}

/// How a request is reset when a reset fault is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetMode {
    /// Read (and record) the whole request, then abort the connection without any response.
    BeforeResponse,
    /// Send the response headers and a first body chunk, then abort the connection.
    MidBody,
}

impl ResetMode {
    fn to_u8(m: Option<ResetMode>) -> u8 {
        match m {
            None => 0,
            Some(ResetMode::BeforeResponse) => 1,
            Some(ResetMode::MidBody) => 2,
        }
    }

    fn from_u8(v: u8) -> Option<ResetMode> {
        match v {
            1 => Some(ResetMode::BeforeResponse),
            2 => Some(ResetMode::MidBody),
            _ => None,
        }
    }
}

/// Service-wide fault knobs, shared (an `Arc` with atomics inside; clones share state) and
/// changeable while the server runs. None of them affect `/health` except
/// [`Knobs::set_health_status`].
#[derive(Clone, Debug)]
pub struct Knobs {
    inner: Arc<KnobsInner>,
}

#[derive(Debug)]
struct KnobsInner {
    latency_us: AtomicU64,
    error_status: AtomicU16,
    reset: AtomicU8,
    health_status: AtomicU16,
    record: AtomicBool,
}

impl Knobs {
    fn new(record: bool) -> Self {
        Knobs {
            inner: Arc::new(KnobsInner {
                latency_us: AtomicU64::new(0),
                error_status: AtomicU16::new(0),
                reset: AtomicU8::new(0),
                health_status: AtomicU16::new(200),
                record: AtomicBool::new(record),
            }),
        }
    }

    /// Delay before the response headers of every request (not `/health`).
    pub fn set_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.inner.latency_us.store(us, Ordering::Relaxed);
    }

    /// Answers every request (not `/health`) with this status and a JSON error body;
    /// `None` restores normal answers. Statuses outside 200..=599 are ignored.
    pub fn set_error_status(&self, s: Option<u16>) {
        let v = s.filter(|s| (200..=599).contains(s)).unwrap_or(0);
        self.inner.error_status.store(v, Ordering::Relaxed);
    }

    /// Resets every request (not `/health`) in the given way; `None` disables.
    pub fn set_reset(&self, m: Option<ResetMode>) {
        self.inner.reset.store(ResetMode::to_u8(m), Ordering::Relaxed);
    }

    /// Status answered by `/health` (default 200). Statuses outside 200..=599 are ignored.
    pub fn set_health_status(&self, s: u16) {
        if (200..=599).contains(&s) {
            self.inner.health_status.store(s, Ordering::Relaxed);
        }
    }

    /// Records requests (default `true` for [`start`]); hits are counted either way.
    pub fn set_record(&self, on: bool) {
        self.inner.record.store(on, Ordering::Relaxed);
    }

    /// Current service-wide latency.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.inner.latency_us.load(Ordering::Relaxed))
    }

    /// Current service-wide error status.
    pub fn error_status(&self) -> Option<u16> {
        match self.inner.error_status.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s),
        }
    }

    /// Current service-wide reset mode.
    pub fn reset(&self) -> Option<ResetMode> {
        ResetMode::from_u8(self.inner.reset.load(Ordering::Relaxed))
    }

    /// Current `/health` status.
    pub fn health_status(&self) -> u16 {
        self.inner.health_status.load(Ordering::Relaxed)
    }

    /// Whether requests are currently recorded.
    pub fn record(&self) -> bool {
        self.inner.record.load(Ordering::Relaxed)
    }
}

/// Options for [`start_with`].
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Interval between ticker messages on the dashboard WebSocket (default 100 ms).
    pub ticker_interval: Duration,
    /// Initial value of [`Knobs::set_record`] (default `true`).
    pub record: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions { ticker_interval: Duration::from_millis(100), record: true }
    }
}

/// Counts live connection/stream/WebSocket tasks so shutdown can wait for all of them.
#[derive(Debug, Default)]
struct Tasks {
    live: AtomicUsize,
    idle: Notify,
}

struct TaskGuard(Arc<Tasks>);

impl Tasks {
    fn track(self: &Arc<Self>) -> TaskGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        TaskGuard(self.clone())
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// State shared by the accept loop, connections and handlers of one server.
struct Shared {
    service: Service,
    knobs: Knobs,
    ticker_interval: Duration,
    hits: AtomicU64,
    health_hits: AtomicU64,
    hit_notify: Notify,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    state: routes::State,
    shutdown: watch::Receiver<bool>,
    tasks: Arc<Tasks>,
}

impl Shared {
    /// Spawns a task that is dropped when the server shuts down and is waited for by
    /// [`SimServer::shutdown`].
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let guard = self.tasks.track();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                () = fut => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Executor for HTTP/2 stream tasks: tracked and cancelled on shutdown like connections.
#[derive(Clone)]
struct SimExec(Arc<Shared>);

impl<F> hyper::rt::Executor<F> for SimExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(async move {
            fut.await;
        });
    }
}

/// A running simulated service. Dropping it aborts the server and all its connections.
pub struct SimServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for SimServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimServer")
            .field("service", &self.shared.service)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimServer {
    /// Address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The simulated service.
    pub fn service(&self) -> Service {
        self.shared.service
    }

    /// Base URL, e.g. `"http://127.0.0.1:8081"`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests recorded so far (oldest first, excluding `/health`), bounded to the last
    /// [`MAX_RECORDED`].
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recorded).iter().cloned().collect()
    }

    /// Forgets the recorded requests (counters are kept).
    pub fn clear_requests(&self) {
        lock(&self.shared.recorded).clear();
    }

    /// Number of requests received, excluding `/health` (counted even when recording is off).
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Number of `/health` requests received.
    pub fn health_hits(&self) -> u64 {
        self.shared.health_hits.load(Ordering::SeqCst)
    }

    /// The service-wide fault knobs.
    pub fn knobs(&self) -> &Knobs {
        &self.shared.knobs
    }

    /// Orders held by the order-execution service, oldest first (empty for other services).
    pub fn orders(&self) -> Vec<Value> {
        self.shared.state.orders()
    }

    /// Waits until [`hits`](Self::hits) reaches `n`; returns `false` on timeout.
    pub async fn wait_for_hits(&self, n: u64, timeout: Duration) -> bool {
        self.wait_for(&self.shared.hits, n, timeout).await
    }

    /// Waits until [`health_hits`](Self::health_hits) reaches `n`; returns `false` on timeout.
    pub async fn wait_for_health_hits(&self, n: u64, timeout: Duration) -> bool {
        self.wait_for(&self.shared.health_hits, n, timeout).await
    }

    async fn wait_for(&self, counter: &AtomicU64, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.hit_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if counter.load(Ordering::SeqCst) >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return counter.load(Ordering::SeqCst) >= n;
            }
        }
    }

    /// Stops accepting, closes every connection (including WebSockets) and waits until all
    /// server tasks have finished.
    pub async fn shutdown(mut self) {
        self.shutdown_tx.send_replace(true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        self.shared.tasks.wait_idle().await;
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

/// Binds `addr` and starts `service` with default [`SimOptions`].
pub async fn start(service: Service, addr: SocketAddr) -> io::Result<SimServer> {
    let listener = TcpListener::bind(addr).await?;
    start_with(service, listener, SimOptions::default()).await
}

/// Starts `service` on an already bound listener.
pub async fn start_with(service: Service, listener: TcpListener, options: SimOptions) -> io::Result<SimServer> {
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        service,
        knobs: Knobs::new(options.record),
        ticker_interval: options.ticker_interval.max(Duration::from_millis(1)),
        hits: AtomicU64::new(0),
        health_hits: AtomicU64::new(0),
        hit_notify: Notify::new(),
        recorded: Mutex::new(VecDeque::new()),
        state: routes::State::new(service),
        shutdown: shutdown_rx,
        tasks: Arc::new(Tasks::default()),
    });
    let accept = tokio::spawn(accept_loop(listener, shared.clone()));
    Ok(SimServer { shared, addr, shutdown_tx, accept: Some(accept) })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let builder = Arc::new(auto::Builder::new(SimExec(shared.clone())));
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // E.g. EMFILE: back off briefly instead of spinning.
                tracing::warn!(service = shared.service.name(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn_shared = shared.clone();
        let builder = builder.clone();
        shared.spawn(async move {
            let svc = service_fn(move |req| handle(conn_shared.clone(), peer, req));
            if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, %peer, "connection ended with error");
            }
        });
    }
}

/// Strips an optional `/api/v1` prefix.
fn route_path(path: &str) -> &str {
    match path.strip_prefix("/api/v1") {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// Per-request fault directives (headers override knobs).
#[derive(Debug)]
struct Directives {
    delay: Duration,
    status: Option<u16>,
    reset: Option<ResetMode>,
    chunks: Option<usize>,
    chunk_delay: Duration,
    echo: bool,
}

const MAX_CHUNKS: usize = 65_536;

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    header_str(headers, name).and_then(|v| v.trim_end_matches("ms").parse::<u64>().ok()).map(Duration::from_millis)
}

impl Directives {
    fn new(headers: &HeaderMap, knobs: &Knobs) -> Self {
        let reset = match header_str(headers, "x-sim-reset") {
            Some(v) if v.eq_ignore_ascii_case("before-response") => Some(ResetMode::BeforeResponse),
            Some(v) if v.eq_ignore_ascii_case("mid-body") => Some(ResetMode::MidBody),
            Some(v) if v.eq_ignore_ascii_case("none") || v.eq_ignore_ascii_case("off") => None,
            _ => knobs.reset(),
        };
        let status = header_str(headers, "x-sim-status")
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|s| (200..=599).contains(s))
            .or_else(|| knobs.error_status());
        Directives {
            delay: header_ms(headers, "x-sim-delay").unwrap_or_else(|| knobs.latency()),
            status,
            reset,
            chunks: header_str(headers, "x-sim-chunks")
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .map(|n| n.min(MAX_CHUNKS)),
            chunk_delay: header_ms(headers, "x-sim-chunk-delay").unwrap_or_default(),
            echo: matches!(header_str(headers, "x-sim-echo"), Some(v) if v == "1" || v.eq_ignore_ascii_case("true")),
        }
    }
}

/// A JSON reply before fault shaping.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
    pub(crate) allow: Option<&'static str>,
}

impl Reply {
    pub(crate) fn new(status: StatusCode, body: Value) -> Self {
        Reply { status, body, allow: None }
    }

    pub(crate) fn ok(body: Value) -> Self {
        Reply::new(StatusCode::OK, body)
    }

    pub(crate) fn error(status: StatusCode, msg: impl Into<String>) -> Self {
        Reply::new(status, json!({ "error": msg.into() }))
    }

    pub(crate) fn not_found() -> Self {
        Reply::error(StatusCode::NOT_FOUND, "not found")
    }

    pub(crate) fn method_not_allowed(allow: &'static str) -> Self {
        Reply {
            status: StatusCode::METHOD_NOT_ALLOWED,
            body: json!({ "error": "method not allowed", "allow": allow }),
            allow: Some(allow),
        }
    }

    fn into_response(self, service: Service) -> Response<SimBody> {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        let mut resp = json_response(service, self.status, SimBody::full(body));
        if let Some(allow) = self.allow {
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

static X_SIM_SERVICE: HeaderName = HeaderName::from_static("x-sim-service");

fn json_response(service: Service, status: StatusCode, body: SimBody) -> Response<SimBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(X_SIM_SERVICE.clone(), HeaderValue::from_static(service.name()));
    resp
}

fn injected_error(service: Service, status: u16) -> Reply {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Reply::new(
        status,
        json!({
            "error": status.canonical_reason().unwrap_or("simulated error"),
            "status": status.as_u16(),
            "service": service.name(),
            "simulated": true,
        }),
    )
}

fn echo_body(method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<String> =
            headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
        map.insert(name.as_str().to_owned(), Value::String(values.join(", ")));
    }
    json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": map,
        "body": String::from_utf8_lossy(body),
    })
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "b25-sim: injected reset before response")
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<SimBody>, io::Error> {
    let service = shared.service;
    let path = route_path(req.uri().path());
    if path == "/health" {
        shared.health_hits.fetch_add(1, Ordering::SeqCst);
        shared.hit_notify.notify_waiters();
        let status = StatusCode::from_u16(shared.knobs.health_status()).unwrap_or(StatusCode::OK);
        let state = if status.is_success() { "ok" } else { "unhealthy" };
        return Ok(Reply::new(status, json!({ "status": state, "service": service.name() })).into_response(service));
    }

    let is_ws = service == Service::Dashboard && path.trim_end_matches('/') == "/ws";
    let on_upgrade =
        (is_ws && ws::is_upgrade_request(req.method(), req.headers())).then(|| hyper::upgrade::on(&mut req));

    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();

    if shared.knobs.record() {
        let rec = RecordedRequest {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
            peer,
        };
        let mut recorded = lock(&shared.recorded);
        if recorded.len() >= MAX_RECORDED {
            recorded.pop_front();
        }
        recorded.push_back(rec);
    }
    shared.hits.fetch_add(1, Ordering::SeqCst);
    shared.hit_notify.notify_waiters();

    let d = Directives::new(&parts.headers, &shared.knobs);
    if !d.delay.is_zero() {
        tokio::time::sleep(d.delay).await;
    }
    if d.reset == Some(ResetMode::BeforeResponse) {
        return Err(reset_error());
    }

    let reply = if d.echo {
        let mut reply = Reply::ok(echo_body(&parts.method, &parts.uri, &parts.headers, &body));
        if let Some(s) = d.status {
            reply.status = StatusCode::from_u16(s).unwrap_or(StatusCode::OK);
        }
        reply
    } else if let Some(s) = d.status {
        injected_error(service, s)
    } else if is_ws {
        match on_upgrade {
            Some(on_upgrade) => return Ok(ws::accept(&shared, &parts.headers, on_upgrade)),
            None if parts.method == Method::GET => ws::upgrade_required(),
            None => Reply::method_not_allowed("GET"),
        }
    } else {
        let path = route_path(parts.uri.path());
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        shared.state.route(&parts.method, &segs, parts.uri.query(), &body)
    };

    let mut resp = reply.into_response(service);
    if d.reset == Some(ResetMode::MidBody) || d.chunks.is_some() {
        let (head, body) = resp.into_parts();
        let bytes = body.into_full().unwrap_or_default();
        let n = d.chunks.unwrap_or(2);
        let body = if d.reset == Some(ResetMode::MidBody) {
            SimBody::truncated(bytes, n, d.chunk_delay)
        } else {
            SimBody::chunked(bytes, n, d.chunk_delay)
        };
        resp = Response::from_parts(head, body);
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (i, s) in Service::ALL.into_iter().enumerate() {
            assert_eq!(Service::from_name(s.name()), Some(s));
            assert_eq!(s.default_port(), 8081 + i as u16);
        }
        assert_eq!(Service::from_name("nope"), None);
        assert_eq!(Service::Dashboard.default_port(), 8087);
    }

    #[test]
    fn prefix_is_stripped() {
        assert_eq!(route_path("/api/v1/orders"), "/orders");
        assert_eq!(route_path("/orders"), "/orders");
        assert_eq!(route_path("/api/v1"), "/");
        assert_eq!(route_path("/api/v10/orders"), "/api/v10/orders");
    }

    #[test]
    fn knobs_store_values() {
        let k = Knobs::new(true);
        k.set_latency(Duration::from_millis(5));
        k.set_error_status(Some(503));
        k.set_reset(Some(ResetMode::MidBody));
        k.set_health_status(500);
        k.set_record(false);
        assert_eq!(k.latency(), Duration::from_millis(5));
        assert_eq!(k.error_status(), Some(503));
        assert_eq!(k.reset(), Some(ResetMode::MidBody));
        assert_eq!(k.health_status(), 500);
        assert!(!k.record());
        k.set_error_status(None);
        k.set_reset(None);
        assert_eq!(k.error_status(), None);
        assert_eq!(k.reset(), None);
    }
}
