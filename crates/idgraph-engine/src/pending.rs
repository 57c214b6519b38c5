//! Reading state while earlier batches' write sets are not yet in the store.
//!
//! State is written behind: a caller collects the write sets of several batches into a
//! checkpoint ([`PendingWrites`]) and commits them as one atomic write, possibly on another
//! thread while the engine resolves later batches. Those batches must see every earlier
//! change. [`ReadThrough`] answers reads from the pending checkpoints, newest first, and from
//! the store last, so the engine gets exactly what it would read had every batch been
//! committed on its own. Everything older than the oldest pending checkpoint must already be
//! committed; this module does not check that.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
#[cfg(not(test))]
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::cache::StateCache;
use crate::state::{encode_live, ProfileState};
use crate::store::{
    Entries, EntryVisitor, StateRead, StateStore, StoreError, Table, WriteOp, WriteSet,
};

/// The write sets of one or more batches on their way to the store, indexed for point reads,
/// and the live profiles that will be written with them once they are encoded (see
/// [`crate::ResolvedBatch`]).
#[derive(Debug, Clone, Default)]
pub struct PendingWrites {
    /// The batches' write sets, oldest first.
    sets: Vec<Arc<WriteSet>>,
    /// Hash of table and key → (set, operation) of the last operation with that hash.
    index: FxHashMap<u64, (u32, u32)>,
    /// Live customer records whose newest change is not in `sets`, by id; they are encoded
    /// only when read or committed.
    profiles: FxHashMap<String, Arc<ProfileState>>,
}

#[cfg(not(test))]
fn key_hash(table: Table, key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, table as u64)
}

/// In this module's unit tests all keys of a table share one hash, so they exercise the path
/// a real collision takes; the workspace's integration tests run the real hash.
#[cfg(test)]
fn key_hash(table: Table, _key: &[u8]) -> u64 {
    table as u64
}

fn op_target(op: &WriteOp) -> (Table, &[u8]) {
    op.target()
}

impl PendingWrites {
    /// One batch's write set, pending.
    pub fn new(writes: Arc<WriteSet>) -> Self {
        let mut pending = PendingWrites::default();
        pending.push(writes, std::iter::empty());
        pending
    }

    /// Adds a later batch: its write set and the live profiles it changed (their ids must
    /// have no operation in `writes`, e.g. [`crate::ResolvedBatch::profiles`]). What it
    /// writes overrides what earlier batches wrote to the same keys.
    pub fn push<'p>(
        &mut self,
        writes: Arc<WriteSet>,
        profiles: impl IntoIterator<Item = (&'p str, &'p Arc<ProfileState>)>,
    ) {
        let set = self.sets.len() as u32;
        self.index.reserve(writes.ops.len());
        for (position, op) in writes.ops.iter().enumerate() {
            let (table, key) = op_target(op);
            self.index
                .insert(key_hash(table, key), (set, position as u32));
            if table == Table::Customers && !self.profiles.is_empty() {
                // A redirect written after the profile was live replaces it.
                if let Ok(id) = std::str::from_utf8(key) {
                    self.profiles.remove(id);
                }
            }
        }
        self.sets.push(writes);
        self.insert_profiles(profiles);
    }

    /// Adds the live profiles that go to the store with the newest write set; see
    /// [`PendingWrites::push`].
    pub fn with_profiles<'p>(
        mut self,
        profiles: impl IntoIterator<Item = (&'p str, &'p Arc<ProfileState>)>,
    ) -> Self {
        self.insert_profiles(profiles);
        self
    }

    fn insert_profiles<'p>(
        &mut self,
        profiles: impl IntoIterator<Item = (&'p str, &'p Arc<ProfileState>)>,
    ) {
        for (id, state) in profiles {
            self.profiles.insert(id.to_owned(), Arc::clone(state));
        }
    }

    /// Ends this open checkpoint: hands over its write sets together with the states of the
    /// profiles its batches pinned in `cache` ([`StateCache::pin_customers`]), and leaves an
    /// empty checkpoint in its place.
    pub fn close(&mut self, cache: &mut StateCache) -> PendingWrites {
        let profiles = cache.take_pinned_profiles();
        std::mem::take(self).with_profiles(profiles.iter().map(|(id, state)| (id.as_str(), state)))
    }

    /// Commits the checkpoint to `store` in one atomic write: the last operation per key, the
    /// live profiles' state records and `extra` (which must write no key the checkpoint
    /// writes).
    pub fn commit<S: StateStore>(
        &self,
        store: &mut S,
        extra: &[&WriteOp],
    ) -> Result<(), StoreError> {
        let profiles = self.encode_profiles();
        let mut ops = self.checkpoint_ops();
        ops.extend(&profiles.ops);
        ops.extend(extra);
        // Every key is written once, so the order is free: in key order, RocksDB inserts each
        // key into its memtable next to the one before instead of searching its skip list
        // from the top.
        ops.sort_unstable_by(|a, b| a.target().cmp(&b.target()));
        store.write_ops(&ops)
    }

    /// A live profile's state as the checkpoint will write it, if the checkpoint has it.
    pub fn profile(&self, id: &str) -> Option<&Arc<ProfileState>> {
        self.profiles.get(id)
    }

    /// How many batches this holds.
    pub fn batches(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// The stored form of a pending profile: the bytes the checkpoint will write.
    fn profile_record(&self, table: Table, key: &[u8]) -> Option<Vec<u8>> {
        if table != Table::Customers || self.profiles.is_empty() {
            return None;
        }
        let state = self.profiles.get(std::str::from_utf8(key).ok()?)?;
        Some(encode_live(state))
    }

    /// The last operation on `key` in `table`, if a write set has one.
    fn last_op(&self, table: Table, key: &[u8]) -> Option<&WriteOp> {
        let (set, position) = *self.index.get(&key_hash(table, key))?;
        let op = &self.sets[set as usize].ops[position as usize];
        if op_target(op) == (table, key) {
            return Some(op);
        }
        // Another key with the same 64-bit hash took the slot: look the slow way.
        self.all_ops()
            .rev()
            .find(|op| op_target(op) == (table, key))
    }

    fn all_ops(&self) -> impl DoubleEndedIterator<Item = &WriteOp> {
        self.sets.iter().flat_map(|set| set.ops.iter())
    }

    /// What the checkpoint writes apart from the live profiles: the last operation per key,
    /// in the order they were made. A key written by every batch (a position, a busy
    /// profile's blocking keys) goes to the store once instead of once per batch.
    pub fn checkpoint_ops(&self) -> Vec<&WriteOp> {
        let mut seen: FxHashSet<(Table, &[u8])> = FxHashSet::default();
        seen.reserve(self.index.len());
        let mut kept: Vec<&WriteOp> = self
            .all_ops()
            .rev()
            .filter(|op| {
                let (table, key) = op_target(op);
                seen.insert((table, key)) && !self.is_live_profile(table, key)
            })
            .collect();
        kept.reverse();
        kept
    }

    fn is_live_profile(&self, table: Table, key: &[u8]) -> bool {
        table == Table::Customers
            && !self.profiles.is_empty()
            && std::str::from_utf8(key).is_ok_and(|id| self.profiles.contains_key(id))
    }

    /// The state records of the live profiles, by id, encoded: the rest of the checkpoint.
    pub fn encode_profiles(&self) -> WriteSet {
        let mut ids: Vec<&String> = self.profiles.keys().collect();
        ids.sort_unstable();
        let mut writes = WriteSet::default();
        writes.ops.reserve(ids.len());
        for id in ids {
            writes.put(
                Table::Customers,
                id.as_bytes(),
                encode_live(&self.profiles[id]),
            );
        }
        writes
    }
}

/// A store as it will be once every pending checkpoint is committed.
#[derive(Debug, Clone, Copy)]
pub struct ReadThrough<'a, R> {
    /// Pending checkpoints, newest first.
    pub pending: &'a [&'a PendingWrites],
    pub store: &'a R,
}

impl<R: StateRead> ReadThrough<'_, R> {
    /// What the pending writes say about `key`: `Some(value)` if they decide it (`None`
    /// inside for a delete), `None` if the store must be asked.
    fn pending_value(&self, table: Table, key: &[u8]) -> Option<Option<Vec<u8>>> {
        for pending in self.pending {
            if let Some(record) = pending.profile_record(table, key) {
                return Some(Some(record));
            }
            match pending.last_op(table, key) {
                Some(WriteOp::Put { value, .. }) => return Some(Some(value.clone())),
                Some(WriteOp::Delete { .. }) => return Some(None),
                None => {}
            }
        }
        None
    }
}

impl<R: StateRead> StateRead for ReadThrough<'_, R> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.pending_value(table, key) {
            Some(decided) => Ok(decided),
            None => self.store.get(table, key),
        }
    }

    fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut values = Vec::with_capacity(keys.len());
        let mut unanswered = Vec::new();
        for (position, key) in keys.iter().enumerate() {
            match self.pending_value(table, key) {
                Some(decided) => values.push(decided),
                None => {
                    values.push(None);
                    unanswered.push(position);
                }
            }
        }
        let asked: Vec<&[u8]> = unanswered.iter().map(|&position| keys[position]).collect();
        let stored = self.store.get_many(table, &asked)?;
        for (position, value) in unanswered.into_iter().zip(stored) {
            values[position] = value;
        }
        Ok(values)
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        let stored = self.store.scan_prefix(table, prefix)?;
        if self.pending.is_empty() {
            return Ok(stored);
        }
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
        // Oldest first, so that newer writes win.
        for pending in self.pending.iter().rev() {
            for op in pending.all_ops() {
                match op {
                    WriteOp::Put {
                        table: t,
                        key,
                        value,
                    } if *t == table && key.starts_with(prefix) => {
                        merged.insert(key.clone(), value.clone());
                    }
                    WriteOp::Delete { table: t, key } if *t == table && key.starts_with(prefix) => {
                        merged.remove(key);
                    }
                    _ => {}
                }
            }
            if table == Table::Customers {
                for (id, state) in &pending.profiles {
                    if id.as_bytes().starts_with(prefix) {
                        merged.insert(id.as_bytes().to_vec(), encode_live(state));
                    }
                }
            }
        }
        Ok(merged.into_iter().collect())
    }

    /// Straight from the store when nothing is pending (a worker loading its state at
    /// start); otherwise through the merged scan above.
    fn for_each_entry(&self, table: Table, visit: &mut EntryVisitor<'_>) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return self.store.for_each_entry(table, visit);
        }
        for (key, value) in self.scan_prefix(table, b"")? {
            visit(&key, &value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, StateStore};

    fn base() -> MemoryStore {
        let mut store = MemoryStore::new();
        let mut writes = WriteSet::default();
        writes.put(Table::Nodes, "a", "1");
        writes.put(Table::Nodes, "b", "2");
        writes.put(Table::Nodes, "untouched", "3");
        writes.put(Table::Evidence, "c1\u{0}1", "old");
        writes.put(Table::Evidence, "c1\u{0}2", "gone");
        store.write(&writes).unwrap();
        store
    }

    fn pending_writes() -> WriteSet {
        let mut writes = WriteSet::default();
        writes.put(Table::Nodes, "a", "first");
        writes.put(Table::Nodes, "a", "second");
        writes.delete(Table::Nodes, "b");
        writes.put(Table::Customers, "a", "other table");
        writes.put(Table::Evidence, "c1\u{0}3", "new");
        writes.put(Table::Evidence, "c1\u{0}1", "updated");
        writes.delete(Table::Evidence, "c1\u{0}2");
        writes.put(Table::Evidence, "c2\u{0}1", "other prefix");
        writes
    }

    #[test]
    fn reads_through_pending_writes_as_if_they_were_committed() {
        let store = base();
        let pending = PendingWrites::new(Arc::new(pending_writes()));
        let view = ReadThrough {
            pending: &[&pending],
            store: &store,
        };
        let mut committed = base();
        committed.write(&pending_writes()).unwrap();
        assert_reads_equal(&view, &committed);
        for table in [Table::Nodes, Table::Customers, Table::Evidence] {
            let keys: Vec<&[u8]> = ["c1\u{0}3", "a", "untouched", "zz", "b", "c1\u{0}1", "a"]
                .iter()
                .map(|key| key.as_bytes())
                .collect();
            assert_eq!(
                view.get_many(table, &keys).unwrap(),
                committed.get_many(table, &keys).unwrap(),
                "{table:?}: pending answers and stored ones land in the order asked"
            );
        }
    }

    #[test]
    fn without_pending_writes_it_is_the_store() {
        let store = base();
        let view = ReadThrough {
            pending: &[],
            store: &store,
        };
        assert_eq!(view.get(Table::Nodes, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(view.scan_prefix(Table::Evidence, b"c1").unwrap().len(), 2);
    }

    fn later_writes() -> WriteSet {
        let mut writes = WriteSet::default();
        writes.put(Table::Nodes, "a", "third");
        writes.put(Table::Nodes, "b", "back again");
        writes.delete(Table::Evidence, "c1\u{0}3");
        writes.put(Table::Customers, "gone", "redirect");
        writes
    }

    fn profile(id: &str) -> Arc<ProfileState> {
        Arc::new(crate::profile::new_profile(
            id.to_owned(),
            "2026-01-01T00:00:00Z",
        ))
    }

    /// Every key the tests touch, in every table they use.
    fn assert_reads_equal(view: &impl StateRead, committed: &MemoryStore) {
        for table in [Table::Nodes, Table::Customers, Table::Evidence] {
            for key in [
                "a",
                "b",
                "c",
                "untouched",
                "gone",
                "live",
                "c1\u{0}1",
                "c1\u{0}2",
                "c1\u{0}3",
            ] {
                assert_eq!(
                    view.get(table, key.as_bytes()).unwrap(),
                    committed.get(table, key.as_bytes()).unwrap(),
                    "{table:?} {key:?}"
                );
            }
            for prefix in ["", "c1\u{0}", "a", "g", "zz"] {
                assert_eq!(
                    view.scan_prefix(table, prefix.as_bytes()).unwrap(),
                    committed.scan_prefix(table, prefix.as_bytes()).unwrap(),
                    "{table:?} {prefix:?}"
                );
            }
        }
    }

    #[test]
    fn a_checkpoint_of_several_batches_reads_and_commits_as_the_batches_one_by_one() {
        let (gone, live) = (profile("gone"), profile("live"));
        // Batch one makes "gone" and "live" live; batch two redirects "gone".
        let mut checkpoint = PendingWrites::default();
        checkpoint.push(
            Arc::new(pending_writes()),
            [("gone", &gone), ("live", &live)],
        );
        checkpoint.push(Arc::new(later_writes()), std::iter::empty());
        assert_eq!(checkpoint.batches(), 2);

        let mut one_by_one = base();
        let mut first = pending_writes();
        first.put(Table::Customers, "gone", encode_live(&gone));
        first.put(Table::Customers, "live", encode_live(&live));
        one_by_one.write(&first).unwrap();
        one_by_one.write(&later_writes()).unwrap();

        let store = base();
        let view = ReadThrough {
            pending: &[&checkpoint],
            store: &store,
        };
        assert_reads_equal(&view, &one_by_one);

        let mut committed = base();
        let ops = checkpoint.checkpoint_ops();
        assert_eq!(
            ops.iter()
                .filter(|op| op_target(op) == (Table::Nodes, b"a".as_slice()))
                .count(),
            1,
            "a key written by several batches is written once"
        );
        committed.write_ops(&ops).unwrap();
        committed.write(&checkpoint.encode_profiles()).unwrap();
        assert_eq!(committed, one_by_one);
    }

    #[test]
    fn a_newer_pending_checkpoint_wins_over_an_older_one() {
        let older = PendingWrites::new(Arc::new(pending_writes()));
        let newer = PendingWrites::new(Arc::new(later_writes()));
        let store = base();
        let view = ReadThrough {
            pending: &[&newer, &older],
            store: &store,
        };
        let mut committed = base();
        committed.write(&pending_writes()).unwrap();
        committed.write(&later_writes()).unwrap();
        assert_reads_equal(&view, &committed);
    }
}
