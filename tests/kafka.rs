//! The streaming worker against a real Kafka-protocol broker: the `idgraph broker` process
//! (librdkafka's mock cluster on loopback), driven through the `idgraph` binary, and once
//! in-process over a state store that fails on purpose.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/tls.rs"]
mod tls;

const BIN: &str = env!("CARGO_BIN_EXE_idgraph");

/// Settings that keep the tests quick: a short group session (a restarted worker waits for
/// the killed one's session to expire) and small batches, so kills land inside batches.
fn test_env(command: &mut Command) -> &mut Command {
    command
        .env("IDGRAPH__KAFKA__SESSION_TIMEOUT_MS", "6000")
        .env("IDGRAPH__KAFKA__BATCH_SIZE", "500")
        .env("IDGRAPH__KAFKA__QUALITY_INTERVAL_SECS", "2")
        .env("IDGRAPH__RESOLVE__PROGRESS_INTERVAL_SECS", "0")
        .env("IDGRAPH__LOG__FILTER", "warn")
        .env("IDGRAPH__HTTP__LISTEN", "127.0.0.1:0")
        .env("IDGRAPH__HTTP__API_LISTEN", "127.0.0.1:0")
}

/// A broker process that is killed when the test ends.
struct Broker {
    child: Child,
    bootstrap: String,
}

/// A plain HTTP/1.1 GET; returns the whole response.
fn get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// Sends a fault-injection command ("down 1", "up 1") to the broker process.
fn broker_command(broker: &mut Broker, command: &str) {
    use std::io::Write;
    let stdin = broker
        .child
        .stdin
        .as_mut()
        .expect("the broker's stdin is piped");
    writeln!(stdin, "{command}").unwrap();
    stdin.flush().unwrap();
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let file = dir.join("bootstrap");
        let child = test_env(&mut Command::new(BIN))
            .args([
                "broker",
                "--partitions",
                "1",
                "--output-partitions",
                "16",
                "--bootstrap-file",
                file.to_str().unwrap(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("the broker starts");
        let started = Instant::now();
        while !file.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the broker wrote no bootstrap file"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let bootstrap = std::fs::read_to_string(&file).unwrap().trim().to_owned();
        Broker { child, bootstrap }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        test_env(&mut command)
            .arg("--bootstrap-servers")
            .arg(&self.bootstrap)
            .args(args);
        command
    }

    /// Starts `idgraph run` on `state` with info logs as JSON on a piped stderr (the tests read
    /// its addresses and warnings there) and the extra environment `env`.
    fn logged_worker(&self, state: &Path, exit_when_idle: &str, env: &[(&str, &str)]) -> Child {
        let mut command = self.command(&[
            "run",
            "--state",
            p(state),
            "--exit-when-idle",
            exit_when_idle,
        ]);
        command
            .env("IDGRAPH__LOG__FILTER", "idgraph=info,idgraph_kafka=info")
            .env("IDGRAPH__LOG__FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command.spawn().expect("the worker starts")
    }

    fn ok(&self, args: &[&str]) -> String {
        check(self.command(args).output().unwrap(), args)
    }

    /// Loads a file into `touchpoints.web`; its single partition keeps the input order, so
    /// the worker must reproduce file mode exactly.
    fn produce_in_order(&self, input: &Path) {
        self.ok(&["produce", "--input", p(input), "--topic", "touchpoints.web"]);
    }

    /// event id -> customer id, from the enriched topic.
    fn streamed_customers(&self, dir: &Path) -> HashMap<String, String> {
        customers_by_event(self.dump("idgraph.enriched", dir).iter().map(value))
    }

    /// Asserts that the enriched topic gives every event of the file-mode run in `reference`
    /// the same customer id.
    fn assert_same_customers_as_file_mode(&self, dir: &Path, reference: &Path) {
        assert_eq!(
            self.streamed_customers(dir),
            file_mode_customers(reference),
            "same customers, same ids"
        );
    }

    /// customer id -> its last profile (Null for a tombstone), from the profile topic.
    fn streamed_profiles(&self, dir: &Path) -> BTreeMap<String, Value> {
        final_profiles(self.dump("idgraph.profiles", dir).iter().map(value))
    }

    fn dump(&self, topic: &str, dir: &Path) -> Vec<Value> {
        let path = dir.join(format!("{topic}.dump.jsonl"));
        let args = ["dump", "--topic", topic, "--output", p(&path)];
        let output = self.command(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        check(output, &args);
        // Reaching each partition's end is how a dump knows it is done, not an error to log.
        assert!(
            !stderr.contains("PartitionEOF"),
            "the dump logged partition ends as errors:\n{stderr}"
        );
        read_lines(&path)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn check(output: Output, args: &[&str]) -> String {
    assert!(
        output.status.success(),
        "idgraph {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Generates events and resolves them in file mode, the reference for the streaming run.
fn generate_and_resolve(dir: &Path, events: usize, seed: u64) -> (PathBuf, PathBuf) {
    let input = dir.join("events.jsonl");
    let truth = dir.join("truth.jsonl");
    let reference = dir.join("file-mode");
    let gen = [
        "gen",
        "--events",
        &events.to_string(),
        "--seed",
        &seed.to_string(),
        "--output",
        p(&input),
        "--truth",
        p(&truth),
    ];
    check(
        test_env(&mut Command::new(BIN)).args(gen).output().unwrap(),
        &gen,
    );
    let resolve = [
        "resolve",
        "--input",
        p(&input),
        "--output-dir",
        p(&reference),
    ];
    check(
        test_env(&mut Command::new(BIN))
            .args(resolve)
            .output()
            .unwrap(),
        &resolve,
    );
    (input, reference)
}

/// The value of a dumped record, parsed.
fn value(record: &Value) -> Value {
    serde_json::from_str(record["value"].as_str().unwrap()).unwrap()
}

/// event id → customer id from enriched records (first copy of each event).
fn customers_by_event(records: impl Iterator<Item = Value>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for record in records {
        let event = record["event_id"].as_str().unwrap().to_owned();
        out.entry(event)
            .or_insert_with(|| record["customer_id"].as_str().unwrap().to_owned());
    }
    out
}

/// event id → customer id of the file-mode run in `reference`.
fn file_mode_customers(reference: &Path) -> HashMap<String, String> {
    customers_by_event(read_lines(&reference.join("enriched.jsonl")).into_iter())
}

/// The final profiles of the file-mode run in `reference`.
fn file_mode_profiles(reference: &Path) -> BTreeMap<String, Value> {
    final_profiles(read_lines(&reference.join("profiles.jsonl")).into_iter())
}

/// customer id → its last profile record (None for a tombstone), like a compacted topic.
fn final_profiles(records: impl Iterator<Item = Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for record in records {
        let id = record["customer_id"].as_str().unwrap().to_owned();
        out.insert(id, record.get("profile").cloned().unwrap_or(Value::Null));
    }
    out
}

#[test]
fn the_worker_produces_what_file_mode_produces_for_the_same_input() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = generate_and_resolve(dir.path(), 4_000, 21);
    let broker = Broker::start(dir.path());
    // One topic with one partition keeps the input order, so ids must match file mode exactly.
    broker.produce_in_order(&input);
    let summary = broker.ok(&[
        "run",
        "--state",
        p(&dir.path().join("state")),
        "--exit-when-idle",
        "3",
    ]);
    assert!(summary.contains("replayed batches 0"), "{summary}");

    let enriched = broker.dump("idgraph.enriched", dir.path());
    let streamed = customers_by_event(enriched.iter().map(value));
    let expected = file_mode_customers(&reference);
    assert_eq!(
        streamed.len(),
        expected.len(),
        "every event has an enriched record"
    );
    assert_eq!(streamed, expected, "same customers, same ids");
    for record in &enriched {
        let headers = &record["headers"];
        assert!(headers["idgraph.idempotency_key"].as_str().unwrap().len() == 32);
        assert!(headers["idgraph.input"]
            .as_str()
            .unwrap()
            .starts_with("touchpoints.web/0@"));
        assert_eq!(
            record["key"],
            value(record)["customer_id"],
            "enriched events are keyed by customer"
        );
    }

    let profiles = broker.streamed_profiles(dir.path());
    let expected = file_mode_profiles(&reference);
    assert_eq!(profiles, expected, "the final profiles are the same");

    let letters = broker.dump("idgraph.dead-letter", dir.path());
    let expected_letters = read_lines(&reference.join("dead-letter.jsonl"));
    assert_eq!(letters.len(), expected_letters.len());
    assert!(letters
        .iter()
        .all(|l| l["key"].as_str().unwrap().starts_with("touchpoints.web/0@")));
    let changes = broker.dump("idgraph.identity-changes", dir.path());
    assert_eq!(
        changes.len(),
        read_lines(&reference.join("identity-changes.jsonl")).len()
    );
    let quality = broker.dump("idgraph.quality", dir.path());
    assert!(
        quality.iter().any(|q| q["key"] == "web"),
        "a quality snapshot per source"
    );

    // A second worker on a new state, with batches of 300 instead of 2,000, a checkpoint
    // every 7 of them and no state cache between batches (so it reads the batches not yet
    // checkpointed through the open checkpoint), appends the same records to the same
    // topics: state written behind changes no output but the number of intermediate
    // profile versions.
    let second = broker
        .command(&[
            "run",
            "--state",
            p(&dir.path().join("state-2")),
            "--exit-when-idle",
            "3",
        ])
        .env("IDGRAPH__KAFKA__CHECKPOINT_INTERVAL", "7")
        .env("IDGRAPH__KAFKA__BATCH_SIZE", "300")
        .env("IDGRAPH__ENGINE__CACHE__MAX_MB", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    let error: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("Error") || line.contains("ERROR"))
        .collect();
    assert!(second.status.success(), "the second run failed: {error:?}");
    for (topic, first) in [
        ("idgraph.enriched", &enriched),
        ("idgraph.identity-changes", &changes),
        ("idgraph.dead-letter", &letters),
    ] {
        let both = broker.dump(topic, dir.path());
        assert_eq!(both.len(), 2 * first.len(), "{topic}: one copy per run");
        let mut copies: HashMap<&str, Vec<&Value>> = HashMap::new();
        for record in &both {
            copies
                .entry(
                    record["headers"]["idgraph.idempotency_key"]
                        .as_str()
                        .unwrap(),
                )
                .or_default()
                .push(record);
        }
        for (key, records) in copies {
            assert_eq!(records.len(), 2, "{topic}: {key} once per run");
            // Everything but the offset: the same bytes under the same key and headers.
            for field in ["partition", "key", "headers", "value"] {
                assert_eq!(
                    records[0][field], records[1][field],
                    "{topic}: the {field} of {key} differs between runs"
                );
            }
        }
    }
    let profiles = broker.streamed_profiles(dir.path());
    assert_eq!(
        profiles,
        file_mode_profiles(&reference),
        "the second run's last profile records are the same"
    );
}

#[test]
fn events_from_every_source_topic_resolve_with_high_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let truth = dir.path().join("truth.jsonl");
    let gen = [
        "gen",
        "--events",
        "6000",
        "--seed",
        "8",
        "--output",
        p(&input),
        "--truth",
        p(&truth),
    ];
    check(
        test_env(&mut Command::new(BIN)).args(gen).output().unwrap(),
        &gen,
    );
    let broker = Broker::start(dir.path());
    broker.ok(&["produce", "--input", p(&input)]);
    broker.ok(&[
        "run",
        "--state",
        p(&dir.path().join("state")),
        "--exit-when-idle",
        "3",
    ]);
    let enriched_path = dir.path().join("enriched.jsonl");
    let profiles_path = dir.path().join("profiles.jsonl");
    for (topic, path) in [
        ("idgraph.enriched", &enriched_path),
        ("idgraph.profiles", &profiles_path),
    ] {
        let values: Vec<String> = broker
            .dump(topic, dir.path())
            .iter()
            .map(|r| r["value"].as_str().unwrap().to_owned())
            .collect();
        std::fs::write(path, values.join("\n") + "\n").unwrap();
    }
    let eval = [
        "eval",
        "--truth",
        p(&truth),
        "--enriched",
        p(&enriched_path),
        "--profiles",
        p(&profiles_path),
        "--json",
    ];
    let report: Value = serde_json::from_str(&check(
        test_env(&mut Command::new(BIN))
            .args(eval)
            .output()
            .unwrap(),
        &eval,
    ))
    .unwrap();
    assert_eq!(report["missing_from_resolution"], 0, "{report}");
    assert!(
        report["pairwise_precision"].as_f64().unwrap() >= 0.999,
        "{report}"
    );
    assert!(
        report["pairwise_recall"].as_f64().unwrap() >= 0.97,
        "{report}"
    );
    let sources: HashSet<String> = read_lines(&enriched_path)
        .iter()
        .map(|e| e["source"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sources.len(), 5, "{sources:?}");
}

#[test]
fn kill_minus_nine_at_random_points_loses_nothing_and_re_emits_identical_records() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = generate_and_resolve(dir.path(), 8_000, 33);
    let broker = Broker::start(dir.path());
    // The input arrives in ten parts, one before each start, so every run has work to do.
    // Bytes, not text: the generator writes some lines that are not UTF-8.
    let bytes = std::fs::read(&input).unwrap();
    let lines: Vec<&[u8]> = bytes
        .strip_suffix(b"\n")
        .unwrap_or(&bytes)
        .split(|b| *b == b'\n')
        .collect();
    let parts: Vec<&[&[u8]]> = lines.chunks(lines.len().div_ceil(10)).collect();
    let state = dir.path().join("state");
    // Kill points: right after the worker logs its 1st, 2nd or 3rd sent batch, plus up to
    // 40 ms, chosen by a deterministic generator. A sent batch's outputs are then awaiting
    // acknowledgement and its state is not checkpointed yet (that waits for the input to go
    // quiet), so kills land between log, send, acknowledgement and checkpoint.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut killed_while_working = 0;
    // Starts that found batches the killed run logged after its last checkpoint and replayed
    // them.
    let replays = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (run, part) in parts.iter().enumerate() {
        let part_file = dir.path().join(format!("part-{run}.jsonl"));
        let mut content = part.join(&b'\n');
        content.push(b'\n');
        std::fs::write(&part_file, content).unwrap();
        broker.produce_in_order(&part_file);
        let mut worker = broker
            .command(&["run", "--state", p(&state)])
            .env("IDGRAPH__LOG__FILTER", "idgraph_kafka=debug")
            .env("IDGRAPH__LOG__FORMAT", "json")
            .env("IDGRAPH__KAFKA__BATCH_SIZE", "300")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after_commits = 1 + (seed % 3) as usize;
        let stderr = worker.stderr.take().unwrap();
        let (committed_tx, committed_rx) = std::sync::mpsc::channel();
        let recoveries = std::sync::Arc::clone(&replays);
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut commits = 0;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("replaying the batches logged since the last checkpoint") {
                    recoveries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                if line.contains("batch sent") {
                    commits += 1;
                    if commits == kill_after_commits {
                        let _ = committed_tx.send(());
                    }
                }
            }
        });
        // A restart first waits for the killed member's session to expire.
        let committed = committed_rx.recv_timeout(Duration::from_secs(60)).is_ok();
        std::thread::sleep(Duration::from_millis(seed % 40));
        killed_while_working += usize::from(committed && worker.try_wait().unwrap().is_none());
        worker.kill().unwrap(); // SIGKILL
        worker.wait().unwrap();
    }
    assert_eq!(
        killed_while_working, 10,
        "every kill hit a worker that had committed a batch and was still running"
    );
    let recoveries = replays.load(std::sync::atomic::Ordering::SeqCst);
    // Every kill lands before the killed run's next checkpoint, so every restart after one
    // finds logged batches to resolve and send again.
    assert_eq!(
        recoveries, 9,
        "each restart after a kill replays the killed run's logged batches"
    );
    let summary = broker.ok(&["run", "--state", p(&state), "--exit-when-idle", "3"]);
    assert!(
        !summary.contains("replayed batches 0"),
        "the last start replays the batches of the 10th kill: {summary}"
    );

    let enriched = broker.dump("idgraph.enriched", dir.path());
    let profiles = broker.dump("idgraph.profiles", dir.path());
    let changes = broker.dump("idgraph.identity-changes", dir.path());
    // Every copy of a record (same idempotency key) is byte-identical to the first.
    let mut duplicates = 0;
    for records in [&enriched, &profiles, &changes] {
        let mut first: HashMap<String, (&Value, &Value)> = HashMap::new();
        for record in records {
            let key = record["headers"]["idgraph.idempotency_key"]
                .as_str()
                .unwrap()
                .to_owned();
            match first.get(&key) {
                Some((value, record_key)) => {
                    duplicates += 1;
                    assert_eq!(
                        *value, &record["value"],
                        "a re-emitted record differs from its first copy"
                    );
                    assert_eq!(*record_key, &record["key"]);
                }
                None => {
                    first.insert(key, (&record["value"], &record["key"]));
                }
            }
        }
    }
    eprintln!(
        "{duplicates} re-emitted records after 10 kills, {recoveries} starts replayed logged batches; final run: {summary}"
    );
    // Nothing is lost, and the result is the uncrashed (file-mode) result.
    let streamed = customers_by_event(enriched.iter().map(value));
    let expected = file_mode_customers(&reference);
    assert_eq!(
        streamed, expected,
        "every event has its enriched record with the uncrashed customer"
    );
    let streamed_profiles = final_profiles(profiles.iter().map(value));
    let expected_profiles = file_mode_profiles(&reference);
    assert_eq!(
        streamed_profiles, expected_profiles,
        "final profiles equal an uncrashed run's"
    );
}

#[test]
fn malformed_messages_go_to_the_dead_letter_topic_and_the_worker_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("big.toml");
    // Let the consumer fetch large messages (`produce` sends any size). The mock broker keeps
    // only the last 5 MB of a partition, so the oversized message is 3 MB (the worker's limit
    // is 1 MB) rather than 10 MB; against a real broker the same path handles any size the
    // broker accepts.
    std::fs::write(&config, "[kafka.client]\n\"fetch.max.bytes\" = \"60000000\"\n\"max.partition.fetch.bytes\" = \"15000000\"\n").unwrap();
    let good = |id: &str| {
        format!(
            r#"{{"event_id":"{id}","event_type":"page_view","timestamp":"2026-03-01T12:00:00Z","identifiers":{{"email":"a@x.com"}}}}"#
        )
    };
    let huge = format!(
        r#"{{"event_id":"big","event_type":"x","timestamp":"2026-03-01T12:00:00Z","properties":{{"blob":"{}"}}}}"#,
        "x".repeat(3 * 1024 * 1024)
    );
    let lines: Vec<Vec<u8>> = vec![
        good("g1").into_bytes(),
        b"{\"event_id\": \"broken\",".to_vec(),
        b"\xff\xfe not utf-8".to_vec(),
        Vec::new(),
        br#"{"event_id":{"w":1},"event_type":"x","timestamp":"2026-03-01T12:00:00Z"}"#.to_vec(),
        huge.into_bytes(),
        good("g2").into_bytes(),
    ];
    let input = dir.path().join("bad.jsonl");
    let mut bytes = Vec::new();
    for line in &lines {
        bytes.extend(line);
        bytes.push(b'\n');
    }
    std::fs::write(&input, bytes).unwrap();
    let broker = Broker::start(dir.path());
    let with_config = |args: &[&str]| {
        let mut full = vec!["--config", p(&config)];
        full.extend_from_slice(args);
        check(broker.command(&full).output().unwrap(), &full)
    };
    with_config(&[
        "produce",
        "--input",
        p(&input),
        "--topic",
        "touchpoints.mobile",
    ]);
    with_config(&[
        "run",
        "--state",
        p(&dir.path().join("state")),
        "--exit-when-idle",
        "3",
    ]);
    let enriched = broker.dump("idgraph.enriched", dir.path());
    assert_eq!(enriched.len(), 2, "both good events went through");
    assert_eq!(
        value(&enriched[0])["source"],
        "mobile",
        "the topic names the source"
    );
    // Dead letters are keyed by input coordinates, so they spread over partitions: order them
    // by input offset.
    let mut letters: Vec<Value> = broker
        .dump("idgraph.dead-letter", dir.path())
        .iter()
        .map(value)
        .collect();
    letters.sort_by_key(|l| l["input"]["offset"].as_i64());
    let kinds: Vec<&str> = letters
        .iter()
        .map(|l| l["failure_kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec![
            "invalid_json",
            "invalid_utf8",
            "empty_payload",
            "wrong_type",
            "too_large"
        ]
    );
    for letter in &letters {
        assert_eq!(letter["input"]["topic"], "touchpoints.mobile");
        assert!(letter["input"]["offset"].is_i64());
        assert!(!letter["reason"].as_str().unwrap().is_empty());
    }
    assert!(letters[4]["payload_size"].as_u64().unwrap() > 3 * 1024 * 1024);
    assert_eq!(letters[4]["truncated"], true);
}

#[test]
fn a_profile_grown_past_the_producer_limit_is_dead_lettered_by_reference_and_the_worker_goes_on() {
    // Inputs of at most 2,000 bytes give a producer limit of 2 × 2,000 + 64 KiB = 69,536
    // bytes. One customer's events each add a 900-byte trait, so its profile record passes
    // that limit in the second batch; the producer refuses it for good.
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    for k in 0..100 {
        lines.push(format!(
            r#"{{"event_id":"big-{k}","event_type":"identify","timestamp":"2026-03-01T12:00:00Z","identifiers":{{"user_id":"u-big"}},"traits":{{"note_{k}":"{}"}}}}"#,
            "x".repeat(900)
        ));
    }
    for k in 0..5 {
        lines.push(format!(
            r#"{{"event_id":"small-{k}","event_type":"page_view","timestamp":"2026-03-01T12:00:00Z","identifiers":{{"email":"p{k}@example.com"}}}}"#
        ));
    }
    let input = dir.path().join("growing.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let broker = Broker::start(dir.path());
    broker.produce_in_order(&input);
    let state = dir.path().join("state");
    let args = ["run", "--state", p(&state), "--exit-when-idle", "3"];
    let output = broker
        .command(&args)
        .env("IDGRAPH__ENGINE__DEAD_LETTER__MAX_MESSAGE_BYTES", "2000")
        .env("IDGRAPH__KAFKA__BATCH_SIZE", "50")
        .output()
        .unwrap();
    let summary = check(output, &args);
    assert!(summary.contains("refused records 1"), "{summary}");

    // Every event went through, the ones after the refusal included.
    assert_eq!(broker.dump("idgraph.enriched", dir.path()).len(), 105);
    let profiles: Vec<Value> = broker
        .dump("idgraph.profiles", dir.path())
        .iter()
        .map(value)
        .collect();
    let small_customers: HashSet<&str> = profiles
        .iter()
        .filter(|p| {
            p["profile"]["identifiers"]
                .to_string()
                .contains("example.com")
        })
        .map(|p| p["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        small_customers.len(),
        5,
        "the last batch's profiles arrived"
    );
    assert!(profiles.iter().all(|p| p.to_string().len() < 69_536 + 1000));

    let letters: Vec<Value> = broker
        .dump("idgraph.dead-letter", dir.path())
        .iter()
        .map(value)
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["failure_kind"], "undeliverable");
    assert_eq!(letter["output_topic"], "idgraph.profiles");
    assert_eq!(letter["input"]["topic"], "touchpoints.web");
    assert_eq!(
        letter["input"]["offset"], 99,
        "the batch's last event touched it"
    );
    assert!(letter["payload_size"].as_u64().unwrap() > 69_536);
    assert_eq!(letter["truncated"], true);
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.contains("profiles record") && reason.contains("too_large"),
        "{reason}"
    );
}

/// The lines `worker` writes to its piped stderr, as they come, read on a thread of their own.
fn stderr_lines(worker: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = worker.stderr.take().expect("the worker's stderr is piped");
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = line_tx.send(line);
        }
    });
    line_rx
}

#[test]
fn with_the_broker_down_for_seconds_the_worker_waits_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = generate_and_resolve(dir.path(), 3_000, 44);
    let mut broker = Broker::start(dir.path());
    broker.produce_in_order(&input);
    let mut worker = broker.logged_worker(
        &dir.path().join("state"),
        "8",
        &[("IDGRAPH__KAFKA__BATCH_SIZE", "100")],
    );
    let line_rx = stderr_lines(&mut worker);
    let wait_for = |needle: &str, within: Duration| -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while let Ok(line) =
            line_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let found = line.contains(needle);
            seen.push(line);
            if found {
                return seen;
            }
        }
        panic!("no {needle:?} within {within:?}; saw {seen:?}");
    };
    let started = wait_for("partitions assigned", Duration::from_secs(30));
    let logged_address = |field: &str| {
        started
            .iter()
            .find(|l| l.contains("http listening"))
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|l| l["fields"][field].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("the worker logs its http {field}"))
    };
    let http = logged_address("address");
    let api = logged_address("api_address");
    assert!(get(&http, "/healthz").starts_with("HTTP/1.1 200"));
    // Take the only broker down in the middle of the run, then bring it back.
    broker_command(&mut broker, "down 1");
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut unready = false;
    while Instant::now() < deadline {
        unready |= get(&http, "/readyz").starts_with("HTTP/1.1 503");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(unready, "/readyz turned unready while the broker was down");
    broker_command(&mut broker, "up 1");
    let mut ready_again = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready_again && Instant::now() < deadline {
        ready_again = get(&http, "/readyz").starts_with("HTTP/1.1 200");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ready_again, "/readyz recovered after the outage");
    // The running worker answers profile lookups from its committed state: the customer of
    // the first enriched event, by id and by one of its identifiers, agree.
    let first = &read_lines(&reference.join("enriched.jsonl"))[0];
    let customer = first["customer_id"].as_str().unwrap();
    let (kind, values) = first["identifiers"]
        .as_object()
        .and_then(|ids| ids.iter().next())
        .expect("the first event has an identifier");
    let lookup = format!(
        "/v1/lookup?kind={kind}&value={}",
        values[0]
            .as_str()
            .unwrap()
            .replace('@', "%40")
            .replace('+', "%2B")
    );
    // The first batch may still be on its way after the outage: wait for its commit.
    let body = |path: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let response = get(&api, path);
            if response.starts_with("HTTP/1.1 200") {
                return serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
            }
            assert!(Instant::now() < deadline, "{path}: {response}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let by_id = body(&format!("/v1/profiles/{customer}"));
    let by_identifier = body(&lookup);
    assert_eq!(
        by_id["customer_id"], by_identifier["customer_id"],
        "{lookup}"
    );
    assert!(!by_id["profile"]["identifiers"]
        .as_array()
        .unwrap()
        .is_empty());
    let metrics = get(&http, "/metrics");
    let build_info = format!(
        "idgraph_build_info{{commit=\"{}\",version=\"{}\"}} 1",
        idgraph_kafka::metrics::BUILD_COMMIT,
        env!("CARGO_PKG_VERSION")
    );
    for name in [
        "idgraph_events_processed_total",
        "idgraph_resolution_actions_total",
        "idgraph_ready 1",
        "idgraph_batch_phase_seconds",
        "idgraph_messages_consumed_total{source=\"web\"}",
        "idgraph_profile_events_bucket",
        "idgraph_event_to_output_seconds_count",
        build_info.as_str(),
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let output = worker.wait_with_output().unwrap();
    assert!(output.status.success(), "the worker survived the outage");
    let remaining: Vec<String> = line_rx.try_iter().collect();
    let complained = remaining
        .iter()
        .any(|l| l.contains("WARN") || l.contains("\"level\":\"WARN\""));
    assert!(complained, "the worker reported the outage: {remaining:?}");

    let streamed = broker.streamed_customers(dir.path());
    let expected = file_mode_customers(&reference);
    assert_eq!(
        streamed, expected,
        "nothing was lost and the result is unchanged"
    );
}

/// Sends SIGTERM to `worker` and returns how long it took to exit, giving up after `limit`.
fn terminate(worker: &mut Child, limit: Duration) -> Duration {
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "SIGTERM was delivered");
    while worker.try_wait().unwrap().is_none() {
        if sent.elapsed() > limit {
            let _ = worker.kill();
            panic!("the worker was still running {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    sent.elapsed()
}

#[test]
fn sigterm_with_the_broker_gone_exits_within_the_shutdown_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = generate_and_resolve(dir.path(), 1_000, 45);
    let broker = Broker::start(dir.path());
    broker.produce_in_order(&input);
    let mut worker = broker.logged_worker(
        &dir.path().join("state"),
        "600",
        &[("IDGRAPH__KAFKA__SHUTDOWN_TIMEOUT_MS", "3000")],
    );
    let line_rx = stderr_lines(&mut worker);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !line_rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .expect("the worker logs that it was assigned partitions")
        .contains("partitions assigned")
    {}
    // Let it catch up with the 1,000 events, then take the broker away for good.
    std::thread::sleep(Duration::from_secs(3));
    drop(broker);
    std::thread::sleep(Duration::from_millis(500));
    let took = terminate(&mut worker, Duration::from_secs(60));
    assert!(
        took < Duration::from_secs(3 + 4),
        "the worker took {took:?} to exit after SIGTERM with kafka.shutdown_timeout_ms = 3000"
    );
    let logged: Vec<String> = line_rx.try_iter().collect();
    if let Some(line) = logged.iter().find(|l| l.contains("shutdown_timeout_ms")) {
        assert!(line.contains("batches_unacknowledged"), "{line}");
        assert!(line.contains("batch log"), "{line}");
    }
}

/// Lines of a file that may hold invalid UTF-8 (the generator writes some on purpose).
fn line_count(path: &Path) -> usize {
    std::fs::read(path)
        .unwrap()
        .iter()
        .filter(|b| **b == b'\n')
        .count()
}

/// `idgraph --config <file> --bootstrap-servers <servers> <args>` with the test settings.
fn configured(config: &Path, bootstrap: &str, args: &[&str]) -> Output {
    test_env(&mut Command::new(BIN))
        .args(["--config", p(config), "--bootstrap-servers", bootstrap])
        .args(args)
        .output()
        .unwrap()
}

/// The worker over TLS, end to end: consuming, committing offsets and producing its outputs
/// all go through a TLS endpoint whose certificate a test CA signed. A worker given another
/// CA stops at start with librdkafka's reason. (The mock broker behind the endpoint speaks
/// plaintext, so the broker's own TLS settings, client certificates and SASL logins are not
/// exercised here; `clients_accept_tls_with_scram_and_plain_logins` covers what can be.)
#[test]
fn a_worker_configured_for_tls_streams_through_a_tls_endpoint_and_refuses_an_unknown_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = generate_and_resolve(dir.path(), 600, 47);
    let mut broker = Broker::start(dir.path());
    broker.produce_in_order(&input);

    let trusted = tls::Authority::new(dir.path(), "test-ca");
    let stranger = tls::Authority::new(dir.path(), "other-ca");
    let endpoint = tls::TlsEndpoint::start(&trusted, broker.bootstrap.clone());
    broker_command(
        &mut broker,
        &format!("advertise 1 127.0.0.1:{}", endpoint.port),
    );
    // The broker applies commands every 50 ms.
    std::thread::sleep(Duration::from_millis(300));
    let tls_bootstrap = format!("127.0.0.1:{}", endpoint.port);
    let config_for = |ca: &Path, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[kafka.client]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = {:?}\n\n[kafka.topics]\nadmin_timeout_ms = 4000\n",
                p(ca)
            ),
        )
        .unwrap();
        path
    };

    let wrong = config_for(&stranger.certificate_file, "wrong-ca.toml");
    let state = dir.path().join("state");
    let run = ["run", "--state", p(&state), "--exit-when-idle", "3"];
    let refused = configured(&wrong, &tls_bootstrap, &run);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "an unknown CA must stop the worker"
    );
    assert!(
        stderr.contains("cannot reach the kafka cluster at 127.0.0.1:")
            && stderr.contains("certificate verify failed"),
        "the error names the servers and the TLS reason:\n{stderr}"
    );
    assert!(endpoint.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(
        endpoint
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    let right = config_for(&trusted.certificate_file, "test-ca.toml");
    let summary = check(configured(&right, &tls_bootstrap, &run), &run);
    let lines = line_count(&input);
    assert!(summary.contains(&format!("messages {lines} ")), "{summary}");
    assert!(
        endpoint
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2
    );

    // Read the outputs back in plaintext, straight from the broker.
    let plain = broker.bootstrap.rsplit_once(':').unwrap().1.to_owned();
    broker_command(&mut broker, &format!("advertise 1 127.0.0.1:{plain}"));
    std::thread::sleep(Duration::from_millis(300));
    broker.assert_same_customers_as_file_mode(dir.path(), &reference);
}

/// Producers compress with whatever their team chose: input written with each codec Kafka
/// has (a quarter of it each, in order) resolves exactly as the uncompressed file does.
#[test]
fn input_compressed_with_every_codec_resolves_as_the_plain_file_does() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = generate_and_resolve(dir.path(), 800, 53);
    let broker = Broker::start(dir.path());
    let bytes = std::fs::read(&input).unwrap();
    let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    let codecs = ["gzip", "zstd", "lz4", "snappy"];
    for (codec, part) in codecs
        .iter()
        .zip(lines.chunks(lines.len().div_ceil(codecs.len())))
    {
        let part_file = dir.path().join(format!("{codec}.jsonl"));
        std::fs::write(&part_file, part.concat()).unwrap();
        let config = dir.path().join(format!("{codec}.toml"));
        std::fs::write(
            &config,
            format!("[kafka.client]\n\"compression.type\" = \"{codec}\"\n"),
        )
        .unwrap();
        let produce = [
            "produce",
            "--input",
            p(&part_file),
            "--topic",
            "touchpoints.web",
        ];
        check(configured(&config, &broker.bootstrap, &produce), &produce);
    }
    let state = dir.path().join("state");
    let summary = broker.ok(&["run", "--state", p(&state), "--exit-when-idle", "3"]);
    assert!(
        summary.contains(&format!("messages {} ", lines.len())),
        "{summary}"
    );
    broker.assert_same_customers_as_file_mode(dir.path(), &reference);
}

/// A topic recreated under a worker (a broker whose data was not on a volume, a deleted and
/// recreated topic) holds fewer messages than the state has read. The worker stops, naming
/// the partition and both offsets, instead of taking every new message for one processed
/// already; with `kafka.on_position_lost = "earliest"` it reads the new messages.
#[test]
fn a_recreated_topic_stops_the_worker_unless_told_where_to_read() {
    let dir = tempfile::tempdir().unwrap();
    let (first_input, _) = generate_and_resolve(dir.path(), 400, 61);
    let state = dir.path().join("state");
    let run = ["run", "--state", p(&state), "--exit-when-idle", "3"];
    let stored = {
        let broker = Broker::start(dir.path());
        broker.produce_in_order(&first_input);
        let summary = broker.ok(&run);
        summary
            .split("messages ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .expect("the summary counts messages")
    };

    let second = dir.path().join("recreated");
    std::fs::create_dir(&second).unwrap();
    let (second_input, _) = generate_and_resolve(&second, 100, 62);
    let new_messages = line_count(&second_input);
    assert!(new_messages < stored);
    let broker = Broker::start(&second);
    broker.produce_in_order(&second_input);

    let refused = broker.command(&run).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a lost position must stop the worker"
    );
    let named = format!(
        "touchpoints.web partition 0 is offset {stored}, but the broker holds offsets 0 to {new_messages}"
    );
    assert!(stderr.contains(&named), "expected {named:?} in:\n{stderr}");

    let summary = check(
        broker
            .command(&run)
            .env("IDGRAPH__KAFKA__ON_POSITION_LOST", "earliest")
            .output()
            .unwrap(),
        &run,
    );
    assert!(
        summary.contains(&format!("messages {new_messages} ")),
        "every message of the recreated topic is read: {summary}"
    );
}

/// Polls `/readyz` at `http` until it answers `status` (200 or 503), for at most `within`;
/// returns how long that took.
fn wait_for_readiness(http: &str, status: u16, within: Duration) -> Duration {
    let started = Instant::now();
    let expected = format!("HTTP/1.1 {status}");
    while !get(http, "/readyz").starts_with(&expected) {
        assert!(
            started.elapsed() < within,
            "/readyz did not answer {status} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

/// On a quiet stream nothing is delivered, so readiness must come from the consumer itself:
/// the worker turns unready when its broker goes away and ready again when it is back,
/// without a message arriving in between.
#[test]
fn readiness_follows_the_broker_on_a_quiet_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = generate_and_resolve(dir.path(), 200, 63);
    let mut broker = Broker::start(dir.path());
    broker.produce_in_order(&input);
    let mut worker = broker.logged_worker(&dir.path().join("state"), "600", &[]);
    let line_rx = stderr_lines(&mut worker);
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = loop {
        let line = line_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the worker logs its http address");
        if line.contains("http listening") {
            let line: Value = serde_json::from_str(&line).unwrap();
            break line["fields"]["address"].as_str().unwrap().to_owned();
        }
    };
    wait_for_readiness(&http, 200, Duration::from_secs(30));
    // Caught up with the 200 events: from here on the stream is quiet.
    std::thread::sleep(Duration::from_secs(3));
    broker_command(&mut broker, "down 1");
    let unready = wait_for_readiness(&http, 503, Duration::from_secs(20));
    broker_command(&mut broker, "up 1");
    let ready_again = wait_for_readiness(&http, 200, Duration::from_secs(30));
    eprintln!(
        "unready {unready:?} after the broker went down, ready {ready_again:?} after it came back"
    );
    terminate(&mut worker, Duration::from_secs(30));
}

/// Two workers in one group would each build a graph from their share of the partitions and
/// write conflicting profiles to the same topic. A second worker started on the group of a
/// running one leaves with the reason; the running one keeps every partition and finishes
/// the input as if alone.
#[test]
fn a_second_worker_in_the_group_of_a_running_one_refuses_to_join() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = generate_and_resolve(dir.path(), 1_000, 65);
    let broker = Broker::start(dir.path());
    broker.produce_in_order(&input);
    let mut first = broker.logged_worker(&dir.path().join("state"), "8", &[]);
    let line_rx = stderr_lines(&mut first);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !line_rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .expect("the first worker is assigned its partitions")
        .contains("partitions assigned")
    {}
    let second = broker
        .command(&[
            "run",
            "--state",
            p(&dir.path().join("second-state")),
            "--exit-when-idle",
            "5",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second worker must not run");
    assert!(
        stderr.contains("another live member of consumer group \"idgraph\"")
            && stderr.contains("one worker per group"),
        "{stderr}"
    );
    let output = first.wait_with_output().unwrap();
    assert!(output.status.success(), "the first worker went on");
    broker.assert_same_customers_as_file_mode(dir.path(), &reference);
}

#[test]
fn failed_produce_requests_are_retried_without_loss_or_change() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = generate_and_resolve(dir.path(), 3_000, 55);
    let mut broker = Broker::start(dir.path());
    broker.produce_in_order(&input);
    // Every request of the worker's producer fails for a while; librdkafka must retry them
    // and the worker must neither lose nor duplicate-differently anything.
    broker_command(&mut broker, "produce-errors 50");
    broker.ok(&[
        "run",
        "--state",
        p(&dir.path().join("state")),
        "--exit-when-idle",
        "3",
    ]);
    let streamed = broker.streamed_customers(dir.path());
    let expected = file_mode_customers(&reference);
    assert_eq!(streamed, expected);
    let profiles = broker.streamed_profiles(dir.path());
    assert_eq!(profiles, file_mode_profiles(&reference));
}

#[test]
fn an_absent_output_topic_that_cannot_be_created_stops_the_worker_with_its_name() {
    // The broker has every default topic; the worker is pointed at a quality topic it lacks.
    // The mock cluster has no CreateTopics, so creation fails, as it would without the ACL.
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let state = dir.path().join("state");
    let output = broker
        .command(&["run", "--state", p(&state), "--exit-when-idle", "2"])
        .env("IDGRAPH__KAFKA__OUTPUTS__QUALITY", "idgraph.quality-v2")
        .env("IDGRAPH__KAFKA__TOPICS__ADMIN_TIMEOUT_MS", "2000")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the worker started without its topic"
    );
    assert!(
        stderr.contains("cannot create output topics idgraph.quality-v2")
            && stderr.contains("kafka.topics.create = false"),
        "{stderr}"
    );
    // The topics that exist are not named: only the absent one is created.
    assert!(!stderr.contains("idgraph.enriched"), "{stderr}");
    // With creation turned off the worker starts and leaves topic management to the operator.
    let status = broker
        .command(&["run", "--state", p(&state), "--exit-when-idle", "2"])
        .env("IDGRAPH__KAFKA__OUTPUTS__QUALITY", "idgraph.quality-v2")
        .env("IDGRAPH__KAFKA__TOPICS__CREATE", "false")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the worker runs with kafka.topics.create = false"
    );
}

/// A memory store whose writes number `fail_from..fail_until` fail as transient (a busy disk).
struct FlakyStore {
    inner: idgraph_engine::MemoryStore,
    writes: usize,
    fail_from: usize,
    fail_until: usize,
}

impl idgraph_engine::StateRead for FlakyStore {
    fn get(
        &self,
        table: idgraph_engine::Table,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, idgraph_engine::StoreError> {
        self.inner.get(table, key)
    }

    fn get_many(
        &self,
        table: idgraph_engine::Table,
        keys: &[&[u8]],
    ) -> Result<Vec<Option<Vec<u8>>>, idgraph_engine::StoreError> {
        self.inner.get_many(table, keys)
    }

    fn scan_prefix(
        &self,
        table: idgraph_engine::Table,
        prefix: &[u8],
    ) -> Result<idgraph_engine::store::Entries, idgraph_engine::StoreError> {
        self.inner.scan_prefix(table, prefix)
    }
}

impl idgraph_engine::StateStore for FlakyStore {
    fn write_ops(
        &mut self,
        ops: &[&idgraph_engine::WriteOp],
    ) -> Result<(), idgraph_engine::StoreError> {
        self.writes += 1;
        if (self.fail_from..self.fail_until).contains(&self.writes) {
            return Err(idgraph_engine::StoreError::Transient(
                "injected: the disk is busy".into(),
            ));
        }
        self.inner.write_ops(ops)
    }
}

#[test]
fn transient_state_write_failures_are_waited_out_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reference) = generate_and_resolve(dir.path(), 3_000, 77);
    let broker = Broker::start(dir.path());
    broker.produce_in_order(&input);
    let defaults: toml::Value = toml::from_str(idgraph_engine::DEFAULT_CONFIG_TOML).unwrap();
    let mut kafka: idgraph_kafka::KafkaConfig = defaults["kafka"].clone().try_into().unwrap();
    kafka.bootstrap_servers = broker.bootstrap.clone();
    kafka.session_timeout_ms = 6000;
    kafka.batch_size = 500;
    let engine =
        idgraph_engine::Engine::new(idgraph_engine::EngineConfig::defaults(), "test").unwrap();
    // The second to fourth writes fail: one write (a batch's log entry) fails three times in
    // a row.
    let store = FlakyStore {
        inner: idgraph_engine::MemoryStore::new(),
        writes: 0,
        fail_from: 2,
        fail_until: 5,
    };
    let metrics = idgraph_kafka::Metrics::new();
    let mut worker =
        idgraph_kafka::Worker::new(&engine, store, kafka, 64, metrics.clone()).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let summary = worker
        .run(
            &stop,
            idgraph_kafka::worker::RunOptions {
                exit_when_idle: Some(Duration::from_secs(3)),
            },
        )
        .expect("transient store failures do not end the run");
    assert!(summary.batches >= 2, "{summary:?}");
    assert!(
        metrics
            .render()
            .contains("idgraph_state_write_retries_total 3"),
        "the failed commit was retried three times"
    );
    broker.assert_same_customers_as_file_mode(dir.path(), &reference);
}

/// Every `idgraph_` metric a file names (alert expressions, dashboard queries).
fn idgraph_metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("idgraph_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        // Prose such as "every idgraph_ metric" names none.
        if name.len() > "idgraph_".len() {
            names.insert(name);
        }
    }
    names
}

/// The files under `deploy/` whose name ends with one of `extensions`.
fn deploy_files(extensions: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, extensions: &[&str], found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, extensions, found);
            } else if extensions
                .iter()
                .any(|e| path.to_str().unwrap().ends_with(e))
            {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy"),
        extensions,
        &mut found,
    );
    found.sort();
    found
}

#[test]
fn the_deploy_files_parse_and_every_metric_they_name_is_in_a_live_scrape() {
    let yaml = deploy_files(&[".yml", ".yaml"]);
    assert!(yaml.len() >= 8, "deploy/ lost its manifests: {yaml:?}");
    for path in &yaml {
        let text = std::fs::read_to_string(path).unwrap();
        let documents = yaml_rust2::YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        assert!(!documents.is_empty(), "{} is empty", path.display());
    }
    let dashboards = deploy_files(&[".json"]);
    let mut named = BTreeSet::new();
    for path in &dashboards {
        let text = std::fs::read_to_string(path).unwrap();
        let dashboard: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 10));
        named.extend(idgraph_metric_names(&text));
    }
    let rules = deploy_files(&["alerts.yml"]);
    assert_eq!(rules.len(), 1);
    named.extend(idgraph_metric_names(
        &std::fs::read_to_string(&rules[0]).unwrap(),
    ));
    assert!(named.len() >= 25, "{named:?}");

    // A live worker, part-way through its input, serves every one of them.
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = generate_and_resolve(dir.path(), 3_000, 66);
    let broker = Broker::start(dir.path());
    broker.ok(&["produce", "--input", p(&input)]);
    let mut worker = broker.logged_worker(&dir.path().join("state"), "120", &[]);
    let address = {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(worker.stderr.take().unwrap())
            .lines()
            .map_while(Result::ok);
        let line = lines
            .find(|l| l.contains("http listening"))
            .expect("the worker logs its http address");
        // Keep reading, so the worker never writes its log into a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let line: Value = serde_json::from_str(&line).unwrap();
        line["fields"]["address"].as_str().unwrap().to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let scrape = loop {
        let response = get(&address, "/metrics");
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        let lagging = body.contains("idgraph_consumer_lag_messages{");
        let processed = body.contains("idgraph_event_to_output_seconds_count")
            && !body.contains("idgraph_event_to_output_seconds_count 0\n");
        if lagging && processed {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never caught up:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // A sample line of the name, or the declaration of a histogram by that name.
    let served = |name: &str| {
        scrape.contains(&format!("# TYPE {name} "))
            || scrape.lines().any(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
    };
    let missing: Vec<&String> = named.iter().filter(|name| !served(name)).collect();
    assert!(
        missing.is_empty(),
        "deploy/ names metrics the worker does not serve: {missing:?}"
    );

    // The exposition passes Prometheus's own linter where it is installed (.ci/run installs
    // it and sets IDGRAPH_REQUIRE_PROMTOOL).
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    match promtool {
        Ok(mut promtool) => {
            use std::io::Write;
            promtool
                .stdin
                .take()
                .unwrap()
                .write_all(scrape.as_bytes())
                .unwrap();
            let output = promtool.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "promtool check metrics:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Err(error) => assert!(
            std::env::var_os("IDGRAPH_REQUIRE_PROMTOOL").is_none(),
            "promtool is required here: {error}"
        ),
    }
    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let status = worker.wait().unwrap();
    assert!(
        status.success(),
        "the worker stopped on SIGTERM with {status}"
    );
}

#[test]
fn soak_kills_and_restarts_the_worker_and_prints_its_memory_curve() {
    // Killed with SIGKILL half-way and restarted on its state; a short group session lets the
    // restarted worker take its partitions back sooner.
    let output = Command::new(BIN)
        .args([
            "soak",
            "--events",
            "4000",
            "--sample-secs",
            "1",
            "--kill-at",
            "0.5",
        ])
        .env("IDGRAPH__LOG__FILTER", "warn")
        .env("IDGRAPH__KAFKA__SESSION_TIMEOUT_MS", "6000")
        .output()
        .unwrap();
    let printed = check(output, &["soak"]);
    let produced: u64 = printed
        .lines()
        .find_map(|l| l.strip_prefix("produced ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no total in\n{printed}"));
    assert!(produced > 4000, "{printed}");
    // The restarted worker sent what its predecessor had left unacknowledged, then consumed
    // again from the stored positions, through to the end of the stream.
    assert!(printed.contains("killed the worker (SIGKILL)"), "{printed}");
    assert!(
        printed.contains("restart: serving /metrics after"),
        "{printed}"
    );
    assert!(printed.contains("consuming again after"), "{printed}");
    let samples = printed
        .lines()
        .filter(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.len() == 3 && fields.iter().all(|f| f.parse::<f64>().is_ok())
        })
        .count();
    assert!(samples >= 2, "{printed}");
    assert!(printed.contains("rss at 100% of the stream"), "{printed}");
    assert!(printed.contains("over the second half"), "{printed}");
}
