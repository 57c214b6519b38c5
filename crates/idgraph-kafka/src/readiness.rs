//! When the worker says it is ready (`/readyz`, `idgraph_ready`): its consumer is in the
//! group with its partitions settled and connected to a broker, its outputs are acknowledged
//! in time, its state writes succeed, and it is not stopping.
//!
//! The consumer's side comes from librdkafka's statistics, which arrive every second
//! whether or not messages do, so a worker on a quiet stream becomes ready again as soon as
//! the broker is back, not only after its next delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;
use serde::Deserialize;

/// How often librdkafka reports the consumer's group and broker states.
pub const STATISTICS_INTERVAL_MS: u64 = 1000;

/// Whether a consumer is healthy, from its statistics: its group state (`cgrp.state`) is
/// `up`, its join state settled (`steady`: partitions assigned, no rebalance under way), and
/// at least one broker of the cluster (a known node id, not a bootstrap address) is `UP`.
pub fn consumer_is_healthy<'a>(
    group_state: &str,
    join_state: &str,
    brokers: impl IntoIterator<Item = (i32, &'a str)>,
) -> bool {
    group_state == "up"
        && join_state == "steady"
        && brokers
            .into_iter()
            .any(|(node, state)| node >= 0 && state == "UP")
}

/// The parts of librdkafka's statistics JSON that health needs; read on their own rather
/// than through rdkafka's whole `Statistics`, so a field another librdkafka version adds or
/// drops elsewhere cannot make the worker unready for good.
#[derive(Deserialize)]
struct HealthStatistics {
    cgrp: Option<GroupStatistics>,
    #[serde(default)]
    brokers: HashMap<String, BrokerStatistics>,
}

#[derive(Deserialize)]
struct GroupStatistics {
    state: String,
    join_state: String,
}

#[derive(Deserialize)]
struct BrokerStatistics {
    nodeid: i32,
    state: String,
}

/// [`consumer_is_healthy`] of a consumer's statistics JSON.
pub fn consumer_health(statistics: &[u8]) -> Result<bool, serde_json::Error> {
    let statistics: HealthStatistics = serde_json::from_slice(statistics)?;
    Ok(statistics.cgrp.is_some_and(|group| {
        consumer_is_healthy(
            &group.state,
            &group.join_state,
            statistics
                .brokers
                .values()
                .map(|broker| (broker.nodeid, broker.state.as_str())),
        )
    }))
}

/// The parts of readiness, kept by the worker and its consumer's callbacks, and the flag
/// and gauge they publish.
pub struct Readiness {
    consumer_healthy: AtomicBool,
    flowing: AtomicBool,
    stopping: AtomicBool,
    published: Arc<AtomicBool>,
    gauge: IntGauge,
}

impl Readiness {
    /// Not ready until the consumer reports itself healthy.
    pub fn new(gauge: IntGauge) -> Self {
        let readiness = Readiness {
            consumer_healthy: AtomicBool::new(false),
            flowing: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            published: Arc::new(AtomicBool::new(false)),
            gauge,
        };
        readiness.publish();
        readiness
    }

    /// The flag `/readyz` reads.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.published)
    }

    /// From the consumer's statistics, or `false` on a consumer error until the next ones.
    pub fn set_consumer_healthy(&self, healthy: bool) {
        self.consumer_healthy.store(healthy, Ordering::SeqCst);
        self.publish();
    }

    /// Whether outputs are acknowledged in time and state writes succeed.
    pub fn set_flowing(&self, flowing: bool) {
        self.flowing.store(flowing, Ordering::SeqCst);
        self.publish();
    }

    /// For good: the worker is draining or has stopped.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.publish();
    }

    fn publish(&self) {
        let ready = !self.stopping.load(Ordering::SeqCst)
            && self.consumer_healthy.load(Ordering::SeqCst)
            && self.flowing.load(Ordering::SeqCst);
        self.published.store(ready, Ordering::SeqCst);
        self.gauge.set(i64::from(ready));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_in_a_settled_group_with_a_broker_up() {
        let up = [(-1, "INIT"), (1, "UP")];
        assert!(consumer_is_healthy("up", "steady", up));
        // Rebalancing, or looking for its coordinator.
        assert!(!consumer_is_healthy("up", "wait-sync", up));
        assert!(!consumer_is_healthy("wait-coord", "steady", up));
        // Only the bootstrap address answers, or no broker at all.
        assert!(!consumer_is_healthy(
            "up",
            "steady",
            [(-1, "UP"), (1, "DOWN")]
        ));
        assert!(!consumer_is_healthy("up", "steady", []));
    }

    #[test]
    fn health_is_read_from_the_statistics_json() {
        let json = |group: &str, join: &str, broker: &str| {
            format!(
                r#"{{"name":"c","cgrp":{{"state":"{group}","join_state":"{join}","stateage":1}},
                "brokers":{{"b/bootstrap":{{"nodeid":-1,"state":"UP"}},"b/1":{{"nodeid":1,"state":"{broker}"}}}}}}"#
            )
        };
        assert!(consumer_health(json("up", "steady", "UP").as_bytes()).unwrap());
        assert!(!consumer_health(json("up", "steady", "CONNECT").as_bytes()).unwrap());
        assert!(
            !consumer_health(br#"{"brokers":{}}"#).unwrap(),
            "no group yet"
        );
        assert!(consumer_health(b"not json").is_err());
    }

    #[test]
    fn ready_needs_every_part_and_a_stop_is_final() {
        let gauge = IntGauge::new("ready", "ready").unwrap();
        let readiness = Readiness::new(gauge.clone());
        let flag = readiness.flag();
        assert!(
            !flag.load(Ordering::SeqCst),
            "not ready before the consumer reports"
        );
        readiness.set_consumer_healthy(true);
        assert!(flag.load(Ordering::SeqCst));
        assert_eq!(gauge.get(), 1);
        readiness.set_flowing(false);
        assert!(!flag.load(Ordering::SeqCst), "acknowledgements overdue");
        readiness.set_flowing(true);
        readiness.set_consumer_healthy(false);
        assert!(!flag.load(Ordering::SeqCst), "broker away");
        readiness.set_consumer_healthy(true);
        readiness.stop();
        readiness.set_consumer_healthy(true);
        assert!(!flag.load(Ordering::SeqCst));
        assert_eq!(gauge.get(), 0);
    }
}
