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

use rustc_hash::{FxHashMap, FxHashSet};

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
    /// Customers whose newest state is only here, not yet in a checkpoint: kept through
    /// every turnover (see [`StateCache::pin_customers`]).
    pinned: FxHashSet<String>,
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
        self.pinned.clear();
    }

    /// Keeps the entries of these customers, whatever the cache's size, until
    /// [`StateCache::take_pinned_profiles`]. A caller that writes state behind, in checkpoints
    /// of several batches, pins the profiles each batch changed instead of holding them
    /// itself: a second holder of a profile's `Arc` would make the next batch that changes it
    /// copy it first, once per batch instead of once per checkpoint.
    pub fn pin_customers<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
        for id in ids {
            if !self.pinned.contains(id) {
                self.pinned.insert(id.to_owned());
            }
        }
    }

    /// The pinned customers that are live profiles, sorted by id (shared, not copied), and
    /// unpins every one: the caller now holds their state for its checkpoint.
    pub fn take_pinned_profiles(&mut self) -> Vec<(String, Arc<ProfileState>)> {
        let mut profiles: Vec<(String, Arc<ProfileState>)> = std::mem::take(&mut self.pinned)
            .into_iter()
            .filter_map(|id| {
                let entry = self
                    .current
                    .customers
                    .get(&id)
                    .or_else(|| self.previous.customers.get(&id));
                match entry {
                    Some(Some(Cached::Live(state))) => {
                        let state = Arc::clone(state);
                        Some((id, state))
                    }
                    _ => None,
                }
            })
            .collect();
        profiles.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        profiles
    }

    /// Called as a batch starts: turns the generations over if the current one is full, and
    /// with a cache of size 0 drops what the last batch left. Pinned customers stay.
    pub(crate) fn begin_batch(&mut self) {
        if self.max_entries == 0 {
            let mut kept = std::mem::take(&mut self.current);
            self.previous = Generation::default();
            self.current.customers = self.take_pinned_entries(&mut kept);
        } else if self.current.len() > self.max_entries / 2 {
            let mut dropped =
                std::mem::replace(&mut self.previous, std::mem::take(&mut self.current));
            let pinned = self.take_pinned_entries(&mut dropped);
            self.current.customers.extend(pinned);
        }
    }

    /// The pinned customers' entries out of `generation`.
    fn take_pinned_entries(
        &self,
        generation: &mut Generation,
    ) -> FxHashMap<String, Option<Cached>> {
        self.pinned
            .iter()
            .filter_map(|id| generation.customers.remove_entry(id))
            .collect()
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

    fn live(id: &str) -> Option<Cached> {
        Some(Cached::Live(Arc::new(crate::profile::new_profile(
            id.to_owned(),
            "2026-01-01T00:00:00Z",
        ))))
    }

    #[test]
    fn pinned_customers_survive_turnover_until_taken() {
        for size in [0, 4] {
            let mut cache = StateCache::new(size);
            cache.begin_batch();
            cache.current.customers.insert("kept".into(), live("kept"));
            cache.current.customers.insert("cold".into(), live("cold"));
            cache.pin_customers(["kept", "absent"]);
            for batch in 0..10 {
                run_batch(&mut cache, batch);
            }
            cache.begin_batch();
            assert!(
                cache.has_customer("kept"),
                "cache of {size}: a pinned profile stays"
            );
            assert!(!cache.has_customer("cold"), "cache of {size}: others go");
            let taken = cache.take_pinned_profiles();
            assert_eq!(taken.len(), 1);
            assert_eq!(taken[0].0, "kept");
            for batch in 10..20 {
                run_batch(&mut cache, batch);
            }
            cache.begin_batch();
            assert!(
                !cache.has_customer("kept"),
                "cache of {size}: taken means unpinned"
            );
        }
    }
}
