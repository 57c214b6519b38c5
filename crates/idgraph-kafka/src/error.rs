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
