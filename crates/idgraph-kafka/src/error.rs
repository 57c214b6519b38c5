//! Errors of the Kafka worker, classed the way an operator acts on them.

use idgraph_engine::{EngineError, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum KafkaWorkerError {
    /// The broker refused or failed an operation; retrying later may work.
    #[error("kafka operation {operation} failed: {source}")]
    Kafka {
        operation: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The state store or the engine failed; the worker must stop.
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration cannot work.
    #[error("invalid kafka configuration: {0}")]
    Config(String),
    /// No broker answered within `kafka.topics.admin_timeout_ms`; `reason` carries
    /// librdkafka's last report (a refused connection, a failed TLS handshake, a refused
    /// login).
    #[error("cannot reach the kafka cluster at {bootstrap} within {timeout_ms} ms: {reason}; check kafka.bootstrap_servers and the security settings in kafka.client")]
    Unreachable {
        bootstrap: String,
        timeout_ms: u64,
        reason: String,
    },
    /// Another live member holds partitions of the worker's consumer group.
    #[error("{0}")]
    SharedGroup(String),
    /// A partition's stored position is one the broker no longer has.
    #[error("the stored position of {topic} partition {partition} is offset {stored}, but the broker holds offsets {low} to {high}: the topic was recreated or truncated, or retention deleted unread messages; set kafka.on_position_lost = \"earliest\" or \"latest\" to read on from there, or restore the topic")]
    PositionLost {
        topic: String,
        partition: i32,
        stored: i64,
        low: i64,
        high: i64,
    },
    /// Output topics are missing and could not be created.
    #[error("cannot create output topics {topics}: {reason}; create them yourself (see README) or set kafka.topics.create = false")]
    TopicSetup { topics: String, reason: String },
    /// The batches logged since the last checkpoint cannot be resolved again: an entry is
    /// damaged or a logged message is gone from the broker.
    #[error("cannot replay the batches logged since the last checkpoint: {0}")]
    Replay(String),
    /// The stored outbox of an older version cannot be read back; the state directory is
    /// damaged.
    #[error("cannot send the stored outbox again: {0}")]
    Outbox(String),
}

impl KafkaWorkerError {
    pub(crate) fn kafka(
        operation: &'static str,
    ) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        move |source| KafkaWorkerError::Kafka { operation, source }
    }

    /// Whether waiting and retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, KafkaWorkerError::Kafka { .. })
            || matches!(self, KafkaWorkerError::Store(e) if e.class() == idgraph_engine::ErrorClass::Transient)
    }
}
