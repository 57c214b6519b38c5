//! The state overlay of one engine batch.
//!
//! Reads go to the overlay first and to the store after, so later events of a batch see what
//! earlier ones changed; nothing reaches the store until the caller writes the batch's
//! [`WriteSet`]. Dirty keys are sorted when the write set is built, so it is deterministic.

use std::collections::BTreeMap;
use std::sync::Arc;

use idgraph_model::{CompactString, InputCoordinates};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::blocking_index::{not_a_customer_id, Block, BlockingIndex, CustomerKey, Listed};
use crate::cache::{Cached, StateCache};
use crate::duplicates::{timed, EventClock, EventRecord, EVENT_CLOCK_KEY};
use crate::features::{FeatureEntry, MatchFeatures};
use crate::matching::Side;
use crate::node_index::{IdentifierId, NodeIndex};
use crate::state::{
    decode_customer, encode, evidence_key, CustomerEntry, NodeRecord, ProfileState, RootInfo,
    StampedEvidence,
};
use crate::store::{StateRead, StoreError, Table, WriteSet, PROFILES_CREATED_KEY};

/// Keys a batch changed. Membership is checked on nearly every step of an event (the same
/// profile is marked again and again), so it is a hash set; the write set takes its keys
/// sorted, so its order stays deterministic.
#[derive(Debug, Default)]
struct DirtyKeys(FxHashSet<String>);

impl DirtyKeys {
    fn with_capacity(capacity: usize) -> Self {
        DirtyKeys(FxHashSet::with_capacity_and_hasher(
            capacity,
            Default::default(),
        ))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds `key`, allocating only the first time; true if it was not there yet.
    fn mark(&mut self, key: &str) -> bool {
        if self.0.contains(key) {
            return false;
        }
        self.0.insert(key.to_owned());
        true
    }

    fn insert(&mut self, key: String) {
        self.0.insert(key);
    }

    fn sorted(&self) -> Vec<&String> {
        let mut keys: Vec<&String> = self.0.iter().collect();
        keys.sort_unstable();
        keys
    }
}

/// The longest redirect chain followed before the state is declared corrupt; merges rewrite
/// every absorbed id to the survivor, so real chains have length one.
const MAX_REDIRECT_HOPS: usize = 64;

impl Cached {
    fn from_entry(entry: CustomerEntry) -> Self {
        match entry {
            CustomerEntry::Live(state) => Cached::Live(Arc::new(*state)),
            CustomerEntry::Redirect { to } => Cached::Redirect(to),
        }
    }
}

/// A candidate profile as scoring sees it (see [`Batch::candidate`]).
pub(crate) enum CandidateView {
    Decoded(Arc<ProfileState>),
    Features(Arc<MatchFeatures>),
}

impl CandidateView {
    /// When the profile was created: equal scores are ordered by it.
    pub(crate) fn created_at(&self) -> &CompactString {
        match self {
            CandidateView::Decoded(state) => &state.profile.created_at,
            CandidateView::Features(features) => &features.created_at,
        }
    }
}

impl Side for CandidateView {
    fn trait_values(&self, field: &str) -> &[CompactString] {
        match self {
            CandidateView::Decoded(state) => state.trait_values(field),
            CandidateView::Features(features) => features.trait_values(field),
        }
    }

    fn push_identifier_values<'s>(&'s self, kind: &str, out: &mut Vec<&'s str>) {
        match self {
            CandidateView::Decoded(state) => state.push_identifier_values(kind, out),
            CandidateView::Features(features) => features.push_identifier_values(kind, out),
        }
    }
}

pub(crate) struct Batch<'s, S: StateRead> {
    store: &'s S,
    /// Customer entries are read into and changed in the cache's current generation in place,
    /// nodes and blocking keys in its indexes (see [`StateCache`]); the dirty sets say which
    /// of them the batch changed. Profiles are shared with callers through `Arc`, so reading
    /// one costs no copy; a write copies only when someone still holds the old version.
    cache: &'s mut StateCache,
    dirty_nodes: FxHashSet<IdentifierId>,
    dirty_customers: DirtyKeys,
    dirty_blocks: DirtyKeys,
    /// The batch's processed events: event time (ms) and customer.
    events: FxHashMap<String, (i64, String)>,
    /// What the store held for the batch's event keys when it started (see
    /// [`Batch::prefetch`]); `None` for an event not seen before.
    stored_events: FxHashMap<String, Option<EventRecord>>,
    /// "Now" in event time, for the duplicate window (read by [`Batch::prefetch`]).
    clock: EventClock,
    /// Evidence by key, with the event time it expires by.
    evidence: Vec<(Vec<u8>, StampedEvidence)>,
    positions: BTreeMap<String, u64>,
    /// The stream of the latest messages and the highest next position among them, not yet
    /// in `positions`: consecutive messages nearly always share a stream, and its key is only
    /// built when the stream changes.
    current_stream: Option<(InputCoordinates, u64)>,
    /// Profiles created before this batch (read by [`Batch::prefetch`]) and in it.
    profiles_created_before: u64,
    profiles_created: u64,
}

impl<'s, S: StateRead> Batch<'s, S> {
    /// An empty overlay for a batch of about `messages` messages. Its sets and maps are sized
    /// for a typical event (a few identifiers, one or two profiles and blocking keys) up front:
    /// growing them step by step rehashed every key several times per batch.
    pub(crate) fn new(store: &'s S, cache: &'s mut StateCache, messages: usize) -> Self {
        cache.begin_batch();
        Batch {
            store,
            cache,
            dirty_nodes: FxHashSet::with_capacity_and_hasher(messages, Default::default()),
            dirty_customers: DirtyKeys::with_capacity(messages),
            dirty_blocks: DirtyKeys::with_capacity(messages),
            events: sized_map(messages),
            stored_events: sized_map(messages),
            clock: EventClock::default(),
            evidence: Vec::with_capacity(messages),
            positions: BTreeMap::new(),
            current_stream: None,
            profiles_created_before: 0,
            profiles_created: 0,
        }
    }

    /// Reads the records of `event_keys` that the batch does not hold with one multi-get.
    /// Nearly all of them are new and absent from the store, and asking for them together
    /// lets RocksDB probe its filters for all at once. The keys are asked for in byte order,
    /// which spares RocksDB sorting them itself. Each record lands where a lookup one at a
    /// time would have put it, and the store does not change while a batch runs, so no
    /// result depends on it.
    pub(crate) fn prefetch(&mut self, event_keys: &[&str]) -> Result<(), StoreError> {
        self.prefetch_events(event_keys)?;
        self.clock = EventClock::load(self.store)?;
        self.profiles_created_before = match self.store.get(Table::Meta, PROFILES_CREATED_KEY)? {
            Some(bytes) => u64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt {
                    table: Table::Meta.name(),
                    key: "profiles_created".into(),
                    reason: format!("{} bytes instead of 8", bytes.len()),
                }
            })?),
            None => 0,
        };
        Ok(())
    }

    /// How many profiles the graph has ever created, this batch's so far included.
    pub(crate) fn profiles_known(&self) -> u64 {
        self.profiles_created_before + self.profiles_created
    }

    pub(crate) fn note_profile_created(&mut self) {
        self.profiles_created += 1;
    }

    fn prefetch_events(&mut self, keys: &[&str]) -> Result<(), StoreError> {
        let mut missing: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|key| !self.events.contains_key(*key))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let asked: Vec<&[u8]> = missing.iter().map(|key| key.as_bytes()).collect();
        let values = self.store.get_many(Table::Events, &asked)?;
        for (key, value) in missing.into_iter().zip(values) {
            let record = value.map(|bytes| EventRecord::decode(&bytes));
            self.stored_events.insert(key.to_owned(), record);
        }
        Ok(())
    }

    /// The cache's node index, loaded from the store if this is the first batch to need it.
    fn node_index(&mut self) -> Result<&mut NodeIndex, StoreError> {
        node_index_of(self.cache, self.store)
    }

    pub(crate) fn node(&mut self, key: &str) -> Result<Option<NodeRecord>, StoreError> {
        let index = self.node_index()?;
        Ok(index.id_of(key).and_then(|id| index.record(id)))
    }

    /// Whether the node under `key` is generic; `None` if there is no such node.
    pub(crate) fn node_generic(&mut self, key: &str) -> Result<Option<bool>, StoreError> {
        Ok(self.node_index()?.generic(key))
    }

    pub(crate) fn put_node(&mut self, key: &str, node: NodeRecord) -> Result<(), StoreError> {
        // Not `self.node_index()`: the dirty set is borrowed beside it.
        let index = node_index_of(self.cache, self.store)?;
        let id = index.intern(key);
        index.set(id, node)?;
        self.dirty_nodes.insert(id);
        Ok(())
    }

    /// Finds the root of `key`'s set, compressing the path on the way.
    pub(crate) fn find(&mut self, key: &str) -> Result<(String, RootInfo), StoreError> {
        let index = node_index_of(self.cache, self.store)?;
        let mut current = index.id_of(key).ok_or_else(|| dangling(key))?;
        let mut path = Vec::new();
        loop {
            if !index.is_present(current) {
                return Err(dangling(index.key(current)));
            }
            if let Some(parent) = index.parent(current) {
                path.push(current);
                current = parent;
                if path.len() > 1_000_000 {
                    return Err(StoreError::Corrupt {
                        table: Table::Nodes.name(),
                        key: key.replace('\0', "/"),
                        reason: "parent pointers form a cycle".into(),
                    });
                }
                continue;
            }
            let root = index
                .root_info(current)
                .ok_or_else(|| dangling(index.key(current)))?;
            // Path compression: every node on the way now points at the root directly. The
            // last node of the path already does.
            for &node in path.iter().rev().skip(1) {
                index.set_parent(node, current);
                self.dirty_nodes.insert(node);
            }
            return Ok((index.key(current).to_owned(), root));
        }
    }

    /// Loads a customer entry into the overlay if it is not there yet.
    fn load(&mut self, id: &str) -> Result<Option<&Cached>, StoreError> {
        if !self.cache.has_customer(id) {
            let entry = match self.store.get(Table::Customers, id.as_bytes())? {
                Some(bytes) => Some(Cached::from_entry(decode_customer(id.as_bytes(), &bytes)?)),
                None => None,
            };
            self.cache.current.insert_customer(id.to_owned(), entry);
        }
        Ok(self.cache.current.customers[id].as_ref())
    }

    /// The live id that `id` resolves to, following merge redirects.
    pub(crate) fn resolve_id(&mut self, id: &str) -> Result<Option<String>, StoreError> {
        let mut current = id.to_owned();
        for _ in 0..MAX_REDIRECT_HOPS {
            match self.load(&current)? {
                Some(Cached::Live(_)) => return Ok(Some(current)),
                Some(Cached::Redirect(to)) => current = to.clone(),
                None => return Ok(None),
            }
        }
        Err(redirect_chain_too_long(id))
    }

    /// A mutable live profile, loaded into the overlay and marked dirty.
    pub(crate) fn profile_mut(&mut self, id: &str) -> Result<&mut ProfileState, StoreError> {
        self.load(id)?;
        self.mark_customer(id);
        match self.cache.current.customers.get_mut(id) {
            Some(Some(Cached::Live(state))) => Ok(Arc::make_mut(state)),
            _ => Err(not_live(id)),
        }
    }

    /// Marks a customer the batch changes. Its match features are forgotten the first time:
    /// from then on until the batch ends it is in the cache's current generation, which
    /// [`Batch::candidate`] asks first, so no features can be made from an older state.
    fn mark_customer(&mut self, id: &str) {
        if self.dirty_customers.mark(id) {
            self.cache.features.forget(id);
        }
    }

    /// The live profile `id` resolves to, following merge redirects, as candidate search
    /// compares it: the decoded state if the cache holds it, else its match features, made
    /// from the stored record if need be without keeping the decoded profile (see
    /// [`crate::features`]). Features keep identifiers of `compared_kinds` only.
    pub(crate) fn candidate(
        &mut self,
        id: String,
        compared_kinds: &[CompactString],
    ) -> Result<Option<(String, CandidateView)>, StoreError> {
        let mut current = id;
        for _ in 0..MAX_REDIRECT_HOPS {
            let entry = if let Some(cached) = self.cache.peek_customer(&current) {
                match cached {
                    Some(Cached::Live(state)) => {
                        let view = CandidateView::Decoded(Arc::clone(state));
                        return Ok(Some((current, view)));
                    }
                    Some(Cached::Redirect(to)) => FeatureEntry::Redirect(to.clone()),
                    None => return Ok(None),
                }
            } else if let Some(entry) = self.cache.features.get(&current) {
                entry
            } else {
                let Some(bytes) = self.store.get(Table::Customers, current.as_bytes())? else {
                    return Ok(None);
                };
                let entry = match decode_customer(current.as_bytes(), &bytes)? {
                    CustomerEntry::Live(state) => {
                        FeatureEntry::Live(Arc::new(MatchFeatures::of(&state, compared_kinds)))
                    }
                    CustomerEntry::Redirect { to } => FeatureEntry::Redirect(to),
                };
                self.cache.features.insert(&current, entry.clone());
                entry
            };
            match entry {
                FeatureEntry::Live(features) => {
                    return Ok(Some((current, CandidateView::Features(features))))
                }
                FeatureEntry::Redirect(to) => current = to,
            }
        }
        Err(redirect_chain_too_long(&current))
    }

    /// A shared handle on a live profile; cheap, and unaffected by later writes.
    pub(crate) fn profile(&mut self, id: &str) -> Result<Arc<ProfileState>, StoreError> {
        match self.load(id)? {
            Some(Cached::Live(state)) => Ok(Arc::clone(state)),
            _ => Err(not_live(id)),
        }
    }

    pub(crate) fn put_profile(&mut self, state: ProfileState) {
        let id = state.profile.customer_id.clone();
        self.cache.features.forget(&id);
        self.dirty_customers.insert(id.clone());
        self.cache
            .current
            .insert_customer(id, Some(Cached::Live(Arc::new(state))));
    }

    pub(crate) fn put_redirect(&mut self, id: &str, to: &str) {
        self.mark_customer(id);
        self.cache
            .current
            .insert_customer(id.to_owned(), Some(Cached::Redirect(to.to_owned())));
    }

    /// The cache's blocking index, loaded from the store if this is the first batch to
    /// need it.
    fn blocking_index(&mut self) -> Result<&mut BlockingIndex, StoreError> {
        loaded(&mut self.cache.blocking, || BlockingIndex::load(self.store))
    }

    /// What the blocking key `key` lists.
    pub(crate) fn block(&mut self, key: &str) -> Result<Block<'_>, StoreError> {
        Ok(self.blocking_index()?.get(key))
    }

    /// Lists `customer_id` under `key` (see [`BlockingIndex::list`]).
    pub(crate) fn list_under(
        &mut self,
        key: &str,
        customer_id: &str,
        max_block_size: usize,
    ) -> Result<Listed, StoreError> {
        let customer = CustomerKey::parse(customer_id)
            .ok_or_else(|| not_a_customer_id(Table::Customers, customer_id))?;
        let listed = self.blocking_index()?.list(key, customer, max_block_size);
        if listed != Listed::AlreadyOversize {
            self.dirty_blocks.mark(key);
        }
        Ok(listed)
    }

    /// The record of an earlier event with the same key, if there is one.
    pub(crate) fn earlier_event(&self, key: &str) -> Result<Option<EventRecord>, StoreError> {
        if let Some((time_ms, id)) = self.events.get(key) {
            return Ok(Some(EventRecord {
                time_ms: Some(*time_ms),
                customer_id: id.clone(),
            }));
        }
        if let Some(stored) = self.stored_events.get(key) {
            return Ok(stored.clone());
        }
        Ok(self
            .store
            .get(Table::Events, key.as_bytes())?
            .map(|bytes| EventRecord::decode(&bytes)))
    }

    /// The oldest event time inside a window of `window_ms` before the next event counts.
    pub(crate) fn event_horizon(&self, window_ms: Option<i64>) -> Option<i64> {
        self.clock.horizon(window_ms)
    }

    /// Moves the event clock on by one event.
    pub(crate) fn observe_event_time(&mut self, time_ms: i64) {
        self.clock.observe(time_ms);
    }

    pub(crate) fn record_event(&mut self, key: String, time_ms: i64, customer_id: &str) {
        self.events.insert(key, (time_ms, customer_id.to_owned()));
    }

    /// Appends evidence under `customer_id`, numbering it from the profile's counter.
    pub(crate) fn add_evidence(
        &mut self,
        customer_id: &str,
        evidence: StampedEvidence,
    ) -> Result<(), StoreError> {
        let state = self.profile_mut(customer_id)?;
        let seq = state.evidence_count;
        state.evidence_count += 1;
        self.evidence
            .push((evidence_key(customer_id, seq), evidence));
        Ok(())
    }

    /// Records that the message at `coordinates` has been processed.
    pub(crate) fn set_position(&mut self, coordinates: &InputCoordinates) {
        let next = coordinates.next_position();
        if let Some((stream, latest)) = &mut self.current_stream {
            if stream.same_stream(coordinates) {
                *latest = (*latest).max(next);
                return;
            }
        }
        self.settle_current_stream();
        self.current_stream = Some((coordinates.clone(), next));
    }

    fn settle_current_stream(&mut self) {
        if let Some((stream, next)) = self.current_stream.take() {
            let entry = self.positions.entry(stream.stream_key()).or_insert(next);
            *entry = (*entry).max(next);
        }
    }

    /// Ends the batch: every change except the live profiles' records as a write set, the
    /// live profiles that changed (sorted by id; encoding them is left to
    /// [`crate::ResolvedBatch::encode_profiles`], off the resolving thread if the caller
    /// wishes). What the batch read and wrote stays in the cache.
    pub(crate) fn finish(mut self) -> (WriteSet, Vec<(String, Arc<ProfileState>)>) {
        self.settle_current_stream();
        self.write_set()
    }

    fn write_set(&self) -> (WriteSet, Vec<(String, Arc<ProfileState>)>) {
        let mut writes = WriteSet::default();
        writes.ops.reserve(
            self.dirty_nodes.len()
                + self.dirty_customers.len()
                + self.dirty_blocks.len()
                + self.events.len()
                + self.evidence.len()
                + self.positions.len(),
        );
        let mut live = Vec::new();
        if let Some(index) = &self.cache.nodes {
            let mut nodes: Vec<(&str, IdentifierId)> = self
                .dirty_nodes
                .iter()
                .map(|&id| (index.key(id), id))
                .collect();
            nodes.sort_unstable();
            for (key, id) in nodes {
                if let Some(node) = index.record(id) {
                    writes.put(Table::Nodes, key.as_bytes(), encode(&node));
                }
            }
        }
        for key in self.dirty_customers.sorted() {
            match self.cache.current.customers.get(key) {
                Some(Some(Cached::Live(state))) => live.push((key.clone(), Arc::clone(state))),
                Some(Some(Cached::Redirect(to))) => {
                    let entry = CustomerEntry::Redirect { to: to.clone() };
                    writes.put(Table::Customers, key.as_bytes(), encode(&entry));
                }
                _ => {}
            }
        }
        if let Some(index) = &self.cache.blocking {
            for key in self.dirty_blocks.sorted() {
                writes.put(Table::Blocks, key.as_bytes(), encode(&index.record(key)));
            }
        }
        let mut events: Vec<(&String, &(i64, String))> = self.events.iter().collect();
        events.sort_unstable();
        for (key, (time_ms, customer)) in events {
            writes.put(
                Table::Events,
                key.as_bytes(),
                EventRecord::encode(*time_ms, customer),
            );
        }
        // Every event recorded moved the clock; a batch of duplicates leaves both alone.
        if !self.events.is_empty() {
            writes.put(Table::Meta, EVENT_CLOCK_KEY, self.clock.encode());
        }
        for (key, stamped) in &self.evidence {
            // Stamped with its event time, so that it can expire (`engine.retention`).
            writes.put(
                Table::Evidence,
                key.clone(),
                timed(stamped.time_ms, &encode(&stamped.evidence)),
            );
        }
        for (stream, next) in &self.positions {
            writes.put(Table::Positions, stream.as_bytes(), next.to_string());
        }
        if self.profiles_created > 0 {
            let total = self.profiles_known().to_le_bytes();
            writes.put(Table::Meta, PROFILES_CREATED_KEY, total.to_vec());
        }
        (writes, live)
    }
}

/// The node index of `cache`, loaded from `store` if it holds none yet.
fn node_index_of<'c, S: StateRead>(
    cache: &'c mut StateCache,
    store: &S,
) -> Result<&'c mut NodeIndex, StoreError> {
    loaded(&mut cache.nodes, || NodeIndex::load(store))
}

/// What `slot` holds, loaded first if it holds nothing yet.
fn loaded<T>(
    slot: &mut Option<T>,
    load: impl FnOnce() -> Result<T, StoreError>,
) -> Result<&mut T, StoreError> {
    if slot.is_none() {
        *slot = Some(load()?);
    }
    Ok(slot.as_mut().expect("filled above"))
}

fn sized_map<V>(capacity: usize) -> FxHashMap<String, V> {
    FxHashMap::with_capacity_and_hasher(capacity, Default::default())
}

fn redirect_chain_too_long(id: &str) -> StoreError {
    StoreError::Corrupt {
        table: Table::Customers.name(),
        key: id.to_owned(),
        reason: "redirect chain too long".into(),
    }
}

fn not_live(id: &str) -> StoreError {
    StoreError::Corrupt {
        table: Table::Customers.name(),
        key: id.to_owned(),
        reason: "expected a live profile".into(),
    }
}

fn dangling(key: &str) -> StoreError {
    StoreError::Corrupt {
        table: Table::Nodes.name(),
        key: key.replace('\0', "/"),
        reason: "node has neither a parent nor root information".into(),
    }
}
