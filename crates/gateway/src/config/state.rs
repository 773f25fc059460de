//! `state:` (where shared state lives) and `rate_limits:` sections.

use super::HumanDuration;
use serde::{Deserialize, Serialize, Serializer};
use std::borrow::Cow;
use std::fmt;

/// Redis calls must never stall a request for long: tens of milliseconds, then the
/// configured fallback applies.
pub const DEFAULT_REDIS_TIMEOUT: HumanDuration = HumanDuration::from_millis(50);
/// After a Redis failure, requests use the fallback for this long before Redis is tried again
/// (so an outage costs one timeout per interval, not one per request).
pub const DEFAULT_REDIS_RETRY_INTERVAL: HumanDuration = HumanDuration::from_secs(1);
/// Keys tracked by the in-memory limiter; beyond this the least recently useful are evicted,
/// so a flood of random client IPs or keys cannot grow memory without bound.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// `state:` section.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `memory` (default, one instance) or `redis` (shared by instances).
    pub backend: Backend,
    /// Redis connection, for `backend: redis`.
    pub redis: Option<RedisConfig>,
}

/// Where shared state lives.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process only.
    #[default]
    Memory,
    /// In Redis, shared by every gateway instance.
    Redis,
}

/// `state.redis:`. The URLs may carry a password (`redis://user:password@host`): it is
/// shown as `<redacted>` by `Debug` and by the admin API (`Serialize`).
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` of a single Redis.
    #[serde(default, serialize_with = "ser_url")]
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each).
    #[serde(default, serialize_with = "ser_urls")]
    pub cluster: Vec<String>,
    /// Timeout of one call.
    #[serde(default = "default_redis_timeout")]
    pub timeout: HumanDuration,
    /// How long to use the fallback after a failure before trying Redis again.
    #[serde(default = "default_retry_interval")]
    pub retry_interval: HumanDuration,
    /// Prefix of every key the gateway writes.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
}

/// `url` with the password of its user information replaced by `<redacted>` (the whole user
/// information when it has no `:`, since a lone part may be the password).
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else { return Cow::Borrowed(url) };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let Some(at) = authority.rfind('@') else { return Cow::Borrowed(url) };
    let user = match authority[..at].split_once(':') {
        Some((user, _)) => format!("{user}:<redacted>"),
        None => "<redacted>".to_string(),
    };
    Cow::Owned(format!("{scheme}://{user}{}", &rest[at..]))
}

fn ser_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    url.as_deref().map(redact_url).serialize(s)
}

fn ser_urls<S: Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| redact_url(u)))
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("cluster", &self.cluster.iter().map(|u| redact_url(u)).collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("retry_interval", &self.retry_interval)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

fn default_redis_timeout() -> HumanDuration {
    DEFAULT_REDIS_TIMEOUT
}
fn default_retry_interval() -> HumanDuration {
    DEFAULT_REDIS_RETRY_INTERVAL
}
fn default_prefix() -> String {
    "b25gw".into()
}

/// One limit: `rate` requests per `per`, with bursts of up to `burst` (the bucket size).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Sustained requests per `per`.
    pub rate: u32,
    /// The period of `rate`.
    #[serde(default = "default_per")]
    pub per: HumanDuration,
    /// Requests allowed at once (bucket size); default: `rate`.
    #[serde(default)]
    pub burst: Option<u32>,
}

fn default_per() -> HumanDuration {
    HumanDuration::from_secs(1)
}

/// What a limiter does when Redis fails or times out.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// Let the request through.
    Allow,
    /// Refuse it (429).
    Deny,
    /// Use this instance's in-memory limiter.
    #[default]
    Local,
}

/// `rate_limits:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// One budget for all requests.
    pub global: Option<LimitConfig>,
    /// Per client IP (see `server.trusted_proxies`).
    pub per_ip: Option<LimitConfig>,
    /// Per principal (JWT subject, API key id, or `principal_claim`), over all routes.
    pub per_principal: Option<LimitConfig>,
    /// A JWT claim to use as the principal key instead of `sub` (e.g. `account_id`).
    pub principal_claim: Option<String>,
    /// Behaviour when Redis fails.
    pub on_redis_error: OnRedisError,
    /// Most keys the in-memory limiter tracks.
    pub max_keys: usize,
    /// Send `RateLimit-*` headers on successful responses too (the tightest scope).
    pub headers: bool,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            global: None,
            per_ip: None,
            per_principal: None,
            principal_claim: None,
            on_redis_error: OnRedisError::Local,
            max_keys: DEFAULT_MAX_KEYS,
            headers: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redis_passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://default:s3cret@127.0.0.1:6379/0"),
            "redis://default:<redacted>@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("rediss://:s3cret@h:6380"), "rediss://:<redacted>@h:6380");
        assert_eq!(redact_url("redis://s3cret@h"), "redis://<redacted>@h");
        assert_eq!(redact_url("redis://u:p@ss@h/0"), "redis://u:<redacted>@h/0");
        assert_eq!(redact_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(redact_url("redis://h/0?x=a@b"), "redis://h/0?x=a@b");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
