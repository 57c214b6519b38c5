//! The Kafka subcommands: the development broker, the worker, and the load/dump tools.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use idgraph_kafka::worker::RunOptions;
use idgraph_kafka::{tools, DevBroker, Metrics, Worker};
use idgraph_store_rocksdb::{RocksReader, RocksStore};

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
    println!(
        "fault injection on stdin: \"down N\" / \"up N\" (broker id N, from 1), \"produce-errors N\" (fail the next N produce requests), \"advertise N HOST:PORT\" (send clients to a proxy in front of broker N)"
    );
    std::io::stdout().flush()?;
    let commands = fault_commands();
    while !stop.load(Ordering::SeqCst) {
        while let Ok(fault) = commands.try_recv() {
            match fault {
                Fault::Broker(id, up) => match broker.set_broker_up(id, up) {
                    Ok(()) => eprintln!("broker {id} is {}", if up { "up" } else { "down" }),
                    Err(error) => eprintln!("cannot change broker {id}: {error}"),
                },
                Fault::ProduceErrors(count) => {
                    broker.fail_produce_requests(count);
                    eprintln!("the next {count} produce requests will fail");
                }
                Fault::Advertise(id, host, port) => match broker.advertise(id, &host, port) {
                    Ok(()) => eprintln!("broker {id} is advertised at {host}:{port}"),
                    Err(error) => eprintln!("cannot advertise broker {id}: {error}"),
                },
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("broker stopping");
    Ok(())
}

/// A fault to inject into the mock cluster.
enum Fault {
    /// Broker id, and whether it should be up.
    Broker(i32, bool),
    /// Fail this many produce requests.
    ProduceErrors(usize),
    /// Send clients to this host and port for the broker (a proxy in front of it).
    Advertise(i32, String, u16),
}

/// Reads `down N`, `up N`, `produce-errors N` and `advertise N HOST:PORT` lines from stdin.
/// The mock cluster is driven from the thread that owns it, so the reader only forwards what
/// it reads.
fn fault_commands() -> std::sync::mpsc::Receiver<Fault> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            let Some(command) = parse_fault(&line) else {
                eprintln!("unknown command {line:?}; use \"down N\", \"up N\", \"produce-errors N\" or \"advertise N HOST:PORT\"");
                continue;
            };
            if sender.send(command).is_err() {
                break;
            }
        }
    });
    receiver
}

fn parse_fault(line: &str) -> Option<Fault> {
    let mut words = line.split_whitespace();
    let command = words.next()?;
    let number: i32 = words.next()?.parse().ok()?;
    let fault = match command {
        "down" => Fault::Broker(number, false),
        "up" => Fault::Broker(number, true),
        "produce-errors" if number > 0 => Fault::ProduceErrors(number as usize),
        "advertise" => {
            let (host, port) = words.next()?.rsplit_once(':')?;
            Fault::Advertise(number, host.to_owned(), port.parse().ok()?)
        }
        _ => return None,
    };
    words.next().is_none().then_some(fault)
}

fn topic_list(config: &AppConfig) -> String {
    let mut topics: Vec<&str> = config.kafka.sources.values().map(String::as_str).collect();
    topics.extend(config.kafka.outputs.all());
    topics.join(", ")
}

/// A worker over the RocksDB state in `state`, whose gauges watch that state, and a read
/// handle on it for the profile API.
fn worker_on_state<'e>(
    config: &AppConfig,
    engine: &'e idgraph_engine::Engine,
    kafka: idgraph_kafka::KafkaConfig,
    state: &Path,
    metrics: Metrics,
) -> Result<(Worker<'e, RocksStore>, RocksReader)> {
    let (store, _) = open_state(config, Some(state))?;
    let reader = store.reader();
    let mut worker = Worker::new(engine, store, kafka, config.engine.cache.max_mb, metrics)?;
    let figures = reader.clone();
    worker.watch_store(move || figures.figures());
    Ok((worker, reader))
}

/// A worker over the RocksDB state in `state` with its HTTP servers started: operations on
/// `http.listen`, the profile API on `http.api_listen` unless that is empty.
fn served_worker<'e>(
    config: &AppConfig,
    engine: &'e idgraph_engine::Engine,
    kafka: idgraph_kafka::KafkaConfig,
    state: &Path,
) -> Result<(
    Worker<'e, RocksStore>,
    crate::http::HttpServer,
    Option<crate::http::HttpServer>,
)> {
    let metrics = Metrics::with_labels(config.metric_labels());
    let (worker, reader) = worker_on_state(config, engine, kafka, state, metrics.clone())?;
    let (operations, api) = crate::http::serve_sites(
        config,
        engine,
        (metrics, worker.readiness()),
        reader,
        (&config.http.api_listen, "http.api_listen"),
    )?;
    Ok((worker, operations, api))
}

/// Ends the process `timeout` after `stop` is set if it is still running then. A draining
/// worker waits for acknowledgements and writes a last checkpoint; with the broker gone that
/// took 92 s, past any orchestrator's grace period, which then kills it anyway. The state is
/// crash-safe, so exiting early loses nothing: what was unfinished is in the batch log and is
/// sent again on the next start. The log line says how much that is.
fn exit_when_a_stop_overruns(
    stop: Arc<AtomicBool>,
    watch: Arc<idgraph_kafka::ShutdownWatch>,
    timeout: Duration,
) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(timeout);
        tracing::warn!(
            timeout_ms = timeout.as_millis() as u64,
            batches_unacknowledged = watch.unacknowledged.load(Ordering::Relaxed),
            batches_since_checkpoint = watch.since_checkpoint.load(Ordering::Relaxed),
            "the worker did not finish stopping within kafka.shutdown_timeout_ms; exiting now: \
             those batches are in the batch log and are resolved and sent again on the next start"
        );
        std::process::exit(0);
    });
}

/// The streaming worker.
pub fn run(config: &AppConfig, state: &Path, exit_when_idle: Option<u64>) -> Result<()> {
    let stop = stop_on_signal()?;
    let engine = idgraph_engine::Engine::new(config.engine.clone(), PROCESSOR_VERSION)?;
    // The servers are dropped when the worker has stopped, so /metrics and /readyz answer
    // while it drains.
    let (mut worker, operations, api) =
        served_worker(config, &engine, config.kafka.clone(), state)?;
    let address = operations.address();
    let api_address = api
        .as_ref()
        .map_or_else(|| "off".to_owned(), |api| api.address().to_string());
    tracing::info!(%address, %api_address, "http listening: /metrics, /healthz and /readyz on address, /v1/profiles on api_address");
    tracing::info!(
        bootstrap = %config.kafka.bootstrap_servers,
        state = %state.display(),
        client = %idgraph_kafka::client::librdkafka_description(),
        "worker starting"
    );
    exit_when_a_stop_overruns(
        Arc::clone(&stop),
        worker.shutdown_watch(),
        Duration::from_millis(config.kafka.shutdown_timeout_ms),
    );
    let summary = worker.run(
        &stop,
        RunOptions {
            exit_when_idle: exit_when_idle.map(Duration::from_secs),
        },
    )?;
    let stats = &summary.stats;
    println!(
        "batches {}  messages {}  events {}  dead letters {}  profiles created {}  merges {}  merges refused {}  replayed batches {}  delivery retries {}  refused records {}",
        summary.batches,
        summary.messages,
        stats.total_events(),
        stats.total_dead_letters(),
        stats.profiles_created,
        stats.merges,
        stats.merges_refused.values().sum::<u64>(),
        summary.replayed_batches,
        summary.delivery_retries,
        summary.refused_records
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
    let count = tools::dump_topic(&config.kafka, topic, false, &mut writer)?;
    writer.flush()?;
    println!("wrote {count} records of {topic} to {}", output.display());
    Ok(())
}

/// Measures, in one run on one in-process broker: raw consume→produce passthrough of the
/// generated messages, then the worker on the same messages; prints both rates and their
/// ratio, and the worker's latencies.
pub fn bench_kafka(config: &AppConfig, events: usize, seed: u64, partitions: i32) -> Result<()> {
    use idgraph_synth::GenConfig;
    let temp = tempfile::Builder::new()
        .prefix("idgraph-bench-kafka-")
        .tempdir()?;
    let input = temp.path().join("events.jsonl");
    crate::commands::run_gen(
        &GenConfig {
            events,
            seed,
            ..GenConfig::default()
        },
        &input,
        &temp.path().join("truth.jsonl"),
    )?;
    let broker = DevBroker::start(&config.kafka, 1, partitions, 4)?;
    let mut kafka = config.kafka.clone();
    kafka.bootstrap_servers = broker.bootstrap_servers();
    let topic = kafka
        .sources
        .values()
        .next()
        .cloned()
        .context("no source topic configured")?;
    let file = File::open(&input)?;
    let sent = tools::produce_lines(&kafka, BufReader::new(file), Some(&topic))?;
    eprintln!("produced {sent} messages; running the passthrough baseline");
    let baseline_topic = "bench.passthrough";
    broker.create_topic(baseline_topic, partitions)?;
    let passthrough = tools::passthrough(&kafka, &topic, baseline_topic, sent)?;
    eprintln!(
        "passthrough moved {} messages in {:.2} s",
        passthrough.messages, passthrough.active_secs
    );
    let kcat = kcat_pipe(
        &kafka.bootstrap_servers,
        &topic,
        "bench.kcat",
        sent,
        &broker,
    )?;
    eprintln!("running the worker");
    let engine = idgraph_engine::Engine::new(config.engine.clone(), PROCESSOR_VERSION)?;
    let (mut worker, _) = worker_on_state(
        config,
        &engine,
        kafka.clone(),
        &temp.path().join("state"),
        Metrics::with_labels(config.metric_labels()),
    )?;
    let stop = AtomicBool::new(false);
    let summary = worker.run(
        &stop,
        RunOptions {
            exit_when_idle: Some(Duration::from_secs(2)),
        },
    )?;

    let passthrough_rate = passthrough.messages as f64 / passthrough.active_secs.max(1e-9);
    let worker_rate = summary.messages as f64 / summary.active_secs.max(1e-9);
    println!(
        "messages {sent} in {partitions} partition(s) of {topic}, batch size {}",
        kafka.batch_size
    );
    println!(
        "passthrough (consume -> produce)  {:>10.0} messages/s",
        passthrough_rate
    );
    match kcat {
        Some(seconds) => println!(
            "kcat -C | kcat -P (stock tools)   {:>10.0} messages/s",
            sent as f64 / seconds.max(1e-9)
        ),
        None => println!("kcat -C | kcat -P (stock tools)   not measured: kcat is not installed"),
    }
    println!(
        "worker (resolve, log, produce)    {:>10.0} messages/s",
        worker_rate
    );
    println!(
        "worker / passthrough              {:>10.3}",
        worker_rate / passthrough_rate
    );
    println!(
        "worker latency, poll -> outputs acknowledged       p50 {:.0} ms  p99 {:.0} ms",
        summary.poll_to_output_ms.quantile(0.5),
        summary.poll_to_output_ms.quantile(0.99)
    );
    println!(
        "worker latency, message timestamp -> acknowledged  p50 {:.0} ms  p99 {:.0} ms  (includes waiting in the backlog)",
        summary.timestamp_to_output_ms.quantile(0.5),
        summary.timestamp_to_output_ms.quantile(0.99)
    );
    Ok(())
}

/// Seconds that stock kcat takes to copy `topic` into `to` through a pipe
/// (`kcat -C -e | kcat -P`), the yardstick of the passthrough baseline; `None` if kcat is not
/// installed. The time includes both tools' start-up.
fn kcat_pipe(
    bootstrap: &str,
    topic: &str,
    to: &str,
    expected: u64,
    broker: &DevBroker,
) -> Result<Option<f64>> {
    let installed = std::process::Command::new("kcat")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        return Ok(None);
    }
    broker.create_topic(to, 1)?;
    let started = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"kcat -b "$1" -C -t "$2" -o beginning -e -q | kcat -b "$1" -P -t "$3""#)
        .args(["kcat-pipe", bootstrap, topic, to])
        .status()
        .context("cannot run kcat")?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        anyhow::bail!("the kcat pipe failed ({status}) copying {expected} messages");
    }
    Ok(Some(seconds))
}

/// The streaming demo: an in-process broker, generated touchpoints on the five source topics,
/// the worker until it has caught up, and accuracy read back from the output topics.
pub fn demo(config: &AppConfig, events: usize, seed: u64, root: &Path) -> Result<()> {
    let input = root.join("events.jsonl");
    let truth = root.join("truth.jsonl");
    let out = root.join("out");
    let state = root.join("state");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&out)?;
    crate::commands::generate_for_demo(events, seed, &input, &truth)?;
    // The mock broker keeps 5 MB per partition; these counts keep the demo's data readable.
    let broker = DevBroker::start(&config.kafka, 1, 8, 32)?;
    let mut kafka = config.kafka.clone();
    kafka.bootstrap_servers = broker.bootstrap_servers();
    println!(
        "== development broker at {} (librdkafka mock cluster)",
        kafka.bootstrap_servers
    );
    let sent = tools::produce_lines(&kafka, BufReader::new(File::open(&input)?), None)?;
    println!("   produced {sent} messages to the five source topics by their \"source\"");
    println!(
        "== running the worker until it has caught up (state in {})",
        state.display()
    );
    let engine = idgraph_engine::Engine::new(config.engine.clone(), PROCESSOR_VERSION)?;
    let (mut worker, operations, api) = served_worker(config, &engine, kafka.clone(), &state)?;
    let address = operations.address();
    match api.as_ref().map(|api| api.address()) {
        Some(api) => println!(
            "   metrics at http://{address}/metrics and profiles at http://{api}/v1/profiles/{{id}} while the worker runs"
        ),
        None => println!("   metrics at http://{address}/metrics while the worker runs"),
    }
    let stop = stop_on_signal()?;
    let summary = worker.run(
        &stop,
        RunOptions {
            exit_when_idle: Some(Duration::from_secs(3)),
        },
    )?;
    let stats = &summary.stats;
    println!(
        "   events {}  dead letters {}  profiles created {}  merges {}  merges refused {}  fuzzy links {}",
        stats.total_events(),
        stats.total_dead_letters(),
        stats.profiles_created,
        stats.merges,
        stats.merges_refused.values().sum::<u64>(),
        stats.fuzzy_links
    );
    for (rule, count) in &stats.merges_refused {
        println!("   merges refused by {rule}: {count}");
    }
    println!(
        "   {:.0} messages/s while working; latency poll -> outputs acknowledged p50 {:.0} ms, p99 {:.0} ms",
        summary.messages as f64 / summary.active_secs.max(1e-9),
        summary.poll_to_output_ms.quantile(0.5),
        summary.poll_to_output_ms.quantile(0.99)
    );
    println!("== reading idgraph.enriched and idgraph.profiles back");
    for (topic, file) in [
        (&kafka.outputs.enriched, "enriched.jsonl"),
        (&kafka.outputs.profiles, "profiles.jsonl"),
    ] {
        let mut writer = BufWriter::new(File::create(out.join(file))?);
        tools::dump_topic(&kafka, topic, true, &mut writer)?;
        writer.flush()?;
    }
    println!("== accuracy against the generator's truth");
    crate::commands::print_accuracy(&crate::commands::run_eval(
        &truth,
        &out.join("enriched.jsonl"),
        Some(&out.join("profiles.jsonl")),
    )?);
    println!("== outputs in {}", out.display());
    Ok(())
}
