//! The worker's checkpoint committer: a thread that writes checkpoints through a second handle
//! on the store while the worker resolves the next batches.
//!
//! Only stores that can have a second handle ([`StateStore::background_writer`], RocksDB)
//! get one; with others the worker commits on its own thread. The worker hands over one
//! checkpoint at a time and reads through it until the committer reports it written, so
//! the overlap changes nothing the worker reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use idgraph_engine::store::SendStore;
use idgraph_engine::{ErrorClass, PendingWrites, StoreError, WriteOp};

use crate::metrics::Metrics;

/// One checkpoint to write: the state changes of its batches and the deletion of their log
/// entries.
struct Job {
    pending: Arc<PendingWrites>,
    deletions: Vec<WriteOp>,
}

/// What a finished job reports: how long the write took, or why it failed.
pub type Written = Result<Duration, StoreError>;

pub struct Committer {
    jobs: Option<SyncSender<Job>>,
    written: Receiver<Written>,
    /// Set to make a write that keeps failing transiently give up (the worker is stopping).
    give_up: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts the thread, which owns `writer`; `metrics` counts its retries.
    pub fn start(mut writer: Box<dyn SendStore>, metrics: Metrics) -> Self {
        // One job at a time: the worker waits for a checkpoint before handing over the next.
        let (jobs, inbox) = std::sync::mpsc::sync_channel::<Job>(1);
        let (report, written) = std::sync::mpsc::channel();
        let give_up = Arc::new(AtomicBool::new(false));
        let giving_up = Arc::clone(&give_up);
        let thread = std::thread::Builder::new()
            .name("idgraph-committer".into())
            .spawn(move || {
                for job in inbox {
                    let started = Instant::now();
                    let extra: Vec<&WriteOp> = job.deletions.iter().collect();
                    let result = write_with_retry(
                        || giving_up.load(Ordering::SeqCst),
                        || {},
                        &metrics,
                        || job.pending.commit(&mut writer, &extra),
                    );
                    // Free the checkpoint here, where its memory is no longer read.
                    drop(job);
                    if report.send(result.map(|()| started.elapsed())).is_err() {
                        return;
                    }
                }
            })
            .expect("the committer thread starts");
        Committer {
            jobs: Some(jobs),
            written,
            give_up,
            thread: Some(thread),
        }
    }

    /// Hands over a checkpoint; the caller must have collected the previous one's report.
    pub fn submit(&self, pending: Arc<PendingWrites>, deletions: Vec<WriteOp>) {
        let sent = self
            .jobs
            .as_ref()
            .expect("jobs are submitted before the committer stops")
            .send(Job { pending, deletions });
        // The thread ends only when the channel closes, or if it panicked: `wait` reports it.
        let _ = sent;
    }

    /// The report of the checkpoint in hand, if it is written; `None` while it is not.
    pub fn try_written(&self) -> Option<Written> {
        match self.written.try_recv() {
            Ok(written) => Some(written),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(stopped())),
        }
    }

    /// Waits for the report of the checkpoint in hand. With `stop` set, a write that keeps
    /// failing transiently gives up, and its error is the report.
    pub fn wait(&self, stop: &AtomicBool) -> Written {
        loop {
            if stop.load(Ordering::SeqCst) {
                self.give_up.store(true, Ordering::SeqCst);
            }
            match self.written.recv_timeout(Duration::from_millis(200)) {
                Ok(written) => return written,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(stopped()),
            }
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.give_up.store(true, Ordering::SeqCst);
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Fatal("the checkpoint committer thread stopped unexpectedly".into())
}

/// Runs `write` until it succeeds, waiting out transient store failures (a busy or slow
/// disk) with backoff, until `give_up` says to stop; `on_retry` is told of each retry. A
/// fatal failure is returned at once. Both the committer thread and the worker (for its log
/// entries, and for checkpoints of a store without a second handle) write through it.
pub(crate) fn write_with_retry(
    give_up: impl Fn() -> bool,
    mut on_retry: impl FnMut(),
    metrics: &Metrics,
    mut write: impl FnMut() -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match write() {
            Err(error) if error.class() == ErrorClass::Transient && !give_up() => {
                on_retry();
                metrics.store_retries.inc();
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "state write failed; retrying the same write");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgraph_engine::{MemoryStore, StateRead, StateStore, Table, WriteSet};
    use std::sync::Mutex;

    /// A store shared with the test through a mutex, so the test can look at what the
    /// committer thread wrote.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<MemoryStore>>);

    impl StateRead for Shared {
        fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.lock().unwrap().get(table, key)
        }

        fn scan_prefix(
            &self,
            table: Table,
            prefix: &[u8],
        ) -> Result<idgraph_engine::store::Entries, StoreError> {
            self.0.lock().unwrap().scan_prefix(table, prefix)
        }
    }

    impl StateStore for Shared {
        fn write_ops(&mut self, ops: &[&WriteOp]) -> Result<(), StoreError> {
            self.0.lock().unwrap().write_ops(ops)
        }
    }

    #[test]
    fn a_submitted_checkpoint_is_written_with_its_deletions_and_reported() {
        let store = Shared::default();
        let mut logged = WriteSet::default();
        logged.put(Table::Meta, "log:1", "runs");
        store.0.lock().unwrap().write(&logged).unwrap();
        let committer = Committer::start(Box::new(store.clone()), Metrics::new());
        let mut changes = WriteSet::default();
        changes.put(Table::Nodes, "email\0a@b.co", "root");
        let deletions = vec![WriteOp::Delete {
            table: Table::Meta,
            key: b"log:1".to_vec(),
        }];
        committer.submit(Arc::new(PendingWrites::new(Arc::new(changes))), deletions);
        let stop = AtomicBool::new(false);
        assert!(committer.wait(&stop).is_ok());
        assert_eq!(
            store.get(Table::Nodes, b"email\0a@b.co").unwrap(),
            Some(b"root".to_vec())
        );
        assert_eq!(store.get(Table::Meta, b"log:1").unwrap(), None);
        assert!(committer.try_written().is_none(), "one report per job");
    }
}
