//! The development broker: librdkafka's mock cluster, hosted by `idgraph broker` in a process
//! of its own so that killing a worker leaves the log alive.
//!
//! It speaks the Kafka protocol over TCP on loopback, so stock clients (kcat, other
//! librdkafka programs) work against it. Its limits are librdkafka's: nothing is persisted,
//! the admin API's CreateTopics is not supported (topics are created here, or auto-created
//! with 4 partitions on first use), transactional offset commits are not stored, and
//! `read_committed` consumers still see aborted records. Each partition keeps only its last
//! 5 MB or 100,000 messages (older ones are dropped), so give the output topics enough
//! partitions for what a test or demo reads back.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;

/// A running mock cluster with the configured topics created.
pub struct DevBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl DevBroker {
    /// Starts `brokers` mock brokers and creates the source topics with `source_partitions`
    /// partitions and the output topics with `output_partitions`.
    pub fn start(
        config: &KafkaConfig,
        brokers: i32,
        source_partitions: i32,
        output_partitions: i32,
    ) -> Result<Self, KafkaWorkerError> {
        let cluster =
            MockCluster::new(brokers).map_err(KafkaWorkerError::kafka("start mock cluster"))?;
        let broker = DevBroker { cluster };
        for topic in config.sources.values() {
            broker.create_topic(topic, source_partitions)?;
        }
        for topic in config.outputs.all() {
            broker.create_topic(topic, output_partitions)?;
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

    /// Fault injection: the next `count` produce requests (of any client) fail with a
    /// retriable error, so producers must retry.
    pub fn fail_produce_requests(&self, count: usize) {
        let errors =
            vec![rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; count];
        self.cluster
            .request_errors(rdkafka::types::RDKafkaApiKey::Produce, &errors);
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
