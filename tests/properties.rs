//! Engine invariants under generated input: replay changes nothing, the order of independent
//! events does not matter, committing a batch late (as file mode's pipeline does) changes
//! nothing, profiles stored by an older schema version resolve alike, and links are transitive (the clusters are exactly the connected
//! components of shared identifiers when no protection rule fires).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use idgraph_engine::read::profile_by_id;
use idgraph_engine::state::{decode_customer, encode, CustomerEntry};
use idgraph_engine::{
    BatchOutcome, Engine, EngineConfig, InputMessage, MemoryStore, PendingWrites,
    ProfileRecordCache, ReadThrough, ResolvedBatch, StateCache, StateRead, StateStore, Table,
    WriteSet,
};
use idgraph_model::{InputCoordinates, ResolutionAction};
use proptest::prelude::*;
use serde_json::json;

/// A config where only shared identifiers link: no fuzzy matching, no weak kinds, limits
/// far above what the generated events can reach.
fn plain_linking_config() -> EngineConfig {
    let mut config = EngineConfig::defaults();
    config.fuzzy.enabled = false;
    config.identifiers.weak_kinds.clear();
    for limit in config.identifiers.max_per_profile.values_mut() {
        *limit = 1000;
    }
    config.identifiers.default_max_per_profile = 1000;
    config.protection.max_profile_identifiers = 10_000;
    config.protection.generic_threshold = 1000;
    config
}

/// One generated event: its id and indices into a small pool of emails and phones.
#[derive(Debug, Clone)]
struct GenEvent {
    id: usize,
    emails: Vec<u8>,
    phones: Vec<u8>,
}

fn payload(event: &GenEvent) -> Vec<u8> {
    let emails: Vec<String> = event
        .emails
        .iter()
        .map(|e| format!("user{e}@example.com"))
        .collect();
    let phones: Vec<String> = event
        .phones
        .iter()
        .map(|p| format!("+1 415 639 {:04}", 100 + *p as u32))
        .collect();
    serde_json::to_vec(&json!({
        "event_id": format!("e{}", event.id),
        "source": "web",
        "event_type": "page_view",
        "timestamp": format!("2026-03-01T12:00:{:02}Z", event.id % 60),
        "identifiers": {"email": emails, "phone": phones},
    }))
    .unwrap()
}

fn events_strategy(max_events: usize) -> impl Strategy<Value = Vec<GenEvent>> {
    prop::collection::vec(
        (
            prop::collection::vec(0u8..12, 0..3),
            prop::collection::vec(0u8..12, 0..3),
        ),
        1..max_events,
    )
    .prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(id, (emails, phones))| GenEvent { id, emails, phones })
            .collect()
    })
}

/// The input coordinates of batch `batch_index`'s `len` lines, with `batch_size` per batch.
fn batch_coordinates(batch_index: usize, batch_size: usize, len: usize) -> Vec<InputCoordinates> {
    (0..len)
        .map(|i| InputCoordinates::File {
            file: "prop".into(),
            line: (batch_index * batch_size + i + 1) as u64,
        })
        .collect()
}

/// Resolves `chunk`, batch `batch.0` of `batch.1` events each, reading through `pending`.
fn resolve_through(
    engine: &Engine,
    chunk: &[GenEvent],
    batch: (usize, usize),
    pending: &[&PendingWrites],
    store: &MemoryStore,
    cache: &mut StateCache,
) -> ResolvedBatch {
    let payloads: Vec<Vec<u8>> = chunk.iter().map(payload).collect();
    let coordinates = batch_coordinates(batch.0, batch.1, chunk.len());
    let messages = InputMessage::batch(&payloads, &coordinates, "web");
    let prepared = messages.iter().map(|m| engine.prepare(m)).collect();
    let view = ReadThrough { pending, store };
    engine.resolve_prepared(&view, cache, prepared).unwrap()
}

/// Runs `events` in batches of `batch_size` and returns event id → customer id, and the store.
fn resolve(
    engine: &Engine,
    events: &[GenEvent],
    batch_size: usize,
) -> (BTreeMap<usize, String>, MemoryStore) {
    let mut store = MemoryStore::new();
    let mut assigned = BTreeMap::new();
    for (batch_index, chunk) in events.chunks(batch_size).enumerate() {
        let payloads: Vec<Vec<u8>> = chunk.iter().map(payload).collect();
        let coordinates = batch_coordinates(batch_index, batch_size, chunk.len());
        let messages = InputMessage::batch(&payloads, &coordinates, "web");
        let outcome = engine.process_batch(&store, &messages).unwrap();
        store.write(&outcome.writes).unwrap();
        for (event, enriched) in chunk.iter().zip(outcome.enriched) {
            assigned.insert(event.id, enriched.customer_id);
        }
    }
    (assigned, store)
}

/// The final clusters: each event's customer id followed through merges.
fn clusters(assigned: &BTreeMap<usize, String>, store: &MemoryStore) -> BTreeSet<BTreeSet<usize>> {
    let mut by_customer: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for (event, customer) in assigned {
        let live = profile_by_id(store, customer)
            .unwrap()
            .unwrap()
            .profile
            .customer_id
            .clone();
        by_customer.entry(live).or_default().insert(*event);
    }
    by_customer.into_values().collect()
}

/// Connected components of events that share a value, computed independently of the engine.
fn expected_components(events: &[GenEvent]) -> BTreeSet<BTreeSet<usize>> {
    let mut parent: Vec<usize> = (0..events.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            i = parent[i];
        }
        i
    }
    let mut owner: HashMap<(char, u8), usize> = HashMap::new();
    for (index, event) in events.iter().enumerate() {
        let keys = event
            .emails
            .iter()
            .map(|e| ('e', *e))
            .chain(event.phones.iter().map(|p| ('p', *p)));
        for key in keys {
            match owner.get(&key) {
                Some(&other) => {
                    let (a, b) = (root(&mut parent, index), root(&mut parent, other));
                    parent[a] = b;
                }
                None => {
                    owner.insert(key, index);
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for (index, event) in events.iter().enumerate() {
        let r = root(&mut parent, index);
        groups.entry(r).or_default().insert(event.id);
    }
    groups.into_values().collect()
}

/// Every output record of a run, as JSON lines, with the state cache of the given size.
fn outputs_with_cache(engine: &Engine, events: &[GenEvent], cache_bytes: usize) -> Vec<String> {
    outputs_of_run(engine, events, StateCache::new(cache_bytes), false, false)
}

/// Every output record of a run, as JSON lines. With `commit_late`, each batch is committed
/// only after the next one is resolved, which reads through it, and its changed profiles are
/// encoded only then, after the next batch may have changed them again: as file mode's
/// pipeline does. With `as_version_3`, every stored profile is rewritten after each batch in
/// the form schema version 3 stored, as in a state directory written by an older build.
fn outputs_of_run(
    engine: &Engine,
    events: &[GenEvent],
    mut cache: StateCache,
    commit_late: bool,
    as_version_3: bool,
) -> Vec<String> {
    let mut store = MemoryStore::new();
    let mut pending: Option<(PendingWrites, ResolvedBatch)> = None;
    let mut lines = Vec::new();
    for (batch_index, chunk) in events.chunks(4).enumerate() {
        let layers: Vec<&PendingWrites> = pending.iter().map(|(writes, _)| writes).collect();
        let mut resolved =
            resolve_through(engine, chunk, (batch_index, 4), &layers, &store, &mut cache);
        if commit_late {
            let writes = Arc::new(std::mem::take(&mut resolved.outcome.writes));
            let next = PendingWrites::new(writes).with_profiles(resolved.profiles());
            if let Some((previous, previous_batch)) = pending.replace((next, resolved)) {
                commit(&mut store, &previous, previous_batch, &mut lines);
            }
        } else {
            let outcome = resolved.finish();
            store.write(&outcome.writes).unwrap();
            lines.extend(record_lines(&outcome));
        }
        if as_version_3 {
            store_profiles_as_version_3(&mut store);
        }
    }
    if let Some((previous, previous_batch)) = pending.take() {
        commit(&mut store, &previous, previous_batch, &mut lines);
    }
    lines
}

/// Rewrites every live profile in the store in schema version 3's form (MessagePack, with the
/// profile as its JSON).
fn store_profiles_as_version_3(store: &mut MemoryStore) {
    let mut rewrite = WriteSet::default();
    for (key, bytes) in store.scan_prefix(Table::Customers, b"").unwrap() {
        if let CustomerEntry::Live(state) = decode_customer(&key, &bytes).unwrap() {
            rewrite.put(Table::Customers, key, encode(&CustomerEntry::Live(state)));
        }
    }
    store.write(&rewrite).unwrap();
}

/// Encodes a batch's profiles, writes its state in one write and collects its records.
fn commit(
    store: &mut MemoryStore,
    pending: &PendingWrites,
    resolved: ResolvedBatch,
    lines: &mut Vec<String>,
) {
    let (outcome, profile_writes) = resolved.encode_profiles();
    let mut ops = pending.checkpoint_ops();
    ops.extend(&profile_writes.ops);
    store.write_ops(&ops).unwrap();
    lines.extend(record_lines(&outcome));
}

/// What a run in file mode's pipeline emits and keeps: the enriched events, identity changes
/// and dead letters as JSON lines in order, the last profile record per customer, and the
/// final state.
struct CheckpointedRun {
    /// Enriched events, identity changes and dead letters: one list per output file.
    lines: [Vec<String>; 3],
    last_profiles: BTreeMap<String, String>,
    store: MemoryStore,
}

/// File mode's pipeline in miniature: batches of `batch_size` events, state written behind in
/// checkpoints of `interval` batches (the last one still pending while the next batches are
/// resolved through it), profile records collected in a record cache and emitted once per
/// checkpoint.
fn run_with_checkpoints(
    engine: &Engine,
    events: &[GenEvent],
    batch_size: usize,
    interval: usize,
    cache_bytes: usize,
) -> CheckpointedRun {
    let mut store = MemoryStore::new();
    let mut cache = StateCache::new(cache_bytes);
    let mut open = PendingWrites::default();
    let mut committing: Option<PendingWrites> = None;
    let mut records = ProfileRecordCache::default();
    let mut run = CheckpointedRun {
        lines: Default::default(),
        last_profiles: BTreeMap::new(),
        store: MemoryStore::new(),
    };
    let mut emit_profiles = |records: &mut ProfileRecordCache, checkpoint: &PendingWrites| {
        for record in records.take_records(|id| checkpoint.profile(id)).unwrap() {
            let line = serde_json::to_string(&record).unwrap();
            run.last_profiles.insert(record.customer_id, line);
        }
    };
    for (batch_index, chunk) in events.chunks(batch_size).enumerate() {
        let layers: Vec<&PendingWrites> = std::iter::once(&open).chain(&committing).collect();
        let mut resolved = resolve_through(
            engine,
            chunk,
            (batch_index, batch_size),
            &layers,
            &store,
            &mut cache,
        );
        let writes = Arc::new(std::mem::take(&mut resolved.outcome.writes));
        cache.pin_customers(resolved.profile_ids());
        open.push(writes, std::iter::empty());
        let (outcome, updates) = resolved.split();
        let [enriched, changes, dead_letters] = &mut run.lines;
        enriched.extend(
            outcome
                .enriched
                .iter()
                .map(|r| serde_json::to_string(r).unwrap()),
        );
        changes.extend(
            outcome
                .changes
                .iter()
                .map(|r| serde_json::to_string(r).unwrap()),
        );
        dead_letters.extend(
            outcome
                .dead_letters
                .iter()
                .map(|r| serde_json::to_string(r).unwrap()),
        );
        records.absorb(updates);
        if open.batches() >= interval {
            if let Some(previous) = committing.take() {
                commit_checkpoint(&mut store, &previous);
            }
            let done = open.close(&mut cache);
            emit_profiles(&mut records, &done);
            committing = Some(done);
        }
    }
    if let Some(previous) = committing.take() {
        commit_checkpoint(&mut store, &previous);
    }
    let last = open.close(&mut cache);
    emit_profiles(&mut records, &last);
    commit_checkpoint(&mut store, &last);
    run.store = store;
    run
}

fn commit_checkpoint(store: &mut MemoryStore, pending: &PendingWrites) {
    pending.commit(store, &[]).unwrap();
}

fn record_lines(outcome: &BatchOutcome) -> Vec<String> {
    let enriched = outcome.enriched.iter().map(serde_json::to_string);
    let profiles = outcome.profiles.iter().map(serde_json::to_string);
    let changes = outcome.changes.iter().map(serde_json::to_string);
    enriched
        .chain(profiles)
        .chain(changes)
        .map(Result::unwrap)
        .collect()
}

/// A stream where event ids come back (re-sends) over weeks of event time: `(event id,
/// day, email)` per event, days mostly rising.
fn resent_events_strategy() -> impl Strategy<Value = Vec<(u8, u8, u8)>> {
    prop::collection::vec((0u8..160, 0u8..4, 0u8..30), 200..320).prop_map(|raw| {
        let mut day = 0u8;
        raw.into_iter()
            .map(|(id, step, email)| {
                // Every few events the day moves on, so the stream spans weeks.
                day = day.saturating_add(u8::from(step == 0)).min(27);
                (id, day, email)
            })
            .collect()
    })
}

/// The enriched records of `events` run in batches of `batch_size`; with `expire`, the store
/// drops the event records past the window after each batch, as the drivers let it.
fn enriched_with_window(
    engine: &Engine,
    events: &[(u8, u8, u8)],
    batch_size: usize,
    expire: bool,
) -> Vec<String> {
    let payloads: Vec<Vec<u8>> = events
        .iter()
        .map(|(id, day, email)| {
            serde_json::to_vec(&json!({
                "event_id": format!("e{id}"),
                "source": "web",
                "event_type": "page_view",
                "timestamp": format!("2026-03-{:02}T12:00:00Z", day + 1),
                "identifiers": {"email": format!("user{email}@example.com")},
            }))
            .unwrap()
        })
        .collect();
    let mut store = MemoryStore::new();
    let mut lines = Vec::new();
    for (batch_index, chunk) in payloads.chunks(batch_size).enumerate() {
        let coordinates = batch_coordinates(batch_index, batch_size, chunk.len());
        let messages = InputMessage::batch(chunk, &coordinates, "web");
        let outcome = engine.process_batch(&store, &messages).unwrap();
        store.write(&outcome.writes).unwrap();
        if expire {
            engine.expire_old_records(&mut store).unwrap();
        }
        lines.extend(
            outcome
                .enriched
                .iter()
                .map(|e| serde_json::to_string(e).unwrap()),
        );
    }
    lines
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_duplicate_window_answers_alike_whatever_the_batches_and_whatever_expired(
        events in resent_events_strategy(),
        batch_size in 2usize..40,
    ) {
        let engine = Engine::new(
            {
                let mut config = EngineConfig::defaults();
                config.duplicates.window_days = 5;
                config
            },
            "test",
        )
        .unwrap();
        let one_by_one = enriched_with_window(&engine, &events, 1, true);
        prop_assert_eq!(&enriched_with_window(&engine, &events, batch_size, false), &one_by_one);
        prop_assert_eq!(&enriched_with_window(&engine, &events, batch_size, true), &one_by_one);
        // The window did something: some re-sent ids were duplicates and some, sent again
        // after the window, were not.
        let mut seen = BTreeSet::new();
        let (mut inside, mut after) = (0, 0);
        for (line, (id, _, _)) in one_by_one.iter().zip(&events) {
            if !seen.insert(*id) {
                if line.contains("\"duplicate\"") { inside += 1 } else { after += 1 }
            }
        }
        prop_assume!(inside > 0 && after > 0);
    }

    /// docs/formats.md §4: enriched events, identity changes and dead letters do not depend on the
    /// checkpoint interval or the batch size, nor does the last profile record per customer;
    /// with the same batch size, neither does the state.
    #[test]
    fn checkpoint_interval_and_batch_size_change_no_output(
        events in events_strategy(40),
        batch_size in 1usize..9,
        interval in 2usize..6,
        cache_kib in 0usize..8,
    ) {
        let engine = Engine::new(EngineConfig::defaults(), "test").unwrap();
        let every_batch = run_with_checkpoints(&engine, &events, batch_size, 1, 1_000_000);
        let checkpointed = run_with_checkpoints(&engine, &events, batch_size, interval, 1_000_000);
        // A cache too small to hold an interval's profiles must keep them anyway.
        let small_cache = run_with_checkpoints(&engine, &events, batch_size, interval, cache_kib * 1024);
        let one_by_one = run_with_checkpoints(&engine, &events, 1, 1, 1_000_000);
        for other in [&checkpointed, &small_cache, &one_by_one] {
            prop_assert_eq!(&every_batch.lines, &other.lines);
            prop_assert_eq!(&every_batch.last_profiles, &other.last_profiles);
        }
        prop_assert!(every_batch.store == checkpointed.store, "the state depends on the interval");
        prop_assert!(every_batch.store == small_cache.store, "the state depends on the cache");
    }

    #[test]
    fn the_state_cache_never_changes_an_output(events in events_strategy(40), small_kib in 1usize..12) {
        let engine = Engine::new(EngineConfig::defaults(), "test").unwrap();
        let without = outputs_with_cache(&engine, &events, 0);
        prop_assert_eq!(&without, &outputs_with_cache(&engine, &events, 1 << 30));
        // A cache too small for the graph starts over often; results stay the same.
        prop_assert_eq!(&without, &outputs_with_cache(&engine, &events, small_kib * 1024));
        // Decoded profiles dropped after every batch, match features kept for good: nearly
        // every candidate is scored from features, which must never be older than the state.
        let features_only = StateCache::with_budgets(small_kib * 64, 1 << 30);
        prop_assert_eq!(&without, &outputs_of_run(&engine, &events, features_only, false, false));
    }

    #[test]
    fn committing_one_batch_late_never_changes_an_output(events in events_strategy(40), small in 1usize..12) {
        // File mode commits a batch while the next one resolves, reading through the
        // uncommitted writes; with no cache every read goes through them.
        let engine = Engine::new(EngineConfig::defaults(), "test").unwrap();
        let in_step = outputs_of_run(&engine, &events, StateCache::new(0), false, false);
        prop_assert_eq!(&in_step, &outputs_of_run(&engine, &events, StateCache::new(0), true, false));
        prop_assert_eq!(&in_step, &outputs_of_run(&engine, &events, StateCache::new(small), true, false));
    }

    #[test]
    fn profiles_stored_by_schema_version_3_resolve_exactly_as_packed_ones(events in events_strategy(40)) {
        // A state directory upgraded from version 3 keeps its old profile records until they
        // change; with no cache every profile is read back from the store between batches.
        let engine = Engine::new(EngineConfig::defaults(), "test").unwrap();
        let packed = outputs_of_run(&engine, &events, StateCache::new(0), false, false);
        prop_assert_eq!(&packed, &outputs_of_run(&engine, &events, StateCache::new(0), false, true));
    }

    #[test]
    fn links_are_transitive_and_clusters_are_the_connected_components(events in events_strategy(40), batch in 1usize..8) {
        let engine = Engine::new(plain_linking_config(), "test").unwrap();
        let (assigned, store) = resolve(&engine, &events, batch);
        prop_assert_eq!(clusters(&assigned, &store), expected_components(&events));
    }

    #[test]
    fn shuffling_the_events_gives_the_same_clusters(events in events_strategy(30), seed in any::<u64>()) {
        let engine = Engine::new(plain_linking_config(), "test").unwrap();
        let (assigned, store) = resolve(&engine, &events, 5);
        let mut shuffled = events.clone();
        // A deterministic Fisher–Yates from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let (shuffled_assigned, shuffled_store) = resolve(&engine, &shuffled, 5);
        prop_assert_eq!(clusters(&assigned, &store), clusters(&shuffled_assigned, &shuffled_store));
    }

    #[test]
    fn events_about_different_people_commute_byte_for_byte(split in 1usize..10, seed in any::<u64>()) {
        // Two customers with disjoint identifiers; interleave their events in two orders.
        let engine = Engine::new(EngineConfig::defaults(), "test").unwrap();
        let a: Vec<GenEvent> = (0..split).map(|i| GenEvent { id: i, emails: vec![1], phones: vec![(i % 2) as u8] }).collect();
        let b: Vec<GenEvent> = (0..5).map(|i| GenEvent { id: 100 + i, emails: vec![7], phones: vec![9] }).collect();
        let mut first = a.clone();
        first.extend(b.clone());
        let mut second = Vec::new();
        let (mut ia, mut ib) = (0, 0);
        let mut state = seed | 1;
        while ia < a.len() || ib < b.len() {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            if ib >= b.len() || (ia < a.len() && state % 2 == 0) { second.push(a[ia].clone()); ia += 1; } else { second.push(b[ib].clone()); ib += 1; }
        }
        let (assigned_1, store_1) = resolve(&engine, &first, 3);
        let (assigned_2, store_2) = resolve(&engine, &second, 3);
        prop_assert_eq!(&assigned_1, &assigned_2);
        for customer in assigned_1.values() {
            let p1 = serde_json::to_string(&profile_by_id(&store_1, customer).unwrap().unwrap().profile).unwrap();
            let p2 = serde_json::to_string(&profile_by_id(&store_2, customer).unwrap().unwrap().profile).unwrap();
            prop_assert_eq!(p1, p2);
        }
    }

    #[test]
    fn replaying_a_batch_changes_no_state_and_keeps_every_customer(events in events_strategy(30)) {
        let engine = Engine::new(EngineConfig::defaults(), "test").unwrap();
        let (assigned, mut store) = resolve(&engine, &events, 7);
        let before = store.clone();
        let payloads: Vec<Vec<u8>> = events.iter().map(payload).collect();
        let coordinates: Vec<InputCoordinates> = (0..events.len())
            .map(|i| InputCoordinates::File { file: "prop".into(), line: i as u64 + 1 })
            .collect();
        let messages = InputMessage::batch(&payloads, &coordinates, "web");
        let outcome = engine.process_batch(&store, &messages).unwrap();
        prop_assert!(outcome.enriched.iter().all(|e| e.resolution.action == ResolutionAction::Duplicate));
        prop_assert!(outcome.changes.is_empty() && outcome.profiles.is_empty());
        store.write(&outcome.writes).unwrap();
        for table in Table::ALL.into_iter().filter(|t| *t != Table::Positions) {
            prop_assert_eq!(store.table_len(table), before.table_len(table));
        }
        prop_assert_eq!(&store, &before);
        for (event, enriched) in events.iter().zip(&outcome.enriched) {
            let live_before = profile_by_id(&before, &assigned[&event.id]).unwrap().unwrap().profile.customer_id.clone();
            prop_assert_eq!(&enriched.customer_id, &live_before);
        }
    }
}
