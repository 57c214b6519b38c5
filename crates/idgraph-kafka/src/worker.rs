//! The streaming worker: consume touchpoint topics in batches, resolve each batch, produce its
//! records, then commit state and input positions together.
//!
//! # Crash safety
//!
//! A batch goes through four steps:
//!
//! 1. **Journal**: the exact list of its messages (topic, partition, offset, in processing
//!    order) is written to the state store.
//! 2. **Resolve**: the engine turns the batch and the stored state into a write set and output
//!    records. This is deterministic.
//! 3. **Produce**: every record is sent and acknowledged by the broker (idempotent producer).
//! 4. **Commit**: one atomic write holds the graph changes, the next input positions and the
//!    removal of the journal. Consumer-group offsets are committed after it, for lag
//!    monitoring only.
//!
//! After a crash before step 4, the restarted worker finds the journal, reads exactly those
//! messages again, resolves them against the same stored state and so produces byte-identical
//! records with the same idempotency keys; then it commits and goes on. Nothing is lost (state
//! and positions only move together), and a consumer sees at most duplicate copies that its
//! idempotency-key check drops. On start and on every partition assignment, the worker seeks
//! to the positions in its own store, not to the group's committed offsets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idgraph_engine::{
    BatchOutcome, BatchStats, Engine, InputMessage, QualityReport, StateCache, StateStore, Table,
    WriteSet,
};
use idgraph_model::{InputCoordinates, RecordMeta};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};

use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;
use crate::metrics::Metrics;
use crate::sink::{client_config, OutputSink};

/// The key of the batch journal in [`Table::Meta`].
const JOURNAL_KEY: &[u8] = b"kafka_batch_journal";

/// Next offset to read, per (topic, partition), as stored with the state.
type Positions = Arc<Mutex<HashMap<(String, i32), i64>>>;

/// Seeks newly assigned partitions to the stored positions and notes revoked ones.
struct WorkerContext {
    positions: Positions,
    revoked: Arc<Mutex<Vec<(String, i32)>>>,
    /// Set once the group has given this worker its partitions; idleness counts from then.
    assigned: Arc<AtomicBool>,
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let positions = self.positions.lock().expect("positions lock");
                let assigned: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                for (topic, partition) in &assigned {
                    // The state decides where to read: a partition it has never seen is read
                    // from the beginning, whatever the group committed for another state.
                    let offset = match positions.get(&(topic.clone(), *partition)) {
                        Some(next) => Offset::Offset(*next),
                        None => Offset::Beginning,
                    };
                    let _ = tpl.set_partition_offset(topic, *partition, offset);
                }
                tracing::info!(
                    partitions = assigned.len(),
                    "partitions assigned; seeking to stored positions"
                );
                self.assigned.store(true, Ordering::SeqCst);
                if let Err(error) = consumer.assign(tpl) {
                    tracing::error!(%error, "cannot take the assigned partitions");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Messages of these partitions that are polled but not committed are dropped by
                // the loop; they stay after this state's stored position, so nothing is lost.
                let mut revoked = self.revoked.lock().expect("revoked lock");
                revoked.extend(
                    tpl.elements()
                        .iter()
                        .map(|e| (e.topic().to_owned(), e.partition())),
                );
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, "cannot release revoked partitions");
                }
            }
            other => tracing::error!(error = ?other, "rebalance failed"),
        }
    }
}

/// The messages of a batch in processing order; what a restart replays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Journal {
    messages: Vec<(String, i32, i64)>,
}

/// What a worker run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerSummary {
    pub batches: u64,
    pub messages: u64,
    pub replayed_batches: u64,
    pub delivery_retries: u64,
    pub elapsed_secs: f64,
    /// From the first message polled to the last batch committed: the time spent working.
    pub active_secs: f64,
    /// Per message, milliseconds from being polled to its batch being committed.
    #[serde(skip)]
    pub poll_to_commit_ms: Vec<f32>,
    /// Per message, milliseconds from the broker's append time to its batch's commit.
    #[serde(skip)]
    pub append_to_commit_ms: Vec<f32>,
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
    sink: OutputSink,
    positions: Positions,
    revoked: Arc<Mutex<Vec<(String, i32)>>>,
    assigned: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    summary: WorkerSummary,
    quality_sequence: u64,
    last_commit: Option<Instant>,
    metrics: Metrics,
}

impl<'e, S: StateStore> Worker<'e, S> {
    /// Connects to the cluster and loads the stored input positions.
    pub fn new(
        engine: &'e Engine,
        store: S,
        config: KafkaConfig,
        cache_entries: usize,
        metrics: Metrics,
    ) -> Result<Self, KafkaWorkerError> {
        config.validate().map_err(KafkaWorkerError::Config)?;
        let positions: Positions = Arc::new(Mutex::new(load_positions(&store)?));
        let revoked = Arc::new(Mutex::new(Vec::new()));
        let assigned = Arc::new(AtomicBool::new(false));
        let context = WorkerContext {
            positions: Arc::clone(&positions),
            revoked: Arc::clone(&revoked),
            assigned: Arc::clone(&assigned),
        };
        let consumer: BaseConsumer<WorkerContext> = client_config(&config)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("enable.partition.eof", "false")
            .create_with_context(context)
            .map_err(KafkaWorkerError::kafka("create consumer"))?;
        let sink = OutputSink::new(&config)?;
        Ok(Worker {
            engine,
            store,
            cache: StateCache::new(cache_entries),
            config,
            consumer,
            sink,
            positions,
            revoked,
            assigned,
            ready: Arc::new(AtomicBool::new(false)),
            summary: WorkerSummary::default(),
            quality_sequence: 0,
            last_commit: None,
            metrics,
        })
    }

    /// True while the worker is consuming and its outputs are being acknowledged.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ready)
    }

    /// Replays a journaled batch if the last run stopped inside one, then consumes until
    /// `stop` is set (or the topics are idle, with `exit_when_idle`).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        options: RunOptions,
    ) -> Result<WorkerSummary, KafkaWorkerError> {
        let started = Instant::now();
        self.replay_journal(stop)?;
        let topics: Vec<&str> = self.config.sources.values().map(String::as_str).collect();
        self.consumer
            .subscribe(&topics)
            .map_err(KafkaWorkerError::kafka("subscribe"))?;
        self.set_ready(true);
        let mut last_message = Instant::now();
        let mut last_quality = Instant::now();
        let mut first_poll: Option<Instant> = None;
        let quality_every = Duration::from_secs(self.config.quality_interval_secs.max(1));
        while !stop.load(Ordering::SeqCst) {
            let (batch, polled_at) = self.poll_batch(stop);
            if batch.is_empty() {
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
                first_poll.get_or_insert(polled_at[0]);
                self.process(batch, stop)?;
                self.record_latencies(&polled_at);
            }
            if last_quality.elapsed() >= quality_every {
                last_quality = Instant::now();
                self.publish_quality();
                self.refresh_gauges();
            }
        }
        self.publish_quality();
        self.set_ready(false);
        self.summary.elapsed_secs = started.elapsed().as_secs_f64();
        if let (Some(first), Some(last)) = (first_poll, self.last_commit) {
            self.summary.active_secs = (last - first).as_secs_f64();
        }
        Ok(self.summary.clone())
    }

    /// Collects up to `batch_size` messages, waiting at most `batch_timeout_ms` for them; the
    /// second list has the time each was polled.
    fn poll_batch(&mut self, stop: &AtomicBool) -> (Vec<OwnedMessage>, Vec<Instant>) {
        let deadline = Instant::now() + Duration::from_millis(self.config.batch_timeout_ms);
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut polled_at: Vec<Instant> = Vec::new();
        while batch.len() < self.config.batch_size && !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.consumer.poll(deadline - now) {
                None => {}
                Some(Ok(message)) => {
                    let message = message.detach();
                    if !self.already_processed(&message) {
                        batch.push(message);
                        polled_at.push(Instant::now());
                    }
                }
                Some(Err(error)) => {
                    // Broker trouble: report unready, keep polling; librdkafka reconnects.
                    self.set_ready(false);
                    tracing::warn!(%error, "consumer error");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let revoked: Vec<(String, i32)> =
            std::mem::take(&mut *self.revoked.lock().expect("revoked lock"));
        if !revoked.is_empty() {
            let kept: Vec<(OwnedMessage, Instant)> = batch
                .into_iter()
                .zip(polled_at)
                .filter(|(m, _)| {
                    !revoked
                        .iter()
                        .any(|(t, p)| t == m.topic() && *p == m.partition())
                })
                .collect();
            return kept.into_iter().unzip();
        }
        (batch, polled_at)
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }

    /// Refreshes the gauges that need a look at the broker or the store: lag per partition,
    /// state size, block-cache hit ratio, write stalls.
    fn refresh_gauges(&self) {
        let figures = self.store.figures();
        self.metrics.state_bytes.set(figures.sst_bytes as i64);
        self.metrics
            .write_stalled
            .set(i64::from(figures.write_stalled));
        let lookups = figures.block_cache_hit + figures.block_cache_miss;
        if lookups > 0 {
            self.metrics
                .block_cache_hit_ratio
                .set(figures.block_cache_hit as f64 / lookups as f64);
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let positions = self.positions.lock().expect("positions lock").clone();
        for element in assignment.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            if let Ok((_, high)) =
                self.consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(2))
            {
                let next = positions
                    .get(&(topic.to_owned(), partition))
                    .copied()
                    .unwrap_or(0);
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic, &partition.to_string()])
                    .set((high - next).max(0));
            }
        }
    }

    /// Notes, per message of the batch just committed, the time since it was polled.
    fn record_latencies(&mut self, polled_at: &[Instant]) {
        let committed = self.last_commit.unwrap_or_else(Instant::now);
        self.summary.poll_to_commit_ms.extend(
            polled_at
                .iter()
                .map(|t| (committed - *t).as_secs_f32() * 1000.0),
        );
    }

    /// Whether every assigned partition has been processed up to its high watermark (false
    /// when the broker cannot say).
    fn caught_up(&self) -> bool {
        let Ok(assignment) = self.consumer.assignment() else {
            return false;
        };
        // An outage can cost the worker its group membership; with no partitions it has not
        // caught up with anything.
        if assignment.count() == 0 {
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

    /// Journal, resolve, produce, commit (see the module documentation).
    fn process(
        &mut self,
        batch: Vec<OwnedMessage>,
        stop: &AtomicBool,
    ) -> Result<(), KafkaWorkerError> {
        let journal = Journal {
            messages: batch
                .iter()
                .map(|m| (m.topic().to_owned(), m.partition(), m.offset()))
                .collect(),
        };
        let mut writes = WriteSet::default();
        writes.put(
            Table::Meta,
            JOURNAL_KEY,
            serde_json::to_vec(&journal).expect("journal serializes"),
        );
        self.store.write(&writes)?;
        self.resolve_produce_commit(&batch, stop)
    }

    fn resolve_produce_commit(
        &mut self,
        batch: &[OwnedMessage],
        stop: &AtomicBool,
    ) -> Result<(), KafkaWorkerError> {
        let coordinates: Vec<InputCoordinates> = batch
            .iter()
            .map(|m| InputCoordinates::Kafka {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
            })
            .collect();
        let messages: Vec<InputMessage<'_>> = batch
            .iter()
            .zip(&coordinates)
            .map(|(message, coordinates)| InputMessage {
                coordinates,
                payload: message.payload().unwrap_or_default(),
                default_source: self.config.source_of(message.topic()).unwrap_or("custom"),
            })
            .collect();
        let started = Instant::now();
        let mut outcome =
            self.engine
                .process_batch_cached(&self.store, &mut self.cache, &messages)?;
        let resolved = Instant::now();
        self.deliver(&outcome, stop)?;
        let delivered = Instant::now();
        outcome.writes.delete(Table::Meta, JOURNAL_KEY);
        self.store.write(&outcome.writes)?;
        let phases = [
            ("resolve", resolved - started),
            ("deliver", delivered - resolved),
            ("commit", delivered.elapsed()),
        ];
        for (phase, took) in phases {
            self.metrics
                .batch_seconds
                .with_label_values(&[phase])
                .observe(took.as_secs_f64());
        }
        self.metrics.record_batch(&outcome.stats);
        tracing::debug!(
            messages = batch.len(),
            resolve_ms = (resolved - started).as_millis() as u64,
            deliver_ms = (delivered - resolved).as_millis() as u64,
            commit_ms = delivered.elapsed().as_millis() as u64,
            "batch committed"
        );
        self.cache.absorb(std::mem::take(&mut outcome.cache_delta));
        self.advance_positions(batch);
        self.summary.batches += 1;
        self.summary.messages += batch.len() as u64;
        self.last_commit = Some(Instant::now());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for message in batch {
            if let Some(appended) = message.timestamp().to_millis() {
                self.summary
                    .append_to_commit_ms
                    .push((now_ms - appended) as f32);
            }
        }
        self.summary
            .stats
            .absorb(std::mem::take(&mut outcome.stats));
        Ok(())
    }

    /// Sends the batch's records until the broker has them all, backing off while it cannot.
    fn deliver(
        &mut self,
        outcome: &BatchOutcome,
        stop: &AtomicBool,
    ) -> Result<(), KafkaWorkerError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let ready = Arc::clone(&self.ready);
            let ready_gauge = self.metrics.ready.clone();
            let on_stall = move || {
                ready.store(false, Ordering::SeqCst);
                ready_gauge.set(0);
            };
            match self.sink.send_outcome(outcome, &on_stall) {
                Ok(()) => {
                    self.set_ready(true);
                    return Ok(());
                }
                Err(error) if error.is_transient() && !stop.load(Ordering::SeqCst) => {
                    // Backpressure: nothing is committed until the outputs are durable.
                    self.set_ready(false);
                    self.summary.delivery_retries += 1;
                    self.metrics.delivery_retries.inc();
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "outputs not delivered; retrying the batch");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Records the committed positions and commits them to the consumer group (for lag).
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

    /// Re-reads and re-processes the batch that was in flight when the last run stopped.
    fn replay_journal(&mut self, stop: &AtomicBool) -> Result<(), KafkaWorkerError> {
        let Some(bytes) = self.store.get(Table::Meta, JOURNAL_KEY)? else {
            return Ok(());
        };
        let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| {
            KafkaWorkerError::Journal(format!("stored journal cannot be decoded: {e}"))
        })?;
        tracing::info!(
            messages = journal.messages.len(),
            "replaying the batch in flight at the last stop"
        );
        let batch = fetch_exact(&self.config, &journal.messages, stop)?;
        self.resolve_produce_commit(&batch, stop)?;
        self.summary.replayed_batches += 1;
        self.metrics.replayed_batches.inc();
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
            if let Err(error) =
                self.sink
                    .send_one(&self.config.outputs.quality, source, &meta, &snapshot)
            {
                tracing::warn!(%error, "quality snapshot not delivered");
            }
        }
    }
}

/// The quality figures of one source (SPEC §6), as sent on the quality topic.
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

/// Reads exactly the listed messages, in the listed order, with a consumer outside the group.
fn fetch_exact(
    config: &KafkaConfig,
    wanted: &[(String, i32, i64)],
    stop: &AtomicBool,
) -> Result<Vec<OwnedMessage>, KafkaWorkerError> {
    let consumer: BaseConsumer = client_config(config)
        .set("group.id", format!("{}-journal-replay", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(KafkaWorkerError::kafka("create replay consumer"))?;
    let mut start: HashMap<(String, i32), i64> = HashMap::new();
    for (topic, partition, offset) in wanted {
        let entry = start.entry((topic.clone(), *partition)).or_insert(*offset);
        *entry = (*entry).min(*offset);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in &start {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .map_err(KafkaWorkerError::kafka("plan replay"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(KafkaWorkerError::kafka("assign replay partitions"))?;
    let wanted_set: std::collections::HashSet<&(String, i32, i64)> = wanted.iter().collect();
    let mut found: HashMap<(String, i32, i64), OwnedMessage> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while found.len() < wanted.len() {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return Err(KafkaWorkerError::Journal(format!(
                "found {} of the {} journaled messages; were they deleted by retention?",
                found.len(),
                wanted.len()
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let key = (
                    message.topic().to_owned(),
                    message.partition(),
                    message.offset(),
                );
                if wanted_set.contains(&key) {
                    found.insert(key, message.detach());
                }
            }
            Some(Err(error)) => tracing::warn!(%error, "replay consumer error"),
            None => {}
        }
    }
    Ok(wanted
        .iter()
        .map(|key| found.remove(key).expect("every wanted message was found"))
        .collect())
}
