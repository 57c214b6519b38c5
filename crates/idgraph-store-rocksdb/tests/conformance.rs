//! The shared store conformance suite on a real RocksDB directory, plus what only a durable
//! store can promise: reopening restores everything, a foreign schema version is refused and
//! an older one this build reads is upgraded.

use idgraph_engine::store::{
    SCHEMA_VERSION_KEY, STATE_SCHEMA_VERSION, UPGRADABLE_STATE_SCHEMA_VERSIONS,
};
use idgraph_engine::{conformance, StateRead, StateStore, StoreError, Table, WriteSet};
use idgraph_store_rocksdb::{Compression, RocksStore, StorageConfig};

fn config() -> StorageConfig {
    StorageConfig {
        block_cache_mb: 8,
        bloom_bits_per_key: 10.0,
        sync_writes: false,
        compression: Compression::Lz4,
        max_wal_mb: 64,
        l0_compaction_trigger: 8,
        write_buffer_mb: 64,
    }
}

#[test]
fn rocksdb_store_passes_the_conformance_suite() {
    let dirs = std::cell::RefCell::new(Vec::new());
    conformance::run_all(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &config()).unwrap();
        dirs.borrow_mut().push(dir);
        store
    });
}

#[test]
fn reopening_a_directory_restores_every_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut batch = WriteSet::default();
    for table in Table::ALL {
        batch.put(table, format!("key-{}", table.name()), "value");
    }
    {
        let mut store = RocksStore::open(dir.path(), &config()).unwrap();
        store.write(&batch).unwrap();
    }
    let store = RocksStore::open(dir.path(), &config()).unwrap();
    for table in Table::ALL {
        let key = format!("key-{}", table.name());
        assert_eq!(
            store.get(table, key.as_bytes()).unwrap(),
            Some(b"value".to_vec()),
            "{}",
            table.name()
        );
    }
}

#[test]
fn a_foreign_schema_version_is_refused_with_both_versions_named() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = RocksStore::open(dir.path(), &config()).unwrap();
        let mut batch = WriteSet::default();
        batch.put(Table::Meta, SCHEMA_VERSION_KEY, "999");
        store.write(&batch).unwrap();
    }
    let error = RocksStore::open(dir.path(), &config()).unwrap_err();
    assert!(matches!(error, StoreError::SchemaMismatch { .. }));
    assert!(error.to_string().contains("\"999\""), "{error}");
}

#[test]
fn state_of_the_previous_schema_version_is_upgraded_and_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = RocksStore::open(dir.path(), &config()).unwrap();
        let mut batch = WriteSet::default();
        batch.put(
            Table::Meta,
            SCHEMA_VERSION_KEY,
            UPGRADABLE_STATE_SCHEMA_VERSIONS[0],
        );
        batch.put(Table::Customers, "cus_1", "an old record");
        store.write(&batch).unwrap();
    }
    let store = RocksStore::open(dir.path(), &config()).unwrap();
    assert_eq!(
        store.get(Table::Meta, SCHEMA_VERSION_KEY).unwrap(),
        Some(STATE_SCHEMA_VERSION.as_bytes().to_vec())
    );
    assert_eq!(
        store.get(Table::Customers, b"cus_1").unwrap(),
        Some(b"an old record".to_vec())
    );
}

#[test]
fn stats_report_size_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RocksStore::open(dir.path(), &config()).unwrap();
    let mut batch = WriteSet::default();
    for i in 0..1000 {
        batch.put(
            Table::Nodes,
            format!("email\0user{i}@example.com"),
            vec![b'x'; 100],
        );
    }
    store.write(&batch).unwrap();
    store.flush().unwrap();
    assert!(store.stats().sst_files_bytes > 0);
}

#[test]
fn a_reader_on_another_thread_sees_each_write_whole_once_committed() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RocksStore::open(dir.path(), &config()).unwrap();
    let reader = store.reader();
    assert_eq!(reader.get(Table::Customers, b"cus_1").unwrap(), None);
    let mut batch = WriteSet::default();
    batch.put(Table::Customers, "cus_1", "live");
    batch.put(Table::Evidence, "cus_1\0a", "one");
    batch.put(Table::Evidence, "cus_1\0b", "two");
    store.write(&batch).unwrap();
    let seen = std::thread::spawn(move || {
        (
            reader.get(Table::Customers, b"cus_1").unwrap(),
            reader
                .scan_prefix(Table::Evidence, b"cus_1\0")
                .unwrap()
                .len(),
        )
    })
    .join()
    .unwrap();
    assert_eq!(seen, (Some(b"live".to_vec()), 2));
}

#[test]
fn compaction_drops_event_and_evidence_records_past_their_horizons_and_keeps_the_rest() {
    use idgraph_engine::duplicates::{timed, EventRecord};
    let dir = tempfile::tempdir().unwrap();
    let mut store = RocksStore::open(dir.path(), &config()).unwrap();
    let mut batch = WriteSet::default();
    batch.put(
        Table::Events,
        "web\0old",
        EventRecord::encode(1_000, "cus_a"),
    );
    batch.put(
        Table::Events,
        "web\0new",
        EventRecord::encode(5_000, "cus_b"),
    );
    batch.put(Table::Events, "web\0legacy", "cus_c");
    batch.put(Table::Evidence, "cus_a\0old", timed(1_000, b"x"));
    batch.put(Table::Evidence, "cus_a\0new", timed(9_000, b"y"));
    store.write(&batch).unwrap();
    store.expire_before(Table::Events, 2_000);
    store.expire_before(Table::Events, 0);
    store.expire_before(Table::Evidence, 5_000);
    store.compact().unwrap();
    assert_eq!(store.get(Table::Events, b"web\0old").unwrap(), None);
    assert!(store.get(Table::Events, b"web\0new").unwrap().is_some());
    assert!(store.get(Table::Events, b"web\0legacy").unwrap().is_some());
    assert_eq!(store.get(Table::Evidence, b"cus_a\0old").unwrap(), None);
    assert!(store.get(Table::Evidence, b"cus_a\0new").unwrap().is_some());
}
