//! Listeners and lifecycle: the main listener (TCP or TLS, HTTP/1.1 and HTTP/2), the admin
//! listener, readiness, and graceful shutdown.
//!
//! Shutdown order (SIGTERM/SIGINT or [`GatewayHandle::shutdown`]):
//! 1. readiness turns 503 (`draining`) while listeners still accept for `shutdown_delay`, so
//!    load balancers take the instance out before connections are refused;
//! 2. the main listener closes; idle keep-alive connections are closed, busy ones finish their
//!    in-flight requests (HTTP/1 answers `Connection: close`, HTTP/2 sends GOAWAY);
//! 3. after `shutdown_grace`, whatever is still open is cut and logged;
//! 4. the admin listener closes last, so metrics and readiness stay visible during the drain.

mod admin;
pub mod h1;
mod sniff;
pub mod tls;
pub mod workers;

use crate::body::ClientBody;
use crate::config::Config;
use crate::gateway::{self, ConnInfo, Shared};
use crate::observe::{Metrics, RequestRecord};
use crate::ratelimit::redis::RedisStore;
use crate::snapshot::Snapshot;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// hyper's own hard cap on a request header block. The configured `max_header_bytes` is
/// enforced by the gateway (JSON 431), excluding `Authorization`, whose size the JWT layer
/// bounds (`max_token_size`, 401); this cap only stops absurd header blocks early.
const HARD_MAX_HEADER_BYTES: usize = 2 << 20;

/// Back-off after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid.
    #[error("{0}")]
    Config(crate::config::ConfigErrors),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: String,
        /// Why (in the message, not a `source`: printing the chain would say it twice).
        error: std::io::Error,
    },
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The state backend could not be set up.
    #[error("state: {0}")]
    State(String),
    /// The worker threads could not be started.
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
}

/// A running gateway.
pub struct GatewayHandle {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl GatewayHandle {
    /// The main listener's bound address (useful with port 0); follows a reload that moved it.
    pub fn addr(&self) -> SocketAddr {
        self.shared.listen_addr.lock().expect("not poisoned").unwrap_or(self.addr)
    }
    /// The admin listener's bound address, if enabled; follows a reload that moved it.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let moved = self.shared.admin.lock().expect("not poisoned").1;
        moved.or(self.admin_addr)
    }
    /// Shared state (snapshot, metrics, readiness).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    /// Waits until the first health-check round is done and readiness is 200.
    pub async fn ready(&self) {
        let mut rx = self.stop.subscribe();
        while !self.shared.ready.load(Ordering::Acquire) {
            // `ready` is set right before a `send_replace(false)` wakes this up.
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
    /// Starts the graceful shutdown (returns at once; see [`wait`](Self::wait)).
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
    /// Reads the config file on reload with `loader` instead of [`crate::config::load`]
    /// (the demo's own `${VAR}` values); the first call wins.
    pub fn set_loader(&self, loader: crate::gateway::Loader) {
        let _ = self.shared.loader.set(loader);
    }

    /// Reloads the config file (see [`Shared::reload`]).
    pub async fn reload(&self) -> Result<(), crate::config::ConfigErrors> {
        self.shared.reload().await
    }

    /// Waits for the gateway to stop.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Builds the snapshot, binds the listeners and starts serving. Returns once listening; the
/// gateway reports ready after the first health-check round.
pub async fn start(config: Config, file: &str) -> Result<GatewayHandle, StartError> {
    let server_cfg = config.server.clone();
    let runtime = config.runtime_problems();
    if !runtime.is_empty() {
        return Err(StartError::Config(crate::config::ConfigErrors { file: file.to_string(), errors: runtime }));
    }
    let snapshot = Snapshot::build(config)
        .map_err(|errors| StartError::Config(crate::config::ConfigErrors { file: file.to_string(), errors }))?;
    let metrics = Arc::new(Metrics::new());
    let redis = match (&snapshot.config.state.backend, &snapshot.config.state.redis) {
        (crate::config::state::Backend::Redis, Some(r)) => {
            Some(RedisStore::start(r, metrics.clone()).map_err(StartError::State)?)
        }
        _ => None,
    };
    metrics.prime(&snapshot);
    snapshot.resolve_metrics(&metrics);
    let shared = Arc::new(Shared::new(snapshot, metrics, redis));

    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move { TcpListener::bind(&addr).await.map_err(|error| StartError::Bind { addr, error }) }
    };
    let listener = bind(&server_cfg.listen).await?;
    let addr = listener.local_addr().map_err(|error| StartError::Bind { addr: server_cfg.listen.clone(), error })?;
    let (tls, certs) = match &server_cfg.tls {
        Some(t) => {
            let (a, r) = tls::acceptor(t, server_cfg.http2)?;
            (Some(a), Some(r))
        }
        None => (None, None),
    };
    *shared.certs.lock().expect("not poisoned") = certs;
    *shared.config_file.lock().expect("not poisoned") = Some(file.to_string());
    let admin = if server_cfg.admin_listen.is_empty() { None } else { Some(bind(&server_cfg.admin_listen).await?) };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());

    let (stop, stop_rx) = watch::channel(false);
    // Hard caps on a request head (the configured, finer limits are the handler's).
    let max_head = HARD_MAX_HEADER_BYTES.max(server_cfg.limits.max_header_bytes.bytes() as usize);
    let max_headers = server_cfg.limits.max_headers.saturating_mul(2).max(100);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server_cfg.limits.header_timeout.get())
        .max_buf_size(max_head)
        .max_headers(max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(max_head as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    if !server_cfg.http2 {
        builder = builder.http1_only();
    }
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(max_head as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let protocols = Protocols {
        hyper: builder,
        h2,
        native: (server_cfg.http1 == crate::config::Http1Engine::Native).then(|| {
            Arc::new(h1::Settings { header_timeout: server_cfg.limits.header_timeout.get(), max_head, max_headers })
        }),
        http2: server_cfg.http2,
    };

    // Initial health round, then ready; periodic checks after.
    {
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let snap = shared.snapshot.load_full();
            let jwks = async {
                if let Some(j) = &snap.auth.jwt {
                    j.start_background().await;
                }
            };
            let health = futures_util::future::join_all(snap.upstreams.values().map(|u| u.check_all()));
            // With Redis, the shared trading halt is read once before ready (order routes are
            // refused until it has been read; see `Halt`), and the cache's shared invalidation
            // markers (entries another instance invalidated are not served).
            let eviction = async {
                if let Some(r) = &shared.redis {
                    r.check_eviction().await;
                }
            };
            futures_util::future::join5(jwks, health, shared.halt.sync(), shared.cache.sync(), eviction).await;
            for u in snap.upstreams.values() {
                u.spawn_health_checks();
            }
            shared.ready.store(true, Ordering::Release);
            stop.send_modify(|_| {});
            tracing::info!("ready");
        });
    }

    if server_cfg.watch_config {
        spawn_config_watch(std::sync::Arc::downgrade(&shared), file.to_string());
    }
    if let Some(l) = admin {
        *shared.admin.lock().expect("not poisoned") = (Some(tokio::spawn(serve_admin(l, shared.clone()))), admin_addr);
    }
    // The admin listener's supervisor: a reload that moves it sends the new listener here.
    let (admin_tx, mut admin_rx) = tokio::sync::mpsc::unbounded_channel::<Option<TcpListener>>();
    *shared.admin_rebind.lock().expect("not poisoned") = Some(admin_tx);
    {
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some(next) = admin_rx.recv().await {
                let Some(shared) = weak.upgrade() else { return };
                let mut admin = shared.admin.lock().expect("not poisoned");
                if let Some(old) = admin.0.take() {
                    old.abort();
                }
                admin.1 = next.as_ref().and_then(|l| l.local_addr().ok());
                tracing::info!(addr = ?admin.1, "admin listener moved");
                if let Some(l) = next {
                    admin.0 = Some(tokio::spawn(serve_admin(l, shared.clone())));
                }
            }
        });
    }
    let (rebind_tx, rebind_rx) = tokio::sync::mpsc::unbounded_channel();
    *shared.rebind.lock().expect("not poisoned") = Some(rebind_tx);
    let grace = server_cfg.shutdown_grace.get();
    let delay = server_cfg.shutdown_delay.get();
    let workers = workers::Workers::start(server_cfg.worker_count()).map_err(StartError::Workers)?;
    let done = tokio::spawn(run(
        listener,
        workers,
        protocols,
        tls,
        shared.clone(),
        stop_rx,
        delay,
        grace,
        server_cfg.limits.header_timeout.get(),
        rebind_rx,
    ));
    let admin_str = admin_addr.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, admin = %admin_str, tls = server_cfg.tls.is_some(), "listening");
    Ok(GatewayHandle { addr, admin_addr, shared, stop, done })
}

/// Serves the admin listener (also used when a reload moves it).
pub async fn serve_admin(listener: TcpListener, shared: Arc<Shared>) {
    admin::serve(listener, shared).await
}

/// How connections are served.
struct Protocols {
    /// HTTP/1.1 and HTTP/2 by hyper (the `hyper` engine).
    hyper: auto::Builder<TokioExecutor>,
    /// HTTP/2 beside the native HTTP/1.1 connection.
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// The native HTTP/1.1 connection's limits (`None`: the hyper engine).
    native: Option<Arc<h1::Settings>>,
    /// HTTP/2 is served.
    http2: bool,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mut listener: TcpListener,
    workers: workers::Workers,
    protocols: Protocols,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    delay: Duration,
    grace: Duration,
    header_timeout: Duration,
    mut rebind: tokio::sync::mpsc::UnboundedReceiver<TcpListener>,
) {
    let graceful = GracefulShutdown::new();
    // Native connections watch this: true asks them to finish and close; all of them are
    // gone when every receiver is dropped.
    let (drain_tx, drain_rx) = watch::channel(false);
    let protocols = Arc::new(protocols);
    // A TLS handshake is part of "sending the request head": same budget as the headers.
    let handshake_timeout = header_timeout;
    let mut draining_since: Option<tokio::time::Instant> = None;
    loop {
        let deadline = draining_since.map(|t| t + delay);
        tokio::select! {
            biased;
            r = stop.changed(), if draining_since.is_none() => {
                if r.is_err() || *stop.borrow() {
                    shared.draining.store(true, Ordering::Release);
                    tracing::info!(delay = ?delay, "draining: readiness now 503");
                    draining_since = Some(tokio::time::Instant::now());
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break,
            Some(l) = rebind.recv() => {
                // A reload moved the listener: accept on the new one; open connections stay.
                listener = l;
            }
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // Re-registered with the chosen worker's reactor below.
                    let stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => { tracing::debug!(%peer, error = %e, "cannot hand the connection to a worker"); continue; }
                    };
                    let framing_conflict = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let conn = ConnInfo::new(peer, tls.is_some(), framing_conflict.clone());
                    let gauge = shared.metrics.connections().clone();
                    let shared_conn = (shared.clone(), ConnInfo { framing_checked: true, writes_own_headers: true, ..conn.clone() });
                    let shared = shared.clone();
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let shared = shared.clone();
                        let conn = conn.clone();
                        async move { Ok::<_, Infallible>(gateway::handle(shared, conn, req.map(|b| ClientBody::Hyper(crate::body::HeldBody::new(b)))).await) }
                    });
                    let watcher = graceful.watcher();
                    let drain = drain_rx.clone();
                    let protocols = protocols.clone();
                    let tls = tls.clone();
                    workers.spawn(async move {
                        gauge.inc();
                        let _dec = scopeguard(move || { gauge.dec(); });
                        let stream = match tokio::net::TcpStream::from_std(stream) {
                            Ok(s) => s,
                            Err(e) => { tracing::debug!(%peer, error = %e, "cannot register the connection"); return; }
                        };
                        let r = match tls {
                            Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => {
                                    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                                    match &protocols.native {
                                        Some(settings) if !h2 => {
                                            let wire = h1::Wire::new(Box::new(s), bytes::BytesMut::with_capacity(8 * 1024));
                                            native(wire, &protocols, settings, shared_conn, svc, watcher, drain).await
                                        }
                                        Some(_) => watcher.watch(protocols.h2.serve_connection(TokioIo::new(s), svc)).await.map_err(Into::into),
                                        None => {
                                            let io = TokioIo::new(sniff::Sniff::new(s, framing_conflict));
                                            watcher.watch(protocols.hyper.serve_connection_with_upgrades(io, svc).into_owned()).await
                                        }
                                    }
                                }
                                Ok(Err(e)) => { tracing::debug!(%peer, error = %e, "TLS handshake failed"); return; }
                                Err(_) => { tracing::debug!(%peer, "TLS handshake timed out"); return; }
                            },
                            None => match &protocols.native {
                                Some(settings) => {
                                    let wire = h1::Wire::new(Box::new(stream), bytes::BytesMut::with_capacity(8 * 1024));
                                    native(wire, &protocols, settings, shared_conn, svc, watcher, drain).await
                                }
                                None => {
                                    let io = TokioIo::new(sniff::Sniff::new(stream, framing_conflict));
                                    watcher.watch(protocols.hyper.serve_connection_with_upgrades(io, svc).into_owned()).await
                                }
                            },
                        };
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }
    drop(listener);
    drop(drain_rx);
    let open = graceful.count() + drain_tx.receiver_count();
    tracing::info!(connections = open, grace = ?grace, "listener closed; finishing in-flight requests");
    // WebSockets were detached from their connections at the upgrade: close them ourselves
    // (1001).
    shared.ws.shutdown();
    drain_tx.send_replace(true);
    let drained = async {
        futures_util::future::join(graceful.shutdown(), drain_tx.closed()).await;
        shared.ws.wait_closed().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        let cut = RequestRecord::in_flight(&shared.metrics);
        tracing::warn!(requests_cut = cut, "shutdown grace period over; cutting what is still in flight");
    }
    if let Some(a) = shared.admin.lock().expect("not poisoned").0.take() {
        a.abort();
    }
    // Stops the worker threads; anything still open on them is cut with their runtimes.
    drop(workers);
    tracing::info!("stopped");
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves a connection on the native HTTP/1.1 engine, or hands it to hyper's HTTP/2 when it
/// opens with the h2c preface (and HTTP/2 is on).
async fn native<S>(
    mut wire: h1::Wire,
    protocols: &Protocols,
    settings: &Arc<h1::Settings>,
    (shared, conn): (Arc<Shared>, ConnInfo),
    svc: S,
    watcher: hyper_util::server::graceful::Watcher,
    drain: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::body::Observed> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    if protocols.http2 {
        // Decided at the first bytes that differ from the preface (the second byte of any
        // HTTP/1 method but PRI); a client that sends nothing is cut at the header timeout.
        let sniff = async {
            while wire.may_be_h2() && wire.buffered() < h1::H2_PREFACE.len() {
                if !wire.read_more().await {
                    return None;
                }
            }
            Some(wire.may_be_h2())
        };
        match tokio::time::timeout(settings.header_timeout, sniff).await {
            Ok(Some(true)) => {
                let io = TokioIo::new(wire.into_rewind());
                return watcher.watch(protocols.h2.serve_connection(io, svc)).await.map_err(Into::into);
            }
            Ok(Some(false)) => {}
            Ok(None) | Err(_) => return Ok(()),
        }
    }
    drop(watcher);
    h1::serve(wire, shared, conn, settings.clone(), drain).await;
    Ok(())
}

/// Runs `f` when dropped (the connection gauge must drop even if the task is cancelled).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Reloads when the config file's modification time or size changes (polled every second:
/// no platform file-watch dependency, and editors that replace the file are handled alike).
fn spawn_config_watch(shared: std::sync::Weak<Shared>, file: String) {
    tokio::spawn(async move {
        let stamp = |f: &str| std::fs::metadata(f).ok().map(|m| (m.modified().ok(), m.len()));
        let mut last = stamp(&file);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else { return };
            let now = stamp(&file);
            if now != last && now.is_some() {
                last = now;
                tracing::info!(file = %file, "config file changed: reloading");
                let _ = shared.reload().await;
            }
        }
    });
}
