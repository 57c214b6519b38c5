//! `idgraph train`: estimates the fuzzy model's m and u from an unlabelled JSON Lines file
//! (Splink's approach: u from random pairs, m by expectation maximisation over the pairs the
//! blocking rules propose) and writes them as `[engine.fuzzy.fields.*]` tables to pass with
//! `--config`.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context, Result};
use idgraph_engine::matching::train::train as estimate;
use idgraph_engine::matching::{blocking_keys, EventSide, MatchModel};
use idgraph_engine::{Engine, InputMessage, Prepared};
use idgraph_model::{InputCoordinates, NormalizedEvent};

use crate::config::AppConfig;
use crate::resolve::PROCESSOR_VERSION;

pub fn train(config: &AppConfig, input: &Path, output: &Path, max_pairs: usize) -> Result<()> {
    let engine = Engine::new(config.engine.clone(), PROCESSOR_VERSION)?;
    let events = read_events(&engine, input)?;
    if events.len() < 2 {
        bail!(
            "{} has {} events with traits; training needs at least two",
            input.display(),
            events.len()
        );
    }
    let model = MatchModel::new(&config.engine.fuzzy, &config.engine.protection);
    let vector =
        |(a, b): (usize, usize)| model.comparison_vector(&side(&events[a]), &side(&events[b]));
    let random: Vec<_> = random_pairs(events.len(), max_pairs).map(vector).collect();
    // A key held by more events than resolution's block limit proposes no pairs, as there.
    let block_limit = config.engine.fuzzy.max_block_size;
    let candidates: Vec<_> = candidate_pairs(&events, block_limit, max_pairs)
        .into_iter()
        .map(vector)
        .collect();
    let fields: Vec<(String, _)> = model
        .trait_comparisons()
        .map(|(field, kind)| (field.to_owned(), kind))
        .collect();
    let kinds: Vec<_> = fields.iter().map(|(_, kind)| *kind).collect();
    let prior_m: Vec<Vec<f64>> = fields
        .iter()
        .map(|(field, kind)| {
            let m = &config.engine.fuzzy.fields[field].m;
            kind.levels().iter().map(|level| m[*level]).collect()
        })
        .collect();
    let trained = estimate(&kinds, &prior_m, &random, &candidates, 100);
    let mut text = format!(
        "# Written by `idgraph train --input {}`: {} events with traits, {} random pairs for u,\n\
         # {} blocked candidate pairs for m ({} EM iterations; {:.4} of candidates are matches).\n\
         # Pass with --config; every other setting keeps its default.\n",
        input.display(),
        events.len(),
        random.len(),
        candidates.len(),
        trained.iterations,
        trained.match_share
    );
    for (index, (field, kind)) in fields.iter().enumerate() {
        let configured = &config.engine.fuzzy.fields[field];
        let table = |values: &[f64]| {
            let pairs: Vec<String> = kind
                .levels()
                .iter()
                .zip(values)
                .map(|(level, p)| format!("{level} = {p:.6}"))
                .collect();
            format!("{{ {} }}", pairs.join(", "))
        };
        writeln!(text, "\n[engine.fuzzy.fields.{field}]")?;
        writeln!(
            text,
            "comparison = {:?}",
            format!("{kind:?}").to_lowercase()
        )?;
        if let Some(partner) = &configured.swap_with {
            writeln!(text, "swap_with = {partner:?}")?;
        }
        if !configured.implied_by.is_empty() {
            writeln!(text, "implied_by = {:?}", configured.implied_by)?;
        }
        writeln!(text, "m = {}", table(&trained.m[index]))?;
        writeln!(text, "u = {}", table(&trained.u[index]))?;
    }
    std::fs::write(output, text).with_context(|| format!("cannot write {}", output.display()))?;
    println!(
        "trained on {} events: {} random and {} candidate pairs, {} iterations, {:.4} of candidates match; wrote {}",
        events.len(),
        random.len(),
        candidates.len(),
        trained.iterations,
        trained.match_share,
        output.display()
    );
    Ok(())
}

/// An event's traits as a side of a comparison (identifiers are not trained).
fn side(event: &NormalizedEvent) -> EventSide<'_> {
    EventSide {
        traits: &event.traits,
        identifiers: &[],
    }
}

/// The file's events that carry traits, normalized; unreadable lines are skipped.
fn read_events(engine: &Engine, input: &Path) -> Result<Vec<NormalizedEvent>> {
    let file =
        std::fs::File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let source = "web";
    let mut events = Vec::new();
    for (number, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.with_context(|| format!("cannot read {}", input.display()))?;
        let coordinates = InputCoordinates::File {
            file: input.display().to_string().into(),
            line: number as u64 + 1,
        };
        let message = InputMessage {
            coordinates: &coordinates,
            payload: &line,
            default_source: source,
        };
        if let Prepared::Event(prepared) = engine.prepare(&message).content {
            if !prepared.event.traits.is_empty() {
                events.push(prepared.event);
            }
        }
    }
    Ok(events)
}

/// Up to `count` pairs of distinct indices below `n`, spread by a fixed pseudo-random
/// sequence (splitmix64), so the same file always trains to the same numbers.
fn random_pairs(n: usize, count: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let wanted = count.min(n * (n - 1) / 2);
    std::iter::from_fn(move || loop {
        let (a, b) = ((next() % n as u64) as usize, (next() % n as u64) as usize);
        if a != b {
            return Some((a.min(b), a.max(b)));
        }
    })
    .take(wanted)
}

/// Every pair of events sharing a blocking key held by at most `limit` events, each pair
/// once, in a fixed order, at most `max_pairs`.
fn candidate_pairs(
    events: &[NormalizedEvent],
    limit: usize,
    max_pairs: usize,
) -> Vec<(usize, usize)> {
    let mut blocks: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (index, event) in events.iter().enumerate() {
        for key in blocking_keys(&event.traits) {
            blocks.entry(key).or_default().push(index);
        }
    }
    let mut seen = HashSet::new();
    let mut pairs = Vec::new();
    for members in blocks.values().filter(|m| m.len() <= limit) {
        for (i, a) in members.iter().enumerate() {
            for b in &members[i + 1..] {
                if seen.insert((*a, *b)) {
                    pairs.push((*a, *b));
                    if pairs.len() >= max_pairs {
                        return pairs;
                    }
                }
            }
        }
    }
    pairs
}
