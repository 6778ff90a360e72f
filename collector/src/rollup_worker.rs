//! The folder: moves queued events into the rollup rows, continuously.
//!
//! Ingest commits raw events and queues the new ones in one transaction; the folder takes what
//! is queued (everything committed since its last pass, up to [`MAX_FOLD`]) and updates the
//! rollups in another. Many commits' events share one fold, so a rollup row is read, merged
//! and written once per fold rather than once per commit: at high ingest rates that is what
//! keeps rollups cheap. A fold starts when a commit signals one and at least every
//! [`INTERVAL`], so an acknowledged event is in the rollups within about one fold's time.

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

/// Starts the folder.
pub fn spawn(storage: Storage, metrics: Arc<Metrics>, signal: Arc<FoldSignal>) -> JoinHandle<()> {
    tokio::spawn(async move {
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
            if stopping {
                return;
            }
            let _ = tokio::time::timeout(INTERVAL, signal.notify.notified()).await;
        }
    })
}
