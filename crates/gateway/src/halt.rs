//! The trading halt: one switch that makes routes marked `halt: block` (new orders, amends,
//! strategy start) answer 503 `trading_halted` at once, while `halt: allow` routes (cancels,
//! reads, risk status) keep working. Engaged from the admin API, from the config, or
//! automatically by a successful emergency stop through the gateway. With Redis the state is
//! shared: every instance re-reads it every `halt_sync_interval` (default 500 ms). Every change
//! is logged with who and why.

use crate::observe::Metrics;
use crate::ratelimit::redis::RedisStore;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Re-read period of the shared halt state.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(500);

/// Who set the halt, why and when.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HaltInfo {
    /// Engaged.
    pub halted: bool,
    /// Who changed it.
    pub by: String,
    /// Why.
    pub reason: String,
    /// When (Unix ms).
    pub at_ms: u64,
}

/// The halt switch.
pub struct Halt {
    halted: AtomicBool,
    info: ArcSwap<HaltInfo>,
    /// With Redis: the shared state has been read (or set) once. Until then the switch is
    /// engaged (fail closed): a new instance must not take orders during a halt another
    /// instance engaged just because its first read of Redis failed or came late.
    synced: AtomicBool,
    /// `trading.halted` from the config, applied at the first sync when Redis holds no state.
    initial: bool,
    redis: Option<Arc<RedisStore>>,
    metrics: Arc<Metrics>,
}

impl Halt {
    /// A switch starting in `initial`; with Redis, a task keeps it in sync.
    pub fn new(initial: bool, redis: Option<Arc<RedisStore>>, metrics: Arc<Metrics>, sync: Duration) -> Arc<Self> {
        let pending = redis.is_some();
        let info = if pending {
            HaltInfo {
                halted: true,
                by: "startup".into(),
                reason: "the shared trading halt has not been read from Redis yet".into(),
                at_ms: 0,
            }
        } else {
            config_info(initial)
        };
        let h = Arc::new(Self {
            halted: AtomicBool::new(info.halted),
            synced: AtomicBool::new(!pending),
            initial,
            info: ArcSwap::from_pointee(info),
            redis,
            metrics,
        });
        h.metrics.halted.set(i64::from(h.is_halted()));
        if h.redis.is_some() {
            crate::every(Arc::downgrade(&h), sync, |h| async move { h.pull().await });
        }
        h
    }

    /// Engaged? (one atomic load)
    pub fn is_halted(&self) -> bool {
        self.halted.load(Ordering::Acquire)
    }

    /// Current state with who and why.
    pub fn info(&self) -> HaltInfo {
        (**self.info.load()).clone()
    }

    fn apply(&self, info: HaltInfo) {
        let was = self.halted.swap(info.halted, Ordering::AcqRel);
        if was != info.halted {
            tracing::warn!(halted = info.halted, by = %info.by, reason = %info.reason, "trading halt changed");
        }
        self.metrics.halted.set(i64::from(info.halted));
        self.info.store(Arc::new(info));
    }

    /// Engages or lifts the halt, here and (with Redis) for every instance.
    pub async fn set(&self, halted: bool, by: &str, reason: &str) -> bool {
        let at_ms = crate::unix_ms();
        let info = HaltInfo { halted, by: by.into(), reason: reason.into(), at_ms };
        let mut shared = true;
        if let Some(redis) = &self.redis {
            let k = redis.key("halt", "state");
            let v = serde_json::to_string(&info).unwrap_or_default();
            shared = redis
                .run(|mut c| async move { redis::cmd("SET").arg(k).arg(v).query_async::<()>(&mut c).await })
                .await
                .is_some();
            if !shared {
                tracing::error!("could not share the trading halt through Redis; applied on this instance only");
            }
        }
        self.apply(info);
        self.synced.store(true, Ordering::Release);
        shared
    }

    /// Reads the shared state now (what the sync task does every interval): once before the
    /// gateway reports ready, so a fresh instance does not refuse orders for an interval.
    pub async fn sync(&self) {
        self.pull().await;
    }

    async fn pull(&self) {
        let Some(redis) = &self.redis else { return };
        let k = redis.key("halt", "state");
        let v: Option<Option<String>> =
            redis.run(|mut c| async move { redis::cmd("GET").arg(k).query_async(&mut c).await }).await;
        let info = match v {
            Some(Some(s)) => match serde_json::from_str::<HaltInfo>(&s) {
                Ok(info) => info,
                Err(_) => return,
            },
            // Redis holds no state yet: the config's, once.
            Some(None) if !self.synced.load(Ordering::Acquire) => config_info(self.initial),
            // The shared state was there and is gone (evicted, flushed, a Redis restarted
            // without persistence): an engaged halt is written back (if nobody wrote another
            // state meanwhile), so an instance that starts now does not take orders during it.
            Some(None) => {
                let info = self.info();
                if info.halted {
                    let k = redis.key("halt", "state");
                    let v = serde_json::to_string(&info).unwrap_or_default();
                    let written = redis
                        .run(|mut c| async move {
                            redis::cmd("SET").arg(k).arg(v).arg("NX").query_async::<Option<String>>(&mut c).await
                        })
                        .await;
                    if written.flatten().is_some() {
                        tracing::warn!(by = %info.by, "the shared trading halt was missing from Redis; written back");
                    }
                }
                return;
            }
            // Redis failed (the last state read stays).
            None => return,
        };
        self.synced.store(true, Ordering::Release);
        if info != **self.info.load() {
            self.apply(info);
        }
    }
}

/// The state `trading.halted` gives.
fn config_info(halted: bool) -> HaltInfo {
    HaltInfo {
        halted,
        by: "config".into(),
        reason: if halted { "trading.halted in the config".into() } else { String::new() },
        at_ms: 0,
    }
}
