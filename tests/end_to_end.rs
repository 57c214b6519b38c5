//! End-to-end: the built `idgraph` binary on generated data and on hand-made bad input, with a
//! real RocksDB state directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn idgraph(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idgraph"))
        .args(args)
        .env("IDGRAPH__RESOLVE__PROGRESS_INTERVAL_SECS", "0")
        .output()
        .expect("the idgraph binary runs")
}

fn ok(args: &[&str]) -> String {
    let output = idgraph(args);
    assert!(
        output.status.success(),
        "idgraph {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn generate(dir: &Path, events: usize, seed: u64) -> (PathBuf, PathBuf) {
    let input = dir.join("events.jsonl");
    let truth = dir.join("truth.jsonl");
    ok(&[
        "gen",
        "--events",
        &events.to_string(),
        "--seed",
        &seed.to_string(),
        "--output",
        p(&input),
        "--truth",
        p(&truth),
    ]);
    (input, truth)
}

/// `idgraph eval --json` of the enriched events in output directory `out`.
fn eval_json(truth: &Path, out: &Path) -> Value {
    let printed = ok(&[
        "eval",
        "--truth",
        p(truth),
        "--enriched",
        p(&out.join("enriched.jsonl")),
        "--json",
    ]);
    serde_json::from_str(&printed).unwrap()
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generated_data_resolves_with_high_precision_and_recall() {
    let dir = tempfile::tempdir().unwrap();
    let (input, truth) = generate(dir.path(), 30_000, 11);
    let out = dir.path().join("out");
    let summary = ok(&["resolve", "--input", p(&input), "--output-dir", p(&out)]);
    if cfg!(target_os = "linux") {
        assert_cpu_split_adds_up(&summary);
    }
    for file in [
        "enriched.jsonl",
        "profiles.jsonl",
        "identity-changes.jsonl",
        "dead-letter.jsonl",
        "quality.json",
    ] {
        assert!(out.join(file).exists(), "{file} is written");
    }
    let report = eval_json(&truth, &out);
    let precision = report["pairwise_precision"].as_f64().unwrap();
    let recall = report["pairwise_recall"].as_f64().unwrap();
    assert!(
        precision >= 0.999,
        "pairwise precision {precision}: {report}"
    );
    assert!(recall >= 0.98, "pairwise recall {recall}: {report}");
    assert_eq!(
        report["missing_from_resolution"], 0,
        "every valid event has an enriched line"
    );
    let quality: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quality.json")).unwrap()).unwrap();
    assert!(quality["match_rate"]["web"].as_f64().unwrap() > 0.5);
    assert!(
        quality["blocked_identifiers"].as_object().unwrap().len() > 1,
        "junk values are counted: {quality}"
    );
}

/// The number printed right after `label` in a summary line ("reader 0.52 s" gives 0.52).
fn number_after(line: &str, label: &str) -> f64 {
    let start = line
        .find(label)
        .unwrap_or_else(|| panic!("{label} in {line}"))
        + label.len();
    line[start..]
        .trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{label} in {line}: {e}"))
}

/// The run summary's CPU line names each part's seconds, and they add up to the total.
fn assert_cpu_split_adds_up(summary: &str) {
    let line = summary
        .lines()
        .find(|line| line.starts_with("cpu "))
        .unwrap_or_else(|| panic!("no cpu line in the summary:\n{summary}"));
    let seconds_after = |label: &str| number_after(line, label);
    let total = seconds_after("cpu ");
    let parts: Vec<f64> = [
        "reader ",
        "resolver ",
        "committer ",
        "storage background and other ",
    ]
    .iter()
    .map(|label| seconds_after(label))
    .collect();
    assert!(
        total > 0.0,
        "a 30,000-event run takes measurable cpu: {line}"
    );
    assert!(
        (parts.iter().sum::<f64>() - total).abs() < 0.03,
        "the parts add up to the total: {line}"
    );
}

#[test]
fn two_runs_on_the_same_input_write_byte_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = generate(dir.path(), 5_000, 3);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(&["resolve", "--input", p(&input), "--output-dir", p(&a)]);
    ok(&["resolve", "--input", p(&input), "--output-dir", p(&b)]);
    for file in [
        "enriched.jsonl",
        "profiles.jsonl",
        "identity-changes.jsonl",
        "dead-letter.jsonl",
        "quality.json",
    ] {
        let left = std::fs::read(a.join(file)).unwrap();
        let right = std::fs::read(b.join(file)).unwrap();
        assert!(
            !left.is_empty() || file == "dead-letter.jsonl",
            "{file} is empty"
        );
        assert!(left == right, "{file} differs between two runs");
    }
}

const OUTPUT_FILES: [&str; 5] = [
    "enriched.jsonl",
    "profiles.jsonl",
    "identity-changes.jsonl",
    "dead-letter.jsonl",
    "quality.json",
];

/// Starts `idgraph resolve` with small batches and checkpoints, so that a run has many.
fn start_resolve(input: &Path, out: &Path, state: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_idgraph"))
        .args(["resolve", "--input", p(input), "--output-dir", p(out)])
        .args(["--state", p(state)])
        .env("IDGRAPH__RESOLVE__PROGRESS_INTERVAL_SECS", "0")
        .env("IDGRAPH__RESOLVE__BATCH_SIZE", "250")
        .env("IDGRAPH__RESOLVE__CHECKPOINT_INTERVAL", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn rerunning_after_kill_9_leaves_the_outputs_of_an_uncrashed_run() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = generate(dir.path(), 30_000, 21);
    let reference = dir.path().join("reference");
    let uncrashed = start_resolve(&input, &reference, &dir.path().join("reference-state"))
        .wait_with_output()
        .unwrap();
    assert!(uncrashed.status.success());
    let mut killed_mid_run = 0;
    for attempt in 0..3u64 {
        let out = dir.path().join(format!("out{attempt}"));
        let state = dir.path().join(format!("state{attempt}"));
        let mut run = start_resolve(&input, &out, &state);
        // Kill it once some records are out and a little later each time, so that the kill
        // falls between checkpoints, inside one, or while records past one are written.
        let enriched = out.join("enriched.jsonl");
        let wanted = 200_000 * (attempt + 1);
        while std::fs::metadata(&enriched).map_or(0, |m| m.len()) < wanted {
            if run.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if run.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        run.kill().unwrap();
        run.wait().unwrap();
        let rerun = start_resolve(&input, &out, &state)
            .wait_with_output()
            .unwrap();
        assert!(rerun.status.success(), "the rerun after kill -9 failed");
        for file in OUTPUT_FILES {
            let expected = std::fs::read(reference.join(file)).unwrap();
            let actual = std::fs::read(out.join(file)).unwrap();
            assert!(
                expected == actual,
                "{file} after kill -9 and a rerun differs from an uncrashed run's (attempt {attempt}: {} vs {} bytes)",
                actual.len(),
                expected.len()
            );
        }
    }
    assert!(killed_mid_run > 0, "no run was killed before it finished");
    // A finished run rerun changes nothing, and another output directory is refused with
    // the way out named.
    ok(&[
        "resolve",
        "--input",
        p(&input),
        "--output-dir",
        p(&dir.path().join("out0")),
        "--state",
        p(&dir.path().join("state0")),
    ]);
    for file in OUTPUT_FILES {
        assert!(
            std::fs::read(reference.join(file)).unwrap()
                == std::fs::read(dir.path().join("out0").join(file)).unwrap()
        );
    }
    let elsewhere = idgraph(&[
        "resolve",
        "--input",
        p(&input),
        "--output-dir",
        p(&dir.path().join("elsewhere")),
        "--state",
        p(&dir.path().join("state0")),
    ]);
    assert!(!elsewhere.status.success());
    let message = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        message.contains("already holds") && message.contains("new --state"),
        "{message}"
    );
}

#[test]
fn a_second_file_continues_the_same_graph_and_matches_a_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = generate(dir.path(), 6_000, 5);
    let text = std::fs::read(&input).unwrap();
    let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
    let (first, second) = lines.split_at(lines.len() / 2);
    let (part1, part2) = (
        dir.path().join("part1.jsonl"),
        dir.path().join("part2.jsonl"),
    );
    std::fs::write(&part1, first.concat()).unwrap();
    std::fs::write(&part2, second.concat()).unwrap();
    let state = dir.path().join("state");
    ok(&[
        "resolve",
        "--input",
        p(&part1),
        "--output-dir",
        p(&dir.path().join("o1")),
        "--state",
        p(&state),
    ]);
    ok(&[
        "resolve",
        "--input",
        p(&part2),
        "--output-dir",
        p(&dir.path().join("o2")),
        "--state",
        p(&state),
    ]);
    ok(&[
        "resolve",
        "--input",
        p(&input),
        "--output-dir",
        p(&dir.path().join("whole")),
    ]);
    let whole: HashMap<String, String> = read_lines(&dir.path().join("whole/enriched.jsonl"))
        .into_iter()
        .map(|e| {
            (
                e["event_id"].as_str().unwrap().to_owned(),
                e["customer_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut checked = 0;
    for part in ["o1", "o2"] {
        for event in read_lines(&dir.path().join(part).join("enriched.jsonl")) {
            let id = event["event_id"].as_str().unwrap();
            assert_eq!(
                event["customer_id"].as_str().unwrap(),
                whole[id],
                "event {id}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, whole.len());
    // The state answers lookups afterwards, following merges.
    let some_customer = whole.values().next().unwrap();
    let profile: Value = serde_json::from_str(&ok(&[
        "lookup",
        "--state",
        p(&state),
        "--customer",
        some_customer,
    ]))
    .unwrap();
    assert!(profile["customer_id"].is_string());
    let explanation: Value = serde_json::from_str(&ok(&[
        "explain",
        "--state",
        p(&state),
        "--customer",
        some_customer,
    ]))
    .unwrap();
    assert!(!explanation["evidence"].as_array().unwrap().is_empty());
}

#[test]
fn malformed_lines_are_dead_lettered_with_reason_and_line_and_the_rest_is_processed() {
    let dir = tempfile::tempdir().unwrap();
    let good = |id: &str| {
        format!(
            r#"{{"event_id":"{id}","event_type":"page_view","timestamp":"2026-03-01T12:00:00Z","identifiers":{{"email":"a@x.com"}}}}"#
        )
    };
    let mut input: Vec<u8> = Vec::new();
    let huge = format!(
        r#"{{"event_id":"big","event_type":"x","timestamp":"2026-03-01T12:00:00Z","properties":{{"blob":"{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    for line in [
        good("g1").into_bytes(),
        b"{\"event_id\": \"broken\",".to_vec(),
        b"\xff\xfe not utf-8".to_vec(),
        br#"{"event_type":"x","timestamp":"2026-03-01T12:00:00Z"}"#.to_vec(),
        br#"{"event_id":"w","event_type":"x","timestamp":"2026-03-01T12:00:00Z","identifiers":"a@x.com"}"#.to_vec(),
        br#"{"event_id":7,"event_type":"x","timestamp":1700000000}"#.to_vec(),
        Vec::new(),
        huge.into_bytes(),
        good("g2").into_bytes(),
    ] {
        input.extend(line);
        input.push(b'\n');
    }
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, input).unwrap();
    let out = dir.path().join("out");
    ok(&["resolve", "--input", p(&path), "--output-dir", p(&out)]);
    let enriched = read_lines(&out.join("enriched.jsonl"));
    assert_eq!(enriched.len(), 3);
    assert_eq!(enriched[0]["customer_id"], enriched[2]["customer_id"]);
    // Identifiers sent as a string instead of an object: the event is kept without them.
    assert_eq!(enriched[1]["event_id"], "w");
    assert_eq!(enriched[1]["input"]["line"], 5);
    assert_eq!(
        enriched[1]["quality_issues"],
        serde_json::json!([{"field": "identifiers", "kind": "wrong_type"}])
    );
    let letters = read_lines(&out.join("dead-letter.jsonl"));
    let got: Vec<(u64, &str)> = letters
        .iter()
        .map(|l| {
            (
                l["input"]["line"].as_u64().unwrap(),
                l["failure_kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (2, "invalid_json"),
            (3, "invalid_utf8"),
            (4, "missing_field"),
            (6, "wrong_type"),
            (7, "empty_payload"),
            (8, "too_large"),
        ]
    );
    for letter in &letters {
        assert!(!letter["reason"].as_str().unwrap().is_empty());
        assert!(letter["processor_version"]
            .as_str()
            .unwrap()
            .starts_with("idgraph "));
        assert!(letter["idempotency_key"].is_string());
    }
    let huge_letter = &letters[5];
    assert_eq!(huge_letter["truncated"], true);
    assert!(huge_letter["payload_size"].as_u64().unwrap() > 2 * 1024 * 1024);
    assert!(huge_letter["payload"].as_str().unwrap().len() <= 16 * 1024);
}

#[test]
fn an_unknown_config_key_stops_the_run_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[engine.fuzzy]\ntreshold = 12\n").unwrap();
    let output = idgraph(&[
        "--config",
        p(&config),
        "gen",
        "--events",
        "1",
        "--output",
        "x",
        "--truth",
        "y",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("engine.fuzzy.treshold"), "{stderr}");
}

/// `idgraph validate` checks a config file as a start would, without starting anything:
/// the deploy configs pass, and each kind of mistake is refused with the setting named.
#[test]
fn validate_passes_the_shipped_configs_and_names_what_is_wrong_in_others() {
    let dir = tempfile::tempdir().unwrap();
    let summary = ok(&["validate"]);
    assert!(summary.contains("the configuration is valid"), "{summary}");
    for shipped in ["deploy/production.toml", "deploy/k8s/idgraph.toml"] {
        let path = format!("{}/../../{shipped}", env!("CARGO_MANIFEST_DIR"));
        let output = Command::new(env!("CARGO_BIN_EXE_idgraph"))
            .args(["--config", &path, "validate"])
            .env("IDGRAPH__HTTP__API_TOKEN", "s3cret")
            .output()
            .unwrap();
        assert!(output.status.success(), "{shipped}: {output:?}");
    }
    for (name, text, named) in [
        ("typo.toml", "[kafka]\nbatch_sise = 3\n", "kafka.batch_sise"),
        (
            "librdkafka.toml",
            "[kafka.client]\n\"security.protocol\" = \"SSLL\"\n",
            "security.protocol",
        ),
        (
            "exposed.toml",
            "[http]\napi_listen = \"0.0.0.0:9465\"\n",
            "http.api_token",
        ),
        (
            "range.toml",
            "[kafka]\nshutdown_timeout_ms = 0\n",
            "kafka.shutdown_timeout_ms",
        ),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let output = idgraph(&["--config", p(&file), "validate"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name} passed");
        assert!(
            stderr.contains(named),
            "{name}: {named} not named in {stderr}"
        );
    }
}

/// Sends one HTTP/1.1 request with `headers` (each ending in CRLF) and returns the status
/// code and the body.
fn http_with(address: &str, method: &str, target: &str, headers: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nhost: {address}\r\n{headers}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn http(address: &str, method: &str, target: &str) -> (u16, String) {
    http_with(address, method, target, "")
}

/// The address printed after `marker` in `line`.
fn address_after(line: &str, marker: &str) -> String {
    line.split(marker)
        .nth(1)
        .and_then(|rest| rest.split(['/', ' ', '\n']).next())
        .unwrap_or_else(|| panic!("no address after {marker:?} in {line:?}"))
        .to_owned()
}

#[test]
fn the_profile_api_follows_merges_normalizes_lookups_and_explains() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    // Two customers that an event with both an email and a phone then merges.
    let events = [
        r#"{"event_id":"a1","source":"web","event_type":"page_view","timestamp":"2026-03-01T10:00:00Z","identifiers":{"email":"Ann.Lee@Example.com"}}"#,
        r#"{"event_id":"b1","source":"mobile","event_type":"app_open","timestamp":"2026-03-01T11:00:00Z","identifiers":{"phone":"+1 415 555 0100","device_id":"dev-9"}}"#,
        r#"{"event_id":"m1","source":"transaction","event_type":"purchase","timestamp":"2026-03-01T12:00:00Z","identifiers":{"email":"ann.lee@example.com","phone":"+14155550100"},"properties":{"amount":19.99,"currency":"USD"}}"#,
    ];
    std::fs::write(&input, events.join("\n") + "\n").unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("out");
    ok(&[
        "resolve",
        "--input",
        p(&input),
        "--output-dir",
        p(&out),
        "--state",
        p(&state),
    ]);
    let profiles = read_lines(&out.join("profiles.jsonl"));
    let tombstone = profiles
        .iter()
        .find(|r| r.get("merged_into").is_some())
        .expect("the third event merged two profiles");
    let absorbed = tombstone["customer_id"].as_str().unwrap();
    let survivor = tombstone["merged_into"].as_str().unwrap();
    let latest = profiles
        .iter()
        .rev()
        .find(|r| r["customer_id"] == survivor && r.get("profile").is_some())
        .unwrap();

    let (_server, first_line) = start_serve(
        &state,
        &[
            ("IDGRAPH__HTTP__API_TOKEN", "s3cret"),
            ("IDGRAPH__HTTP__HEADER_READ_TIMEOUT_MS", "300"),
        ],
    );
    let address = address_after(&first_line, "serving http://");
    let operations = address_after(&first_line, "health at http://");
    let token = "authorization: Bearer s3cret\r\n";
    let json = |target: &str| -> (u16, Value) {
        let (status, body) = http_with(&address, "GET", target, token);
        (status, serde_json::from_str(&body).unwrap())
    };

    // The API wants its token; the metrics address serves no customer data.
    let (status, body) = http(&address, "GET", "/v1/lookup?kind=device_id&value=dev-9");
    assert_eq!(status, 401, "{body}");
    let wrong = "authorization: Bearer s3creT\r\n";
    assert_eq!(http_with(&address, "GET", "/v1/profiles/x", wrong).0, 401);
    assert_eq!(
        http(&operations, "GET", &format!("/v1/profiles/{survivor}")).0,
        404
    );
    let (status, metrics) = http(&operations, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("idgraph_merges_total 0"), "{metrics}");
    assert_eq!(http(&operations, "GET", "/readyz").0, 200);
    // A request head past 16 KiB is refused as too large, not cut off and misrouted, and the
    // client gets that answer rather than a reset however much it still had to send: 4 MiB
    // cannot all wait in the socket buffers, so the server must read and discard the rest.
    let huge = format!("x-padding: {}\r\n", "p".repeat(4 * 1024 * 1024));
    assert_eq!(http_with(&address, "GET", "/v1/profiles/x", &huge).0, 431);
    // A connection that sends nothing is closed after the head deadline (300 ms here).
    {
        use std::io::Read;
        let mut idle = std::net::TcpStream::connect(&address).unwrap();
        idle.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let _ = idle.read_to_end(&mut rest);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "an idle connection stayed open"
        );
    }

    // An absorbed id redirects to the survivor's current profile, as the profile topic has it.
    let (status, body) = json(&format!("/v1/profiles/{absorbed}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["customer_id"], survivor);
    assert_eq!(body["redirected_from"], absorbed);
    assert_eq!(body["profile"], latest["profile"]);
    let (status, body) = json(&format!("/v1/profiles/{survivor}"));
    assert_eq!((status, body.get("redirected_from")), (200, None));

    // Lookups normalize the value the way events are normalized.
    for query in [
        "kind=email&value=ANN.LEE%40EXAMPLE.COM%20",
        "kind=phone&value=%2B1+415+555+0100",
        "kind=device_id&value=dev-9",
    ] {
        let (status, body) = json(&format!("/v1/lookup?{query}"));
        assert_eq!(
            (status, &body["customer_id"]),
            (200, &Value::from(survivor)),
            "{query}"
        );
    }

    let (status, body) = json(&format!("/v1/profiles/{absorbed}/explain"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["customer_id"], survivor);
    assert_eq!(body["absorbed_ids"], serde_json::json!([absorbed]));
    assert!(!body["evidence"].as_array().unwrap().is_empty());

    // Errors say what is wrong, as JSON.
    let (status, body) = json("/v1/profiles/cus_missing");
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().contains("cus_missing"),
        "{body}"
    );
    let (status, body) = json("/v1/lookup?kind=email&value=nobody%40example.com");
    assert_eq!(status, 404, "{body}");
    assert!(
        !body.to_string().contains("nobody"),
        "an error echoes a value: {body}"
    );
    let (status, body) = json("/v1/lookup?kind=email");
    assert_eq!(status, 400, "{body}");
    assert_eq!(http_with(&address, "POST", "/v1/profiles/x", token).0, 405);

    // The server counts its own answers and watches its state's disk and its memory.
    let (_, metrics) = http(&operations, "GET", "/metrics");
    for present in [
        "idgraph_http_requests_total{code=\"401\",server=\"profiles\"} 2",
        "idgraph_http_requests_total{code=\"200\",server=\"operations\"}",
    ] {
        assert!(metrics.contains(present), "{present} missing:\n{metrics}");
    }
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    assert!(gauge("idgraph_state_disk_available_bytes") > 0.0);
    assert!(gauge("idgraph_state_disk_size_bytes") >= gauge("idgraph_state_disk_available_bytes"));
    assert!(gauge("idgraph_process_resident_memory_bytes") > 1e6);
    assert!(gauge("idgraph_rocksdb_sst_bytes") > 0.0);
}

/// Resolves one event (ann@example.com) into a state in `dir` and starts `idgraph serve` on it
/// with default limits and free ports; returns the server and the line it printed first,
/// which names both addresses.
fn serve_one_customer(dir: &Path) -> (KillOnDrop, String) {
    let input = dir.join("events.jsonl");
    std::fs::write(
        &input,
        r#"{"event_id":"a1","source":"web","event_type":"page_view","timestamp":"2026-03-01T10:00:00Z","identifiers":{"email":"ann@example.com"}}"#.to_owned() + "\n",
    )
    .unwrap();
    let state = dir.join("state");
    ok(&[
        "resolve",
        "--input",
        p(&input),
        "--output-dir",
        p(&dir.join("out")),
        "--state",
        p(&state),
    ]);
    start_serve(&state, &[])
}

/// Starts `idgraph serve` on `state` with free ports and the extra environment `env`;
/// returns the server and the line it printed first, which names both addresses.
fn start_serve(state: &Path, env: &[(&str, &str)]) -> (KillOnDrop, String) {
    let mut server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_idgraph"))
            .args(["serve", "--state", p(state), "--listen", "127.0.0.1:0"])
            .env("IDGRAPH__HTTP__LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first_line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.0.stdout.take().unwrap()),
        &mut first_line,
    )
    .unwrap();
    (server, first_line)
}

#[test]
fn fifteen_hundred_idle_connections_keep_neither_health_probes_out_nor_descriptors_pinned() {
    let dir = tempfile::tempdir().unwrap();
    // Default limits: 64 connections, 5 s for a request head.
    let (server, first_line) = serve_one_customer(dir.path());
    let operations = address_after(&first_line, "health at http://");
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
    let idle: Vec<std::net::TcpStream> = (0..1500)
        .map(|_| std::net::TcpStream::connect(&operations).unwrap())
        .collect();
    // The probe is answered at once, though every idle connection is still open on our side.
    let started = std::time::Instant::now();
    let (status, body) = http(&operations, "GET", "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "/healthz took {:?}",
        started.elapsed()
    );
    // The server kept at most its limit of them; the rest it closed.
    let descriptors = std::fs::read_dir(format!("/proc/{}/fd", server.0.id()))
        .unwrap()
        .count();
    assert!(descriptors < 64 + 100, "{descriptors} descriptors open");
    drop(idle);
}

#[test]
fn serve_lets_a_request_under_way_finish_on_sigterm_and_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, first_line) = serve_one_customer(dir.path());
    let address = address_after(&first_line, "serving http://");
    use std::io::{Read, Write};
    // Half a request is under way when the server is told to stop.
    let mut under_way = std::net::TcpStream::connect(&address).unwrap();
    under_way
        .write_all(b"GET /v1/lookup?kind=email&value=ann%40example.com HTTP/1.1\r\n")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let terminated = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    // The server stops accepting at once...
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(&address).is_ok() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "still accepting after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // ...but answers the request it had taken, and only then exits, cleanly.
    under_way
        .write_all(b"host: idgraph\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    under_way.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"customer_id\""), "{answer}");
    let status = server.0.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
}

/// A child process that is killed when the test ends, passed or failed.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The benchmark prints, under each size, the floors that bound its per-core rate: their parts
/// add up to the total, and the ceiling is the rate that total allows.
#[test]
fn the_benchmark_reports_its_floors_and_the_ceiling_they_set() {
    let dir = tempfile::tempdir().unwrap();
    let printed = ok(&["bench", "--sizes", "3000", "--work-dir", p(dir.path())]);
    let row = printed
        .lines()
        .find(|line| line.trim_start().starts_with("3000 "))
        .unwrap_or_else(|| panic!("no row for 3000 events:\n{printed}"));
    let precision: f64 = row.split_whitespace().nth(8).unwrap().parse().unwrap();
    assert!(precision > 0.99, "the bench scores its run: {row}");
    let line = printed
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("floors "))
        .unwrap_or_else(|| panic!("no floors line:\n{printed}"));
    let figure = |label: &str| number_after(line, label);
    let total = figure("floors ");
    let parts = ["parse+normalize ", "output JSON ", "state written once "].map(figure);
    assert!(
        parts.iter().all(|us| *us > 0.0),
        "every floor is measured: {line}"
    );
    assert!(
        (parts.iter().sum::<f64>() - total).abs() <= 0.15,
        "the floors add up to their total: {line}"
    );
    let ceiling = figure("at most ");
    assert!(
        (ceiling - 1e6 / total).abs() / ceiling < 0.05,
        "the ceiling is the rate the floors allow: {line}"
    );
    let hard = printed
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("hard mix: "))
        .unwrap_or_else(|| panic!("no hard mix line:\n{printed}"));
    assert!(
        number_after(hard, "precision ") > 0.99 && number_after(hard, "recall ") > 0.9,
        "the bench scores the hard corruption mix too: {hard}"
    );
}

#[test]
fn train_estimates_m_and_u_into_a_config_that_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("hard.jsonl");
    let truth = dir.path().join("truth.jsonl");
    ok(&[
        "gen",
        "--events",
        "4000",
        "--seed",
        "3",
        "--noise",
        "hard",
        "--output",
        p(&input),
        "--truth",
        p(&truth),
    ]);
    let trained = dir.path().join("trained.toml");
    let printed = ok(&["train", "--input", p(&input), "--output", p(&trained)]);
    assert!(printed.contains("candidate pairs"), "{printed}");
    let text = std::fs::read_to_string(&trained).unwrap();
    let config: toml::Value = toml::from_str(&text).unwrap();
    let fields = config["engine"]["fuzzy"]["fields"].as_table().unwrap();
    for field in [
        "first_name",
        "last_name",
        "date_of_birth",
        "street",
        "postcode",
    ] {
        let m = fields[field]["m"].as_table().unwrap();
        let total: f64 = m.values().map(|p| p.as_float().unwrap()).sum();
        assert!((total - 1.0).abs() < 0.01, "{field}: m sums to {total}");
        let exact = |table: &str| fields[field][table]["exact"].as_float().unwrap();
        assert!(
            exact("m") > exact("u") * 10.0,
            "{field}: exact agreement is evidence"
        );
    }
    // The file is a config the program accepts as it is.
    let out = dir.path().join("out");
    ok(&[
        "--config",
        p(&trained),
        "resolve",
        "--input",
        p(&input),
        "--output-dir",
        p(&out),
    ]);
    let accuracy = eval_json(&truth, &out);
    assert!(
        accuracy["pairwise_precision"].as_f64().unwrap() > 0.99,
        "{accuracy}"
    );
}
