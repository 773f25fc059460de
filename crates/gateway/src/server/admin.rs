//! The admin listener: `/metrics` (OpenMetrics text), `/health/readiness`, `/health/liveness`.
//! It stays up while the main listener drains, so the drain itself can be watched.

use crate::body::GatewayBody;
use crate::error::{ErrorKind, GatewayError};
use crate::gateway::{Shared, json, readiness};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Content type of the OpenMetrics text format written by prometheus-client.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, _stop: watch::Receiver<bool>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, &req)) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<GatewayBody> {
    let rid = crate::pipeline::request_id::from_headers(req.headers());
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(GatewayBody::full(shared.metrics.encode()));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            r
        }
        "/health/readiness" | "/ready" => readiness(shared),
        "/health/liveness" => json(StatusCode::OK, serde_json::json!({"status": "alive"})),
        _ => GatewayError::new(ErrorKind::NotFound, "no such admin endpoint").into_response(&rid),
    }
}
