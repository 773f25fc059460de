//! The response cache: per-route TTL, `public` or `private` (keyed by principal) scope, Vary
//! support, single-flight on misses, in memory (quick_cache weighted by bytes) or in Redis.
//!
//! It can never serve one principal's data to another: a private route's key contains the
//! principal, and every key the host forwarded as `X-Forwarded-Host`; a public route stores
//! nothing the upstream marked `private` or `no-store`, and nothing with `Set-Cookie`. Client
//! `Cache-Control: no-cache` (any case) skips the lookup (BYPASS).
//! Redis errors make the cache a pass-through, never an error. Invalidation (admin API) by
//! route, path prefix or all: markers checked on lookup (memory and Redis), plus key deletion
//! in Redis (SCAN, single Redis).

use crate::config::{CacheConfig, CacheScope, CacheStoreConfig};
use crate::observe::Metrics;
use crate::ratelimit::redis::RedisStore;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    /// Status.
    pub status: u16,
    /// End-to-end headers worth replaying.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body.
    pub body: Bytes,
    /// Stored at (Unix ms).
    pub stored_ms: u64,
    /// Expires at (Unix ms).
    pub expires_ms: u64,
    /// The request headers the upstream's `Vary` names, and their values at store time (every
    /// field line, combined: [`crate::proxy::headers::combined`]).
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
    route: Arc<str>,
    path: Box<str>,
}

/// What a request's preconditions make of a cache hit (RFC 9110 §13.2.2).
#[derive(Debug, PartialEq, Eq)]
pub enum Precondition {
    /// No precondition, or all hold: the stored response.
    Pass,
    /// `If-None-Match` or `If-Modified-Since` does not hold: 304.
    NotModified,
    /// `If-Match` or `If-Unmodified-Since` does not hold: 412.
    Failed,
}

/// Evaluates the request's preconditions against a stored response, in the order of RFC 9110
/// §13.2.2, as a cache must (RFC 9111 §4.3.2): the answer no longer depends on whether the
/// entry was there. Only for a 2xx entry (§13.2.1); a date that cannot be parsed is ignored.
pub fn preconditions(req: &http::HeaderMap, e: &Entry) -> Precondition {
    if !(200..300).contains(&e.status) {
        return Precondition::Pass;
    }
    let stored = |n: &HeaderName| e.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_bytes());
    let etag = stored(&header::ETAG);
    let modified = stored(&header::LAST_MODIFIED).and_then(http_date);
    let list = |n: &HeaderName| -> Option<Vec<u8>> {
        let mut all = Vec::new();
        for v in req.get_all(n) {
            if !all.is_empty() {
                all.push(b',');
            }
            all.extend_from_slice(v.as_bytes());
        }
        (!all.is_empty()).then_some(all)
    };
    if let Some(m) = list(&header::IF_MATCH) {
        if !etag_matches(&m, etag, true) {
            return Precondition::Failed;
        }
    } else if let Some(since) = req.get(header::IF_UNMODIFIED_SINCE).and_then(|v| http_date(v.as_bytes()))
        // Ignored without a modification date (RFC 9110 §13.1.4).
        && modified.is_some_and(|m| m > since)
    {
        return Precondition::Failed;
    }
    if let Some(m) = list(&header::IF_NONE_MATCH) {
        if etag_matches(&m, etag, false) {
            return Precondition::NotModified;
        }
    } else if let Some(since) = req.get(header::IF_MODIFIED_SINCE).and_then(|v| http_date(v.as_bytes()))
        && modified.is_some_and(|m| m <= since)
    {
        return Precondition::NotModified;
    }
    Precondition::Pass
}

/// Whether the comma-separated entity-tag list `list` (or `*`) matches `etag`: strong
/// comparison for `If-Match`, weak for `If-None-Match` (RFC 9110 §8.8.3.2).
fn etag_matches(list: &[u8], etag: Option<&[u8]>, strong: bool) -> bool {
    let list = list.trim_ascii();
    if list == b"*" {
        return true;
    }
    let Some(etag) = etag.map(<[u8]>::trim_ascii) else { return false };
    let opaque = |t: &[u8]| -> (bool, Vec<u8>) {
        let weak = t.starts_with(b"W/");
        (weak, t.strip_prefix(b"W/").unwrap_or(t).to_vec())
    };
    let (etag_weak, etag_tag) = opaque(etag);
    list.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()).any(|t| {
        let (weak, tag) = opaque(t);
        tag == etag_tag && (!strong || (!weak && !etag_weak))
    })
}

/// An HTTP date (IMF-fixdate, or the obsolete RFC 850 and asctime forms), as Unix seconds.
fn http_date(v: &[u8]) -> Option<u64> {
    let t = httpdate::parse_http_date(std::str::from_utf8(v).ok()?.trim()).ok()?;
    t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

impl Entry {
    fn weight(&self) -> u64 {
        (self.body.len() + self.headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum::<usize>() + 256) as u64
    }

    /// Whether `req` selects this entry: each `Vary`-named field, all its lines combined,
    /// equals the stored one (RFC 9111 §4.1). Comparing only the first line would let two
    /// requests whose later lines differ (HTTP/2 cookie crumbs, a repeated `X-Lang`) share it.
    fn vary_matches(&self, req: &HeaderMap) -> bool {
        self.vary.iter().all(|(n, v)| crate::proxy::headers::combined_eq(req, n, v.as_ref()))
    }
}

#[derive(Clone)]
struct Weighter;

impl quick_cache::Weighter<Box<str>, Arc<Entry>> for Weighter {
    fn weight(&self, _k: &Box<str>, v: &Arc<Entry>) -> u64 {
        v.weight()
    }
}

#[derive(Default)]
struct Invalidations {
    all_before: u64,
    routes: HashMap<Arc<str>, u64>,
    prefixes: Vec<(String, u64)>,
}

/// A prefix marker is kept this long (every lookup scans the prefix markers).
const PREFIX_MARKER_MS: u64 = 86_400_000;

impl Invalidations {
    fn valid(&self, e: &Entry) -> bool {
        e.stored_ms > self.all_before
            && self.routes.get(&e.route).is_none_or(|t| e.stored_ms > *t)
            && self.prefixes.iter().all(|(p, t)| e.stored_ms > *t || !e.path.starts_with(p.as_str()))
    }

    /// These markers with prefix markers older than [`PREFIX_MARKER_MS`] dropped.
    fn pruned(&self, now: u64) -> Self {
        Self {
            all_before: self.all_before,
            routes: self.routes.clone(),
            prefixes: self
                .prefixes
                .iter()
                .filter(|(_, t)| now.saturating_sub(*t) < PREFIX_MARKER_MS)
                .cloned()
                .collect(),
        }
    }

    /// Records the marker `field` ([`marker_field`]) set at `t`, keeping the later of two
    /// times; whether anything changed.
    fn add(&mut self, field: &str, t: u64, now: u64) -> bool {
        let later = |old: &mut u64| {
            let changed = t > *old;
            *old = (*old).max(t);
            changed
        };
        if field == "all" {
            later(&mut self.all_before)
        } else if let Some(r) = field.strip_prefix("r:") {
            later(self.routes.entry(r.into()).or_default())
        } else if let Some(p) = field.strip_prefix("p:")
            && now.saturating_sub(t) < PREFIX_MARKER_MS
        {
            match self.prefixes.iter_mut().find(|(q, _)| q == p) {
                Some((_, old)) => later(old),
                None => {
                    self.prefixes.push((p.to_string(), t));
                    true
                }
            }
        } else {
            false
        }
    }
}

/// The name of an invalidation marker, here and in the shared Redis hash: `r:<route id>`,
/// `p:<path prefix>` or `all`.
fn marker_field(route: Option<&str>, prefix: Option<&str>) -> String {
    match (route, prefix) {
        (Some(r), _) => format!("r:{r}"),
        (None, Some(p)) => format!("p:{p}"),
        (None, None) => "all".into(),
    }
}

/// The lookup key of one request, and what is needed to store its response.
pub struct CacheRequest {
    key: Box<str>,
    route: Arc<str>,
    path: Box<str>,
    ttl_ms: u64,
    scope: CacheScope,
    statuses: Vec<u16>,
    /// The client asked not to be served from cache.
    pub bypass: bool,
    /// A HEAD request (served from GET entries, never stores).
    pub head: bool,
}

/// Being the one request that fetches a missing key; others wait for its result.
pub struct Leader {
    tx: watch::Sender<Option<Arc<Entry>>>,
    key: Box<str>,
    cache: Arc<ResponseCache>,
}

impl Leader {
    /// Shares the stored entry with the waiters.
    pub fn complete(self, entry: Option<Arc<Entry>>) {
        if let Some(e) = entry {
            let _ = self.tx.send(Some(e));
        }
        // Dropping `self` removes the flight; waiters without a value fetch on their own.
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Ok(mut m) = self.cache.inflight.lock() {
            m.remove(&self.key);
        }
    }
}

/// Waiters' side of a fetch in progress.
type Flight = watch::Receiver<Option<Arc<Entry>>>;

/// Lookup result.
pub enum Lookup {
    /// Served from cache.
    Hit(Arc<Entry>),
    /// Fetch it (and store if allowed).
    Miss(Option<Leader>),
}

/// The response cache, shared by all snapshots of a gateway.
pub struct ResponseCache {
    mem: quick_cache::sync::Cache<Box<str>, Arc<Entry>, Weighter>,
    max_entry: usize,
    inflight: Mutex<HashMap<Box<str>, Flight>>,
    invalid: ArcSwap<Invalidations>,
    redis: Option<Arc<RedisStore>>,
}

/// Builds the lookup key: method class, canonical path, sorted query, scope identity, host.
///
/// `host` is the value the gateway forwards as `X-Forwarded-Host` (the client's `Host` or
/// `:authority`): an upstream may build its response from it (absolute links, redirects), so
/// a response fetched for one host must never be served for another (RFC 9111 §4: the key is
/// the target URI, authority included). It is lower-cased (host names are case-insensitive)
/// and comes last: a valid host holds no `|`, so the last `|` delimits it and no query or
/// principal can forge another request's key. The Redis invalidation patterns rely on the
/// key starting with `GET <route> <path>`.
#[allow(clippy::too_many_arguments)]
pub fn request(
    route_id: &Arc<str>,
    cfg: &CacheConfig,
    method: &http::Method,
    path: &str,
    query: Option<&str>,
    principal: Option<&str>,
    host: Option<&HeaderValue>,
    headers: &HeaderMap,
) -> CacheRequest {
    let mut q: Vec<&str> = query.map(|q| q.split('&').filter(|s| !s.is_empty()).collect()).unwrap_or_default();
    q.sort_unstable();
    let scope = match cfg.scope {
        CacheScope::Public => String::new(),
        // A private route without a principal cannot be cached for anyone.
        CacheScope::Private => format!("p:{}", principal.unwrap_or("\u{0}anonymous")),
    };
    let mut key = format!("GET {route_id} {path}?{}|{scope}|", q.join("&"));
    match host {
        // Byte by byte: a valid host is ASCII; any other byte still maps to a char of its own.
        Some(h) => key.extend(h.as_bytes().iter().map(|b| char::from(b.to_ascii_lowercase()))),
        // No host (HTTP/1.0) is not an empty one: the upstream gets no `X-Forwarded-Host`. NUL
        // is in no header value.
        None => key.push('\0'),
    }
    let bypass = has_directive(headers, &header::CACHE_CONTROL, &["no-cache", "no-store"])
        || has_directive(headers, &header::PRAGMA, &["no-cache"]);
    CacheRequest {
        key: key.into(),
        route: route_id.clone(),
        path: path.into(),
        ttl_ms: cfg.ttl.get().as_millis() as u64,
        scope: cfg.scope,
        statuses: cfg.statuses.clone(),
        bypass: bypass || (cfg.scope == CacheScope::Private && principal.is_none()),
        head: method == http::Method::HEAD,
    }
}

/// Whether a `Cache-Control`-style field (`name`, all its lines) carries one of the directives
/// `wanted` (lower case): directives are comma-separated, their name is what comes before `=`,
/// and names are case-insensitive (RFC 9111 §5.2), so `No-Cache` counts and `x-no-cache-foo`
/// does not. A comma inside a quoted argument splits it too: at worst a request is a bypass.
fn has_directive(headers: &HeaderMap, name: &HeaderName, wanted: &[&str]) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|d| d.split(|&b| b == b'=').next().unwrap_or_default().trim_ascii())
        .any(|d| wanted.iter().any(|w| d.eq_ignore_ascii_case(w.as_bytes())))
}

impl ResponseCache {
    /// A cache with the configured budget; `redis` when `state.backend: redis`.
    pub fn new(cfg: &CacheStoreConfig, redis: Option<Arc<RedisStore>>) -> Arc<Self> {
        let budget = cfg.max_bytes.bytes().max(1024);
        Arc::new(Self {
            mem: quick_cache::sync::Cache::with_weighter((budget / 1024) as usize + 16, budget, Weighter),
            max_entry: cfg.max_entry_size.bytes() as usize,
            inflight: Mutex::new(HashMap::new()),
            invalid: ArcSwap::from_pointee(Invalidations::default()),
            redis,
        })
    }

    /// Bytes held in memory.
    pub fn weight(&self) -> u64 {
        self.mem.weight()
    }

    /// Largest body stored.
    pub fn max_entry(&self) -> usize {
        self.max_entry
    }

    /// Looks `req` up; on a miss, makes the caller the leader of the key's fetch, or waits for
    /// the current leader (single flight).
    pub async fn lookup(self: &Arc<Self>, req: &CacheRequest, headers: &HeaderMap) -> Lookup {
        if !req.bypass
            && let Some(e) = self.get(&req.key).await
            && e.vary_matches(headers)
        {
            return Lookup::Hit(e);
        }
        let rx = {
            let mut m = self.inflight.lock().expect("not poisoned");
            match m.get(&req.key) {
                Some(rx) => Some(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    m.insert(req.key.clone(), rx);
                    drop(m);
                    return Lookup::Miss(Some(Leader { tx, key: req.key.clone(), cache: self.clone() }));
                }
            }
        };
        if let Some(mut rx) = rx
            && !req.bypass
            && let Ok(v) = rx.wait_for(|v| v.is_some()).await
            && let Some(e) = v.clone()
            && e.vary_matches(headers)
        {
            return Lookup::Hit(e);
        }
        Lookup::Miss(None)
    }

    async fn get(&self, key: &str) -> Option<Arc<Entry>> {
        let now = crate::unix_ms();
        let inv = self.invalid.load();
        if let Some(e) = self.mem.get(key) {
            if e.expires_ms > now && inv.valid(&e) {
                return Some(e);
            }
            self.mem.remove(key);
        }
        let redis = self.redis.as_ref()?;
        let rkey = redis_key(redis, key);
        let raw: Option<Vec<u8>> = redis.run(|mut c| async move { c.get(rkey).await }).await.flatten();
        let e = Arc::new(decode(&raw?)?);
        (e.expires_ms > now && inv.valid(&e)).then_some(e)
    }

    /// Whether an upstream response may be stored for `req` (before reading its body).
    pub fn storable(&self, req: &CacheRequest, status: u16, headers: &HeaderMap) -> bool {
        if req.head || !req.statuses.contains(&status) {
            return false;
        }
        let cc =
            headers.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
        let cc = cc.to_ascii_lowercase();
        if cc.contains("no-store") {
            return false;
        }
        if req.scope == CacheScope::Public && (cc.contains("private") || headers.contains_key(header::SET_COOKIE)) {
            return false;
        }
        if headers.get_all(header::VARY).iter().any(|v| v.as_bytes().contains(&b'*')) {
            return false;
        }
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_none_or(|n| n <= self.max_entry)
    }

    /// Stores a response read whole.
    pub async fn store(
        &self,
        req: &CacheRequest,
        status: u16,
        headers: &HeaderMap,
        req_headers: &HeaderMap,
        body: Bytes,
    ) -> Arc<Entry> {
        let now = crate::unix_ms();
        let vary = headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .map(|n| {
                let v = crate::proxy::headers::combined(req_headers, &n);
                (n, v)
            })
            .collect();
        let kept = crate::proxy::headers::kept_for_replay(headers);
        let e = Arc::new(Entry {
            status,
            headers: kept,
            body,
            stored_ms: now,
            expires_ms: now + req.ttl_ms,
            vary,
            route: req.route.clone(),
            path: req.path.clone(),
        });
        self.mem.insert(req.key.clone(), e.clone());
        // Not into a Redis that evicts when full: cache entries would push out idempotency
        // records and the halt ([`RedisStore::check_eviction`]).
        if let Some(redis) = self.redis.as_ref().filter(|r| !r.evicting()) {
            let rkey = redis_key(redis, &req.key);
            let bytes = encode(&e);
            let ttl = req.ttl_ms.max(1);
            let _: Option<()> = redis.run(|mut c| async move { c.pset_ex(rkey, bytes, ttl).await }).await;
        }
        e
    }

    /// Invalidates by route id, path prefix, or everything: hides every matching entry stored
    /// before now. With Redis the marker is shared (every instance reads the markers every
    /// sync interval, [`ResponseCache::sync_every`]) and the matching keys are deleted.
    pub async fn invalidate(&self, route: Option<&str>, prefix: Option<&str>) -> Invalidated {
        let now = crate::unix_ms();
        let field = marker_field(route, prefix);
        let mut next = self.invalid.load().pruned(now);
        next.add(&field, now, now);
        self.invalid.store(Arc::new(next));
        // Nothing to share with the memory backend: "shared" as for the halt (false only when
        // Redis is configured and could not be written).
        let Some(redis) = &self.redis else { return Invalidated { shared: true, redis_keys_deleted: 0 } };
        let markers = redis.key("cinv", "markers");
        let shared = redis.run(|mut c| async move { c.hset::<_, _, _, ()>(markers, field, now).await }).await.is_some();
        let pattern = match (route, prefix) {
            (Some(r), _) => redis.key("c", &format!("GET {} *", glob_escape(r))),
            (None, Some(p)) => redis.key("c", &format!("GET * {}*", glob_escape(p))),
            (None, None) => redis.key("c", "*"),
        };
        let deleted = redis
            .run(|mut c| async move {
                let mut deleted = 0usize;
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut c)
                        .await?;
                    if !keys.is_empty() {
                        deleted += keys.len();
                        let _: () = c.del(keys).await?;
                    }
                    if next == 0 {
                        return Ok(deleted);
                    }
                    cursor = next;
                }
            })
            .await
            .unwrap_or(0);
        Invalidated { shared, redis_keys_deleted: deleted }
    }

    /// Reads the invalidation markers other instances shared through Redis and applies the
    /// newer ones here. Once before the gateway reports ready, then every `every`.
    pub async fn sync(&self) {
        let Some(redis) = &self.redis else { return };
        let markers = redis.key("cinv", "markers");
        // Values as text: a field that is not a time is skipped, not a Redis failure.
        let Some(remote) = redis.run(|mut c| async move { c.hgetall::<_, Vec<(String, String)>>(markers).await }).await
        else {
            return;
        };
        let now = crate::unix_ms();
        let mut next = self.invalid.load().pruned(now);
        let mut changed = false;
        for (field, t) in &remote {
            if let Ok(t) = t.parse::<u64>() {
                changed |= next.add(field, t, now);
            }
        }
        if changed {
            self.invalid.store(Arc::new(next));
        }
    }

    /// With Redis, a task that runs [`ResponseCache::sync`] every `every` while the cache lives.
    pub fn sync_every(self: &Arc<Self>, every: std::time::Duration) {
        if self.redis.is_none() {
            return;
        }
        crate::every(Arc::downgrade(self), every, |cache| async move { cache.sync().await });
    }
}

/// What an invalidation did beyond this instance.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Invalidated {
    /// The marker was written to Redis, so every instance applies it within its sync interval
    /// (always true with the memory backend, which has no other instance to tell).
    pub shared: bool,
    /// Keys deleted from Redis.
    pub redis_keys_deleted: usize,
}

fn redis_key(redis: &RedisStore, key: &str) -> String {
    redis.key("c", key)
}

fn glob_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

fn encode(e: &Entry) -> Vec<u8> {
    let meta = serde_json::json!({
        "s": e.status, "t": e.stored_ms, "x": e.expires_ms, "r": &*e.route, "p": &*e.path,
        "h": e.headers.iter().filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?))).collect::<Vec<_>>(),
        "v": e.vary.iter().map(|(n, v)| (n.as_str(), v.as_ref().and_then(|v| v.to_str().ok()))).collect::<Vec<_>>(),
    });
    let m = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + m.len() + e.body.len());
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(&e.body);
    out
}

fn decode(raw: &[u8]) -> Option<Entry> {
    let n = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?) as usize;
    let meta: serde_json::Value = serde_json::from_slice(raw.get(4..4 + n)?).ok()?;
    let body = Bytes::copy_from_slice(raw.get(4 + n..)?);
    let pair = |v: &serde_json::Value| -> Option<(HeaderName, Option<HeaderValue>)> {
        let n = HeaderName::from_bytes(v.get(0)?.as_str()?.as_bytes()).ok()?;
        let val = v.get(1)?.as_str().and_then(|s| HeaderValue::from_str(s).ok());
        Some((n, val))
    };
    Some(Entry {
        status: meta["s"].as_u64()? as u16,
        stored_ms: meta["t"].as_u64()?,
        expires_ms: meta["x"].as_u64()?,
        route: meta["r"].as_str()?.into(),
        path: meta["p"].as_str()?.into(),
        headers: meta["h"].as_array()?.iter().filter_map(pair).filter_map(|(n, v)| Some((n, v?))).collect(),
        vary: meta["v"].as_array()?.iter().filter_map(pair).collect(),
        body,
    })
}

/// Counts a cache outcome.
pub fn count(metrics: &Metrics, route: &Arc<str>, outcome: &'static str) {
    metrics.cache(route, outcome);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheConfig, CacheStoreConfig, HumanDuration};

    fn within(v: &HeaderValue, buf: &Bytes) -> bool {
        buf.as_ptr_range().contains(&v.as_bytes().as_ptr())
    }

    fn cfg() -> CacheConfig {
        CacheConfig { ttl: HumanDuration::from_secs(60), scope: CacheScope::Public, statuses: vec![200] }
    }

    fn stored(route: &str, path: &str, at: u64) -> Entry {
        Entry {
            status: 200,
            headers: Vec::new(),
            body: Bytes::new(),
            stored_ms: at,
            expires_ms: u64::MAX,
            vary: Vec::new(),
            route: route.into(),
            path: path.into(),
        }
    }

    #[test]
    fn shared_markers_keep_the_later_time_and_hide_only_what_they_name() {
        let now = 10 * PREFIX_MARKER_MS;
        let mut inv = Invalidations::default();
        assert!(inv.add("r:sym", now - 100, now));
        assert!(!inv.add("r:sym", now - 200, now), "an older time is not news");
        assert!(inv.add("p:/api/v1/market/", now - 50, now));
        assert!(inv.add("p:/api/v1/market/", now - 40, now));
        assert_eq!(inv.prefixes.len(), 1, "one marker per prefix");
        assert!(!inv.add("p:/old/", now - PREFIX_MARKER_MS, now), "expired prefix marker");
        assert!(!inv.add("bogus", now, now));
        assert!(!inv.valid(&stored("sym", "/x", now - 100)));
        assert!(inv.valid(&stored("sym", "/x", now - 99)));
        assert!(inv.valid(&stored("other", "/x", now - 500)));
        assert!(!inv.valid(&stored("other", "/api/v1/market/t", now - 40)));
        assert!(inv.valid(&stored("other", "/api/v1/marketX", now - 500)));
        assert!(inv.add("all", now - 10, now));
        assert!(!inv.valid(&stored("other", "/x", now - 10)));
        assert!(inv.valid(&stored("other", "/x", now - 9)));
        assert_eq!(inv.pruned(now + PREFIX_MARKER_MS).prefixes.len(), 0);
    }

    fn map(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in lines {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_key_holds_the_host_lower_cased() {
        let key = |host: Option<&'static str>| {
            let host = host.map(HeaderValue::from_static);
            let req = request(&Arc::from("r"), &cfg(), &http::Method::GET, "/x", None, None, host.as_ref(), &map(&[]));
            req.key
        };
        assert_eq!(&*key(Some("GW.Example:8080")), "GET r /x?||gw.example:8080");
        assert_eq!(key(Some("gw.example:8080")), key(Some("GW.EXAMPLE:8080")));
        assert_ne!(key(Some("gw.example")), key(Some("evil.example")));
        assert_ne!(key(Some("gw.example")), key(None));
        assert_ne!(key(Some("")), key(None));
    }

    #[test]
    fn request_cache_control_directives_are_parsed_case_insensitively() {
        let bypass = |lines: &[(&'static str, &'static str)]| {
            request(&Arc::from("r"), &cfg(), &http::Method::GET, "/x", None, None, None, &map(lines)).bypass
        };
        for cc in ["no-cache", "No-Cache", "NO-STORE", "max-age=0, no-cache", " no-store ,x", "no-cache=\"a\""] {
            assert!(bypass(&[("cache-control", cc)]), "{cc}");
        }
        assert!(bypass(&[("cache-control", "max-age=5"), ("cache-control", "No-Store")]));
        assert!(bypass(&[("pragma", "No-Cache")]));
        for cc in ["x-no-cache-foo", "max-age=0", "no-cachex", "foo=no-cache", ""] {
            assert!(!bypass(&[("cache-control", cc)]), "{cc}");
        }
        assert!(!bypass(&[]));
    }

    #[tokio::test]
    async fn vary_compares_every_line_of_the_named_field() {
        let cache = ResponseCache::new(&CacheStoreConfig::default(), None);
        let stored_for = map(&[("x-lang", "en"), ("x-lang", "fr")]);
        let req = request(&Arc::from("r"), &cfg(), &http::Method::GET, "/x", None, None, None, &stored_for);
        let e = cache.store(&req, 200, &map(&[("vary", "X-Lang")]), &stored_for, Bytes::new()).await;
        assert!(e.vary_matches(&stored_for));
        assert!(e.vary_matches(&map(&[("x-lang", "en, fr")])), "the same field on one line");
        assert!(!e.vary_matches(&map(&[("x-lang", "en"), ("x-lang", "de")])));
        assert!(!e.vary_matches(&map(&[("x-lang", "en")])));
        assert!(!e.vary_matches(&map(&[])));
    }

    #[tokio::test]
    async fn an_entry_does_not_keep_the_connection_buffers_its_headers_came_from() {
        // As the HTTP/1.1 legs parse them: values are slices of the connection's read buffer.
        let upstream = Bytes::from(vec![b'a'; 8192]);
        let client = Bytes::from(vec![b'b'; 8192]);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_maybe_shared(upstream.slice(0..16)).unwrap());
        headers.insert(header::VARY, HeaderValue::from_static("accept"));
        let mut req_headers = HeaderMap::new();
        req_headers.insert(header::ACCEPT, HeaderValue::from_maybe_shared(client.slice(0..8)).unwrap());
        assert!(within(&headers[header::CONTENT_TYPE], &upstream) && within(&req_headers[header::ACCEPT], &client));

        let cache = ResponseCache::new(&CacheStoreConfig::default(), None);
        let cfg = CacheConfig { ttl: HumanDuration::from_secs(60), scope: CacheScope::Public, statuses: vec![200] };
        let req = request(&Arc::from("r"), &cfg, &http::Method::GET, "/x", None, None, None, &req_headers);
        let e = cache.store(&req, 200, &headers, &req_headers, Bytes::from_static(b"{}")).await;

        let (_, ct) = e.headers.iter().find(|(n, _)| *n == header::CONTENT_TYPE).expect("kept");
        assert_eq!(ct.as_bytes(), &[b'a'; 16]);
        assert!(!within(ct, &upstream), "the entry's header value is a copy");
        let accept = e.vary.iter().find_map(|(n, v)| (*n == header::ACCEPT).then_some(v.as_ref())).flatten();
        assert_eq!(accept.map(HeaderValue::as_bytes), Some(&[b'b'; 8][..]));
        assert!(!within(accept.unwrap(), &client), "the vary value is a copy");
    }
}
