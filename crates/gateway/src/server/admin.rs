//! The admin listener: `/metrics` (OpenMetrics text), `/health/readiness`, `/health/liveness`,
//! and the admin API (`/admin/*`, JSON): the trading halt and cache invalidation.
//! It stays up while the main listener drains, so the drain itself can be watched.
//! With `server.admin_token` set, `/admin/*` requires `Authorization: Bearer <token>` (compared
//! in constant time); config validation refuses a non-loopback admin listener without it.

use crate::body::GatewayBody;
use crate::error::{ErrorKind, GatewayError};
use crate::gateway::{Shared, json, readiness};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Content type of the OpenMetrics text format written by prometheus-client.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let shared = shared.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req, peer).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn route(shared: &Shared, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<GatewayBody> {
    let rid = crate::pipeline::request_id::from_headers(req.headers(), crate::proxy::headers::Seen::UNKNOWN);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut resp = match admin(shared, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(&rid),
    };
    // The admin API can halt trading and dump the config: every call to it is logged (never
    // the token) and counted, a refused token at `warn`, so guessing it shows. Scrapes and
    // probes (`/metrics`, `/health/*`) are not: they come every few seconds.
    if path.starts_with("/admin/") {
        let status = resp.status();
        let outcome = match status.as_u16() {
            401 => "unauthorized",
            s if s < 400 => "ok",
            s if s < 500 => "refused",
            _ => "error",
        };
        shared.metrics.admin_request(outcome);
        let request_id = rid.to_str().unwrap_or("");
        let client = peer.ip();
        if status == StatusCode::UNAUTHORIZED {
            tracing::warn!(target: "admin", %method, %path, status = status.as_u16(), request_id, %client, "admin request refused: admin token missing or wrong");
        } else {
            tracing::info!(target: "admin", %method, %path, status = status.as_u16(), request_id, %client, "admin request");
        }
    }
    resp.headers_mut().insert(&crate::pipeline::request_id::X_REQUEST_ID, rid);
    resp
}

async fn admin(shared: &Shared, req: Request<Incoming>) -> Result<Response<GatewayBody>, GatewayError> {
    let path = req.uri().path().to_string();
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    match path.as_str() {
        "/metrics" | "/health/readiness" | "/ready" | "/health/liveness" if !read => {
            return Err(GatewayError::method_not_allowed(HeaderValue::from_static("GET, HEAD")));
        }
        "/metrics" => {
            // Content negotiation: OpenMetrics when asked for (Prometheus does), else the
            // Prometheus text format.
            let om = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| s.contains("application/openmetrics-text")));
            let (body, ct) = if om {
                (shared.metrics.encode(), OPENMETRICS)
            } else {
                (shared.metrics.encode_prometheus(), PROMETHEUS_TEXT)
            };
            let mut r = Response::new(GatewayBody::full(body));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            return Ok(r);
        }
        "/health/readiness" | "/ready" => return Ok(readiness(shared)),
        "/health/liveness" => return Ok(json(StatusCode::OK, serde_json::json!({"status": "alive"}))),
        _ => {}
    }
    if !path.starts_with("/admin/") {
        return Err(GatewayError::new(ErrorKind::NotFound, "no such admin endpoint"));
    }
    authorize(shared, &req)?;
    let method = req.method().clone();
    let body = read_json(req).await?;
    match (method, path.as_str()) {
        (Method::GET, "/admin/halt") => {
            Ok(json(StatusCode::OK, serde_json::to_value(shared.halt.info()).unwrap_or_default()))
        }
        (Method::POST | Method::PUT, "/admin/halt") => {
            let halted = body.get("halted").and_then(|v| v.as_bool()).ok_or_else(|| {
                GatewayError::new(
                    ErrorKind::BadRequest,
                    "body must be {\"halted\": true|false, \"reason\": \"…\", \"by\": \"…\"}",
                )
            })?;
            let by = body.get("by").and_then(|v| v.as_str()).unwrap_or("admin-api");
            let reason = body.get("reason").and_then(|v| v.as_str()).unwrap_or("");
            let shared_ok = shared.halt.set(halted, by, reason).await;
            let mut v = serde_json::to_value(shared.halt.info()).unwrap_or_default();
            v["shared"] = shared_ok.into();
            Ok(json(StatusCode::OK, v))
        }
        (Method::POST, "/admin/cache/invalidate") => {
            let route = body.get("route").and_then(|v| v.as_str());
            let prefix = body.get("prefix").and_then(|v| v.as_str());
            let all = body.get("all").and_then(|v| v.as_bool()).unwrap_or(false);
            if route.is_none() && prefix.is_none() && !all {
                return Err(GatewayError::new(
                    ErrorKind::BadRequest,
                    "body must be {\"route\": id} or {\"prefix\": \"/path\"} or {\"all\": true}",
                ));
            }
            let done = shared.cache.invalidate(route, prefix).await;
            Ok(json(
                StatusCode::OK,
                serde_json::json!({"invalidated": true, "route": route, "prefix": prefix,
                    "shared": done.shared, "redis_keys_deleted": done.redis_keys_deleted}),
            ))
        }
        (Method::POST, "/admin/reload") => {
            let ok = shared.reload().await.is_ok();
            let status = if ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
            Ok(json(status, (**shared.last_reload.load()).clone()))
        }
        (Method::GET, "/admin/reload") => Ok(json(StatusCode::OK, (**shared.last_reload.load()).clone())),
        (Method::GET, "/admin/config") => {
            // Secrets serialize as "<redacted>".
            let snap = shared.snapshot.load();
            Ok(json(StatusCode::OK, serde_json::to_value(&*snap.config).unwrap_or_default()))
        }
        (Method::GET, "/admin/routes") => {
            let snap = shared.snapshot.load();
            let routes: Vec<_> = snap
                .config
                .routes
                .iter()
                .map(|r| serde_json::json!({"id": r.id, "path": r.path, "methods": r.methods, "service": r.service, "roles": r.roles, "public": r.public, "websocket": r.websocket, "cache": r.cache.is_some(), "idempotency": r.idempotency.is_some(), "halt": r.halt}))
                .collect();
            Ok(json(StatusCode::OK, serde_json::json!({"routes": routes})))
        }
        (Method::GET, "/admin/services") => {
            let snap = shared.snapshot.load();
            let services: serde_json::Map<String, serde_json::Value> =
                snap.upstreams.iter().map(|(n, u)| (n.clone(), u.health_json())).collect();
            Ok(json(StatusCode::OK, serde_json::json!({"services": services})))
        }
        (Method::GET, "/admin/stats") => {
            let snap = shared.snapshot.load();
            Ok(json(
                StatusCode::OK,
                serde_json::json!({
                    "rate_limit_keys_tracked": snap.ratelimit.tracked_keys(),
                    "cache_bytes": shared.cache.weight(),
                    "idempotency_records": shared.idempotency.memory_records(),
                    "websocket_connections": shared.ws.active(),
                    "redis": shared.redis.as_ref().map(|r| if r.is_down() { "down" } else { "up" }),
                    "trading_halt": shared.halt.info(),
                }),
            ))
        }
        // The methods each endpoint answers (RFC 9110 §15.5.6: `Allow` lists exactly those).
        (_, "/admin/halt") => Err(GatewayError::method_not_allowed(HeaderValue::from_static("GET, POST, PUT"))),
        (_, "/admin/cache/invalidate") => Err(GatewayError::method_not_allowed(HeaderValue::from_static("POST"))),
        (_, "/admin/reload") => Err(GatewayError::method_not_allowed(HeaderValue::from_static("GET, POST"))),
        (_, "/admin/config" | "/admin/routes" | "/admin/services" | "/admin/stats") => {
            Err(GatewayError::method_not_allowed(HeaderValue::from_static("GET")))
        }
        _ => Err(GatewayError::new(ErrorKind::NotFound, "no such admin endpoint")),
    }
}

fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<(), GatewayError> {
    let snap = shared.snapshot.load();
    let Some(token) = &snap.config.server.admin_token else { return Ok(()) };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok = aws_lc_rs::constant_time::verify_slices_are_equal(presented.as_bytes(), token.expose().as_bytes()).is_ok();
    if ok {
        Ok(())
    } else {
        Err(GatewayError::new(ErrorKind::Unauthenticated, "admin token required")
            .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"b25-gateway-admin\"")))
    }
}

async fn read_json(req: Request<Incoming>) -> Result<serde_json::Value, GatewayError> {
    let bytes = http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| GatewayError::new(ErrorKind::PayloadTooLarge, "admin request body too large"))?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| GatewayError::new(ErrorKind::BadRequest, format!("invalid JSON: {e}")))
}
