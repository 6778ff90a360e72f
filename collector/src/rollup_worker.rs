//! The folder: moves queued events into the rollup rows, continuously.
//!
//! Ingest commits raw events and queues the new ones in one transaction; the folder takes what
//! is queued (everything committed since its last pass, up to [`MAX_FOLD`]) and updates the
//! rollups in another. Many commits' events share one fold, so a rollup row is read, merged
//! and written once per fold rather than once per commit: at high ingest rates that is what
//! keeps rollups cheap. A fold starts when a commit signals one and at least every
//! [`INTERVAL`], so an acknowledged event is in the rollups within about one fold's time. The
//! folder runs on a thread of its own ([`spawn`] says why).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::db::Storage;
use crate::metrics::Metrics;

/// Longest wait between folds when nothing signals one.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// Most events one fold takes: bounds how long a fold holds the rollups' write lock (on SQLite
/// the rollups' own file's, which ingest commits no longer wait for) and the fold's memory (a
/// few hundred bytes per event).
///
/// A backlog folds faster in bigger folds: a rollup row is read, merged and written once per
/// fold, and the hour, day and week rows are shared by every event of the fold. With 50,000
/// the ingest bench's folder caught up at 51–58k events/s on SQLite and 32–35k on PostgreSQL;
/// with 200,000 at 117k and 53k, and SQLite's acks at 100k/s offered came back faster too
/// (p99 0.7 s against 1.4–3.2 s), the shorter total lock time outweighing the longer holds.
pub const MAX_FOLD: usize = 200_000;

/// Wakes the folder and stops it.
#[derive(Debug, Default)]
pub struct FoldSignal {
    notify: Notify,
    stopping: std::sync::atomic::AtomicBool,
}

impl FoldSignal {
    /// Something was queued.
    pub fn poke(&self) {
        self.notify.notify_one();
    }

    /// Fold what is left, then stop.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// Starts the folder on a thread of its own, with its own single-threaded runtime and (on
/// PostgreSQL) its own connections ([`Storage::for_folder`]). The returned handle completes
/// once the folder has stopped.
///
/// Why not a task on the service's runtime: a fold's CPU work (decoding the queued samples,
/// aggregating them, merging tens of thousands of sketches) runs in long stretches between
/// awaits, and each stretch held one of the runtime's workers (one per core) away from the
/// requests and commits queued behind it (and, in the ingest bench, from the load generator
/// sharing the runtime). In three alternating whole-bench rounds, on its own thread: SQLite's
/// fresh rate 156.8–167.1k events/s against 139.2–142.2k, PostgreSQL's ack p99 at 100k/s
/// offered 69.1–134.9 ms against 100.7–202.3 (`benches/README.md`). The folder's connections
/// are its own because a socket is driven by the runtime that opened it: a pooled connection
/// opened by the folder would stall a committer that took it whenever the folder's thread was
/// busy.
pub fn spawn(storage: Storage, metrics: Arc<Metrics>, signal: Arc<FoldSignal>) -> JoinHandle<()> {
    let service = tokio::runtime::Handle::current();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    // Clones go to the thread, so that the originals are still here should it not start.
    let (s, m, sig) = (storage.clone(), metrics.clone(), signal.clone());
    let thread = std::thread::Builder::new()
        .name("tollgate-folder".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(own) => {
                    // Inside the runtime: the folder's pool belongs to it.
                    own.block_on(async move { run(s.for_folder(), m, sig).await });
                    let _ = done.send(());
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "no runtime for the folder's thread; folding on the service's"
                    );
                    service.spawn(async move {
                        run(s, m, sig).await;
                        let _ = done.send(());
                    });
                }
            }
        });
    match thread {
        Ok(_) => tokio::spawn(async move {
            let _ = finished.await;
        }),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "no thread for the folder; folding on the service's runtime"
            );
            tokio::spawn(run(storage, metrics, signal))
        }
    }
}

/// The folder's loop: fold whatever is queued, then wait for a commit's signal or
/// [`INTERVAL`]. Ends after a last fold once stopped, or once nothing is left to signal it
/// (every committer and the writer gone without a stop: what is queued is folded at the next
/// start, as after a crash).
async fn run(storage: Storage, metrics: Arc<Metrics>, signal: Arc<FoldSignal>) {
    loop {
        let stopping = signal.stopping.load(std::sync::atomic::Ordering::SeqCst);
        loop {
            let started = Instant::now();
            match storage.fold(MAX_FOLD).await {
                Ok(0) => break,
                Ok(n) => {
                    metrics.observe_fold(started.elapsed(), n);
                    if n < MAX_FOLD {
                        break;
                    }
                }
                Err(e) => {
                    metrics.db_error();
                    tracing::warn!(error = %e, "rollup fold failed; will retry");
                    break;
                }
            }
        }
        if stopping || Arc::strong_count(&signal) == 1 {
            return;
        }
        let _ = tokio::time::timeout(INTERVAL, signal.notify.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The folder's thread is not the runtime's: nothing cancels it when its writer goes away
    /// without stopping it (a dropped runtime, a test that ends), so it must see that and end.
    #[tokio::test]
    async fn the_folder_ends_once_nothing_is_left_to_signal_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::connect(&dir.path().join("t.db").to_string_lossy(), 2)
            .await
            .expect("open");
        storage.migrate().await.expect("migrate");
        let signal = Arc::new(FoldSignal::default());
        let folder = spawn(storage, Arc::new(Metrics::default()), signal.clone());
        signal.poke();
        drop(signal);
        tokio::time::timeout(Duration::from_secs(5), folder)
            .await
            .expect("the folder ended")
            .expect("the folder did not panic");
    }
}
