//! File mode: JSON Lines in, the five outputs of SPEC §4 out, state in RocksDB.
//!
//! Each batch of lines goes through the engine; its write set (graph changes and the input
//! position) is committed to RocksDB in one `WriteBatch`, and only then are its records
//! appended to the output files.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use idgraph_engine::{
    BatchOutcome, BatchStats, Engine, InputMessage, QualityReport, StateCache, StateStore,
};
use idgraph_model::InputCoordinates;
use idgraph_store_rocksdb::RocksStore;
use serde::Serialize;

use crate::config::AppConfig;

/// The processor version written into dead letters.
pub const PROCESSOR_VERSION: &str = concat!("idgraph ", env!("CARGO_PKG_VERSION"));

/// The output files of one run.
pub struct OutputFiles {
    enriched: BufWriter<File>,
    profiles: BufWriter<File>,
    changes: BufWriter<File>,
    dead_letters: BufWriter<File>,
    quality_path: PathBuf,
}

impl OutputFiles {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output directory {}", dir.display()))?;
        let open = |name: &str| -> Result<BufWriter<File>> {
            let path = dir.join(name);
            let file =
                File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            Ok(BufWriter::with_capacity(1 << 20, file))
        };
        Ok(OutputFiles {
            enriched: open("enriched.jsonl")?,
            profiles: open("profiles.jsonl")?,
            changes: open("identity-changes.jsonl")?,
            dead_letters: open("dead-letter.jsonl")?,
            quality_path: dir.join("quality.json"),
        })
    }

    fn write_batch(&mut self, outcome: &BatchOutcome) -> Result<()> {
        write_lines(&mut self.enriched, &outcome.enriched)?;
        write_lines(&mut self.profiles, &outcome.profiles)?;
        write_lines(&mut self.changes, &outcome.changes)?;
        write_lines(&mut self.dead_letters, &outcome.dead_letters)?;
        Ok(())
    }

    fn finish(mut self, quality: &QualityReport) -> Result<()> {
        for writer in [
            &mut self.enriched,
            &mut self.profiles,
            &mut self.changes,
            &mut self.dead_letters,
        ] {
            writer.flush().context("cannot write an output file")?;
        }
        let mut text = serde_json::to_string_pretty(quality)?;
        text.push('\n');
        std::fs::write(&self.quality_path, text)
            .with_context(|| format!("cannot write {}", self.quality_path.display()))
    }
}

fn write_lines<T: Serialize>(writer: &mut BufWriter<File>, records: &[T]) -> Result<()> {
    // Encoding into one plain buffer and writing it once is cheaper than many small writes
    // through the file buffer.
    let mut buffer = Vec::with_capacity(records.len() * 512);
    for record in records {
        serde_json::to_writer(&mut buffer, record)?;
        buffer.push(b'\n');
    }
    writer.write_all(&buffer)?;
    Ok(())
}

/// Writes batches' records on a thread of its own, in batch order, so that encoding the
/// outputs (a fifth of file-mode time) overlaps resolving the next batch. At most two batches
/// wait for it; a slower disk slows the resolver down instead of filling memory.
struct OutputWriter {
    sender: std::sync::mpsc::SyncSender<BatchOutcome>,
    thread: std::thread::JoinHandle<Result<OutputFiles>>,
}

impl OutputWriter {
    fn start(mut outputs: OutputFiles) -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<BatchOutcome>(2);
        let thread = std::thread::spawn(move || {
            for outcome in receiver {
                outputs.write_batch(&outcome)?;
            }
            Ok(outputs)
        });
        OutputWriter { sender, thread }
    }

    /// Queues a committed batch's records; fails with the writer's own error if it stopped.
    fn write(self, outcome: BatchOutcome) -> Result<Self> {
        match self.sender.send(outcome) {
            Ok(()) => Ok(self),
            Err(_) => Err(self
                .finish()
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the output writer stopped without an error"))),
        }
    }

    /// Waits until every queued batch is written and hands the files back.
    fn finish(self) -> Result<OutputFiles> {
        drop(self.sender);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the output writer panicked"))?
    }
}

/// What a run did, for the summary and the benchmark.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub lines: u64,
    pub events: u64,
    pub dead_letters: u64,
    pub profiles_created: u64,
    pub merges: u64,
    pub merges_refused: u64,
    pub fuzzy_links: u64,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
    #[serde(skip)]
    pub stats: BatchStats,
}

/// Reads `input` line by line in batches of `batch_size`, resolving each batch against `store`
/// and writing its records to `outputs`. Progress goes to stderr every `progress` (if set).
pub fn resolve_file(
    config: &AppConfig,
    engine: &Engine,
    store: &mut RocksStore,
    input: &Path,
    outputs: OutputFiles,
    progress: Option<Duration>,
) -> Result<RunSummary> {
    let file =
        File::open(input).with_context(|| format!("cannot open input file {}", input.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let input_name = input.display().to_string();
    let batch_size = config.resolve.batch_size;
    let started = Instant::now();
    let mut last_progress = started;
    let mut stats = BatchStats::default();
    let mut cache = StateCache::new(config.engine.cache.max_entries);
    let mut line_number = 0u64;
    let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(batch_size);
    let mut coordinates: Vec<InputCoordinates> = Vec::with_capacity(batch_size);
    let mut writer = OutputWriter::start(outputs);
    loop {
        payloads.clear();
        coordinates.clear();
        while payloads.len() < batch_size {
            let mut line = Vec::new();
            let read = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read {input_name} after line {line_number}"))?;
            if read == 0 {
                break;
            }
            line_number += 1;
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            payloads.push(line);
            coordinates.push(InputCoordinates::File {
                file: input_name.clone(),
                line: line_number,
            });
        }
        if payloads.is_empty() {
            break;
        }
        let messages = InputMessage::batch(&payloads, &coordinates, &config.resolve.default_source);
        let mut outcome = engine.process_batch_cached(&*store, &mut cache, &messages)?;
        store
            .write(&outcome.writes)
            .context("cannot commit a batch to the state store")?;
        cache.absorb(std::mem::take(&mut outcome.cache_delta));
        stats.absorb(std::mem::take(&mut outcome.stats));
        drop(std::mem::take(&mut outcome.writes));
        writer = writer.write(outcome)?;
        if let Some(every) = progress {
            if last_progress.elapsed() >= every {
                last_progress = Instant::now();
                let rate = line_number as f64 / started.elapsed().as_secs_f64();
                eprintln!("resolved {line_number} lines ({rate:.0} lines/s)");
            }
        }
    }
    writer
        .finish()?
        .finish(&QualityReport::from_stats(&stats))?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(RunSummary {
        lines: line_number,
        events: stats.total_events(),
        dead_letters: stats.total_dead_letters(),
        profiles_created: stats.profiles_created,
        merges: stats.merges,
        merges_refused: stats.merges_refused.values().sum(),
        fuzzy_links: stats.fuzzy_links,
        elapsed_secs: elapsed,
        events_per_sec: line_number as f64 / elapsed.max(1e-9),
        stats,
    })
}

/// Opens the state directory, or a temporary one that is removed when the guard drops.
pub fn open_state(
    config: &AppConfig,
    state: Option<&Path>,
) -> Result<(RocksStore, Option<tempfile::TempDir>)> {
    match state {
        Some(dir) => {
            let store = RocksStore::open(dir, &config.storage)
                .with_context(|| format!("cannot open state directory {}", dir.display()))?;
            Ok((store, None))
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("idgraph-state-")
                .tempdir()
                .context("cannot create a temporary state directory")?;
            let store = RocksStore::open(temp.path(), &config.storage)?;
            Ok((store, Some(temp)))
        }
    }
}

impl RunSummary {
    /// A few human lines for the end of a run.
    pub fn print(&self) {
        println!(
            "lines {}  events {}  dead letters {}  profiles created {}  merges {}  merges refused {}  fuzzy links {}",
            self.lines,
            self.events,
            self.dead_letters,
            self.profiles_created,
            self.merges,
            self.merges_refused,
            self.fuzzy_links
        );
        println!(
            "elapsed {:.2} s  throughput {:.0} lines/s",
            self.elapsed_secs, self.events_per_sec
        );
    }
}
