//! `idgraph soak`: the worker as its own process over a long generated stream, with its
//! resident memory sampled as it goes, to show whether memory stays flat after warm-up.
//!
//! The development broker keeps only the last 5 MB of each partition, so the stream is
//! produced while the worker consumes it, never more than `max_outstanding` messages ahead;
//! the worker's progress is read from its own `/metrics`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use idgraph_kafka::{tools, DevBroker};
use serde_json::Value;

use crate::config::AppConfig;

/// Lines produced per call to the loader.
const CHUNK_LINES: usize = 5_000;

/// What the soak is asked to do.
pub struct SoakOptions {
    pub events: usize,
    pub seed: u64,
    pub partitions: i32,
    pub max_outstanding: u64,
    pub sample_every: Duration,
    /// Kill the worker with SIGKILL once it has consumed this share of the stream, and start
    /// it again on its state.
    pub kill_at: Option<f64>,
}

/// One reading of the worker process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    seconds: f64,
    consumed: u64,
    rss_mib: f64,
}

/// The worker process under watch, and what it consumed in earlier lives.
struct Watched {
    worker: Child,
    address: String,
    log: Receiver<String>,
    /// Messages consumed by the worker processes before this one (after a kill).
    consumed_before: u64,
    state: std::path::PathBuf,
    bootstrap: String,
}

impl Watched {
    fn start(bootstrap: &str, state: &Path, consumed_before: u64) -> Result<Self> {
        let mut worker = spawn_worker(bootstrap, state)?;
        let (address, log) = worker_address(&mut worker)?;
        Ok(Watched {
            worker,
            address,
            log,
            consumed_before,
            state: state.to_owned(),
            bootstrap: bootstrap.to_owned(),
        })
    }

    /// Messages consumed over every life of the worker.
    fn consumed(&self) -> Option<u64> {
        Some(self.consumed_before + metric_sum(&self.address, "idgraph_messages_consumed_total{")?)
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.worker.try_wait()? {
            bail!(
                "the worker stopped early with {status}; its log:\n{}",
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// Kills the worker with SIGKILL and starts it again on the same state; prints how long
    /// the new one took to serve, to send its first output (a batch the killed one logged,
    /// resolved again) and to consume again.
    fn kill_and_restart(&mut self) -> Result<()> {
        let consumed = self.consumed().unwrap_or(self.consumed_before);
        self.worker.kill()?;
        self.worker.wait()?;
        let killed = Instant::now();
        println!("killed the worker (SIGKILL) after {consumed} messages; restarting it");
        let mut next = Watched::start(&self.bootstrap, &self.state, consumed)?;
        let serving = killed.elapsed();
        let mut first_output = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            next.check_alive()?;
            let replayed = metric_sum(&next.address, "idgraph_replayed_batches_total").unwrap_or(0);
            let delivered =
                metric_sum(&next.address, "idgraph_poll_to_output_seconds_count").unwrap_or(0);
            if first_output.is_none() && (replayed > 0 || delivered > 0) {
                first_output = Some(killed.elapsed());
            }
            if delivered > 0 {
                println!(
                    "restart: serving /metrics after {:.2} s, first output after {:.2} s ({replayed} logged batches replayed), consuming again after {:.2} s",
                    serving.as_secs_f64(),
                    first_output.unwrap_or_default().as_secs_f64(),
                    killed.elapsed().as_secs_f64()
                );
                break;
            }
            if Instant::now() > deadline {
                bail!("the restarted worker produced nothing within two minutes");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *self = next;
        Ok(())
    }
}

pub fn soak(config: &AppConfig, options: &SoakOptions) -> Result<()> {
    let temp = tempfile::Builder::new().prefix("idgraph-soak-").tempdir()?;
    let input = temp.path().join("events.jsonl");
    crate::commands::run_gen(
        &idgraph_synth::GenConfig {
            events: options.events,
            seed: options.seed,
            ..idgraph_synth::GenConfig::default()
        },
        &input,
        &temp.path().join("truth.jsonl"),
    )?;
    let broker = DevBroker::start(&config.kafka, 1, options.partitions, 4)?;
    let mut kafka = config.kafka.clone();
    kafka.bootstrap_servers = broker.bootstrap_servers();
    let mut watched = Watched::start(&kafka.bootstrap_servers, &temp.path().join("state"), 0)?;
    println!(
        "worker pid {} serving http://{}/metrics",
        watched.worker.id(),
        watched.address
    );
    println!("{:>8} {:>10} {:>9}", "seconds", "consumed", "rss_mib");
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Instant::now();
    let mut sample = |watched: &Watched, samples: &mut Vec<Sample>, force: bool| {
        if !force && Instant::now() < next_sample {
            return;
        }
        next_sample = Instant::now() + options.sample_every;
        if let (Some(consumed), Some(rss_mib)) = (watched.consumed(), rss_mib(watched.worker.id()))
        {
            let reading = Sample {
                seconds: started.elapsed().as_secs_f64(),
                consumed,
                rss_mib,
            };
            println!(
                "{:>8.1} {:>10} {:>9.1}",
                reading.seconds, reading.consumed, reading.rss_mib
            );
            let _ = std::io::stdout().flush();
            samples.push(reading);
        }
    };
    // The share is of the stream's lines, which the generator's bad data makes more than
    // its events; counting them costs a read of the file, done only when asked to kill.
    let kill_after = match options.kill_at {
        Some(fraction) => {
            let lines = BufReader::new(std::fs::File::open(&input)?)
                .split(b'\n')
                .count();
            Some((lines as f64 * fraction.clamp(0.0, 1.0)) as u64)
        }
        None => None,
    };
    let mut killed = false;

    // Byte lines: the generator mixes in bad data, not all of it UTF-8.
    let mut lines = BufReader::new(std::fs::File::open(&input)?).split(b'\n');
    let mut produced = 0u64;
    loop {
        let chunk: Vec<Vec<u8>> = lines
            .by_ref()
            .take(CHUNK_LINES)
            .collect::<std::io::Result<_>>()?;
        if chunk.is_empty() {
            break;
        }
        while produced.saturating_sub(watched.consumed().unwrap_or(0)) > options.max_outstanding {
            sample(&watched, &mut samples, false);
            watched.check_alive()?;
            kill_when_due(&mut watched, kill_after, &mut killed)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut bytes = chunk.join(&b'\n');
        bytes.push(b'\n');
        produced += tools::produce_lines(&kafka, &bytes[..], None)?;
        sample(&watched, &mut samples, false);
    }
    // The worker exits once it has caught up and the topics stay quiet.
    while watched.worker.try_wait()?.is_none() {
        sample(&watched, &mut samples, false);
        kill_when_due(&mut watched, kill_after, &mut killed)?;
        std::thread::sleep(Duration::from_millis(50));
        if samples.last().is_some_and(|s| s.consumed >= produced) {
            sample(&watched, &mut samples, true);
            let _ = Command::new("kill")
                .args(["-TERM", &watched.worker.id().to_string()])
                .status();
            break;
        }
    }
    let status = watched.worker.wait()?;
    let mut summary = String::new();
    if let Some(mut stdout) = watched.worker.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut summary)?;
    }
    print!("{summary}");
    if !status.success() {
        bail!(
            "the worker failed with {status}; its log:\n{}",
            log_tail(&watched.log)
        );
    }
    report(&samples, produced);
    Ok(())
}

/// Kills and restarts the worker once, when it has consumed `kill_after` messages.
fn kill_when_due(watched: &mut Watched, kill_after: Option<u64>, killed: &mut bool) -> Result<()> {
    if !*killed && kill_after.is_some_and(|at| watched.consumed().unwrap_or(0) >= at) {
        *killed = true;
        watched.kill_and_restart()?;
    }
    Ok(())
}

fn spawn_worker(bootstrap: &str, state: &Path) -> Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["run", "--state"])
        .arg(state)
        .args(["--exit-when-idle", "60"])
        .env("IDGRAPH__KAFKA__BOOTSTRAP_SERVERS", bootstrap)
        .env("IDGRAPH__HTTP__LISTEN", "127.0.0.1:0")
        .env("IDGRAPH__HTTP__API_LISTEN", "")
        .env("IDGRAPH__LOG__FORMAT", "json")
        .env("IDGRAPH__LOG__FILTER", "idgraph=info,warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the worker")
}

/// Waits for the worker to log its metrics address; its later log lines go to the channel.
fn worker_address(worker: &mut Child) -> Result<(String, Receiver<String>)> {
    let stderr = worker
        .stderr
        .take()
        .context("the worker's stderr is piped")?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(line) = receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("http listening") {
            let line: Value = serde_json::from_str(&line)?;
            let address = line["fields"]["address"]
                .as_str()
                .context("the http log line has an address")?;
            return Ok((address.to_owned(), receiver));
        }
    }
    bail!("the worker did not report its http address within a minute")
}

fn log_tail(log: &Receiver<String>) -> String {
    let lines: Vec<String> = log.try_iter().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The sum of every sample of the metric whose lines start with `prefix` (a name, or a name
/// and `{`), from the worker's `/metrics`.
fn metric_sum(address: &str, prefix: &str) -> Option<u64> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let total = response
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter(|line| prefix.ends_with('{') || line[prefix.len()..].starts_with(' '))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Some(total as u64)
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Prints RSS at fractions of the run and its growth after the first fifth and over the
/// second half.
fn report(samples: &[Sample], produced: u64) {
    let at = |fraction: f64| {
        let target = (produced as f64 * fraction) as u64;
        samples.iter().find(|s| s.consumed >= target).copied()
    };
    println!("produced {produced} messages; {} samples", samples.len());
    for fraction in [0.2, 0.4, 0.6, 0.8, 1.0] {
        if let Some(s) = at(fraction) {
            println!(
                "rss at {:>3.0}% of the stream: {:>8.1} MiB ({} consumed, {:.0} s)",
                fraction * 100.0,
                s.rss_mib,
                s.consumed,
                s.seconds
            );
        }
    }
    for (label, from) in [
        ("after the first fifth", 0.2),
        ("over the second half", 0.5),
    ] {
        let window: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.consumed as f64 >= produced as f64 * from)
            .collect();
        let (Some(first), Some(last)) = (window.first(), window.last()) else {
            continue;
        };
        let peak = window.iter().map(|s| s.rss_mib).fold(f64::MIN, f64::max);
        let per_100k = (last.rss_mib - first.rss_mib)
            / ((last.consumed - first.consumed).max(1) as f64 / 100_000.0);
        println!(
            "{label}: {:.1} -> {:.1} MiB (peak {:.1}), {:+.2} MiB per 100k messages",
            first.rss_mib, last.rss_mib, peak, per_100k
        );
    }
}
