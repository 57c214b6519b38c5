//! Decoded state kept between batches.
//!
//! Reading a profile from the store means a RocksDB lookup and a JSON decode; with a hot
//! customer touched in every batch that is most of the cost of an event. The cache keeps the
//! decoded records that committed batches read or wrote, so the next batch finds them ready.
//! It never changes a result: it only ever holds what the store holds, because the caller
//! feeds it a batch's records only after that batch's write set is durable. It assumes one
//! writer per state directory, which SPEC §7 guarantees.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::state::{BlockRecord, NodeRecord, ProfileState};

/// A customer entry in decoded form.
#[derive(Debug, Clone)]
pub(crate) enum Cached {
    Live(Arc<ProfileState>),
    Redirect(String),
}

/// Records a batch read or wrote, handed back to be cached once the batch is committed.
#[derive(Debug, Clone, Default)]
pub struct CacheDelta {
    pub(crate) nodes: Vec<(String, Option<NodeRecord>)>,
    pub(crate) customers: Vec<(String, Option<Cached>)>,
    pub(crate) blocks: Vec<(String, Arc<BlockRecord>)>,
}

/// Decoded nodes, profiles and blocking records known to equal the stored ones (`None` means
/// known to be absent).
#[derive(Debug, Default)]
pub struct StateCache {
    pub(crate) nodes: FxHashMap<String, Option<NodeRecord>>,
    pub(crate) customers: FxHashMap<String, Option<Cached>>,
    pub(crate) blocks: FxHashMap<String, Arc<BlockRecord>>,
    max_entries: usize,
}

impl StateCache {
    /// A cache that holds at most `max_entries` records; 0 disables it.
    pub fn new(max_entries: usize) -> Self {
        StateCache {
            max_entries,
            ..StateCache::default()
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len() + self.customers.len() + self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes in what a batch read and wrote. Call it only after that batch's write set has
    /// been committed, or the cache would run ahead of the store.
    pub fn absorb(&mut self, delta: CacheDelta) {
        if self.max_entries == 0 {
            return;
        }
        let incoming = delta.nodes.len() + delta.customers.len() + delta.blocks.len();
        if self.len() + incoming > self.max_entries {
            // Starting over is crude but cheap and keeps memory bounded; hot records come
            // back within a batch.
            self.nodes.clear();
            self.customers.clear();
            self.blocks.clear();
        }
        self.nodes.extend(delta.nodes);
        self.customers.extend(delta.customers);
        self.blocks.extend(delta.blocks);
    }

    /// Forgets everything, e.g. after a failed commit left the caller unsure of the store.
    pub fn clear(&mut self) {
        self.nodes.clear();
        self.customers.clear();
        self.blocks.clear();
    }
}
