//! Every Prometheus metric of the worker, declared once, with its help text. Labels are
//! sources, failure kinds, actions, rules and topics: never customer data. Sources and
//! identifier kinds come from the input, so only configured ones become labels
//! ([`MetricLabels`]): a producer that makes up a source per message cannot make the label set
//! grow or put its values into `/metrics`.

use std::collections::BTreeSet;

use idgraph_engine::BatchStats;
use idgraph_model::{FailureKind, RefusalRule, ResolutionAction};

use crate::config::{PositionLostAction, OUTPUTS};
use crate::sink::RefusalReason;
use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// The label values that may come from input: configured sources and identifier kinds.
/// Anything else is counted under [`OTHER_SOURCE`] or [`CUSTOM_KIND`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricLabels {
    sources: BTreeSet<String>,
    identifier_kinds: BTreeSet<String>,
}

/// The `source` label of events whose source is not configured.
pub const OTHER_SOURCE: &str = "other";
/// The `kind` label of identifiers of a kind not configured.
pub const CUSTOM_KIND: &str = "custom";

impl MetricLabels {
    pub fn new(
        sources: impl IntoIterator<Item = String>,
        identifier_kinds: impl IntoIterator<Item = String>,
    ) -> Self {
        MetricLabels {
            sources: sources.into_iter().collect(),
            identifier_kinds: identifier_kinds.into_iter().collect(),
        }
    }

    fn source<'a>(&self, source: &'a str) -> &'a str {
        if self.sources.contains(source) {
            source
        } else {
            OTHER_SOURCE
        }
    }

    fn kind<'a>(&self, kind: &'a str) -> &'a str {
        if self.identifier_kinds.contains(kind) {
            kind
        } else {
            CUSTOM_KIND
        }
    }
}

/// The worker's metrics and the registry `/metrics` serves.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    labels: MetricLabels,
    events: IntCounterVec,
    dead_letters: IntCounterVec,
    actions: IntCounterVec,
    merges: IntCounter,
    merges_refused: IntCounterVec,
    identifiers_made_generic: IntCounter,
    generic_identifier_hits: IntCounter,
    invalid_identifiers: IntCounterVec,
    no_identifier_events: IntCounterVec,
    fuzzy_links: IntCounter,
    profile_identifiers: Histogram,
    profile_events: Histogram,
    largest_profile: IntGauge,
    fuzzy_score: Histogram,
    candidates_per_event: Histogram,
    pub batch_seconds: HistogramVec,
    pub messages_consumed: IntCounterVec,
    pub poll_to_output_seconds: Histogram,
    pub timestamp_to_output_seconds: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub delivery_retries: IntCounter,
    pub positions_lost: IntCounterVec,
    records_refused: IntCounterVec,
    pub store_retries: IntCounter,
    pub replayed_batches: IntCounter,
    pub ready: IntGauge,
    pub state_bytes: IntGauge,
    pub block_cache_hit_ratio: prometheus::Gauge,
    pub write_stalled: IntGauge,
    pub disk_available_bytes: IntGauge,
    pub disk_total_bytes: IntGauge,
    pub resident_memory_bytes: IntGauge,
    pub open_descriptors: IntGauge,
    pub max_descriptors: IntGauge,
    pub profile_identifier_limit: IntGauge,
    pub state_cache_bytes: IntGauge,
    http_requests: IntCounterVec,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// The commit this binary was built from (see build.rs), or `unknown`.
pub const BUILD_COMMIT: &str = env!("IDGRAPH_COMMIT");

/// `idgraph_build_info{version,commit}` (always 1), and the standard `process_*` metrics
/// (CPU seconds, start time, memory, descriptors, threads) from the prometheus crate's
/// collector, which reads /proc on each scrape.
fn register_process_and_build(registry: &Registry) {
    let build_info = IntGaugeVec::new(
        Opts::new(
            "idgraph_build_info",
            "Version and commit of the running binary; always 1",
        ),
        &["version", "commit"],
    )
    .expect("valid metric");
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), BUILD_COMMIT])
        .set(1);
    registry
        .register(Box::new(build_info))
        .expect("metric registered once");
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process metrics registered once");
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics that label every source `other` and every identifier kind `custom`.
    pub fn new() -> Self {
        Self::with_labels(MetricLabels::default())
    }

    /// Metrics whose input-derived labels are limited to `labels`.
    pub fn with_labels(labels: MetricLabels) -> Self {
        let r = Registry::new();
        let batch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "idgraph_batch_phase_seconds",
                "Time per batch spent by phase: resolve, log (its input offsets), send (encoding and queueing its records, on the sender thread), wait_for_acks, and checkpoint (writing the state of the batches since the last, on the committer thread)",
            )
            .buckets(exponential_buckets(0.001, 2.0, 16).expect("valid buckets")),
            &["phase"],
        )
        .expect("valid metric");
        r.register(Box::new(batch_seconds.clone()))
            .expect("metric registered once");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "idgraph_consumer_lag_messages",
                "Messages between the committed position and the end of each input partition",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        r.register(Box::new(consumer_lag.clone()))
            .expect("metric registered once");
        let block_cache_hit_ratio = prometheus::Gauge::new(
            "idgraph_rocksdb_block_cache_hit_ratio",
            "RocksDB block cache hits / (hits + misses)",
        )
        .expect("valid metric");
        r.register(Box::new(block_cache_hit_ratio.clone()))
            .expect("metric registered once");
        let metrics = Metrics {
            labels,
            messages_consumed: counter_vec(
                &r,
                "idgraph_messages_consumed_total",
                "Messages taken into a batch, valid or not, by source (events in)",
                &["source"],
            ),
            events: counter_vec(
                &r,
                "idgraph_events_processed_total",
                "Valid events resolved, by source",
                &["source"],
            ),
            dead_letters: counter_vec(
                &r,
                "idgraph_events_dead_lettered_total",
                "Messages sent to the dead-letter output, by failure kind",
                &["failure_kind"],
            ),
            actions: counter_vec(
                &r,
                "idgraph_resolution_actions_total",
                "Resolution actions (new, matched, merged, duplicate)",
                &["action"],
            ),
            merges: counter(&r, "idgraph_merges_total", "Profiles absorbed by merges"),
            merges_refused: counter_vec(
                &r,
                "idgraph_merges_refused_total",
                "Merges refused by an over-merge protection rule",
                &["rule"],
            ),
            identifiers_made_generic: counter(
                &r,
                "idgraph_generic_identifiers_total",
                "Identifier values that became generic and stopped linking",
            ),
            generic_identifier_hits: counter(
                &r,
                "idgraph_generic_identifier_hits_total",
                "Identifier occurrences ignored because the value is generic",
            ),
            invalid_identifiers: counter_vec(
                &r,
                "idgraph_invalid_identifiers_total",
                "Identifier values dropped as invalid or blocked, by kind",
                &["kind", "reason"],
            ),
            no_identifier_events: counter_vec(
                &r,
                "idgraph_events_without_identifier_total",
                "Events with no usable identifier, by source",
                &["source"],
            ),
            fuzzy_links: counter(
                &r,
                "idgraph_fuzzy_links_total",
                "Events or profiles linked by fuzzy matching",
            ),
            profile_identifiers: histogram(
                &r,
                "idgraph_profile_identifiers",
                "Identifiers per profile written",
                exponential_buckets(1.0, 2.0, 10).expect("valid buckets"),
            ),
            profile_events: histogram(
                &r,
                "idgraph_profile_events",
                "Events per profile written (profile size in activity)",
                exponential_buckets(1.0, 2.0, 16).expect("valid buckets"),
            ),
            largest_profile: gauge(
                &r,
                "idgraph_largest_profile_identifiers",
                "Most identifiers in one profile written since start",
            ),
            fuzzy_score: histogram(
                &r,
                "idgraph_fuzzy_score",
                "Best fuzzy score of events that had candidates",
                (-10..=30).step_by(2).map(f64::from).collect(),
            ),
            candidates_per_event: histogram(
                &r,
                "idgraph_fuzzy_candidates_per_event",
                "Candidate profiles scored per event",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            ),
            batch_seconds,
            poll_to_output_seconds: histogram(
                &r,
                "idgraph_poll_to_output_seconds",
                "Time from a message being polled to the broker acknowledging all its outputs",
                exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
            ),
            timestamp_to_output_seconds: histogram(
                &r,
                "idgraph_event_to_output_seconds",
                "End-to-end latency: from a message's Kafka timestamp (its producer's create time, or the broker's append time) to the broker acknowledging all its outputs",
                exponential_buckets(0.001, 2.0, 20).expect("valid buckets"),
            ),
            consumer_lag,
            delivery_retries: counter(
                &r,
                "idgraph_output_delivery_retries_total",
                "Batches whose outputs had to be sent again",
            ),
            positions_lost: counter_vec(
                &r,
                "idgraph_kafka_positions_lost_total",
                "Assigned partitions whose stored position the broker no longer has (beyond the high watermark: the topic was recreated or truncated; before the log start: retention deleted unread messages), by the action kafka.on_position_lost took",
                &["action"],
            ),
            records_refused: counter_vec(
                &r,
                "idgraph_output_records_refused_total",
                "Output records the producer or the broker refused for good, by output and reason; each one's reference goes to the dead-letter topic (output dead_letter: lost, see the log)",
                &["output", "reason"],
            ),
            store_retries: counter(
                &r,
                "idgraph_state_write_retries_total",
                "State writes that failed transiently and were retried",
            ),
            replayed_batches: counter(
                &r,
                "idgraph_replayed_batches_total",
                "Batches logged but not checkpointed by an earlier run, resolved and sent again at start",
            ),
            ready: gauge(
                &r,
                "idgraph_ready",
                "1 while the worker consumes and its outputs are acknowledged",
            ),
            state_bytes: gauge(
                &r,
                "idgraph_rocksdb_sst_bytes",
                "Size of the state's SST files",
            ),
            block_cache_hit_ratio,
            write_stalled: gauge(
                &r,
                "idgraph_rocksdb_write_stalled",
                "1 while RocksDB delays or stops writes",
            ),
            disk_available_bytes: gauge(
                &r,
                "idgraph_state_disk_available_bytes",
                "Bytes left to the worker on the file system of the state directory",
            ),
            disk_total_bytes: gauge(
                &r,
                "idgraph_state_disk_size_bytes",
                "Size of the file system of the state directory",
            ),
            resident_memory_bytes: gauge(
                &r,
                "idgraph_process_resident_memory_bytes",
                "Resident memory of the worker process",
            ),
            open_descriptors: gauge(
                &r,
                "idgraph_process_open_fds",
                "Open file descriptors of the worker process (RocksDB, librdkafka and HTTP share them)",
            ),
            max_descriptors: gauge(
                &r,
                "idgraph_process_max_fds",
                "The worker process's limit on open file descriptors (RLIMIT_NOFILE)",
            ),
            profile_identifier_limit: gauge(
                &r,
                "idgraph_profile_identifiers_limit",
                "engine.protection.max_profile_identifiers: merges past it are refused",
            ),
            state_cache_bytes: gauge(
                &r,
                "idgraph_state_cache_bytes",
                "Estimated memory of the decoded state kept between batches; engine.cache.max_mb bounds it",
            ),
            http_requests: counter_vec(
                &r,
                "idgraph_http_requests_total",
                "HTTP requests answered, by server (operations, profiles) and status code",
                &["server", "code"],
            ),
            registry: r,
        };
        metrics.start_known_series();
        register_process_and_build(&metrics.registry);
        metrics
    }

    /// Creates every series whose labels are known in advance at zero, so that a rate or an
    /// alert on it works before its first event (a missing series is not a zero).
    fn start_known_series(&self) {
        let sources = self
            .labels
            .sources
            .iter()
            .map(String::as_str)
            .chain([OTHER_SOURCE]);
        for source in sources {
            self.messages_consumed.with_label_values(&[source]);
            self.events.with_label_values(&[source]);
            self.no_identifier_events.with_label_values(&[source]);
        }
        for kind in FailureKind::ALL {
            self.dead_letters.with_label_values(&[kind.as_str()]);
        }
        for action in ResolutionAction::ALL {
            self.actions.with_label_values(&[action.as_str()]);
        }
        for rule in RefusalRule::ALL {
            self.merges_refused.with_label_values(&[rule.as_str()]);
        }
        for phase in ["resolve", "log", "send", "wait_for_acks", "checkpoint"] {
            self.batch_seconds.with_label_values(&[phase]);
        }
        for action in PositionLostAction::ALL {
            self.positions_lost.with_label_values(&[action.as_str()]);
        }
        for output in OUTPUTS {
            for reason in RefusalReason::ALL {
                self.records_refused
                    .with_label_values(&[output, reason.as_str()]);
            }
        }
    }

    /// Adds a committed batch's counters.
    pub fn record_batch(&self, stats: &BatchStats) {
        for (source, n) in &stats.events {
            let source = self.labels.source(source);
            self.events.with_label_values(&[source]).inc_by(*n);
        }
        for (kind, n) in &stats.dead_letters {
            self.dead_letters.with_label_values(&[kind]).inc_by(*n);
        }
        for (action, n) in &stats.actions {
            self.actions.with_label_values(&[action]).inc_by(*n);
        }
        for (rule, n) in &stats.merges_refused {
            self.merges_refused.with_label_values(&[rule]).inc_by(*n);
        }
        for (kind, n) in &stats.invalid_identifiers {
            self.invalid_identifiers
                .with_label_values(&[self.labels.kind(kind), "invalid"])
                .inc_by(*n);
        }
        for (kind, n) in &stats.blocked_identifiers {
            self.invalid_identifiers
                .with_label_values(&[self.labels.kind(kind), "blocked"])
                .inc_by(*n);
        }
        for (source, n) in &stats.no_identifier_by_source {
            self.no_identifier_events
                .with_label_values(&[self.labels.source(source)])
                .inc_by(*n);
        }
        self.merges.inc_by(stats.merges);
        self.identifiers_made_generic
            .inc_by(stats.identifiers_made_generic);
        self.generic_identifier_hits
            .inc_by(stats.generic_identifier_hits);
        self.fuzzy_links.inc_by(stats.fuzzy_links);
        for size in &stats.profile_sizes {
            self.profile_identifiers.observe(f64::from(*size));
            if i64::from(*size) > self.largest_profile.get() {
                self.largest_profile.set(i64::from(*size));
            }
        }
        for events in &stats.profile_event_counts {
            self.profile_events.observe(*events as f64);
        }
        for score in &stats.fuzzy_scores {
            self.fuzzy_score.observe(*score);
        }
        for candidates in &stats.candidates_per_event {
            self.candidates_per_event.observe(f64::from(*candidates));
        }
    }

    /// Counts an output record refused for good, and the dead letter that references it
    /// (`undeliverable`) unless the refused record was a dead letter itself.
    pub fn record_refusal(&self, output: &str, reason: &str) {
        self.records_refused
            .with_label_values(&[output, reason])
            .inc();
        if output != "dead_letter" {
            self.dead_letters
                .with_label_values(&["undeliverable"])
                .inc();
        }
    }

    /// Counts an HTTP answer. `server` is `operations` or `profiles`; codes are the few the
    /// servers give, so the label set stays small.
    pub fn count_http_request(&self, server: &str, status: u16) {
        self.http_requests
            .with_label_values(&[server, &status.to_string()])
            .inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("metrics encode");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label values of one metric family in a scrape.
    fn label_values(scrape: &str, metric: &str, label: &str) -> BTreeSet<String> {
        scrape
            .lines()
            .filter(|line| line.starts_with(&format!("{metric}{{")))
            .filter_map(|line| {
                let start = line.find(&format!("{label}=\""))? + label.len() + 2;
                let end = line[start..].find('"')? + start;
                Some(line[start..end].to_owned())
            })
            .collect()
    }

    #[test]
    fn a_thousand_made_up_sources_and_kinds_leave_the_labels_bounded_and_clean() {
        let metrics = Metrics::with_labels(MetricLabels::new(
            ["web".to_owned(), "pos".to_owned()],
            ["email".to_owned()],
        ));
        for i in 0..1000u64 {
            let mut stats = BatchStats::default();
            let bogus = format!("leak-{i}-jane.doe@example.com");
            stats.events.insert(bogus.clone(), 1);
            stats.events.insert("web".into(), 1);
            stats.no_identifier_by_source.insert(bogus.clone(), 1);
            stats.invalid_identifiers.insert(bogus.clone(), 1);
            stats.invalid_identifiers.insert("email".into(), 1);
            stats.blocked_identifiers.insert(format!("kind-{i}"), 1);
            metrics.record_batch(&stats);
        }
        let scrape = metrics.render();
        assert!(!scrape.contains("leak-"), "an input value reached /metrics");
        assert!(!scrape.contains("kind-"), "an input value reached /metrics");
        // Every configured source has its series from the start (at zero for `pos`).
        let configured: BTreeSet<String> = ["other".into(), "pos".into(), "web".into()].into();
        let sources = label_values(&scrape, "idgraph_events_processed_total", "source");
        assert_eq!(sources, configured);
        assert!(scrape.contains("idgraph_events_processed_total{source=\"pos\"} 0"));
        let kinds = label_values(&scrape, "idgraph_invalid_identifiers_total", "kind");
        assert_eq!(kinds, BTreeSet::from(["custom".into(), "email".into()]));
        assert!(scrape.contains("idgraph_events_processed_total{source=\"other\"} 1000"));
        let without = label_values(&scrape, "idgraph_events_without_identifier_total", "source");
        assert_eq!(without, configured);
    }
}
