//! Criterion benchmarks of the hot paths: parsing and normalization, fuzzy scoring, and whole
//! engine batches against the in-memory store. Run with `cargo bench -p idgraph`. The
//! end-to-end figure with RocksDB on disk comes from `idgraph bench`.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use idgraph_engine::matching::{blocking_keys, EventSide, MatchModel, ProfileSide};
use idgraph_engine::{Engine, EngineConfig, InputMessage, MemoryStore, StateStore};
use idgraph_model::{parse_event, CompactString, InputCoordinates, SortedMap};
use idgraph_synth::{generate, GenConfig};

fn generated_lines(events: usize) -> Vec<Vec<u8>> {
    let (mut out, mut truth) = (Vec::new(), Vec::new());
    generate(
        &GenConfig {
            events,
            ..GenConfig::default()
        },
        &mut out,
        &mut truth,
    )
    .unwrap();
    out.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn normalization(c: &mut Criterion) {
    let engine = Engine::new(EngineConfig::defaults(), "bench").unwrap();
    let lines = generated_lines(2_000);
    let mut group = c.benchmark_group("normalize");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("parse_and_normalize_2000_lines", |b| {
        b.iter(|| {
            for line in &lines {
                if let Ok(raw) = parse_event(line, "web") {
                    black_box(engine.normalizer().normalize(raw));
                }
            }
        })
    });
    group.finish();
}

fn scoring(c: &mut Criterion) {
    let config = EngineConfig::defaults();
    let model = MatchModel::new(&config.fuzzy, &config.protection);
    let event: SortedMap<CompactString, CompactString> = [
        ("first_name", "bob"),
        ("last_name", "smyth"),
        ("date_of_birth", "1975-06-01"),
        ("street", "12 high st"),
        ("city", "springfield"),
        ("postcode", "62701"),
    ]
    .into_iter()
    .map(|(k, v)| (CompactString::from(k), CompactString::from(v)))
    .collect();
    let known: SortedMap<CompactString, Vec<CompactString>> = [
        ("first_name", vec!["robert", "rob"]),
        ("last_name", vec!["smith"]),
        ("date_of_birth", vec!["1975-06-01"]),
        ("street", vec!["12 high st", "4 low rd"]),
        ("city", vec!["springfield"]),
        ("postcode", vec!["62701", "62704"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into_iter().map(CompactString::from).collect()))
    .collect();
    let event_side = EventSide {
        traits: &event,
        identifiers: &[],
    };
    let profile_side = ProfileSide {
        history: &known,
        identifiers: &[],
    };
    c.bench_function("score_candidate", |b| {
        b.iter(|| black_box(model.score(&event_side, &profile_side)))
    });
    // What the engine does per candidate: the event is looked up once per search, the
    // candidate once per score.
    let prepared_event = model.prepare(&event_side);
    c.bench_function("score_candidate_of_a_prepared_event", |b| {
        b.iter(|| black_box(model.score_prepared(&prepared_event, &model.prepare(&profile_side))))
    });
    // A stranger's candidate as candidate search now meets most of them: only the total,
    // which falls short of the threshold, so no per-field account is built.
    c.bench_function("screen_candidate_of_a_prepared_event", |b| {
        b.iter(|| black_box(model.screen_prepared(&prepared_event, &model.prepare(&profile_side))))
    });
    c.bench_function("blocking_keys", |b| {
        b.iter(|| black_box(blocking_keys(&event)))
    });
}

fn engine_batches(c: &mut Criterion) {
    let engine = Engine::new(EngineConfig::defaults(), "bench").unwrap();
    let lines = generated_lines(20_000);
    let coordinates: Vec<InputCoordinates> = (0..lines.len())
        .map(|i| InputCoordinates::File {
            file: "bench".into(),
            line: i as u64 + 1,
        })
        .collect();
    let messages = InputMessage::batch(&lines, &coordinates, "web");
    // Warm a store with the first 18,000 events, then measure a 2,000-event batch against it.
    let (warm, measured) = messages.split_at(18_000);
    let mut store = MemoryStore::new();
    for chunk in warm.chunks(2_000) {
        let outcome = engine.process_batch(&store, chunk).unwrap();
        store.write(&outcome.writes).unwrap();
    }
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(measured.len() as u64));
    group.sample_size(20);
    group.bench_function("batch_of_2000_on_warm_memory_store", |b| {
        b.iter_batched(
            || (),
            |_| black_box(engine.process_batch(&store, measured).unwrap()),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, normalization, scoring, engine_batches);
criterion_main!(benches);
