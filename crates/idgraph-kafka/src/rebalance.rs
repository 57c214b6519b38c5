//! Consume and rebalance: where an assigned partition starts (the state's stored position,
//! checked against the offsets the broker still has), the check at the first assignment that
//! no other live worker shares the group, revocations noted for the run loop, and the
//! consumer's health from librdkafka's statistics. The callbacks run inside the worker's
//! `poll`, on its thread; what they find goes to the run loop through shared fields.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use crate::config::PositionLostAction;
use crate::error::KafkaWorkerError;
use crate::gauges::{Assignment, Positions};
use crate::metrics::Metrics;
use crate::readiness::{consumer_health, Readiness};

/// A partition whose stored position the broker no longer has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LostPosition {
    topic: String,
    partition: i32,
    stored: i64,
    low: i64,
    high: i64,
}

impl From<LostPosition> for KafkaWorkerError {
    fn from(lost: LostPosition) -> Self {
        KafkaWorkerError::PositionLost {
            topic: lost.topic,
            partition: lost.partition,
            stored: lost.stored,
            low: lost.low,
            high: lost.high,
        }
    }
}

/// Whether the broker, holding offsets `low` to `high` (the next to be written), no longer
/// has the position `stored`. Reading on from it would be silent: past the high watermark
/// librdkafka resets to the start and every message looks processed already; before the log
/// start the messages in between are gone.
fn position_is_lost(stored: i64, (low, high): (i64, i64)) -> bool {
    stored > high || stored < low
}

/// Seeks newly assigned partitions to the stored positions and notes revoked ones.
pub(crate) struct WorkerContext {
    pub(crate) positions: Positions,
    /// `kafka.on_position_lost`.
    pub(crate) on_position_lost: PositionLostAction,
    /// Positions found lost under [`PositionLostAction::Fail`]: the run loop stops on them.
    pub(crate) lost: Arc<Mutex<Vec<LostPosition>>>,
    pub(crate) metrics: Metrics,
    /// Told the consumer's health from its statistics.
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) group_id: String,
    /// The source topics, whose partitions a sole member of the group is given all of.
    pub(crate) sources: Vec<String>,
    /// Set once the first assignment has been checked for another live member.
    pub(crate) first_assignment_seen: AtomicBool,
    /// Set when that first assignment left partitions to another member: the run loop stops.
    pub(crate) shared_group: Arc<Mutex<Option<String>>>,
    pub(crate) revoked: Arc<Mutex<Vec<(String, i32)>>>,
    /// Set once the group has given this worker its partitions; idleness counts from then.
    pub(crate) assigned: Arc<AtomicBool>,
    /// The partitions held, for the lag gauges.
    pub(crate) assignment: Assignment,
}

impl ClientContext for WorkerContext {
    fn stats_raw(&self, statistics: &[u8]) {
        match consumer_health(statistics) {
            Ok(healthy) => self.readiness.set_consumer_healthy(healthy),
            Err(error) => tracing::warn!(%error, "cannot read librdkafka's statistics"),
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => tracing::error!(error = ?other, "rebalance failed"),
        }
    }
}

/// The (topic, partition) pairs of a rebalance's list.
fn partitions_of(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl WorkerContext {
    /// Takes the offered partitions at their start offsets; none at all when another live
    /// member shares the group, and none whose position is lost under `fail`.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let offered = partitions_of(tpl);
        let mut taken = TopicPartitionList::new();
        if let Some(refusal) = self.another_member_holds_partitions(consumer, offered.len()) {
            tracing::error!(%refusal, "refusing to share the consumer group");
            *self.shared_group.lock().expect("shared group lock") = Some(refusal);
        } else {
            let mut assigned = Vec::new();
            for (topic, partition) in offered {
                if let Some(offset) = self.start_offset(consumer, &topic, partition) {
                    let _ = taken.add_partition_offset(&topic, partition, offset);
                    assigned.push((topic, partition));
                }
            }
            tracing::info!(
                partitions = assigned.len(),
                "partitions assigned; seeking to stored positions"
            );
            self.assigned.store(true, Ordering::SeqCst);
            self.assignment
                .lock()
                .expect("assignment lock")
                .extend(assigned);
        }
        if let Err(error) = consumer.assign(&taken) {
            tracing::error!(%error, "cannot take the assigned partitions");
        }
    }

    /// Notes revoked partitions for the run loop and releases them. Messages of these
    /// partitions that are polled but not committed are dropped by the loop; they stay after
    /// this state's stored position, so nothing is lost.
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let partitions = partitions_of(tpl);
        let mut assignment = self.assignment.lock().expect("assignment lock");
        for partition in &partitions {
            assignment.remove(partition);
        }
        drop(assignment);
        self.revoked
            .lock()
            .expect("revoked lock")
            .extend(partitions);
        tracing::info!(partitions = tpl.count(), "partitions revoked");
        if let Err(error) = consumer.unassign() {
            tracing::error!(%error, "cannot release revoked partitions");
        }
    }

    /// At the first assignment only: why this worker must not join, if another live member
    /// of the group holds some of the source partitions. Until the graph can be split across
    /// workers, a second member would build a second graph from its share and write
    /// conflicting profiles to the same compacted topic. A worker already running keeps
    /// going through later rebalances; the newcomer leaves, and the running one gets its
    /// partitions back.
    fn another_member_holds_partitions(
        &self,
        consumer: &BaseConsumer<Self>,
        offered: usize,
    ) -> Option<String> {
        if self.first_assignment_seen.swap(true, Ordering::SeqCst) {
            return None;
        }
        // One metadata request for every topic, then the source topics' partitions counted.
        let metadata = match consumer.fetch_metadata(None, WATERMARK_TIMEOUT) {
            Ok(metadata) => metadata,
            Err(error) => {
                tracing::warn!(%error, "cannot count the source partitions; not checking for another member");
                return None;
            }
        };
        let total: usize = metadata
            .topics()
            .iter()
            .filter(|topic| self.sources.iter().any(|source| source == topic.name()))
            .map(|topic| topic.partitions().len())
            .sum();
        (offered < total).then(|| {
            format!(
                "another live member of consumer group {:?} holds {} of the {total} source partitions; idgraph runs one worker per group until the graph can be split across workers (a second one would write conflicting profiles): stop the other worker, or give this one its own kafka.group_id and state",
                self.group_id,
                total - offered
            )
        })
    }

    /// Where to start reading an assigned partition: the stored position, checked against
    /// the offsets the broker holds; the beginning for a partition this state has never read
    /// (whatever the group committed for another state). `None` leaves the partition
    /// unassigned: its position is lost and `kafka.on_position_lost` says to stop.
    fn start_offset(
        &self,
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
    ) -> Option<Offset> {
        let mut positions = self.positions.lock().expect("positions lock");
        let key = (topic.to_owned(), partition);
        let Some(&stored) = positions.get(&key) else {
            return Some(Offset::Beginning);
        };
        let held = match consumer.fetch_watermarks(topic, partition, WATERMARK_TIMEOUT) {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(topic, partition, %error, "cannot check the stored position against the broker's offsets; seeking to it");
                return Some(Offset::Offset(stored));
            }
        };
        if !position_is_lost(stored, held) {
            return Some(Offset::Offset(stored));
        }
        let (low, high) = held;
        let action = self.on_position_lost;
        self.metrics
            .positions_lost
            .with_label_values(&[action.as_str()])
            .inc();
        tracing::warn!(
            topic,
            partition,
            stored,
            low,
            high,
            action = action.as_str(),
            "the broker no longer has this partition's stored position"
        );
        // The stored position moves with the reset, or every message before it would be
        // taken for one processed already.
        match action {
            PositionLostAction::Fail => {
                self.lost.lock().expect("lost lock").push(LostPosition {
                    topic: topic.to_owned(),
                    partition,
                    stored,
                    low,
                    high,
                });
                None
            }
            PositionLostAction::Earliest => {
                positions.insert(key, low);
                Some(Offset::Offset(low))
            }
            PositionLostAction::Latest => {
                positions.insert(key, high);
                Some(Offset::Offset(high))
            }
        }
    }
}

/// Longest wait for a partition's offsets when it is assigned.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_lost_beyond_the_high_watermark_or_before_the_log_start() {
        // Caught up, or anywhere in between: held.
        assert!(!position_is_lost(100, (0, 100)));
        assert!(!position_is_lost(40, (0, 100)));
        assert!(!position_is_lost(0, (0, 0)));
        // Retention deleted everything, all of it read: held.
        assert!(!position_is_lost(500, (500, 500)));
        // The topic was recreated with fewer messages.
        assert!(position_is_lost(101, (0, 100)));
        // Retention deleted messages never read.
        assert!(position_is_lost(400, (500, 900)));
    }
}
