//! Typed records kept in the [`StateStore`](crate::StateStore) tables, and their encoding.

use std::sync::Arc;

use idgraph_model::packed::{pack_profile, unpack_profile, PackReader, PackWriter, PackedError};
use idgraph_model::{CompactString, Identifier, LinkRule, Profile, SortedMap};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{StoreError, Table};

/// A union-find node for one identifier value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The parent node key; `None` for a root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Set on roots only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<RootInfo>,
    /// A generic value no longer links anything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub generic: bool,
    /// Other profiles this value was seen with through refused or suspicious merges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
}

/// A model of what decoded records cost in memory, for the state cache's budget. It need
/// not be exact, only proportional: `engine.cache.max_mb` is checked against it, and the
/// constants were set so that the estimate of a full cache came within a few percent of the
/// heap it held (measured with heaptrack on 120k generated lines, cache on and off).
pub mod memory {
    use std::mem::size_of;

    /// The allocator's header and rounding up to a size class, per allocation, on average.
    pub const PER_ALLOCATION: usize = 32;

    /// The `Arc` of the cached state and the `Arc` of its profile, with their structs.
    pub const ARC_AND_STRUCTS: usize = 2 * (PER_ALLOCATION + 16)
        + size_of::<super::ProfileState>()
        + size_of::<idgraph_model::Profile>();

    /// A heap string of `len` bytes.
    pub fn string(len: usize) -> usize {
        if len == 0 {
            0
        } else {
            PER_ALLOCATION + len
        }
    }

    /// A vector of `len` elements of `element` bytes; vectors grow by doubling, so on average
    /// they have a third more room than elements.
    pub fn vec(len: usize, element: usize) -> usize {
        if len == 0 {
            0
        } else {
            PER_ALLOCATION + len * element * 4 / 3
        }
    }

    /// A vector of strings, and the strings.
    pub fn strings(strings: &[String]) -> usize {
        vec(strings.len(), size_of::<String>())
            + strings.iter().map(|s| string(s.len())).sum::<usize>()
    }

    /// A hash table's slot for a `String` key and a `V`, at a typical load of two thirds,
    /// with its control byte.
    pub fn hash_slot<V>() -> usize {
        (size_of::<String>() + size_of::<V>()) * 3 / 2 + 1
    }
}

/// What a root node knows about its whole set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootInfo {
    pub customer_id: String,
    /// Number of nodes in the set (union by size).
    pub size: u64,
}

/// A customer id's entry: a live profile or a redirect left by a merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomerEntry {
    Live(Box<ProfileState>),
    Redirect { to: String },
}

/// A profile plus what the engine needs to keep resolving against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileState {
    /// Behind an `Arc` so that cloning a state is cheap; writers go through `Arc::make_mut`.
    /// The serde form (MessagePack with the profile's JSON in a binary field) is schema
    /// version 3's record, which is still read; new records are written by [`encode_live`].
    #[serde(with = "profile_as_json_bytes")]
    pub profile: Arc<Profile>,
    /// The root node of the profile's identifier set, if it has identifiers.
    pub root: Option<String>,
    /// Recent normalized values per matching trait, newest last.
    pub trait_history: SortedMap<CompactString, Vec<CompactString>>,
    /// Blocking keys this profile is listed under.
    pub blocking_keys: Vec<String>,
    /// Number of evidence records written under this id.
    pub evidence_count: u32,
}

impl ProfileState {
    /// Whether the profile holds an identifier of a kind outside `weak_kinds`.
    pub fn has_strong_identifier(&self, weak_kinds: &[String]) -> bool {
        self.profile
            .identifiers
            .iter()
            .any(|i| !weak_kinds.iter().any(|weak| weak == i.kind.as_str()))
    }

    pub fn count_of_kind(&self, kind: &str) -> usize {
        self.profile
            .identifiers
            .iter()
            .filter(|i| i.kind == kind)
            .count()
    }

    /// About how many bytes of memory the decoded state takes, for the cache's budget (see
    /// [`memory`]). It counts allocations by their element counts rather than by walking
    /// every string, so it is cheap enough to take each time a profile enters the cache.
    pub fn estimated_bytes(&self) -> usize {
        use memory::{string, strings, vec};
        use std::mem::size_of;
        let profile = &*self.profile;
        let computed = &profile.computed;
        let per_source_events: usize = computed
            .events
            .values()
            .map(|types| vec(types.len(), size_of::<(CompactString, u64)>()))
            .sum();
        let history_values: usize = self
            .trait_history
            .values()
            .map(|values| vec(values.len(), size_of::<CompactString>()))
            .sum();
        let long_identifier_values: usize = profile
            .identifiers
            .iter()
            .filter(|identifier| identifier.value.is_heap_allocated())
            .map(|identifier| string(identifier.value.len()))
            .sum();
        memory::ARC_AND_STRUCTS
            + string(profile.customer_id.len())
            + vec(
                profile.identifiers.len(),
                size_of::<idgraph_model::ProfileIdentifier>(),
            )
            + long_identifier_values
            + vec(
                profile.traits.len(),
                size_of::<(CompactString, idgraph_model::TraitValue)>(),
            )
            + vec(
                computed.events.len(),
                size_of::<(CompactString, SortedMap<CompactString, u64>)>(),
            )
            + per_source_events
            + vec(
                computed.lifetime_value_minor.len() + computed.channels.len(),
                size_of::<(CompactString, i64)>(),
            )
            + strings(&profile.absorbed_ids)
            + vec(
                self.trait_history.len(),
                size_of::<(CompactString, Vec<CompactString>)>(),
            )
            + history_values
            + strings(&self.blocking_keys)
            + self.root.as_ref().map_or(0, |root| string(root.len()))
    }

    pub fn holds(&self, identifier: &Identifier) -> bool {
        self.profile
            .identifiers
            .binary_search_by(|i| {
                (i.kind.as_str(), i.value.as_str()).cmp(&(&identifier.kind, &identifier.value))
            })
            .is_ok()
    }
}

/// A profile as a side of a comparison: its remembered trait values and its identifiers.
impl crate::matching::Side for ProfileState {
    fn trait_values(&self, field: &str) -> &[CompactString] {
        self.trait_history.get(field).map_or(&[], Vec::as_slice)
    }

    fn push_identifier_values<'s>(&'s self, kind: &str, out: &mut Vec<&'s str>) {
        let identifiers = self.profile.identifiers.iter();
        crate::matching::model::push_values_of_kind(
            identifiers.map(|i| (&i.kind, &i.value)),
            kind,
            out,
        )
    }
}

/// Candidate profiles under one blocking key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub customers: Vec<String>,
    /// Set once the key has had more profiles than `max_block_size`; it then yields none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oversize: bool,
}

/// One stored reason why something belongs to a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub event_id: CompactString,
    pub source: CompactString,
    pub at: CompactString,
    #[serde(flatten)]
    pub link: EvidenceLink,
}

/// Evidence with the time of the event behind it, which decides when it expires.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StampedEvidence {
    pub time_ms: i64,
    pub evidence: Evidence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "link", rename_all = "snake_case")]
pub enum EvidenceLink {
    /// The profile was created by this event with these identifiers.
    Created { identifiers: Vec<Identifier> },
    /// `identifier` joined the profile on an event linked through `via`.
    IdentifierAdded {
        identifier: Identifier,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<Identifier>,
        rule: LinkRule,
    },
    /// Profile `absorbed` was merged in; `via` and `other` are the identifiers on each side.
    Merged {
        absorbed: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<Identifier>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        other: Option<Identifier>,
        rule: LinkRule,
    },
    /// An event with no new identifier was linked by its traits.
    EventLinked { rule: LinkRule },
}

/// The key of an event in [`Table::Events`].
pub fn event_key(source: &str, event_id: &str) -> String {
    idgraph_model::normalize::join_with_nul(source, event_id)
}

/// The key of evidence number `seq` of `customer_id` in [`Table::Evidence`]; big-endian so
/// that a prefix scan returns evidence in order.
pub fn evidence_key(customer_id: &str, seq: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(customer_id.len() + 5);
    key.extend_from_slice(customer_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The first byte of a live profile's record in the packed form. MessagePack never uses this
/// byte, so it tells a packed record from the MessagePack records of redirects and of
/// profiles stored by schema version 3.
const PACKED_LIVE: u8 = 0xc1;

/// The layout version of packed live records, the second byte.
const PACKED_LIVE_VERSION: u8 = 1;

/// Encodes a live profile's record for [`Table::Customers`]: the profile in
/// [`idgraph_model::packed`] form, then the rest of its state. A third of the bytes of the
/// MessagePack-and-JSON form of schema version 3, which is still read (see
/// [`decode_customer`]).
pub fn encode_live(state: &ProfileState) -> Vec<u8> {
    let mut writer = PackWriter::with_capacity(256 + 64 * state.profile.identifiers.len());
    writer.byte(PACKED_LIVE);
    writer.byte(PACKED_LIVE_VERSION);
    pack_profile(&mut writer, &state.profile);
    writer.optional_str(state.root.as_deref());
    writer.count(state.trait_history.len());
    for (name, values) in &state.trait_history {
        writer.symbol(name);
        writer.count(values.len());
        for value in values {
            writer.str(value);
        }
    }
    writer.count(state.blocking_keys.len());
    for key in &state.blocking_keys {
        writer.str(key);
    }
    writer.varint(u64::from(state.evidence_count));
    writer.into_bytes()
}

/// Decodes a [`Table::Customers`] record: a packed live profile, or a MessagePack one (a
/// redirect, or a live profile written by schema version 3).
pub fn decode_customer(key: &[u8], bytes: &[u8]) -> Result<CustomerEntry, StoreError> {
    if bytes.first() != Some(&PACKED_LIVE) {
        return decode(Table::Customers, key, bytes);
    }
    decode_packed_live(bytes)
        .map(|state| CustomerEntry::Live(Box::new(state)))
        .map_err(|e| corrupt(Table::Customers, key, e.to_string()))
}

fn decode_packed_live(bytes: &[u8]) -> Result<ProfileState, PackedError> {
    let mut reader = PackReader::new(bytes);
    reader.byte()?;
    if reader.byte()? != PACKED_LIVE_VERSION {
        return Err(PackedError {
            offset: 1,
            reason: "unknown layout version of a live profile record",
        });
    }
    let profile = unpack_profile(&mut reader)?;
    let root = reader.optional_string()?;
    let trait_history = reader.list(|reader| {
        let name = reader.symbol()?;
        Ok((name, reader.list(PackReader::compact)?))
    })?;
    let blocking_keys = reader.list(PackReader::string)?;
    let evidence_count = u32::try_from(reader.varint()?).map_err(|_| PackedError {
        offset: bytes.len(),
        reason: "the evidence count is too large",
    })?;
    reader.finish()?;
    Ok(ProfileState {
        profile: Arc::new(profile),
        root,
        trait_history: SortedMap::from_iter(trait_history),
        blocking_keys,
        evidence_count,
    })
}

/// Serde adapter that stores a profile as its JSON in a binary field: the live records of
/// schema version 3, which are still read.
mod profile_as_json_bytes {
    use std::sync::Arc;

    use idgraph_model::{Profile, ProfileJson};
    use serde::de::Visitor;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        profile: &Arc<Profile>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(ProfileJson::encode(profile).as_str().as_bytes())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Arc<Profile>, D::Error> {
        struct JsonBytes;
        impl<'de> Visitor<'de> for JsonBytes {
            type Value = Arc<Profile>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a profile as JSON bytes")
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
                serde_json::from_slice(bytes)
                    .map(Arc::new)
                    .map_err(|e| E::custom(format!("profile JSON: {e}")))
            }
        }
        deserializer.deserialize_bytes(JsonBytes)
    }
}

/// Encodes a state record as MessagePack with field names: compact and quick for the
/// string-heavy profiles (no escaping), yet self-describing, so optional fields may be
/// skipped and added later without a migration.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Records are written into one reused buffer and copied out at their exact size. Most
    // are node and blocking records of a few dozen bytes that wait in a checkpoint until it
    // is written: a buffer sized for the largest record held several times its record's
    // bytes, 50 MB of a 120k-line run's peak heap (measured with heaptrack).
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        rmp_serde::encode::write_named(scratch, value).expect("state records always serialize");
        scratch.as_slice().to_vec()
    })
}

pub fn decode<T: DeserializeOwned>(
    table: Table,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| corrupt(table, key, e.to_string()))
}

fn corrupt(table: Table, key: &[u8], reason: String) -> StoreError {
    StoreError::Corrupt {
        table: table.name(),
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::new_profile;

    fn sample_state() -> ProfileState {
        let mut state = new_profile("cus_1".into(), "2026-01-01T00:00:00.000Z");
        state.root = Some("email\0a@x.com".into());
        state
            .trait_history
            .insert("last_name".into(), vec!["lee".into(), "li".into()]);
        state.blocking_keys = vec!["ld:L000:1980".into()];
        state.evidence_count = 3;
        state
    }

    #[test]
    fn a_profiles_memory_estimate_grows_with_what_it_holds() {
        let small = sample_state();
        let mut large = small.clone();
        let profile = Arc::make_mut(&mut large.profile);
        for n in 0..20 {
            profile.identifiers.push(idgraph_model::ProfileIdentifier {
                kind: "email".into(),
                value: format!("someone.with.a.long.address{n}@example.com").into(),
                first_seen: "2026-01-01T00:00:00.000Z".into(),
                last_seen: "2026-01-01T00:00:00.000Z".into(),
                source: "web".into(),
            });
        }
        large
            .blocking_keys
            .extend((0..20).map(|n| format!("fl:ann:lee{n}")));
        let (small_bytes, large_bytes) = (small.estimated_bytes(), large.estimated_bytes());
        assert!(small_bytes >= memory::ARC_AND_STRUCTS, "{small_bytes}");
        // Twenty identifiers of 120 bytes plus their 40-byte values, twenty keys of ~40.
        assert!(
            large_bytes >= small_bytes + 20 * (120 + 40 + 40),
            "{small_bytes} -> {large_bytes}"
        );
    }

    #[test]
    fn a_live_profile_decodes_to_what_was_encoded() {
        let state = sample_state();
        let packed = encode_live(&state);
        let decoded = decode_customer(b"cus_1", &packed).unwrap();
        assert_eq!(decoded, CustomerEntry::Live(Box::new(state)));
    }

    #[test]
    fn records_of_schema_version_3_are_still_read() {
        let state = sample_state();
        let legacy = encode(&CustomerEntry::Live(Box::new(state.clone())));
        assert_eq!(legacy[0] & 0xf0, 0x80, "a MessagePack map");
        assert!(legacy.len() > 2 * encode_live(&state).len());
        let decoded = decode_customer(b"cus_1", &legacy).unwrap();
        assert_eq!(decoded, CustomerEntry::Live(Box::new(state)));
        let redirect = encode(&CustomerEntry::Redirect { to: "cus_2".into() });
        assert_eq!(
            decode_customer(b"cus_1", &redirect).unwrap(),
            CustomerEntry::Redirect { to: "cus_2".into() }
        );
    }

    #[test]
    fn a_damaged_profile_is_reported_with_its_key() {
        let state = sample_state();
        let bytes = encode_live(&state);
        let error = decode_customer(b"cus_1", &bytes[..bytes.len() - 1]).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("cus_1") && message.contains("ends early"),
            "{message}"
        );
        let mut future = bytes.clone();
        future[1] = PACKED_LIVE_VERSION + 1;
        let message = decode_customer(b"cus_1", &future).unwrap_err().to_string();
        assert!(message.contains("unknown layout version"), "{message}");
    }

    #[test]
    fn a_damaged_legacy_profile_is_reported_with_its_key() {
        let state = sample_state();
        let mut bytes = encode(&CustomerEntry::Live(Box::new(state)));
        // Break the JSON inside the binary field: its first byte is the profile's `{`.
        let brace = bytes.iter().position(|&b| b == b'{').unwrap();
        bytes[brace] = b'[';
        let message = decode_customer(b"cus_1", &bytes).unwrap_err().to_string();
        assert!(
            message.contains("cus_1") && message.contains("profile JSON"),
            "{message}"
        );
    }
}
