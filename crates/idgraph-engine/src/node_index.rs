//! The union-find graph of identifiers, whole, in memory (step 1 of
//! `docs/design/hot-state.md`).
//!
//! Every event looks its identifiers up, and nearly all of them are new. Cached like
//! profiles, each lookup of a node the cache did not hold was a store read (batched per
//! batch, but still a search of every level of the store for a key it mostly lacked), and
//! each node held a `String` key, a parent key and a customer id in separate allocations.
//! Here each identifier's node key is interned once: an [`IdentifierId`] indexes its key (in
//! one arena) and its node (parent as an id, the root's customer as the 12 bytes of its id),
//! so a lookup is a hash probe and an array read, and an identifier the index lacks is
//! known to be new without asking the store.
//!
//! The [`Table::Nodes`] records stay what they were: the engine writes changed nodes in each
//! batch's write set, and the index is loaded from them once, when a state cache first needs
//! it. Nothing here does I/O beyond that read through [`StateRead`].

use std::mem::size_of;

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
/// The node is a root and `root_customer`/`root_size` hold its [`RootInfo`].
const HAS_ROOT: u8 = 2;
const GENERIC: u8 = 4;

/// One node in compact form; [`NodeIndex::record`] turns it back into a [`NodeRecord`].
#[derive(Debug, Clone, Copy)]
struct Node {
    root_size: u64,
    root_customer: CustomerKey,
    parent: u32,
    flags: u8,
}

const EMPTY_NODE: Node = Node {
    root_size: 0,
    root_customer: CustomerKey::ZERO,
    parent: NO_PARENT,
    flags: 0,
};

/// Every identifier node of the state.
#[derive(Debug, Default)]
pub(crate) struct NodeIndex {
    /// A 64-bit hash of the node key → its id. Keys whose hash another key holds already
    /// are in `collided`; with 64 bits that is about one key in a billion at 10M keys, but a
    /// collision must not join two identifiers, so it is handled, not assumed away.
    ids: FxHashMap<u64, u32>,
    collided: FxHashMap<Box<str>, u32>,
    /// Node keys, back to back; key `i` ends at `key_ends[i]`.
    keys: String,
    key_ends: Vec<u32>,
    nodes: Vec<Node>,
    /// Other profiles a value was seen with, for the few nodes that have any.
    conflicts: FxHashMap<u32, Vec<String>>,
    conflict_bytes: usize,
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
        let id = *self.ids.get(&xxh3_64(key.as_bytes()))?;
        if self.key(IdentifierId(id)) == key {
            return Some(IdentifierId(id));
        }
        self.collided.get(key).map(|&id| IdentifierId(id))
    }

    /// The id of `key`, interned now if the index did not have it (as an absent node).
    pub(crate) fn intern(&mut self, key: &str) -> IdentifierId {
        if let Some(id) = self.id_of(key) {
            return id;
        }
        let id = u32::try_from(self.nodes.len())
            .ok()
            .filter(|&id| id != NO_PARENT)
            .expect("fewer than 4 billion identifiers");
        self.keys.push_str(key);
        self.key_ends
            .push(u32::try_from(self.keys.len()).expect("fewer than 4 GiB of identifier values"));
        self.nodes.push(EMPTY_NODE);
        let hash = xxh3_64(key.as_bytes());
        if let std::collections::hash_map::Entry::Vacant(slot) = self.ids.entry(hash) {
            slot.insert(id);
        } else {
            self.collided.insert(key.into(), id);
        }
        IdentifierId(id)
    }

    /// The node key of `id`.
    pub(crate) fn key(&self, id: IdentifierId) -> &str {
        let index = id.0 as usize;
        let start = if index == 0 {
            0
        } else {
            self.key_ends[index - 1] as usize
        };
        &self.keys[start..self.key_ends[index] as usize]
    }

    fn node(&self, id: IdentifierId) -> &Node {
        &self.nodes[id.0 as usize]
    }

    /// Whether `id` has a record.
    pub(crate) fn is_present(&self, id: IdentifierId) -> bool {
        self.node(id).flags & PRESENT != 0
    }

    /// Whether the node is generic; `None` if the index has no record for `key`.
    pub(crate) fn generic(&self, key: &str) -> Option<bool> {
        let id = self.id_of(key)?;
        let node = self.node(id);
        (node.flags & PRESENT != 0).then_some(node.flags & GENERIC != 0)
    }

    /// The parent of `id`, if it has one.
    pub(crate) fn parent(&self, id: IdentifierId) -> Option<IdentifierId> {
        let parent = self.node(id).parent;
        (parent != NO_PARENT).then_some(IdentifierId(parent))
    }

    /// What a root knows about its set, if `id` is a root.
    pub(crate) fn root_info(&self, id: IdentifierId) -> Option<RootInfo> {
        let node = self.node(id);
        (node.flags & HAS_ROOT != 0).then(|| RootInfo {
            customer_id: node.root_customer.to_id(),
            size: node.root_size,
        })
    }

    /// Points `id` at `parent`, leaving the rest of its record as it is.
    pub(crate) fn set_parent(&mut self, id: IdentifierId, parent: IdentifierId) {
        self.nodes[id.0 as usize].parent = parent.0;
    }

    /// The record of `id` as [`Table::Nodes`] keeps it; `None` if it has none.
    pub(crate) fn record(&self, id: IdentifierId) -> Option<NodeRecord> {
        let node = self.node(id);
        if node.flags & PRESENT == 0 {
            return None;
        }
        Some(NodeRecord {
            parent: self.parent(id).map(|parent| self.key(parent).to_owned()),
            root: self.root_info(id),
            generic: node.flags & GENERIC != 0,
            conflicts: self.conflicts.get(&id.0).cloned().unwrap_or_default(),
        })
    }

    /// Makes `record` the record of `id`; its parent is interned if need be. Fails, changing
    /// nothing, if the root's customer id is not one the engine mints.
    pub(crate) fn set(&mut self, id: IdentifierId, record: NodeRecord) -> Result<(), StoreError> {
        let root = match &record.root {
            Some(root) => Some((
                CustomerKey::parse(&root.customer_id)
                    .ok_or_else(|| not_a_customer_id(Table::Nodes, &root.customer_id))?,
                root.size,
            )),
            None => None,
        };
        let parent = record.parent.as_deref().map(|parent| self.intern(parent));
        let mut node = Node {
            parent: parent.map_or(NO_PARENT, |parent| parent.0),
            flags: PRESENT,
            ..EMPTY_NODE
        };
        if let Some((customer, size)) = root {
            node.flags |= HAS_ROOT;
            node.root_customer = customer;
            node.root_size = size;
        }
        if record.generic {
            node.flags |= GENERIC;
        }
        self.nodes[id.0 as usize] = node;
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
        self.ids.capacity() * (size_of::<(u64, u32)>() + 1)
            + self.keys.capacity()
            + self.key_ends.capacity() * size_of::<u32>()
            + self.nodes.capacity() * size_of::<Node>()
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
    fn keys_whose_hashes_collide_stay_apart() {
        let mut index = NodeIndex::default();
        let first = index.intern("email\0a@x.example");
        // Force the second key into the collision map by taking its hash slot first.
        let second_key = "email\0b@x.example";
        index.ids.insert(xxh3_64(second_key.as_bytes()), first.0);
        let second = index.intern(second_key);
        assert_ne!(first, second);
        assert_eq!(index.id_of(second_key), Some(second));
        assert_eq!(index.id_of("email\0a@x.example"), Some(first));
        assert_eq!(index.key(second), second_key);
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
