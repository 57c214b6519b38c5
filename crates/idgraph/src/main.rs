//! The `idgraph` command. Subcommands: `resolve` (file mode), `gen` (synthetic data with
//! truth), `eval` (accuracy against truth), `lookup` and `explain` (read the state), `bench`
//! (throughput, memory and accuracy at several sizes) and `demo` (all of it on generated data,
//! no external services).

mod commands;
mod config;
mod cpu;
mod http;
mod line_file;
mod resolve;
mod soak;
mod streaming;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::{AppConfig, LogFormat};

/// The engine allocates many short-lived strings and profile copies per event; mimalloc
/// handles that churn markedly better than the system allocator (see the bench numbers in
/// README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the same index in mimalloc 2 and 3); the Rust
/// bindings do not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Every batch frees and reallocates megabytes of records. With mimalloc's default 10 ms
/// purge delay those pages go back to the OS and fault in again, zeroed, on the next batch
/// (8% of file-mode time in perf, 220k minor faults per 100k events); one second keeps them
/// for the next batch at the cost of a few tens of MiB. Ten seconds also keeps the memory
/// that is free for longer than a batch (hash tables that grew, the big vectors of a busy
/// batch): on 1M events, minor page faults fell from about 152k to 105k against one second,
/// for 80-170 MiB more peak memory.
fn keep_freed_memory_between_batches() {
    // SAFETY: setting an allocator option is thread-safe and takes effect on the next purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10000) };
}

#[derive(Parser)]
#[command(
    name = "idgraph",
    version,
    about = "Streaming customer-identity resolution"
)]
struct Cli {
    /// A TOML file with settings that differ from config/default.toml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers; overrides kafka.bootstrap_servers.
    #[arg(long, global = true)]
    bootstrap_servers: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Resolve a JSON Lines file of touchpoints into profiles, changes and dead letters.
    Resolve {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output_dir: PathBuf,
        /// State directory; reuse it to continue the same identity graph. Default: temporary.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Generate synthetic touchpoints across the five sources, with ground truth.
    Gen {
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Corruption mix: "normal" (nicknames, a few typos) or "hard" (keyboard and OCR
        /// typos, phonetic spellings, missing and swapped fields, mistyped dates, emails and
        /// phone numbers).
        #[arg(long, default_value = "normal")]
        noise: idgraph_synth::Noise,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        truth: PathBuf,
    },
    /// Estimate the fuzzy model's m and u from an unlabelled JSON Lines file (EM, as Splink
    /// does) and write them as a config file to pass with --config.
    Train {
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "trained.toml")]
        output: PathBuf,
        /// Most random pairs (for u) and most candidate pairs (for m).
        #[arg(long, default_value_t = 1_000_000)]
        max_pairs: usize,
    },
    /// Score an enriched.jsonl against a truth file: pairwise and B-cubed precision/recall.
    Eval {
        #[arg(long)]
        truth: PathBuf,
        #[arg(long)]
        enriched: PathBuf,
        /// profiles.jsonl whose tombstones say which customers merged later (default: the one
        /// next to --enriched, if present).
        #[arg(long)]
        profiles: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a profile by customer id (following merges) or by one of its identifiers.
    Lookup {
        #[arg(long)]
        state: PathBuf,
        #[arg(long, conflicts_with_all = ["kind", "value"])]
        customer: Option<String>,
        #[arg(long, requires = "value")]
        kind: Option<String>,
        #[arg(long, requires = "kind")]
        value: Option<String>,
    },
    /// Explain why the members of a profile are linked, from the stored evidence.
    Explain {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        customer: String,
    },
    /// Check a configuration (`--config FILE`, then the environment) as `run` and `resolve`
    /// would at start, without opening a state or connecting to anything: every key and value,
    /// the match model, the profile API's exposure and the librdkafka properties.
    Validate,
    /// Serve the HTTP profile API (and /healthz, /readyz) over a state directory until
    /// SIGINT/SIGTERM, e.g. after `resolve --state DIR`. A running worker serves the same API
    /// itself; RocksDB lets only one process open a directory.
    Serve {
        #[arg(long)]
        state: PathBuf,
        /// Address of the profile API; overrides http.api_listen.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Measure throughput, memory and accuracy on generated data with RocksDB on disk.
    Bench {
        /// Event counts to run, comma separated; ratios are against the first.
        #[arg(long, value_delimiter = ',', default_values_t = [100_000usize, 1_000_000])]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for generated data and state (default: a temporary one).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Run the development Kafka broker (librdkafka's mock cluster) until SIGINT/SIGTERM.
    Broker {
        #[arg(long, default_value_t = 1)]
        brokers: i32,
        /// Partitions of every source topic.
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Partitions of every output topic. The mock broker keeps only the last 5 MB of each
        /// partition, so more partitions keep more output readable.
        #[arg(long, default_value_t = 16)]
        output_partitions: i32,
        /// Also write the bootstrap list to this file.
        #[arg(long)]
        bootstrap_file: Option<PathBuf>,
    },
    /// The streaming worker: consume the source topics, produce the outputs.
    Run {
        #[arg(long)]
        state: PathBuf,
        /// Exit after this many seconds without a new message.
        #[arg(long)]
        exit_when_idle: Option<u64>,
    },
    /// Send each line of a JSON Lines file to the topic of its "source" (or --topic).
    Produce {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        topic: Option<String>,
    },
    /// Write every record of a topic (key, headers, value) as JSON Lines.
    Dump {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        output: PathBuf,
    },
    /// Benchmark the worker against raw consume->produce passthrough on an in-process broker.
    BenchKafka {
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Partitions of the input topic (the mock broker keeps 5 MB per partition).
        #[arg(long, default_value_t = 16)]
        partitions: i32,
    },
    /// Run the worker as its own process over a long generated stream on the development
    /// broker, printing its resident memory as it goes (is it flat after warm-up?)
    Soak {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 16)]
        partitions: i32,
        /// Most messages produced ahead of the worker (the mock broker keeps 5 MB per
        /// partition, so the stream is produced as it is consumed).
        #[arg(long, default_value_t = 40_000)]
        max_outstanding: u64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 5)]
        sample_secs: u64,
        /// Kill the worker with SIGKILL once it has consumed this share of the stream (0 to
        /// 1), start it again on its state and print how long it took to send and consume
        /// again.
        #[arg(long)]
        kill_at: Option<f64>,
    },
    /// A local demo with no external services: generated touchpoints through the development
    /// broker and the worker, scored against the generator's truth.
    Demo {
        #[arg(long, default_value_t = 50_000)]
        events: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Keep the generated data, outputs and state here instead of a temporary directory.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Resolve the file directly instead of going through Kafka.
        #[arg(long)]
        file_mode: bool,
    },
}

fn init_logging(config: &AppConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

/// Raises the soft limit on open descriptors to the hard one, as Go's runtime does: RocksDB's
/// files, librdkafka's sockets and the HTTP connections share it, and the soft default
/// (often 1,024) is a leftover of `select`, which nothing here uses.
fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        // A refusal leaves the old limit, which still works.
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

fn main() -> Result<()> {
    keep_freed_memory_between_batches();
    raise_descriptor_limit();
    let cli = Cli::parse();
    let mut config = AppConfig::load(cli.config.as_deref())?;
    if let Some(servers) = cli.bootstrap_servers {
        config.kafka.bootstrap_servers = servers;
    }
    init_logging(&config);
    match cli.command {
        Command::Resolve {
            input,
            output_dir,
            state,
        } => commands::resolve(&config, &input, &output_dir, state.as_deref()),
        Command::Gen {
            events,
            seed,
            noise,
            output,
            truth,
        } => commands::gen(events, seed, noise, &output, &truth),
        Command::Train {
            input,
            output,
            max_pairs,
        } => train::train(&config, &input, &output, max_pairs),
        Command::Eval {
            truth,
            enriched,
            profiles,
            json,
        } => commands::eval(&truth, &enriched, profiles.as_deref(), json),
        Command::Lookup {
            state,
            customer,
            kind,
            value,
        } => commands::lookup(&config, &state, customer.as_deref(), kind.zip(value)),
        Command::Explain { state, customer } => commands::explain(&config, &state, &customer),
        Command::Validate => commands::validate(&config, cli.config.as_deref()),
        Command::Serve { state, listen } => commands::serve(
            &config,
            &state,
            listen.as_deref().unwrap_or(&config.http.api_listen),
        ),
        Command::Bench {
            sizes,
            seed,
            work_dir,
        } => commands::bench(&config, &sizes, seed, work_dir.as_deref()),
        Command::Broker {
            brokers,
            partitions,
            output_partitions,
            bootstrap_file,
        } => streaming::broker(
            &config,
            brokers,
            partitions,
            output_partitions,
            bootstrap_file.as_deref(),
        ),
        Command::Run {
            state,
            exit_when_idle,
        } => streaming::run(&config, &state, exit_when_idle),
        Command::Produce { input, topic } => streaming::produce(&config, &input, topic.as_deref()),
        Command::Dump { topic, output } => streaming::dump(&config, &topic, &output),
        Command::BenchKafka {
            events,
            seed,
            partitions,
        } => streaming::bench_kafka(&config, events, seed, partitions),
        Command::Soak {
            events,
            seed,
            partitions,
            max_outstanding,
            sample_secs,
            kill_at,
        } => soak::soak(
            &config,
            &soak::SoakOptions {
                events,
                seed,
                partitions,
                max_outstanding,
                sample_every: std::time::Duration::from_secs(sample_secs.max(1)),
                kill_at,
            },
        ),
        Command::Demo {
            events,
            seed,
            keep,
            file_mode,
        } => commands::demo(&config, events, seed, keep.as_deref(), file_mode),
    }
}
