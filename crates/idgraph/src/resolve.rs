//! File mode: JSON Lines in, the five outputs of SPEC §4 out, state in RocksDB.
//!
//! Each batch of lines goes through the engine; its write set (graph changes and the input
//! position) is committed to RocksDB in one `WriteBatch`, and only then are its records
//! appended to the output files.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use idgraph_engine::{
    BatchOutcome, BatchStats, Engine, InputMessage, PendingWrites, PreparedMessage, QualityReport,
    ReadThrough, ResolvedBatch, StateCache, StateStore, WriteSet,
};
use idgraph_model::InputCoordinates;
use idgraph_store_rocksdb::RocksStore;
use serde::Serialize;

use crate::config::AppConfig;
use crate::cpu::{process_cpu_seconds, since, thread_cpu_seconds};
use crate::line_file::LineFile;

/// The processor version written into dead letters.
pub const PROCESSOR_VERSION: &str = concat!("idgraph ", env!("CARGO_PKG_VERSION"));

/// The output files of one run.
pub struct OutputFiles {
    enriched: LineFile,
    profiles: LineFile,
    changes: LineFile,
    dead_letters: LineFile,
    quality_path: PathBuf,
}

impl OutputFiles {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output directory {}", dir.display()))?;
        Ok(OutputFiles {
            enriched: LineFile::create(&dir.join("enriched.jsonl"))?,
            profiles: LineFile::create(&dir.join("profiles.jsonl"))?,
            changes: LineFile::create(&dir.join("identity-changes.jsonl"))?,
            dead_letters: LineFile::create(&dir.join("dead-letter.jsonl"))?,
            quality_path: dir.join("quality.json"),
        })
    }

    fn write_batch(&mut self, outcome: &BatchOutcome) -> Result<()> {
        self.enriched.write_lines(&outcome.enriched)?;
        self.profiles.write_lines(&outcome.profiles)?;
        self.changes.write_lines(&outcome.changes)?;
        self.dead_letters.write_lines(&outcome.dead_letters)?;
        Ok(())
    }

    /// Writes what the line files still hold, then the quality report.
    fn finish(mut self, quality: &QualityReport) -> Result<()> {
        for file in [
            &mut self.enriched,
            &mut self.profiles,
            &mut self.changes,
            &mut self.dead_letters,
        ] {
            file.finish()?;
        }
        let mut text = serde_json::to_string_pretty(quality)?;
        text.push('\n');
        std::fs::write(&self.quality_path, text)
            .with_context(|| format!("cannot write {}", self.quality_path.display()))
    }
}

/// Encodes each batch's changed profiles, commits the batch to the state store and then
/// writes its records, on a thread of its own and in batch order, so that all of it overlaps
/// resolving the next batch. A batch's records reach the files only after its state is
/// committed. At most two batches wait for it; a slower disk slows the resolver down instead
/// of filling memory.
struct Committer<'scope> {
    batches: SyncSender<(Arc<WriteSet>, ResolvedBatch)>,
    /// One message per committed batch, sent before its records are encoded.
    committed: Receiver<()>,
    committed_count: u64,
    sent_count: u64,
    /// Committed batches whose records are written, handed back to be dropped where they
    /// were made (see [`Committer::start`]).
    spent: Receiver<SpentBatch>,
    /// The files, and the thread's CPU seconds.
    thread: ScopedJoinHandle<'scope, Result<(OutputFiles, Option<f64>)>>,
}

impl<'scope> Committer<'scope> {
    fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        store: &'scope mut RocksStore,
        mut outputs: OutputFiles,
    ) -> Self {
        let (batches, receiver) =
            std::sync::mpsc::sync_channel::<(Arc<WriteSet>, ResolvedBatch)>(2);
        let (committed_sender, committed) = std::sync::mpsc::channel();
        // Freeing memory that another thread allocated costs mimalloc more than freeing its
        // own: the block goes on a shared list that the owner must collect later. Most of a
        // batch (the write set, enriched events, identity changes) is made by the resolver,
        // so it goes back there to be dropped; the profile records are made here and are
        // dropped here. Measured: committer CPU about -10%, resolver CPU within noise.
        let (spent_sender, spent) = std::sync::mpsc::channel();
        let thread = scope.spawn(move || {
            let cpu_before = thread_cpu_seconds();
            for (writes, resolved) in receiver {
                let (mut outcome, profile_writes) = resolved.encode_profiles();
                store
                    .write_parts(&[&writes, &profile_writes])
                    .context("cannot commit a batch to the state store")?;
                // The resolver may be gone after an error of its own; the records still go out.
                let _ = committed_sender.send(());
                outputs.write_batch(&outcome)?;
                drop(std::mem::take(&mut outcome.profiles));
                let _ = spent_sender.send((writes, outcome));
            }
            Ok((outputs, since(cpu_before, thread_cpu_seconds())))
        });
        Committer {
            batches,
            committed,
            spent,
            committed_count: 0,
            sent_count: 0,
            thread,
        }
    }

    /// Queues a resolved batch; fails with the committer's own error if it stopped.
    fn send(mut self, writes: Arc<WriteSet>, resolved: ResolvedBatch) -> Result<Self> {
        match self.batches.send((writes, resolved)) {
            Ok(()) => {
                self.sent_count += 1;
                Ok(self)
            }
            Err(_) => Err(self.failure()),
        }
    }

    /// Waits until every batch sent so far except the newest is committed.
    fn wait_for_all_but_newest(mut self) -> Result<Self> {
        self.drop_spent();
        while self.committed_count + 1 < self.sent_count {
            match self.committed.recv() {
                Ok(()) => self.committed_count += 1,
                Err(_) => return Err(self.failure()),
            }
        }
        Ok(self)
    }

    /// Drops the batches the committer has finished with, on the calling thread.
    fn drop_spent(&self) {
        while self.spent.try_recv().is_ok() {}
    }

    /// The error that stopped the committer.
    fn failure(self) -> anyhow::Error {
        self.finish()
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("the committer stopped without an error"))
    }

    /// Waits until every queued batch is committed and written and hands the files back,
    /// with the committer's CPU seconds.
    fn finish(self) -> Result<(OutputFiles, Option<f64>)> {
        drop(self.batches);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the committer panicked"))?
    }
}

/// A batch the committer has committed and written out: only dropping it is left.
type SpentBatch = (Arc<WriteSet>, BatchOutcome);

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
    /// Where the CPU time went; `None` where /proc cannot tell.
    pub cpu: Option<StageCpu>,
    #[serde(skip)]
    pub stats: BatchStats,
}

/// CPU seconds each part of a file-mode run used.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StageCpu {
    /// Reading lines, parsing and normalizing them.
    pub reader: f64,
    /// Resolving batches against the state.
    pub resolver: f64,
    /// Encoding changed profiles, committing batches to RocksDB, writing the output files.
    pub committer: f64,
    /// The rest of the process: RocksDB's flushes and compactions, mostly.
    pub other: f64,
}

impl StageCpu {
    pub fn total(&self) -> f64 {
        self.reader + self.resolver + self.committer + self.other
    }

    /// One line: CPU seconds per part, and microseconds per input line.
    pub fn describe(&self, lines: u64) -> String {
        let per_line = |seconds: f64| seconds * 1e6 / (lines.max(1) as f64);
        format!(
            "cpu {:.2} s ({:.1} us/line): reader {:.2} s ({:.1}), resolver {:.2} s ({:.1}), committer {:.2} s ({:.1}), storage background and other {:.2} s ({:.1})",
            self.total(),
            per_line(self.total()),
            self.reader,
            per_line(self.reader),
            self.resolver,
            per_line(self.resolver),
            self.committer,
            per_line(self.committer),
            self.other,
            per_line(self.other)
        )
    }
}

/// Reads `input` line by line in batches of `batch_size`, resolving each batch against `store`
/// and writing its records to `outputs`. Progress goes to stderr every `progress` (if set).
///
/// Three threads share the work, handing whole batches on in order: one reads and prepares
/// (parses and normalizes) lines, this one resolves, and one commits each batch to the store
/// and then writes its records. The resolver reads the state through the newest batch's
/// uncommitted writes ([`ReadThrough`]), so the overlap does not change a byte of output.
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
    let lines = LineBatches {
        reader: BufReader::with_capacity(1 << 20, file),
        input_name: Arc::from(input.display().to_string()),
        batch_size: config.resolve.batch_size,
        default_source: &config.resolve.default_source,
        line_number: 0,
    };
    let started = Instant::now();
    let mut last_progress = started;
    let mut stats = BatchStats::default();
    let mut cache = StateCache::new(config.engine.cache.max_entries);
    let mut line_number = 0u64;
    let reader = store.reader();
    let process_cpu_before = process_cpu_seconds();
    let resolver_cpu_before = thread_cpu_seconds();
    let (outputs, reader_cpu, committer_cpu) = std::thread::scope(|scope| {
        // One prepared batch waits while the next is being prepared: enough to keep the
        // resolver busy without holding more than two batches of parsed events.
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Result<PreparedBatch>>(1);
        let preparer = scope.spawn(move || lines.prepare_all(engine, sender));
        let mut committer = Committer::start(scope, store, outputs);
        // The newest batch handed to the committer, which may not be committed yet.
        let mut latest: Option<PendingWrites> = None;
        for prepared in receiver {
            let prepared = prepared?;
            line_number = prepared.last_line;
            // Every batch before the newest must be in the store; the newest is read through.
            committer = committer.wait_for_all_but_newest()?;
            let view = ReadThrough {
                pending: latest.as_ref(),
                store: &reader,
            };
            // The cache runs one batch ahead of the store: if that batch fails to commit,
            // the run stops and the cache goes with it.
            let mut resolved = engine.resolve_prepared(&view, &mut cache, prepared.messages)?;
            stats.absorb(std::mem::take(&mut resolved.outcome.stats));
            let writes = Arc::new(std::mem::take(&mut resolved.outcome.writes));
            latest =
                Some(PendingWrites::new(Arc::clone(&writes)).with_profiles(resolved.profiles()));
            committer = committer.send(writes, resolved)?;
            if let Some(every) = progress {
                if last_progress.elapsed() >= every {
                    last_progress = Instant::now();
                    let rate = line_number as f64 / started.elapsed().as_secs_f64();
                    eprintln!("resolved {line_number} lines ({rate:.0} lines/s)");
                }
            }
        }
        let reader_cpu = preparer
            .join()
            .map_err(|_| anyhow::anyhow!("the input reader panicked"))?;
        let (outputs, committer_cpu) = committer.finish()?;
        anyhow::Ok((outputs, reader_cpu, committer_cpu))
    })?;
    // Flushing the files and writing the quality report happen on this thread: they count
    // as resolver time, and the process total covers the whole run.
    outputs.finish(&QualityReport::from_stats(&stats))?;
    let resolver_cpu = since(resolver_cpu_before, thread_cpu_seconds());
    let process_cpu = since(process_cpu_before, process_cpu_seconds());
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = stage_cpu(process_cpu, reader_cpu, resolver_cpu, committer_cpu);
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
        cpu,
        stats,
    })
}

/// The split of a run's CPU time, if every reading was taken. The threads' clocks tick in
/// hundredths of a second, so "other" is only as exact as that.
fn stage_cpu(
    process: Option<f64>,
    reader: Option<f64>,
    resolver: Option<f64>,
    committer: Option<f64>,
) -> Option<StageCpu> {
    let (reader, resolver, committer) = (reader?, resolver?, committer?);
    Some(StageCpu {
        reader,
        resolver,
        committer,
        other: (process? - reader - resolver - committer).max(0.0),
    })
}

/// A batch of input lines after [`Engine::prepare`].
struct PreparedBatch {
    messages: Vec<PreparedMessage>,
    /// The number of the batch's last line in the input file.
    last_line: u64,
}

/// Cuts a JSON Lines file into batches of lines with their coordinates.
struct LineBatches<'c> {
    reader: BufReader<File>,
    input_name: Arc<str>,
    batch_size: usize,
    default_source: &'c str,
    line_number: u64,
}

impl LineBatches<'_> {
    /// Prepares batch after batch and hands them to `sender` until the input ends, a read
    /// fails (the error is handed on) or the receiver hangs up. Returns the thread's CPU
    /// seconds.
    fn prepare_all(
        mut self,
        engine: &Engine,
        sender: std::sync::mpsc::SyncSender<Result<PreparedBatch>>,
    ) -> Option<f64> {
        let cpu_before = thread_cpu_seconds();
        self.prepare_until_done(engine, sender);
        since(cpu_before, thread_cpu_seconds())
    }

    fn prepare_until_done(
        &mut self,
        engine: &Engine,
        sender: std::sync::mpsc::SyncSender<Result<PreparedBatch>>,
    ) {
        let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(self.batch_size);
        let mut coordinates: Vec<InputCoordinates> = Vec::with_capacity(self.batch_size);
        loop {
            let next = match self.read_batch(&mut payloads, &mut coordinates) {
                Ok(()) if payloads.is_empty() => return,
                Ok(()) => {
                    let messages =
                        InputMessage::batch(&payloads, &coordinates, self.default_source);
                    Ok(PreparedBatch {
                        messages: messages.iter().map(|m| engine.prepare(m)).collect(),
                        last_line: self.line_number,
                    })
                }
                Err(error) => Err(error),
            };
            let failed = next.is_err();
            if sender.send(next).is_err() || failed {
                return;
            }
        }
    }

    /// Fills `payloads` and `coordinates` with the next batch of lines (none at the end).
    /// The line buffers of the last batch are reused: a fresh buffer per line grew through
    /// half a dozen reallocations on every line.
    fn read_batch(
        &mut self,
        payloads: &mut Vec<Vec<u8>>,
        coordinates: &mut Vec<InputCoordinates>,
    ) -> Result<()> {
        coordinates.clear();
        let mut filled = 0;
        while filled < self.batch_size {
            if filled == payloads.len() {
                payloads.push(Vec::new());
            }
            let line = &mut payloads[filled];
            if line.capacity() > KEEP_LINE_BUFFER_BYTES {
                // One huge line must not pin its memory for the rest of the run.
                *line = Vec::new();
            }
            line.clear();
            let read = self.reader.read_until(b'\n', line).with_context(|| {
                format!(
                    "cannot read {} after line {}",
                    self.input_name, self.line_number
                )
            })?;
            if read == 0 {
                break;
            }
            self.line_number += 1;
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            filled += 1;
            coordinates.push(InputCoordinates::File {
                file: self.input_name.clone(),
                line: self.line_number,
            });
        }
        payloads.truncate(filled);
        Ok(())
    }
}

/// Line buffers up to this size are kept from batch to batch.
const KEEP_LINE_BUFFER_BYTES: usize = 64 * 1024;

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
        if let Some(cpu) = &self.cpu {
            println!("{}", cpu.describe(self.lines));
        }
    }
}
