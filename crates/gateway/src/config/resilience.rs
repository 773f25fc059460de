//! Per-service resilience settings: instances with weights, load balancing, passive outlier
//! detection, the circuit breaker and retries.

use super::HumanDuration;
use serde::{Deserialize, Serialize};

/// An instance: a URL, or `{ url, weight }`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum InstanceConfig {
    /// `"http://host:port"` with weight 1.
    Url(String),
    /// `{ url: "http://host:port", weight: 3 }`.
    Weighted(WeightedInstance),
}

/// The `{ url, weight }` form of an instance.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WeightedInstance {
    /// Base URL.
    pub url: String,
    /// Relative share of traffic (1–100).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// By hand rather than `#[serde(untagged)]`: an untagged enum reports any mistake in the
/// mapping form as "data did not match any variant", naming neither the key nor the expected
/// ones; here the mapping is read as [`WeightedInstance`], whose errors do (`unknown field
/// `weigth`, expected `url` or `weight``), with their path.
impl<'de> Deserialize<'de> for InstanceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = InstanceConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a URL or a mapping { url, weight }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<InstanceConfig, E> {
                Ok(InstanceConfig::Url(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<InstanceConfig, A::Error> {
                WeightedInstance::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(InstanceConfig::Weighted)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl InstanceConfig {
    /// The URL.
    pub fn url(&self) -> &str {
        match self {
            Self::Url(u) | Self::Weighted(WeightedInstance { url: u, .. }) => u,
        }
    }
    /// The weight (1 when not given).
    pub fn weight(&self) -> u32 {
        match self {
            Self::Url(_) => 1,
            Self::Weighted(w) => w.weight,
        }
    }
}

/// How a request picks an instance.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LoadBalancingConfig {
    /// `round_robin` (weighted), `least_request` (power of two choices over in-flight
    /// requests, weighted) or `consistent_hash` (on `hash_header` or `hash_claim`).
    pub policy: Policy,
    /// Request header whose value is the hash key (e.g. `x-account-id`).
    pub hash_header: Option<String>,
    /// JWT claim whose value is the hash key (e.g. `account_id`); falls back to the subject
    /// (or the API key id) when the principal has no such claim.
    pub hash_claim: Option<String>,
}

/// Load-balancing policies.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// A hash ring: one key always lands on the same instance while it is available.
    ConsistentHash,
}

/// Failures in a row before an instance is ejected (Envoy's default is 5).
pub const DEFAULT_OUTLIER_FAILURES: u32 = 5;
/// First ejection time; doubles with each repeated ejection.
pub const DEFAULT_BASE_EJECTION: HumanDuration = HumanDuration::from_secs(10);
/// Longest ejection.
pub const DEFAULT_MAX_EJECTION: HumanDuration = HumanDuration::from_secs(300);
/// Never eject more than this share of a service's instances.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;

/// `services.*.outlier_detection:` — passive health from real traffic.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Off switch.
    pub enabled: bool,
    /// Consecutive failures (connect errors, resets, timeouts, 502/503/504) that eject.
    pub consecutive_failures: u32,
    /// First ejection; doubled for each repeated ejection.
    pub base_ejection: HumanDuration,
    /// Cap on the ejection time.
    pub max_ejection: HumanDuration,
    /// Most instances ejected at once, as a percentage.
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: DEFAULT_OUTLIER_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

/// `services.*.circuit_breaker:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Off switch.
    pub enabled: bool,
    /// Consecutive failures that open the breaker.
    pub consecutive_failures: u32,
    /// Failure ratio over `window` that opens it (with at least `min_requests`).
    pub failure_ratio: f64,
    /// Sliding window for the ratio.
    pub window: HumanDuration,
    /// Requests needed in the window before the ratio counts.
    pub min_requests: u32,
    /// First open interval; doubled each time a half-open probe fails.
    pub open_interval: HumanDuration,
    /// Cap on the open interval.
    pub max_open_interval: HumanDuration,
    /// Probe requests let through while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 5,
            failure_ratio: 0.5,
            window: HumanDuration::from_secs(10),
            min_requests: 20,
            open_interval: HumanDuration::from_secs(5),
            max_open_interval: HumanDuration::from_secs(60),
            half_open_probes: 3,
        }
    }
}

/// `services.*.retry:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Total tries per request, the first included (1 = no retry).
    pub attempts: u32,
    /// First backoff; each retry waits a random time up to `base × 2^n` (full jitter).
    pub backoff_base: HumanDuration,
    /// Cap on one backoff.
    pub backoff_max: HumanDuration,
    /// Timeout of one try (the route timeout bounds them all).
    pub per_try_timeout: Option<HumanDuration>,
    /// Upstream statuses that are retried (idempotent methods only).
    pub retry_on_status: Vec<u16>,
    /// Retries may add at most this share of the requests (Linkerd-style retry budget).
    pub budget_ratio: f64,
    /// Retries always allowed per second regardless of the ratio (a small reserve).
    pub min_retries_per_second: u32,
    /// Largest request body kept to replay on a retry; larger bodies are not retried.
    pub max_replay_body: super::ByteSize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            backoff_base: HumanDuration::from_millis(25),
            backoff_max: HumanDuration::from_millis(250),
            per_try_timeout: None,
            retry_on_status: vec![502, 503, 504],
            budget_ratio: 0.2,
            min_retries_per_second: 10,
            max_replay_body: super::ByteSize::kib(64),
        }
    }
}
