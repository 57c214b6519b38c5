//! Matching quality on person data: the Febrl development files (`tests/data/febrl`, not made
//! by our generator) and the generator's normal and hard corruption mixes. Each is resolved
//! in one streaming pass with the default configuration, in batches as file mode cuts them,
//! and scored against its truth, following merges. The floors are the product's targets:
//! a change that loses links (or makes false ones) fails here.

use std::collections::HashMap;

use idgraph_engine::{Engine, EngineConfig, InputMessage, MemoryStore, StateCache, StateStore};
use idgraph_model::InputCoordinates;
use idgraph_synth::{evaluate, generate, Accuracy, GenConfig, Noise};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const FEBRL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/febrl");

fn lines_of(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn truth_of(bytes: &[u8]) -> HashMap<String, String> {
    lines_of(bytes)
        .iter()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_slice(line).unwrap();
            (
                record["event_id"].as_str().unwrap().to_owned(),
                record["customer"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Resolves `lines` in order, 2,000 per batch, and scores the final clusters.
fn resolve_and_score(lines: &[Vec<u8>], truth: &HashMap<String, String>) -> Accuracy {
    let engine = Engine::new(EngineConfig::defaults(), "quality").unwrap();
    let mut store = MemoryStore::new();
    let mut cache = StateCache::with_megabytes(1024);
    let coordinates: Vec<InputCoordinates> = (0..lines.len())
        .map(|line| InputCoordinates::File {
            file: "quality.jsonl".into(),
            line: line as u64 + 1,
        })
        .collect();
    let mut assigned = Vec::new();
    let mut merged_into: HashMap<String, String> = HashMap::new();
    for (payloads, coordinates) in lines.chunks(2000).zip(coordinates.chunks(2000)) {
        let messages = InputMessage::batch(payloads, coordinates, "web");
        let outcome = engine
            .process_batch_cached(&store, &mut cache, &messages)
            .unwrap();
        store.write(&outcome.writes).unwrap();
        for enriched in outcome.enriched {
            assigned.push((enriched.event_id.to_string(), enriched.customer_id));
        }
        for profile in outcome.profiles {
            if let Some(survivor) = profile.merged_into {
                merged_into.insert(profile.customer_id, survivor);
            }
        }
    }
    let current = |mut id: String| {
        while let Some(next) = merged_into.get(&id) {
            id = next.clone();
        }
        id
    };
    let resolved: Vec<(String, String)> = assigned
        .into_iter()
        .map(|(event, customer)| (event, current(customer)))
        .collect();
    evaluate(
        truth,
        resolved.iter().map(|(e, c)| (e.as_str(), c.as_str())),
    )
}

fn febrl(name: &str) -> (Vec<Vec<u8>>, HashMap<String, String>) {
    let events = std::fs::read(format!("{FEBRL}/{name}.jsonl")).unwrap();
    let truth_file = format!("{FEBRL}/{}_truth.jsonl", name.split('_').next().unwrap());
    (
        lines_of(&events),
        truth_of(&std::fs::read(truth_file).unwrap()),
    )
}

fn generated(events: usize, noise: Noise) -> (Vec<Vec<u8>>, HashMap<String, String>) {
    let config = GenConfig {
        events,
        seed: 7,
        noise,
        ..GenConfig::default()
    };
    let (mut out, mut truth) = (Vec::new(), Vec::new());
    generate(&config, &mut out, &mut truth).unwrap();
    (lines_of(&out), truth_of(&truth))
}

fn shuffled(lines: &[Vec<u8>], seed: u64) -> Vec<Vec<u8>> {
    let mut lines = lines.to_vec();
    lines.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    lines
}

#[test]
fn the_febrl_files_link_with_f1_above_0_995_and_no_false_links() {
    let mut report = Vec::new();
    for name in ["febrl1_fuzzy", "febrl1_ssn", "febrl2_fuzzy", "febrl2_ssn"] {
        let (lines, truth) = febrl(name);
        let accuracy = resolve_and_score(&lines, &truth);
        assert_eq!(accuracy.events_scored as usize, lines.len(), "{name}");
        report.push((name, accuracy.pairwise_precision, accuracy.pairwise_f1));
    }
    for (name, precision, f1) in &report {
        assert!(
            *precision >= 0.999 && *f1 >= 0.995,
            "{name}: precision {precision:.4}, F1 {f1:.4} (all: {report:?})"
        );
    }
}

#[test]
fn the_generators_two_mixes_keep_precision_and_recall_above_0_99() {
    for noise in [Noise::Normal, Noise::Hard] {
        let (lines, truth) = generated(30_000, noise);
        let accuracy = resolve_and_score(&lines, &truth);
        assert!(
            accuracy.pairwise_precision >= 0.999 && accuracy.pairwise_recall >= 0.99,
            "{noise:?}: {accuracy:?}"
        );
    }
}

#[test]
fn shuffled_orders_of_one_file_score_within_0_003_of_each_other() {
    let cases = [febrl("febrl2_fuzzy"), generated(20_000, Noise::Hard)];
    for (lines, truth) in cases {
        let scores: Vec<f64> = (1..=5)
            .map(|seed| resolve_and_score(&shuffled(&lines, seed), &truth).pairwise_f1)
            .collect();
        let spread = scores.iter().cloned().fold(f64::MIN, f64::max)
            - scores.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread <= 0.003, "F1 over five orders: {scores:?}");
    }
}
