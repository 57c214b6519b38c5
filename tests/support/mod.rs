//! The harness the scenario tests share: events in through the engine and an in-memory
//! store, every output kept for assertions.
#![allow(dead_code)] // Each test crate uses its own part of it.

use idgraph_engine::read::profile_by_id;
use idgraph_engine::{Engine, EngineConfig, InputMessage, MemoryStore, StateCache, StateStore};
use idgraph_model::{
    ChangeKind, DeadLetter, EnrichedEvent, IdentityChange, InputCoordinates, Profile,
    ProfileRecord, RefusalRule,
};
use serde_json::{json, Value};

/// Runs events through the engine against an in-memory store, one batch per `run` call, and
/// keeps every output.
pub struct Harness {
    pub engine: Engine,
    pub store: MemoryStore,
    /// Decoded state kept between batches; none unless a test sets one.
    pub cache: StateCache,
    line: u64,
    pub enriched: Vec<EnrichedEvent>,
    pub profiles: Vec<ProfileRecord>,
    pub changes: Vec<IdentityChange>,
    pub dead_letters: Vec<DeadLetter>,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(adjust: impl FnOnce(&mut EngineConfig)) -> Self {
        let mut config = EngineConfig::defaults();
        adjust(&mut config);
        Harness {
            engine: Engine::new(config, "test").unwrap(),
            store: MemoryStore::new(),
            cache: StateCache::new(0),
            line: 0,
            enriched: Vec::new(),
            profiles: Vec::new(),
            changes: Vec::new(),
            dead_letters: Vec::new(),
        }
    }

    pub fn run_raw(&mut self, payloads: &[Vec<u8>]) {
        let coordinates: Vec<InputCoordinates> = payloads
            .iter()
            .map(|_| {
                self.line += 1;
                InputCoordinates::File {
                    file: "golden.jsonl".into(),
                    line: self.line,
                }
            })
            .collect();
        let messages = InputMessage::batch(payloads, &coordinates, "web");
        let outcome = self
            .engine
            .process_batch_cached(&self.store, &mut self.cache, &messages)
            .unwrap();
        self.store.write(&outcome.writes).unwrap();
        // As the drivers do: the memory store then drops records past their windows.
        self.engine.expire_old_records(&mut self.store).unwrap();
        self.enriched.extend(outcome.enriched);
        self.profiles.extend(outcome.profiles);
        self.changes.extend(outcome.changes);
        self.dead_letters.extend(outcome.dead_letters);
    }

    /// Runs one canonical event (see [`event`]) as a batch of its own.
    pub fn run_one(&mut self, id: &str, n: u32, identifiers: Value, traits: Value) {
        self.run(&[event(id, n, identifiers, traits)]);
    }

    pub fn run(&mut self, events: &[Value]) {
        let payloads: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap())
            .collect();
        self.run_raw(&payloads);
    }

    pub fn enriched(&self, event_id: &str) -> &EnrichedEvent {
        self.enriched
            .iter()
            .rev()
            .find(|e| e.event_id == event_id)
            .expect("event was resolved")
    }

    pub fn customer(&self, event_id: &str) -> String {
        self.enriched(event_id).customer_id.clone()
    }

    /// The live profile a customer id resolves to now.
    pub fn profile(&self, customer_id: &str) -> Profile {
        profile_by_id(&self.store, customer_id)
            .unwrap()
            .expect("profile exists")
            .profile
            .as_ref()
            .clone()
    }

    /// The customer an event belongs to now, following any merge since.
    pub fn current_customer(&self, event_id: &str) -> String {
        self.profile(&self.customer(event_id)).customer_id
    }

    /// The rules of every `merge_refused` change, in order.
    pub fn refusal_changes(&self) -> Vec<RefusalRule> {
        self.changes
            .iter()
            .filter_map(|c| match &c.change {
                ChangeKind::MergeRefused { rule, .. } => Some(*rule),
                _ => None,
            })
            .collect()
    }

    pub fn changes_of_type(&self, type_name: &str) -> Vec<&IdentityChange> {
        self.changes
            .iter()
            .filter(|c| c.change.type_name() == type_name)
            .collect()
    }
}

/// An event in the canonical envelope; `n` orders the timestamps.
pub fn event(id: &str, n: u32, identifiers: Value, traits: Value) -> Value {
    json!({
        "event_id": id,
        "source": "web",
        "event_type": "page_view",
        "timestamp": format!("2026-03-01T12:{:02}:{:02}Z", n / 60, n % 60),
        "identifiers": identifiers,
        "traits": traits,
    })
}
