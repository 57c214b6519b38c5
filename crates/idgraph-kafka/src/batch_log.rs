//! The batch-range log: which input messages each batch since the last checkpoint held, so
//! that a restarted worker can cut exactly the same batches again.
//!
//! The worker writes state behind (see [`crate::worker`]): its RocksDB state moves only at
//! checkpoints. Before it sends a batch's outputs it stores one small entry, the batch's
//! messages as runs of consecutive offsets, in the order they were polled. After a crash it
//! loads the checkpoint, fetches each logged batch's messages again ([`fetch_logged`]),
//! resolves them in the same batches and sends the outputs again: the engine is
//! deterministic, so they are byte-identical, with the same idempotency keys.
//!
//! This module encodes and decodes entries and fetches their messages; it knows nothing
//! about the engine.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::client::client_config;
use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;

/// Key prefix of log entries in the state's meta table; the batch number follows,
/// big-endian, so a prefix scan returns the entries in batch order.
pub const BATCH_LOG_PREFIX: &[u8] = b"kafka_batch_log:";

/// The log key of batch `number`.
pub fn log_key(number: usize) -> Vec<u8> {
    let mut key = BATCH_LOG_PREFIX.to_vec();
    key.extend_from_slice(&(number as u64).to_be_bytes());
    key
}

/// The batch number in a log key, if it is one.
pub fn number_of(key: &[u8]) -> Option<usize> {
    let bytes = key.strip_prefix(BATCH_LOG_PREFIX)?;
    Some(u64::from_be_bytes(<[u8; 8]>::try_from(bytes).ok()?) as usize)
}

/// Consecutive offsets of one partition, in the order the batch held them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub count: u32,
}

impl Run {
    fn last_offset(&self) -> i64 {
        self.first_offset + i64::from(self.count) - 1
    }
}

/// One logged batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedBatch {
    /// Format version of the entry, for readers of later versions.
    pub version: u32,
    pub runs: Vec<Run>,
}

impl LoggedBatch {
    /// The runs of `messages`, in their order: a run grows while the next message is the
    /// next offset of the same partition.
    pub fn of(messages: &[OwnedMessage]) -> Self {
        let mut runs: Vec<Run> = Vec::new();
        for message in messages {
            if let Some(run) = runs.last_mut() {
                if run.partition == message.partition()
                    && run.topic == message.topic()
                    && run.last_offset() + 1 == message.offset()
                {
                    run.count += 1;
                    continue;
                }
            }
            runs.push(Run {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                first_offset: message.offset(),
                count: 1,
            });
        }
        LoggedBatch { version: 1, runs }
    }

    /// JSON: a few dozen runs per batch, so size does not matter and an operator can read it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a logged batch serializes")
    }

    pub fn decode(number: usize, bytes: &[u8]) -> Result<Self, KafkaWorkerError> {
        serde_json::from_slice(bytes).map_err(|error| {
            KafkaWorkerError::Replay(format!(
                "the batch log entry of batch {number} cannot be read: {error}"
            ))
        })
    }

    fn messages(&self) -> usize {
        self.runs.iter().map(|run| run.count as usize).sum()
    }
}

/// Fetches the messages of `batches` from the broker and returns each batch's messages in
/// their logged order. It reads each partition once, from the lowest logged offset to the
/// highest, with a consumer of its own that joins no group. Fails, naming the message, if
/// one is gone (deleted by the topic's retention) or does not arrive within `timeout`.
pub fn fetch_logged(
    config: &KafkaConfig,
    batches: &[(usize, LoggedBatch)],
    timeout: Duration,
) -> Result<Vec<Vec<OwnedMessage>>, KafkaWorkerError> {
    let mut ranges: HashMap<(String, i32), (i64, i64)> = HashMap::new();
    for (_, batch) in batches {
        for run in &batch.runs {
            let range = ranges
                .entry((run.topic.clone(), run.partition))
                .or_insert((run.first_offset, run.last_offset()));
            range.0 = range.0.min(run.first_offset);
            range.1 = range.1.max(run.last_offset());
        }
    }
    let consumer: BaseConsumer = client_config(config)
        .set("group.id", format!("{}-replay", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // A logged offset that is gone is an error to report, not a reason to read elsewhere.
        .set("auto.offset.reset", "error")
        .create()
        .map_err(KafkaWorkerError::kafka("create replay consumer"))?;
    let mut assignment = TopicPartitionList::new();
    for ((topic, partition), (first, _)) in &ranges {
        assignment
            .add_partition_offset(topic, *partition, Offset::Offset(*first))
            .map_err(KafkaWorkerError::kafka("assign replay partitions"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(KafkaWorkerError::kafka("assign replay partitions"))?;
    let mut fetched: HashMap<(String, i32, i64), OwnedMessage> = HashMap::new();
    let mut unfinished = ranges.len();
    let deadline = Instant::now() + timeout;
    while unfinished > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match consumer.poll(left.min(Duration::from_millis(500))) {
            None => {}
            Some(Ok(message)) => {
                let key = (message.topic().to_owned(), message.partition());
                let Some((first, last)) = ranges.get(&key).copied() else {
                    continue;
                };
                let offset = message.offset();
                if offset < first || offset > last {
                    continue;
                }
                if offset == last {
                    unfinished -= 1;
                }
                fetched.insert((key.0, key.1, offset), message.detach());
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "replay consumer error; retrying until the deadline")
            }
        }
    }
    assemble(batches, fetched)
}

/// Each batch's messages, in logged order, from the fetched messages.
fn assemble(
    batches: &[(usize, LoggedBatch)],
    mut fetched: HashMap<(String, i32, i64), OwnedMessage>,
) -> Result<Vec<Vec<OwnedMessage>>, KafkaWorkerError> {
    let mut assembled = Vec::with_capacity(batches.len());
    for (number, batch) in batches {
        let mut messages = Vec::with_capacity(batch.messages());
        for run in &batch.runs {
            for offset in run.first_offset..=run.last_offset() {
                let key = (run.topic.clone(), run.partition, offset);
                let message = fetched.remove(&key).ok_or_else(|| {
                    KafkaWorkerError::Replay(format!(
                        "batch {number} logged message {}/{}@{offset}, which the broker did not return in time: if the broker is unreachable, start again once it is back; if the topic's retention deleted the message, its outputs cannot be made again, and moving the state directory aside starts over",
                        run.topic, run.partition
                    ))
                })?;
                messages.push(message);
            }
        }
        assembled.push(messages);
    }
    Ok(assembled)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rdkafka::Timestamp;

    /// A message whose payload names its coordinates.
    pub(crate) fn message(topic: &str, partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(format!("{topic}/{partition}@{offset}").into_bytes()),
            None,
            topic.to_owned(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn coordinates(messages: &[OwnedMessage]) -> Vec<(String, i32, i64)> {
        messages
            .iter()
            .map(|m| (m.topic().to_owned(), m.partition(), m.offset()))
            .collect()
    }

    #[test]
    fn runs_follow_poll_order_and_break_at_gaps_and_partition_changes() {
        let batch = vec![
            message("web", 0, 10),
            message("web", 0, 11),
            message("web", 1, 11),
            message("web", 0, 12),
            message("web", 0, 14),
            message("mobile", 0, 15),
        ];
        let logged = LoggedBatch::of(&batch);
        let runs: Vec<(&str, i32, i64, u32)> = logged
            .runs
            .iter()
            .map(|r| (r.topic.as_str(), r.partition, r.first_offset, r.count))
            .collect();
        assert_eq!(
            runs,
            vec![
                ("web", 0, 10, 2),
                ("web", 1, 11, 1),
                ("web", 0, 12, 1),
                ("web", 0, 14, 1),
                ("mobile", 0, 15, 1),
            ]
        );
        let decoded = LoggedBatch::decode(7, &logged.encode()).unwrap();
        assert_eq!(decoded, logged);
    }

    #[test]
    fn assembling_restores_each_batch_in_its_logged_order() {
        let first = vec![
            message("web", 1, 5),
            message("web", 0, 3),
            message("web", 0, 4),
        ];
        let second = vec![message("web", 0, 5), message("web", 1, 6)];
        let logged = vec![(1, LoggedBatch::of(&first)), (2, LoggedBatch::of(&second))];
        // The broker hands them back partition by partition, not in poll order.
        let fetched = [&first[..], &second[..]]
            .concat()
            .into_iter()
            .rev()
            .map(|m| ((m.topic().to_owned(), m.partition(), m.offset()), m))
            .collect();
        let assembled = assemble(&logged, fetched).unwrap();
        assert_eq!(coordinates(&assembled[0]), coordinates(&first));
        assert_eq!(coordinates(&assembled[1]), coordinates(&second));
        assert_eq!(assembled[0][1].payload(), Some(&b"web/0@3"[..]));
    }

    #[test]
    fn a_message_the_broker_no_longer_has_is_named_in_the_error() {
        let batch = vec![message("web", 2, 40), message("web", 2, 41)];
        let logged = vec![(9, LoggedBatch::of(&batch))];
        let fetched = std::iter::once(&batch[0])
            .map(|m| ((m.topic().to_owned(), m.partition(), m.offset()), m.clone()))
            .collect();
        let error = assemble(&logged, fetched).unwrap_err().to_string();
        assert!(error.contains("batch 9"), "{error}");
        assert!(error.contains("web/2@41"), "{error}");
    }
}
