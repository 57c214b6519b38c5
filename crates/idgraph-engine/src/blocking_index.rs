//! The blocking index, whole, in memory (step 2 of `docs/design/hot-state.md`).
//!
//! Candidate search asks, for every event, which profiles are listed under a dozen blocking
//! keys, and most of those keys are new. Kept in the state cache like other records, each
//! question was a store read (59% of them for keys the store did not have) and a decode of a
//! list of id strings. Here every key the state holds is in one hash map from a 64-bit hash
//! of the key to its listing, and a listed profile is the 12 bytes its id is made of, so a
//! key the map lacks is known to be empty without asking the store.
//!
//! The [`Table::Blocks`] records stay what they were: the engine writes the changed listings
//! in each batch's write set, and the index is loaded from them once, when a state cache
//! first needs it ([`BlockingIndex::load`]). Nothing here does I/O beyond that read through
//! [`StateRead`].
//!
//! Two keys with the same 64-bit hash would share one listing. With xxh3 that takes about
//! 4 billion keys to become likely (the birthday bound); a state of 10M identifiers has some
//! 30M keys, a chance of one in 40,000 that any two collide, and the only effect of a
//! collision is a few more candidates scored for both keys, the same on every replay.

use std::mem::size_of;

use rustc_hash::FxHashMap;
use xxhash_rust::xxh3::xxh3_64;

use crate::state::{decode, memory, BlockRecord};
use crate::store::{StateRead, StoreError, Table};

/// A customer id (`cus_` and 24 lower-case hex digits, see [`crate::customer_id_for`]) as the
/// 12 bytes it spells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CustomerKey([u8; 12]);

const CUSTOMER_ID_PREFIX: &str = "cus_";

impl CustomerKey {
    /// The key of `id`, or `None` if `id` is not of the form the engine mints.
    pub(crate) fn parse(id: &str) -> Option<CustomerKey> {
        let digits = id.strip_prefix(CUSTOMER_ID_PREFIX)?.as_bytes();
        if digits.len() != 24 {
            return None;
        }
        let mut bytes = [0u8; 12];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
        }
        Some(CustomerKey(bytes))
    }

    /// The id this key was parsed from.
    pub(crate) fn to_id(self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut id = String::with_capacity(CUSTOMER_ID_PREFIX.len() + 24);
        id.push_str(CUSTOMER_ID_PREFIX);
        for byte in self.0 {
            id.push(DIGITS[usize::from(byte >> 4)] as char);
            id.push(DIGITS[usize::from(byte & 0xf)] as char);
        }
        id
    }
}

/// Lower-case only, so that [`CustomerKey::to_id`] gives back exactly the parsed id.
fn hex_digit(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

/// The profiles listed under one key. Most keys list one profile, which is held inline.
#[derive(Debug, Clone, PartialEq)]
enum Listing {
    One(CustomerKey),
    /// Boxed so that a listing takes 16 bytes, not 32: nearly every key lists one profile,
    /// and the map's slots are most of the index's memory.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<CustomerKey>>),
    /// More profiles than `fuzzy.max_block_size` were listed: the key yields none.
    Oversize,
}

impl Listing {
    fn heap_bytes(&self) -> usize {
        match self {
            Listing::Many(customers) => {
                memory::PER_ALLOCATION
                    + size_of::<Vec<CustomerKey>>()
                    + memory::vec(customers.capacity(), size_of::<CustomerKey>())
            }
            Listing::One(_) | Listing::Oversize => 0,
        }
    }
}

/// What a blocking key lists, as candidate search reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block<'a> {
    /// The profiles listed under the key, in the order they were listed (none for a key
    /// the index does not have).
    Listed(&'a [CustomerKey]),
    /// The key was too common and lists nobody.
    Oversize,
}

/// What [`BlockingIndex::list`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listed {
    /// The profile was added to the key's listing.
    Added,
    /// The listing was full: the key is oversize from now on.
    BecameOversize,
    /// The key was oversize already; nothing changed.
    AlreadyOversize,
}

/// Every blocking key of the state and the profiles it lists.
#[derive(Debug, Default)]
pub(crate) struct BlockingIndex {
    listings: FxHashMap<u64, Listing>,
    /// The heap bytes of the listings of more than one profile (see [`Listing::heap_bytes`]).
    heap_bytes: usize,
}

fn hash_of(key: &[u8]) -> u64 {
    xxh3_64(key)
}

impl BlockingIndex {
    /// The index of every blocking record `store` holds.
    pub(crate) fn load<S: StateRead + ?Sized>(store: &S) -> Result<BlockingIndex, StoreError> {
        let mut index = BlockingIndex::default();
        store.for_each_entry(Table::Blocks, &mut |key, value| {
            let record: BlockRecord = decode(Table::Blocks, key, value)?;
            let listing = if record.oversize {
                Listing::Oversize
            } else {
                let customers = record
                    .customers
                    .iter()
                    .map(|id| {
                        CustomerKey::parse(id).ok_or_else(|| not_a_customer_id(Table::Blocks, id))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                match customers.as_slice() {
                    [] => return Ok(()),
                    [one] => Listing::One(*one),
                    _ => Listing::Many(Box::new(customers)),
                }
            };
            index.insert(hash_of(key), listing);
            Ok(())
        })?;
        Ok(index)
    }

    fn insert(&mut self, hash: u64, listing: Listing) {
        self.heap_bytes += listing.heap_bytes();
        if let Some(old) = self.listings.insert(hash, listing) {
            self.heap_bytes -= old.heap_bytes();
        }
    }

    /// What `key` lists.
    pub(crate) fn get(&self, key: &str) -> Block<'_> {
        match self.listings.get(&hash_of(key.as_bytes())) {
            None => Block::Listed(&[]),
            Some(Listing::One(customer)) => Block::Listed(std::slice::from_ref(customer)),
            Some(Listing::Many(customers)) => Block::Listed(customers),
            Some(Listing::Oversize) => Block::Oversize,
        }
    }

    /// Lists `customer` under `key`, unless the key is oversize. A key that already lists
    /// `max_block_size` profiles becomes oversize instead: too common to narrow anything
    /// down, its listing is dropped to save space.
    pub(crate) fn list(
        &mut self,
        key: &str,
        customer: CustomerKey,
        max_block_size: usize,
    ) -> Listed {
        let hash = hash_of(key.as_bytes());
        let Some(listing) = self.listings.get_mut(&hash) else {
            if max_block_size == 0 {
                self.insert(hash, Listing::Oversize);
                return Listed::BecameOversize;
            }
            self.insert(hash, Listing::One(customer));
            return Listed::Added;
        };
        let before = listing.heap_bytes();
        let listed = match listing {
            Listing::Oversize => return Listed::AlreadyOversize,
            Listing::One(_) if max_block_size <= 1 => {
                *listing = Listing::Oversize;
                Listed::BecameOversize
            }
            Listing::One(first) => {
                *listing = Listing::Many(Box::new(vec![*first, customer]));
                Listed::Added
            }
            Listing::Many(customers) if customers.len() >= max_block_size => {
                *listing = Listing::Oversize;
                Listed::BecameOversize
            }
            Listing::Many(customers) => {
                customers.push(customer);
                Listed::Added
            }
        };
        self.heap_bytes = self.heap_bytes + listing.heap_bytes() - before;
        listed
    }

    /// The stored record of `key`, as [`Table::Blocks`] keeps it.
    pub(crate) fn record(&self, key: &str) -> BlockRecord {
        match self.get(key) {
            Block::Listed(customers) => BlockRecord {
                customers: customers.iter().map(|c| c.to_id()).collect(),
                oversize: false,
            },
            Block::Oversize => BlockRecord {
                customers: Vec::new(),
                oversize: true,
            },
        }
    }

    /// Number of keys that list someone or are oversize.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.listings.len()
    }

    /// About how many bytes of memory the index takes: its hash table's slots (with their
    /// control bytes) and the listings of more than one profile.
    pub(crate) fn estimated_bytes(&self) -> usize {
        self.listings.capacity() * (size_of::<(u64, Listing)>() + 1) + self.heap_bytes
    }
}

/// The error for a listed id the engine could not have minted.
pub(crate) fn not_a_customer_id(table: Table, id: &str) -> StoreError {
    StoreError::Corrupt {
        table: table.name(),
        key: id.to_owned(),
        reason: "not a customer id of the form cus_ and 24 lower-case hex digits".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::encode;
    use crate::store::{MemoryStore, StateStore, WriteSet};

    fn customer(n: u8) -> CustomerKey {
        CustomerKey::parse(&format!("cus_{:024x}", n)).unwrap()
    }

    #[test]
    fn a_customer_id_round_trips_through_its_key() {
        let id = crate::customer_id_for("web", "web-000123");
        assert_eq!(CustomerKey::parse(&id).unwrap().to_id(), id);
        for odd in [
            "cus_",
            "cus_9D10619B425C5C82BE3C36B0",
            "cus_9d10619b425c5c82be3c36b",
            "cus_9d10619b425c5c82be3c36b00",
            "usr_9d10619b425c5c82be3c36b0",
            "cus_9d10619b425c5c82be3c36bg",
        ] {
            assert_eq!(CustomerKey::parse(odd), None, "{odd}");
        }
    }

    #[test]
    fn a_key_lists_profiles_in_order_until_it_is_full() {
        let mut index = BlockingIndex::default();
        assert_eq!(index.get("nn:jane doe"), Block::Listed(&[]));
        assert_eq!(index.list("nn:jane doe", customer(1), 3), Listed::Added);
        assert_eq!(index.list("nn:jane doe", customer(2), 3), Listed::Added);
        assert_eq!(index.list("nn:jane doe", customer(3), 3), Listed::Added);
        assert_eq!(
            index.get("nn:jane doe"),
            Block::Listed(&[customer(1), customer(2), customer(3)])
        );
        assert_eq!(index.get("nn:john doe"), Block::Listed(&[]));
        assert_eq!(
            index.list("nn:jane doe", customer(4), 3),
            Listed::BecameOversize
        );
        assert_eq!(index.get("nn:jane doe"), Block::Oversize);
        assert_eq!(
            index.list("nn:jane doe", customer(5), 3),
            Listed::AlreadyOversize
        );
        assert_eq!(index.len(), 1);
        assert_eq!(index.heap_bytes, 0, "an oversize key holds no list");
    }

    #[test]
    fn a_block_size_of_one_or_zero_holds_at_most_that_many() {
        let mut index = BlockingIndex::default();
        assert_eq!(index.list("k", customer(1), 1), Listed::Added);
        assert_eq!(index.list("k", customer(2), 1), Listed::BecameOversize);
        assert_eq!(index.list("z", customer(1), 0), Listed::BecameOversize);
        assert_eq!(index.get("z"), Block::Oversize);
    }

    #[test]
    fn the_index_loads_what_its_records_stored() {
        let mut index = BlockingIndex::default();
        for (key, n) in [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("c", 5), ("c", 6)] {
            index.list(key, customer(n), 2);
        }
        let mut writes = WriteSet::default();
        for key in ["a", "b", "c"] {
            writes.put(Table::Blocks, key, encode(&index.record(key)));
        }
        writes.put(Table::Blocks, "empty", encode(&BlockRecord::default()));
        let mut store = MemoryStore::new();
        store.write(&writes).unwrap();
        let loaded = BlockingIndex::load(&store).unwrap();
        for key in ["a", "b", "c", "empty", "absent"] {
            assert_eq!(loaded.get(key), index.get(key), "{key}");
        }
        assert_eq!(loaded.len(), 3, "an empty record is not kept");
        assert!(loaded.estimated_bytes() > 0);
    }

    #[test]
    fn a_record_listing_an_id_the_engine_cannot_mint_is_corrupt() {
        let record = BlockRecord {
            customers: vec!["someone".into()],
            oversize: false,
        };
        let mut writes = WriteSet::default();
        writes.put(Table::Blocks, "nn:x", encode(&record));
        let mut store = MemoryStore::new();
        store.write(&writes).unwrap();
        let error = BlockingIndex::load(&store).unwrap_err().to_string();
        assert!(error.contains("someone"), "{error}");
    }
}
