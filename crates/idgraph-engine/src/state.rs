//! Typed records kept in the [`StateStore`](crate::StateStore) tables, and their encoding.

use std::sync::Arc;

use idgraph_model::{CompactString, Identifier, LinkRule, Profile, ProfileJson, SortedMap};
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
    /// Stored as the profile's JSON (a MessagePack binary), the same bytes the profile output
    /// record carries, so each change is encoded once.
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

    pub fn holds(&self, identifier: &Identifier) -> bool {
        self.profile
            .identifiers
            .binary_search_by(|i| {
                (i.kind.as_str(), i.value.as_str()).cmp(&(&identifier.kind, &identifier.value))
            })
            .is_ok()
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

/// Encodes a live profile exactly as `CustomerEntry::Live` would, without moving it into one.
/// `profile_json`, when given, must be [`ProfileJson::encode`] of `state.profile`; it is used
/// as is instead of encoding the profile again.
pub fn encode_live(state: &ProfileState, profile_json: Option<&ProfileJson>) -> Vec<u8> {
    // Field for field the serialized form of `ProfileState`; a test keeps the two in step.
    #[derive(Serialize)]
    struct StateRef<'a> {
        profile: JsonBytes<'a>,
        root: &'a Option<String>,
        trait_history: &'a SortedMap<CompactString, Vec<CompactString>>,
        blocking_keys: &'a [String],
        evidence_count: u32,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum LiveRef<'a> {
        Live(StateRef<'a>),
    }
    struct JsonBytes<'a>(&'a [u8]);
    impl Serialize for JsonBytes<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }
    let encoded;
    let json = match profile_json {
        Some(json) => json,
        None => {
            encoded = ProfileJson::encode(&state.profile);
            &encoded
        }
    };
    let record = LiveRef::Live(StateRef {
        profile: JsonBytes(json.as_str().as_bytes()),
        root: &state.root,
        trait_history: &state.trait_history,
        blocking_keys: &state.blocking_keys,
        evidence_count: state.evidence_count,
    });
    // The profile's JSON is most of the record (often kilobytes): size the buffer for it
    // up front instead of regrowing and copying it on the way.
    let mut bytes = Vec::with_capacity(json.as_str().len() + 512);
    rmp_serde::encode::write_named(&mut bytes, &record).expect("state records always serialize");
    bytes
}

/// Serde adapter that stores a profile as its JSON in a binary field.
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
    // Most records are a few hundred bytes; starting there saves the first regrowths.
    let mut bytes = Vec::with_capacity(512);
    rmp_serde::encode::write_named(&mut bytes, value).expect("state records always serialize");
    bytes
}

pub fn decode<T: DeserializeOwned>(
    table: Table,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table: table.name(),
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
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
    fn a_live_profile_encoded_from_its_output_json_equals_the_plain_encoding() {
        let state = sample_state();
        let plain = encode(&CustomerEntry::Live(Box::new(state.clone())));
        let json = ProfileJson::encode(&state.profile);
        assert_eq!(encode_live(&state, Some(&json)), plain);
        assert_eq!(encode_live(&state, None), plain);
        let decoded: CustomerEntry = decode(Table::Customers, b"cus_1", &plain).unwrap();
        assert_eq!(decoded, CustomerEntry::Live(Box::new(state)));
    }

    #[test]
    fn a_damaged_profile_is_reported_with_its_key() {
        let state = sample_state();
        let mut bytes = encode_live(&state, None);
        // Break the JSON inside the binary field: its first byte is the profile's `{`.
        let brace = bytes.iter().position(|&b| b == b'{').unwrap();
        bytes[brace] = b'[';
        let error = decode::<CustomerEntry>(Table::Customers, b"cus_1", &bytes).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("cus_1") && message.contains("profile JSON"),
            "{message}"
        );
    }
}
