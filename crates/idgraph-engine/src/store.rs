//! The storage trait the engine reads through and writes to, and its in-memory implementation.
//!
//! The trait is deliberately tiny (point reads, prefix scans, one atomic write of a batch) so
//! that a second implementation (RocksDB) is easy to get right, and one conformance suite
//! ([`crate::conformance`]) checks both.

use std::collections::BTreeMap;

/// The version of the stored state's layout; a store refuses to open state of a version that
/// is neither this one nor in [`UPGRADABLE_STATE_SCHEMA_VERSIONS`].
/// Version 2 stores records as MessagePack instead of JSON; version 3 keeps a profile inside
/// its record as the JSON bytes of its output record; version 4 writes live profiles in the
/// packed form (`idgraph_model::packed`), a third of the bytes; version 5 keeps each event
/// record's and each evidence record's event time, so that they can expire
/// ([`crate::duplicates`]).
pub const STATE_SCHEMA_VERSION: &str = "5";

/// Older versions this build still reads. A store opened on one of them records
/// [`STATE_SCHEMA_VERSION`] and goes on: old records stay readable, and each is rewritten in
/// the current form when it next changes. Builds that predate the current version then
/// refuse the state instead of misreading it.
pub const UPGRADABLE_STATE_SCHEMA_VERSIONS: &[&str] = &["3", "4"];

/// The key under which the number of profiles ever created is stored in [`Table::Meta`]
/// (eight bytes, little-endian): the size of the graph the fuzzy threshold's prior scales with.
pub const PROFILES_CREATED_KEY: &[u8] = b"profiles_created";

/// The key under which [`STATE_SCHEMA_VERSION`] is stored in [`Table::Meta`].
pub const SCHEMA_VERSION_KEY: &[u8] = b"schema_version";

/// The logical tables of the state; RocksDB keeps each in its own column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Identifier node key → union-find node record.
    Nodes,
    /// Customer id → profile, or redirect for an absorbed id.
    Customers,
    /// Blocking key → candidate customer ids for fuzzy matching.
    Blocks,
    /// Source and event id → the customer the event was assigned to (replay protection).
    Events,
    /// Customer id and sequence → one piece of link evidence.
    Evidence,
    /// Input stream → the next position to read.
    Positions,
    /// Store metadata such as the schema version.
    Meta,
}

impl Table {
    pub const ALL: [Table; 7] = [
        Table::Nodes,
        Table::Customers,
        Table::Blocks,
        Table::Events,
        Table::Evidence,
        Table::Positions,
        Table::Meta,
    ];

    /// The column-family name of the table.
    pub fn name(self) -> &'static str {
        match self {
            Table::Nodes => "nodes",
            Table::Customers => "customers",
            Table::Blocks => "blocks",
            Table::Events => "events",
            Table::Evidence => "evidence",
            Table::Positions => "positions",
            Table::Meta => "meta",
        }
    }
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
}

impl WriteOp {
    /// The table and key the operation writes.
    pub fn target(&self) -> (Table, &[u8]) {
        match self {
            WriteOp::Put { table, key, .. } | WriteOp::Delete { table, key } => (*table, key),
        }
    }
}

/// All the writes of one engine batch, applied atomically and in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSet {
    pub ops: Vec<WriteOp>,
}

impl WriteSet {
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put {
            table,
            key: key.into(),
            value: value.into(),
        });
    }

    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete {
            table,
            key: key.into(),
        });
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Key-value pairs returned by a prefix scan, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// How a caller should react to a storage error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff (a busy or full disk, a stall).
    Transient,
    /// Stop: the state cannot be trusted or reached.
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage is temporarily unavailable: {0}")]
    Transient(String),
    #[error("storage failed: {0}")]
    Fatal(String),
    #[error("stored state has schema version {found:?} but this build reads version {expected:?}; use a new state directory or the matching idgraph version")]
    SchemaMismatch { found: String, expected: String },
    #[error("stored record in table {table} under key {key:?} cannot be decoded: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Transient(_) => ErrorClass::Transient,
            _ => ErrorClass::Fatal,
        }
    }
}

/// Storage figures an operator watches; a store without them reports zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreFigures {
    pub sst_bytes: u64,
    pub block_cache_hit: u64,
    pub block_cache_miss: u64,
    pub write_stalled: bool,
    /// Space left to an unprivileged writer, and the size, of the file system the state is on.
    pub disk_available_bytes: u64,
    pub disk_total_bytes: u64,
}

/// Reading key-value state, split into [`Table`]s. Kept apart from [`StateStore`] so that a
/// read-only handle (the HTTP profile API's) can share a store its single writer owns.
pub trait StateRead {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The values of several keys of one table, in the order of `keys`; the same answers as
    /// [`StateRead::get`] for each. A store that can look keys up together (RocksDB's
    /// batched multi-get probes its filters and memtables for all of them in one pass)
    /// overrides it; most keys a batch reads are new and absent, and one lookup per key
    /// was a tenth of the engine's time.
    fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|key| self.get(table, key)).collect()
    }

    /// Every entry whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError>;

    /// Calls `visit` with every entry of `table`, in key order, and stops at its first
    /// error. Loading a whole table into memory ([`crate::blocking_index`]) uses it; a store
    /// that can iterate without collecting the table first (RocksDB) overrides it.
    fn for_each_entry(&self, table: Table, visit: &mut EntryVisitor<'_>) -> Result<(), StoreError> {
        for (key, value) in self.scan_prefix(table, b"")? {
            visit(&key, &value)?;
        }
        Ok(())
    }
}

/// What [`StateRead::for_each_entry`] calls with each key and value.
pub type EntryVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + 'a;

/// Durable key-value state, split into [`Table`]s.
///
/// Implementations must make [`StateStore::write_parts`] atomic: after a crash either every
/// operation of the write sets is visible or none is.
pub trait StateStore: StateRead {
    /// Writes several write sets as one, in order: a later operation on a key wins. It lets
    /// a caller add records made on another thread (see [`crate::ResolvedBatch`]) without
    /// copying the rest of a batch's write set.
    fn write_parts(&mut self, parts: &[&WriteSet]) -> Result<(), StoreError> {
        let ops: Vec<&WriteOp> = parts.iter().flat_map(|part| &part.ops).collect();
        self.write_ops(&ops)
    }

    /// Writes the operations as one atomic write, in order: a later operation on a key wins.
    /// A checkpoint picks the last operation per key out of several batches' write sets
    /// ([`crate::PendingWrites::checkpoint_ops`]) without copying them.
    fn write_ops(&mut self, ops: &[&WriteOp]) -> Result<(), StoreError>;

    fn write(&mut self, batch: &WriteSet) -> Result<(), StoreError> {
        self.write_parts(&[batch])
    }

    /// Size, cache and stall figures for metrics.
    fn figures(&self) -> StoreFigures {
        StoreFigures::default()
    }

    /// Lets the store drop the records of `table` ([`Table::Events`] or [`Table::Evidence`])
    /// whose event time is before `horizon_ms` ([`crate::duplicates`]). Give it only a
    /// horizon the store's own committed state yields ([`crate::Engine::expire_old_records`]),
    /// so that a crash cannot take the clock back behind what was dropped; then whether and
    /// when records go changes no resolution.
    fn expire_before(&mut self, _table: Table, _horizon_ms: i64) {}

    /// A second handle on the same store, for committing from another thread while this
    /// one goes on reading, if the store can have one. RocksDB's can: writes from two handles
    /// are each atomic and reads see every committed write. The in-memory store has none, and
    /// its callers write on their own thread.
    fn background_writer(&self) -> Option<Box<dyn SendStore>> {
        None
    }
}

/// A store that can move to another thread (see [`StateStore::background_writer`]).
pub trait SendStore: StateStore + Send {}

impl<S: StateStore + Send> SendStore for S {}

impl StateRead for Box<dyn SendStore> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(table, key)
    }

    fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        (**self).get_many(table, keys)
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        (**self).scan_prefix(table, prefix)
    }

    fn for_each_entry(&self, table: Table, visit: &mut EntryVisitor<'_>) -> Result<(), StoreError> {
        (**self).for_each_entry(table, visit)
    }
}

impl StateStore for Box<dyn SendStore> {
    fn write_ops(&mut self, ops: &[&WriteOp]) -> Result<(), StoreError> {
        (**self).write_ops(ops)
    }

    fn figures(&self) -> StoreFigures {
        (**self).figures()
    }

    fn expire_before(&mut self, table: Table, horizon_ms: i64) {
        (**self).expire_before(table, horizon_ms)
    }

    fn background_writer(&self) -> Option<Box<dyn SendStore>> {
        (**self).background_writer()
    }
}

/// A [`StateStore`] in memory, for tests and for runs that need no durability.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryStore {
    tables: BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        let mut store = MemoryStore::default();
        store.tables.entry(Table::Meta).or_default().insert(
            SCHEMA_VERSION_KEY.to_vec(),
            STATE_SCHEMA_VERSION.as_bytes().to_vec(),
        );
        store
    }

    /// Number of entries in a table; used by tests and statistics.
    pub fn table_len(&self, table: Table) -> usize {
        self.tables.get(&table).map_or(0, BTreeMap::len)
    }
}

impl StateRead for MemoryStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tables.get(&table).and_then(|t| t.get(key)).cloned())
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        let Some(entries) = self.tables.get(&table) else {
            return Ok(Vec::new());
        };
        Ok(entries
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl StateStore for MemoryStore {
    fn write_ops(&mut self, ops: &[&WriteOp]) -> Result<(), StoreError> {
        for op in ops {
            match op {
                WriteOp::Put { table, key, value } => {
                    self.tables
                        .entry(*table)
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                WriteOp::Delete { table, key } => {
                    if let Some(t) = self.tables.get_mut(table) {
                        t.remove(key);
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops expired records at once, so that tests see the store without them.
    fn expire_before(&mut self, table: Table, horizon_ms: i64) {
        if let Some(records) = self.tables.get_mut(&table) {
            records.retain(|_, value| {
                crate::duplicates::record_time_of(value).is_none_or(|time| time >= horizon_ms)
            });
        }
    }
}
