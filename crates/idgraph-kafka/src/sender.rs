//! The worker's sender: a thread that encodes each resolved batch's output records and hands
//! them to the producer, while the worker polls and resolves the next batch.
//!
//! Batches are sent in the order they are handed over, by one thread, so the producer sees
//! them in batch order. The worker tracks a batch's delivery only once the sender has
//! returned it ([`InFlight`]); before it sends any batch again it takes back every batch
//! handed over, so a re-send never overtakes a first send.

use std::sync::mpsc::{Receiver, Sender as ChannelSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use idgraph_engine::BatchOutcome;

use crate::metrics::Metrics;
use crate::sink::{wire_records, OutputSink, WireRecord};

/// A sent batch whose outputs the broker has not fully acknowledged yet.
pub struct InFlight {
    pub batch: usize,
    /// Kept to send again if delivery fails.
    pub records: Vec<WireRecord>,
    /// When each of its messages was polled, and each message's Kafka timestamp (ms).
    pub polled_at: Vec<Instant>,
    pub timestamps_ms: Vec<i64>,
    /// Set once some records were refused for good and `records` became the dead letters
    /// that reference them.
    pub reporting_refusals: bool,
}

/// A resolved batch to send.
pub struct Resolved {
    pub batch: usize,
    pub outcome: BatchOutcome,
    pub polled_at: Vec<Instant>,
    pub timestamps_ms: Vec<i64>,
}

pub struct Sender {
    jobs: Option<ChannelSender<Resolved>>,
    sent: Receiver<InFlight>,
    /// Batches handed over and not yet returned.
    outstanding: usize,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    pub fn start(sink: Arc<OutputSink>, metrics: Metrics) -> Self {
        let (jobs, inbox) = std::sync::mpsc::channel::<Resolved>();
        let (report, sent) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("idgraph-sender".into())
            .spawn(move || {
                for resolved in inbox {
                    let started = Instant::now();
                    let records = wire_records(&resolved.outcome, sink.topics());
                    // Free the outcome here, where it was last read.
                    drop(resolved.outcome);
                    sink.enqueue(resolved.batch, &records);
                    metrics
                        .batch_seconds
                        .with_label_values(&["send"])
                        .observe(started.elapsed().as_secs_f64());
                    let in_flight = InFlight {
                        batch: resolved.batch,
                        records,
                        polled_at: resolved.polled_at,
                        timestamps_ms: resolved.timestamps_ms,
                        reporting_refusals: false,
                    };
                    if report.send(in_flight).is_err() {
                        return;
                    }
                }
            })
            .expect("the sender thread starts");
        Sender {
            jobs: Some(jobs),
            sent,
            outstanding: 0,
            thread: Some(thread),
        }
    }

    /// Hands a resolved batch over for sending.
    pub fn submit(&mut self, resolved: Resolved) {
        let jobs = self.jobs.as_ref().expect("the sender runs until dropped");
        // A closed channel means the thread panicked; `take_sent` reports it.
        if jobs.send(resolved).is_ok() {
            self.outstanding += 1;
        }
    }

    /// Batches handed over and not yet taken back.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The next sent batch, in hand-over order: waiting for it with `block`, otherwise only
    /// if it is ready. `None` when none is outstanding (or ready).
    pub fn take_sent(&mut self, block: bool) -> Option<InFlight> {
        if self.outstanding == 0 {
            return None;
        }
        let sent = if block {
            self.sent.recv().ok()
        } else {
            match self.sent.try_recv() {
                Ok(sent) => Some(sent),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => None,
            }
        };
        match sent {
            Some(sent) => {
                self.outstanding -= 1;
                Some(sent)
            }
            None if block => panic!("the sender thread stopped with batches outstanding"),
            None => None,
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
