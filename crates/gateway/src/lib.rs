//! # b25-gateway
//!
//! The API gateway in front of the B25 trading system's services.
//!
//! ## Layout
//! The request path can be read off the module list, outer to inner:
//! - [`server`]: listeners (TCP/TLS, HTTP/1.1 + HTTP/2), admin listener, graceful shutdown;
//! - [`gateway`]: the request path, stage by stage, and the gateway's own endpoints;
//! - [`pipeline`]: policies applied before routing (request id, path normalisation, …);
//! - [`auth`]: JWT and API-key authentication, roles;
//! - [`ratelimit`]: GCRA rate limits in memory or Redis;
//! - [`router`]: path templates → routes (matchit), 404/405;
//! - [`proxy`]: upstream services: pooled clients, instance choice, health checks, headers;
//! - [`body`]: response/request body wrappers (streaming, counting, observing);
//! - [`error`]: the one error type and its single mapping to HTTP;
//! - [`observe`]: metrics and logs;
//! - [`config`] and [`snapshot`]: the YAML config and what is resolved from it once per load.
//!
//! The hot path takes no lock: the snapshot is read through `ArcSwap`, instance choice and
//! health are atomics, and logs go through a non-blocking writer.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod gateway;
pub mod halt;
pub mod idempotency;
pub mod net;
pub mod observe;
pub mod pipeline;
pub mod proxy;
pub mod ratelimit;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod version;
pub mod websocket;

/// Milliseconds since the Unix epoch (0 if the clock is before it): wall time for records that
/// outlive the process or cross instances (cache entries, idempotency records, halt state).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Appends `n` in decimal (header values built on the hot path without `fmt`).
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}
