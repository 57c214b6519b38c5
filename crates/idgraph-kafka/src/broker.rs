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

use std::ffi::CString;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;

/// A running mock cluster with the configured topics created.
///
/// librdkafka creates the cluster for a client configured with `test.mock.num.brokers` and
/// destroys it with that client; the client itself sends nothing. Holding the client (rather
/// than rdkafka's `MockCluster::new`) gives the raw cluster handle that moving a broker's
/// advertised address needs.
pub struct DevBroker {
    owner: BaseProducer<ClusterOwner>,
}

/// The context of the client that owns the cluster. Once a broker is advertised behind a
/// proxy that speaks TLS, this plaintext client can no longer reach it; it has nothing to
/// send, so its connection errors say nothing about the cluster and are logged at debug only.
struct ClusterOwner;

impl ClientContext for ClusterOwner {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "mock cluster owner client");
    }
}

impl ProducerContext for ClusterOwner {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
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
        let owner = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create_with_context(ClusterOwner)
            .map_err(KafkaWorkerError::kafka("start mock cluster"))?;
        let broker = DevBroker { owner };
        for topic in config.sources.values() {
            broker.create_topic(topic, source_partitions)?;
        }
        for topic in config.outputs.all() {
            broker.create_topic(topic, output_partitions)?;
        }
        Ok(broker)
    }

    fn cluster(&self) -> MockCluster<'_, ClusterOwner> {
        self.owner
            .client()
            .mock_cluster()
            .expect("a client configured with test.mock.num.brokers has a mock cluster")
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaWorkerError> {
        self.cluster()
            .create_topic(topic, partitions, 1)
            .map_err(KafkaWorkerError::kafka("create topic"))
    }

    /// The `host:port,…` list clients connect to.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// Fault injection: the next `count` produce requests (of any client) fail with a
    /// retriable error, so producers must retry.
    pub fn fail_produce_requests(&self, count: usize) {
        let errors =
            vec![rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; count];
        self.cluster()
            .request_errors(rdkafka::types::RDKafkaApiKey::Produce, &errors);
    }

    /// Fault injection: takes broker `id` (1-based) down or brings it back.
    pub fn set_broker_up(&self, id: i32, up: bool) -> Result<(), KafkaWorkerError> {
        let cluster = self.cluster();
        let result = if up {
            cluster.broker_up(id)
        } else {
            cluster.broker_down(id)
        };
        result.map_err(KafkaWorkerError::kafka("change mock broker state"))
    }

    /// Makes the cluster's metadata send clients to `host:port` for broker `id` (1-based)
    /// while the broker keeps listening where it is: the address of a proxy in front of it,
    /// such as a TLS terminator, so that clients configured for `SSL` reach the mock
    /// cluster through that proxy. It also stands for a broker that moved.
    pub fn advertise(&self, id: i32, host: &str, port: u16) -> Result<(), KafkaWorkerError> {
        let host = CString::new(host)
            .map_err(|_| KafkaWorkerError::Config(format!("host {host:?} contains a NUL byte")))?;
        let client = self.owner.client();
        // SAFETY: the cluster handle belongs to `self.owner`'s client, which outlives this
        // call; librdkafka copies the host and takes the cluster's lock itself.
        unsafe {
            let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(client.native_ptr());
            rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
                cluster,
                id,
                host.as_ptr(),
                i32::from(port),
            );
        }
        Ok(())
    }
}
