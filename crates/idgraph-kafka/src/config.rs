//! The `[kafka]` table of the config file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Consumer group of the workers.
    pub group_id: String,
    /// Most messages per batch (one engine batch, one RocksDB write, one producer flush).
    pub batch_size: usize,
    /// Longest wait to fill a batch before processing what has arrived.
    pub batch_timeout_ms: u64,
    /// Consumer group session timeout.
    pub session_timeout_ms: u64,
    /// A stable name for this worker in its group (static membership, KIP-345); empty for a
    /// dynamic member.
    pub group_instance_id: String,
    /// Seconds between data-quality snapshots on the quality topic.
    pub quality_interval_secs: u64,
    /// Longest wait for the broker to acknowledge a batch's outputs before retrying them.
    pub delivery_timeout_ms: u64,
    /// Longest time from a stop signal to exit, however the drain goes.
    pub shutdown_timeout_ms: u64,
    /// Most committed batches whose outputs may await acknowledgement while the next batch
    /// is resolved; 1 means one batch is delivered while the next is worked on.
    pub max_batches_in_flight: usize,
    /// Batches per checkpoint: state is written behind, the changes of this many batches in
    /// one write, and a restart resolves the batches logged since the last one again.
    pub checkpoint_interval: usize,
    /// What to do when an assigned partition's stored position is one the broker no longer
    /// has (see [`PositionLostAction`]).
    pub on_position_lost: PositionLostAction,
    /// Source name → topic it is consumed from.
    pub sources: BTreeMap<String, String>,
    pub outputs: OutputTopics,
    pub topics: TopicCreation,
    /// Extra librdkafka properties for every client (security, tuning), e.g.
    /// `"security.protocol" = "SSL"`.
    pub client: BTreeMap<String, String>,
}

/// What the worker does when a partition's stored position is beyond the broker's high
/// watermark (the topic was deleted and recreated, or truncated) or before its log start
/// (retention deleted messages it never read). Reading on from the broker's reset point would
/// either skip everything as already processed or silently lose the gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionLostAction {
    /// Stop with an error naming the topic, partition and offsets; an operator decides.
    Fail,
    /// Read the partition from the oldest message the broker has.
    Earliest,
    /// Read only messages that arrive from now on.
    Latest,
}

impl PositionLostAction {
    pub const ALL: [PositionLostAction; 3] = [
        PositionLostAction::Fail,
        PositionLostAction::Earliest,
        PositionLostAction::Latest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PositionLostAction::Fail => "fail",
            PositionLostAction::Earliest => "earliest",
            PositionLostAction::Latest => "latest",
        }
    }
}

/// How absent output topics are created at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicCreation {
    /// Create absent output topics at start through the admin API.
    pub create: bool,
    /// Partitions of a created topic; -1 takes the broker's `num.partitions`.
    pub partitions: i32,
    /// Replication factor of a created topic; -1 takes the broker's
    /// `default.replication.factor`.
    pub replication_factor: i32,
    /// Longest wait for cluster metadata and for topic creation.
    pub admin_timeout_ms: u64,
}

/// The outputs' names as metric labels, in the order of [`OutputTopics::all`].
pub const OUTPUTS: [&str; 5] = [
    "enriched",
    "profiles",
    "identity_changes",
    "quality",
    "dead_letter",
];

/// Output topic names (docs/formats.md §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputTopics {
    pub enriched: String,
    pub profiles: String,
    pub identity_changes: String,
    pub quality: String,
    pub dead_letter: String,
}

impl OutputTopics {
    /// The output a topic carries (`enriched`, `profiles`, `identity_changes`, `quality`,
    /// `dead_letter`), as a metric label; `other` for a topic that is none of them.
    pub fn output_of(&self, topic: &str) -> &'static str {
        self.all()
            .iter()
            .position(|t| *t == topic)
            .map_or("other", |i| OUTPUTS[i])
    }

    pub fn all(&self) -> [&str; 5] {
        [
            &self.enriched,
            &self.profiles,
            &self.identity_changes,
            &self.quality,
            &self.dead_letter,
        ]
    }
}

impl KafkaConfig {
    /// The source a topic carries, if it is one of the configured source topics.
    pub fn source_of(&self, topic: &str) -> Option<&str> {
        self.sources
            .iter()
            .find(|(_, t)| t.as_str() == topic)
            .map(|(source, _)| source.as_str())
    }

    /// Checks what types alone cannot; the message names the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.sources.is_empty() {
            return Err("kafka.sources must name at least one source topic".into());
        }
        if self.batch_size == 0 {
            return Err("kafka.batch_size must be at least 1".into());
        }
        if self.topics.partitions == 0 || self.topics.partitions < -1 {
            return Err(format!(
                "kafka.topics.partitions = {} must be at least 1, or -1 for the broker's default",
                self.topics.partitions
            ));
        }
        if self.topics.replication_factor == 0 || self.topics.replication_factor < -1 {
            return Err(format!(
                "kafka.topics.replication_factor = {} must be at least 1, or -1 for the broker's default",
                self.topics.replication_factor
            ));
        }
        if self.client.contains_key("message.max.bytes") {
            return Err("kafka.client.\"message.max.bytes\" cannot be set: the producer's limit follows engine.dead_letter.max_message_bytes (twice it plus 64 KiB), so that every valid input's outputs fit; raise that instead".into());
        }
        if self.shutdown_timeout_ms == 0 {
            return Err(
                "kafka.shutdown_timeout_ms must be at least 1 (milliseconds from SIGTERM to exit)"
                    .into(),
            );
        }
        if self.max_batches_in_flight == 0 {
            return Err(
                "kafka.max_batches_in_flight must be at least 1 (the batch being delivered)".into(),
            );
        }
        if self.checkpoint_interval == 0 {
            return Err(
                "kafka.checkpoint_interval must be at least 1 (1 checkpoints every batch)".into(),
            );
        }
        let mut topics: Vec<&str> = self.sources.values().map(String::as_str).collect();
        topics.extend(self.outputs.all());
        let mut sorted = topics.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != topics.len() {
            return Err("kafka.sources and kafka.outputs must all be different topics".into());
        }
        Ok(())
    }
}
