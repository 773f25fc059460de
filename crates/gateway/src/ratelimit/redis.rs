//! The Redis side of rate limiting: GCRA as one Lua script (EVALSHA, loaded on demand), using
//! the Redis server's clock (`TIME`) so every gateway instance agrees on time. Works with a
//! single Redis (a lazily connecting, self-healing `ConnectionManager`) or a Redis Cluster
//! (one key per call, so any slot works).
//!
//! Every call has a short timeout. A failure opens a window (`retry_interval`) during which
//! callers use their fallback without touching Redis; the outage is logged once, and the first
//! success after it is logged as recovery.

use super::gcra::{Decision, Rate};
use crate::config::state::RedisConfig;
use crate::observe::Metrics;
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// GCRA in Lua. Times in microseconds (Redis `TIME`). Returns
/// `{allowed, remaining, reset_us, retry_after_us}`.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
local base = math.max(tat, now)
local new_tat = base + interval
local diff = new_tat - now
if diff > tolerance then
  return {0, 0, base - now, diff - tolerance}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.floor(diff / 1000) + 1)
return {1, math.floor((tolerance - diff) / interval), diff, 0}
"#;

/// A connection to a single Redis or a cluster; cheap to clone (multiplexed).
#[derive(Clone)]
pub enum Conn {
    /// One Redis.
    Single(redis::aio::ConnectionManager),
    /// A Redis Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A shared Redis store for limiter state.
pub struct RedisStore {
    conn: ArcSwapOption<Conn>,
    script: redis::Script,
    timeout: Duration,
    retry_interval: Duration,
    prefix: String,
    base: Instant,
    down_until: AtomicU64,
    in_outage: AtomicBool,
    /// Redis evicts keys when full (`maxmemory` with a policy other than `noeviction`).
    evicting: AtomicBool,
    metrics: Arc<Metrics>,
}

impl RedisStore {
    /// Connects (lazily for a single Redis; in the background for a cluster) and returns at once.
    pub fn start(cfg: &RedisConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
        let store = Arc::new(Self {
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(GCRA_LUA),
            timeout: cfg.timeout.get(),
            retry_interval: cfg.retry_interval.get(),
            prefix: cfg.key_prefix.clone(),
            base: Instant::now(),
            down_until: AtomicU64::new(0),
            in_outage: AtomicBool::new(false),
            evicting: AtomicBool::new(false),
            metrics,
        });
        if let Some(url) = &cfg.url {
            let client = redis::Client::open(url.as_str()).map_err(|e| format!("state.redis.url: {e}"))?;
            let mcfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout.get().max(Duration::from_millis(200))))
                .set_response_timeout(Some(cfg.timeout.get()))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let cm = redis::aio::ConnectionManager::new_lazy_with_config(client, mcfg)
                .map_err(|e| format!("state.redis: {e}"))?;
            store.conn.store(Some(Arc::new(Conn::Single(cm))));
        } else {
            let client = redis::cluster::ClusterClientBuilder::new(cfg.cluster.clone())
                .connection_timeout(cfg.timeout.get().max(Duration::from_millis(200)))
                .response_timeout(cfg.timeout.get())
                .build()
                .map_err(|e| format!("state.redis.cluster: {e}"))?;
            let weak = Arc::downgrade(&store);
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(100);
                loop {
                    match client.get_async_connection().await {
                        Ok(c) => {
                            if let Some(s) = weak.upgrade() {
                                s.conn.store(Some(Arc::new(Conn::Cluster(c))));
                                tracing::info!("connected to the Redis cluster");
                            }
                            return;
                        }
                        Err(e) => {
                            if weak.strong_count() == 0 {
                                return;
                            }
                            tracing::warn!(error = %e, "cannot reach the Redis cluster yet; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            });
        }
        Ok(store)
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// True while a recent failure says: do not try Redis yet.
    pub fn is_down(&self) -> bool {
        self.now_ms() < self.down_until.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str) {
        self.down_until.store(self.now_ms() + self.retry_interval.as_millis() as u64, Ordering::Relaxed);
        self.metrics.redis_error(if what == "timeout" { "timeout" } else { "error" });
        if !self.in_outage.swap(true, Ordering::Relaxed) {
            tracing::error!(
                error = what,
                "Redis unavailable: shared state falls back (rate limits: on_redis_error; cache: pass-through; idempotency: 503)"
            );
        }
    }

    /// Whether Redis was found to evict keys when full ([`RedisStore::check_eviction`]).
    pub fn evicting(&self) -> bool {
        self.evicting.load(Ordering::Relaxed)
    }

    /// Re-reads Redis's memory policy every `every` for as long as the store lives (the first
    /// read is [`RedisStore::check_eviction`] before ready): a policy changed at run time
    /// (`CONFIG SET`, a failover to a differently configured replica) is noticed within one
    /// interval.
    pub fn watch_eviction(self: &Arc<Self>, every: Duration) {
        crate::every(Arc::downgrade(self), every, |store| async move { store.check_eviction().await });
    }

    /// Reads Redis's memory policy (`INFO memory`). A Redis that evicts keys when full can
    /// drop idempotency records (a retried order placed twice) and the trading halt: that is
    /// logged as an error (when found, not at every check), and the response cache then stops
    /// writing to Redis, so the gateway's own cache entries are not what fills it. A Redis that
    /// cannot be asked keeps the last verdict.
    pub async fn check_eviction(&self) {
        let Some(info) = self
            .run(|mut c| async move { redis::cmd("INFO").arg("memory").query_async::<redis::Value>(&mut c).await })
            .await
        else {
            return;
        };
        let mut text = String::new();
        collect_text(&info, &mut text);
        // In a cluster every node answers; any evicting node counts.
        let mut maxmemory = 0u64;
        let mut evicting = false;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("maxmemory:") {
                maxmemory = v.trim().parse().unwrap_or(0);
            } else if let Some(p) = line.strip_prefix("maxmemory_policy:") {
                evicting |= maxmemory > 0 && p.trim() != "noeviction";
            }
        }
        let was = self.evicting.swap(evicting, Ordering::Relaxed);
        if !evicting && was {
            tracing::warn!("Redis no longer evicts keys when full; response-cache entries are shared again");
        }
        if evicting && !was {
            tracing::error!(
                "Redis evicts keys when full (maxmemory with a maxmemory-policy other than noeviction): idempotency \
                 records and the trading halt may be dropped, so a retried order could be placed twice; set \
                 maxmemory-policy noeviction on the Redis of state.redis. Until then, response-cache entries are \
                 kept in memory only."
            );
        }
    }

    /// The full key for `kind` (`rl`, `c`, `idem`, …) and `key`.
    pub fn key(&self, kind: &str, key: &str) -> String {
        format!("{}:{kind}:{key}", self.prefix)
    }

    /// Runs `f` on a connection within the timeout. `None` when Redis is down, slow or
    /// failing (the outage bookkeeping is done here); callers apply their fallback.
    pub async fn run<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if self.is_down() {
            return None;
        }
        let Some(conn) = self.conn.load_full() else {
            // A cluster still connecting in the background: no outage to wait out (the next
            // call may find the connection), so no `retry_interval` pause; the caller's
            // fallback applies to this call.
            self.metrics.redis_error("error");
            return None;
        };
        let started = Instant::now();
        let res = tokio::time::timeout(self.timeout, f((*conn).clone())).await;
        self.metrics.redis_latency(started.elapsed());
        match res {
            Ok(Ok(v)) => {
                if self.in_outage.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis is back: shared state restored");
                }
                Some(v)
            }
            Ok(Err(e)) if command_refused(&e) => {
                // Redis answered: this command was refused (e.g. out of memory on a cache
                // write), the others may well pass. This caller applies its fallback; the
                // rest of the shared state is not switched off for `retry_interval`.
                self.metrics.redis_error("refused");
                tracing::warn!(error = %e, "a Redis command was refused");
                None
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("timeout");
                None
            }
        }
    }

    /// One GCRA check on `key` (the prefix is added here). `None` means Redis failed; the
    /// caller applies its fallback.
    pub async fn check(&self, key: &str, r: &Rate) -> Option<Decision> {
        let full = self.key("rl", key);
        let (interval, tolerance) = ((r.interval / 1000).max(1), (r.tolerance / 1000).max(1));
        let script = &self.script;
        let (allowed, remaining, reset_us, retry_us) = self
            .run(|mut c| async move {
                script.key(full).arg(interval).arg(tolerance).invoke_async::<(i64, i64, i64, i64)>(&mut c).await
            })
            .await?;
        Some(Decision {
            allowed: allowed == 1,
            limit: r.burst,
            remaining: remaining.max(0) as u32,
            reset: reset_us.max(0) as u64 * 1000,
            retry_after: retry_us.max(0) as u64 * 1000,
        })
    }
}

/// An error reply to this one command (out of memory, a wrong type, a refused or malformed
/// command), as opposed to Redis being unreachable, slow, or unable to serve anything (loading,
/// cluster or master down, a read-only replica): only the latter opens the outage window.
fn command_refused(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind as K, ServerErrorKind as S};
    matches!(
        e.kind(),
        K::Extension | K::UnexpectedReturnType | K::Server(S::ResponseError | S::CrossSlot | S::NoPerm | S::ExecAbort)
    )
}

/// The text of an `INFO` answer: one string, or one per node in a cluster.
fn collect_text(v: &redis::Value, out: &mut String) {
    match v {
        redis::Value::BulkString(b) => out.push_str(&String::from_utf8_lossy(b)),
        redis::Value::VerbatimString { text, .. } => out.push_str(text),
        redis::Value::SimpleString(s) => out.push_str(s),
        redis::Value::Array(items) | redis::Value::Set(items) => items.iter().for_each(|i| collect_text(i, out)),
        redis::Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            collect_text(k, out);
            out.push('\n');
            collect_text(v, out);
        }),
        _ => {}
    }
    out.push('\n');
}
