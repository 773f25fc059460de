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
        && headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL)
    {
        // Every line is read (a token may be on any of them). A line that is not text cannot be
        // split into subprotocols (which are tokens, RFC 6455 §4.1): it is dropped whole rather
        // than forwarded, since it may hold the token.
        let mut kept = Vec::new();
        for line in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok()) {
            for p in line.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match p.strip_prefix(prefix.as_str()) {
                    Some(t) => {
                        token.get_or_insert_with(|| t.to_string());
                    }
                    None => kept.push(p.to_string()),
                }
            }
        }
        headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
        if !kept.is_empty()
            && let Ok(v) = HeaderValue::from_str(&kept.join(", "))
        {
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

/// The Close tungstenite hands on in place of a peer's invalid one (a code no endpoint may
/// send, such as 0, 1005, 1006 or 5000), after answering that peer with 1002 itself.
fn is_violation(msg: &Message) -> bool {
    matches!(msg, Message::Close(Some(f)) if f.code == CloseCode::Protocol && f.reason == "Protocol violation")
}

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

/// How a relayed WebSocket connection ended.
enum End {
    /// The client sent a Close, relayed to the upstream.
    ClientClosed,
    /// The upstream sent a Close, relayed to the client.
    UpstreamClosed,
    /// The gateway ends it (a limit, the token, shutdown, the upstream gone): this Close goes to
    /// the client.
    Gateway(Message, &'static str),
    /// A side broke off without a Close.
    Gone,
}

/// How long the side a Close was relayed to has to answer it with its own.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);

/// Completes the closing handshake after `initiator`'s Close was relayed to `peer`: `peer`'s
/// reply Close is awaited (bounded; data frames after a Close are dropped), then `initiator` gets
/// its reply (tungstenite queued it when the Close was read; flushing sends it) and both
/// connections end. Without this the initiator saw the TCP connection drop with no Close back,
/// an unclean close (1006) to browsers.
async fn finish_close<A, B>(initiator: &mut WebSocketStream<A>, peer: &mut WebSocketStream<B>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
        while let Some(Ok(m)) = peer.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    let _ = initiator.flush().await;
    let _ = initiator.close(None).await;
    let _ = peer.close(None).await;
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
                        if msg.is_pong() {
                            // Each leg's pings are answered on that leg (tungstenite replies
                            // by itself); relaying the far side's pong too would answer twice.
                            continue;
                        }
                        let closing = msg.is_close();
                        // The client's own violation (e.g. a Close with a code no endpoint may
                        // send) is not the upstream's: it gets a Close without a code.
                        let msg = if is_violation(&msg) { Message::Close(None) } else { msg };
                        to_up += msg.len() as u64;
                        match u.send(msg).await {
                            Ok(()) if closing => break End::ClientClosed,
                            Ok(()) => {}
                            Err(_) => break End::Gone,
                        }
                    }
                    _ => break End::Gone,
                },
                m = u.next() => match m {
                    Some(Ok(msg)) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
                        if msg.is_pong() {
                            // Each leg's pings are answered on that leg (tungstenite replies
                            // by itself); relaying the far side's pong too would answer twice.
                            continue;
                        }
                        let closing = msg.is_close();
                        // The upstream's violation is not the client's: 1011, as for any other.
                        let msg = if is_violation(&msg) { close(CloseCode::Error, "upstream gone") } else { msg };
                        to_client += msg.len() as u64;
                        match c.send(msg).await {
                            Ok(()) if closing => break End::UpstreamClosed,
                            Ok(()) => {}
                            Err(_) => break End::Gone,
                        }
                    }
                    _ => break End::Gateway(close(CloseCode::Error, "upstream gone"), "upstream_gone"),
                },
                _ = &mut expiry => break End::Gateway(close(CloseCode::Policy, "token expired"), "token_expired"),
                _ = &mut lifetime => break End::Gateway(close(CloseCode::Normal, "maximum lifetime reached"), "max_lifetime"),
                _ = &mut idle => break End::Gateway(close(CloseCode::Normal, "idle timeout"), "idle"),
                _ = &mut shutdown => break End::Gateway(close(CloseCode::Away, "gateway shutting down"), "shutdown"),
            }
        };
        match ending {
            End::Gateway(frame, why) => {
                let _ = c.send(frame).await;
                let _ = c.close(None).await;
                let _ = u.send(close(CloseCode::Away, "client connection closed by the gateway")).await;
                let _ = u.close(None).await;
                self.metrics.websocket(&self.route, why);
            }
            // A Close from one side was relayed to the other: the closing handshake is
            // completed on both legs (RFC 6455 §5.5.1), then the connections end.
            End::ClientClosed => {
                finish_close(&mut c, &mut u).await;
                self.metrics.websocket(&self.route, "closed");
            }
            End::UpstreamClosed => {
                finish_close(&mut u, &mut c).await;
                self.metrics.websocket(&self.route, "closed");
            }
            End::Gone => {
                let _ = c.close(None).await;
                let _ = u.close(None).await;
                self.metrics.websocket(&self.route, "closed");
            }
        }
        self.metrics.websocket_bytes(&self.route, to_up, to_client);
        self.metrics.websocket_active(&self.route, -1);
        drop(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::{take_token, valid_key};
    use http::{HeaderMap, HeaderValue, header};

    #[test]
    fn a_subprotocol_token_never_stays_in_what_is_forwarded() {
        let cfg = crate::config::WebSocketConfig::default();
        let protos = |lines: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_bytes(l).unwrap());
            }
            take_token(&cfg, &mut h, None);
            let left: Vec<_> = h.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().cloned().collect();
            (left, h.get(header::AUTHORIZATION).cloned())
        };
        let (left, auth) = protos(&[b"b25.v1, bearer.tok"]);
        assert_eq!(left, ["b25.v1"]);
        assert_eq!(auth.unwrap(), "Bearer tok");
        // On a second line.
        let (left, auth) = protos(&[b"b25.v1", b"bearer.tok2"]);
        assert_eq!(left, ["b25.v1"]);
        assert_eq!(auth.unwrap(), "Bearer tok2");
        // A line that is not text is dropped whole, token and all.
        let (left, _) = protos(&[b"b25.v1, bearer.tok3, caf\xe9"]);
        assert!(left.is_empty(), "{left:?}");
    }

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
