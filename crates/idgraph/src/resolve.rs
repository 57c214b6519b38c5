//! File mode: JSON Lines in, the five outputs of docs/formats.md §3 out, state in RocksDB.
//!
//! State is written behind, in checkpoints of `resolve.checkpoint_interval` batches. A batch's
//! enriched events, identity changes and dead letters are appended to the files as soon as it
//! is resolved; its profile records wait in a record cache. At the end of an interval the
//! newest profile record per changed customer is appended, the files are put on disk, and then
//! one RocksDB write commits the interval's state changes together with the input position and
//! the files' lengths. A run that finds such a checkpoint for its input (a rerun after a crash)
//! cuts the files back to those lengths and goes on from that line: the engine is
//! deterministic, so the files end up byte for byte as an uncrashed run's.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use idgraph_engine::{
    BatchOutcome, BatchStats, Engine, InputMessage, PendingWrites, PreparedMessage,
    ProfileRecordCache, ProfileUpdates, QualityReport, ReadThrough, StateCache, StateRead, Table,
    WriteOp,
};
use idgraph_model::InputCoordinates;
use idgraph_store_rocksdb::RocksStore;
use serde::{Deserialize, Serialize};

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
            enriched: LineFile::create(&dir.join(ENRICHED))?,
            profiles: LineFile::create(&dir.join(PROFILES))?,
            changes: LineFile::create(&dir.join(CHANGES))?,
            dead_letters: LineFile::create(&dir.join(DEAD_LETTERS))?,
            quality_path: dir.join(QUALITY),
        })
    }

    /// Opens the files a checkpoint describes, cut back to the lengths it recorded.
    fn resume(dir: &Path, lengths: &OutputLengths) -> Result<Self> {
        Ok(OutputFiles {
            enriched: LineFile::resume(&dir.join(ENRICHED), lengths.enriched)?,
            profiles: LineFile::resume(&dir.join(PROFILES), lengths.profiles)?,
            changes: LineFile::resume(&dir.join(CHANGES), lengths.identity_changes)?,
            dead_letters: LineFile::resume(&dir.join(DEAD_LETTERS), lengths.dead_letters)?,
            quality_path: dir.join(QUALITY),
        })
    }

    /// Writes a batch's records; its profile records wait for the checkpoint.
    fn write_batch(&mut self, outcome: &BatchOutcome) -> Result<()> {
        self.enriched.write_lines(&outcome.enriched)?;
        self.changes.write_lines(&outcome.changes)?;
        self.dead_letters.write_lines(&outcome.dead_letters)?;
        Ok(())
    }

    /// Puts every line written so far on disk and returns the files' lengths.
    fn checkpoint(&mut self, sync: bool) -> Result<OutputLengths> {
        Ok(OutputLengths {
            enriched: self.enriched.checkpoint(sync)?,
            profiles: self.profiles.checkpoint(sync)?,
            identity_changes: self.changes.checkpoint(sync)?,
            dead_letters: self.dead_letters.checkpoint(sync)?,
        })
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

const ENRICHED: &str = "enriched.jsonl";
const PROFILES: &str = "profiles.jsonl";
const CHANGES: &str = "identity-changes.jsonl";
const DEAD_LETTERS: &str = "dead-letter.jsonl";
const QUALITY: &str = "quality.json";

/// The output files' lengths in bytes at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputLengths {
    enriched: u64,
    profiles: u64,
    identity_changes: u64,
    dead_letters: u64,
}

/// What a file-mode checkpoint records besides the state and the input position (kept under
/// [`Table::Positions`] beside that position): where the outputs went and how long they were.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputCheckpoint {
    output_dir: PathBuf,
    lengths: OutputLengths,
    /// The run's quality counters up to the checkpoint, so that a rerun writes the
    /// `quality.json` of the whole input (absent in checkpoints of older versions).
    #[serde(default)]
    quality: BatchStats,
}

/// The key of an input's [`OutputCheckpoint`]: its position's key with a prefix.
fn output_checkpoint_key(input_name: &str) -> Vec<u8> {
    format!("outputs:file:{input_name}").into_bytes()
}

/// Where a run on `input_name` starts: the lines already resolved (the stored position) and
/// the outputs' checkpoint, if the state holds both.
fn resume_point(
    store: &impl StateRead,
    input_name: &str,
) -> Result<Option<(u64, OutputCheckpoint)>> {
    // The key the engine stores a file's position under.
    let stream = InputCoordinates::File {
        file: input_name.into(),
        line: 0,
    }
    .stream_key();
    let position = store.get(Table::Positions, stream.as_bytes())?;
    let outputs = store.get(Table::Positions, &output_checkpoint_key(input_name))?;
    let (Some(position), Some(outputs)) = (position, outputs) else {
        return Ok(None);
    };
    let lines: u64 = std::str::from_utf8(&position)
        .ok()
        .and_then(|text| text.parse().ok())
        .with_context(|| format!("the stored position of {input_name} is not a line number"))?;
    let outputs: OutputCheckpoint = serde_json::from_slice(&outputs)
        .with_context(|| format!("the stored output checkpoint of {input_name} is unreadable"))?;
    Ok(Some((lines, outputs)))
}

/// Where a run picks up: its output files, the input lines to skip, and the quality
/// counters of those lines.
pub struct Resumed {
    pub outputs: OutputFiles,
    pub after_line: u64,
    pub quality: BatchStats,
}

/// Opens the outputs of a run: fresh files, or, if the state has a checkpoint of this input,
/// the files it describes cut back to its lengths.
pub fn open_outputs(store: &impl StateRead, input: &Path, output_dir: &Path) -> Result<Resumed> {
    let input_name = input.display().to_string();
    let Some((lines, checkpoint)) = resume_point(store, &input_name)? else {
        return Ok(Resumed {
            outputs: OutputFiles::create(output_dir)?,
            after_line: 0,
            quality: BatchStats::default(),
        });
    };
    if !same_dir(&checkpoint.output_dir, output_dir) {
        bail!(
            "the state already holds {input_name} up to line {lines}, whose outputs went to {}; \
             rerun with --output-dir {} to finish that run, or use a new --state to resolve the \
             file again",
            checkpoint.output_dir.display(),
            checkpoint.output_dir.display()
        );
    }
    Ok(Resumed {
        outputs: OutputFiles::resume(output_dir, &checkpoint.lengths)?,
        after_line: lines,
        quality: checkpoint.quality,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Work for the committer, in order.
enum Commit {
    /// A resolved batch: its records go to the files now, its profile records to the cache.
    Batch(Box<(BatchOutcome, ProfileUpdates)>),
    /// The end of a checkpoint interval: the state changes of its batches, and the run's
    /// quality counters up to its last batch.
    Checkpoint(Arc<PendingWrites>, Box<BatchStats>),
}

/// Writes each batch's records and, at the end of each checkpoint interval, the interval's
/// profile records and then its state, on a thread of its own and in order, so that all of it
/// overlaps resolving the next batches. A checkpoint reaches the store only after every
/// record it covers is in the files: a crash between the two leaves records past the stored
/// checkpoint, which a rerun cuts off and makes again. At most two pieces of work wait for it;
/// a slower disk slows the resolver down instead of filling memory.
struct Committer<'scope> {
    work: SyncSender<Commit>,
    /// One message per committed checkpoint.
    committed: Receiver<()>,
    committed_count: u64,
    sent_count: u64,
    /// Batches whose records are written, handed back to be dropped where they were made
    /// (see [`Committer::start`]).
    spent: Receiver<BatchOutcome>,
    /// The files, and the thread's CPU seconds.
    thread: ScopedJoinHandle<'scope, Result<(OutputFiles, Option<f64>)>>,
}

impl<'scope> Committer<'scope> {
    fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        store: &'scope mut RocksStore,
        mut outputs: OutputFiles,
        checkpoint: CheckpointTarget,
    ) -> Self {
        let (work, receiver) = std::sync::mpsc::sync_channel::<Commit>(2);
        let (committed_sender, committed) = std::sync::mpsc::channel();
        // Freeing memory that another thread allocated costs mimalloc more than freeing its
        // own: the block goes on a shared list that the owner must collect later. Most of a
        // batch (enriched events, identity changes) is made by the resolver, so it goes back
        // there to be dropped; the profile records are made here and are dropped here.
        // Measured: committer CPU about -10%, resolver CPU within noise.
        let (spent_sender, spent) = std::sync::mpsc::channel();
        let thread = scope.spawn(move || {
            let cpu_before = thread_cpu_seconds();
            let mut records = ProfileRecordCache::default();
            for work in receiver {
                match work {
                    Commit::Batch(batch) => {
                        let (outcome, updates) = *batch;
                        outputs.write_batch(&outcome)?;
                        records.absorb(updates);
                        let _ = spent_sender.send(outcome);
                    }
                    Commit::Checkpoint(pending, quality) => {
                        let profiles = records.take_records(|id| pending.profile(id))?;
                        outputs.profiles.write_lines(&profiles)?;
                        drop(profiles);
                        let lengths = outputs.checkpoint(checkpoint.sync)?;
                        checkpoint.commit(store, &pending, lengths, *quality)?;
                        // The resolver may be gone after an error of its own.
                        let _ = committed_sender.send(());
                    }
                }
            }
            Ok((outputs, since(cpu_before, thread_cpu_seconds())))
        });
        Committer {
            work,
            committed,
            spent,
            committed_count: 0,
            sent_count: 0,
            thread,
        }
    }

    /// Queues a resolved batch's records; fails with the committer's own error if it stopped.
    fn send_batch(self, outcome: BatchOutcome, profiles: ProfileUpdates) -> Result<Self> {
        self.send(Commit::Batch(Box::new((outcome, profiles))))
    }

    /// Queues the end of a checkpoint interval.
    fn send_checkpoint(
        mut self,
        pending: Arc<PendingWrites>,
        quality: &BatchStats,
    ) -> Result<Self> {
        self.sent_count += 1;
        self.send(Commit::Checkpoint(pending, Box::new(quality.clone())))
    }

    fn send(self, work: Commit) -> Result<Self> {
        self.drop_spent();
        match self.work.send(work) {
            Ok(()) => Ok(self),
            Err(_) => Err(self.failure()),
        }
    }

    /// Waits until every checkpoint sent so far is in the store.
    fn wait_for_checkpoints(mut self) -> Result<Self> {
        while self.committed_count < self.sent_count {
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

    /// Waits until all queued work is done and hands the files back, with the committer's
    /// CPU seconds.
    fn finish(self) -> Result<(OutputFiles, Option<f64>)> {
        drop(self.work);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the committer panicked"))?
    }
}

/// How a checkpoint is committed: under which key its output lengths go, and whether the
/// files are synced to the disk first (`storage.sync_writes`).
struct CheckpointTarget {
    key: Vec<u8>,
    output_dir: PathBuf,
    sync: bool,
    /// `engine.duplicates` and `engine.retention`: after each checkpoint the store may drop
    /// event and evidence records past them.
    retention: idgraph_engine::duplicates::Retention,
}

impl CheckpointTarget {
    /// One atomic write: the last change per key of the interval's batches (their input
    /// position among them), the changed profiles' records, the outputs' lengths and the
    /// quality counters.
    fn commit(
        &self,
        store: &mut RocksStore,
        pending: &PendingWrites,
        lengths: OutputLengths,
        quality: BatchStats,
    ) -> Result<()> {
        let outputs = OutputCheckpoint {
            output_dir: self.output_dir.clone(),
            lengths,
            quality,
        };
        let marker = WriteOp::Put {
            table: Table::Positions,
            key: self.key.clone(),
            value: serde_json::to_vec(&outputs)?,
        };
        pending
            .commit(store, &[&marker])
            .context("cannot commit a checkpoint to the state store")?;
        idgraph_engine::duplicates::expire_old_records(store, self.retention)
            .context("cannot read the committed event clock")
    }
}

/// What a run did, for the summary and the benchmark.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// Lines this run resolved.
    pub lines: u64,
    /// Lines a checkpoint of an earlier run had already resolved; this run started after them.
    pub resumed_after: u64,
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
/// and writing its records to files in `output_dir`. Progress goes to stderr every `progress`
/// (if set). If `store` holds a checkpoint of `input`, the run goes on from it (see the
/// module's documentation).
///
/// Three threads share the work, handing whole batches on in order: one reads and prepares
/// (parses and normalizes) lines, this one resolves, and one writes records and commits
/// checkpoints. The resolver reads the state through the checkpoints not yet committed
/// ([`ReadThrough`]), so the overlap does not change a byte of output.
pub fn resolve_file(
    config: &AppConfig,
    engine: &Engine,
    store: &mut RocksStore,
    input: &Path,
    output_dir: &Path,
    progress: Option<Duration>,
) -> Result<RunSummary> {
    let file =
        File::open(input).with_context(|| format!("cannot open input file {}", input.display()))?;
    let Resumed {
        outputs,
        after_line: resumed_after,
        quality: resumed_quality,
    } = open_outputs(&*store, input, output_dir)?;
    if resumed_after > 0 {
        eprintln!(
            "resuming {} after line {resumed_after}, the state's last checkpoint",
            input.display()
        );
    }
    let input_name = input.display().to_string();
    let checkpoint = CheckpointTarget {
        key: output_checkpoint_key(&input_name),
        output_dir: output_dir
            .canonicalize()
            .unwrap_or_else(|_| output_dir.to_owned()),
        sync: config.storage.sync_writes,
        retention: config.engine.retention(),
    };
    let lines = LineBatches {
        reader: BufReader::with_capacity(1 << 20, file),
        input_name: Arc::from(input_name),
        batch_size: config.resolve.batch_size,
        default_source: &config.resolve.default_source,
        line_number: 0,
        skip_lines: resumed_after,
    };
    let interval = config.resolve.checkpoint_interval;
    let started = Instant::now();
    let mut last_progress = started;
    // Counters of the lines a checkpoint covers already, so quality.json covers the input.
    let mut stats = resumed_quality;
    let mut cache = StateCache::with_megabytes(config.engine.cache.max_mb);
    let mut line_number = resumed_after;
    let reader = store.reader();
    cache.preload(&reader)?;
    let process_cpu_before = process_cpu_seconds();
    let resolver_cpu_before = thread_cpu_seconds();
    let (outputs, reader_cpu, committer_cpu) = std::thread::scope(|scope| {
        // One prepared batch waits while the next is being prepared: enough to keep the
        // resolver busy without holding more than two batches of parsed events.
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Result<PreparedBatch>>(1);
        let preparer = scope.spawn(move || lines.prepare_all(engine, sender));
        let mut committer = Committer::start(scope, store, outputs, checkpoint);
        // The batches since the last checkpoint, and the last checkpoint, which may not be
        // committed yet; everything older is in the store.
        let mut open = PendingWrites::default();
        let mut committing: Option<Arc<PendingWrites>> = None;
        for prepared in receiver {
            let prepared = prepared?;
            line_number = prepared.last_line;
            let layers: Vec<&PendingWrites> = std::iter::once(&open)
                .chain(committing.as_deref())
                .collect();
            let view = ReadThrough {
                pending: &layers,
                store: &reader,
            };
            // The cache runs ahead of the store: if a checkpoint fails to commit, the run
            // stops and the cache goes with it.
            let mut resolved = engine.resolve_prepared(&view, &mut cache, prepared.messages)?;
            stats.absorb(std::mem::take(&mut resolved.outcome.stats));
            let writes = Arc::new(std::mem::take(&mut resolved.outcome.writes));
            // The batch's profiles stay in the cache (pinned) until the checkpoint takes them:
            // nothing else holds them meanwhile, so the next batches change them in place.
            cache.pin_customers(resolved.profile_ids());
            open.push(writes, std::iter::empty());
            let (outcome, profiles) = resolved.split();
            committer = committer.send_batch(outcome, profiles)?;
            if open.batches() >= interval {
                // Only one checkpoint is committed at a time: the resolver then reads through
                // at most two.
                committer = committer.wait_for_checkpoints()?;
                let done = Arc::new(open.close(&mut cache));
                committer = committer.send_checkpoint(Arc::clone(&done), &stats)?;
                committing = Some(done);
            }
            if let Some(every) = progress {
                if last_progress.elapsed() >= every {
                    last_progress = Instant::now();
                    let rate =
                        (line_number - resumed_after) as f64 / started.elapsed().as_secs_f64();
                    eprintln!(
                        "resolved {line_number} lines ({rate:.0} lines/s, state cache {} MiB, \
                         of which node and blocking indexes {} MiB)",
                        cache.estimated_bytes() >> 20,
                        cache.index_bytes() >> 20
                    );
                }
            }
        }
        if !open.is_empty() {
            let done = open.close(&mut cache);
            committer = committer.send_checkpoint(Arc::new(done), &stats)?;
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
    let lines = line_number - resumed_after;
    Ok(RunSummary {
        lines,
        resumed_after,
        events: stats.total_events(),
        dead_letters: stats.total_dead_letters(),
        profiles_created: stats.profiles_created,
        merges: stats.merges,
        merges_refused: stats.merges_refused.values().sum(),
        fuzzy_links: stats.fuzzy_links,
        elapsed_secs: elapsed,
        events_per_sec: lines as f64 / elapsed.max(1e-9),
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
    /// Lines at the start that an earlier run resolved: read past, not resolved again.
    skip_lines: u64,
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
        self.skip_resolved_lines()?;
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

impl LineBatches<'_> {
    fn skip_resolved_lines(&mut self) -> Result<()> {
        let mut line = Vec::new();
        while self.line_number < self.skip_lines {
            line.clear();
            let read = self.reader.read_until(b'\n', &mut line).with_context(|| {
                format!(
                    "cannot read {} after line {}",
                    self.input_name, self.line_number
                )
            })?;
            if read == 0 {
                bail!(
                    "{} has {} lines, fewer than the {} the state's checkpoint says were \
                     resolved: it is not the file that run read",
                    self.input_name,
                    self.line_number,
                    self.skip_lines
                );
            }
            self.line_number += 1;
        }
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
