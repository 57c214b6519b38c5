//! Hand-written JSON encoders for the records written once or more per event.
//!
//! Encoding outputs is a large share of an event's cost, and most of serde_json's time goes
//! into escaping field names it cannot know are plain, one byte at a time, through several
//! small writes per string. These encoders write each record's fixed parts (field names,
//! punctuation, enum tags) as one literal and copy plain strings in one piece. Rare and
//! free-form parts (event properties, quality issues, numbers with a fraction, strings that
//! need escaping) still go through serde_json, whose compact output of a value does not depend
//! on what surrounds it.
//!
//! The contract is byte equality with `serde_json::to_vec` of the same record, which the
//! derived `Serialize` implementations still define; the tests below check it for every
//! record shape, including strings that need escaping.

use serde::Serialize;

use crate::records::{
    ChangeKind, ComputedTraits, DeadLetter, EnrichedEvent, IdentityChange, InputCoordinates,
    LinkRule, Profile, ProfileRecord, RecordMeta, RefusedMerge, Resolution, TimedNumber,
};

/// A record that can append its JSON form, byte-identical to serde_json's, to a buffer.
pub trait WriteJson {
    fn write_json(&self, out: &mut Vec<u8>);
}

/// Appends `value` as a JSON string.
pub fn write_str(out: &mut Vec<u8>, value: &str) {
    if is_plain(value.as_bytes()) {
        out.reserve(value.len() + 2);
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        write_serde(out, value);
    }
}

/// True when no byte needs escaping in a JSON string: no control character, quote or
/// backslash. It looks at every byte without stopping early, which lets the compiler check
/// many bytes per instruction; almost every string is plain.
fn is_plain(bytes: &[u8]) -> bool {
    let needs_escape = bytes.iter().fold(false, |found, &byte| {
        found | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
    });
    !needs_escape
}

/// Appends any value the way serde_json encodes it; for the parts not worth writing by hand.
fn write_serde<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(&mut *out, value)
        .expect("records serialize: every map key is a string and writing to a Vec cannot fail");
}

fn write_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

fn write_i64(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// Appends `key` (a literal with its quotes, colon and any leading comma) and a string value.
fn str_field(out: &mut Vec<u8>, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    write_str(out, value);
}

/// Appends a JSON array, writing each item with `write_item`.
fn write_array<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut write_item: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_item(out, item);
    }
    out.push(b']');
}

/// Appends a JSON array of strings.
fn write_str_list<'a, S: AsRef<str> + 'a>(
    out: &mut Vec<u8>,
    values: impl IntoIterator<Item = &'a S>,
) {
    write_array(out, values, |out, value| write_str(out, value.as_ref()));
}

/// Appends a JSON object, writing each value with `write_value`.
fn write_map<'a, K: AsRef<str> + 'a, V: 'a>(
    out: &mut Vec<u8>,
    map: impl IntoIterator<Item = (&'a K, &'a V)>,
    mut write_value: impl FnMut(&mut Vec<u8>, &V),
) {
    out.push(b'{');
    for (i, (key, value)) in map.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key.as_ref());
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// The fields of [`RecordMeta`], flattened into the record that carries it.
fn write_meta_fields(out: &mut Vec<u8>, meta: &RecordMeta) {
    out.extend_from_slice(b",\"input\":");
    match &meta.input {
        InputCoordinates::File { file, line } => {
            str_field(out, b"{\"file\":", file);
            out.extend_from_slice(b",\"line\":");
            write_u64(out, *line);
        }
        InputCoordinates::Kafka {
            topic,
            partition,
            offset,
        } => {
            str_field(out, b"{\"topic\":", topic);
            out.extend_from_slice(b",\"partition\":");
            write_i64(out, i64::from(*partition));
            out.extend_from_slice(b",\"offset\":");
            write_i64(out, *offset);
        }
    }
    out.push(b'}');
    str_field(out, b",\"idempotency_key\":", &meta.idempotency_key);
}

/// The fields of a [`LinkRule`], flattened: its `rule` tag, then its own fields.
fn write_rule_fields(out: &mut Vec<u8>, rule: &LinkRule) {
    match rule {
        LinkRule::Created => out.extend_from_slice(b",\"rule\":\"created\""),
        LinkRule::SharedIdentifier { kind, value } => {
            out.extend_from_slice(b",\"rule\":\"shared_identifier\"");
            str_field(out, b",\"kind\":", kind);
            str_field(out, b",\"value\":", value);
        }
        LinkRule::Fuzzy { score, fields } => {
            out.extend_from_slice(b",\"rule\":\"fuzzy\",\"score\":");
            write_serde(out, score);
            out.extend_from_slice(b",\"fields\":");
            write_serde(out, fields);
        }
        LinkRule::SameEvent => out.extend_from_slice(b",\"rule\":\"same_event\""),
        LinkRule::CoOccurrence => out.extend_from_slice(b",\"rule\":\"co_occurrence\""),
    }
}

fn write_refused(out: &mut Vec<u8>, refused: &RefusedMerge) {
    str_field(out, b"{\"rule\":", refused.rule.as_str());
    if let Some(other) = &refused.other_customer_id {
        str_field(out, b",\"other_customer_id\":", other);
    }
    if let Some(kind) = &refused.kind {
        str_field(out, b",\"kind\":", kind);
    }
    out.push(b'}');
}

fn write_resolution(out: &mut Vec<u8>, resolution: &Resolution) {
    str_field(out, b"{\"action\":", resolution.action.as_str());
    write_rule_fields(out, &resolution.rule);
    if !resolution.merged_ids.is_empty() {
        out.extend_from_slice(b",\"merged_ids\":");
        write_str_list(out, &resolution.merged_ids);
    }
    if !resolution.refused.is_empty() {
        out.extend_from_slice(b",\"refused\":");
        write_array(out, &resolution.refused, write_refused);
    }
    out.push(b'}');
}

impl WriteJson for EnrichedEvent {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"schema_version\":");
        write_u64(out, u64::from(self.schema_version));
        str_field(out, b",\"event_id\":", &self.event_id);
        str_field(out, b",\"customer_id\":", &self.customer_id);
        str_field(out, b",\"source\":", &self.source);
        str_field(out, b",\"event_type\":", &self.event_type);
        str_field(out, b",\"timestamp\":", &self.timestamp);
        out.extend_from_slice(b",\"identifiers\":");
        write_map(out, &self.identifiers, |out, values| {
            write_str_list(out, values)
        });
        out.extend_from_slice(b",\"traits\":");
        write_map(out, &self.traits, |out, value| write_str(out, value));
        out.extend_from_slice(b",\"properties\":");
        write_serde(out, &self.properties);
        out.extend_from_slice(b",\"resolution\":");
        write_resolution(out, &self.resolution);
        if !self.quality_issues.is_empty() {
            out.extend_from_slice(b",\"quality_issues\":");
            write_serde(out, &self.quality_issues);
        }
        write_meta_fields(out, &self.meta);
        out.push(b'}');
    }
}

fn write_timed_number(out: &mut Vec<u8>, key: &[u8], number: &Option<TimedNumber>) {
    if let Some(number) = number {
        out.extend_from_slice(key);
        out.extend_from_slice(b"{\"value\":");
        write_serde(out, &number.value);
        str_field(out, b",\"at\":", &number.at);
        out.push(b'}');
    }
}

fn write_computed(out: &mut Vec<u8>, computed: &ComputedTraits) {
    out.extend_from_slice(b"{\"event_count\":");
    write_u64(out, computed.event_count);
    out.extend_from_slice(b",\"events\":");
    write_map(out, &computed.events, |out, by_type| {
        write_map(out, by_type, |out, count| write_u64(out, *count))
    });
    str_field(out, b",\"first_seen\":", &computed.first_seen);
    str_field(out, b",\"last_seen\":", &computed.last_seen);
    out.extend_from_slice(b",\"order_count\":");
    write_u64(out, computed.order_count);
    out.extend_from_slice(b",\"lifetime_value_minor\":");
    write_map(out, &computed.lifetime_value_minor, |out, minor| {
        write_i64(out, *minor)
    });
    out.extend_from_slice(b",\"channels\":");
    write_str_list(out, &computed.channels);
    write_timed_number(out, b",\"latest_sentiment\":", &computed.latest_sentiment);
    write_timed_number(out, b",\"follower_reach\":", &computed.follower_reach);
    out.push(b'}');
}

impl WriteJson for Profile {
    fn write_json(&self, out: &mut Vec<u8>) {
        str_field(out, b"{\"customer_id\":", &self.customer_id);
        str_field(out, b",\"created_at\":", &self.created_at);
        out.extend_from_slice(b",\"version\":");
        write_u64(out, self.version);
        out.extend_from_slice(b",\"identifiers\":");
        write_array(out, &self.identifiers, |out, identifier| {
            str_field(out, b"{\"kind\":", &identifier.kind);
            str_field(out, b",\"value\":", &identifier.value);
            str_field(out, b",\"first_seen\":", &identifier.first_seen);
            str_field(out, b",\"last_seen\":", &identifier.last_seen);
            str_field(out, b",\"source\":", &identifier.source);
            out.push(b'}');
        });
        out.extend_from_slice(b",\"traits\":");
        write_map(out, &self.traits, |out, value| {
            str_field(out, b"{\"value\":", &value.value);
            str_field(out, b",\"source\":", &value.source);
            str_field(out, b",\"updated_at\":", &value.updated_at);
            out.push(b'}');
        });
        out.extend_from_slice(b",\"computed\":");
        write_computed(out, &self.computed);
        out.extend_from_slice(b",\"absorbed_ids\":");
        write_str_list(out, &self.absorbed_ids);
        out.push(b'}');
    }
}

impl WriteJson for ProfileRecord {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"schema_version\":");
        write_u64(out, u64::from(self.schema_version));
        str_field(out, b",\"customer_id\":", &self.customer_id);
        if let Some(profile) = &self.profile {
            out.extend_from_slice(b",\"profile\":");
            out.extend_from_slice(profile.as_str().as_bytes());
        }
        if let Some(survivor) = &self.merged_into {
            str_field(out, b",\"merged_into\":", survivor);
        }
        write_meta_fields(out, &self.meta);
        out.push(b'}');
    }
}

fn write_change_fields(out: &mut Vec<u8>, change: &ChangeKind) {
    str_field(out, b",\"type\":", change.type_name());
    match change {
        ChangeKind::Created { identifiers } => {
            out.extend_from_slice(b",\"identifiers\":");
            write_array(out, identifiers, |out, identifier| {
                str_field(out, b"{\"kind\":", &identifier.kind);
                str_field(out, b",\"value\":", &identifier.value);
                out.push(b'}');
            });
        }
        ChangeKind::Merged {
            survivor,
            absorbed,
            rule,
        } => {
            str_field(out, b",\"survivor\":", survivor);
            out.extend_from_slice(b",\"absorbed\":");
            write_str_list(out, absorbed);
            write_rule_fields(out, rule);
        }
        ChangeKind::IdentifierAdded { kind, value, rule } => {
            str_field(out, b",\"kind\":", kind);
            str_field(out, b",\"value\":", value);
            write_rule_fields(out, rule);
        }
        ChangeKind::MergeRefused {
            rule,
            other_customer_id,
            kind,
            linking_kind,
        } => {
            str_field(out, b",\"rule\":", rule.as_str());
            if let Some(other) = other_customer_id {
                str_field(out, b",\"other_customer_id\":", other);
            }
            if let Some(kind) = kind {
                str_field(out, b",\"kind\":", kind);
            }
            str_field(out, b",\"linking_kind\":", linking_kind);
        }
        ChangeKind::IdentifierGeneric {
            kind,
            value,
            profiles_seen,
        } => {
            str_field(out, b",\"kind\":", kind);
            str_field(out, b",\"value\":", value);
            out.extend_from_slice(b",\"profiles_seen\":");
            write_u64(out, u64::from(*profiles_seen));
        }
    }
}

impl WriteJson for IdentityChange {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"schema_version\":");
        write_u64(out, u64::from(self.schema_version));
        str_field(out, b",\"customer_id\":", &self.customer_id);
        str_field(out, b",\"event_id\":", &self.event_id);
        str_field(out, b",\"source\":", &self.source);
        str_field(out, b",\"at\":", &self.at);
        write_change_fields(out, &self.change);
        write_meta_fields(out, &self.meta);
        out.push(b'}');
    }
}

/// Dead letters are rare; serde_json writes them.
impl WriteJson for DeadLetter {
    fn write_json(&self, out: &mut Vec<u8>) {
        write_serde(out, self);
    }
}

#[cfg(test)]
mod tests {

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::normalize::{IssueKind, QualityIssue};
    use crate::records::CompactString;
    use crate::records::{
        FieldScore, ProfileIdentifier, ProfileJson, RefusalRule, ResolutionAction, TraitValue,
        SCHEMA_VERSION,
    };
    use crate::Identifier;

    fn assert_same_as_serde<T: WriteJson + Serialize>(record: &T) {
        let mut fast = Vec::new();
        record.write_json(&mut fast);
        let reference = serde_json::to_vec(record).unwrap();
        assert_eq!(
            String::from_utf8(fast).unwrap(),
            String::from_utf8(reference).unwrap()
        );
    }

    /// Text that exercises every escaping rule: quotes, backslashes, control characters,
    /// non-ASCII and DEL.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9@.+-]{0,12}",
            "[\"\\\\\u{0}-\u{1f}\u{7f}a-zé😀 ]{0,8}",
        ]
    }

    fn meta(kafka: bool, key: String) -> RecordMeta {
        let input = if kafka {
            InputCoordinates::Kafka {
                topic: "web".into(),
                partition: 3,
                offset: -1,
            }
        } else {
            InputCoordinates::File {
                file: "in \"x\".jsonl".into(),
                line: 7,
            }
        };
        RecordMeta {
            input,
            idempotency_key: key,
        }
    }

    fn rule() -> impl Strategy<Value = LinkRule> {
        prop_oneof![
            Just(LinkRule::Created),
            (short_text(), short_text())
                .prop_map(|(kind, value)| LinkRule::SharedIdentifier { kind, value }),
            (-5.0f64..30.0, short_text()).prop_map(|(score, field)| LinkRule::Fuzzy {
                score,
                fields: vec![FieldScore {
                    field,
                    level: "close".into(),
                    similarity: 0.93,
                    weight: score / 3.0,
                }],
            }),
            Just(LinkRule::SameEvent),
            Just(LinkRule::CoOccurrence),
        ]
    }

    /// Text for the profile's compact strings.
    fn short_text() -> impl Strategy<Value = CompactString> {
        text().prop_map(CompactString::from)
    }

    fn profile() -> impl Strategy<Value = Profile> {
        (
            text(),
            prop::collection::vec((short_text(), short_text(), short_text()), 0..4),
            prop::collection::btree_map(short_text(), (short_text(), short_text()), 0..4),
            prop::collection::btree_map(
                short_text(),
                prop::collection::btree_map(short_text(), any::<u64>(), 0..3),
                0..3,
            ),
            prop::collection::btree_map(short_text(), any::<i64>(), 0..3),
            prop::collection::btree_set(short_text(), 0..3),
            prop::option::of((-1e9f64..1e9, short_text())),
            prop::collection::vec(text(), 0..3),
        )
            .prop_map(
                |(id, identifiers, traits, events, ltv, channels, sentiment, absorbed)| Profile {
                    customer_id: id.clone(),
                    created_at: "2026-03-01T12:00:00Z".into(),
                    version: 4,
                    identifiers: identifiers
                        .into_iter()
                        .map(|(kind, value, source)| ProfileIdentifier {
                            kind,
                            value,
                            first_seen: "2026-03-01T12:00:00Z".into(),
                            last_seen: "2026-03-02T12:00:00Z".into(),
                            source,
                        })
                        .collect(),
                    traits: traits
                        .into_iter()
                        .map(|(name, (value, source))| {
                            let updated_at = CompactString::from(&id);
                            (
                                name,
                                TraitValue {
                                    value,
                                    source,
                                    updated_at,
                                },
                            )
                        })
                        .collect(),
                    computed: ComputedTraits {
                        event_count: 9,
                        events: events
                            .into_iter()
                            .map(|(source, by_type)| (source, by_type.into_iter().collect()))
                            .collect(),
                        first_seen: "a".into(),
                        last_seen: "b".into(),
                        order_count: 2,
                        lifetime_value_minor: ltv.into_iter().collect(),
                        channels: channels.into_iter().collect(),
                        latest_sentiment: sentiment
                            .clone()
                            .map(|(value, at)| TimedNumber { value, at }),
                        follower_reach: sentiment.map(|(value, at)| TimedNumber {
                            value: value.abs().floor(),
                            at,
                        }),
                    },
                    absorbed_ids: absorbed,
                },
            )
    }

    proptest! {
        #[test]
        fn profiles_encode_as_serde_does(profile in profile()) {
            assert_same_as_serde(&profile);
            let json = ProfileJson::encode(&profile);
            prop_assert_eq!(json.decode().unwrap(), profile.clone());
            let record = ProfileRecord {
                schema_version: SCHEMA_VERSION,
                customer_id: profile.customer_id.clone(),
                profile: Some(json),
                merged_into: None,
                meta: meta(false, profile.customer_id),
            };
            assert_same_as_serde(&record);
        }

        #[test]
        fn enriched_events_encode_as_serde_does(
            id in text(),
            identifiers in prop::collection::btree_map(short_text(), prop::collection::vec(short_text(), 0..3), 0..4),
            traits in prop::collection::btree_map(short_text(), short_text(), 0..4),
            rule in rule(),
            merged_ids in prop::collection::vec(text(), 0..3),
            refused_kind in prop::option::of(text()),
            with_issue in any::<bool>(),
            kafka in any::<bool>(),
        ) {
            let properties = json!({"amount": 19.99, "note": id.clone(), "n": [1, null, true]});
            let event = EnrichedEvent {
                schema_version: SCHEMA_VERSION,
                event_id: id.as_str().into(),
                customer_id: "c-1".into(),
                source: "web".into(),
                event_type: id.as_str().into(),
                timestamp: "2026-03-01T12:00:00Z".into(),
                identifiers: identifiers.into_iter().collect(),
                traits: traits.into_iter().collect(),
                properties: properties.as_object().unwrap().clone(),
                resolution: Resolution {
                    action: ResolutionAction::Merged,
                    rule,
                    merged_ids,
                    refused: refused_kind
                        .into_iter()
                        .map(|kind| RefusedMerge {
                            rule: RefusalRule::KindLimit,
                            other_customer_id: Some(kind.clone()),
                            kind: Some(kind.into()),
                        })
                        .collect(),
                },
                quality_issues: if with_issue {
                    vec![QualityIssue { field: "identifiers.phone".into(), kind: IssueKind::Invalid }]
                } else {
                    Vec::new()
                },
                meta: meta(kafka, id),
            };
            assert_same_as_serde(&event);
        }

        #[test]
        fn identity_changes_encode_as_serde_does(
            kind in text(),
            value in text(),
            rule in rule(),
            other in prop::option::of(text()),
            shape in 0..5usize,
            kafka in any::<bool>(),
        ) {
            let change = match shape {
                0 => ChangeKind::Created {
                    identifiers: vec![Identifier::new(kind.clone(), value.clone())],
                },
                1 => ChangeKind::Merged { survivor: value.clone(), absorbed: vec![kind.clone()], rule },
                2 => ChangeKind::IdentifierAdded { kind: kind.as_str().into(), value: value.as_str().into(), rule },
                3 => ChangeKind::MergeRefused {
                    rule: RefusalRule::GenericValue,
                    other_customer_id: other.clone(),
                    kind: other.map(CompactString::from),
                    linking_kind: kind.as_str().into(),
                },
                _ => ChangeKind::IdentifierGeneric { kind: kind.as_str().into(), value: value.as_str().into(), profiles_seen: 12 },
            };
            let record = IdentityChange {
                schema_version: SCHEMA_VERSION,
                customer_id: value.clone(),
                event_id: kind.into(),
                source: "mobile".into(),
                at: "2026-03-01T12:00:00Z".into(),
                change,
                meta: meta(kafka, value),
            };
            assert_same_as_serde(&record);
        }
    }

    #[test]
    fn tombstones_encode_as_serde_does() {
        let tombstone = ProfileRecord {
            schema_version: SCHEMA_VERSION,
            customer_id: "c-2".into(),
            profile: None,
            merged_into: Some("c-1".into()),
            meta: meta(true, "k".into()),
        };
        assert_same_as_serde(&tombstone);
    }
}
