//! Group commit. Requests hand their validated events to [`Writer::write`] and await a oneshot
//! that fires after COMMIT; committer tasks take every batch queued while the previous commit
//! ran and write them in one transaction, so concurrent batches share one commit (one fsync).
//!
//! Queued work is bounded in events, not batches: a semaphore holds one permit per queued event
//! and a batch that cannot get its permits at once is refused with 503 + `Retry-After` rather
//! than queued without bound.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tollgate_core::event::UsageEvent;
use uuid::Uuid;

use crate::db::{DbError, Storage};
use crate::metrics::Metrics;
use crate::rollup_worker::{self, FoldSignal};

/// Why a batch was not committed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The queue is full: come back later.
    #[error("write queue full")]
    Overloaded,
    /// The collector is shutting down.
    #[error("collector is shutting down")]
    ShuttingDown,
    /// The transaction failed; nothing of the batch was committed.
    #[error("database: {0}")]
    Database(String),
}

/// Per event of a batch: newly stored (true) or a duplicate (false).
pub type Ack = Result<Vec<bool>, WriteError>;

struct Job {
    events: Vec<UsageEvent>,
    reply: oneshot::Sender<Ack>,
    _permit: OwnedSemaphorePermit,
}

/// The handle requests submit batches through.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Job>,
    permits: Arc<Semaphore>,
    capacity: usize,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} events)", self.events.len())
    }
}

impl Writer {
    /// Starts `committers` committer tasks (1 for SQLite, whose writes serialise anyway; 2 or
    /// more let PostgreSQL overlap one group's COPY with another's commit) and the rollup
    /// folder. The join handle completes once every [`Writer`] clone is dropped, the queue is
    /// drained and the last events are folded. `rolled` names the custom dimensions the
    /// rollups keep.
    pub fn spawn(
        storage: Storage,
        metrics: Arc<Metrics>,
        max_queued_events: usize,
        max_group_events: usize,
        committers: usize,
        rolled: Vec<String>,
    ) -> (Self, JoinHandle<()>) {
        let rolled: Arc<[String]> = rolled.into();
        let signal = Arc::new(FoldSignal::default());
        let folder = rollup_worker::spawn(storage.clone(), metrics.clone(), signal.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        let tasks: Vec<JoinHandle<()>> = (0..committers.max(1))
            .map(|_| {
                tokio::spawn(committer(
                    rx.clone(),
                    storage.clone(),
                    metrics.clone(),
                    signal.clone(),
                    max_group_events,
                    rolled.clone(),
                ))
            })
            .collect();
        // Once every committer is done, fold what is left and stop the folder.
        let handle = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
            signal.stop();
            let _ = folder.await;
        });
        (
            Self {
                tx,
                permits: Arc::new(Semaphore::new(max_queued_events)),
                capacity: max_queued_events,
            },
            handle,
        )
    }

    /// Queues a batch and waits for its commit.
    pub async fn write(&self, events: Vec<UsageEvent>) -> Ack {
        // A batch larger than the whole queue could never be admitted.
        let n = u32::try_from(events.len()).map_err(|_| WriteError::Overloaded)?;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| WriteError::Overloaded)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                events,
                reply,
                _permit: permit,
            })
            .map_err(|_| WriteError::ShuttingDown)?;
        rx.await.map_err(|_| WriteError::ShuttingDown)?
    }

    /// Events queued and not yet committed.
    pub fn queued_events(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }
}

async fn committer(
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    storage: Storage,
    metrics: Arc<Metrics>,
    signal: Arc<FoldSignal>,
    max_group_events: usize,
    rolled: Arc<[String]>,
) {
    loop {
        let jobs = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut n = first.events.len();
            let mut jobs = vec![first];
            while n < max_group_events {
                match rx.try_recv() {
                    Ok(job) => {
                        n += job.events.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            jobs
        };
        commit(&storage, &metrics, jobs, &rolled).await;
        signal.poke();
    }
}

fn is_retryable(e: &DbError) -> bool {
    // Deadlock between replicas locking rollup rows, or a serialization failure.
    matches!(e, DbError::Sqlx(sqlx::Error::Database(d))
        if matches!(d.code().as_deref(), Some("40P01") | Some("40001")))
}

async fn commit(storage: &Storage, metrics: &Metrics, jobs: Vec<Job>, rolled: &[String]) {
    let started = Instant::now();
    // Within the group the first occurrence of an id is the one written; later ones are
    // duplicates without asking the database.
    let mut first_seen: HashMap<Uuid, ()> = HashMap::new();
    let mut unique: Vec<UsageEvent> = Vec::new();
    let mut slots: Vec<Vec<Option<usize>>> = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut slot = Vec::with_capacity(job.events.len());
        for e in job.events {
            if first_seen.insert(e.id, ()).is_none() {
                slot.push(Some(unique.len()));
                unique.push(e);
            } else {
                slot.push(None);
            }
        }
        slots.push(slot);
        replies.push((job.reply, job._permit));
    }
    let mut attempt = 0;
    let result = loop {
        match storage.write_events(&unique, Utc::now(), rolled).await {
            Err(e) if attempt < 3 && is_retryable(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
            }
            other => break other,
        }
    };
    metrics.observe_commit(started.elapsed(), unique.len());
    match result {
        Ok(inserted) => {
            for (slot, (reply, permit)) in slots.into_iter().zip(replies) {
                let acks = slot
                    .into_iter()
                    .map(|i| i.is_some_and(|i| inserted[i]))
                    .collect();
                drop(permit);
                let _ = reply.send(Ok(acks));
            }
        }
        Err(e) => {
            metrics.db_error();
            tracing::error!(error = %e, events = unique.len(), "group commit failed");
            for (reply, _permit) in replies {
                let _ = reply.send(Err(WriteError::Database(e.to_string())));
            }
        }
    }
}
