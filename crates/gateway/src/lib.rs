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
pub mod deadline;
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

/// (year, month 1–12, day 1–31) of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_date(days: u64) -> (u32, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    (year, month, day)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it): wall time for records that
/// outlive the process or cross instances (cache entries, idempotency records, halt state).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs `f` on what `weak` points to every `every`, the first time one interval from now, for
/// as long as it lives (the background syncs with Redis: the halt, the cache's markers, the
/// memory policy). A run that overruns delays the next instead of bunching them.
pub(crate) fn every<T, F, Fut>(weak: std::sync::Weak<T>, every: std::time::Duration, f: F)
where
    T: Send + Sync + 'static,
    F: Fn(std::sync::Arc<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(t) = weak.upgrade() else { return };
            f(t).await;
        }
    });
}

/// A header value made from `bytes`, carved out of a per-thread arena instead of an allocation
/// of its own: request ids and `traceparent` values are made for every request. An arena block
/// (4 KiB) is freed when the last value cut from it is dropped. `None` if `bytes` is not a
/// valid header value.
pub(crate) fn header_value(bytes: &[u8]) -> Option<http::HeaderValue> {
    const BLOCK: usize = 4096;
    thread_local! {
        static ARENA: std::cell::RefCell<bytes::BytesMut> = std::cell::RefCell::new(bytes::BytesMut::new());
    }
    if bytes.len() > BLOCK / 8 {
        return http::HeaderValue::from_bytes(bytes).ok();
    }
    let shared = ARENA.with_borrow_mut(|arena| {
        if arena.capacity() - arena.len() < bytes.len() {
            *arena = bytes::BytesMut::with_capacity(BLOCK);
        }
        arena.extend_from_slice(bytes);
        arena.split().freeze()
    });
    http::HeaderValue::from_maybe_shared(shared).ok()
}

/// `n` in decimal as a header value, from the per-thread arena (no allocation of its own).
pub(crate) fn decimal_value(n: u64) -> http::HeaderValue {
    SCRATCH
        .with_borrow_mut(|v| {
            v.clear();
            push_decimal(v, n);
            header_value(v)
        })
        .expect("digits")
}

/// Spare header maps per thread: the request's and the response's maps were two allocations
/// each per request (a table and its entries), and as many frees.
const SPARE_MAPS: usize = 32;
/// A map that grew past this many headers is dropped instead of kept as a spare.
const SPARE_MAP_CAPACITY: usize = 64;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<http::HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty header map with room for `n` headers: one of this thread's spares (handed back by
/// [`recycle_header_map`]) when there is one, else a new one.
pub(crate) fn header_map(n: usize) -> http::HeaderMap {
    match SPARE.with_borrow_mut(Vec::pop) {
        Some(mut m) => {
            m.reserve(n);
            m
        }
        None => http::HeaderMap::with_capacity(n),
    }
}

/// Empties `m` (its values are released now) and keeps it as a spare for [`header_map`].
pub(crate) fn recycle_header_map(mut m: http::HeaderMap) {
    let cap = m.capacity();
    if cap == 0 || cap > SPARE_MAP_CAPACITY {
        return;
    }
    m.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARE_MAPS {
            spare.push(m);
        }
    });
}

thread_local! {
    /// Scratch space for header values assembled on the hot path.
    pub(crate) static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Appends `n` in decimal (header values and log fields built on the hot path without
/// `fmt`; `itoa`, already in the tree through `http`, writes two digits per step).
pub(crate) fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    #[test]
    fn spare_header_maps_come_back_empty() {
        let mut m = crate::header_map(4);
        m.insert(http::header::HOST, http::HeaderValue::from_static("a"));
        m.append(http::header::VIA, http::HeaderValue::from_static("b"));
        crate::recycle_header_map(m);
        let again = crate::header_map(8);
        assert!(again.is_empty());
        assert!(again.capacity() >= 8);
        assert!(again.get(http::header::HOST).is_none());
        // A map grown large is not kept.
        let mut big = http::HeaderMap::with_capacity(1000);
        big.insert(http::header::HOST, http::HeaderValue::from_static("a"));
        crate::recycle_header_map(big);
        assert!(crate::header_map(0).capacity() <= super::SPARE_MAP_CAPACITY);
    }

    #[test]
    fn arena_header_values_are_independent_and_validated() {
        // Enough values to cross several arena blocks.
        let values: Vec<_> = (0..1000).map(|i| crate::header_value(format!("id-{i:05}").as_bytes()).unwrap()).collect();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(v.to_str().unwrap(), format!("id-{i:05}"));
        }
        assert!(crate::header_value(b"bad\r\nvalue").is_none());
        for n in [0, 7, 1000, u64::MAX] {
            assert_eq!(crate::decimal_value(n).to_str().unwrap(), n.to_string());
        }
        let long = vec![b'a'; 2000];
        assert_eq!(crate::header_value(&long).unwrap().len(), 2000);
        let mut out = Vec::new();
        crate::push_decimal(&mut out, 0);
        out.push(b' ');
        crate::push_decimal(&mut out, u64::MAX);
        assert_eq!(out, b"0 18446744073709551615");
    }
}
