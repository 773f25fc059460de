//! Idempotency keys for order routes: exactly-once submission at the edge.
//!
//! A record is scoped to (principal, route, key) and remembers a SHA-256 of the request body.
//! First request: an in-flight marker is set atomically (SET NX semantics, in memory or in
//! Redis), the request is proxied, and the final response replaces the marker for the TTL.
//! A duplicate while in flight → 409; after completion → the stored response, replayed with
//! `Idempotent-Replayed: true` and the upstream untouched; the same key with another body →
//! 422. If the store cannot be reached the request is refused (503): an order is never sent
//! without its deduplication. An upstream 5xx releases the key (configurable) so the client
//! may retry; an outcome the gateway cannot know (timeout, reset after sending) is stored like
//! any response, so a retry with the same key can never place the order twice.

use crate::ratelimit::redis::RedisStore;
use aws_lc_rs::digest;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// Most records kept in memory; beyond it new keys are refused (fail closed) rather than
/// evicting records that still protect orders.
pub const MAX_MEMORY_RECORDS: usize = 200_000;
/// Most expired records a keyed request drops (more only when the store is full).
const PURGE_STEP: usize = 64;
/// Longest accepted `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;

/// A stored response.
#[derive(Clone, Debug)]
pub struct Stored {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body.
    pub body: Bytes,
    /// The gateway's own error (JSON `{"error":{…}}`): replayed with the replaying request's
    /// `request_id`, as every gateway error carries the id of the request it answers.
    pub gateway_error: bool,
}

impl Stored {
    /// The gateway's error `kind` with `message`, kept for replay.
    pub fn gateway_error(kind: crate::error::ErrorKind, message: &str) -> Self {
        Self {
            status: kind.status().as_u16(),
            headers: vec![(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body: crate::error::error_json(kind.code(), message, ""),
            gateway_error: true,
        }
    }

    /// The body to replay to the request `request_id`.
    pub fn body_for(&self, request_id: &str) -> Bytes {
        if !self.gateway_error {
            return self.body.clone();
        }
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&self.body) else { return self.body.clone() };
        if let Some(e) = v.get_mut("error").and_then(serde_json::Value::as_object_mut) {
            e.insert("request_id".into(), request_id.into());
        }
        serde_json::to_vec(&v).map(Bytes::from).unwrap_or_else(|_| self.body.clone())
    }
}

enum Record {
    Pending { hash: [u8; 32], expires_ms: u64 },
    Done { hash: [u8; 32], expires_ms: u64, resp: Arc<Stored> },
}

/// What `begin` found.
pub enum Begin {
    /// No record: this request goes upstream.
    First,
    /// The same key is being processed.
    InFlight,
    /// Completed before: replay.
    Replay(Arc<Stored>),
    /// The key was used with another body.
    Mismatch,
    /// The store is unreachable (fail closed).
    Unavailable,
    /// Memory is full of live records (fail closed).
    Full,
}

impl Record {
    fn expires_ms(&self) -> u64 {
        match self {
            Record::Pending { expires_ms, .. } | Record::Done { expires_ms, .. } => *expires_ms,
        }
    }
}

/// The idempotency store (memory, or Redis when `state.backend: redis`).
pub struct IdempotencyStore {
    mem: Mutex<Memory>,
    redis: Option<Arc<RedisStore>>,
}

/// The in-memory records, and when each expires.
#[derive(Default)]
struct Memory {
    records: HashMap<Arc<str>, Record>,
    /// (expiry, key) of every record, earliest first: one entry per record, moved when the
    /// record is replaced (in flight -> done) and removed with it.
    expiry: BTreeSet<(u64, Arc<str>)>,
}

impl Memory {
    /// Drops up to `limit` of the records that have expired by `now`, earliest first. A record
    /// is dropped when its expiry comes up, not when the store fills: memory follows the live
    /// records. With nothing to drop this is one look at the earliest expiry; the limit keeps
    /// a request that comes after a burst has expired from dropping the whole burst under the
    /// lock (each keyed request drops a few).
    fn purge(&mut self, now: u64, limit: usize) {
        for _ in 0..limit {
            if self.expiry.first().is_none_or(|(at, _)| *at > now) {
                return;
            }
            if let Some((_, key)) = self.expiry.pop_first() {
                self.records.remove(&key);
            }
        }
    }

    /// `IdempotencyStore::begin` in memory, at `now` (unix ms).
    fn begin(&mut self, scope: &str, hash: [u8; 32], inflight_ms: u64, now: u64) -> Begin {
        self.purge(now, PURGE_STEP);
        // A known key is answered even when the store is full: only a new record needs room.
        match self.records.get(scope) {
            Some(Record::Pending { hash: h, expires_ms }) if *expires_ms > now => {
                return if *h == hash { Begin::InFlight } else { Begin::Mismatch };
            }
            Some(Record::Done { hash: h, expires_ms, resp }) if *expires_ms > now => {
                return if *h == hash { Begin::Replay(resp.clone()) } else { Begin::Mismatch };
            }
            // Expired, not dropped yet: replaced in place.
            Some(_) => {
                self.insert(scope, Record::Pending { hash, expires_ms: now + inflight_ms });
                return Begin::First;
            }
            None if self.records.len() >= MAX_MEMORY_RECORDS => {
                // Full, perhaps of expired records the steps have not reached yet.
                self.purge(now, usize::MAX);
                if self.records.len() >= MAX_MEMORY_RECORDS {
                    return Begin::Full;
                }
            }
            None => {}
        }
        // Known to be absent: no second lookup.
        self.add(Arc::from(scope), Record::Pending { hash, expires_ms: now + inflight_ms });
        Begin::First
    }

    /// `IdempotencyStore::complete` in memory, at `now` (unix ms).
    fn complete(&mut self, scope: &str, hash: [u8; 32], resp: Stored, ttl_ms: u64, now: u64) {
        self.insert(scope, Record::Done { hash, expires_ms: now + ttl_ms, resp: Arc::new(resp) });
    }

    fn release(&mut self, scope: &str) {
        if let Some((key, r)) = self.records.remove_entry(scope) {
            self.expiry.remove(&(r.expires_ms(), key));
        }
    }

    /// Writes the record of `scope`, replacing the one it has.
    fn insert(&mut self, scope: &str, record: Record) {
        let key = match self.records.get_key_value(scope) {
            Some((k, old)) => {
                let k = k.clone();
                self.expiry.remove(&(old.expires_ms(), k.clone()));
                k
            }
            None => Arc::from(scope),
        };
        self.add(key, record);
    }

    /// Writes a record under `key`, which has none (or whose index entry is gone).
    fn add(&mut self, key: Arc<str>, record: Record) {
        self.expiry.insert((record.expires_ms(), key.clone()));
        self.records.insert(key, record);
    }
}

const BEGIN_LUA: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'P' .. ARGV[1], 'PX', ARGV[2])
  return ''
end
return v
"#;

/// SHA-256 of a body.
pub fn body_hash(body: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, body);
    d.as_ref().try_into().expect("32 bytes")
}

fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The record's name: one per route, principal and key. The subject is length-prefixed
/// (subjects may contain `:`, and so may keys), so two different (principal, key) pairs can
/// never name the same record: `sub "urn"` with key `acct:k9` is not `sub "urn:acct"` with
/// `k9`. Route ids have no `:` (config validation); anonymous callers are `-`.
pub fn scope(route: &str, subject: Option<&str>, key: &[u8]) -> String {
    let key = String::from_utf8_lossy(key);
    match subject {
        Some(sub) => format!("{route}:{}.{sub}:{key}", sub.len()),
        None => format!("{route}:-:{key}"),
    }
}

/// A valid client key: 1–255 visible ASCII characters.
pub fn valid_key(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_KEY_LEN && b.iter().all(|c| (0x21..0x7f).contains(c))
}

impl IdempotencyStore {
    /// A store; with `redis`, records live there and are shared by instances.
    pub fn new(redis: Option<Arc<RedisStore>>) -> Arc<Self> {
        Arc::new(Self { mem: Mutex::new(Memory::default()), redis })
    }

    /// Atomically checks the record for `scope` and marks it in flight if absent.
    pub async fn begin(&self, scope: &str, hash: [u8; 32], inflight_ms: u64) -> Begin {
        if let Some(redis) = &self.redis {
            let k = redis.key("idem", scope);
            let script = redis::Script::new(BEGIN_LUA);
            let h = hex(&hash);
            let Some(v) = redis
                .run(|mut c| async move { script.key(k).arg(h).arg(inflight_ms).invoke_async::<Vec<u8>>(&mut c).await })
                .await
            else {
                return Begin::Unavailable;
            };
            return decode_begin(&v, &hash);
        }
        self.mem.lock().expect("not poisoned").begin(scope, hash, inflight_ms, crate::unix_ms())
    }

    /// Replaces the in-flight marker with the final response. Returns false when the store
    /// failed (the marker then expires on its own).
    pub async fn complete(&self, scope: &str, hash: [u8; 32], resp: Stored, ttl_ms: u64) -> bool {
        if let Some(redis) = &self.redis {
            let k = redis.key("idem", scope);
            let v = encode_done(&hash, &resp);
            return redis
                .run(|mut c| async move {
                    redis::cmd("SET").arg(k).arg(v).arg("PX").arg(ttl_ms.max(1)).query_async::<()>(&mut c).await
                })
                .await
                .is_some();
        }
        self.mem.lock().expect("not poisoned").complete(scope, hash, resp, ttl_ms, crate::unix_ms());
        true
    }

    /// Records held in memory (`/admin/stats`); `None` with the Redis backend.
    pub fn memory_records(&self) -> Option<usize> {
        self.redis.is_none().then(|| self.mem.lock().expect("not poisoned").records.len())
    }

    /// Forgets the record (an upstream 5xx: the client may retry).
    pub async fn release(&self, scope: &str) {
        if let Some(redis) = &self.redis {
            let k = redis.key("idem", scope);
            let _: Option<()> =
                redis.run(|mut c| async move { redis::cmd("DEL").arg(k).query_async(&mut c).await }).await;
            return;
        }
        self.mem.lock().expect("not poisoned").release(scope);
    }
}

fn encode_done(hash: &[u8; 32], r: &Stored) -> Vec<u8> {
    let meta = serde_json::json!({
        "s": r.status,
        "h": r.headers.iter().filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?))).collect::<Vec<_>>(),
        "g": r.gateway_error,
    });
    let m = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = Vec::with_capacity(1 + 64 + 4 + m.len() + r.body.len());
    out.push(b'D');
    out.extend_from_slice(hex(hash).as_bytes());
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(&r.body);
    out
}

fn decode_begin(v: &[u8], hash: &[u8; 32]) -> Begin {
    if v.is_empty() {
        return Begin::First;
    }
    let same = v.get(1..65) == Some(hex(hash).as_bytes());
    match v[0] {
        b'P' => {
            if same {
                Begin::InFlight
            } else {
                Begin::Mismatch
            }
        }
        b'D' if !same => Begin::Mismatch,
        b'D' => {
            let parse = || -> Option<Stored> {
                let n = u32::from_be_bytes(v.get(65..69)?.try_into().ok()?) as usize;
                let meta: serde_json::Value = serde_json::from_slice(v.get(69..69 + n)?).ok()?;
                let headers = meta["h"]
                    .as_array()?
                    .iter()
                    .filter_map(|p| {
                        Some((
                            HeaderName::from_bytes(p.get(0)?.as_str()?.as_bytes()).ok()?,
                            HeaderValue::from_str(p.get(1)?.as_str()?).ok()?,
                        ))
                    })
                    .collect();
                Some(Stored {
                    status: meta["s"].as_u64()? as u16,
                    headers,
                    body: Bytes::copy_from_slice(v.get(69 + n..)?),
                    gateway_error: meta["g"].as_bool().unwrap_or(false),
                })
            };
            parse().map(|s| Begin::Replay(Arc::new(s))).unwrap_or(Begin::Unavailable)
        }
        _ => Begin::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_never_collide() {
        let cases = [
            ("orders", Some("urn:acct"), "k9"),
            ("orders", Some("urn"), "acct:k9"),
            ("orders", Some("urn:"), "acct:k9"),
            ("orders", Some("-"), "k9"),
            ("orders", None, "k9"),
            ("orders", Some(""), "k9"),
            ("orders", Some("3.urn:acct"), "k9"),
        ];
        let scopes: BTreeSet<String> = cases.iter().map(|(r, s, k)| scope(r, *s, k.as_bytes())).collect();
        assert_eq!(scopes.len(), cases.len(), "{scopes:?}");
    }

    #[tokio::test]
    async fn memory_lifecycle() {
        let s = IdempotencyStore::new(None);
        let h = body_hash(b"{}");
        assert!(matches!(s.begin("k", h, 10_000).await, Begin::First));
        assert!(matches!(s.begin("k", h, 10_000).await, Begin::InFlight));
        assert!(matches!(s.begin("k", body_hash(b"x"), 10_000).await, Begin::Mismatch));
        s.complete(
            "k",
            h,
            Stored { status: 201, headers: vec![], body: Bytes::from_static(b"ok"), gateway_error: false },
            10_000,
        )
        .await;
        match s.begin("k", h, 10_000).await {
            Begin::Replay(r) => assert_eq!((r.status, &r.body[..]), (201, &b"ok"[..])),
            _ => panic!("expected replay"),
        }
        s.release("k").await;
        assert!(matches!(s.begin("k", h, 10_000).await, Begin::First));
    }

    /// Begins `n` keys `k0`, `k1`, … at `t`, key `i` in flight for `ttl(i)` ms.
    fn begin_keys(m: &mut Memory, n: usize, t: u64, ttl: impl Fn(u64) -> u64) {
        let h = body_hash(b"{}");
        for i in 0..n as u64 {
            assert!(matches!(m.begin(&format!("k{i}"), h, ttl(i), t), Begin::First));
        }
    }

    #[test]
    fn a_full_store_refuses_new_keys_only_until_a_record_expires() {
        let mut m = Memory::default();
        let (h, t) = (body_hash(b"{}"), 1_000_000);
        // k0 lives 1 ms, the others a minute.
        begin_keys(&mut m, MAX_MEMORY_RECORDS, t, |i| if i == 0 { 1 } else { 60_000 });
        // Full: a known key is still answered, a new one refused.
        assert!(matches!(m.begin("k1", h, 60_000, t), Begin::InFlight));
        assert!(matches!(m.begin("new-0", h, 60_000, t), Begin::Full));
        // A millisecond later k0 has expired: its slot is free again.
        assert!(matches!(m.begin("new-1", h, 60_000, t + 1), Begin::First));
        assert!(matches!(m.begin("new-2", h, 60_000, t + 1), Begin::Full));
        assert_eq!(m.records.len(), MAX_MEMORY_RECORDS);
        // A release makes room at once.
        m.release("k1");
        assert!(matches!(m.begin("new-2", h, 60_000, t + 1), Begin::First));
    }

    #[test]
    fn expired_records_are_dropped_before_the_store_fills() {
        let mut m = Memory::default();
        let (h, t) = (body_hash(b"{}"), 1_000_000);
        begin_keys(&mut m, PURGE_STEP, t, |i| 1 + i % 7);
        // A completed record has two writes behind it (in flight, then done).
        m.complete(
            "k0",
            h,
            Stored { status: 201, headers: vec![], body: Bytes::from_static(b"ok"), gateway_error: false },
            9,
            t + 1,
        );
        assert!(matches!(m.begin("k0", h, 60_000, t + 9), Begin::Replay(_)));
        assert_eq!(m.records.len(), 1, "every record but the completed one has expired");
        assert!(matches!(m.begin("live", h, 60_000, t + 10), Begin::First));
        assert_eq!(m.records.len(), 1, "only the live record is kept");
        assert_eq!(m.expiry.len(), 1, "and only its expiry");
    }

    #[test]
    fn a_request_drops_a_bounded_number_of_expired_records() {
        let mut m = Memory::default();
        let (h, t) = (body_hash(b"{}"), 1_000_000);
        begin_keys(&mut m, 1_000, t, |_| 1);
        assert!(matches!(m.begin("next", h, 60_000, t + 1), Begin::First));
        assert_eq!(m.records.len(), 1_000 - PURGE_STEP + 1, "one step of the burst dropped");
        // An expired key not dropped yet is free again.
        assert!(matches!(m.begin("k999", h, 60_000, t + 1), Begin::First));
        assert_eq!(m.records.len(), m.expiry.len());
        // Every keyed request drops its step: the burst is gone after a few.
        for i in 0..20 {
            m.begin(&format!("n{i}"), h, 60_000, t + 1);
        }
        assert_eq!(m.records.len(), 22, "the 22 live records");
    }

    #[test]
    fn the_expiry_index_holds_one_entry_per_record() {
        let mut m = Memory::default();
        let (h, t) = (body_hash(b"{}"), 1_000_000);
        for _ in 0..3 {
            assert!(matches!(m.begin("k", h, 60_000, t), Begin::First));
            m.complete(
                "k",
                h,
                Stored { status: 201, headers: vec![], body: Bytes::new(), gateway_error: false },
                1_000,
                t,
            );
            assert_eq!((m.records.len(), m.expiry.len()), (1, 1), "the done record replaced the in-flight one");
            assert_eq!(m.expiry.first().map(|(at, _)| *at), Some(t + 1_000));
            m.release("k");
            assert_eq!((m.records.len(), m.expiry.len()), (0, 0));
        }
    }

    #[test]
    fn done_round_trip() {
        let h = body_hash(b"b");
        let r = Stored {
            status: 409,
            headers: vec![(HeaderName::from_static("x-a"), HeaderValue::from_static("1"))],
            body: Bytes::from_static(b"body"),
            gateway_error: false,
        };
        match decode_begin(&encode_done(&h, &r), &h) {
            Begin::Replay(s) => {
                assert_eq!((s.status, s.headers.len(), &s.body[..], s.gateway_error), (409, 1, &b"body"[..], false))
            }
            _ => panic!(),
        }
        // A stored gateway error keeps its mark through Redis, and is replayed with the
        // replaying request's id.
        let e = Stored::gateway_error(crate::error::ErrorKind::UpstreamTimeout, "late");
        match decode_begin(&encode_done(&h, &e), &h) {
            Begin::Replay(s) => {
                assert!(s.gateway_error);
                let v: serde_json::Value = serde_json::from_slice(&s.body_for("rid-2")).unwrap();
                assert_eq!(v["error"]["request_id"], "rid-2");
                assert_eq!(v["error"]["code"], "upstream_timeout");
            }
            _ => panic!(),
        }
    }
}
