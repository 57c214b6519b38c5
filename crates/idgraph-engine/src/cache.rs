//! Decoded state kept between batches.
//!
//! Reading a profile from the store means a RocksDB lookup and a decode; with a hot
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

/// Records a batch read or wrote, handed back to be cached once the batch is committed. They
/// are the batch's own maps, moved rather than copied into lists.
#[derive(Debug, Clone, Default)]
pub struct CacheDelta {
    pub(crate) nodes: FxHashMap<String, Option<NodeRecord>>,
    pub(crate) customers: FxHashMap<String, Option<Cached>>,
    pub(crate) blocks: FxHashMap<String, Arc<BlockRecord>>,
}

/// One generation of cached records.
#[derive(Debug, Default)]
struct Generation {
    nodes: FxHashMap<String, Option<NodeRecord>>,
    customers: FxHashMap<String, Option<Cached>>,
    blocks: FxHashMap<String, Arc<BlockRecord>>,
}

impl Generation {
    fn len(&self) -> usize {
        self.nodes.len() + self.customers.len() + self.blocks.len()
    }
}

/// Decoded nodes, profiles and blocking records known to equal the stored ones (`None` means
/// known to be absent).
///
/// Two generations bound memory without a per-entry clock: new records go to the current
/// one; when it holds half of `max_entries` it becomes the previous one and the old previous
/// is dropped. A record read from the previous generation moves back into the current one
/// through the batch that used it, so hot records survive every turnover.
#[derive(Debug, Default)]
pub struct StateCache {
    current: Generation,
    previous: Generation,
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
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a node out with its key (the batch owns both until it hands them back through a
    /// delta, so the key is not allocated again).
    pub(crate) fn take_node(&mut self, key: &str) -> Option<(String, Option<NodeRecord>)> {
        self.current
            .nodes
            .remove_entry(key)
            .or_else(|| self.previous.nodes.remove_entry(key))
    }

    pub(crate) fn take_customer(&mut self, id: &str) -> Option<(String, Option<Cached>)> {
        self.current
            .customers
            .remove_entry(id)
            .or_else(|| self.previous.customers.remove_entry(id))
    }

    pub(crate) fn take_block(&mut self, key: &str) -> Option<(String, Arc<BlockRecord>)> {
        self.current
            .blocks
            .remove_entry(key)
            .or_else(|| self.previous.blocks.remove_entry(key))
    }

    /// Takes in what a batch read and wrote. Call it only after that batch's write set has
    /// been committed, or the cache would run ahead of the store.
    pub fn absorb(&mut self, delta: CacheDelta) {
        if self.max_entries == 0 {
            return;
        }
        let incoming = delta.nodes.len() + delta.customers.len() + delta.blocks.len();
        if self.current.len() + incoming > self.max_entries / 2 {
            self.previous = std::mem::take(&mut self.current);
        }
        // A key lives in one generation only, so an older copy can never shadow a newer one
        // (a batch normally took it out already; removing again costs little).
        for (key, node) in delta.nodes {
            self.previous.nodes.remove(&key);
            self.current.nodes.insert(key, node);
        }
        for (id, customer) in delta.customers {
            self.previous.customers.remove(&id);
            self.current.customers.insert(id, customer);
        }
        for (key, block) in delta.blocks {
            self.previous.blocks.remove(&key);
            self.current.blocks.insert(key, block);
        }
    }

    /// Forgets everything, e.g. after a failed commit left the caller unsure of the store.
    pub fn clear(&mut self) {
        self.current = Generation::default();
        self.previous = Generation::default();
    }
}
