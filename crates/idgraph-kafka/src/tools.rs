//! Small tools around the worker: load a JSON Lines file into the source topics, and read a
//! topic back into JSON Lines. They let tests, the demo and operators drive the worker with
//! nothing but the `idgraph` binary (kcat works too; see README).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use serde::Serialize;

use crate::client::client_config;
use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;
use crate::sink::send_with_backpressure;

/// Sends each line of `input` to the topic of the source it names (`"source"` field; lines
/// that cannot be read go to the first configured source's topic, where the worker
/// dead-letters them). With `topic`, every line goes there instead. Returns lines sent.
pub fn produce_lines(
    config: &KafkaConfig,
    input: impl BufRead,
    topic: Option<&str>,
) -> Result<u64, KafkaWorkerError> {
    let producer: ThreadedProducer<DefaultProducerContext> = client_config(config)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        // Lines have no key; without stickiness they spread evenly over the partitions
        // instead of filling a few.
        .set("sticky.partitioning.linger.ms", "0")
        // A loader sends every line, whatever its size, so that what a worker does with an
        // oversized message can be tried; the broker's own limit still applies.
        .set("message.max.bytes", "100000000")
        .create()
        .map_err(KafkaWorkerError::kafka("create producer"))?;
    let fallback = config.sources.values().next().cloned().unwrap_or_default();
    let mut sent = 0u64;
    for line in input.split(b'\n') {
        let line = line.map_err(|e| KafkaWorkerError::Config(format!("cannot read input: {e}")))?;
        let destination = match topic {
            Some(topic) => topic.to_owned(),
            None => source_field(&line)
                .and_then(|source| config.sources.get(&source).cloned())
                .unwrap_or_else(|| fallback.clone()),
        };
        let record: BaseRecord<'_, (), [u8]> = BaseRecord::to(&destination).payload(&line[..]);
        send_with_backpressure(&producer, record, Duration::from_secs(60), "produce input")?;
        sent += 1;
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(KafkaWorkerError::kafka("flush input"))?;
    Ok(sent)
}

fn source_field(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Source {
        source: Option<String>,
    }
    serde_json::from_slice::<Source>(line).ok()?.source
}

/// One record of a dumped topic.
#[derive(Debug, Serialize)]
pub struct DumpedRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: HashMap<String, String>,
    /// The value exactly as stored, as UTF-8 text.
    pub value: Option<String>,
}

/// The dump consumer's client context. The dump asks librdkafka to report each partition's
/// end, which is how it knows it is done; librdkafka also raises each report as a client
/// error, which the default context logs at ERROR level, one line per partition per dump
/// (sixteen of them in every `idgraph demo`). This context drops those and logs every other
/// error as the default does.
struct DumpContext;

impl ClientContext for DumpContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error == KafkaError::Global(RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for DumpContext {}

/// Writes every record of `topic`, from the beginning to the current end of each partition,
/// as JSON Lines: a [`DumpedRecord`] per line, or with `values_only` just the record values
/// (which are JSON themselves for every idgraph output). Returns the number of records.
pub fn dump_topic(
    config: &KafkaConfig,
    topic: &str,
    values_only: bool,
    mut out: impl Write,
) -> Result<u64, KafkaWorkerError> {
    let consumer: BaseConsumer<DumpContext> = client_config(config)
        .set("group.id", "idgraph-dump")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create_with_context(DumpContext)
        .map_err(KafkaWorkerError::kafka("create dump consumer"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(KafkaWorkerError::kafka("fetch metadata"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Ok(0);
    }
    // Every partition from its beginning, whatever its reported high watermark: a Kafka-API
    // broker was seen to report 1 for a partition holding thousands of records, and a dump
    // that stopped there missed them. The dump ends once every partition has reported its end
    // while fetching (librdkafka's partition EOF) and nothing more has come for a moment.
    let mut tpl = TopicPartitionList::new();
    for partition in &partitions {
        tpl.add_partition_offset(topic, *partition, Offset::Beginning)
            .map_err(KafkaWorkerError::kafka("plan dump"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(KafkaWorkerError::kafka("assign dump partitions"))?;
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut last_record = Instant::now();
    let mut count = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let caught_up = at_end.len() == partitions.len();
        if caught_up && last_record.elapsed() >= DUMP_QUIET_PERIOD {
            break;
        }
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
                continue;
            }
            Some(Err(error)) => return Err(KafkaWorkerError::kafka("read topic")(error)),
            Some(Ok(message)) => message,
        };
        at_end.remove(&message.partition());
        last_record = Instant::now();
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|header| {
                        (
                            header.key.to_owned(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let record = DumpedRecord {
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            value: message
                .payload()
                .map(|v| String::from_utf8_lossy(v).into_owned()),
        };
        let written = if values_only {
            out.write_all(record.value.as_deref().unwrap_or("null").as_bytes())
        } else {
            serde_json::to_writer(&mut out, &record).map_err(std::io::Error::other)
        };
        written.map_err(|e| KafkaWorkerError::Config(format!("cannot write dump: {e}")))?;
        out.write_all(b"\n")
            .map_err(|e| KafkaWorkerError::Config(format!("cannot write dump: {e}")))?;
        count += 1;
    }
    Ok(count)
}

/// How long a dump waits, once every partition has reported its end, for records that were
/// still on their way.
const DUMP_QUIET_PERIOD: Duration = Duration::from_millis(500);

/// What the passthrough baseline did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassthroughSummary {
    pub messages: u64,
    /// From the first message polled to the last batch acknowledged.
    pub active_secs: f64,
}

/// The baseline of the worker benchmark: consume `from` with a fresh group and produce every
/// message unchanged to `to`, flushing per batch of `batch_size` as the worker does. It stops
/// once `expected` messages have gone through.
pub fn passthrough(
    config: &KafkaConfig,
    from: &str,
    to: &str,
    expected: u64,
) -> Result<PassthroughSummary, KafkaWorkerError> {
    let consumer: BaseConsumer = client_config(config)
        .set("group.id", "idgraph-bench-passthrough")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(KafkaWorkerError::kafka("create passthrough consumer"))?;
    consumer
        .subscribe(&[from])
        .map_err(KafkaWorkerError::kafka("subscribe passthrough"))?;
    // The worker's producer settings (idempotent, acks from all replicas), batched the way
    // kcat batches: records are handed over as they arrive and waited for once, at the end.
    // Waiting for each batch's acknowledgements, as this baseline once did, made it a tenth
    // as fast as a kcat pipe and the worker look good against it.
    let producer: ThreadedProducer<DefaultProducerContext> = client_config(config)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .map_err(KafkaWorkerError::kafka("create passthrough producer"))?;
    let mut summary = PassthroughSummary::default();
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while summary.messages < expected && Instant::now() < deadline {
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match result {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "passthrough consumer error");
                continue;
            }
        };
        first.get_or_insert_with(Instant::now);
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(to).payload(message.payload().unwrap_or_default());
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        send_with_backpressure(
            &producer,
            record,
            Duration::from_secs(60),
            "passthrough produce",
        )?;
        summary.messages += 1;
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(KafkaWorkerError::kafka("passthrough flush"))?;
    summary.active_secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    Ok(summary)
}
