//! WebSocket proxying for routes marked `websocket: true`.
//!
//! The upgrade request goes through the whole request path first (authentication, roles, rate
//! limits, and an Origin check against the CORS allow-list that refuses cross-site WebSocket
//! hijacking with 403) before the gateway connects upstream. Browsers may send the token in a
//! query parameter or a `Sec-WebSocket-Protocol` entry; both are removed before forwarding and
//! never logged. The upstream must answer 101 with the right `Sec-WebSocket-Accept` (else 502);
//! other 4xx/5xx answers are passed to the client.
//!
//! After 101 the gateway relays *messages* (tokio-tungstenite on both sides) rather than raw
//! bytes. That costs a frame parse per message but buys what a byte pipe cannot do: a message
//! size limit, and real close frames — 1008 when the JWT that opened the connection expires,
//! 1001 on shutdown, 1000 on idle timeout or maximum lifetime — at a frame boundary, never in
//! the middle of one. Compression extensions are not negotiated (the extension header is
//! removed), so frames pass through unchanged. Connections belong to the gateway, not to a
//! config snapshot: a reload never drops them.

use crate::auth::Principal;
use crate::body::GatewayBody;
use crate::config::WebSocketConfig;
use crate::error::{ErrorKind, GatewayError};
use crate::observe::Metrics;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig as WsConfig};

/// Open connections, per principal, and the shutdown signal.
pub struct Tracker {
    active: AtomicUsize,
    per_principal: Mutex<HashMap<Arc<str>, usize>>,
    idle: Notify,
    shutdown: watch::Sender<bool>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            active: AtomicUsize::new(0),
            per_principal: Mutex::new(HashMap::new()),
            idle: Notify::new(),
            shutdown: watch::channel(false).0,
        }
    }
}

/// Holds one connection's place in the limits; releases it on drop.
pub struct Slot {
    tracker: Arc<Tracker>,
    principal: Option<Arc<str>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = &self.principal
            && let Ok(mut m) = self.tracker.per_principal.lock()
            && let Some(n) = m.get_mut(p)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(p);
            }
        }
        if self.tracker.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

impl Tracker {
    /// Open connections.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Takes a place, or says which limit is full.
    pub fn admit(self: &Arc<Self>, cfg: &WebSocketConfig, principal: Option<&Arc<str>>) -> Result<Slot, GatewayError> {
        if self.active.fetch_add(1, Ordering::AcqRel) >= cfg.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return Err(GatewayError::new(ErrorKind::TooManyRequests, "too many WebSocket connections"));
        }
        let slot = Slot { tracker: self.clone(), principal: principal.cloned() };
        if let Some(p) = principal {
            let mut m = self.per_principal.lock().expect("not poisoned");
            let n = m.entry(p.clone()).or_insert(0);
            if *n >= cfg.max_per_principal {
                drop(m);
                let mut s = slot;
                s.principal = None;
                return Err(GatewayError::new(
                    ErrorKind::TooManyRequests,
                    "too many WebSocket connections for this principal",
                ));
            }
            *n += 1;
        }
        Ok(slot)
    }

    /// The shutdown signal for a relay.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Asks every connection to close with 1001 (Going Away).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until every connection has closed.
    pub async fn wait_closed(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// True for a WebSocket upgrade request (RFC 6455 §4.2.1).
pub fn is_upgrade(method: &http::Method, h: &HeaderMap) -> bool {
    method == http::Method::GET
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && h.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && h.contains_key(header::SEC_WEBSOCKET_KEY)
}

/// A `Sec-WebSocket-Key` value: the base64 of 16 bytes (22 characters, the last of which
/// carries 2 bits and 4 zero bits, then `==`).
pub fn valid_key(k: &[u8]) -> bool {
    k.len() == 24
        && k[..21].iter().all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
        && matches!(k[21], b'A' | b'Q' | b'g' | b'w')
        && &k[22..] == b"=="
}

/// Moves a browser token (query parameter or subprotocol entry) into `Authorization` when the
/// request has none, and removes it from what will be forwarded. Returns the cleaned query.
pub fn take_token(cfg: &WebSocketConfig, headers: &mut HeaderMap, query: Option<&str>) -> Option<String> {
    let mut token = None;
    let mut kept_query = Vec::new();
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if cfg.token_query_param.as_deref() == Some(k) {
                token.get_or_insert_with(|| v.to_string());
            } else {
                kept_query.push(pair);
            }
        }
    }
    if let Some(prefix) = &cfg.token_subprotocol_prefix
        && let Some(protos) =
            headers.get(header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok()).map(str::to_string)
    {
        let mut kept = Vec::new();
        for p in protos.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.strip_prefix(prefix.as_str()) {
                Some(t) => {
                    token.get_or_insert_with(|| t.to_string());
                }
                None => kept.push(p),
            }
        }
        if kept.is_empty() {
            headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
        } else if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    if let Some(t) = &token
        && !headers.contains_key(header::AUTHORIZATION)
        && let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}"))
    {
        headers.insert(header::AUTHORIZATION, v);
    }
    query.map(|_| kept_query.join("&"))
}

/// Checks the upstream's answer to the upgrade: `Ok(true)` for a valid 101, `Ok(false)` for an
/// answer to pass to the client (4xx/5xx), `Err` (502) for anything else.
pub fn check_answer(status: StatusCode, headers: &HeaderMap, client_key: &HeaderValue) -> Result<bool, GatewayError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let want = derive_accept_key(client_key.as_bytes());
        return match headers.get(header::SEC_WEBSOCKET_ACCEPT) {
            Some(v) if v.as_bytes() == want.as_bytes() => Ok(true),
            _ => Err(GatewayError::new(
                ErrorKind::UpstreamBadResponse,
                "the upstream answered the upgrade with a wrong Sec-WebSocket-Accept",
            )),
        };
    }
    if status.is_client_error() || status.is_server_error() {
        return Ok(false);
    }
    Err(GatewayError::new(ErrorKind::UpstreamBadResponse, "the upstream did not switch protocols"))
}

/// The client's side of an upgrade: from hyper (HTTP/1.1 on the hyper engine) or from the
/// gateway's own HTTP/1.1 connection.
pub enum ClientUpgrade {
    /// hyper's.
    Hyper(hyper::upgrade::OnUpgrade),
    /// The native connection's.
    Native(crate::server::h1::OnUpgrade),
}

impl ClientUpgrade {
    /// Takes the upgrade handle out of a request's extensions.
    pub fn take(ext: &mut http::Extensions) -> Option<Self> {
        if let Some(u) = ext.remove::<crate::server::h1::OnUpgrade>() {
            return Some(Self::Native(u));
        }
        ext.remove::<hyper::upgrade::OnUpgrade>().map(Self::Hyper)
    }

    /// The switched stream, once the `101` answer is out.
    async fn stream(self) -> Option<Box<dyn crate::server::h1::Io>> {
        match self {
            Self::Hyper(u) => u.await.ok().map(|u| Box::new(TokioIo::new(u)) as Box<dyn crate::server::h1::Io>),
            Self::Native(u) => u.stream().await.map(|s| Box::new(s) as Box<dyn crate::server::h1::Io>),
        }
    }
}

/// Everything the relay task needs.
pub struct Relay {
    /// The client's side of the upgrade.
    pub client: ClientUpgrade,
    /// The upstream's side.
    pub upstream: hyper::upgrade::OnUpgrade,
    /// Limits.
    pub cfg: WebSocketConfig,
    /// Who opened it (token expiry).
    pub principal: Option<Arc<Principal>>,
    /// The place in the limits (released when the relay ends).
    pub slot: Slot,
    /// Route label.
    pub route: Arc<str>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Shutdown signal.
    pub shutdown: watch::Receiver<bool>,
}

/// The 101 answer for the client.
pub fn switching(client_key: &HeaderValue, protocol: Option<&HeaderValue>) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(client_key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone());
    }
    r
}

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

impl Relay {
    /// Runs until either side closes or a limit ends the connection.
    pub async fn run(self) {
        let (Some(client), Ok(upstream)) = (self.client.stream().await, self.upstream.await) else {
            self.metrics.websocket(&self.route, "upgrade_failed");
            return;
        };
        let size = self.cfg.max_message_size.bytes() as usize;
        let ws_cfg = WsConfig::default().max_message_size(Some(size)).max_frame_size(Some(size));
        let mut c = WebSocketStream::from_raw_socket(client, Role::Server, Some(ws_cfg)).await;
        let mut u = WebSocketStream::from_raw_socket(TokioIo::new(upstream), Role::Client, Some(ws_cfg)).await;
        self.metrics.websocket_active(&self.route, 1);
        let now_unix = crate::unix_ms() / 1000;
        let token_left = self
            .principal
            .as_ref()
            .and_then(|p| p.exp)
            .filter(|_| self.cfg.close_on_token_expiry)
            .map(|exp| Duration::from_secs(exp.saturating_sub(now_unix)));
        let expiry = tokio::time::sleep(token_left.unwrap_or(Duration::from_secs(10 * 365 * 86_400)));
        let lifetime = tokio::time::sleep(self.cfg.max_lifetime.get());
        let idle_for = self.cfg.idle_timeout.get();
        let idle = tokio::time::sleep(idle_for);
        let mut sd = self.shutdown.clone();
        let shutdown = async move {
            let _ = sd.wait_for(|s| *s).await;
        };
        tokio::pin!(expiry, lifetime, idle, shutdown);
        let (mut to_up, mut to_client) = (0u64, 0u64);
        let ending = loop {
            tokio::select! {
                m = c.next() => match m {
                    Some(Ok(msg)) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
                        let closing = msg.is_close();
                        to_up += msg.len() as u64;
                        if u.send(msg).await.is_err() || closing {
                            break None;
                        }
                    }
                    _ => break None,
                },
                m = u.next() => match m {
                    Some(Ok(msg)) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
                        let closing = msg.is_close();
                        to_client += msg.len() as u64;
                        if c.send(msg).await.is_err() || closing {
                            break None;
                        }
                    }
                    _ => break Some((close(CloseCode::Error, "upstream gone"), "upstream_gone")),
                },
                _ = &mut expiry => break Some((close(CloseCode::Policy, "token expired"), "token_expired")),
                _ = &mut lifetime => break Some((close(CloseCode::Normal, "maximum lifetime reached"), "max_lifetime")),
                _ = &mut idle => break Some((close(CloseCode::Normal, "idle timeout"), "idle")),
                _ = &mut shutdown => break Some((close(CloseCode::Away, "gateway shutting down"), "shutdown")),
            }
        };
        if let Some((frame, why)) = ending {
            let _ = c.send(frame).await;
            let _ = c.close(None).await;
            let _ = u.send(close(CloseCode::Away, "client connection closed by the gateway")).await;
            let _ = u.close(None).await;
            self.metrics.websocket(&self.route, why);
        } else {
            let _ = c.close(None).await;
            let _ = u.close(None).await;
            self.metrics.websocket(&self.route, "closed");
        }
        self.metrics.websocket_bytes(&self.route, to_up, to_client);
        self.metrics.websocket_active(&self.route, -1);
        drop(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::valid_key;

    #[test]
    fn websocket_keys() {
        // RFC 6455's example and all-zero / all-one 16 bytes.
        for ok in ["dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA==", "/////////////////////w=="] {
            assert!(valid_key(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",    // no padding
            "dGhlIHNhbXBsZSBub25jZR==",  // 16 bytes cannot end in 'R'
            "dGhlIHNhbXBsZSBub25jZQ=",   // 23
            "dGhlIHNhbXBsZSBub25jZQ===", // 25
            "dGhlIHNhbXBsZSBub25j*Q==",  // not base64
            "dGhlIHNhbXBsZSBub25jZQ= ",  // trailing space
            "dGhlIHNhbXBsZSBub25jZWU=",  // 17 bytes
        ] {
            assert!(!valid_key(bad.as_bytes()), "{bad:?}");
        }
    }
}
