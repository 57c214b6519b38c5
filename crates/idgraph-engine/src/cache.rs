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
//! which RocksDB's lock on the directory guarantees.

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::blocking_index::BlockingIndex;
use crate::features::FeatureCache;
use crate::node_index::NodeIndex;
use crate::state::{memory, ProfileState};
use crate::store::{StateRead, StoreError};

/// A customer entry in decoded form.
#[derive(Debug, Clone)]
pub(crate) enum Cached {
    Live(Arc<ProfileState>),
    Redirect(String),
}

/// One generation of cached records (`None` means known to be absent from the store).
#[derive(Debug, Default)]
pub(crate) struct Generation {
    pub(crate) customers: FxHashMap<String, Option<Cached>>,
    /// The estimated memory of the records as they entered this generation. Changes made in
    /// place afterwards are not counted until the record enters a newer generation, which
    /// keeps the count off the hot path; a record grows by little within one generation.
    bytes: usize,
}

fn customer_bytes(id: &str, entry: &Option<Cached>) -> usize {
    memory::hash_slot::<Option<Cached>>()
        + memory::string(id.len())
        + match entry {
            Some(Cached::Live(state)) => state.estimated_bytes(),
            Some(Cached::Redirect(to)) => memory::string(to.len()),
            None => 0,
        }
}

impl Generation {
    fn len(&self) -> usize {
        self.customers.len()
    }

    /// Caches a customer entry; an entry that replaces one already here is not counted again.
    pub(crate) fn insert_customer(&mut self, id: String, entry: Option<Cached>) {
        let bytes = customer_bytes(&id, &entry);
        if self.customers.insert(id, entry).is_none() {
            self.bytes += bytes;
        }
    }
}

/// The part of the budget given to match features: one in this many bytes. Measured on 1M
/// generated events at the default 384 MiB, a quarter held features of about 100k profiles,
/// which served a third of the candidates scored without a store read.
const FEATURE_SHARE: usize = 4;

/// Decoded profiles, the whole node and blocking indexes, equal to the stored ones once the
/// newest batch is committed.
///
/// Two generations bound memory without a per-entry clock: records a batch uses live in the
/// current one; when a batch starts and the current one holds more than half of `max_bytes`
/// (estimated, see [`ProfileState::estimated_bytes`]), it becomes the previous one and the
/// old previous is dropped. A record a batch finds in the previous generation moves into the
/// current one, so hot records survive every turnover, and a key is in one generation only,
/// so an older copy never shadows a newer one.
#[derive(Debug, Default)]
pub struct StateCache {
    /// The generation a batch reads and writes; the batch's own overlay.
    pub(crate) current: Generation,
    previous: Generation,
    max_bytes: usize,
    /// Customers whose newest state is only here, not yet in a checkpoint: kept through
    /// every turnover (see [`StateCache::pin_customers`]).
    pinned: FxHashSet<String>,
    /// What candidate search compares of profiles, for many more profiles than the
    /// decoded records above (see [`crate::features`]).
    pub(crate) features: FeatureCache,
    /// Every blocking key and what it lists, loaded from the store by the first batch that
    /// needs it ([`crate::blocking_index`]). It is never dropped in part, and its memory
    /// comes out of the decoded records' budget.
    pub(crate) blocking: Option<BlockingIndex>,
    /// Every identifier node, loaded like the blocking index ([`crate::node_index`]).
    pub(crate) nodes: Option<NodeIndex>,
}

impl StateCache {
    /// A cache that keeps records of about `max_bytes` of memory between batches (it may
    /// exceed that by one batch's records); 0 keeps nothing between batches. A quarter of it
    /// holds match features ([`crate::features`]), the rest the node and blocking indexes and
    /// decoded records.
    pub fn new(max_bytes: usize) -> Self {
        let features = max_bytes / FEATURE_SHARE;
        StateCache::with_budgets(max_bytes - features, features)
    }

    /// A cache with its two budgets set apart: `decoded_bytes` for the indexes and decoded
    /// records, `feature_bytes` for match features. Tests use it to make candidates come
    /// from features nearly always (a tiny decoded cache, a large feature cache).
    pub fn with_budgets(decoded_bytes: usize, feature_bytes: usize) -> Self {
        StateCache {
            max_bytes: decoded_bytes,
            features: FeatureCache::new(feature_bytes),
            ..StateCache::default()
        }
    }

    /// A cache of `megabytes` MiB, as `engine.cache.max_mb` gives it.
    pub fn with_megabytes(megabytes: usize) -> Self {
        StateCache::new(megabytes.saturating_mul(1024 * 1024))
    }

    /// Records held, in both generations, and match features (the keys of the node and
    /// blocking indexes are not counted).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len() + self.features.len()
    }

    /// The estimated memory of the records held, in both generations, of the match features
    /// and of the blocking index.
    pub fn estimated_bytes(&self) -> usize {
        self.current.bytes
            + self.previous.bytes
            + self.features.estimated_bytes()
            + self.index_bytes()
    }

    /// The estimated memory of the node and blocking indexes (part of
    /// [`StateCache::estimated_bytes`]): they hold every identifier and blocking key, so
    /// they grow with the graph, and what is left of the budget holds decoded profiles.
    pub fn index_bytes(&self) -> usize {
        self.blocking
            .as_ref()
            .map_or(0, BlockingIndex::estimated_bytes)
            + self.nodes.as_ref().map_or(0, NodeIndex::estimated_bytes)
    }

    /// What is left of the decoded records' budget beside the indexes.
    fn decoded_budget(&self) -> usize {
        self.max_bytes.saturating_sub(self.index_bytes())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Loads the node and blocking indexes from `store` now, the two side by side (one on a
    /// scoped thread of its own), instead of in the first batch one after the other: on a
    /// restart that is most of the time to the first output (about 1.6 s one after the other
    /// for the 644k nodes and 684k blocking keys of 1M generated events). Indexes already
    /// loaded stay as they are.
    pub fn preload<S: StateRead + Sync + ?Sized>(&mut self, store: &S) -> Result<(), StoreError> {
        let (nodes, blocking) = std::thread::scope(|scope| {
            let nodes = self
                .nodes
                .is_none()
                .then(|| scope.spawn(|| NodeIndex::load(store)));
            let blocking = match self.blocking {
                None => Some(BlockingIndex::load(store)),
                Some(_) => None,
            };
            let nodes =
                nodes.map(|loading| loading.join().expect("loading the node index panicked"));
            (nodes, blocking)
        });
        if let Some(nodes) = nodes {
            self.nodes = Some(nodes?);
        }
        if let Some(blocking) = blocking {
            self.blocking = Some(blocking?);
        }
        Ok(())
    }

    /// Forgets everything. Required after a batch that failed or was not committed: the cache
    /// may hold its changes.
    pub fn clear(&mut self) {
        self.current = Generation::default();
        self.previous = Generation::default();
        self.pinned.clear();
        self.features.clear();
        self.blocking = None;
        self.nodes = None;
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
        if self.max_bytes == 0 {
            let mut kept = std::mem::take(&mut self.current);
            self.previous = Generation::default();
            self.keep_pinned_entries(&mut kept);
        } else if self.current.bytes > self.decoded_budget() / 2 {
            let mut dropped =
                std::mem::replace(&mut self.previous, std::mem::take(&mut self.current));
            self.keep_pinned_entries(&mut dropped);
        }
    }

    /// Moves the pinned customers' entries out of `generation`, which is being dropped, into
    /// the current one.
    fn keep_pinned_entries(&mut self, generation: &mut Generation) {
        for id in &self.pinned {
            if let Some((id, entry)) = generation.customers.remove_entry(id) {
                self.current.insert_customer(id, entry);
            }
        }
    }

    /// The customer entry `id` if it is cached, without moving it into the current
    /// generation: what candidate search uses to compare a profile does not make it hot (and
    /// moving an entry re-estimates its size, a visible share of scoring a candidate).
    pub(crate) fn peek_customer(&self, id: &str) -> Option<&Option<Cached>> {
        self.current
            .customers
            .get(id)
            .or_else(|| self.previous.customers.get(id))
    }

    /// Whether the customer entry `id` is cached; if it is, it is in the current generation.
    pub(crate) fn has_customer(&mut self, id: &str) -> bool {
        let (current, previous) = (&mut self.current, &mut self.previous);
        promote(
            &mut current.customers,
            &mut previous.customers,
            &mut current.bytes,
            id,
            customer_bytes,
        )
    }
}

/// Moves `key`'s entry from `previous` into `current` if it is there, with its key (so the key
/// is not allocated again), and counts its `size` in `current_bytes`; true if `current` now
/// holds it.
fn promote<V>(
    current: &mut FxHashMap<String, V>,
    previous: &mut FxHashMap<String, V>,
    current_bytes: &mut usize,
    key: &str,
    size: fn(&str, &V) -> usize,
) -> bool {
    if current.contains_key(key) {
        return true;
    }
    match previous.remove_entry(key) {
        Some((key, value)) => {
            *current_bytes += size(&key, &value);
            current.insert(key, value);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One batch's use of the cache: a hot (absent) customer used by every batch and one of
    /// its own.
    fn run_batch(cache: &mut StateCache, batch: usize) {
        cache.begin_batch();
        if !cache.has_customer("hot") {
            cache.current.insert_customer("hot".into(), None);
        }
        cache.current.insert_customer(format!("cold-{batch}"), None);
    }

    fn entry_bytes() -> usize {
        customer_bytes("cold-10", &None)
    }

    #[test]
    fn hot_records_survive_turnover_while_the_size_stays_bounded() {
        let entry = entry_bytes();
        let mut cache = StateCache::with_budgets(6 * entry, 0);
        for batch in 0..20 {
            run_batch(&mut cache, batch);
            // At most the budget plus one batch's records.
            assert!(
                cache.estimated_bytes() <= 8 * entry && cache.len() <= 8,
                "{} records of {} bytes cached",
                cache.len(),
                cache.estimated_bytes()
            );
            assert_eq!(
                cache.current.customers.contains_key("hot") as usize
                    + cache.previous.customers.contains_key("hot") as usize,
                1,
                "a key lives in one generation only"
            );
        }
        cache.begin_batch();
        assert!(cache.has_customer("hot"));
        assert!(cache.has_customer("cold-19"));
        assert!(!cache.has_customer("cold-0"), "cold records are dropped");
    }

    #[test]
    fn a_cache_of_size_zero_keeps_nothing_between_batches() {
        let mut cache = StateCache::new(0);
        run_batch(&mut cache, 0);
        assert!(
            cache.has_customer("hot"),
            "the batch itself works in the cache"
        );
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
        for size in [0, 4 * entry_bytes()] {
            let mut cache = StateCache::with_budgets(size, 0);
            cache.begin_batch();
            cache.current.insert_customer("kept".into(), live("kept"));
            cache.current.insert_customer("cold".into(), live("cold"));
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

    #[test]
    fn preloading_loads_both_indexes_from_the_store_once() {
        use crate::state::{encode, BlockRecord, NodeRecord, RootInfo};
        use crate::store::{MemoryStore, StateStore, Table, WriteSet};
        let customer = crate::customer_id_for("web", "web-1");
        let mut writes = WriteSet::default();
        let root = NodeRecord {
            parent: None,
            root: Some(RootInfo {
                customer_id: customer.clone(),
                size: 1,
            }),
            generic: false,
            conflicts: Vec::new(),
        };
        writes.put(Table::Nodes, "email\0a@x.example", encode(&root));
        let block = BlockRecord {
            customers: vec![customer.clone()],
            oversize: false,
        };
        writes.put(Table::Blocks, "nn:ann lee", encode(&block));
        let mut store = MemoryStore::new();
        store.write(&writes).unwrap();
        let mut cache = StateCache::new(1 << 20);
        cache.preload(&store).unwrap();
        let nodes = cache.nodes.as_ref().expect("the node index is loaded");
        let id = nodes.id_of("email\0a@x.example").unwrap();
        assert_eq!(nodes.record(id), Some(root));
        let blocking = cache
            .blocking
            .as_ref()
            .expect("the blocking index is loaded");
        assert_eq!(blocking.record("nn:ann lee"), block);
        assert!(cache.index_bytes() > 0);
        // A second preload keeps what is loaded, even if the store has changed since.
        store
            .write(&{
                let mut more = WriteSet::default();
                more.put(Table::Blocks, "nn:bob lee", encode(&block));
                more
            })
            .unwrap();
        cache.preload(&store).unwrap();
        let blocking = cache.blocking.as_ref().unwrap();
        assert_eq!(blocking.record("nn:bob lee"), BlockRecord::default());
    }
}
