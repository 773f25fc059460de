//! Upstream HTTP/1.1 connection pools: one per (worker thread, instance).
//!
//! Built on `hyper::client::conn::http1` instead of hyper-util's general-purpose client: the
//! gateway knows the instance before it sends, so a pool is a short `Vec` behind an
//! uncontended mutex (its worker is the only thread that uses it): no per-request hashing of
//! a pool key, no lazily built connect future, no task spawned per request to wait for the
//! connection to become reusable.
//!
//! A connection goes back into its pool as soon as the response head is in; while its body is
//! still streaming it is not *ready*, and checkout skips it. Checkout takes the most recently
//! used ready connection (LIFO keeps a small warm set), drops closed ones and ones idle longer
//! than `pool_idle_timeout`; a sweep task on the worker closes idle ones even without traffic.
//!
//! Order safety: a request is only re-sent on another connection when hyper hands it back
//! unsent (the pooled connection was found closed before a byte was written). Anything else
//! is reported to the caller, whose retry policy decides (see the module docs of `proxy`).

use crate::body::UpstreamBody as Body;
use crate::error::{ErrorKind, GatewayError};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Pool settings of one service.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Time allowed for the TCP connect.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Connections kept per pool.
    pub max_idle: usize,
}

struct Pooled {
    tx: SendRequest<Body>,
    /// When the connection last carried a request head.
    used: Instant,
}

/// The connections of one worker to one instance.
pub struct Pool {
    /// `host:port` to connect to.
    authority: Arc<str>,
    cfg: PoolConfig,
    conns: Mutex<Vec<Pooled>>,
    /// A sweep task runs while the pool holds connections.
    sweeping: std::sync::atomic::AtomicBool,
}

impl Pool {
    /// An empty pool for `authority` (`host:port`).
    pub fn new(authority: &str, cfg: PoolConfig) -> Arc<Self> {
        Arc::new(Self {
            authority: authority.into(),
            cfg,
            conns: Mutex::new(Vec::new()),
            sweeping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A ready pooled connection, if any.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let now = Instant::now();
        let mut conns = self.conns.lock().expect("not poisoned");
        conns.retain(|c| !c.tx.is_closed() && now.duration_since(c.used) < self.cfg.idle_timeout);
        let i = conns.iter().rposition(|c| c.tx.is_ready())?;
        Some(conns.swap_remove(i).tx)
    }

    /// Keeps `tx` for the next request (it becomes ready when its response body is done).
    fn checkin(self: &Arc<Self>, tx: SendRequest<Body>) {
        if tx.is_closed() || self.cfg.max_idle == 0 {
            return;
        }
        let mut conns = self.conns.lock().expect("not poisoned");
        if conns.len() >= self.cfg.max_idle {
            // The least recently used one goes (it finishes what it is doing, then closes).
            conns.remove(0);
        }
        conns.push(Pooled { tx, used: Instant::now() });
        drop(conns);
        if !self.sweeping.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self), self.cfg.idle_timeout));
        }
    }

    /// Opens a new connection (its driver task runs on the calling worker).
    pub async fn connect(&self, upgrades: bool) -> Result<SendRequest<Body>, GatewayError> {
        let fail = |what: String| {
            GatewayError::new(ErrorKind::UpstreamConnect, "could not connect to the upstream service")
                .with_detail(format!("{}: {what}", self.authority))
        };
        let stream = match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(&*self.authority)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => return Err(fail(format!("connect timed out after {:?}", self.cfg.connect_timeout))),
        };
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(super::UPSTREAM_TCP_KEEPALIVE)
                .with_interval(super::UPSTREAM_TCP_KEEPALIVE),
        );
        let (tx, conn) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| fail(e.to_string()))?;
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        Ok(tx)
    }

    /// Sends `req` (origin-form URI, `Host` set) on a pooled or new connection and returns the
    /// response head. `opened` is called for every new connection.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
        opened: impl Fn(),
    ) -> Result<Response<Incoming>, GatewayError> {
        loop {
            let (mut tx, reused) = match self.checkout() {
                Some(tx) => (tx, true),
                None => {
                    opened();
                    (self.connect(false).await?, false)
                }
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(tx);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Never written (the pooled connection was closing): a new one, once.
                    Some(unsent) if reused => req = unsent,
                    unsent => return Err(classify(e.error(), unsent.is_some())),
                },
            }
        }
    }
}

/// Closes connections idle longer than the timeout; ends when the pool is gone or empty.
async fn sweep(pool: Weak<Pool>, every: Duration) {
    let every = every.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        let mut conns = pool.conns.lock().expect("not poisoned");
        conns.retain(|c| !c.tx.is_closed() && now.duration_since(c.used) < pool.cfg.idle_timeout);
        if conns.is_empty() {
            pool.sweeping.store(false, std::sync::atomic::Ordering::Release);
            return;
        }
    }
}

/// Maps a send error to the kind that says where it failed.
pub fn classify(e: &hyper::Error, unsent: bool) -> GatewayError {
    let detail = error_chain(e);
    if unsent {
        return GatewayError::new(ErrorKind::UpstreamConnect, "could not connect to the upstream service")
            .with_detail(detail);
    }
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        return GatewayError::new(ErrorKind::UpstreamBadResponse, "the upstream service sent an invalid response")
            .with_detail(detail);
    }
    GatewayError::new(
        ErrorKind::UpstreamReset,
        "the upstream service closed the connection without a complete response",
    )
    .with_detail(detail)
}

/// An error and its sources, `: `-joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
