//! The conformance suite every [`StateStore`] implementation must pass.
//!
//! Each check panics with a message naming the broken promise. `idgraph-engine` runs it on
//! [`crate::MemoryStore`]; `idgraph-store-rocksdb` runs it on a real RocksDB directory.

use crate::store::{StateStore, Table, WriteSet, SCHEMA_VERSION_KEY, STATE_SCHEMA_VERSION};

/// Runs every check on fresh stores made by `fresh`.
pub fn run_all<S: StateStore>(mut fresh: impl FnMut() -> S) {
    reads_back_what_was_written(&mut fresh());
    many_keys_read_like_one_at_a_time(&mut fresh());
    tables_are_separate(&mut fresh());
    later_writes_in_a_batch_win(&mut fresh());
    parts_are_written_as_one_in_order(&mut fresh());
    deletes_remove_keys(&mut fresh());
    prefix_scans_are_ordered_and_bounded(&mut fresh());
    binary_keys_and_values_survive(&mut fresh());
    new_store_records_its_schema_version(&fresh());
    expiring_records_keeps_what_the_window_holds(&mut fresh());
}

/// A store may drop event and evidence records before their horizon, whenever it likes; it
/// must keep the rest, records without an event time among them, and leave other tables
/// alone.
pub fn expiring_records_keeps_what_the_window_holds<S: StateStore>(store: &mut S) {
    use crate::duplicates::EventRecord;
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
    batch.put(Table::Nodes, "web\0old", EventRecord::encode(1_000, "x"));
    store.write(&batch).expect("write succeeds");
    store.expire_before(Table::Events, 2_000);
    // A lower horizon later never brings a record back or drops less.
    store.expire_before(Table::Events, 0);
    // Another table's horizon leaves the events alone.
    store.expire_before(Table::Evidence, i64::MAX);
    for kept in ["web\0new", "web\0legacy"] {
        assert!(
            store.get(Table::Events, kept.as_bytes()).unwrap().is_some(),
            "{kept}"
        );
    }
    assert!(store.get(Table::Nodes, b"web\0old").unwrap().is_some());
}

pub fn reads_back_what_was_written<S: StateStore>(store: &mut S) {
    let mut batch = WriteSet::default();
    batch.put(Table::Nodes, "email\0a@b.co", "root");
    batch.put(Table::Positions, "file:in.jsonl", "42");
    store.write(&batch).expect("write succeeds");
    assert_eq!(
        store.get(Table::Nodes, b"email\0a@b.co").unwrap(),
        Some(b"root".to_vec())
    );
    assert_eq!(
        store.get(Table::Positions, b"file:in.jsonl").unwrap(),
        Some(b"42".to_vec())
    );
    assert_eq!(
        store.get(Table::Nodes, b"missing").unwrap(),
        None,
        "absent keys read as None"
    );
}

pub fn many_keys_read_like_one_at_a_time<S: StateStore>(store: &mut S) {
    let mut batch = WriteSet::default();
    batch.put(Table::Nodes, "email\0a@b.co", "a");
    batch.put(Table::Nodes, "phone\0+14155550100", "p");
    batch.put(Table::Events, "web\0e1", "c1");
    store.write(&batch).expect("write succeeds");
    // Unsorted, with an absent key, a repeated key and a key of another table.
    let keys: [&[u8]; 5] = [
        b"phone\0+14155550100",
        b"missing",
        b"email\0a@b.co",
        b"web\0e1",
        b"phone\0+14155550100",
    ];
    let one_at_a_time: Vec<_> = keys
        .iter()
        .map(|key| store.get(Table::Nodes, key).unwrap())
        .collect();
    assert_eq!(
        store.get_many(Table::Nodes, &keys).unwrap(),
        one_at_a_time,
        "get_many answers each key as get does, in the order asked"
    );
    assert_eq!(
        one_at_a_time,
        [
            Some(b"p".to_vec()),
            None,
            Some(b"a".to_vec()),
            None,
            Some(b"p".to_vec())
        ]
    );
    // Already in byte order (a store may take a faster path for that).
    let sorted: [&[u8]; 3] = [b"email\0a@b.co", b"missing", b"phone\0+14155550100"];
    assert_eq!(
        store.get_many(Table::Nodes, &sorted).unwrap(),
        [Some(b"a".to_vec()), None, Some(b"p".to_vec())]
    );
    assert!(store.get_many(Table::Events, &[]).unwrap().is_empty());
}

pub fn tables_are_separate<S: StateStore>(store: &mut S) {
    let mut batch = WriteSet::default();
    batch.put(Table::Customers, "k", "customer");
    batch.put(Table::Blocks, "k", "block");
    store.write(&batch).unwrap();
    assert_eq!(
        store.get(Table::Customers, b"k").unwrap(),
        Some(b"customer".to_vec())
    );
    assert_eq!(
        store.get(Table::Blocks, b"k").unwrap(),
        Some(b"block".to_vec())
    );
    assert_eq!(
        store.get(Table::Events, b"k").unwrap(),
        None,
        "a key in one table is not in another"
    );
}

pub fn later_writes_in_a_batch_win<S: StateStore>(store: &mut S) {
    let mut batch = WriteSet::default();
    batch.put(Table::Nodes, "k", "first");
    // Other keys in between, before and after "k" in key order: a store may reorder the
    // operations of a batch, but never those on one key.
    batch.put(Table::Nodes, "z", "z");
    batch.put(Table::Nodes, "a", "a");
    batch.put(Table::Nodes, "k", "second");
    batch.delete(Table::Nodes, "gone");
    batch.put(Table::Nodes, "gone", "back");
    batch.put(Table::Nodes, "dropped", "briefly");
    batch.delete(Table::Nodes, "dropped");
    store.write(&batch).unwrap();
    assert_eq!(store.get(Table::Nodes, b"dropped").unwrap(), None);
    assert_eq!(
        store.get(Table::Nodes, b"k").unwrap(),
        Some(b"second".to_vec())
    );
    assert_eq!(
        store.get(Table::Nodes, b"gone").unwrap(),
        Some(b"back".to_vec())
    );
}

pub fn parts_are_written_as_one_in_order<S: StateStore>(store: &mut S) {
    let mut first = WriteSet::default();
    first.put(Table::Nodes, "k", "first part");
    first.put(Table::Nodes, "only-first", "1");
    first.put(Table::Positions, "file:in.jsonl", "7");
    let mut second = WriteSet::default();
    second.put(Table::Nodes, "k", "second part");
    second.delete(Table::Nodes, "only-first");
    second.put(Table::Customers, "c1", "profile");
    store.write_parts(&[&first, &second]).unwrap();
    assert_eq!(
        store.get(Table::Nodes, b"k").unwrap(),
        Some(b"second part".to_vec()),
        "a later part wins on a key, as a later operation in one write set does"
    );
    assert_eq!(store.get(Table::Nodes, b"only-first").unwrap(), None);
    assert_eq!(
        store.get(Table::Positions, b"file:in.jsonl").unwrap(),
        Some(b"7".to_vec())
    );
    assert_eq!(
        store.get(Table::Customers, b"c1").unwrap(),
        Some(b"profile".to_vec())
    );
    store.write_parts(&[]).unwrap();
}

pub fn deletes_remove_keys<S: StateStore>(store: &mut S) {
    let mut batch = WriteSet::default();
    batch.put(Table::Customers, "c1", "profile");
    store.write(&batch).unwrap();
    let mut batch = WriteSet::default();
    batch.delete(Table::Customers, "c1");
    batch.delete(Table::Customers, "never-written");
    store.write(&batch).unwrap();
    assert_eq!(store.get(Table::Customers, b"c1").unwrap(), None);
}

pub fn prefix_scans_are_ordered_and_bounded<S: StateStore>(store: &mut S) {
    let mut batch = WriteSet::default();
    for key in ["c2\0b", "c1\0b", "c1\0a", "c10\0a", "c0"] {
        batch.put(Table::Evidence, key, key);
    }
    store.write(&batch).unwrap();
    let keys: Vec<Vec<u8>> = store
        .scan_prefix(Table::Evidence, b"c1\0")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        vec![b"c1\0a".to_vec(), b"c1\0b".to_vec()],
        "scan returns the prefix only, in order"
    );
    assert!(store
        .scan_prefix(Table::Evidence, b"zz")
        .unwrap()
        .is_empty());
}

pub fn binary_keys_and_values_survive<S: StateStore>(store: &mut S) {
    let key = vec![0u8, 255, 1, 0];
    let value: Vec<u8> = (0..=255u8).collect();
    let mut batch = WriteSet::default();
    batch.put(Table::Evidence, key.clone(), value.clone());
    store.write(&batch).unwrap();
    assert_eq!(store.get(Table::Evidence, &key).unwrap(), Some(value));
}

pub fn new_store_records_its_schema_version<S: StateStore>(store: &S) {
    assert_eq!(
        store.get(Table::Meta, SCHEMA_VERSION_KEY).unwrap(),
        Some(STATE_SCHEMA_VERSION.as_bytes().to_vec()),
        "a new store records the schema version it was written with"
    );
}
