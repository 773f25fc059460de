//! Shared-nothing worker threads: one single-threaded tokio runtime per CPU.
//!
//! The accept loop (and everything else that is not a client connection: admin listener,
//! health checks, reloads, Redis drivers) runs on the runtime that called
//! [`start`](super::start). Each accepted connection is handed, once, to a worker; from then
//! on the connection, every request on it, the upstream connections it uses (each worker has
//! its own pool, see `proxy::Upstream::client`) and the tasks they spawn stay on that thread.
//! Measured against one work-stealing runtime with the same thread count: no cross-thread
//! wake-ups or task migration per request, about 4 µs less CPU per proxied request
//! (bench/EXPERIMENTS.md).
//!
//! Dropping [`Workers`] stops the threads; their runtimes are dropped with whatever is still
//! open on them (the graceful drain has already waited for in-flight requests by then), then
//! each hands its last access-log batch over, and the drop waits for that (at most 2 s).

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

thread_local! {
    /// 1-based index of the worker this thread is (0: not a worker thread).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker index of the calling thread: 1..=N on worker threads, 0 elsewhere.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// The worker threads of one gateway.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    /// Dropped to stop the workers.
    stops: Vec<oneshot::Sender<()>>,
    /// One message per worker that has stopped and flushed its access log.
    done: mpsc::Receiver<()>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` (at least 1) worker threads.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let (done_tx, done) = mpsc::channel();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            let done_tx = done_tx.clone();
            std::thread::Builder::new().name(format!("b25-worker-{}", i + 1)).spawn(move || {
                INDEX.with(|c| c.set(i + 1));
                // Runs the worker's tasks until the gateway drops its `Workers`.
                rt.block_on(async {
                    tokio::select! {
                        _ = stopped => {}
                        () = crate::observe::access::flusher() => {}
                    }
                });
                // Requests still open are cut here and write their access lines; then the
                // thread's last batch goes to the writer.
                drop(rt);
                crate::observe::access::flush();
                let _ = done_tx.send(());
            })?;
        }
        Ok(Self { handles, stops, done, next: AtomicUsize::new(0) })
    }

    /// Runs `fut` on the next worker (round robin).
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        // The handle's runtime lives until `Workers` is dropped; a spawn after that point is
        // impossible (the accept loop owns `Workers`).
        drop(self.handles[i].spawn(fut));
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let n = self.stops.len();
        self.stops.clear();
        let deadline = Instant::now() + Duration::from_secs(2);
        for _ in 0..n {
            if self.done.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_work_runs_on_worker_threads_in_turn() {
        let w = Workers::start(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            w.spawn(async move {
                tokio::task::yield_now().await;
                tx.send(index()).unwrap();
            });
        }
        let mut seen: Vec<usize> = (0..4).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        assert_eq!(seen, vec![1, 1, 2, 2]);
        assert_eq!(index(), 0, "the test thread is not a worker");
    }
}
