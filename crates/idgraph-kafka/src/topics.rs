//! Creating the output topics at start when they are absent (docs/formats.md §3), with the partitions and
//! replication factor from config; the profile topic is compacted.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::client::{client_config, cluster_metadata};
use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;

/// What [`ensure_output_topics`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicSetup {
    /// Output topics the cluster already had.
    pub existing: Vec<String>,
    /// Output topics this call created.
    pub created: Vec<String>,
}

/// Creates the configured output topics the cluster does not have. The profile topic gets
/// `cleanup.policy=compact`, so it keeps the latest profile per customer id, and every topic
/// `max.message.bytes = max_record_bytes`, so the broker takes whatever the producer sends.
///
/// Fails with the names of the topics that could not be created (no permission, a
/// replication factor above the broker count, a broker without the admin API); the caller
/// decides whether that is fatal.
pub fn ensure_output_topics(
    config: &KafkaConfig,
    max_record_bytes: usize,
) -> Result<TopicSetup, KafkaWorkerError> {
    let timeout = Duration::from_millis(config.topics.admin_timeout_ms);
    let metadata = cluster_metadata(config)?;
    let known: Vec<&str> = metadata.topics().iter().map(|t| t.name()).collect();
    let (existing, missing): (Vec<&str>, Vec<&str>) = config
        .outputs
        .all()
        .into_iter()
        .partition(|topic| known.contains(topic));
    let mut setup = TopicSetup {
        existing: existing.iter().map(|t| t.to_string()).collect(),
        created: Vec::new(),
    };
    if missing.is_empty() {
        return Ok(setup);
    }
    let admin: AdminClient<DefaultClientContext> = client_config(config)
        .create()
        .map_err(KafkaWorkerError::kafka("create admin client"))?;
    let max_record_bytes = max_record_bytes.to_string();
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|topic| {
            let new = NewTopic::new(
                topic,
                config.topics.partitions,
                TopicReplication::Fixed(config.topics.replication_factor),
            )
            .set("max.message.bytes", &max_record_bytes);
            if *topic == config.outputs.profiles {
                new.set("cleanup.policy", "compact")
            } else {
                new
            }
        })
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KafkaWorkerError::Config(format!("cannot start a runtime: {e}")))?;
    let results = runtime
        .block_on(admin.create_topics(&new_topics, &options))
        .map_err(|source| KafkaWorkerError::TopicSetup {
            topics: missing.join(", "),
            reason: source.to_string(),
        })?;
    let mut failed = Vec::new();
    for result in results {
        match result {
            Ok(topic) | Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                setup.created.push(topic)
            }
            Err((topic, code)) => failed.push(format!("{topic} ({code})")),
        }
    }
    if failed.is_empty() {
        Ok(setup)
    } else {
        Err(KafkaWorkerError::TopicSetup {
            topics: failed.join(", "),
            reason: "the broker refused to create them".into(),
        })
    }
}
