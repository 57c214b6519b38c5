//! The identity-resolution engine of idgraph: a union-find identity graph (path compression,
//! union by size) over normalized identifiers, deterministic links on shared identifiers,
//! fuzzy links by blocking and Fellegi–Sunter style scoring, over-merge protection, stable
//! customer ids, link evidence and profile building (README, Concepts and Matching).
//!
//! The engine does no I/O, reads no clock and draws no random numbers. It reads state through
//! the small [`StateRead`] trait and returns a batch's state changes as one [`WriteSet`]
//! together with the output records; the caller decides when to write (through
//! [`StateStore`]) and emit, and may resolve the next batch before the last one is written by
//! reading through it ([`ReadThrough`]). Parsing and normalizing ([`Engine::prepare`]) need no
//! state, so a caller may run them on another thread. It spawns no threads itself, except
//! [`StateCache::preload`], which loads its two indexes side by side. This crate
//! also holds the in-memory store and the store conformance suite; the RocksDB store lives in
//! `idgraph-store-rocksdb`.

mod batch;
mod blocking_index;
pub mod cache;
pub mod config;
pub mod conformance;
pub mod duplicates;
mod engine;
mod features;
pub mod matching;
mod node_index;
pub mod pending;
pub mod profile;
pub mod read;
pub mod record_cache;
pub mod state;
pub mod stats;
pub mod store;

pub use cache::StateCache;
pub use config::{EngineConfig, DEFAULT_CONFIG_TOML};
pub use engine::{
    customer_id_for, BatchOutcome, Engine, EngineError, InputMessage, Prepared, PreparedMessage,
    ResolvedBatch,
};
pub use idgraph_model::Normalizer;
pub use pending::{PendingWrites, ReadThrough};
pub use record_cache::{MissingProfile, ProfileRecordCache, ProfileUpdates};
pub use stats::{BatchStats, QualityReport};
pub use store::{
    ErrorClass, MemoryStore, StateRead, StateStore, StoreError, StoreFigures, Table, WriteOp,
    WriteSet,
};
