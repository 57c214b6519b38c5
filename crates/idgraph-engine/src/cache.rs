//! Decoded state kept between batches.
//!
//! Reading a profile from the store means a RocksDB lookup and a decode; with a hot
//! customer touched in every batch that is most of the cost of an event. The cache keeps the
//! decoded records that batches read or wrote, so the next batch finds them ready.
//!
//! A batch works on the cache in place: what it reads is loaded into the cache and what it
//! changes is changed there, so a record is never copied or moved between the batch and the
//! cache. The cache therefore holds the newest batch's changes before they are committed.
//! That never changes a result as long as every batch is either committed or followed by
//! [`StateCache::clear`]: a caller whose batch fails (in the engine or in the commit) must clear
//! the cache before it resolves anything else. It assumes one writer per state directory,
//! which SPEC §7 guarantees.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::state::{BlockRecord, NodeRecord, ProfileState};

/// A customer entry in decoded form.
#[derive(Debug, Clone)]
pub(crate) enum Cached {
    Live(Arc<ProfileState>),
    Redirect(String),
}

/// One generation of cached records (`None` means known to be absent from the store).
#[derive(Debug, Default)]
pub(crate) struct Generation {
    pub(crate) nodes: FxHashMap<String, Option<NodeRecord>>,
    pub(crate) customers: FxHashMap<String, Option<Cached>>,
    pub(crate) blocks: FxHashMap<String, Arc<BlockRecord>>,
}

impl Generation {
    fn len(&self) -> usize {
        self.nodes.len() + self.customers.len() + self.blocks.len()
    }
}

/// Decoded nodes, profiles and blocking records, equal to the stored ones once the newest
/// batch is committed.
///
/// Two generations bound memory without a per-entry clock: records a batch uses live in the
/// current one; when a batch starts and the current one holds more than half of
/// `max_entries`, it becomes the previous one and the old previous is dropped. A record a
/// batch finds in the previous generation moves into the current one, so hot records survive
/// every turnover, and a key is in one generation only, so an older copy never shadows a
/// newer one.
#[derive(Debug, Default)]
pub struct StateCache {
    /// The generation a batch reads and writes; the batch's own overlay.
    pub(crate) current: Generation,
    previous: Generation,
    max_entries: usize,
}

impl StateCache {
    /// A cache that keeps at most about `max_entries` records between batches (it may exceed
    /// that by one batch's records); 0 keeps nothing between batches.
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

    /// Forgets everything. Required after a batch that failed or was not committed: the cache
    /// may hold its changes.
    pub fn clear(&mut self) {
        self.current = Generation::default();
        self.previous = Generation::default();
    }

    /// Called as a batch starts: turns the generations over if the current one is full, and
    /// with a cache of size 0 drops what the last batch left.
    pub(crate) fn begin_batch(&mut self) {
        if self.max_entries == 0 {
            self.clear();
        } else if self.current.len() > self.max_entries / 2 {
            self.previous = std::mem::take(&mut self.current);
        }
    }

    /// Whether the node under `key` is cached; if it is, it is in the current generation.
    pub(crate) fn has_node(&mut self, key: &str) -> bool {
        promote(&mut self.current.nodes, &mut self.previous.nodes, key)
    }

    /// Whether the customer entry `id` is cached; if it is, it is in the current generation.
    pub(crate) fn has_customer(&mut self, id: &str) -> bool {
        promote(
            &mut self.current.customers,
            &mut self.previous.customers,
            id,
        )
    }

    /// Whether the blocking record `key` is cached; if it is, it is in the current generation.
    pub(crate) fn has_block(&mut self, key: &str) -> bool {
        promote(&mut self.current.blocks, &mut self.previous.blocks, key)
    }
}

/// Moves `key`'s entry from `previous` into `current` if it is there, with its key (so the key
/// is not allocated again); true if `current` now holds it.
fn promote<V>(
    current: &mut FxHashMap<String, V>,
    previous: &mut FxHashMap<String, V>,
    key: &str,
) -> bool {
    if current.contains_key(key) {
        return true;
    }
    match previous.remove_entry(key) {
        Some((key, value)) => {
            current.insert(key, value);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One batch's use of the cache: a hot node used by every batch and a node of its own.
    fn run_batch(cache: &mut StateCache, batch: usize) {
        cache.begin_batch();
        if !cache.has_node("hot") {
            cache.current.nodes.insert("hot".into(), None);
        }
        cache.current.nodes.insert(format!("cold-{batch}"), None);
    }

    #[test]
    fn hot_records_survive_turnover_while_the_size_stays_bounded() {
        let mut cache = StateCache::new(6);
        for batch in 0..20 {
            run_batch(&mut cache, batch);
            // At most a full generation of each kind plus one batch's records.
            assert!(cache.len() <= 6 + 2, "{} records cached", cache.len());
            assert_eq!(
                cache.current.nodes.contains_key("hot") as usize
                    + cache.previous.nodes.contains_key("hot") as usize,
                1,
                "a key lives in one generation only"
            );
        }
        cache.begin_batch();
        assert!(cache.has_node("hot"));
        assert!(cache.has_node("cold-19"));
        assert!(!cache.has_node("cold-0"), "cold records are dropped");
    }

    #[test]
    fn a_cache_of_size_zero_keeps_nothing_between_batches() {
        let mut cache = StateCache::new(0);
        run_batch(&mut cache, 0);
        assert!(cache.has_node("hot"), "the batch itself works in the cache");
        cache.begin_batch();
        assert!(cache.is_empty());
    }
}
