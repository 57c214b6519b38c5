//! The union-find graph of identifiers, whole, in memory (step 1 of
//! `docs/design/hot-state.md`).
//!
//! Every event looks its identifiers up, and nearly all of them are new. Cached like
//! profiles, each lookup of a node the cache did not hold was a store read (batched per
//! batch, but still a search of every level of the store for a key it mostly lacked), and
//! each node held a `String` key, a parent key and a customer id in separate allocations.
//! Here each identifier's node key is interned once: an [`IdentifierId`] indexes its key (in
//! one arena) and its node (parent as an id; a root's customer as the 12 bytes of its id),
//! so a lookup is a hash probe and an array read, and an identifier the index lacks is
//! known to be new without asking the store.
//!
//! The [`Table::Nodes`] records stay what they were: the engine writes changed nodes in each
//! batch's write set, and the index is loaded from them once, when a state cache first needs
//! it. Nothing here does I/O beyond that read through [`StateRead`].

use std::mem::size_of;

use hashbrown::HashTable;
use rustc_hash::FxHashMap;
use xxhash_rust::xxh3::xxh3_64;

use crate::blocking_index::{not_a_customer_id, CustomerKey};
use crate::state::{decode, memory, NodeRecord, RootInfo};
use crate::store::{StateRead, StoreError, Table};

/// An interned identifier: the index of its node key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct IdentifierId(u32);

/// The absence of a parent.
const NO_PARENT: u32 = u32::MAX;

/// The node has a stored record (an id may be interned only as another node's parent).
const PRESENT: u8 = 1;
const GENERIC: u8 = 2;

/// What a root knows about its set; kept for roots only (about one node in five).
#[derive(Debug, Clone, Copy)]
struct Root {
    customer: CustomerKey,
    size: u64,
}

/// Every identifier node of the state, in about 10 bytes a node plus its key: the nodes are
/// as many as the identifiers of the whole graph, and this is held whole.
#[derive(Debug, Default)]
pub(crate) struct NodeIndex {
    /// Ids, found by the xxh3 hash of their key and told apart by the key itself (so two
    /// keys with one hash stay two nodes). Only the id is stored: the hash is recomputed
    /// from the key when the table grows.
    ids: HashTable<u32>,
    /// Node keys, back to back; key `i` ends at `key_ends[i]`.
    keys: String,
    key_ends: Vec<u32>,
    /// Per node: its parent's id (or [`NO_PARENT`]) and its flags.
    parents: Vec<u32>,
    flags: Vec<u8>,
    roots: FxHashMap<u32, Root>,
    /// Other profiles a value was seen with, for the few nodes that have any.
    conflicts: FxHashMap<u32, Vec<String>>,
    conflict_bytes: usize,
}

/// Key `id` of an arena (see [`NodeIndex::keys`]).
fn key_in<'k>(keys: &'k str, key_ends: &[u32], id: u32) -> &'k str {
    let index = id as usize;
    let start = if index == 0 {
        0
    } else {
        key_ends[index - 1] as usize
    };
    &keys[start..key_ends[index] as usize]
}

impl NodeIndex {
    /// The index of every node record `store` holds.
    pub(crate) fn load<S: StateRead + ?Sized>(store: &S) -> Result<NodeIndex, StoreError> {
        let mut index = NodeIndex::default();
        store.for_each_entry(Table::Nodes, &mut |key, value| {
            let node: NodeRecord = decode(Table::Nodes, key, value)?;
            let key = std::str::from_utf8(key).map_err(|_| StoreError::Corrupt {
                table: Table::Nodes.name(),
                key: String::from_utf8_lossy(key).replace('\0', "/"),
                reason: "the key is not UTF-8".into(),
            })?;
            let id = index.intern(key);
            index.set(id, node)
        })?;
        Ok(index)
    }

    /// The id of `key` if the index has it (as a node or as a node's parent).
    pub(crate) fn id_of(&self, key: &str) -> Option<IdentifierId> {
        self.ids
            .find(xxh3_64(key.as_bytes()), |&id| {
                key_in(&self.keys, &self.key_ends, id) == key
            })
            .map(|&id| IdentifierId(id))
    }

    /// The id of `key`, interned now if the index did not have it (as an absent node).
    pub(crate) fn intern(&mut self, key: &str) -> IdentifierId {
        if let Some(id) = self.id_of(key) {
            return id;
        }
        let id = u32::try_from(self.parents.len())
            .ok()
            .filter(|&id| id != NO_PARENT)
            .expect("fewer than 4 billion identifiers");
        self.keys.push_str(key);
        self.key_ends
            .push(u32::try_from(self.keys.len()).expect("fewer than 4 GiB of identifier values"));
        self.parents.push(NO_PARENT);
        self.flags.push(0);
        let (keys, key_ends) = (&self.keys, &self.key_ends);
        self.ids.insert_unique(xxh3_64(key.as_bytes()), id, |&id| {
            xxh3_64(key_in(keys, key_ends, id).as_bytes())
        });
        IdentifierId(id)
    }

    /// The node key of `id`.
    pub(crate) fn key(&self, id: IdentifierId) -> &str {
        key_in(&self.keys, &self.key_ends, id.0)
    }

    fn flags(&self, id: IdentifierId) -> u8 {
        self.flags[id.0 as usize]
    }

    /// Whether `id` has a record.
    pub(crate) fn is_present(&self, id: IdentifierId) -> bool {
        self.flags(id) & PRESENT != 0
    }

    /// Whether the node is generic; `None` if the index has no record for `key`.
    pub(crate) fn generic(&self, key: &str) -> Option<bool> {
        let flags = self.flags(self.id_of(key)?);
        (flags & PRESENT != 0).then_some(flags & GENERIC != 0)
    }

    /// The parent of `id`, if it has one.
    pub(crate) fn parent(&self, id: IdentifierId) -> Option<IdentifierId> {
        let parent = self.parents[id.0 as usize];
        (parent != NO_PARENT).then_some(IdentifierId(parent))
    }

    /// What a root knows about its set, if `id` is a root.
    pub(crate) fn root_info(&self, id: IdentifierId) -> Option<RootInfo> {
        self.roots.get(&id.0).map(|root| RootInfo {
            customer_id: root.customer.to_id(),
            size: root.size,
        })
    }

    /// Points `id` at `parent`, leaving the rest of its record as it is.
    pub(crate) fn set_parent(&mut self, id: IdentifierId, parent: IdentifierId) {
        self.parents[id.0 as usize] = parent.0;
    }

    /// The record of `id` as [`Table::Nodes`] keeps it; `None` if it has none.
    pub(crate) fn record(&self, id: IdentifierId) -> Option<NodeRecord> {
        let flags = self.flags(id);
        if flags & PRESENT == 0 {
            return None;
        }
        Some(NodeRecord {
            parent: self.parent(id).map(|parent| self.key(parent).to_owned()),
            root: self.root_info(id),
            generic: flags & GENERIC != 0,
            conflicts: self.conflicts.get(&id.0).cloned().unwrap_or_default(),
        })
    }

    /// Makes `record` the record of `id`; its parent is interned if need be. Fails, changing
    /// nothing, if the root's customer id is not one the engine mints.
    pub(crate) fn set(&mut self, id: IdentifierId, record: NodeRecord) -> Result<(), StoreError> {
        let root = match &record.root {
            Some(root) => Some(Root {
                customer: CustomerKey::parse(&root.customer_id)
                    .ok_or_else(|| not_a_customer_id(Table::Nodes, &root.customer_id))?,
                size: root.size,
            }),
            None => None,
        };
        let parent = record.parent.as_deref().map(|parent| self.intern(parent));
        let slot = id.0 as usize;
        self.parents[slot] = parent.map_or(NO_PARENT, |parent| parent.0);
        self.flags[slot] = PRESENT | if record.generic { GENERIC } else { 0 };
        match root {
            Some(root) => self.roots.insert(id.0, root),
            None => self.roots.remove(&id.0),
        };
        self.set_conflicts(id, record.conflicts);
        Ok(())
    }

    fn set_conflicts(&mut self, id: IdentifierId, conflicts: Vec<String>) {
        let old = if conflicts.is_empty() {
            self.conflicts.remove(&id.0)
        } else {
            self.conflict_bytes += conflict_bytes(&conflicts);
            self.conflicts.insert(id.0, conflicts)
        };
        if let Some(old) = old {
            self.conflict_bytes -= conflict_bytes(&old);
        }
    }

    /// About how many bytes of memory the index takes.
    pub(crate) fn estimated_bytes(&self) -> usize {
        self.ids.capacity() * (size_of::<u32>() + 1)
            + self.keys.capacity()
            + self.key_ends.capacity() * size_of::<u32>()
            + self.parents.capacity() * size_of::<u32>()
            + self.flags.capacity()
            + self.roots.capacity() * (size_of::<(u32, Root)>() + 1)
            + self.conflicts.capacity() * (size_of::<(u32, Vec<String>)>() + 1)
            + self.conflict_bytes
    }
}

fn conflict_bytes(conflicts: &[String]) -> usize {
    memory::strings(conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::encode;
    use crate::store::{MemoryStore, StateStore, WriteSet};

    fn customer(n: u8) -> String {
        format!("cus_{n:024x}")
    }

    fn root(n: u8, size: u64) -> NodeRecord {
        NodeRecord {
            parent: None,
            root: Some(RootInfo {
                customer_id: customer(n),
                size,
            }),
            generic: false,
            conflicts: Vec::new(),
        }
    }

    fn child_of(parent: &str) -> NodeRecord {
        NodeRecord {
            parent: Some(parent.into()),
            root: None,
            generic: false,
            conflicts: Vec::new(),
        }
    }

    #[test]
    fn a_record_set_is_the_record_read_back() {
        let mut index = NodeIndex::default();
        let generic = NodeRecord {
            generic: true,
            conflicts: vec![customer(7), customer(8)],
            ..child_of("email\0b@x.example")
        };
        for (key, record) in [
            ("email\0a@x.example", root(1, 2)),
            ("email\0b@x.example", child_of("email\0a@x.example")),
            ("phone\0+15550100", generic),
        ] {
            let id = index.intern(key);
            index.set(id, record.clone()).unwrap();
            assert_eq!(index.record(id), Some(record), "{key}");
            assert_eq!(index.key(id), key);
        }
        assert_eq!(index.generic("phone\0+15550100"), Some(true));
        assert_eq!(index.generic("email\0a@x.example"), Some(false));
        assert_eq!(index.generic("email\0new@x.example"), None);
        let bytes = index.estimated_bytes();
        let id = index.id_of("phone\0+15550100").unwrap();
        index.set(id, child_of("email\0a@x.example")).unwrap();
        assert!(index.conflicts.is_empty(), "conflicts go with the record");
        assert!(index.roots.len() == 1, "only a@x is a root");
        assert!(index.estimated_bytes() < bytes);
    }

    #[test]
    fn a_parent_interned_before_its_record_is_absent_until_it_has_one() {
        let mut index = NodeIndex::default();
        let child = index.intern("email\0child@x.example");
        index
            .set(child, child_of("email\0parent@x.example"))
            .unwrap();
        let parent = index.id_of("email\0parent@x.example").unwrap();
        assert!(!index.is_present(parent));
        assert_eq!(index.record(parent), None);
        assert_eq!(index.parent(child), Some(parent));
        index.set(parent, root(3, 2)).unwrap();
        assert_eq!(index.root_info(parent).unwrap().customer_id, customer(3));
    }

    #[test]
    fn many_keys_keep_their_own_ids_as_the_table_grows() {
        let mut index = NodeIndex::default();
        let keys: Vec<String> = (0..10_000)
            .map(|n| format!("email\0{n}@x.example"))
            .collect();
        let ids: Vec<IdentifierId> = keys.iter().map(|key| index.intern(key)).collect();
        for (key, id) in keys.iter().zip(&ids) {
            assert_eq!(index.id_of(key), Some(*id));
            assert_eq!(index.key(*id), key);
            assert_eq!(index.intern(key), *id, "interning twice gives the same id");
        }
    }

    #[test]
    fn a_root_whose_customer_id_the_engine_cannot_mint_is_refused() {
        let mut index = NodeIndex::default();
        let id = index.intern("email\0a@x.example");
        let mut record = root(1, 1);
        record.root.as_mut().unwrap().customer_id = "someone".into();
        let error = index.set(id, record).unwrap_err().to_string();
        assert!(error.contains("someone"), "{error}");
        assert!(!index.is_present(id), "nothing changed");
    }

    #[test]
    fn the_index_loads_what_its_records_stored() {
        let records = [
            ("email\0a@x.example", child_of("email\0b@x.example")),
            ("email\0b@x.example", root(1, 2)),
            ("phone\0+15550100", root(2, 1)),
        ];
        let mut writes = WriteSet::default();
        for (key, record) in &records {
            writes.put(Table::Nodes, *key, encode(record));
        }
        let mut store = MemoryStore::new();
        store.write(&writes).unwrap();
        let index = NodeIndex::load(&store).unwrap();
        for (key, record) in records {
            assert_eq!(index.record(index.id_of(key).unwrap()), Some(record));
        }
        assert_eq!(index.id_of("email\0c@x.example"), None);
    }
}
