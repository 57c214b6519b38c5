//! Output record types (docs/formats.md §3) and the profile they carry.
//!
//! Every record has a `schema_version`; maps are ordered (`BTreeMap`, or the profile's
//! [`SortedMap`]s) so that serializing the same record always gives the same bytes.

use std::sync::Arc;

use base64::Engine as _;
pub use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::ParseError;
use crate::json::WriteJson;
use crate::sorted::{SortedMap, SortedSet};

/// The version of every output record's layout. Bump it on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Where an input message came from: a line of a file or an offset of a Kafka partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InputCoordinates {
    /// The file name is shared (`Arc`): every output record of every line carries it.
    File { file: Arc<str>, line: u64 },
    Kafka {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
    },
}

impl InputCoordinates {
    /// The key under which the next position of this input stream is stored.
    pub fn stream_key(&self) -> String {
        match self {
            InputCoordinates::File { file, .. } => format!("file:{file}"),
            InputCoordinates::Kafka {
                topic, partition, ..
            } => format!("kafka:{topic}:{partition}"),
        }
    }

    /// True when both are in the same input stream (file, or topic partition), whose
    /// [`InputCoordinates::stream_key`] is then the same.
    pub fn same_stream(&self, other: &InputCoordinates) -> bool {
        match (self, other) {
            (InputCoordinates::File { file: a, .. }, InputCoordinates::File { file: b, .. }) => {
                a == b
            }
            (
                InputCoordinates::Kafka {
                    topic: a,
                    partition: p,
                    ..
                },
                InputCoordinates::Kafka {
                    topic: b,
                    partition: q,
                    ..
                },
            ) => p == q && a == b,
            _ => false,
        }
    }

    /// The position to resume from after this message has been processed.
    pub fn next_position(&self) -> u64 {
        match self {
            InputCoordinates::File { line, .. } => *line,
            InputCoordinates::Kafka { offset, .. } => (*offset + 1) as u64,
        }
    }

    /// Reads back what [`InputCoordinates::display`] wrote. Kafka topic names cannot hold `/`
    /// or `@`, so `topic/partition@offset` is told apart from `file:line` without doubt.
    pub fn parse_display(text: &str) -> Option<Self> {
        let kafka = text.rsplit_once('@').and_then(|(stream, offset)| {
            let (topic, partition) = stream.rsplit_once('/')?;
            let valid_topic = !topic.is_empty()
                && topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            valid_topic.then_some(InputCoordinates::Kafka {
                topic: topic.into(),
                partition: partition.parse().ok()?,
                offset: offset.parse().ok()?,
            })
        });
        kafka.or_else(|| {
            let (file, line) = text.rsplit_once(':')?;
            Some(InputCoordinates::File {
                file: file.into(),
                line: line.parse().ok()?,
            })
        })
    }

    /// A compact text form for headers and logs: `file:line` or `topic/partition@offset`.
    pub fn display(&self) -> String {
        let mut text = String::new();
        self.write_display(&mut text);
        text
    }

    /// Appends [`InputCoordinates::display`] to `out`; cheaper than `format!` on a path every
    /// output record takes.
    pub fn write_display(&self, out: &mut String) {
        let mut number = itoa::Buffer::new();
        match self {
            InputCoordinates::File { file, line } => {
                out.push_str(file);
                out.push(':');
                out.push_str(number.format(*line));
            }
            InputCoordinates::Kafka {
                topic,
                partition,
                offset,
            } => {
                out.push_str(topic);
                out.push('/');
                out.push_str(number.format(*partition));
                out.push('@');
                out.push_str(number.format(*offset));
            }
        }
    }
}

/// What resolution did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionAction {
    /// A new profile was created for the event.
    New,
    /// The event joined one existing profile.
    Matched,
    /// The event joined profiles that were merged because of it.
    Merged,
    /// The same source and event id were processed before; nothing changed.
    Duplicate,
}

impl ResolutionAction {
    pub const ALL: [ResolutionAction; 4] = [
        ResolutionAction::New,
        ResolutionAction::Matched,
        ResolutionAction::Merged,
        ResolutionAction::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResolutionAction::New => "new",
            ResolutionAction::Matched => "matched",
            ResolutionAction::Merged => "merged",
            ResolutionAction::Duplicate => "duplicate",
        }
    }
}

/// The rule that linked an event, identifier or profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum LinkRule {
    /// The first event of a new profile.
    Created,
    /// A normalized identifier shared with the profile.
    SharedIdentifier {
        kind: CompactString,
        value: CompactString,
    },
    /// Fuzzy trait match with a candidate, with the total and per-field scores.
    Fuzzy { score: f64, fields: Vec<FieldScore> },
    /// The same source and event id were processed before.
    SameEvent,
    /// The identifier arrived on an event already assigned to the profile.
    CoOccurrence,
}

/// One field's contribution to a fuzzy score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldScore {
    pub field: CompactString,
    /// `exact`, `close`, `disagree` or `missing`.
    pub level: CompactString,
    pub similarity: f64,
    pub weight: f64,
}

/// A rule that refused a merge (README, Matching).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalRule {
    /// The merged profile would hold more identifiers of one kind than allowed.
    KindLimit,
    /// The linking identifier is seen on too many profiles to mean one person.
    GenericValue,
    /// The merged profile would be larger than the maximum profile size.
    MaxProfileSize,
    /// Only weak identifiers (devices, cookies) link two profiles that both have strong ones,
    /// and their traits do not corroborate the link.
    WeakIdentifier,
    /// The traits on the two sides say they are different people (other name and birth date),
    /// whatever identifier links them.
    ConflictingTraits,
}

impl RefusalRule {
    pub const ALL: [RefusalRule; 5] = [
        RefusalRule::KindLimit,
        RefusalRule::GenericValue,
        RefusalRule::MaxProfileSize,
        RefusalRule::WeakIdentifier,
        RefusalRule::ConflictingTraits,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalRule::KindLimit => "kind_limit",
            RefusalRule::GenericValue => "generic_value",
            RefusalRule::MaxProfileSize => "max_profile_size",
            RefusalRule::WeakIdentifier => "weak_identifier",
            RefusalRule::ConflictingTraits => "conflicting_traits",
        }
    }
}

/// How an event was resolved; part of the enriched event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    pub action: ResolutionAction,
    #[serde(flatten)]
    pub rule: LinkRule,
    /// Profiles absorbed into `customer_id` because of this event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_ids: Vec<String>,
    /// Merges this event asked for that were refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedMerge>,
}

/// A merge that a rule refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedMerge {
    pub rule: RefusalRule,
    /// The profile that stayed apart; `None` when a new identifier was refused instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_customer_id: Option<String>,
    /// The identifier kind whose rule was broken, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CompactString>,
}

/// Metadata carried by every output record: the input message it came from and a key that
/// is the same every time the same output is produced, so consumers can drop duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMeta {
    pub input: InputCoordinates,
    pub idempotency_key: String,
}

/// `idgraph.enriched`: the input event, normalized, with its customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrichedEvent {
    pub schema_version: u32,
    pub event_id: CompactString,
    pub customer_id: String,
    pub source: CompactString,
    pub event_type: CompactString,
    pub timestamp: CompactString,
    pub identifiers: SortedMap<CompactString, Vec<CompactString>>,
    pub traits: SortedMap<CompactString, CompactString>,
    pub properties: Map<String, Value>,
    pub resolution: Resolution,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quality_issues: Vec<crate::normalize::QualityIssue>,
    #[serde(flatten)]
    pub meta: RecordMeta,
}

/// An identifier held by a profile.
///
/// The profile types hold their strings as [`CompactString`]s: nearly all of them (kinds,
/// sources, timestamps, trait names and values, event types) fit in its 24 inline bytes, so a
/// profile is a few allocations instead of hundreds, and comparing map keys does not chase a
/// pointer to another cache line. They serialize exactly as `String`s do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileIdentifier {
    pub kind: CompactString,
    pub value: CompactString,
    pub first_seen: CompactString,
    pub last_seen: CompactString,
    /// The source of the event that first brought it.
    pub source: CompactString,
}

/// The most recent non-empty value of a trait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraitValue {
    pub value: CompactString,
    pub source: CompactString,
    pub updated_at: CompactString,
}

/// Traits computed from the profile's events (docs/formats.md §3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ComputedTraits {
    pub event_count: u64,
    /// Events per source, then per event type.
    pub events: SortedMap<CompactString, SortedMap<CompactString, u64>>,
    pub first_seen: CompactString,
    pub last_seen: CompactString,
    pub order_count: u64,
    /// Sum of transaction amounts per currency, in minor units (cents), so that the sum does
    /// not depend on the order events arrive in.
    pub lifetime_value_minor: SortedMap<CompactString, i64>,
    pub channels: SortedSet<CompactString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_sentiment: Option<TimedNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follower_reach: Option<TimedNumber>,
}

/// A number with the event time it was observed at; the latest observation wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedNumber {
    pub value: f64,
    pub at: CompactString,
}

/// A unified customer profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub customer_id: String,
    /// Event time of the event that created the profile; with the id, decides which profile
    /// is older when two merge.
    pub created_at: CompactString,
    /// Bumped on every change; lets consumers order profile records.
    pub version: u64,
    /// Sorted by (kind, value).
    pub identifiers: Vec<ProfileIdentifier>,
    pub traits: SortedMap<CompactString, TraitValue>,
    pub computed: ComputedTraits,
    /// Ids absorbed into this profile; each redirects here.
    pub absorbed_ids: Vec<String>,
}

/// A profile serialized once as JSON: the profile record carries these bytes as they are, so
/// a record can be cloned, queued and written without encoding the profile again. (The state
/// store keeps profiles in [`crate::packed`] form instead, a third of the size.)
///
/// An `Arc<String>`, not an `Arc<str>`: the latter would copy the kilobytes just written into
/// a new allocation.
#[derive(Debug, Clone)]
pub struct ProfileJson(Arc<String>);

impl ProfileJson {
    pub fn encode(profile: &Profile) -> Self {
        // Room for a typical profile of this shape, so the buffer rarely regrows.
        let estimate = 512 + 192 * profile.identifiers.len() + 96 * profile.traits.len();
        let mut bytes = Vec::with_capacity(estimate);
        profile.write_json(&mut bytes);
        let text = String::from_utf8(bytes).expect("the JSON encoders write UTF-8 only");
        ProfileJson(Arc::new(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn decode(&self) -> Result<Profile, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

impl PartialEq for ProfileJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// Embeds the JSON as it is. The hot paths write records with [`WriteJson`], which copies the
/// bytes; this serde path (HTTP answers, tests) checks them on the way, which costs a parse.
impl Serialize for ProfileJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ProfileJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer)
            .map(|raw| ProfileJson(Arc::new(Box::<str>::from(raw).into_string())))
    }
}

/// `idgraph.profiles`: a profile after a change, or a tombstone for an absorbed id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub schema_version: u32,
    pub customer_id: String,
    /// `None` for a tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileJson>,
    /// For a tombstone of an absorbed id: the survivor it now redirects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    #[serde(flatten)]
    pub meta: RecordMeta,
}

/// `idgraph.identity-changes`: one typed change of the identity graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityChange {
    pub schema_version: u32,
    pub customer_id: String,
    /// The event that caused the change.
    pub event_id: CompactString,
    pub source: CompactString,
    /// The event time of that event.
    pub at: CompactString,
    #[serde(flatten)]
    pub change: ChangeKind,
    #[serde(flatten)]
    pub meta: RecordMeta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChangeKind {
    Created {
        identifiers: Vec<crate::Identifier>,
    },
    Merged {
        survivor: String,
        absorbed: Vec<String>,
        #[serde(flatten)]
        rule: LinkRule,
    },
    IdentifierAdded {
        kind: CompactString,
        value: CompactString,
        #[serde(flatten)]
        rule: LinkRule,
    },
    MergeRefused {
        rule: RefusalRule,
        /// The profile that stayed apart; `None` when a new identifier was refused instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        other_customer_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<CompactString>,
        /// The identifier that would have linked the two profiles.
        linking_kind: CompactString,
    },
    /// An identifier value was seen on so many profiles that it stopped linking.
    IdentifierGeneric {
        kind: CompactString,
        value: CompactString,
        profiles_seen: u32,
    },
}

impl ChangeKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            ChangeKind::Created { .. } => "created",
            ChangeKind::Merged { .. } => "merged",
            ChangeKind::IdentifierAdded { .. } => "identifier_added",
            ChangeKind::MergeRefused { .. } => "merge_refused",
            ChangeKind::IdentifierGeneric { .. } => "identifier_generic",
        }
    }
}

/// `idgraph.dead-letter`: a message that could not become an event, with everything needed to
/// find, understand and replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema_version: u32,
    pub failure_kind: crate::error::FailureKind,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub processor_version: String,
    /// `utf8` or `base64`.
    pub payload_encoding: String,
    pub payload: String,
    /// The real size of the payload in bytes, even when `payload` is truncated.
    pub payload_size: u64,
    pub truncated: bool,
    /// For [`FailureKind::Undeliverable`](crate::error::FailureKind::Undeliverable): the
    /// output topic that refused the record, whose payload this letter carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_topic: Option<String>,
    #[serde(flatten)]
    pub meta: RecordMeta,
}

impl DeadLetter {
    /// Builds the dead letter for `payload`, keeping at most `max_payload_bytes` of it.
    pub fn new(
        error: &ParseError,
        payload: &[u8],
        max_payload_bytes: usize,
        processor_version: &str,
        meta: RecordMeta,
    ) -> Self {
        let (payload_encoding, text, truncated) = kept_payload(payload, max_payload_bytes);
        DeadLetter {
            schema_version: SCHEMA_VERSION,
            failure_kind: error.kind,
            reason: error.reason.clone(),
            field: error.field.clone(),
            processor_version: processor_version.to_owned(),
            payload_encoding: payload_encoding.to_owned(),
            payload: text,
            payload_size: payload.len() as u64,
            truncated,
            output_topic: None,
            meta,
        }
    }

    /// The reference to an output record that `output_topic` refused for good (`reason`
    /// says why), carrying at most `max_payload_bytes` of the record and the input
    /// coordinates and idempotency key of the message it came from.
    pub fn undeliverable(
        output_topic: &str,
        record: &[u8],
        reason: String,
        max_payload_bytes: usize,
        processor_version: &str,
        meta: RecordMeta,
    ) -> Self {
        let (payload_encoding, text, truncated) = kept_payload(record, max_payload_bytes);
        DeadLetter {
            schema_version: SCHEMA_VERSION,
            failure_kind: crate::error::FailureKind::Undeliverable,
            reason,
            field: None,
            processor_version: processor_version.to_owned(),
            payload_encoding: payload_encoding.to_owned(),
            payload: text,
            payload_size: record.len() as u64,
            truncated,
            output_topic: Some(output_topic.to_owned()),
            meta,
        }
    }
}

/// The first `max_payload_bytes` of `payload` as text (`utf8`) or `base64`, and whether it
/// was cut.
fn kept_payload(payload: &[u8], max_payload_bytes: usize) -> (&'static str, String, bool) {
    let kept = &payload[..payload.len().min(max_payload_bytes)];
    let truncated = kept.len() < payload.len();
    let (payload_encoding, text) = match std::str::from_utf8(kept) {
        Ok(text) => ("utf8", text.to_owned()),
        // A cut in the middle of a multi-byte character is not bad data; keep the valid
        // prefix as text.
        Err(e) if e.error_len().is_none() && std::str::from_utf8(payload).is_ok() => (
            "utf8",
            String::from_utf8_lossy(&kept[..e.valid_up_to()]).into_owned(),
        ),
        Err(_) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(kept),
        ),
    };
    (payload_encoding, text, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FailureKind;

    fn meta() -> RecordMeta {
        RecordMeta {
            input: InputCoordinates::File {
                file: "in.jsonl".into(),
                line: 7,
            },
            idempotency_key: "k".into(),
        }
    }

    #[test]
    fn input_coordinates_read_back_from_their_display_form() {
        let kafka = InputCoordinates::Kafka {
            topic: "touchpoints.web-v2".into(),
            partition: 3,
            offset: 17,
        };
        let file = InputCoordinates::File {
            file: "data/in@2026/x:y.jsonl".into(),
            line: 9,
        };
        for coordinates in [kafka, file] {
            assert_eq!(
                InputCoordinates::parse_display(&coordinates.display()),
                Some(coordinates)
            );
        }
        assert_eq!(InputCoordinates::parse_display("no position"), None);
    }

    #[test]
    fn dead_letters_keep_binary_payloads_as_base64_and_report_the_real_size() {
        let error = ParseError::new(FailureKind::InvalidUtf8, "bad");
        let letter = DeadLetter::new(&error, b"\xff\xfeabc", 3, "0.1.0", meta());
        assert_eq!(letter.payload_encoding, "base64");
        assert_eq!(letter.payload, "//5h");
        assert_eq!(letter.payload_size, 5);
        assert!(letter.truncated);
        let json = serde_json::to_value(&letter).unwrap();
        assert_eq!(json["input"]["line"], 7);
        assert_eq!(json["failure_kind"], "invalid_utf8");
    }

    #[test]
    fn messages_share_a_stream_when_their_stream_keys_match() {
        let file = |name: &str, line| InputCoordinates::File {
            file: name.into(),
            line,
        };
        let kafka = |partition, offset| InputCoordinates::Kafka {
            topic: "web".into(),
            partition,
            offset,
        };
        let all = [
            file("a.jsonl", 1),
            file("a.jsonl", 9),
            file("b.jsonl", 1),
            kafka(0, 5),
            kafka(0, 6),
            kafka(1, 5),
        ];
        for x in &all {
            for y in &all {
                assert_eq!(
                    x.same_stream(y),
                    x.stream_key() == y.stream_key(),
                    "{x:?} {y:?}"
                );
            }
        }
    }

    #[test]
    fn change_records_are_typed_and_flat() {
        let change = IdentityChange {
            schema_version: SCHEMA_VERSION,
            customer_id: "c1".into(),
            event_id: "e1".into(),
            source: "web".into(),
            at: "2026-01-01T00:00:00Z".into(),
            change: ChangeKind::Merged {
                survivor: "c1".into(),
                absorbed: vec!["c2".into()],
                rule: LinkRule::SharedIdentifier {
                    kind: "email".into(),
                    value: "a@b.co".into(),
                },
            },
            meta: meta(),
        };
        let json = serde_json::to_value(&change).unwrap();
        assert_eq!(json["type"], "merged");
        assert_eq!(json["rule"], "shared_identifier");
        assert_eq!(json["absorbed"][0], "c2");
        let back: IdentityChange = serde_json::from_value(json).unwrap();
        assert_eq!(back, change);
    }
}
