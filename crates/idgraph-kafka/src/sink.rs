//! Producing a batch's records to the output topics (docs/formats.md §3), with their keys and headers,
//! tracking per batch when the broker has acknowledged every one, and the outbox encoding
//! that keeps a batch's records byte-identical across a restart.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use idgraph_engine::BatchOutcome;
use idgraph_model::{RecordMeta, WriteJson};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::Serialize;

use crate::client::client_config;
use crate::config::{KafkaConfig, OutputTopics};
use crate::error::KafkaWorkerError;

/// Header names every output record carries.
pub const HEADER_INPUT: &str = "idgraph.input";
pub const HEADER_IDEMPOTENCY_KEY: &str = "idgraph.idempotency_key";
pub const HEADER_SCHEMA_VERSION: &str = "idgraph.schema_version";

/// The batch number of records nobody tracks.
const UNTRACKED: usize = 0;

/// Which record of which batch a delivery report is about.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef {
    batch: usize,
    index: usize,
}

/// Why the producer or the broker refused a record for good: sending it again cannot help,
/// so its reference goes to the dead-letter topic and the pipeline goes on. Every other
/// failure (a broker away, a missing permission, a timeout) is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalReason {
    /// Larger than the producer's `message.max.bytes` or the topic's `max.message.bytes`.
    TooLarge,
    /// The topic does not exist in the cluster, or its name is not valid.
    UnknownTopic,
    /// The broker judged the record invalid or against its policy.
    InvalidRecord,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 3] = [
        RefusalReason::TooLarge,
        RefusalReason::UnknownTopic,
        RefusalReason::InvalidRecord,
    ];

    /// The permanent refusals among librdkafka's error codes.
    pub fn of(code: RDKafkaErrorCode) -> Option<Self> {
        use RDKafkaErrorCode as Code;
        match code {
            Code::MessageSizeTooLarge | Code::MessageBatchTooLarge | Code::InvalidMessageSize => {
                Some(RefusalReason::TooLarge)
            }
            Code::UnknownTopic | Code::InvalidTopic => Some(RefusalReason::UnknownTopic),
            Code::InvalidRecord | Code::PolicyViolation => Some(RefusalReason::InvalidRecord),
            _ => None,
        }
    }

    /// The `reason` label of `idgraph_output_records_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::TooLarge => "too_large",
            RefusalReason::UnknownTopic => "unknown_topic",
            RefusalReason::InvalidRecord => "invalid_record",
        }
    }

    fn of_error(error: &KafkaError) -> Option<Self> {
        error.rdkafka_error_code().and_then(Self::of)
    }
}

/// A record of a batch that was refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Its position in the records the batch was sent with.
    pub index: usize,
    pub reason: RefusalReason,
    /// librdkafka's words for it, for the dead letter and the log.
    pub error: String,
}

/// One output record exactly as it goes on the wire. A batch's records are stored in this
/// form (the outbox) before they are sent, so a re-send after a crash is byte-identical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    /// Header `idgraph.input`.
    pub input: String,
    /// Header `idgraph.idempotency_key`.
    pub idempotency_key: String,
    /// Header `idgraph.schema_version`.
    pub schema_version: String,
}

impl WireRecord {
    pub fn of<T: WriteJson>(topic: &str, key: &str, meta: &RecordMeta, record: &T) -> Self {
        let mut payload = Vec::with_capacity(512);
        record.write_json(&mut payload);
        Self::with_payload(topic, key, meta, payload)
    }

    /// A record whose payload is encoded already.
    pub fn with_payload(topic: &str, key: &str, meta: &RecordMeta, payload: Vec<u8>) -> Self {
        WireRecord {
            topic: topic.to_owned(),
            key: key.to_owned(),
            payload,
            input: meta.input.display(),
            idempotency_key: meta.idempotency_key.clone(),
            schema_version: idgraph_model::SCHEMA_VERSION.to_string(),
        }
    }

    fn fields(&self) -> [&[u8]; 6] {
        [
            self.topic.as_bytes(),
            self.key.as_bytes(),
            &self.payload,
            self.input.as_bytes(),
            self.idempotency_key.as_bytes(),
            self.schema_version.as_bytes(),
        ]
    }
}

/// Every record of a batch outcome in wire form, in the order they are sent.
pub fn wire_records(outcome: &BatchOutcome, topics: &OutputTopics) -> Vec<WireRecord> {
    let mut records = Vec::with_capacity(
        outcome.enriched.len()
            + outcome.profiles.len()
            + outcome.changes.len()
            + outcome.dead_letters.len(),
    );
    records.extend(
        outcome
            .enriched
            .iter()
            .map(|r| WireRecord::of(&topics.enriched, &r.customer_id, &r.meta, r)),
    );
    records.extend(
        outcome
            .profiles
            .iter()
            .map(|r| WireRecord::of(&topics.profiles, &r.customer_id, &r.meta, r)),
    );
    records.extend(
        outcome
            .changes
            .iter()
            .map(|r| WireRecord::of(&topics.identity_changes, &r.customer_id, &r.meta, r)),
    );
    // Dead letters are keyed by their input coordinates: they may have no customer.
    records.extend(
        outcome
            .dead_letters
            .iter()
            .map(|r| WireRecord::of(&topics.dead_letter, &r.meta.input.display(), &r.meta, r)),
    );
    records
}

/// Encodes wire records for the outbox: per record, six fields, each a little-endian `u32`
/// length followed by its bytes. Payloads are JSON already; a second JSON layer would only
/// escape them again.
pub fn encode_outbox(records: &[WireRecord]) -> Vec<u8> {
    let size: usize = records
        .iter()
        .map(|r| r.fields().iter().map(|f| f.len() + 4).sum::<usize>())
        .sum();
    let mut bytes = Vec::with_capacity(size + 4);
    bytes.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for record in records {
        for field in record.fields() {
            bytes.extend_from_slice(&(field.len() as u32).to_le_bytes());
            bytes.extend_from_slice(field);
        }
    }
    bytes
}

/// Decodes what [`encode_outbox`] wrote; the error says where the bytes stop making sense.
pub fn decode_outbox(bytes: &[u8]) -> Result<Vec<WireRecord>, String> {
    let mut reader = OutboxReader { bytes, at: 0 };
    let count = reader.length()?;
    let mut records = Vec::with_capacity(count.min(1 << 20));
    for _ in 0..count {
        records.push(WireRecord {
            topic: reader.text()?,
            key: reader.text()?,
            payload: reader.field()?.to_vec(),
            input: reader.text()?,
            idempotency_key: reader.text()?,
            schema_version: reader.text()?,
        });
    }
    if reader.at != bytes.len() {
        return Err(format!(
            "{} bytes left after the last record",
            bytes.len() - reader.at
        ));
    }
    Ok(records)
}

struct OutboxReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> OutboxReader<'a> {
    fn length(&mut self) -> Result<usize, String> {
        let end = self.at + 4;
        let raw = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| format!("truncated length at byte {}", self.at))?;
        self.at = end;
        Ok(u32::from_le_bytes(raw.try_into().expect("four bytes")) as usize)
    }

    fn field(&mut self) -> Result<&'a [u8], String> {
        let length = self.length()?;
        let end = self.at + length;
        let field = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| format!("field of {length} bytes at byte {} is truncated", self.at))?;
        self.at = end;
        Ok(field)
    }

    fn text(&mut self) -> Result<String, String> {
        let at = self.at;
        String::from_utf8(self.field()?.to_vec())
            .map_err(|_| format!("field at byte {at} is not UTF-8"))
    }
}

/// Where the records of one tracked batch are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Some records await an acknowledgement.
    InFlight,
    /// Every record was acknowledged or refused for good ([`OutputSink::take_refusals`]).
    Delivered,
    /// Every record has an answer and at least one was a failure worth retrying.
    Failed,
}

#[derive(Debug, Clone, Default)]
struct BatchProgress {
    pending: usize,
    failed: usize,
    refused: Vec<Refusal>,
}

impl BatchProgress {
    fn status(&self) -> DeliveryStatus {
        match (self.pending, self.failed) {
            (0, 0) => DeliveryStatus::Delivered,
            (0, _) => DeliveryStatus::Failed,
            _ => DeliveryStatus::InFlight,
        }
    }
}

/// Counts acknowledgements and failures per tracked batch (the delivery opaque is the batch
/// number), and wakes whoever waits for one.
#[derive(Default)]
pub struct DeliveryTracker {
    batches: Mutex<HashMap<usize, BatchProgress>>,
    changed: Condvar,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryTracker {}

impl DeliveryTracker {
    /// The progress of every tracked batch, locked.
    fn batches(&self) -> std::sync::MutexGuard<'_, HashMap<usize, BatchProgress>> {
        self.batches.lock().expect("delivery tracker lock")
    }

    /// Counts one answer for `record`: an acknowledgement (`None`), a refusal for good, or a
    /// failure worth retrying.
    fn answer(&self, record: RecordRef, error: Option<&KafkaError>) {
        if let Some(error) = error {
            *self.last_error.lock().expect("delivery error lock") = Some(error.to_string());
        }
        if record.batch == UNTRACKED {
            return;
        }
        let mut batches = self.batches();
        if let Some(progress) = batches.get_mut(&record.batch) {
            progress.pending = progress.pending.saturating_sub(1);
            if let Some(error) = error {
                match RefusalReason::of_error(error) {
                    Some(reason) => progress.refused.push(Refusal {
                        index: record.index,
                        reason,
                        error: error.to_string(),
                    }),
                    None => progress.failed += 1,
                }
            }
            if progress.pending == 0 {
                self.changed.notify_all();
            }
        }
    }
}

impl ProducerContext for DeliveryTracker {
    // A box per record (not a packed number): a batch's record count has no small bound.
    type DeliveryOpaque = Box<RecordRef>;

    fn delivery(&self, result: &DeliveryResult<'_>, record: Box<RecordRef>) {
        self.answer(*record, result.as_ref().err().map(|(error, _)| error));
    }
}

/// The idempotent producer of the five outputs.
pub struct OutputSink {
    producer: ThreadedProducer<DeliveryTracker>,
    topics: OutputTopics,
    delivery_timeout: Duration,
    max_record_bytes: usize,
}

/// The largest output record the producer takes (its `message.max.bytes`) for inputs of at
/// most `max_input_bytes`: an enriched event is its input normalized plus a customer id and a
/// resolution, so twice the input and 64 KiB more hold any enriched event. Deriving the one
/// from the other keeps them in agreement: a valid input cannot make an output the producer
/// refuses. What can still be refused (a profile grown past it, a topic with a smaller
/// `max.message.bytes`) is dead-lettered by reference, never retried forever.
pub fn max_record_bytes(max_input_bytes: usize) -> usize {
    max_input_bytes.saturating_mul(2).saturating_add(64 * 1024)
}

impl OutputSink {
    /// A producer whose `message.max.bytes` is [`max_record_bytes`] of `max_input_bytes`.
    pub fn new(config: &KafkaConfig, max_input_bytes: usize) -> Result<Self, KafkaWorkerError> {
        let max_record_bytes = max_record_bytes(max_input_bytes);
        let producer = client_config(config)
            .set("message.max.bytes", max_record_bytes.to_string())
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.timeout.ms", config.delivery_timeout_ms.to_string())
            .create_with_context(DeliveryTracker::default())
            .map_err(KafkaWorkerError::kafka("create producer"))?;
        Ok(OutputSink {
            producer,
            topics: config.outputs.clone(),
            delivery_timeout: Duration::from_millis(config.delivery_timeout_ms),
            max_record_bytes,
        })
    }

    /// The producer's `message.max.bytes`.
    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    pub fn topics(&self) -> &OutputTopics {
        &self.topics
    }

    /// Hands every record of batch number `batch` (never 0) to the producer and returns
    /// without waiting for acknowledgements; [`OutputSink::status`] and
    /// [`OutputSink::wait`] tell how delivery goes. Sending the same batch again restarts
    /// its count. A record the producer refuses for good is noted as refused; when one cannot
    /// even be queued for another reason, it and the rest count as failed.
    pub fn enqueue(&self, batch: usize, records: &[WireRecord]) {
        assert_ne!(batch, UNTRACKED, "batch numbers start at 1");
        let tracker = self.producer.context();
        tracker.batches().insert(
            batch,
            BatchProgress {
                pending: records.len(),
                ..BatchProgress::default()
            },
        );
        for (index, record) in records.iter().enumerate() {
            let reference = RecordRef { batch, index };
            match self.send(record, reference) {
                Ok(()) => {}
                Err(KafkaWorkerError::Kafka { source, .. })
                    if RefusalReason::of_error(&source).is_some() =>
                {
                    tracker.answer(reference, Some(&source));
                }
                Err(error) => {
                    tracing::warn!(%error, batch, "cannot queue an output record");
                    let mut batches = tracker.batches();
                    if let Some(progress) = batches.get_mut(&batch) {
                        let unsent = records.len() - index;
                        progress.pending -= unsent;
                        progress.failed += unsent;
                    }
                    tracker.changed.notify_all();
                    return;
                }
            }
        }
    }

    /// The records of `batch` refused for good since it was last sent; taken once.
    pub fn take_refusals(&self, batch: usize) -> Vec<Refusal> {
        self.producer
            .context()
            .batches()
            .get_mut(&batch)
            .map(|progress| std::mem::take(&mut progress.refused))
            .unwrap_or_default()
    }

    pub fn status(&self, batch: usize) -> DeliveryStatus {
        self.producer
            .context()
            .batches()
            .get(&batch)
            .map_or(DeliveryStatus::Delivered, |progress| progress.status())
    }

    /// Waits at most `timeout` for `batch` to leave [`DeliveryStatus::InFlight`].
    pub fn wait(&self, batch: usize, timeout: Duration) -> DeliveryStatus {
        let tracker = self.producer.context();
        let deadline = Instant::now() + timeout;
        let mut batches = tracker.batches();
        loop {
            let status = batches
                .get(&batch)
                .map_or(DeliveryStatus::Delivered, |progress| progress.status());
            let now = Instant::now();
            if status != DeliveryStatus::InFlight || now >= deadline {
                return status;
            }
            batches = tracker
                .changed
                .wait_timeout(batches, deadline - now)
                .expect("delivery tracker lock")
                .0;
        }
    }

    /// Stops tracking `batch`.
    pub fn forget(&self, batch: usize) {
        self.producer.context().batches().remove(&batch);
    }

    /// The last delivery error the producer reported, for logs.
    pub fn last_error(&self) -> Option<String> {
        self.producer
            .context()
            .last_error
            .lock()
            .expect("delivery error lock")
            .clone()
    }

    /// Sends one free-standing record (a quality snapshot) and waits for it under batch
    /// number `batch`; a refusal, for good or not, is an error (the next snapshot replaces
    /// this one).
    pub fn send_one<T: Serialize>(
        &self,
        batch: usize,
        topic: &str,
        key: &str,
        meta: &RecordMeta,
        record: &T,
    ) -> Result<(), KafkaWorkerError> {
        let payload = serde_json::to_vec(record).expect("quality snapshots serialize");
        self.enqueue(
            batch,
            &[WireRecord::with_payload(topic, key, meta, payload)],
        );
        let status = self.wait(batch, self.delivery_timeout);
        let refused = self.take_refusals(batch);
        self.forget(batch);
        match status {
            DeliveryStatus::Delivered if refused.is_empty() => Ok(()),
            _ => Err(KafkaWorkerError::Kafka {
                operation: "deliver a record",
                source: KafkaError::MessageProduction(RDKafkaErrorCode::Fail),
            }),
        }
    }

    fn send(&self, record: &WireRecord, reference: RecordRef) -> Result<(), KafkaWorkerError> {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_INPUT,
                value: Some(record.input.as_bytes()),
            })
            .insert(Header {
                key: HEADER_IDEMPOTENCY_KEY,
                value: Some(record.idempotency_key.as_bytes()),
            })
            .insert(Header {
                key: HEADER_SCHEMA_VERSION,
                value: Some(record.schema_version.as_bytes()),
            });
        let message = BaseRecord::with_opaque_to(&record.topic, Box::new(reference))
            .key(&record.key)
            .payload(&record.payload)
            .headers(headers);
        send_with_backpressure(&self.producer, message, self.delivery_timeout, "produce")
    }
}

/// Enqueues `record`, waiting while the producer's local queue is full (backpressure, not
/// failure) for at most `patience`.
pub(crate) fn send_with_backpressure<C, K, P>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, P, C::DeliveryOpaque>,
    patience: Duration,
    operation: &'static str,
) -> Result<(), KafkaWorkerError>
where
    C: ProducerContext + 'static,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    let started = Instant::now();
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                if started.elapsed() < patience =>
            {
                record = returned;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((error, _)) => {
                return Err(KafkaWorkerError::Kafka {
                    operation,
                    source: error,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8], key: &str) -> WireRecord {
        WireRecord {
            topic: "idgraph.profiles".into(),
            key: key.into(),
            payload: payload.to_vec(),
            input: "touchpoints.web/3@17".into(),
            idempotency_key: "2f1c".into(),
            schema_version: "1".into(),
        }
    }

    #[test]
    fn only_refusals_that_a_retry_cannot_cure_are_permanent() {
        use RDKafkaErrorCode as Code;
        assert_eq!(
            RefusalReason::of(Code::MessageSizeTooLarge),
            Some(RefusalReason::TooLarge)
        );
        assert_eq!(
            RefusalReason::of(Code::UnknownTopic),
            Some(RefusalReason::UnknownTopic)
        );
        assert_eq!(
            RefusalReason::of(Code::InvalidRecord),
            Some(RefusalReason::InvalidRecord)
        );
        // A broker away, a leader moving, a missing permission or a timeout may pass.
        for passing in [
            Code::BrokerTransportFailure,
            Code::NotLeaderForPartition,
            Code::UnknownTopicOrPartition,
            Code::TopicAuthorizationFailed,
            Code::MessageTimedOut,
            Code::QueueFull,
        ] {
            assert_eq!(RefusalReason::of(passing), None, "{passing:?}");
        }
    }

    #[test]
    fn the_producer_takes_the_enriched_event_of_any_valid_input() {
        let input = 1024 * 1024;
        assert!(max_record_bytes(input) >= 2 * input);
        assert_eq!(max_record_bytes(usize::MAX), usize::MAX);
    }

    #[test]
    fn outbox_entries_read_back_byte_for_byte() {
        let records = vec![
            record(br#"{"customer_id":"cus_1"}"#, "cus_1"),
            record(&[0xff, 0x00, 0xfe], "cus_é"),
            record(b"", ""),
        ];
        assert_eq!(decode_outbox(&encode_outbox(&records)).unwrap(), records);
        assert_eq!(decode_outbox(&encode_outbox(&[])).unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_outbox_entry_is_an_error_that_says_where() {
        let bytes = encode_outbox(&[record(b"{}", "cus_1")]);
        let truncated = decode_outbox(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(truncated.contains("truncated"), "{truncated}");
        let mut longer = bytes.clone();
        longer.push(7);
        let trailing = decode_outbox(&longer).unwrap_err();
        assert!(trailing.contains("1 bytes left"), "{trailing}");
    }
}
