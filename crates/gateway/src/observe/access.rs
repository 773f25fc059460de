//! The access log's own path: one line per request formatted by hand into a per-thread batch,
//! handed whole to its own writer thread.
//!
//! Through a `tracing` event, the line cost ≈ 27k instructions per request on the request
//! thread (the event's field visitors, the JSON formatter, the timestamp), as much as the rest
//! of the proxied request together; formatted here it is ≈ 1k. The format is the one the
//! `tracing` JSON (or text) formatter wrote, field for field. `RUST_LOG=…,access=off` still
//! silences it (what the filter says of the `access` target is read once at start: [`enabled`]).
//!
//! Batches, like nginx's `access_log … buffer= flush=`: a worker thread (one running
//! [`flusher`]) appends lines to its batch and hands it over at [`BATCH_BYTES`], or
//! [`FLUSH_AFTER`] after the batch's first line, or when the worker stops. A line handed over
//! one at a time woke the writer thread per request: a futex wake-up and a context switch on
//! the cores serving requests (≈ 0.6 µs per request at saturation, bench/EXPERIMENTS.md). Other
//! threads hand each line over at once. The queue to the writer is bounded ([`QUEUE_BATCHES`]):
//! when the output cannot keep up, batches are dropped and counted
//! (`b25_gateway_access_log_dropped_lines_total`), never a request thread blocked.

use prometheus_client::metrics::counter::Counter;
use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};

/// A worker's batch goes to the writer at this size…
const BATCH_BYTES: usize = 16 * 1024;
/// …or this long after its first line.
const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Batches queued for the writer thread (at most ≈ 4 MiB).
const QUEUE_BATCHES: usize = 256;

/// Where lines go: the writer thread's queue (tracing-appender's, its own instance: a batch is
/// one message), and the format.
struct Sink {
    queue: Mutex<NonBlocking>,
    /// The queue's count of the batches it refused.
    dropped: ErrorCounter,
    json: bool,
}

/// Lines for the writer thread.
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

static SINK: OnceLock<Sink> = OnceLock::new();
/// Lines dropped because the writer's queue was full (read around the hand-over: two threads
/// dropping at the same instant may count each other's batch).
pub(super) static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// This thread's batch, and its flusher when it has one.
struct Local {
    batch: Batch,
    flusher: Option<Rc<Notify>>,
}

thread_local! {
    static LOCAL: RefCell<Local> =
        const { RefCell::new(Local { batch: Batch { bytes: Vec::new(), lines: 0 }, flusher: None }) };
    /// `YYYY-MM-DDTHH:MM:SS` of the second last formatted.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// Starts the writer thread (lines to stdout, as JSON or as text). Keep the guard alive: its
/// drop writes what is queued.
pub(super) fn install(json: bool) -> Option<Guard> {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUE_BATCHES)
        .thread_name("b25-access-log")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()));
    let dropped = writer.error_counter();
    SINK.set(Sink { queue: Mutex::new(writer), dropped, json }).ok()?;
    Some(Guard(Some(guard)))
}

/// Whether the log filter lets access lines through, decided once when logging is installed
/// (the filter is not reloaded): asking the subscriber per request walked its directives
/// (≈ 350 instructions).
static ENABLED: OnceLock<bool> = OnceLock::new();

/// Records what the installed filter says about access lines ([`enabled`]).
pub(super) fn decide_enabled() {
    let _ = ENABLED.set(tracing::enabled!(target: "access", tracing::Level::INFO));
}

/// Whether access lines pass the log filter.
pub fn enabled() -> bool {
    match ENABLED.get() {
        Some(&on) => on,
        // Logging not installed by `init_logging` (tests, embedding): ask the subscriber.
        None => tracing::enabled!(target: "access", tracing::Level::INFO),
    }
}

/// Writes the queued access lines when dropped (at exit, after the workers have flushed).
pub struct Guard(Option<WorkerGuard>);

impl Drop for Guard {
    fn drop(&mut self) {
        flush();
        drop(self.0.take());
    }
}

/// Run on a worker thread for as long as it serves requests: from then on the thread's access
/// lines are batched, and this hands a batch over [`FLUSH_AFTER`] after its first line. The
/// worker calls [`flush`] when it stops.
pub async fn flusher() {
    if SINK.get().is_none() {
        return std::future::pending().await;
    }
    let wake = Rc::new(Notify::new());
    LOCAL.with(|l| l.borrow_mut().flusher = Some(wake.clone()));
    loop {
        wake.notified().await;
        tokio::time::sleep(FLUSH_AFTER).await;
        flush();
    }
}

/// Hands this thread's batch to the writer now.
pub fn flush() {
    LOCAL.with(|l| hand_over(&mut l.borrow_mut().batch));
}

fn hand_over(batch: &mut Batch) {
    let Some(sink) = SINK.get() else { return };
    if batch.lines == 0 {
        return;
    }
    let before = sink.dropped.dropped_lines();
    let _ = sink.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write_all(&batch.bytes);
    if sink.dropped.dropped_lines() != before {
        DROPPED.inc_by(batch.lines);
    }
    batch.bytes.clear();
    batch.lines = 0;
}

/// One access-log line.
pub struct Line<'a> {
    pub request_id: &'a [u8],
    pub method: &'a str,
    pub route: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_us: u64,
    pub upstream_us: Option<u64>,
    pub client_ip: IpAddr,
    pub trace_id: Option<&'a str>,
    pub aborted: bool,
}

/// Writes `line`; false when no writer is installed (the caller then uses a `tracing` event).
pub fn write(line: &Line<'_>) -> bool {
    let Some(sink) = SINK.get() else { return false };
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        let l = &mut *l;
        let first = l.batch.lines == 0;
        if sink.json {
            format_json(&mut l.batch.bytes, line)
        } else {
            format_text(&mut l.batch.bytes, line)
        }
        l.batch.lines += 1;
        match &l.flusher {
            Some(_) if l.batch.bytes.len() >= BATCH_BYTES => hand_over(&mut l.batch),
            Some(wake) if first => wake.notify_one(),
            Some(_) => {}
            None => hand_over(&mut l.batch),
        }
    });
    true
}

/// `2026-11-27T00:55:06.701687Z`.
fn timestamp(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let (y, mo, d) = crate::civil_date(secs / 86_400);
            let rem = secs % 86_400;
            let mut b = [0u8; 19];
            let mut w = &mut b[..];
            let _ = write!(w, "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60);
            *c = (secs, b);
        }
        out.extend_from_slice(&c.1);
    });
    let us = now.subsec_micros();
    out.push(b'.');
    for div in [100_000, 10_000, 1000, 100, 10, 1] {
        out.push(b'0' + (us / div % 10) as u8);
    }
    out.push(b'Z');
}

/// No byte of `s` needs escaping in a JSON string (no `"`, `\\` or control byte): eight bytes
/// per step (SWAR), as the strings are clean almost always.
fn clean(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A high bit per byte of `x` that is zero (exact for bytes below 0x80, which is all that
    // the tests below need: a byte of 0x80 or more is never flagged by `below`).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let x = u64::from_le_bytes(c.try_into().expect("eight bytes"));
        let below = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        if (below | zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\')))) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// A JSON string (quotes added; `"`, `\` and control characters escaped).
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    if clean(s) {
        out.extend_from_slice(s);
    } else {
        for &b in s {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..0x20 => {
                    let _ = write!(out, "\\u{b:04x}");
                }
                _ => out.push(b),
            }
        }
    }
    out.push(b'"');
}

fn ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                crate::push_decimal(out, u64::from(o));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn format_json(out: &mut Vec<u8>, l: &Line<'_>) {
    let num = |out: &mut Vec<u8>, key: &[u8], n: u64| {
        out.extend_from_slice(key);
        crate::push_decimal(out, n);
    };
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out);
    // The request id ([`crate::pipeline::request_id::is_valid`] or made here), the method (an
    // RFC 9110 token) and the trace id (hex) have nothing to escape.
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"request_id\":\"");
    out.extend_from_slice(l.request_id);
    out.extend_from_slice(b"\",\"method\":\"");
    out.extend_from_slice(l.method.as_bytes());
    out.extend_from_slice(b"\",\"route\":");
    json_str(out, l.route.as_bytes());
    out.extend_from_slice(b",\"path\":");
    json_str(out, l.path.as_bytes());
    num(out, b",\"status\":", u64::from(l.status));
    num(out, b",\"bytes_in\":", l.bytes_in);
    num(out, b",\"bytes_out\":", l.bytes_out);
    num(out, b",\"duration_us\":", l.duration_us);
    if let Some(u) = l.upstream_us {
        num(out, b",\"upstream_us\":", u);
    }
    out.extend_from_slice(b",\"client_ip\":\"");
    ip(out, l.client_ip);
    out.push(b'"');
    if let Some(t) = l.trace_id {
        out.extend_from_slice(b",\"trace_id\":\"");
        out.extend_from_slice(t.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(if l.aborted { b",\"aborted\":true" } else { b",\"aborted\":false" });
    out.extend_from_slice(b",\"target\":\"access\"}\n");
}

fn format_text(out: &mut Vec<u8>, l: &Line<'_>) {
    timestamp(out);
    out.extend_from_slice(b"  INFO access: request_id=");
    out.extend_from_slice(l.request_id);
    let _ = write!(
        out,
        " method={} route={} path={} status={} bytes_in={} bytes_out={} duration_us={}",
        l.method, l.route, l.path, l.status, l.bytes_in, l.bytes_out, l.duration_us
    );
    if let Some(u) = l.upstream_us {
        let _ = write!(out, " upstream_us={u}");
    }
    let _ = write!(out, " client_ip={}", l.client_ip);
    if let Some(t) = l.trace_id {
        let _ = write!(out, " trace_id={t}");
    }
    let _ = writeln!(out, " aborted={}", l.aborted);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clean_check_agrees_with_byte_by_byte_for_every_byte_and_position() {
        let naive = |s: &[u8]| s.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\');
        for len in [1, 7, 8, 9, 16, 23] {
            for at in 0..len {
                for b in 0..=255u8 {
                    for fill in [b'a', 0xff, 0x20, 0x7f] {
                        let mut s = vec![fill; len];
                        s[at] = b;
                        assert_eq!(clean(&s), naive(&s), "{s:?}");
                    }
                }
            }
        }
        assert!(clean(b""));
    }

    #[test]
    fn strings_are_escaped_wherever_the_byte_is() {
        for at in [0, 15, 16, 17, 33, 47] {
            for bad in [b'"', b'\\', b'\n', 0x1f] {
                let mut s = vec![b'a'; 48];
                s[at] = bad;
                let mut out = Vec::new();
                json_str(&mut out, &s);
                let back: String = serde_json::from_slice(&out).unwrap();
                assert_eq!(back.as_bytes(), &s[..], "byte {bad:#x} at {at}");
                assert_eq!(out.len(), 48 + 2 + if bad == 0x1f { 5 } else { 1 });
            }
        }
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let mut out = Vec::new();
        let line = Line {
            request_id: b"rid-1",
            method: "GET",
            route: "t",
            path: "/a\"b\\c\u{1}",
            status: 200,
            bytes_in: 3,
            bytes_out: 181,
            duration_us: 412,
            upstream_us: Some(350),
            client_ip: "10.0.0.7".parse().unwrap(),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            aborted: false,
        };
        format_json(&mut out, &line);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}");
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_us"], 350);
        assert_eq!(v["client_ip"], "10.0.0.7");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["aborted"], false);
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        let mut out = Vec::new();
        let v6 = Line { upstream_us: None, trace_id: None, client_ip: "::1".parse().unwrap(), aborted: true, ..line };
        format_json(&mut out, &v6);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("upstream_us").is_none() && v.get("trace_id").is_none());
        assert_eq!(v["client_ip"], "::1");
        assert_eq!(v["aborted"], true);
    }
}
