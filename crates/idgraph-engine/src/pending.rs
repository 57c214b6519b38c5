//! Reading state while an earlier batch's write set is still being committed.
//!
//! A caller that commits batch N on another thread while the engine resolves batch N+1 must
//! let N+1 see N's changes. [`ReadThrough`] answers reads from N's [`PendingWrites`] first
//! and from the store second, so the engine gets exactly what it would read after the commit.
//! Everything older than N must already be committed; this module does not check that.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;
#[cfg(not(test))]
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::state::{encode_live, ProfileState};
use crate::store::{Entries, StateRead, StoreError, Table, WriteOp, WriteSet};

/// A write set on its way to the store, indexed for point reads, and the live profiles that
/// will be written with it once they are encoded (see [`crate::ResolvedBatch`]).
#[derive(Debug, Clone)]
pub struct PendingWrites {
    writes: Arc<WriteSet>,
    /// Hash of table and key → index of the last operation with that hash.
    index: FxHashMap<u64, u32>,
    /// Customer records not in `writes`, by id; they are encoded only if someone reads them.
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
    match op {
        WriteOp::Put { table, key, .. } | WriteOp::Delete { table, key } => (*table, key),
    }
}

impl PendingWrites {
    pub fn new(writes: Arc<WriteSet>) -> Self {
        let mut index = FxHashMap::default();
        index.reserve(writes.ops.len());
        for (position, op) in writes.ops.iter().enumerate() {
            let (table, key) = op_target(op);
            index.insert(key_hash(table, key), position as u32);
        }
        PendingWrites {
            writes,
            index,
            profiles: FxHashMap::default(),
        }
    }

    /// Adds the live profiles that go to the store with this write set (their ids must have
    /// no operation in it), e.g. [`crate::ResolvedBatch::profiles`].
    pub fn with_profiles<'p>(
        mut self,
        profiles: impl IntoIterator<Item = (&'p str, &'p Arc<ProfileState>)>,
    ) -> Self {
        self.profiles = profiles
            .into_iter()
            .map(|(id, state)| (id.to_owned(), Arc::clone(state)))
            .collect();
        self
    }

    /// The stored form of a pending profile: the bytes [`crate::ResolvedBatch`] will write.
    fn profile_record(&self, table: Table, key: &[u8]) -> Option<Vec<u8>> {
        if table != Table::Customers || self.profiles.is_empty() {
            return None;
        }
        let state = self.profiles.get(std::str::from_utf8(key).ok()?)?;
        Some(encode_live(state))
    }

    pub fn writes(&self) -> &Arc<WriteSet> {
        &self.writes
    }

    /// The last operation on `key` in `table`, if the write set has one.
    fn last_op(&self, table: Table, key: &[u8]) -> Option<&WriteOp> {
        let position = *self.index.get(&key_hash(table, key))?;
        let op = &self.writes.ops[position as usize];
        if op_target(op) == (table, key) {
            return Some(op);
        }
        // Another key with the same 64-bit hash took the slot: look the slow way.
        self.writes
            .ops
            .iter()
            .rev()
            .find(|op| op_target(op) == (table, key))
    }
}

/// A store as it will be once `pending` (if any) is committed.
#[derive(Debug, Clone, Copy)]
pub struct ReadThrough<'a, R> {
    pub pending: Option<&'a PendingWrites>,
    pub store: &'a R,
}

impl<R: StateRead> ReadThrough<'_, R> {
    /// What the pending writes say about `key`: `Some(value)` if they decide it (`None`
    /// inside for a delete), `None` if the store must be asked.
    fn pending_value(&self, table: Table, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let pending = self.pending?;
        if let Some(record) = pending.profile_record(table, key) {
            return Some(Some(record));
        }
        match pending.last_op(table, key)? {
            WriteOp::Put { value, .. } => Some(Some(value.clone())),
            WriteOp::Delete { .. } => Some(None),
        }
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
        let Some(pending) = self.pending else {
            return Ok(stored);
        };
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
        for op in &pending.writes.ops {
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
        Ok(merged.into_iter().collect())
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
            pending: Some(&pending),
            store: &store,
        };
        let mut committed = base();
        committed.write(&pending_writes()).unwrap();
        for table in [Table::Nodes, Table::Customers, Table::Evidence] {
            for key in [
                "a",
                "b",
                "c",
                "untouched",
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
            let keys: Vec<&[u8]> = ["c1\u{0}3", "a", "untouched", "zz", "b", "c1\u{0}1", "a"]
                .iter()
                .map(|key| key.as_bytes())
                .collect();
            assert_eq!(
                view.get_many(table, &keys).unwrap(),
                committed.get_many(table, &keys).unwrap(),
                "{table:?}: pending answers and stored ones land in the order asked"
            );
            for prefix in ["", "c1\u{0}", "a", "zz"] {
                assert_eq!(
                    view.scan_prefix(table, prefix.as_bytes()).unwrap(),
                    committed.scan_prefix(table, prefix.as_bytes()).unwrap(),
                    "{table:?} {prefix:?}"
                );
            }
        }
    }

    #[test]
    fn without_pending_writes_it_is_the_store() {
        let store = base();
        let view = ReadThrough {
            pending: None,
            store: &store,
        };
        assert_eq!(view.get(Table::Nodes, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(view.scan_prefix(Table::Evidence, b"c1").unwrap().len(), 2);
    }
}
