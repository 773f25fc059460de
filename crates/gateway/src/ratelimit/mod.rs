//! Rate limiting: global, per client IP, per route, per principal and per principal per route,
//! with GCRA ([`gcra`]) in memory or shared through Redis ([`redis`]).
//!
//! Order (the first scope that refuses answers): global → per IP → per route run before
//! authentication, so a flood of bad tokens is limited per IP before any signature is checked;
//! per principal → per principal per route run after it. Single-key scopes (global, a route's
//! budget) keep their in-memory state in the snapshot itself; keyed scopes use a bounded
//! cache (`max_keys`), so a flood of random IPs cannot grow memory. No allocation and no lock
//! on the in-memory path beyond the cache's sharded lookup.

pub mod gcra;
pub mod redis;

use crate::config::state::{OnRedisError, RateLimitsConfig};
use crate::config::{ConfigError, LimitConfig};
use crate::net::Cidr;
use crate::observe::Metrics;
use gcra::{Decision, Rate};
use http::HeaderMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// A keyed scope's key. Cloning is cheap (an `Arc<str>` at most): no allocation per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Key {
    /// One client address.
    Ip(IpAddr),
    /// One principal over all routes.
    Principal(Arc<str>),
    /// One principal on one route (by index in the snapshot).
    PrincipalRoute(Arc<str>, u32),
    /// The global budget (Redis key only; memory keeps it in the limiter).
    Global,
    /// A route's budget (Redis key only; memory keeps it in the route).
    Route(Arc<str>),
}

impl Key {
    fn redis(&self) -> String {
        match self {
            Key::Ip(ip) => format!("ip:{ip}"),
            Key::Principal(p) => format!("p:{p}"),
            Key::PrincipalRoute(p, r) => format!("pr:{r}:{p}"),
            Key::Global => "global".into(),
            Key::Route(r) => format!("r:{r}"),
        }
    }
}

/// A single budget with its in-memory state.
#[derive(Debug)]
pub struct Budget {
    /// The limit.
    pub rate: Rate,
    tat: AtomicU64,
}

impl Budget {
    fn new(c: &LimitConfig) -> Self {
        Self { rate: Rate::new(c), tat: AtomicU64::new(0) }
    }
}

/// A route's limits, resolved with the snapshot.
#[derive(Debug, Default)]
pub struct RouteLimits {
    /// Shared by all callers of the route.
    pub route: Option<Budget>,
    /// Per principal on this route.
    pub principal: Option<Rate>,
}

impl RouteLimits {
    /// From a route's config.
    pub fn new(route: Option<&LimitConfig>, principal: Option<&LimitConfig>) -> Self {
        Self { route: route.map(Budget::new), principal: principal.map(Rate::new) }
    }
}

/// A refusal: the decision of the scope that refused, and its name.
#[derive(Debug)]
pub struct Limited {
    /// `global`, `ip`, `route`, `principal`, `principal_route`.
    pub scope: &'static str,
    /// The refusing decision.
    pub decision: Decision,
}

/// The limiter of one snapshot.
pub struct RateLimiter {
    global: Option<Budget>,
    per_ip: Option<Rate>,
    per_principal: Option<Rate>,
    /// JWT claim used as the principal key instead of `sub`.
    pub principal_claim: Option<String>,
    memory: quick_cache::sync::Cache<Key, Arc<AtomicU64>>,
    on_error: OnRedisError,
    /// Send `RateLimit-*` on successful responses.
    pub headers: bool,
    trusted: Vec<Cidr>,
    base: Instant,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

fn scope_rate(c: &Option<LimitConfig>, path: &str, errors: &mut Vec<ConfigError>) -> Option<Rate> {
    let c = c.as_ref()?;
    if c.rate == 0 || c.per.get().is_zero() || c.burst == Some(0) {
        errors.push(ConfigError::new(path, "rate, per and burst must be greater than 0"));
        return None;
    }
    Some(Rate::new(c))
}

impl RateLimiter {
    /// Builds from config; `trusted_proxies` come from `server`.
    pub fn new(c: &RateLimitsConfig, trusted_proxies: &[String], errors: &mut Vec<ConfigError>) -> Self {
        let global =
            scope_rate(&c.global, "rate_limits.global", errors).map(|rate| Budget { rate, tat: AtomicU64::new(0) });
        Self {
            global,
            per_ip: scope_rate(&c.per_ip, "rate_limits.per_ip", errors),
            per_principal: scope_rate(&c.per_principal, "rate_limits.per_principal", errors),
            principal_claim: c.principal_claim.clone(),
            memory: quick_cache::sync::Cache::new(c.max_keys.max(16)),
            on_error: c.on_redis_error,
            headers: c.headers,
            trusted: trusted_proxies.iter().filter_map(|t| Cidr::parse(t).ok()).collect(),
            base: Instant::now(),
        }
    }

    /// Keys currently tracked in memory (bounded by `max_keys`).
    pub fn tracked_keys(&self) -> usize {
        self.memory.len()
    }

    fn now(&self) -> u64 {
        // Offset so a fresh TAT of 0 is always in the past.
        self.base.elapsed().as_nanos() as u64 + 1_000_000_000_000
    }

    /// The client address: the TCP peer, unless the peer is a trusted proxy; then the
    /// right-most address of `X-Forwarded-For` that is not a trusted proxy. A client cannot
    /// choose its own key by sending forwarding headers.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        client_ip(peer, headers, &self.trusted)
    }

    async fn one(
        &self,
        redis: Option<&redis::RedisStore>,
        metrics: &Metrics,
        scope: &'static str,
        key: Key,
        rate: &Rate,
        local: Option<&AtomicU64>,
    ) -> Decision {
        let d = match redis {
            Some(r) => match r.check(&key.redis(), rate).await {
                Some(d) => d,
                None => match self.on_error {
                    OnRedisError::Allow => {
                        metrics.ratelimit(scope, "redis_error_allowed");
                        return Decision {
                            allowed: true,
                            limit: rate.burst,
                            remaining: rate.burst,
                            reset: 0,
                            retry_after: 0,
                        };
                    }
                    OnRedisError::Deny => {
                        metrics.ratelimit(scope, "redis_error_denied");
                        return Decision {
                            allowed: false,
                            limit: rate.burst,
                            remaining: 0,
                            reset: 1_000_000_000,
                            retry_after: 1_000_000_000,
                        };
                    }
                    OnRedisError::Local => self.local(key, rate, local),
                },
            },
            None => self.local(key, rate, local),
        };
        metrics.ratelimit(scope, if d.allowed { "allowed" } else { "limited" });
        d
    }

    fn local(&self, key: Key, rate: &Rate, local: Option<&AtomicU64>) -> Decision {
        let now = self.now();
        match local {
            Some(tat) => gcra::check(tat, now, rate),
            None => {
                let tat = self
                    .memory
                    .get_or_insert_with(&key, || Ok::<_, std::convert::Infallible>(Arc::new(AtomicU64::new(0))))
                    .unwrap_or_else(|never| match never {});
                gcra::check(&tat, now, rate)
            }
        }
    }

    /// Global, per-IP and per-route budgets (before authentication).
    pub async fn check_anonymous(
        &self,
        redis: Option<&redis::RedisStore>,
        metrics: &Metrics,
        ip: IpAddr,
        route_id: &Arc<str>,
        route: &RouteLimits,
        tightest: &mut Option<Decision>,
    ) -> Result<(), Limited> {
        if let Some(g) = &self.global {
            let d = self.one(redis, metrics, "global", Key::Global, &g.rate, Some(&g.tat)).await;
            record("global", d, tightest)?;
        }
        if let Some(rate) = &self.per_ip {
            let d = self.one(redis, metrics, "ip", Key::Ip(ip), rate, None).await;
            record("ip", d, tightest)?;
        }
        if let Some(b) = &route.route {
            let d = self.one(redis, metrics, "route", Key::Route(route_id.clone()), &b.rate, Some(&b.tat)).await;
            record("route", d, tightest)?;
        }
        Ok(())
    }

    /// Per-principal budgets (after authentication).
    #[allow(clippy::too_many_arguments)]
    pub async fn check_principal(
        &self,
        redis: Option<&redis::RedisStore>,
        metrics: &Metrics,
        principal: &Arc<str>,
        route_index: u32,
        route: &RouteLimits,
        tightest: &mut Option<Decision>,
    ) -> Result<(), Limited> {
        if let Some(rate) = &self.per_principal {
            let d = self.one(redis, metrics, "principal", Key::Principal(principal.clone()), rate, None).await;
            record("principal", d, tightest)?;
        }
        if let Some(rate) = &route.principal {
            let key = Key::PrincipalRoute(principal.clone(), route_index);
            let d = self.one(redis, metrics, "principal_route", key, rate, None).await;
            record("principal_route", d, tightest)?;
        }
        Ok(())
    }

    /// True when any scope is configured (skips all work otherwise).
    pub fn any_anonymous(&self, route: &RouteLimits) -> bool {
        self.global.is_some() || self.per_ip.is_some() || route.route.is_some()
    }

    /// True when a per-principal scope applies to the route.
    pub fn any_principal(&self, route: &RouteLimits) -> bool {
        self.per_principal.is_some() || route.principal.is_some()
    }
}

fn record(scope: &'static str, d: Decision, tightest: &mut Option<Decision>) -> Result<(), Limited> {
    if !d.allowed {
        return Err(Limited { scope, decision: d });
    }
    if tightest.is_none_or(|t| d.remaining < t.remaining) {
        *tightest = Some(d);
    }
    Ok(())
}

/// See [`RateLimiter::client_ip`].
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(s) = v.to_str() else { return peer };
        for part in s.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                // Garbage in the chain: trust nothing left of it.
                Err(_) => hops.clear(),
            }
        }
    }
    let mut last = peer;
    for ip in hops.iter().rev() {
        if !trusted.iter().any(|c| c.contains(*ip)) {
            return *ip;
        }
        last = *ip;
    }
    last
}

/// Seconds, rounded up, for `Retry-After` and `RateLimit-Reset`.
pub fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn client_ip_trusts_only_configured_proxies() {
        let trusted = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.0.0.2"));
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "5.5.5.5".parse().unwrap();
        assert_eq!(client_ip(proxy, &h, &trusted), "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(stranger, &h, &trusted), stranger, "untrusted peer: XFF ignored");
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4, junk, 10.0.0.2"));
        assert_eq!(client_ip(proxy, &h, &trusted), "10.0.0.2".parse::<IpAddr>().unwrap());
    }
}
