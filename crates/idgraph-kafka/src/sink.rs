//! Producing a batch's records to the output topics (SPEC §4), with their keys and headers,
//! and waiting until the broker has acknowledged every one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use idgraph_engine::BatchOutcome;
use idgraph_model::RecordMeta;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::Serialize;

use crate::config::{KafkaConfig, OutputTopics};
use crate::error::KafkaWorkerError;

/// Header names every output record carries.
pub const HEADER_INPUT: &str = "idgraph.input";
pub const HEADER_IDEMPOTENCY_KEY: &str = "idgraph.idempotency_key";
pub const HEADER_SCHEMA_VERSION: &str = "idgraph.schema_version";

/// Counts deliveries that failed, so a batch is only committed when all of it is durable.
#[derive(Default)]
pub struct DeliveryTracker {
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failures.fetch_add(1, Ordering::SeqCst);
            *self.last_error.lock().expect("delivery error lock") = Some(error.to_string());
        }
    }
}

/// The idempotent producer of the five outputs.
pub struct OutputSink {
    producer: ThreadedProducer<DeliveryTracker>,
    topics: OutputTopics,
    delivery_timeout: Duration,
}

/// Base librdkafka settings shared by every client: servers plus the user's extra properties.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.bootstrap_servers);
    for (key, value) in &config.client {
        client.set(key, value);
    }
    client
}

impl OutputSink {
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaWorkerError> {
        let producer = client_config(config)
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
        })
    }

    /// Sends every record of the batch and waits until all are acknowledged. On an error the
    /// caller sends the whole batch again: consumers drop the copies by idempotency key, and
    /// the copies are byte-identical.
    ///
    /// `on_stall` is called while acknowledgements are overdue (the broker is slow or away),
    /// so the caller can report itself unready before the delivery timeout.
    pub fn send_outcome(
        &self,
        outcome: &BatchOutcome,
        on_stall: &dyn Fn(),
    ) -> Result<(), KafkaWorkerError> {
        self.producer.context().failures.store(0, Ordering::SeqCst);
        for record in &outcome.enriched {
            self.send(
                &self.topics.enriched,
                &record.customer_id,
                &record.meta,
                record,
            )?;
        }
        for record in &outcome.profiles {
            self.send(
                &self.topics.profiles,
                &record.customer_id,
                &record.meta,
                record,
            )?;
        }
        for record in &outcome.changes {
            self.send(
                &self.topics.identity_changes,
                &record.customer_id,
                &record.meta,
                record,
            )?;
        }
        for record in &outcome.dead_letters {
            let key = record.meta.input.display();
            self.send(&self.topics.dead_letter, &key, &record.meta, record)?;
        }
        self.wait_for_delivery(on_stall)
    }

    /// Sends one free-standing record (a quality snapshot) and waits for it.
    pub fn send_one<T: Serialize>(
        &self,
        topic: &str,
        key: &str,
        meta: &RecordMeta,
        record: &T,
    ) -> Result<(), KafkaWorkerError> {
        self.producer.context().failures.store(0, Ordering::SeqCst);
        self.send(topic, key, meta, record)?;
        self.wait_for_delivery(&|| {})
    }

    fn wait_for_delivery(&self, on_stall: &dyn Fn()) -> Result<(), KafkaWorkerError> {
        // Waiting in slices lets a stall be reported long before the timeout.
        const SLICE: Duration = Duration::from_millis(500);
        let started = Instant::now();
        loop {
            match self.producer.flush(SLICE) {
                Ok(()) => break,
                Err(_) if started.elapsed() < self.delivery_timeout => on_stall(),
                Err(error) => {
                    return Err(KafkaWorkerError::Kafka {
                        operation: "flush outputs",
                        source: error,
                    })
                }
            }
        }
        let failures = self.producer.context().failures.load(Ordering::SeqCst);
        if failures > 0 {
            let last = self
                .producer
                .context()
                .last_error
                .lock()
                .expect("delivery error lock")
                .clone();
            return Err(KafkaWorkerError::Kafka {
                operation: "deliver outputs",
                source: KafkaError::MessageProduction(RDKafkaErrorCode::Fail),
            })
            .inspect_err(
                |_| tracing::warn!(failures, last_error = ?last, "output delivery failed"),
            );
        }
        Ok(())
    }

    fn send<T: Serialize>(
        &self,
        topic: &str,
        key: &str,
        meta: &RecordMeta,
        record: &T,
    ) -> Result<(), KafkaWorkerError> {
        let payload = serde_json::to_vec(record).expect("output records serialize");
        let input = meta.input.display();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_INPUT,
                value: Some(input.as_bytes()),
            })
            .insert(Header {
                key: HEADER_IDEMPOTENCY_KEY,
                value: Some(meta.idempotency_key.as_bytes()),
            })
            .insert(Header {
                key: HEADER_SCHEMA_VERSION,
                value: Some(idgraph_model::SCHEMA_VERSION.to_string().as_bytes()),
            });
        let record = BaseRecord::to(topic)
            .key(key)
            .payload(&payload)
            .headers(headers);
        send_with_backpressure(&self.producer, record, self.delivery_timeout, "produce")
    }
}

/// Enqueues `record`, waiting while the producer's local queue is full (backpressure, not
/// failure) for at most `patience`.
pub(crate) fn send_with_backpressure<C, K, P>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, P>,
    patience: Duration,
    operation: &'static str,
) -> Result<(), KafkaWorkerError>
where
    C: ProducerContext<DeliveryOpaque = ()> + 'static,
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
