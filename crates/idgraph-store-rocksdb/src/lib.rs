//! The RocksDB implementation of idgraph's [`StateStore`]: one column family per
//! [`Table`], bloom filters on the point-lookup tables, one shared LRU block cache sized from
//! config, and one atomic `WriteBatch` per engine batch (which also carries the input
//! positions, so state and position never disagree after a crash).
//!
//! This is the only crate that links RocksDB. It knows nothing about identities: it stores
//! bytes under keys and checks the state schema version when it opens a directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use idgraph_engine::duplicates::record_time_of;
use idgraph_engine::store::SendStore;
use idgraph_engine::store::{
    Entries, EntryVisitor, SCHEMA_VERSION_KEY, STATE_SCHEMA_VERSION,
    UPGRADABLE_STATE_SCHEMA_VERSIONS,
};
use idgraph_engine::{StateRead, StateStore, StoreError, StoreFigures, Table, WriteOp, WriteSet};
use rocksdb::{
    compaction_filter::Decision, BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor,
    DBCompressionType, Direction, ErrorKind, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

/// The `[storage]` table of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub block_cache_mb: usize,
    pub bloom_bits_per_key: f64,
    pub sync_writes: bool,
    pub compression: Compression,
    /// Write-ahead log size (MiB) at which RocksDB flushes memtables; bounds how much log a
    /// restart after a crash must replay.
    pub max_wal_mb: u64,
    /// Level-0 files that start a compaction into the next level.
    pub l0_compaction_trigger: u32,
    /// Memory (MiB) all tables' memtables may hold together before the largest is flushed.
    pub write_buffer_mb: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Lz4,
}

/// Figures an operator watches: size on disk, cache effectiveness, stalls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageStats {
    pub live_data_bytes: u64,
    pub sst_files_bytes: u64,
    pub block_cache_usage_bytes: u64,
    pub block_cache_hit: u64,
    pub block_cache_miss: u64,
    pub write_stalled: bool,
}

/// A state directory opened with RocksDB.
pub struct RocksStore {
    /// Shared with [`RocksReader`]s, and with the stores made by
    /// [`StateStore::background_writer`], which write too.
    db: Arc<DB>,
    path: PathBuf,
    write_options: WriteOptions,
    sync_writes: bool,
    cache: Cache,
    /// Event and evidence records older than these (ms of event time) are dropped in
    /// compaction; shared with the two tables' compaction filters.
    events_horizon: Arc<AtomicI64>,
    evidence_horizon: Arc<AtomicI64>,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .finish()
    }
}

fn convert(error: rocksdb::Error) -> StoreError {
    match error.kind() {
        ErrorKind::Busy | ErrorKind::TimedOut | ErrorKind::TryAgain | ErrorKind::Incomplete => {
            StoreError::Transient(error.to_string())
        }
        _ => StoreError::Fatal(error.to_string()),
    }
}

impl RocksStore {
    /// Opens (or creates) the state in `path`, checking its schema version.
    pub fn open(path: &Path, config: &StorageConfig) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(config.block_cache_mb.max(1) * 1024 * 1024);
        let events_horizon = Arc::new(AtomicI64::new(i64::MIN));
        let evidence_horizon = Arc::new(AtomicI64::new(i64::MIN));
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.enable_statistics();
        db_options.set_max_total_wal_size(config.max_wal_mb.max(1) * 1024 * 1024);
        // Each table's memtable may grow to 64 MiB, twice over while one flushes; with seven
        // tables that alone could pass a gigabyte. One budget for all of them bounds it.
        db_options.set_db_write_buffer_size(config.write_buffer_mb.max(1) * 1024 * 1024);
        let descriptors = Table::ALL
            .iter()
            .map(|table| {
                let mut options = table_options(*table, config, &cache);
                match table {
                    Table::Events => expire_in_compaction(&mut options, &events_horizon),
                    Table::Evidence => expire_in_compaction(&mut options, &evidence_horizon),
                    _ => {}
                }
                ColumnFamilyDescriptor::new(table.name(), options)
            })
            .collect::<Vec<_>>();
        let db = DB::open_cf_descriptors(&db_options, path, descriptors).map_err(|e| {
            StoreError::Fatal(format!(
                "cannot open state directory {}: {e}",
                path.display()
            ))
        })?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(config.sync_writes);
        let mut store = RocksStore {
            db: Arc::new(db),
            path: path.to_owned(),
            write_options,
            sync_writes: config.sync_writes,
            cache,
            events_horizon,
            evidence_horizon,
        };
        store.check_schema_version()?;
        Ok(store)
    }

    /// Accepts state of the current schema version, upgrades the marker of an older version
    /// this build still reads, and refuses anything else.
    fn check_schema_version(&mut self) -> Result<(), StoreError> {
        match self.get(Table::Meta, SCHEMA_VERSION_KEY)? {
            Some(found) if found == STATE_SCHEMA_VERSION.as_bytes() => Ok(()),
            Some(found)
                if UPGRADABLE_STATE_SCHEMA_VERSIONS
                    .iter()
                    .any(|old| found == old.as_bytes()) =>
            {
                tracing::info!(
                    from = %String::from_utf8_lossy(&found),
                    to = STATE_SCHEMA_VERSION,
                    "upgrading the state's schema version; old records are rewritten as they change"
                );
                self.record_schema_version()
            }
            Some(found) => Err(StoreError::SchemaMismatch {
                found: String::from_utf8_lossy(&found).into_owned(),
                expected: STATE_SCHEMA_VERSION.to_owned(),
            }),
            None => self.record_schema_version(),
        }
    }

    fn record_schema_version(&mut self) -> Result<(), StoreError> {
        let mut batch = WriteSet::default();
        batch.put(Table::Meta, SCHEMA_VERSION_KEY, STATE_SCHEMA_VERSION);
        self.write(&batch)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn handle(&self, table: Table) -> &ColumnFamily {
        handle(&self.db, table)
    }

    /// A read-only handle on the same database, for readers on other threads (the HTTP
    /// profile API). It sees every write once it is committed, and never a part of one.
    pub fn reader(&self) -> RocksReader {
        RocksReader {
            db: Arc::clone(&self.db),
        }
    }

    /// Size, cache and stall figures from RocksDB's properties.
    pub fn stats(&self) -> StorageStats {
        StorageStats {
            block_cache_usage_bytes: self.cache.get_usage() as u64,
            ..storage_stats(&self.db)
        }
    }

    /// Flushes memtables and compacts every table fully, which also drops expired event and
    /// evidence records at once (RocksDB otherwise does both in the background as data grows).
    pub fn compact(&self) -> Result<(), StoreError> {
        self.flush()?;
        for table in Table::ALL {
            self.db
                .compact_range_cf(self.handle(table), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Flushes memtables to disk; used before measuring size.
    pub fn flush(&self) -> Result<(), StoreError> {
        for table in Table::ALL {
            self.db.flush_cf(self.handle(table)).map_err(convert)?;
        }
        Ok(())
    }
}

/// Reads one ticker count from the statistics dump (`name COUNT : 123`).
fn ticker(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(" COUNT"))
        .and_then(|line| line.rsplit(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Drops records whose event time is before `horizon` when compaction rewrites them (records
/// without a time, from older versions, stay). The engine moves a horizon only forward and
/// only from committed state, so a dropped record could never have mattered.
fn expire_in_compaction(options: &mut Options, horizon: &Arc<AtomicI64>) {
    let horizon = Arc::clone(horizon);
    options.set_compaction_filter(
        "idgraph_expire_by_event_time",
        move |_level: u32, _key: &[u8], value: &[u8]| match record_time_of(value) {
            Some(time) if time < horizon.load(Ordering::Relaxed) => Decision::Remove,
            _ => Decision::Keep,
        },
    );
}

fn table_options(table: Table, config: &StorageConfig, cache: &Cache) -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_block_cache(cache);
    block.set_cache_index_and_filter_blocks(true);
    // Point lookups dominate every table except evidence, which is read by prefix scans.
    if table != Table::Evidence {
        block.set_bloom_filter(config.bloom_bits_per_key, false);
    }
    let mut options = Options::default();
    options.set_block_based_table_factory(&block);
    // Each compaction out of level 0 rewrites the overlapping part of the next level, which
    // for profiles (random keys) is all of it; merging more flushed files at once rewrites
    // it less often. Reads check every level-0 file's bloom filter, so this trades a little
    // read work on cache misses for less background CPU and disk writing.
    options.set_level_zero_file_num_compaction_trigger(config.l0_compaction_trigger as i32);
    options.set_compression_type(match config.compression {
        Compression::None => DBCompressionType::None,
        Compression::Lz4 => DBCompressionType::Lz4,
    });
    if table == Table::Nodes || table == Table::Events {
        options.optimize_for_point_lookup(config.block_cache_mb.max(1) as u64);
        // optimize_for_point_lookup installs its own table factory; put the shared cache back.
        options.set_block_based_table_factory(&block);
    }
    if table != Table::Evidence {
        // Most lookups are for keys that do not exist yet (a new identifier, a new event id);
        // a bloom filter over the memtable's whole keys answers those without searching it.
        options.set_memtable_prefix_bloom_ratio(0.02);
        options.set_memtable_whole_key_filtering(true);
    }
    options
}

/// A read-only view of a [`RocksStore`]'s database that can move to another thread.
#[derive(Clone)]
pub struct RocksReader {
    db: Arc<DB>,
}

impl std::fmt::Debug for RocksReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksReader")
            .field("path", &self.db.path())
            .finish()
    }
}

/// Size and stall figures from RocksDB's properties (all but the block cache's usage).
fn storage_stats(db: &DB) -> StorageStats {
    let mut stats = StorageStats::default();
    for table in Table::ALL {
        let cf = handle(db, table);
        let int = |name: &str| {
            db.property_int_value_cf(cf, name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        stats.live_data_bytes += int("rocksdb.estimate-live-data-size");
        stats.sst_files_bytes += int("rocksdb.total-sst-files-size");
        stats.write_stalled |=
            int("rocksdb.actual-delayed-write-rate") > 0 || int("rocksdb.is-write-stopped") > 0;
    }
    if let Ok(Some(text)) = db.property_value("rocksdb.stats") {
        stats.block_cache_hit = ticker(&text, "rocksdb.block.cache.hit");
        stats.block_cache_miss = ticker(&text, "rocksdb.block.cache.miss");
    }
    stats
}

/// The figures an operator watches, for either handle on the database.
fn store_figures(db: &DB) -> StoreFigures {
    let stats = storage_stats(db);
    let (disk_available_bytes, disk_total_bytes) = disk_space(db.path()).unwrap_or((0, 0));
    StoreFigures {
        sst_bytes: stats.sst_files_bytes,
        block_cache_hit: stats.block_cache_hit,
        block_cache_miss: stats.block_cache_miss,
        write_stalled: stats.write_stalled,
        disk_available_bytes,
        disk_total_bytes,
    }
}

/// Bytes available to an unprivileged writer and the size of the file system holding
/// `path`, from `statvfs`.
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some((stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize))
}

fn handle(db: &DB, table: Table) -> &ColumnFamily {
    db.cf_handle(table.name())
        .expect("every table's column family is created at open")
}

fn get(db: &DB, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    db.get_cf(handle(db, table), key).map_err(convert)
}

fn get_many(db: &DB, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    // RocksDB sorts the keys unless told they are sorted already, with a comparator call
    // per comparison; callers that read many keys sort them more cheaply themselves.
    let sorted = keys.is_sorted();
    db.batched_multi_get_cf(handle(db, table), keys.iter().copied(), sorted)
        .into_iter()
        .map(|result| {
            result
                .map(|value| value.map(|slice| slice.to_vec()))
                .map_err(convert)
        })
        .collect()
}

fn scan_prefix(db: &DB, table: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
    let mut out = Vec::new();
    for item in db.iterator_cf(
        handle(db, table),
        IteratorMode::From(prefix, Direction::Forward),
    ) {
        let (key, value) = item.map_err(convert)?;
        if !key.starts_with(prefix) {
            break;
        }
        out.push((key.into_vec(), value.into_vec()));
    }
    Ok(out)
}

/// Every entry of `table`, in key order, without collecting them.
fn for_each_entry(db: &DB, table: Table, visit: &mut EntryVisitor<'_>) -> Result<(), StoreError> {
    for item in db.iterator_cf(handle(db, table), IteratorMode::Start) {
        let (key, value) = item.map_err(convert)?;
        visit(&key, &value)?;
    }
    Ok(())
}

impl RocksReader {
    /// The same figures as the store's [`StateStore::figures`], from another thread.
    pub fn figures(&self) -> StoreFigures {
        store_figures(&self.db)
    }
}

impl StateRead for RocksReader {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        get(&self.db, table, key)
    }

    fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        get_many(&self.db, table, keys)
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        scan_prefix(&self.db, table, prefix)
    }

    fn for_each_entry(&self, table: Table, visit: &mut EntryVisitor<'_>) -> Result<(), StoreError> {
        for_each_entry(&self.db, table, visit)
    }
}

impl StateRead for RocksStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        get(&self.db, table, key)
    }

    fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        get_many(&self.db, table, keys)
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, StoreError> {
        scan_prefix(&self.db, table, prefix)
    }

    fn for_each_entry(&self, table: Table, visit: &mut EntryVisitor<'_>) -> Result<(), StoreError> {
        for_each_entry(&self.db, table, visit)
    }
}

impl StateStore for RocksStore {
    fn write_ops(&mut self, ops: &[&WriteOp]) -> Result<(), StoreError> {
        // RocksDB keeps a batch in one buffer; sized for every key and value up front (plus
        // a few bytes of framing per operation) it is not copied again as it grows.
        let bytes: usize = ops
            .iter()
            .map(|op| match op {
                WriteOp::Put { key, value, .. } => key.len() + value.len() + 16,
                WriteOp::Delete { key, .. } => key.len() + 16,
            })
            .sum();
        let mut write_batch = WriteBatch::with_capacity_bytes(bytes + 12);
        for op in ops {
            match op {
                WriteOp::Put { table, key, value } => {
                    write_batch.put_cf(self.handle(*table), key, value)
                }
                WriteOp::Delete { table, key } => write_batch.delete_cf(self.handle(*table), key),
            }
        }
        self.db
            .write_opt(write_batch, &self.write_options)
            .map_err(convert)
    }

    fn expire_before(&mut self, table: Table, horizon_ms: i64) {
        let horizon = match table {
            Table::Events => &self.events_horizon,
            Table::Evidence => &self.evidence_horizon,
            _ => return,
        };
        horizon.fetch_max(horizon_ms, Ordering::Relaxed);
    }

    fn figures(&self) -> StoreFigures {
        store_figures(&self.db)
    }

    /// Another `RocksStore` on the same database, block cache and expiry horizons.
    fn background_writer(&self) -> Option<Box<dyn SendStore>> {
        let mut write_options = WriteOptions::default();
        write_options.set_sync(self.sync_writes);
        Some(Box::new(RocksStore {
            db: Arc::clone(&self.db),
            path: self.path.clone(),
            write_options,
            sync_writes: self.sync_writes,
            cache: self.cache.clone(),
            events_horizon: Arc::clone(&self.events_horizon),
            evidence_horizon: Arc::clone(&self.evidence_horizon),
        }))
    }
}
