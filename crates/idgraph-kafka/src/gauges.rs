//! The gauges that need a look at the broker, the store or the process — consumer lag per
//! partition, state size, block-cache hit ratio, write stalls, disk space, resident memory and
//! open descriptors — refreshed on a thread of their own. A watermark request can take
//! seconds when a broker is slow; on the processing loop it would hold up every batch.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use idgraph_engine::StoreFigures;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::client::client_config;
use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;
use crate::metrics::Metrics;

/// Reads the store's figures from the refresher's thread.
pub type FiguresSource = Box<dyn Fn() -> StoreFigures + Send>;

/// The partitions the worker holds, kept up to date by its rebalance callback.
pub(crate) type Assignment = Arc<Mutex<BTreeSet<(String, i32)>>>;

/// Next offset to read, per (topic, partition), as stored with the state.
pub(crate) type Positions = Arc<Mutex<HashMap<(String, i32), i64>>>;

/// Longest wait for one partition's watermarks.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);

/// Refreshes the gauges every `every` until dropped.
pub struct GaugeRefresher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the refresher thread reads.
struct Sources {
    /// A client of its own, outside the consumer group, for watermark requests.
    watermarks: BaseConsumer,
    assignment: Assignment,
    positions: Positions,
    figures: Option<FiguresSource>,
    metrics: Metrics,
    /// Partitions whose lag gauge is set, so a revoked one's gauge can be removed.
    reported: BTreeSet<(String, i32)>,
}

impl GaugeRefresher {
    pub(crate) fn start(
        config: &KafkaConfig,
        metrics: Metrics,
        assignment: Assignment,
        positions: Positions,
        figures: Option<FiguresSource>,
        every: Duration,
    ) -> Result<Self, KafkaWorkerError> {
        let watermarks: BaseConsumer = client_config(config)
            .create()
            .map_err(KafkaWorkerError::kafka("create the watermark client"))?;
        let mut sources = Sources {
            watermarks,
            assignment,
            positions,
            figures,
            metrics,
            reported: BTreeSet::new(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("idgraph-gauges".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !stopped.load(Ordering::SeqCst) {
                    if Instant::now() >= next {
                        sources.refresh();
                        next = Instant::now() + every;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map_err(|e| KafkaWorkerError::Config(format!("cannot start the gauge thread: {e}")))?;
        Ok(GaugeRefresher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for GaugeRefresher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Sources {
    fn refresh(&mut self) {
        match &self.figures {
            Some(figures) => refresh_local(&self.metrics, &figures()),
            None => set_process_gauges(&self.metrics),
        }
        self.refresh_lag();
    }

    fn refresh_lag(&mut self) {
        let assignment = self.assignment.lock().expect("assignment lock").clone();
        for gone in self.reported.difference(&assignment) {
            let _ = self
                .metrics
                .consumer_lag
                .remove_label_values(&[&gone.0, &gone.1.to_string()]);
        }
        self.reported.clear();
        for (topic, partition) in assignment {
            let Ok((_, high)) =
                self.watermarks
                    .fetch_watermarks(&topic, partition, WATERMARK_TIMEOUT)
            else {
                continue;
            };
            let next = self
                .positions
                .lock()
                .expect("positions lock")
                .get(&(topic.clone(), partition))
                .copied()
                .unwrap_or(0);
            self.metrics
                .consumer_lag
                .with_label_values(&[&topic, &partition.to_string()])
                .set((high - next).max(0));
            self.reported.insert((topic, partition));
        }
    }
}

/// Sets the gauges of the store and the process, for a process with no worker (`idgraph
/// serve`) that refreshes them on its own schedule.
pub fn refresh_local(metrics: &Metrics, figures: &StoreFigures) {
    set_store_gauges(metrics, figures);
    set_process_gauges(metrics);
}

fn set_store_gauges(metrics: &Metrics, figures: &StoreFigures) {
    metrics.state_bytes.set(figures.sst_bytes as i64);
    metrics.write_stalled.set(i64::from(figures.write_stalled));
    let lookups = figures.block_cache_hit + figures.block_cache_miss;
    if lookups > 0 {
        metrics
            .block_cache_hit_ratio
            .set(figures.block_cache_hit as f64 / lookups as f64);
    }
    metrics
        .disk_available_bytes
        .set(figures.disk_available_bytes as i64);
    metrics
        .disk_total_bytes
        .set(figures.disk_total_bytes as i64);
}

fn set_process_gauges(metrics: &Metrics) {
    if let Some(bytes) = resident_bytes() {
        metrics.resident_memory_bytes.set(bytes as i64);
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        metrics.open_descriptors.set(entries.count() as i64);
    }
    if let Some(limit) = descriptor_limit() {
        metrics.max_descriptors.set(limit);
    }
}

/// The soft limit on open descriptors.
fn descriptor_limit() -> Option<i64> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current.and_then(|n| i64::try_from(n).ok())
}

/// The process's resident set, from `/proc/self/statm` (in pages).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_set_of_this_process_is_read_and_grows_with_what_it_touches() {
        let before = resident_bytes().expect("linux has /proc/self/statm");
        let mut touched: Vec<u8> = Vec::with_capacity(64 << 20);
        touched.extend((0..64 << 20).map(|i: usize| i as u8));
        std::hint::black_box(&touched);
        let after = resident_bytes().unwrap();
        assert!(after >= before + (48 << 20), "{before} -> {after}");
        drop(touched);
    }

    #[test]
    fn store_figures_reach_their_gauges() {
        let metrics = Metrics::new();
        set_store_gauges(
            &metrics,
            &StoreFigures {
                sst_bytes: 10,
                block_cache_hit: 3,
                block_cache_miss: 1,
                write_stalled: true,
                disk_available_bytes: 5_000,
                disk_total_bytes: 20_000,
            },
        );
        let scrape = metrics.render();
        for line in [
            "idgraph_rocksdb_sst_bytes 10",
            "idgraph_rocksdb_block_cache_hit_ratio 0.75",
            "idgraph_rocksdb_write_stalled 1",
            "idgraph_state_disk_available_bytes 5000",
            "idgraph_state_disk_size_bytes 20000",
        ] {
            assert!(scrape.contains(line), "{line} missing from\n{scrape}");
        }
    }
}
