//! The dashboard's WebSocket: periodic ticker messages plus an echo of client messages.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::body::SimBody;
use crate::{Reply, Shared, X_SIM_SERVICE};

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))).unwrap_or(false))
}

/// Whether the request is a valid HTTP/1.1 WebSocket upgrade request.
pub(crate) fn is_upgrade_request(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket")
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
        && headers.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v.as_bytes() == b"13")
}

/// `426 Upgrade Required` for a plain GET of the WebSocket endpoint.
pub(crate) fn upgrade_required() -> Reply {
    Reply::error(StatusCode::UPGRADE_REQUIRED, "upgrade required")
}

/// Answers `101 Switching Protocols` and spawns the WebSocket session.
pub(crate) fn accept(shared: &std::sync::Arc<Shared>, headers: &HeaderMap, on_upgrade: OnUpgrade) -> Response<SimBody> {
    let key = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())).unwrap_or_default();
    let interval = shared.ticker_interval;
    shared.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                session(ws, interval).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });

    let mut resp = Response::new(SimBody::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.insert(X_SIM_SERVICE.clone(), HeaderValue::from_static(crate::Service::Dashboard.name()));
    resp
}

/// Plausible BTCUSDT price for ticker number `seq`.
fn ticker_price(seq: u64) -> f64 {
    let wiggle = ((seq * 7919) % 2001) as f64 - 1000.0;
    ((65_000.0 + wiggle * 0.5) * 100.0).round() / 100.0
}

async fn session<S>(mut ws: WebSocketStream<S>, interval: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                seq += 1;
                let msg = json!({
                    "type": "ticker",
                    "symbol": "BTCUSDT",
                    "price": ticker_price(seq),
                    "seq": seq,
                });
                if ws.send(Message::text(msg.to_string())).await.is_err() {
                    break;
                }
            }
            incoming = ws.next() => match incoming {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
                // Pongs are queued by tungstenite; flush them right away. For a close frame
                // the reply is queued the same way and the stream then ends.
                Some(Ok(Message::Ping(_) | Message::Close(_))) => {
                    if ws.flush().await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket error");
                    break;
                }
                None => break,
            },
        }
    }
}
