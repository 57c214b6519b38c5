//! The development broker: librdkafka's mock cluster, hosted by `idgraph broker` in a process
//! of its own so that killing a worker leaves the log alive.
//!
//! It speaks the Kafka protocol over TCP on loopback, so stock clients (kcat, other
//! librdkafka programs) work against it. Its limits are librdkafka's: nothing is persisted,
//! the admin API's CreateTopics is not supported (topics are created here, or auto-created
//! with 4 partitions on first use), transactional offset commits are not stored, and
//! `read_committed` consumers still see aborted records.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;

/// A running mock cluster with the configured topics created.
pub struct DevBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl DevBroker {
    /// Starts `brokers` mock brokers and creates every source and output topic with
    /// `partitions` partitions.
    pub fn start(
        config: &KafkaConfig,
        brokers: i32,
        partitions: i32,
    ) -> Result<Self, KafkaWorkerError> {
        let cluster =
            MockCluster::new(brokers).map_err(KafkaWorkerError::kafka("start mock cluster"))?;
        let broker = DevBroker { cluster };
        for topic in config
            .sources
            .values()
            .map(String::as_str)
            .chain(config.outputs.all())
        {
            broker.create_topic(topic, partitions)?;
        }
        Ok(broker)
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaWorkerError> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(KafkaWorkerError::kafka("create topic"))
    }

    /// The `host:port,…` list clients connect to.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Fault injection: takes broker `id` (1-based) down or brings it back.
    pub fn set_broker_up(&self, id: i32, up: bool) -> Result<(), KafkaWorkerError> {
        let result = if up {
            self.cluster.broker_up(id)
        } else {
            self.cluster.broker_down(id)
        };
        result.map_err(KafkaWorkerError::kafka("change mock broker state"))
    }
}
