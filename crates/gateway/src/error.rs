//! One error type for everything the gateway itself answers, and the one place that maps it to
//! an HTTP response.
//!
//! A [`GatewayError`] knows its [`ErrorKind`] (what happened), hence its origin (the client, an
//! upstream, or the gateway) and status. The JSON body is always
//! `{"error":{"code":…,"message":…,"request_id":…}}`; messages are written for clients and never
//! carry internal details (addresses, OS errors): those go to the log through [`GatewayError::detail`].

use crate::body::GatewayBody;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use std::borrow::Cow;
use std::fmt;

/// Where a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something we refuse.
    Downstream,
    /// An upstream failed or misbehaved.
    Upstream,
    /// The gateway itself (draining, a bug).
    Internal,
}

/// What went wrong; each kind has one status and one stable `code` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route for this path.
    NotFound,
    /// The path exists but not with this method.
    MethodNotAllowed,
    /// Malformed request (bad path encoding, bad header).
    BadRequest,
    /// Body larger than the route allows.
    PayloadTooLarge,
    /// No credential (401 with `WWW-Authenticate`).
    Unauthenticated,
    /// A credential was presented and refused (401).
    InvalidCredentials,
    /// Authenticated, but no allowed role (403).
    Forbidden,
    /// Cross-origin request from an origin not allowed (403).
    CorsRejected,
    /// `Content-Type` not accepted by the route (415).
    UnsupportedMediaType,
    /// Request target longer than allowed (414).
    UriTooLong,
    /// Too many or too large request headers (431).
    HeadersTooLarge,
    /// The client stopped sending its body (408).
    RequestTimeout,
    /// A rate limit refused the request (429).
    TooManyRequests,
    /// The same idempotency key is being processed (409).
    IdempotencyConflict,
    /// The idempotency key was used with another body (422).
    IdempotencyMismatch,
    /// A request precondition (`If-Match`, `If-Unmodified-Since`) failed on a cached response (412).
    PreconditionFailed,
    /// The idempotency store is unreachable: fail closed (503).
    IdempotencyUnavailable,
    /// Trading is halted and the route is blocked (503).
    TradingHalted,
    /// Could not connect to the upstream (refused, unreachable, connect timeout).
    UpstreamConnect,
    /// The upstream closed or reset the connection before a complete response.
    UpstreamReset,
    /// The upstream's response could not be parsed.
    UpstreamBadResponse,
    /// No response headers within the route's timeout.
    UpstreamTimeout,
    /// Every instance of the service is unhealthy.
    NoHealthyUpstream,
    /// The service's circuit breaker is open (503 with `Retry-After`).
    CircuitOpen,
    /// The gateway is shutting down.
    Draining,
    /// A gateway bug; details are logged, never sent.
    Internal,
}

impl ErrorKind {
    /// The HTTP status for this kind.
    pub fn status(self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthenticated | Self::InvalidCredentials => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::CorsRejected => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Self::IdempotencyConflict => StatusCode::CONFLICT,
            Self::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::IdempotencyUnavailable | Self::TradingHalted => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamConnect | Self::UpstreamReset | Self::UpstreamBadResponse => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::NoHealthyUpstream | Self::CircuitOpen | Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code in the JSON body.
    pub fn code(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadRequest => "bad_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidCredentials => "invalid_credentials",
            Self::Forbidden => "forbidden",
            Self::CorsRejected => "cors_origin_not_allowed",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::UriTooLong => "uri_too_long",
            Self::HeadersTooLarge => "headers_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::TooManyRequests => "rate_limited",
            Self::IdempotencyConflict => "idempotency_in_flight",
            Self::IdempotencyMismatch => "idempotency_key_reused",
            Self::PreconditionFailed => "precondition_failed",
            Self::IdempotencyUnavailable => "idempotency_unavailable",
            Self::TradingHalted => "trading_halted",
            Self::UpstreamConnect => "upstream_unavailable",
            Self::UpstreamReset => "upstream_reset",
            Self::UpstreamBadResponse => "bad_upstream_response",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::NoHealthyUpstream => "no_healthy_upstream",
            Self::CircuitOpen => "circuit_open",
            Self::Draining => "draining",
            Self::Internal => "internal_error",
        }
    }

    /// Where this kind of failure comes from.
    pub fn origin(self) -> Origin {
        match self {
            Self::NotFound
            | Self::MethodNotAllowed
            | Self::BadRequest
            | Self::PayloadTooLarge
            | Self::Unauthenticated
            | Self::InvalidCredentials
            | Self::Forbidden
            | Self::CorsRejected
            | Self::UnsupportedMediaType
            | Self::UriTooLong
            | Self::HeadersTooLarge
            | Self::RequestTimeout
            | Self::TooManyRequests
            | Self::IdempotencyConflict
            | Self::IdempotencyMismatch
            | Self::PreconditionFailed
            | Self::TradingHalted => Origin::Downstream,
            Self::IdempotencyUnavailable => Origin::Internal,
            Self::UpstreamConnect
            | Self::UpstreamReset
            | Self::UpstreamBadResponse
            | Self::UpstreamTimeout
            | Self::NoHealthyUpstream
            | Self::CircuitOpen => Origin::Upstream,
            Self::Draining | Self::Internal => Origin::Internal,
        }
    }

    /// True when no byte of the request can have reached an upstream, so even a POST may be
    /// retried on another instance (used by the retry policy).
    pub fn request_not_sent(self) -> bool {
        matches!(self, Self::UpstreamConnect | Self::NoHealthyUpstream | Self::CircuitOpen)
    }
}

/// A failure the gateway answers itself.
#[derive(Debug)]
pub struct GatewayError {
    kind: ErrorKind,
    message: Cow<'static, str>,
    // Rare parts are boxed so `Result<_, GatewayError>` stays small on the hot path.
    headers: Vec<(HeaderName, HeaderValue)>,
    close: bool,
    detail: Option<Box<str>>,
}

impl GatewayError {
    /// An error of `kind` with a client-facing message.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self { kind, message: message.into(), headers: Vec::new(), close: false, detail: None }
    }

    /// A 405 carrying the `Allow` header value.
    pub fn method_not_allowed(allow: HeaderValue) -> Self {
        Self::new(ErrorKind::MethodNotAllowed, "method not allowed for this path").with_header(header::ALLOW, allow)
    }

    /// Adds one response header (`Allow`, `WWW-Authenticate`, …).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Closes the client connection after the response (framing errors, smuggling attempts).
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// Attaches an internal detail (logged, never sent to the client).
    pub fn with_detail(mut self, detail: impl fmt::Display) -> Self {
        self.detail = Some(detail.to_string().into_boxed_str());
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The client-facing message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The internal detail, for logs.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The single mapping from error to HTTP response.
    pub fn into_response(self, request_id: &HeaderValue) -> Response<GatewayBody> {
        let body = error_json(self.kind.code(), &self.message, request_id.to_str().unwrap_or(""));
        let mut resp = Response::new(GatewayBody::full(body));
        *resp.status_mut() = self.kind.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (name, value) in self.headers {
            h.insert(name, value);
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

impl std::error::Error for GatewayError {}

/// `{"error":{"code":…,"message":…,"request_id":…}}` with proper JSON string escaping.
pub fn error_json(code: &str, message: &str, request_id: &str) -> Bytes {
    let v = serde_json::json!({"error": {"code": code, "message": message, "request_id": request_id}});
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn maps_to_json_with_status_and_allow() {
        let rid = HeaderValue::from_static("abc");
        let r = GatewayError::method_not_allowed(HeaderValue::from_static("GET")).into_response(&rid);
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[header::ALLOW], "GET");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "method_not_allowed");
        assert_eq!(v["error"]["request_id"], "abc");
        let t = GatewayError::new(ErrorKind::UpstreamTimeout, "x").with_detail("10.0.0.1:80");
        let r = t.into_response(&rid);
        assert_eq!(r.status(), 504);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains("10.0.0.1"), "detail leaked");
    }
}
