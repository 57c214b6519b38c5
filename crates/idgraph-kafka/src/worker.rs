//! The streaming worker: consume touchpoint topics in batches, resolve each batch, log its
//! input offsets, send its outputs while the next batch is resolved, and write the state
//! behind, in checkpoints.
//!
//! # Crash safety: checkpoints and the batch-range log
//!
//! A batch goes through three steps:
//!
//! 1. **Resolve**: the engine turns the batch and the state into state changes and output
//!    records. This is deterministic. The changes join the open checkpoint in memory
//!    ([`PendingWrites`]); later batches read through it. Meanwhile the worker has already
//!    taken what arrived of the next batch, without waiting, and a helper thread parses and
//!    normalizes it; a revocation in that poll drops the current batch's messages of those
//!    partitions as well, since they are not resolved yet.
//! 2. **Log**: one small RocksDB write stores the batch's messages as runs of offsets, in poll
//!    order ([`crate::batch_log`]).
//! 3. **Send**: a sender thread encodes the records and hands them to the idempotent
//!    producer ([`crate::sender`]). The worker does not wait for that or for the
//!    acknowledgements: it polls and resolves the next batch meanwhile, with at most
//!    `kafka.max_batches_in_flight` batches unacknowledged (then it waits).
//!
//! Every `kafka.checkpoint_interval` batches, and whenever the input goes quiet, the worker
//! waits until the broker has acknowledged every batch sent, then commits the checkpoint in
//! one atomic write: the state changes of its batches (each key once, at its last value), the
//! next input positions, and the deletion of those batches' log entries.
//!
//! After a crash, the restarted worker loads the last checkpoint, fetches the messages of
//! every logged batch again, resolves them in the same batches and sends their outputs
//! again; then it commits a checkpoint and consumes from there. Nothing is lost (a batch's
//! log entry goes only with the state that includes it, after its outputs were acknowledged),
//! and a consumer sees at most duplicate copies, byte-identical and with the same
//! idempotency key, that its idempotency-key check drops. A store left by a version that kept
//! an outbox of output records is emptied first, by sending those records as stored.
//!
//! When the broker fails some record of a batch, that batch and every later one still in
//! flight are sent again, in order, after the earlier sends have settled; so the newest
//! version of a profile is always the last one on its partition, which is what a compacted
//! topic keeps. On start and on every partition assignment, the worker seeks to the positions
//! of the batches it has resolved, which start from its stored ones, not to the group's
//! committed offsets.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idgraph_engine::{
    BatchOutcome, BatchStats, Engine, InputMessage, PendingWrites, PreparedMessage, QualityReport,
    ReadThrough, StateCache, StateStore, StoreError, Table, WriteOp, WriteSet,
};
use idgraph_model::{DeadLetter, InputCoordinates, RecordMeta};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::batch_log::{fetch_logged, log_key, number_of, LoggedBatch, BATCH_LOG_PREFIX};
use crate::client::client_config;
use crate::committer::{self, Committer};
use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;
use crate::gauges::{Assignment, FiguresSource, GaugeRefresher, Positions};
use crate::latency::LatencyHistogram;
use crate::metrics::Metrics;
use crate::readiness::{Readiness, STATISTICS_INTERVAL_MS};
use crate::rebalance::{LostPosition, WorkerContext};
use crate::sender::{InFlight, Resolved, Sender};
use crate::sink::{
    decode_outbox, max_record_bytes, DeliveryStatus, OutputSink, Refusal, WireRecord,
};

/// Key prefix of the outbox entries older versions kept in [`Table::Meta`] (a batch's output
/// records); the batch number follows, big-endian.
const OUTBOX_PREFIX: &[u8] = b"kafka_outbox:";

/// Left by versions before the outbox: the message list of a batch that was not committed.
const LEGACY_JOURNAL_KEY: &[u8] = b"kafka_batch_journal";

/// The delivery-tracking number of quality snapshots; batches count up from 1.
const QUALITY_BATCH: usize = usize::MAX;

/// How long one wait for acknowledgements lasts before the worker reports itself unready.
const STALL_SLICE: Duration = Duration::from_millis(500);

/// A polled batch: its messages, when each was polled, and, once a helper thread has
/// parsed and normalized them, the prepared messages.
struct Polled {
    messages: Vec<OwnedMessage>,
    polled_at: Vec<Instant>,
    prepared: Option<Vec<PreparedMessage>>,
}

impl Polled {
    /// Drops the messages of `revoked` partitions (and the preparation, which no longer
    /// matches).
    fn drop_partitions(&mut self, revoked: &[(String, i32)]) {
        if revoked.is_empty() {
            return;
        }
        let before = self.messages.len();
        let mut paired: Vec<(OwnedMessage, Instant)> = std::mem::take(&mut self.messages)
            .into_iter()
            .zip(std::mem::take(&mut self.polled_at))
            .collect();
        retain_unrevoked(&mut paired, revoked);
        if paired.len() != before {
            self.prepared = None;
        }
        (self.messages, self.polled_at) = paired.into_iter().unzip();
    }
}

/// Keeps the messages of `batch` whose partition is not in `revoked`.
fn retain_unrevoked<T>(batch: &mut Vec<(OwnedMessage, T)>, revoked: &[(String, i32)]) {
    batch.retain(|(message, _)| {
        !revoked
            .iter()
            .any(|(topic, partition)| topic == message.topic() && *partition == message.partition())
    });
}

/// What a worker has not finished: batches whose outputs the broker has not acknowledged, and
/// batches resolved since the last committed checkpoint. Both are in the batch log, so a
/// process that ends now (a stop past `kafka.shutdown_timeout_ms`, a crash) loses none of
/// them: the next start resolves and sends them again, identically.
#[derive(Debug, Default)]
pub struct ShutdownWatch {
    pub unacknowledged: AtomicUsize,
    pub since_checkpoint: AtomicUsize,
}

/// What a worker run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerSummary {
    pub batches: u64,
    pub messages: u64,
    /// Batches an earlier run logged but did not checkpoint, resolved and sent again at
    /// start (and outbox entries of older versions sent again).
    pub replayed_batches: u64,
    pub delivery_retries: u64,
    /// Output records refused for good, whose references went to the dead-letter topic.
    pub refused_records: u64,
    pub elapsed_secs: f64,
    /// From the first message polled to the last batch's outputs acknowledged: the time spent
    /// working.
    pub active_secs: f64,
    /// Milliseconds from a message being polled to its outputs being acknowledged.
    #[serde(skip)]
    pub poll_to_output_ms: LatencyHistogram,
    /// Milliseconds from a message's Kafka timestamp to its outputs being acknowledged.
    #[serde(skip)]
    pub timestamp_to_output_ms: LatencyHistogram,
    #[serde(skip)]
    pub stats: BatchStats,
}

/// How a run ends.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Stop once no message has arrived for this long and every assigned partition is read
    /// to its end (for tests, demos, backfills).
    pub exit_when_idle: Option<Duration>,
}

pub struct Worker<'e, S: StateStore> {
    engine: &'e Engine,
    store: S,
    cache: StateCache,
    config: KafkaConfig,
    consumer: BaseConsumer<WorkerContext>,
    sink: Arc<OutputSink>,
    /// Encodes and sends resolved batches on a thread of its own.
    sender: Option<Sender>,
    positions: Positions,
    revoked: Arc<Mutex<Vec<(String, i32)>>>,
    /// Partitions whose position was lost, to stop on (see [`WorkerContext::start_offset`]).
    lost: Arc<Mutex<Vec<LostPosition>>>,
    /// Why this worker must leave its group, if another member was found at start.
    shared_group: Arc<Mutex<Option<String>>>,
    assigned: Arc<AtomicBool>,
    assignment: Assignment,
    /// Where the gauge thread reads the store's figures, if anywhere.
    figures: Option<FiguresSource>,
    /// What `/readyz` says (see [`Readiness`]).
    readiness: Arc<Readiness>,
    /// What is left to do, for a stop that runs out of time (see [`ShutdownWatch`]).
    watch: Arc<ShutdownWatch>,
    summary: WorkerSummary,
    quality_sequence: u64,
    /// When the broker last acknowledged a whole batch.
    last_output: Option<Instant>,
    metrics: Metrics,
    /// Sent batches awaiting acknowledgement, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The state changes of the batches since the last checkpoint.
    open: PendingWrites,
    /// The last checkpoint, while the committer writes it.
    committing: Option<Arc<PendingWrites>>,
    /// Writes checkpoints on a thread of its own, if the store allows a second handle.
    committer: Option<Committer>,
    /// The numbers of those batches, whose log entries the checkpoint deletes.
    logged: Vec<usize>,
    next_batch: usize,
}

impl<'e, S: StateStore + Sync> Worker<'e, S> {
    /// Connects to the cluster and loads the stored input positions.
    pub fn new(
        engine: &'e Engine,
        store: S,
        config: KafkaConfig,
        cache_mb: usize,
        metrics: Metrics,
    ) -> Result<Self, KafkaWorkerError> {
        config.validate().map_err(KafkaWorkerError::Config)?;
        if config.topics.create {
            let setup = crate::topics::ensure_output_topics(
                &config,
                max_record_bytes(engine.config().dead_letter.max_message_bytes),
            )?;
            if !setup.created.is_empty() {
                tracing::info!(topics = ?setup.created, "created absent output topics");
            }
        }
        let positions: Positions = Arc::new(Mutex::new(load_positions(&store)?));
        let revoked = Arc::new(Mutex::new(Vec::new()));
        let assigned = Arc::new(AtomicBool::new(false));
        let assignment = Assignment::default();
        let lost = Arc::new(Mutex::new(Vec::new()));
        let readiness = Arc::new(Readiness::new(metrics.ready.clone()));
        let shared_group = Arc::new(Mutex::new(None));
        let context = WorkerContext {
            readiness: Arc::clone(&readiness),
            sources: config.sources.values().cloned().collect(),
            group_id: config.group_id.clone(),
            first_assignment_seen: AtomicBool::new(false),
            shared_group: Arc::clone(&shared_group),
            positions: Arc::clone(&positions),
            on_position_lost: config.on_position_lost,
            lost: Arc::clone(&lost),
            metrics: metrics.clone(),
            revoked: Arc::clone(&revoked),
            assigned: Arc::clone(&assigned),
            assignment: Arc::clone(&assignment),
        };
        let mut client = client_config(&config);
        if !config.group_instance_id.trim().is_empty() {
            client.set("group.instance.id", config.group_instance_id.trim());
        }
        let consumer: BaseConsumer<WorkerContext> = client
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string())
            .create_with_context(context)
            .map_err(KafkaWorkerError::kafka("create consumer"))?;
        let sink = Arc::new(OutputSink::new(
            &config,
            engine.config().dead_letter.max_message_bytes,
        )?);
        metrics.profile_identifier_limit.set(i64::from(
            engine.config().protection.max_profile_identifiers,
        ));
        Ok(Worker {
            engine,
            store,
            cache: StateCache::with_megabytes(cache_mb),
            config,
            consumer,
            sink,
            sender: None,
            positions,
            revoked,
            lost,
            shared_group,
            assigned,
            assignment,
            figures: None,
            readiness,
            watch: Arc::default(),
            summary: WorkerSummary::default(),
            quality_sequence: 0,
            last_output: None,
            metrics,
            in_flight: VecDeque::new(),
            open: PendingWrites::default(),
            committing: None,
            committer: None,
            logged: Vec::new(),
            next_batch: 1,
        })
    }

    /// Lets the gauge thread report the store's size, stalls and disk space through
    /// `figures` (a read handle on the store; the worker's own store stays on its thread).
    pub fn watch_store(
        &mut self,
        figures: impl Fn() -> idgraph_engine::StoreFigures + Send + 'static,
    ) {
        self.figures = Some(Box::new(figures));
    }

    /// True while the worker is consuming and its outputs are being acknowledged.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        self.readiness.flag()
    }

    /// What the worker has not finished, kept up to date while it runs and drains, for a
    /// caller that ends the process when a stop takes too long (`kafka.shutdown_timeout_ms`).
    pub fn shutdown_watch(&self) -> Arc<ShutdownWatch> {
        Arc::clone(&self.watch)
    }

    fn publish_progress(&self) {
        self.watch
            .unacknowledged
            .store(self.in_flight.len() + self.sending(), Ordering::Relaxed);
        self.watch
            .since_checkpoint
            .store(self.logged.len(), Ordering::Relaxed);
    }

    /// Replays what the last run logged after its last checkpoint, then consumes until `stop`
    /// is set (or the topics are idle, with `exit_when_idle`), waits for the last outputs and
    /// commits a last checkpoint.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        options: RunOptions,
    ) -> Result<WorkerSummary, KafkaWorkerError> {
        let started = Instant::now();
        if let Some(writer) = self.store.background_writer() {
            self.committer = Some(Committer::start(writer, self.metrics.clone()));
        }
        // Nothing is pending yet: the indexes are loaded from the store as it is.
        self.cache.preload(&self.store)?;
        self.recover_outbox(stop)?;
        self.replay_logged(stop)?;
        let topics: Vec<&str> = self.config.sources.values().map(String::as_str).collect();
        self.consumer
            .subscribe(&topics)
            .map_err(KafkaWorkerError::kafka("subscribe"))?;
        self.readiness.set_flowing(true);
        let _gauges = GaugeRefresher::start(
            &self.config,
            self.metrics.clone(),
            Arc::clone(&self.assignment),
            Arc::clone(&self.positions),
            self.figures.take(),
            Duration::from_secs(self.config.quality_interval_secs.clamp(1, 15)),
        )?;
        let mut last_message = Instant::now();
        let mut last_quality = Instant::now();
        let mut first_poll: Option<Instant> = None;
        let quality_every = Duration::from_secs(self.config.quality_interval_secs.max(1));
        // The next batch, polled (and prepared) while the last one was resolved.
        let mut ahead: Option<Polled> = None;
        let config = self.config.clone();
        while !stop.load(Ordering::SeqCst) {
            let current = match ahead.take() {
                Some(polled) => polled,
                None => self.poll_batch(stop, true).0,
            };
            self.stop_on_refused_assignment()?;
            if current.messages.is_empty() {
                // Quiet input: checkpoint now rather than leave batches for a restart to
                // replay.
                self.checkpoint(stop)?;
                if !self.assigned.load(Ordering::SeqCst) {
                    last_message = Instant::now();
                } else if options
                    .exit_when_idle
                    .is_some_and(|idle| last_message.elapsed() >= idle)
                {
                    // Quiet is not enough: during an outage nothing arrives either.
                    if self.caught_up() {
                        break;
                    }
                    last_message = Instant::now();
                }
            } else {
                last_message = Instant::now();
                first_poll.get_or_insert(current.polled_at[0]);
                // Take what has arrived of the next batch, without waiting, and prepare it
                // on a helper thread while this one resolves the current batch. A
                // revocation during that poll voids the current batch's messages of those
                // partitions too: they are not resolved yet.
                let (mut next, revoked) = self.poll_batch(stop, false);
                let mut current = current;
                current.drop_partitions(&revoked);
                let engine = self.engine;
                next.prepared = std::thread::scope(|scope| {
                    let helper = (!next.messages.is_empty())
                        .then(|| scope.spawn(|| prepare_messages(engine, &config, &next.messages)));
                    let processed = if current.messages.is_empty() {
                        Ok(())
                    } else {
                        self.process(current, stop)
                    };
                    let prepared = helper.map(|helper| {
                        helper
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    });
                    processed.map(|()| prepared)
                })?;
                // Nothing arrived yet: the next round waits for input as usual, and only a
                // wait that finds nothing counts as quiet.
                ahead = (!next.messages.is_empty()).then_some(next);
            }
            if last_quality.elapsed() >= quality_every {
                last_quality = Instant::now();
                self.publish_quality();
            }
        }
        self.checkpoint(stop)?;
        self.collect_checkpoint(Some(stop))?;
        self.committer = None;
        self.take_sent(true);
        self.sender = None;
        self.publish_quality();
        self.readiness.stop();
        self.summary.elapsed_secs = started.elapsed().as_secs_f64();
        if let (Some(first), Some(last)) = (first_poll, self.last_output) {
            self.summary.active_secs = (last - first).as_secs_f64();
        }
        Ok(self.summary.clone())
    }

    /// Fails when the first assignment found another live member in the group, or with the
    /// first partition whose position was found lost at assignment under
    /// `kafka.on_position_lost = "fail"` (what it concerns was left unassigned).
    fn stop_on_refused_assignment(&self) -> Result<(), KafkaWorkerError> {
        if let Some(refusal) = self.shared_group.lock().expect("shared group lock").take() {
            return Err(KafkaWorkerError::SharedGroup(refusal));
        }
        match self.lost.lock().expect("lost lock").first() {
            Some(lost) => Err(lost.clone().into()),
            None => Ok(()),
        }
    }

    /// Collects up to `batch_size` messages, waiting at most `batch_timeout_ms` for them, or,
    /// without `wait`, only those that have arrived already. Returns them with the partitions
    /// revoked meanwhile.
    fn poll_batch(&mut self, stop: &AtomicBool, wait: bool) -> (Polled, Vec<(String, i32)>) {
        let timeout = if wait {
            Duration::from_millis(self.config.batch_timeout_ms)
        } else {
            Duration::ZERO
        };
        let deadline = Instant::now() + timeout;
        let mut batch: Vec<(OwnedMessage, Instant)> = Vec::new();
        let mut revoked = Vec::new();
        while batch.len() < self.config.batch_size && !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if wait && now >= deadline {
                break;
            }
            let polled = self.consumer.poll(deadline.saturating_duration_since(now));
            // Rebalance callbacks run inside `poll`. A revocation voids what was collected
            // before it from those partitions (they may now belong to another worker); what
            // this poll returned comes after it, from a re-assignment that sought to the
            // stored position, and must be kept, or the consumer would read on past it.
            revoked.extend(self.drop_revoked(&mut batch));
            match polled {
                None if !wait => break,
                None => {}
                Some(Ok(message)) => {
                    let message = message.detach();
                    if !self.already_processed(&message) {
                        batch.push((message, Instant::now()));
                    }
                }
                Some(Err(error)) => {
                    // Broker trouble: report unready until the consumer's next statistics
                    // say otherwise, keep polling; librdkafka reconnects.
                    self.readiness.set_consumer_healthy(false);
                    tracing::warn!(%error, "consumer error");
                    std::thread::sleep(Duration::from_millis(100));
                    if !wait {
                        break;
                    }
                }
            }
        }
        let (messages, polled_at) = batch.into_iter().unzip();
        let polled = Polled {
            messages,
            polled_at,
            prepared: None,
        };
        (polled, revoked)
    }

    /// Drops the collected messages of partitions revoked since the last call, and returns
    /// those partitions.
    fn drop_revoked(&self, batch: &mut Vec<(OwnedMessage, Instant)>) -> Vec<(String, i32)> {
        let revoked = std::mem::take(&mut *self.revoked.lock().expect("revoked lock"));
        if !revoked.is_empty() {
            retain_unrevoked(batch, &revoked);
        }
        revoked
    }

    /// Whether every assigned partition has been processed up to its high watermark and all
    /// outputs are acknowledged (false when the broker cannot say).
    fn caught_up(&self) -> bool {
        let Ok(assignment) = self.consumer.assignment() else {
            return false;
        };
        // An outage can cost the worker its group membership; with no partitions it has not
        // caught up with anything.
        if assignment.count() == 0 || !self.in_flight.is_empty() || self.sending() > 0 {
            return false;
        }
        let positions = self.positions.lock().expect("positions lock").clone();
        assignment.elements().iter().all(|element| {
            let next = positions
                .get(&(element.topic().to_owned(), element.partition()))
                .copied()
                .unwrap_or(0);
            match self.consumer.fetch_watermarks(
                element.topic(),
                element.partition(),
                Duration::from_secs(2),
            ) {
                Ok((low, high)) => next >= high || high == low,
                Err(_) => false,
            }
        })
    }

    /// A message below the stored position was processed before (a re-delivery after a seek
    /// or a rebalance).
    fn already_processed(&self, message: &OwnedMessage) -> bool {
        let positions = self.positions.lock().expect("positions lock");
        positions
            .get(&(message.topic().to_owned(), message.partition()))
            .is_some_and(|next| message.offset() < *next)
    }

    /// Resolve, log, send (see the module documentation), and checkpoint every
    /// `checkpoint_interval` batches.
    fn process(&mut self, polled: Polled, stop: &AtomicBool) -> Result<(), KafkaWorkerError> {
        let Polled {
            messages: batch,
            polled_at,
            prepared,
        } = polled;
        let number = self.next_batch;
        self.next_batch += 1;
        let started = Instant::now();
        let outcome = self.resolve(&batch, prepared)?;
        let resolved = Instant::now();
        let entry = LoggedBatch::of(&batch).encode();
        self.write_with_retry(stop, |store| {
            let mut writes = WriteSet::default();
            writes.put(Table::Meta, log_key(number), entry.clone());
            store.write(&writes)
        })?;
        self.logged.push(number);
        let logged = Instant::now();
        self.send(number, &batch, outcome, polled_at);
        let phases = [("resolve", resolved - started), ("log", logged - resolved)];
        for (phase, took) in phases {
            self.metrics
                .batch_seconds
                .with_label_values(&[phase])
                .observe(took.as_secs_f64());
        }
        tracing::debug!(
            batch = number,
            messages = batch.len(),
            resolve_ms = (resolved - started).as_millis() as u64,
            log_ms = (logged - resolved).as_millis() as u64,
            "batch sent"
        );
        self.settle_window(stop)?;
        if self.open.batches() >= self.config.checkpoint_interval {
            self.checkpoint(stop)?;
        }
        Ok(())
    }

    /// Resolves `batch` against the state as of the batches before it (reading through the
    /// open checkpoint and the one being written), adds its changes to the open checkpoint
    /// and returns its outcome, profile records included.
    fn resolve(
        &mut self,
        batch: &[OwnedMessage],
        prepared: Option<Vec<PreparedMessage>>,
    ) -> Result<BatchOutcome, KafkaWorkerError> {
        for message in batch {
            let source = self.config.source_of(message.topic()).unwrap_or("custom");
            self.metrics
                .messages_consumed
                .with_label_values(&[source])
                .inc();
        }
        let prepared =
            prepared.unwrap_or_else(|| prepare_messages(self.engine, &self.config, batch));
        self.collect_checkpoint(None)?;
        let layers: Vec<&PendingWrites> = std::iter::once(&self.open)
            .chain(self.committing.as_deref())
            .collect();
        let view = ReadThrough {
            pending: &layers,
            store: &self.store,
        };
        // The cache runs ahead of the store: it holds the open checkpoint's profiles. If a
        // batch cannot be resolved the run stops, and the cache goes with it.
        let resolved = match self
            .engine
            .resolve_prepared(&view, &mut self.cache, prepared)
        {
            Ok(resolved) => resolved,
            Err(error) => {
                self.cache.clear();
                return Err(error.into());
            }
        };
        // The changed profiles stay in the cache, pinned, until the checkpoint takes them.
        self.cache.pin_customers(resolved.profile_ids());
        let mut outcome = resolved.outcome_with_profile_records();
        self.open.push(
            Arc::new(std::mem::take(&mut outcome.writes)),
            std::iter::empty(),
        );
        self.metrics
            .state_cache_bytes
            .set(self.cache.estimated_bytes() as i64);
        Ok(outcome)
    }

    /// Hands a resolved batch to the sender, which encodes and sends its records; the worker
    /// tracks them until they are acknowledged once the sender returns them.
    fn send(
        &mut self,
        number: usize,
        batch: &[OwnedMessage],
        mut outcome: BatchOutcome,
        polled_at: Vec<Instant>,
    ) {
        self.advance_positions(batch);
        self.metrics.record_batch(&outcome.stats);
        self.summary.batches += 1;
        self.summary.messages += batch.len() as u64;
        self.summary
            .stats
            .absorb(std::mem::take(&mut outcome.stats));
        let resolved = Resolved {
            batch: number,
            outcome,
            polled_at,
            timestamps_ms: batch
                .iter()
                .filter_map(|m| m.timestamp().to_millis())
                .collect(),
        };
        let sink = &self.sink;
        let metrics = &self.metrics;
        self.sender
            .get_or_insert_with(|| Sender::start(Arc::clone(sink), metrics.clone()))
            .submit(resolved);
    }

    /// Moves the batches the sender has sent into the in-flight queue: all of them with
    /// `all`, otherwise those it has finished.
    fn take_sent(&mut self, all: bool) {
        let Some(sender) = &mut self.sender else {
            return;
        };
        while let Some(sent) = sender.take_sent(all) {
            self.in_flight.push_back(sent);
        }
    }

    /// Batches handed to the sender and not yet back.
    fn sending(&self) -> usize {
        self.sender.as_ref().map_or(0, Sender::outstanding)
    }

    /// Waits while more than `max_batches_in_flight` batches await acknowledgement.
    fn settle_window(&mut self, stop: &AtomicBool) -> Result<(), KafkaWorkerError> {
        let waiting = Instant::now();
        self.settle(self.config.max_batches_in_flight, stop)?;
        self.metrics
            .batch_seconds
            .with_label_values(&["wait_for_acks"])
            .observe(waiting.elapsed().as_secs_f64());
        Ok(())
    }

    /// Waits for every sent batch to be acknowledged, then commits the open checkpoint: its
    /// state changes, positions and the deletion of its batches' log entries, in one write,
    /// on the committer's thread if there is one (the worker reads through it meanwhile).
    /// A log entry must not go before its batch's outputs are acknowledged: nothing could
    /// send them again after a crash. If `stop` cuts the wait short, the log keeps the
    /// batches for the next start.
    fn checkpoint(&mut self, stop: &AtomicBool) -> Result<(), KafkaWorkerError> {
        self.settle(0, stop)?;
        if self.open.is_empty() || !self.in_flight.is_empty() || self.sending() > 0 {
            return Ok(());
        }
        // One checkpoint is written at a time, so the worker reads through at most two.
        self.collect_checkpoint(Some(stop))?;
        let batches = self.open.batches();
        let pending = Arc::new(self.open.close(&mut self.cache));
        let deletions: Vec<WriteOp> = self
            .logged
            .drain(..)
            .map(|number| WriteOp::Delete {
                table: Table::Meta,
                key: log_key(number),
            })
            .collect();
        tracing::debug!(batches, "checkpoint closed");
        match &self.committer {
            Some(committer) => {
                committer.submit(Arc::clone(&pending), deletions);
                self.committing = Some(pending);
                Ok(())
            }
            None => {
                let started = Instant::now();
                let extra: Vec<&WriteOp> = deletions.iter().collect();
                self.write_with_retry(stop, |store| pending.commit(store, &extra))?;
                self.checkpoint_written(started.elapsed())
            }
        }
    }

    /// Takes the committer's report on the checkpoint it is writing, if there is one:
    /// waiting for it when given the run's `stop` flag, otherwise only if it is ready. A
    /// failed write ends the run; the next start goes on from the checkpoint before and
    /// replays the log.
    fn collect_checkpoint(&mut self, wait: Option<&AtomicBool>) -> Result<(), KafkaWorkerError> {
        let Some(committer) = &self.committer else {
            return Ok(());
        };
        if self.committing.is_none() {
            return Ok(());
        }
        let written = match wait {
            Some(stop) => committer.wait(stop),
            None => match committer.try_written() {
                Some(written) => written,
                None => return Ok(()),
            },
        };
        self.committing = None;
        match written {
            Ok(took) => self.checkpoint_written(took),
            Err(error) => {
                // The cache holds changes the store will not have.
                self.cache.clear();
                Err(error.into())
            }
        }
    }

    /// Lets the store expire what the new checkpoint's clock puts past the duplicate window,
    /// and reports the checkpoint.
    fn checkpoint_written(&mut self, took: Duration) -> Result<(), KafkaWorkerError> {
        self.engine.expire_old_records(&mut self.store)?;
        self.metrics
            .batch_seconds
            .with_label_values(&["checkpoint"])
            .observe(took.as_secs_f64());
        tracing::debug!(
            checkpoint_ms = took.as_millis() as u64,
            "checkpoint committed"
        );
        Ok(())
    }

    /// Resolves and sends again the batches the last run logged after its last checkpoint,
    /// exactly as they were cut, then commits a checkpoint.
    fn replay_logged(&mut self, stop: &AtomicBool) -> Result<(), KafkaWorkerError> {
        let mut batches = Vec::new();
        for (key, value) in self.store.scan_prefix(Table::Meta, BATCH_LOG_PREFIX)? {
            let number = number_of(&key).ok_or_else(|| {
                KafkaWorkerError::Replay(format!(
                    "unexpected batch log key {}",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            batches.push((number, LoggedBatch::decode(number, &value)?));
        }
        if batches.is_empty() {
            return Ok(());
        }
        tracing::info!(
            batches = batches.len(),
            "replaying the batches logged since the last checkpoint"
        );
        let fetched = fetch_logged(
            &self.config,
            &batches,
            Duration::from_millis(self.config.delivery_timeout_ms),
        )?;
        for ((number, _), messages) in batches.iter().zip(fetched) {
            let outcome = self.resolve(&messages, None)?;
            self.logged.push(*number);
            self.next_batch = self.next_batch.max(number + 1);
            self.send(*number, &messages, outcome, Vec::new());
            self.summary.replayed_batches += 1;
            self.metrics.replayed_batches.inc();
            tracing::debug!(batch = number, messages = messages.len(), "batch replayed");
            self.settle_window(stop)?;
        }
        self.checkpoint(stop)
    }

    /// Retires acknowledged batches and waits until at most `limit` remain in flight,
    /// sending failed ones again. With `stop` set it gives up after one delivery timeout: the
    /// batch log keeps what is left for the next start.
    fn settle(&mut self, limit: usize, stop: &AtomicBool) -> Result<(), KafkaWorkerError> {
        let mut backoff = Duration::from_millis(100);
        let patience = Duration::from_millis(self.config.delivery_timeout_ms);
        let started = Instant::now();
        loop {
            self.take_sent(false);
            self.retire_delivered();
            self.publish_progress();
            if self.in_flight.len() + self.sending() <= limit {
                return Ok(());
            }
            if self.in_flight.is_empty() {
                // Everything over the limit is still with the sender.
                self.take_sent(true);
                continue;
            }
            if stop.load(Ordering::SeqCst) && started.elapsed() > patience {
                tracing::warn!(
                    batches = self.in_flight.len() + self.sending(),
                    "stopping with unacknowledged outputs; the next start sends them again"
                );
                return Ok(());
            }
            let failed = self
                .in_flight
                .iter()
                .any(|b| self.sink.status(b.batch) == DeliveryStatus::Failed);
            if failed {
                // A re-send must not overtake a first send: take every batch back first.
                self.take_sent(true);
                self.resend_from_first_failure(&mut backoff, stop);
                continue;
            }
            let oldest = self
                .in_flight
                .front()
                .expect("more than limit in flight")
                .batch;
            if self.sink.wait(oldest, STALL_SLICE) == DeliveryStatus::InFlight {
                // Acknowledgements are overdue: the broker is slow or away. Report it long
                // before the delivery timeout decides anything.
                self.readiness.set_flowing(false);
            }
        }
    }

    /// Takes fully acknowledged batches off the front of the queue, in batch order. A batch
    /// with records refused for good first sends the dead letters that reference them, under
    /// its own number, and retires once those are acknowledged.
    fn retire_delivered(&mut self) {
        while let Some(front) = self.in_flight.front() {
            if self.sink.status(front.batch) != DeliveryStatus::Delivered {
                break;
            }
            let refusals = self.sink.take_refusals(front.batch);
            if !refusals.is_empty() && self.report_refusals(refusals) {
                break;
            }
            let done = self.in_flight.pop_front().expect("front exists");
            self.sink.forget(done.batch);
            let now = Instant::now();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            for polled in &done.polled_at {
                let took = (now - *polled).as_secs_f64();
                self.metrics.poll_to_output_seconds.observe(took);
                self.summary.poll_to_output_ms.record(took * 1000.0);
            }
            for timestamp in &done.timestamps_ms {
                let took_ms = (now_ms - timestamp).max(0);
                self.metrics
                    .timestamp_to_output_seconds
                    .observe(took_ms as f64 / 1000.0);
                self.summary.timestamp_to_output_ms.record(took_ms as f64);
            }
            self.last_output = Some(now);
            self.readiness.set_flowing(true);
        }
    }

    /// Counts the front batch's refused records and, unless they are its dead letters already,
    /// sends the dead letters that reference them in their place. Returns whether it sent
    /// any (the batch then waits for them).
    fn report_refusals(&mut self, refusals: Vec<Refusal>) -> bool {
        let topics = self.sink.topics().clone();
        let front = self.in_flight.front_mut().expect("a front batch");
        self.summary.refused_records += refusals.len() as u64;
        for refusal in &refusals {
            let record = &front.records[refusal.index];
            let output = topics.output_of(&record.topic);
            self.metrics.record_refusal(output, refusal.reason.as_str());
            tracing::error!(
                batch = front.batch,
                output,
                topic = %record.topic,
                input = %record.input,
                bytes = record.payload.len(),
                reason = refusal.reason.as_str(),
                error = %refusal.error,
                "an output record was refused for good; {}",
                if front.reporting_refusals {
                    "it was the dead letter of another refused record, which is now lost"
                } else {
                    "its reference goes to the dead-letter topic"
                }
            );
        }
        if front.reporting_refusals {
            return false;
        }
        let references: Vec<WireRecord> = refusals
            .iter()
            .map(|refusal| {
                undeliverable_letter(&front.records[refusal.index], refusal, &topics, self.engine)
            })
            .collect();
        front.records = references;
        front.reporting_refusals = true;
        self.sink.enqueue(front.batch, &front.records);
        true
    }

    /// Waits until no send of the window is pending, then sends the first failed batch and
    /// every later one again, in order, so the newest version of each key arrives last.
    fn resend_from_first_failure(&mut self, backoff: &mut Duration, stop: &AtomicBool) {
        self.readiness.set_flowing(false);
        for batch in self.in_flight.iter().map(|b| b.batch) {
            while self.sink.wait(batch, STALL_SLICE) == DeliveryStatus::InFlight {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
        }
        let Some(first_failed) = self
            .in_flight
            .iter()
            .position(|b| self.sink.status(b.batch) == DeliveryStatus::Failed)
        else {
            return;
        };
        self.summary.delivery_retries += 1;
        self.metrics.delivery_retries.inc();
        tracing::warn!(
            last_error = ?self.sink.last_error(),
            batches = self.in_flight.len() - first_failed,
            retry_in_ms = backoff.as_millis() as u64,
            "outputs not delivered; sending the failed batch and the later ones again"
        );
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        for flight in self.in_flight.iter().skip(first_failed) {
            self.sink.enqueue(flight.batch, &flight.records);
        }
    }

    /// Runs `write` until it succeeds, waiting out transient store failures (a busy or slow
    /// disk): the worker reports unready and consumes nothing meanwhile. A fatal failure, or
    /// `stop`, ends the run; the next start resumes from the last write that succeeded.
    fn write_with_retry(
        &mut self,
        stop: &AtomicBool,
        mut write: impl FnMut(&mut S) -> Result<(), StoreError>,
    ) -> Result<(), KafkaWorkerError> {
        let store = &mut self.store;
        let (readiness, metrics) = (&self.readiness, &self.metrics);
        let mut failed = false;
        committer::write_with_retry(
            || stop.load(Ordering::SeqCst),
            || {
                // Nothing is consumed meanwhile, so nothing goes past what is durable.
                failed = true;
                readiness.set_flowing(false);
            },
            metrics,
            || write(store),
        )?;
        if failed {
            readiness.set_flowing(true);
        }
        Ok(())
    }

    /// Records the positions after a resolved batch, where a re-assigned partition resumes,
    /// and commits them to the consumer group (for lag only: the state's are authoritative).
    fn advance_positions(&mut self, batch: &[OwnedMessage]) {
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        for message in batch {
            let entry = next
                .entry((message.topic().to_owned(), message.partition()))
                .or_insert(0);
            *entry = (*entry).max(message.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        let mut positions = self.positions.lock().expect("positions lock");
        for ((topic, partition), offset) in next {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset));
            positions.insert((topic, partition), offset);
        }
        drop(positions);
        if let Err(error) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "group offset commit failed; stored positions are authoritative");
        }
    }

    /// Sends the outbox entries a run of an older version left (batches committed but not
    /// known to be acknowledged), in batch order and byte for byte, waits for all of them and
    /// deletes them.
    fn recover_outbox(&mut self, stop: &AtomicBool) -> Result<(), KafkaWorkerError> {
        if self.store.get(Table::Meta, LEGACY_JOURNAL_KEY)?.is_some() {
            // Its batch was never committed, so the stored positions read it again.
            tracing::warn!("removing a batch journal left by an older version; its messages are read again from the stored positions");
            let mut writes = WriteSet::default();
            writes.delete(Table::Meta, LEGACY_JOURNAL_KEY);
            self.store.write(&writes)?;
        }
        let mut sent = WriteSet::default();
        for (key, value) in self.store.scan_prefix(Table::Meta, OUTBOX_PREFIX)? {
            let number = key
                .strip_prefix(OUTBOX_PREFIX)
                .and_then(|n| <[u8; 8]>::try_from(n).ok())
                .map(|n| u64::from_be_bytes(n) as usize)
                .ok_or_else(|| {
                    KafkaWorkerError::Outbox(format!(
                        "unexpected outbox key {}",
                        String::from_utf8_lossy(&key)
                    ))
                })?;
            let records = decode_outbox(&value).map_err(|e| {
                KafkaWorkerError::Outbox(format!("outbox entry of batch {number}: {e}"))
            })?;
            sent.delete(Table::Meta, key);
            self.sink.enqueue(number, &records);
            self.in_flight.push_back(InFlight {
                batch: number,
                records,
                polled_at: Vec::new(),
                timestamps_ms: Vec::new(),
                reporting_refusals: false,
            });
            self.next_batch = self.next_batch.max(number + 1);
            self.summary.replayed_batches += 1;
            self.metrics.replayed_batches.inc();
        }
        if !self.in_flight.is_empty() {
            tracing::info!(
                batches = self.in_flight.len(),
                "sending the outputs the last run had not seen acknowledged"
            );
            self.settle(0, stop)?;
            if self.in_flight.is_empty() {
                self.store.write(&sent)?;
            }
        }
        Ok(())
    }

    /// Sends one data-quality snapshot per source to the quality topic; a failure is logged,
    /// not fatal, because the next snapshot supersedes it.
    fn publish_quality(&mut self) {
        let report = QualityReport::from_stats(&self.summary.stats);
        self.quality_sequence += 1;
        for source in report.events.keys() {
            let snapshot = SourceQuality::of(&report, source);
            let meta = RecordMeta {
                input: InputCoordinates::File {
                    file: "quality-snapshot".into(),
                    line: self.quality_sequence,
                },
                idempotency_key: format!("quality:{source}:{}", self.quality_sequence),
            };
            if let Err(error) = self.sink.send_one(
                QUALITY_BATCH,
                &self.config.outputs.quality,
                source,
                &meta,
                &snapshot,
            ) {
                tracing::warn!(%error, "quality snapshot not delivered");
            }
        }
    }
}

/// Parses and normalizes a batch's messages ([`Engine::prepare`]): the part of resolving that
/// needs no state, so the worker runs it for the next batch on a helper thread.
fn prepare_messages(
    engine: &Engine,
    config: &KafkaConfig,
    batch: &[OwnedMessage],
) -> Vec<PreparedMessage> {
    // One shared name per topic: every output record of the batch carries it.
    let mut topic_names: Vec<Arc<str>> = Vec::new();
    batch
        .iter()
        .map(|message| {
            let topic = match topic_names.iter().find(|t| &t[..] == message.topic()) {
                Some(topic) => Arc::clone(topic),
                None => {
                    let topic: Arc<str> = Arc::from(message.topic());
                    topic_names.push(Arc::clone(&topic));
                    topic
                }
            };
            let coordinates = InputCoordinates::Kafka {
                topic,
                partition: message.partition(),
                offset: message.offset(),
            };
            engine.prepare(&InputMessage {
                coordinates: &coordinates,
                payload: message.payload().unwrap_or_default(),
                default_source: config.source_of(message.topic()).unwrap_or("custom"),
            })
        })
        .collect()
}

/// The dead letter sent in place of `record`, which the broker refused for good: a reference
/// to it (its output topic and the first bytes of its payload) under the input coordinates and
/// idempotency key of the message it came from.
fn undeliverable_letter(
    record: &WireRecord,
    refusal: &Refusal,
    topics: &crate::config::OutputTopics,
    engine: &Engine,
) -> WireRecord {
    let input =
        InputCoordinates::parse_display(&record.input).unwrap_or_else(|| InputCoordinates::File {
            file: record.input.as_str().into(),
            line: 0,
        });
    let meta = RecordMeta {
        input,
        idempotency_key: record.idempotency_key.clone(),
    };
    let reason = format!(
        "the {} record of {} bytes was refused for good ({}): {}",
        topics.output_of(&record.topic),
        record.payload.len(),
        refusal.reason.as_str(),
        refusal.error
    );
    let letter = DeadLetter::undeliverable(
        &record.topic,
        &record.payload,
        reason,
        engine.config().dead_letter.max_payload_bytes,
        engine.processor_version(),
        meta,
    );
    WireRecord::of(&topics.dead_letter, &record.input, &letter.meta, &letter)
}

/// The quality figures of one source (README, Operations), as sent on the quality topic.
#[derive(Debug, Serialize)]
struct SourceQuality<'a> {
    schema_version: u32,
    source: &'a str,
    events: u64,
    no_identifier_share: f64,
    match_rate: f64,
    trait_completeness: Option<&'a std::collections::BTreeMap<String, f64>>,
    /// Worker-wide figures, repeated on every source's record.
    invalid_identifiers: &'a std::collections::BTreeMap<String, u64>,
    blocked_identifiers: &'a std::collections::BTreeMap<String, u64>,
    dead_letters: &'a std::collections::BTreeMap<String, u64>,
}

impl<'a> SourceQuality<'a> {
    fn of(report: &'a QualityReport, source: &'a str) -> Self {
        SourceQuality {
            schema_version: report.schema_version,
            source,
            events: report.events.get(source).copied().unwrap_or(0),
            no_identifier_share: report
                .no_identifier_share
                .get(source)
                .copied()
                .unwrap_or(0.0),
            match_rate: report.match_rate.get(source).copied().unwrap_or(0.0),
            trait_completeness: report.trait_completeness.get(source),
            invalid_identifiers: &report.invalid_identifiers,
            blocked_identifiers: &report.blocked_identifiers,
            dead_letters: &report.dead_letters,
        }
    }
}

/// The stored next offsets, from the `kafka:topic:partition` entries of [`Table::Positions`].
fn load_positions<S: StateStore>(
    store: &S,
) -> Result<HashMap<(String, i32), i64>, KafkaWorkerError> {
    let mut positions = HashMap::new();
    for (key, value) in store.scan_prefix(Table::Positions, b"kafka:")? {
        let key = String::from_utf8_lossy(&key).into_owned();
        let value = String::from_utf8_lossy(&value).into_owned();
        let parsed = key
            .strip_prefix("kafka:")
            .and_then(|rest| rest.rsplit_once(':'))
            .and_then(|(topic, partition)| Some((topic.to_owned(), partition.parse::<i32>().ok()?)))
            .zip(value.parse::<i64>().ok());
        match parsed {
            Some((topic_partition, next)) => {
                positions.insert(topic_partition, next);
            }
            None => tracing::warn!(%key, %value, "ignoring an unreadable stored position"),
        }
    }
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, partition: i32, offset: i64) -> (OwnedMessage, u32) {
        (
            crate::batch_log::tests::message(topic, partition, offset),
            0,
        )
    }

    fn positions(batch: &[(OwnedMessage, u32)]) -> Vec<(String, i32, i64)> {
        batch
            .iter()
            .map(|(m, _)| (m.topic().to_owned(), m.partition(), m.offset()))
            .collect()
    }

    #[test]
    fn a_batch_polled_ahead_loses_its_revoked_messages_and_its_stale_preparation() {
        let messages: Vec<OwnedMessage> = [("web", 0, 7), ("web", 1, 3), ("web", 0, 8)]
            .into_iter()
            .map(|(topic, partition, offset)| message(topic, partition, offset).0)
            .collect();
        let polled_at = vec![Instant::now(); 3];
        let mut polled = Polled {
            messages,
            polled_at,
            prepared: Some(Vec::new()),
        };
        polled.drop_partitions(&[("mobile".to_owned(), 0)]);
        assert_eq!(polled.messages.len(), 3);
        assert!(
            polled.prepared.is_some(),
            "nothing dropped, nothing to redo"
        );
        polled.drop_partitions(&[("web".to_owned(), 0)]);
        let left: Vec<(i32, i64)> = polled
            .messages
            .iter()
            .map(|m| (m.partition(), m.offset()))
            .collect();
        assert_eq!(left, vec![(1, 3)]);
        assert_eq!(polled.polled_at.len(), 1);
        assert!(
            polled.prepared.is_none(),
            "the preparation no longer matches the messages"
        );
    }

    #[test]
    fn a_revocation_drops_only_the_revoked_partitions_messages() {
        let mut batch = vec![
            message("web", 0, 300),
            message("web", 1, 17),
            message("mobile", 0, 5),
            message("web", 0, 301),
        ];
        retain_unrevoked(&mut batch, &[("web".to_owned(), 0)]);
        assert_eq!(
            positions(&batch),
            vec![("web".into(), 1, 17), ("mobile".into(), 0, 5)]
        );
    }
}
