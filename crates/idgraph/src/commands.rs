//! The subcommands. Each reads its inputs, calls the libraries and prints a result; the work
//! itself lives in the engine, the store, the generator and [`crate::resolve`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use idgraph_engine::read::{customer_for_identifier, explain as explain_profile, profile_by_id};
use idgraph_engine::{Engine, StateRead, StateStore, Table, WriteSet};
use idgraph_model::{
    parse_event, EnrichedEvent, IdentityChange, Profile, ProfileJson, ProfileRecord, WriteJson,
};
use idgraph_store_rocksdb::RocksStore;
use idgraph_synth::{evaluate, generate, Accuracy, GenConfig, GenSummary, Noise, TruthRecord};
use serde::Deserialize;

use crate::config::AppConfig;
use crate::cpu;
use crate::resolve::{open_state, resolve_file, RunSummary, PROCESSOR_VERSION};

fn engine(config: &AppConfig) -> Result<Engine> {
    Ok(Engine::new(config.engine.clone(), PROCESSOR_VERSION)?)
}

fn run_resolve(
    config: &AppConfig,
    input: &Path,
    output_dir: &Path,
    state: Option<&Path>,
) -> Result<RunSummary> {
    let engine = engine(config)?;
    let (mut store, _temp_state) = open_state(config, state)?;
    let progress = match config.resolve.progress_interval_secs {
        0 => None,
        secs => Some(Duration::from_secs(secs)),
    };
    resolve_file(config, &engine, &mut store, input, output_dir, progress)
}

pub fn resolve(
    config: &AppConfig,
    input: &Path,
    output_dir: &Path,
    state: Option<&Path>,
) -> Result<()> {
    let summary = run_resolve(config, input, output_dir, state)?;
    summary.print();
    println!("outputs in {}", output_dir.display());
    Ok(())
}

pub(crate) fn run_gen(config: &GenConfig, output: &Path, truth: &Path) -> Result<GenSummary> {
    let create = |path: &Path| -> Result<BufWriter<File>> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(BufWriter::with_capacity(1 << 20, file))
    };
    let mut events = create(output)?;
    let mut truth_file = create(truth)?;
    let summary = generate(config, &mut events, &mut truth_file)?;
    events.flush()?;
    truth_file.flush()?;
    Ok(summary)
}

pub fn gen(events: usize, seed: u64, noise: Noise, output: &Path, truth: &Path) -> Result<()> {
    let config = GenConfig {
        events,
        seed,
        noise,
        ..GenConfig::default()
    };
    let summary = run_gen(&config, output, truth)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// The two fields of an enriched line that evaluation needs.
#[derive(Deserialize)]
struct Assignment {
    event_id: String,
    customer_id: String,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (number, line) in BufReader::with_capacity(1 << 20, file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {} is not a valid record",
                path.display(),
                number + 1
            )
        })?;
        out.push(record);
    }
    Ok(out)
}

/// A profile record, read only for its merge redirect.
#[derive(Deserialize)]
struct Redirect {
    customer_id: String,
    #[serde(default)]
    merged_into: Option<String>,
}

/// Absorbed id → survivor, from the tombstones of a profiles.jsonl.
fn read_redirects(profiles: &Path) -> Result<HashMap<String, String>> {
    Ok(read_jsonl::<Redirect>(profiles)?
        .into_iter()
        .filter_map(|r| r.merged_into.map(|to| (r.customer_id, to)))
        .collect())
}

/// Follows merge redirects to the id that finally survived.
fn final_id<'a>(redirects: &'a HashMap<String, String>, mut id: &'a str) -> &'a str {
    for _ in 0..64 {
        match redirects.get(id) {
            Some(to) => id = to,
            None => break,
        }
    }
    id
}

/// Scores the final clustering: an enriched line carries the customer at the time of the
/// event, so later merges (tombstones in `profiles`) are followed first.
pub(crate) fn run_eval(truth: &Path, enriched: &Path, profiles: Option<&Path>) -> Result<Accuracy> {
    let truth: HashMap<String, String> = read_jsonl::<TruthRecord>(truth)?
        .into_iter()
        .map(|t| (t.event_id, t.customer))
        .collect();
    let assignments: Vec<Assignment> = read_jsonl(enriched)?;
    let redirects = match profiles {
        Some(path) => read_redirects(path)?,
        None => HashMap::new(),
    };
    Ok(evaluate(
        &truth,
        assignments
            .iter()
            .map(|a| (a.event_id.as_str(), final_id(&redirects, &a.customer_id))),
    ))
}

/// The profiles.jsonl written next to an enriched.jsonl, if there is one.
fn sibling_profiles(enriched: &Path) -> Option<PathBuf> {
    let candidate = enriched.with_file_name("profiles.jsonl");
    candidate.exists().then_some(candidate)
}

pub(crate) fn print_accuracy(accuracy: &Accuracy) {
    println!(
        "pairwise  precision {:.5}  recall {:.5}  f1 {:.5}",
        accuracy.pairwise_precision, accuracy.pairwise_recall, accuracy.pairwise_f1
    );
    println!(
        "b-cubed   precision {:.5}  recall {:.5}  f1 {:.5}",
        accuracy.bcubed_precision, accuracy.bcubed_recall, accuracy.bcubed_f1
    );
    println!(
        "clusters  true {}  predicted {}  largest true {}  largest predicted {}",
        accuracy.true_clusters,
        accuracy.predicted_clusters,
        accuracy.largest_true_cluster,
        accuracy.largest_predicted_cluster
    );
    println!(
        "events    scored {}  missing from resolution {}  unknown to truth {}",
        accuracy.events_scored, accuracy.missing_from_resolution, accuracy.unknown_to_truth
    );
}

pub fn eval(truth: &Path, enriched: &Path, profiles: Option<&Path>, json: bool) -> Result<()> {
    let profiles = profiles
        .map(Path::to_path_buf)
        .or_else(|| sibling_profiles(enriched));
    if let Some(path) = &profiles {
        eprintln!("following merges recorded in {}", path.display());
    }
    let accuracy = run_eval(truth, enriched, profiles.as_deref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&accuracy)?);
    } else {
        print_accuracy(&accuracy);
    }
    Ok(())
}

fn open_existing_state(config: &AppConfig, state: &Path) -> Result<RocksStore> {
    if !state.join("CURRENT").exists() {
        bail!(
            "{} is not an idgraph state directory (no RocksDB CURRENT file)",
            state.display()
        );
    }
    Ok(open_state(config, Some(state))?.0)
}

pub fn lookup(
    config: &AppConfig,
    state: &Path,
    customer: Option<&str>,
    identifier: Option<(String, String)>,
) -> Result<()> {
    let store = open_existing_state(config, state)?;
    let customer_id = match (customer, identifier) {
        (Some(id), _) => id.to_owned(),
        (None, Some((kind, value))) => {
            let normalizer = engine(config)?.normalizer().clone();
            match customer_for_identifier(&store, &normalizer, &kind, &value)? {
                Some(id) => id,
                None => bail!("no profile holds identifier {kind}={value:?}"),
            }
        }
        (None, None) => bail!("give --customer ID, or --kind KIND and --value VALUE"),
    };
    match profile_by_id(&store, &customer_id)? {
        Some(state) => println!("{}", serde_json::to_string_pretty(&state.profile)?),
        None => bail!("no profile with customer id {customer_id:?}"),
    }
    Ok(())
}

pub fn explain(config: &AppConfig, state: &Path, customer: &str) -> Result<()> {
    let store = open_existing_state(config, state)?;
    match explain_profile(&store, customer)? {
        Some(explanation) => println!("{}", serde_json::to_string_pretty(&explanation)?),
        None => bail!("no profile with customer id {customer:?}"),
    }
    Ok(())
}

/// Checks what `run` and `resolve` check at start, beyond what loading `config` did (every
/// key known, every value in range): the match model builds, the profile API is not exposed
/// without a token, and librdkafka takes every `kafka.client` property. Opens no state and
/// connects to nothing, so it can run in CI or before a rollout.
pub fn validate(config: &AppConfig, file: Option<&Path>) -> Result<()> {
    Engine::new(config.engine.clone(), PROCESSOR_VERSION)
        .context("engine settings (the match model) are invalid")?;
    if !config.http.api_listen.is_empty() {
        config
            .http
            .check_api_exposure(&config.http.api_listen, "http.api_listen")?;
    }
    idgraph_kafka::client::check_client_settings(&config.kafka)?;
    let source = file.map_or_else(
        || "the defaults".to_owned(),
        |file| format!("the defaults and {}", file.display()),
    );
    println!("the configuration is valid ({source}, then IDGRAPH__ environment overrides)");
    Ok(())
}

/// Serves the profile API over `state` on `listen`, and its own metrics and health on
/// `http.listen`, until SIGINT/SIGTERM.
pub fn serve(config: &AppConfig, state: &Path, listen: &str) -> Result<()> {
    if listen.trim().is_empty() {
        bail!("the profile API is off (http.api_listen is empty); give --listen ADDRESS");
    }
    let store = open_existing_state(config, state)?;
    let engine = engine(config)?;
    let metrics = idgraph_kafka::Metrics::with_labels(config.metric_labels());
    metrics
        .profile_identifier_limit
        .set(i64::from(config.engine.protection.max_profile_identifiers));
    let reader = store.reader();
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (operations, api) = crate::http::serve_sites(
        config,
        &engine,
        (metrics.clone(), ready),
        reader.clone(),
        (listen, "--listen"),
    )?;
    let api = api.context("the profile API has an address")?;
    println!(
        "serving http://{}/v1/profiles/{{customer_id}}, /v1/lookup?kind=K&value=V and /v1/profiles/{{customer_id}}/explain over {}; metrics and health at http://{}",
        api.address(),
        state.display(),
        operations.address()
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    let stop = crate::streaming::stop_on_signal()?;
    let mut next_refresh = std::time::Instant::now();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        if std::time::Instant::now() >= next_refresh {
            idgraph_kafka::gauges::refresh_local(&metrics, &reader.figures());
            next_refresh = std::time::Instant::now() + std::time::Duration::from_secs(10);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Requests under way finish before the state closes.
    drop(api);
    drop(operations);
    drop(store);
    Ok(())
}

/// Peak resident memory of this process, from /proc (Linux); `None` elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets the peak so the next reading covers only what follows (Linux ≥ 4.0).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The baseline for the benchmark's ratios: parsing and normalizing the same lines, with no
/// resolution and no storage. It is measured in the same run on the same machine.
fn parse_and_normalize_rate(engine: &Engine, input: &Path) -> Result<f64> {
    let bytes = std::fs::read(input)?;
    let started = Instant::now();
    let mut valid = 0u64;
    let mut lines = 0u64;
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        lines += 1;
        if let Ok(raw) = parse_event(line, "web") {
            let event = engine.normalizer().normalize(raw);
            valid += u64::from(!event.identifiers.is_empty() || !event.traits.is_empty());
        }
    }
    std::hint::black_box(valid);
    Ok(lines as f64 / started.elapsed().as_secs_f64())
}

/// A second floor for the benchmark: input lines per second at which the run's own output
/// records (enriched events, profiles, identity changes) can merely be encoded as JSON, with
/// the engine's encoders but no resolution, storage or file writes. Records are read back one
/// at a time and only their encoding is timed.
fn output_encoding_rate(out: &Path, lines: u64) -> Result<f64> {
    fn encode_all<T: serde::de::DeserializeOwned>(
        path: &Path,
        encode: impl Fn(&mut T, &mut Vec<u8>),
    ) -> Result<f64> {
        let reader = BufReader::new(File::open(path)?);
        let mut buffer = Vec::with_capacity(1 << 16);
        let mut seconds = 0.0;
        for line in reader.lines() {
            let mut record: T = serde_json::from_str(&line?)?;
            buffer.clear();
            let started = Instant::now();
            encode(&mut record, &mut buffer);
            seconds += started.elapsed().as_secs_f64();
            std::hint::black_box(&buffer);
        }
        Ok(seconds)
    }
    /// A profile record with its profile decoded, so that the floor encodes the profile field
    /// by field, as the engine does once per change, and then the record around it.
    #[derive(serde::Deserialize)]
    struct DecodedProfileRecord {
        #[serde(flatten)]
        record: ProfileRecord,
        #[serde(default)]
        profile: Option<Profile>,
    }
    let seconds = encode_all(&out.join("enriched.jsonl"), |e: &mut EnrichedEvent, b| {
        e.write_json(b)
    })? + encode_all(
        &out.join("profiles.jsonl"),
        |decoded: &mut DecodedProfileRecord, buffer| {
            decoded.record.profile = decoded.profile.as_ref().map(ProfileJson::encode);
            decoded.record.write_json(buffer);
        },
    )? + encode_all(
        &out.join("identity-changes.jsonl"),
        |c: &mut IdentityChange, b| c.write_json(b),
    )?;
    Ok(lines as f64 / seconds.max(1e-9))
}

/// A third floor: input lines per CPU-second at which RocksDB can merely store the state the
/// run ended with, every record written once, in sorted batches of `resolve.batch_size`
/// records, with the run's `[storage]` settings, then flushed. The run wrote at least that
/// much (and rewrote every profile each time it changed, in key order it did not choose), so
/// this is a lower bound on its storage cost. Process CPU time counts RocksDB's flush threads.
fn state_write_rate(config: &AppConfig, state: &Path, scratch: &Path, lines: u64) -> Result<f64> {
    let source = RocksStore::open(state, &config.storage)?;
    let batch_size = config.resolve.batch_size;
    let mut batches = Vec::new();
    for table in Table::ALL {
        let mut records = source.scan_prefix(table, b"")?.into_iter().peekable();
        while records.peek().is_some() {
            let mut batch = WriteSet::default();
            for (key, value) in records.by_ref().take(batch_size) {
                batch.put(table, key, value);
            }
            batches.push(batch);
        }
    }
    drop(source);
    let _ = std::fs::remove_dir_all(scratch);
    let mut target = RocksStore::open(scratch, &config.storage)?;
    let before = cpu::process_cpu_seconds();
    for batch in &batches {
        target.write(batch)?;
    }
    target.flush()?;
    let seconds = cpu::since(before, cpu::process_cpu_seconds());
    drop(target);
    std::fs::remove_dir_all(scratch)?;
    // /proc counts in 10 ms ticks: a small run may read zero, which is at most one tick.
    Ok(seconds.map_or(f64::NAN, |s| lines as f64 / s.max(0.01)))
}

/// The best rate per core the run could reach if resolving cost nothing: the three floors'
/// costs per line added up. Parsing and encoding run on one thread each, so their rates are
/// CPU rates too.
fn floors_line(parse: f64, outputs: f64, state: f64) -> String {
    let micros = |rate: f64| 1e6 / rate;
    let total = micros(parse) + micros(outputs) + micros(state);
    format!(
        "floors {:.1} us/line: parse+normalize {:.1}, output JSON {:.1}, state written once {:.1}; \
         at most {:.0} ev/cpu-s with resolution free",
        total,
        micros(parse),
        micros(outputs),
        micros(state),
        1e6 / total
    )
}

pub fn bench(
    config: &AppConfig,
    sizes: &[usize],
    seed: u64,
    work_dir: Option<&Path>,
) -> Result<()> {
    if sizes.is_empty() {
        bail!("--sizes needs at least one event count");
    }
    let temp = tempfile::Builder::new()
        .prefix("idgraph-bench-")
        .tempdir()?;
    let root = work_dir.unwrap_or(temp.path());
    let engine = engine(config)?;
    println!(
        "{:>10} {:>14} {:>12} {:>16} {:>14} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "events",
        "resolve ev/s",
        "ev/cpu-s",
        "baseline ev/s",
        "outputs ev/s",
        "vs baseline",
        "vs first",
        "peak MiB",
        "precision",
        "recall"
    );
    let mut first_rate = None;
    for &size in sizes {
        let dir = root.join(format!("n{size}"));
        let input = dir.join("events.jsonl");
        let truth = dir.join("truth.jsonl");
        run_gen(
            &GenConfig {
                events: size,
                seed,
                ..GenConfig::default()
            },
            &input,
            &truth,
        )?;
        let baseline = parse_and_normalize_rate(&engine, &input)?;
        let state = dir.join("state");
        let _ = std::fs::remove_dir_all(&state);
        reset_peak_rss();
        let (mut store, _) = open_state(config, Some(&state))?;
        let summary = resolve_file(config, &engine, &mut store, &input, &dir.join("out"), None)?;
        // Every thread counts (the output writer, RocksDB's background jobs): this is the
        // rate per core actually used.
        let per_cpu_second = summary
            .cpu
            .map_or(f64::NAN, |cpu| summary.lines as f64 / cpu.total().max(1e-9));
        drop(store);
        let peak = peak_rss_mib().unwrap_or(f64::NAN);
        let out = dir.join("out");
        let accuracy = run_eval(
            &truth,
            &out.join("enriched.jsonl"),
            Some(&out.join("profiles.jsonl")),
        )?;
        let output_rate = output_encoding_rate(&out, summary.lines)?;
        let state_rate = state_write_rate(config, &state, &dir.join("state-floor"), summary.lines)?;
        let rate = summary.events_per_sec;
        let first = *first_rate.get_or_insert(rate);
        println!(
            "{:>10} {:>14.0} {:>12.0} {:>16.0} {:>14.0} {:>12.3} {:>10.3} {:>10.0} {:>10.5} {:>10.5}",
            size,
            rate,
            per_cpu_second,
            baseline,
            output_rate,
            rate / baseline,
            rate / first,
            peak,
            accuracy.pairwise_precision,
            accuracy.pairwise_recall
        );
        if let Some(cpu) = &summary.cpu {
            println!("{:>10} {}", "", cpu.describe(summary.lines));
        }
        println!(
            "{:>10} {}",
            "",
            floors_line(baseline, output_rate, state_rate)
        );
        let hard = hard_mix_accuracy(config, &engine, &dir.join("hard"), size, seed)?;
        println!(
            "{:>10} hard mix: precision {:.5} recall {:.5} (B-cubed {:.5} / {:.5})",
            "",
            hard.pairwise_precision,
            hard.pairwise_recall,
            hard.bcubed_precision,
            hard.bcubed_recall
        );
    }
    Ok(())
}

/// Accuracy on the generator's hard corruption mix ([`Noise::Hard`]) at the same size and
/// seed: the matching quality figure, next to the speed figures of the normal mix.
fn hard_mix_accuracy(
    config: &AppConfig,
    engine: &Engine,
    dir: &Path,
    size: usize,
    seed: u64,
) -> Result<Accuracy> {
    let (input, truth) = (dir.join("events.jsonl"), dir.join("truth.jsonl"));
    let generated = GenConfig {
        events: size,
        seed,
        noise: Noise::Hard,
        ..GenConfig::default()
    };
    run_gen(&generated, &input, &truth)?;
    let state = dir.join("state");
    let _ = std::fs::remove_dir_all(&state);
    let (mut store, _) = open_state(config, Some(&state))?;
    let out = dir.join("out");
    resolve_file(config, engine, &mut store, &input, &out, None)?;
    run_eval(
        &truth,
        &out.join("enriched.jsonl"),
        Some(&out.join("profiles.jsonl")),
    )
}

/// Generates the demo's touchpoints and says what is in them.
pub(crate) fn generate_for_demo(
    events: usize,
    seed: u64,
    input: &Path,
    truth: &Path,
) -> Result<()> {
    println!(
        "== generating {events} touchpoints (seed {seed}) into {}",
        input.display()
    );
    let generated = run_gen(
        &GenConfig {
            events,
            seed,
            ..GenConfig::default()
        },
        input,
        truth,
    )?;
    println!(
        "   {} customers, {} malformed lines, {} Segment Spec messages, {} junk values, {} shared-device and {} call-centre events",
        generated.customers,
        generated.malformed,
        generated.segment_messages,
        generated.junk_values,
        generated.shared_device_events,
        generated.call_centre_events
    );
    Ok(())
}

/// The demo: streaming through the development broker by default, or file mode.
pub fn demo(
    config: &AppConfig,
    events: usize,
    seed: u64,
    keep: Option<&Path>,
    file_mode: bool,
) -> Result<()> {
    let temp = tempfile::Builder::new().prefix("idgraph-demo-").tempdir()?;
    let root: PathBuf = keep
        .map(Path::to_path_buf)
        .unwrap_or_else(|| temp.path().to_path_buf());
    if !file_mode {
        return crate::streaming::demo(config, events, seed, &root);
    }
    let input = root.join("events.jsonl");
    let truth = root.join("truth.jsonl");
    let output_dir = root.join("out");
    let state = root.join("state");
    let _ = std::fs::remove_dir_all(&state);
    generate_for_demo(events, seed, &input, &truth)?;
    println!("== resolving with RocksDB state in {}", state.display());
    let summary = run_resolve(config, &input, &output_dir, Some(&state))?;
    summary.print();
    for (rule, count) in &summary.stats.merges_refused {
        println!("   merges refused by {rule}: {count}");
    }
    println!("== accuracy against the generator's truth");
    let profiles = output_dir.join("profiles.jsonl");
    print_accuracy(&run_eval(
        &truth,
        &output_dir.join("enriched.jsonl"),
        Some(&profiles),
    )?);
    println!("== outputs in {}", output_dir.display());
    if keep.is_some() {
        println!(
            "   try: idgraph lookup --state {} --kind email --value <an email from events.jsonl>",
            state.display()
        );
    }
    Ok(())
}
