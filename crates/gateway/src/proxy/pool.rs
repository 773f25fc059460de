//! Upstream HTTP/1.1 connection pools: one per (worker thread, instance).
//!
//! The gateway knows the instance before it sends, so a pool is a short `Vec` of idle
//! connections behind an uncontended mutex (its worker is the only thread that uses it): no
//! per-request hashing of a pool key, no task per connection (see [`super::h1`]).
//!
//! A connection is out of the pool while it carries a request; its response body puts it
//! back when the body ends cleanly. Checkout takes the most recently used connection (LIFO
//! keeps a small warm set), drops ones the upstream closed and ones idle longer than
//! `pool_idle_timeout`; a sweep task on the worker closes idle ones even without traffic.
//!
//! Order safety: a request is only re-sent on another connection when its first write failed
//! (not a byte left). Anything else is reported to the caller, whose retry policy decides
//! (see the module docs of `proxy`).

use super::h1::{Conn, ResponseBody, WriteError};
use crate::body::UpstreamBody as Body;
use crate::error::{ErrorKind, GatewayError};
use http::Response;
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
    /// A response body that sends nothing for this long is cut.
    pub response_idle_timeout: Duration,
}

struct Pooled {
    conn: Conn,
    /// When the connection's latest request started (a little before it came back: the
    /// idle time is over- rather than underestimated).
    used: Instant,
}

/// The idle connections of one worker to one instance.
pub struct Pool {
    /// `host:port` to connect to.
    authority: Arc<str>,
    cfg: PoolConfig,
    /// Oldest first.
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

    /// How long a response body may send nothing.
    pub fn response_idle_timeout(&self) -> Duration {
        self.cfg.response_idle_timeout
    }

    /// The most recently used live idle connection, if any (`now`: the caller's clock reading).
    fn checkout(&self, now: Instant) -> Option<Conn> {
        let mut conns = self.conns.lock().expect("not poisoned");
        while let Some(Pooled { mut conn, used }) = conns.pop() {
            if now.duration_since(used) >= self.cfg.idle_timeout {
                // Newest first: the rest are older still.
                conns.clear();
                return None;
            }
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps an idle connection for the next request.
    pub(super) fn checkin(self: &Arc<Self>, conn: Conn) {
        if self.cfg.max_idle == 0 {
            return;
        }
        let mut conns = self.conns.lock().expect("not poisoned");
        if conns.len() >= self.cfg.max_idle {
            conns.remove(0);
        }
        let used = conn.used;
        conns.push(Pooled { conn, used });
        drop(conns);
        if !self.sweeping.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self), self.cfg.idle_timeout));
        }
    }

    /// Opens a TCP connection (no delay, keepalive probes).
    async fn connect_tcp(&self) -> Result<TcpStream, GatewayError> {
        let stream = match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(&*self.authority)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.connect_error(e.to_string())),
            Err(_) => return Err(self.connect_error(format!("connect timed out after {:?}", self.cfg.connect_timeout))),
        };
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(super::UPSTREAM_TCP_KEEPALIVE)
                .with_interval(super::UPSTREAM_TCP_KEEPALIVE),
        );
        Ok(stream)
    }

    fn connect_error(&self, what: String) -> GatewayError {
        GatewayError::new(ErrorKind::UpstreamConnect, "could not connect to the upstream service")
            .with_detail(format!("{}: {what}", self.authority))
    }

    /// Opens a connection for an upgrade (WebSocket handshake) with hyper, whose upgrade
    /// machinery hands the raw stream to the relay after a 101. Never pooled.
    pub async fn connect_upgradable(&self) -> Result<SendRequest<Body>, GatewayError> {
        let stream = self.connect_tcp().await?;
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.connect_error(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(tx)
    }

    /// Sends a request (the URI's path and query, `Host` the instance's, then `hop`'s headers) on a pooled or new
    /// connection and returns the response head; the body streams from the connection.
    /// `opened` is called for every new connection.
    pub async fn send(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        hop: Option<&super::h1::HopHeaders<'_>>,
        mut body: Body,
        now: Instant,
        opened: impl Fn(),
    ) -> Result<Response<ResponseBody>, GatewayError> {
        loop {
            let (mut conn, reused) = match self.checkout(now) {
                Some(c) => (c, true),
                None => {
                    opened();
                    (Conn::new(self.connect_tcp().await?), false)
                }
            };
            conn.used = now;
            match conn.write_request(parts, &self.authority, hop, &mut body).await {
                Ok(()) => return conn.read_response(&parts.method, self, true).await,
                // Dead before the first byte: a new connection (its failure is final).
                Err(WriteError::Unsent(_)) if reused => continue,
                Err(WriteError::Unsent(e)) => {
                    return Err(GatewayError::new(
                        ErrorKind::UpstreamConnect,
                        "could not connect to the upstream service",
                    )
                    .with_detail(format!("{}: {e}", self.authority)));
                }
                Err(WriteError::Body(e)) => {
                    return Err(GatewayError::new(ErrorKind::UpstreamReset, "the request body could not be sent")
                        .with_detail(e.to_string()));
                }
                Err(WriteError::Io(e)) => {
                    // The upstream may have answered early and closed (e.g. 413 while the body
                    // was still streaming): that answer is the response.
                    return conn.read_response(&parts.method, self, false).await.map_err(|_| {
                        GatewayError::new(
                            ErrorKind::UpstreamReset,
                            "the upstream service closed the connection without a complete response",
                        )
                        .with_detail(format!("{}: {e}", self.authority))
                    });
                }
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
        conns.retain_mut(|c| now.duration_since(c.used) < pool.cfg.idle_timeout && c.conn.is_usable());
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
