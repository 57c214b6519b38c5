//! The Kafka subcommands: the development broker, the worker, and the load/dump tools.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use idgraph_kafka::worker::RunOptions;
use idgraph_kafka::{tools, DevBroker, Worker};

use crate::config::AppConfig;
use crate::resolve::{open_state, PROCESSOR_VERSION};

/// A flag that turns true on SIGINT or SIGTERM, watched from a small runtime thread.
pub fn stop_on_signal() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal-handling runtime")?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler installs");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
        })
    });
    Ok(stop)
}

/// Runs the mock cluster until SIGINT/SIGTERM, after printing (and optionally writing) its
/// bootstrap list.
pub fn broker(
    config: &AppConfig,
    brokers: i32,
    partitions: i32,
    output_partitions: i32,
    bootstrap_file: Option<&Path>,
) -> Result<()> {
    let stop = stop_on_signal()?;
    let broker = DevBroker::start(&config.kafka, brokers, partitions, output_partitions)?;
    let bootstrap = broker.bootstrap_servers();
    if let Some(path) = bootstrap_file {
        // Written atomically so a reader never sees half a line.
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, format!("{bootstrap}\n"))
            .with_context(|| format!("cannot write {}", temp.display()))?;
        std::fs::rename(&temp, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("bootstrap servers: {bootstrap}");
    println!(
        "topics: {} ({partitions} partition(s) per source topic, {output_partitions} per output topic)",
        topic_list(config)
    );
    println!("fault injection: write \"down N\" or \"up N\" (broker id N, from 1) to stdin");
    std::io::stdout().flush()?;
    let commands = fault_commands();
    while !stop.load(Ordering::SeqCst) {
        while let Ok((id, up)) = commands.try_recv() {
            match broker.set_broker_up(id, up) {
                Ok(()) => eprintln!("broker {id} is {}", if up { "up" } else { "down" }),
                Err(error) => eprintln!("cannot change broker {id}: {error}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("broker stopping");
    Ok(())
}

/// Reads `down N` / `up N` lines from stdin. The mock cluster is driven from the thread that
/// owns it, so the reader only forwards what it reads.
fn fault_commands() -> std::sync::mpsc::Receiver<(i32, bool)> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            let mut words = line.split_whitespace();
            let command = match (
                words.next(),
                words.next().and_then(|n| n.parse::<i32>().ok()),
            ) {
                (Some("down"), Some(id)) => (id, false),
                (Some("up"), Some(id)) => (id, true),
                _ => {
                    eprintln!("unknown command {line:?}; use \"down N\" or \"up N\"");
                    continue;
                }
            };
            if sender.send(command).is_err() {
                break;
            }
        }
    });
    receiver
}

fn topic_list(config: &AppConfig) -> String {
    let mut topics: Vec<&str> = config.kafka.sources.values().map(String::as_str).collect();
    topics.extend(config.kafka.outputs.all());
    topics.join(", ")
}

/// The streaming worker.
pub fn run(config: &AppConfig, state: &Path, exit_when_idle: Option<u64>) -> Result<()> {
    let stop = stop_on_signal()?;
    let engine = idgraph_engine::Engine::new(config.engine.clone(), PROCESSOR_VERSION)?;
    let (store, _) = open_state(config, Some(state))?;
    let mut worker = Worker::new(
        &engine,
        store,
        config.kafka.clone(),
        config.engine.cache.max_entries,
    )?;
    tracing::info!(bootstrap = %config.kafka.bootstrap_servers, state = %state.display(), "worker starting");
    let summary = worker.run(
        &stop,
        RunOptions {
            exit_when_idle: exit_when_idle.map(Duration::from_secs),
        },
    )?;
    let stats = &summary.stats;
    println!(
        "batches {}  messages {}  events {}  dead letters {}  profiles created {}  merges {}  merges refused {}  replayed batches {}  delivery retries {}",
        summary.batches,
        summary.messages,
        stats.total_events(),
        stats.total_dead_letters(),
        stats.profiles_created,
        stats.merges,
        stats.merges_refused.values().sum::<u64>(),
        summary.replayed_batches,
        summary.delivery_retries
    );
    println!(
        "elapsed {:.2} s  throughput {:.0} messages/s",
        summary.elapsed_secs,
        summary.messages as f64 / summary.elapsed_secs.max(1e-9)
    );
    Ok(())
}

pub fn produce(config: &AppConfig, input: &Path, topic: Option<&str>) -> Result<()> {
    let file = File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let sent = tools::produce_lines(
        &config.kafka,
        BufReader::with_capacity(1 << 20, file),
        topic,
    )?;
    println!("sent {sent} messages");
    Ok(())
}

pub fn dump(config: &AppConfig, topic: &str, output: &Path) -> Result<()> {
    let file =
        File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    let mut writer = BufWriter::new(file);
    let count = tools::dump_topic(&config.kafka, topic, &mut writer)?;
    writer.flush()?;
    println!("wrote {count} records of {topic} to {}", output.display());
    Ok(())
}
