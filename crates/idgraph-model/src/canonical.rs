//! A direct reader for the common case of the canonical envelope.
//!
//! The general parser first builds a JSON tree of the whole message (every key an allocated
//! string in a map) and then picks the envelope out of it; that was about a third of the cost
//! of reading an event. This reader takes the envelope's fields straight from the text. It
//! only handles the shape nearly every message has: the three required fields as non-blank
//! strings, `source` a string or null, `identifiers` an object of strings or arrays of
//! strings, `traits` and `properties` objects, each field at most once. For anything else it
//! answers `None` and the caller takes the general path, which also produces every error, so
//! both paths accept the same messages and give the same events.

use std::collections::BTreeMap;
use std::fmt;

use compact_str::CompactString;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::event::{collect_traits, RawEvent};

/// The envelope read from `text`, or `None` when the message needs the general parser.
pub(crate) fn parse(text: &str, default_source: &str) -> Option<RawEvent> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let fields = deserializer.deserialize_map(EnvelopeVisitor).ok()?;
    deserializer.end().ok()?;
    fields.into_event(default_source)
}

/// The envelope's fields as read, before the checks the general parser makes.
#[derive(Default)]
struct EnvelopeFields {
    event_id: Option<CompactString>,
    event_type: Option<CompactString>,
    timestamp: Option<CompactString>,
    source: Option<Option<CompactString>>,
    identifiers: Option<Vec<(CompactString, CompactString)>>,
    traits: Option<Map<String, Value>>,
    properties: Option<Option<Map<String, Value>>>,
}

impl EnvelopeFields {
    fn into_event(self, default_source: &str) -> Option<RawEvent> {
        let required = |value: Option<CompactString>| value.filter(|text| !text.trim().is_empty());
        Some(RawEvent {
            event_id: required(self.event_id)?,
            event_type: required(self.event_type)?,
            timestamp: required(self.timestamp)?,
            source: self
                .source
                .flatten()
                .unwrap_or_else(|| default_source.into()),
            identifiers: self.identifiers.unwrap_or_default(),
            traits: self
                .traits
                .map(|traits| collect_traits(&traits, &[]))
                .unwrap_or_default(),
            properties: self.properties.flatten().unwrap_or_default(),
            wrong_type_fields: Vec::new(),
        })
    }
}

/// A field read twice means the message is not the common shape (the general parser keeps
/// the last value); any error makes the caller fall back.
fn set_once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::custom("field repeated"));
    }
    *slot = Some(value);
    Ok(())
}

enum Field {
    EventId,
    EventType,
    Timestamp,
    Source,
    Identifiers,
    Traits,
    Properties,
    Other,
}

/// Reads a key without allocating it.
struct FieldVisitor;

impl Visitor<'_> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Field, E> {
        Ok(match name {
            "event_id" => Field::EventId,
            "event_type" => Field::EventType,
            "timestamp" => Field::Timestamp,
            "source" => Field::Source,
            "identifiers" => Field::Identifiers,
            "traits" => Field::Traits,
            "properties" => Field::Properties,
            _ => Field::Other,
        })
    }
}

impl<'de> DeserializeSeed<'de> for FieldVisitor {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field, D::Error> {
        deserializer.deserialize_str(self)
    }
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = EnvelopeFields;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvelopeFields, A::Error> {
        let mut fields = EnvelopeFields::default();
        while let Some(field) = map.next_key_seed(FieldVisitor)? {
            match field {
                Field::EventId => set_once(&mut fields.event_id, map.next_value()?)?,
                Field::EventType => set_once(&mut fields.event_type, map.next_value()?)?,
                Field::Timestamp => set_once(&mut fields.timestamp, map.next_value()?)?,
                Field::Source => set_once(&mut fields.source, map.next_value()?)?,
                Field::Identifiers => set_once(
                    &mut fields.identifiers,
                    map.next_value_seed(IdentifiersVisitor)?,
                )?,
                Field::Traits => set_once(&mut fields.traits, map.next_value()?)?,
                Field::Properties => set_once(&mut fields.properties, map.next_value()?)?,
                // Read in full, not skipped with `IgnoredAny`: the general parser rejects
                // what a tree cannot hold (a lone surrogate escape, for one) even in fields
                // it then ignores, and skipping does not check that.
                Field::Other => {
                    map.next_value::<Value>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// `{"kind": "value" | ["value", …], …}` in the general parser's order: by kind, and for a
/// repeated kind the last one.
struct IdentifiersVisitor;

impl<'de> DeserializeSeed<'de> for IdentifiersVisitor {
    type Value = Vec<(CompactString, CompactString)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for IdentifiersVisitor {
    type Value = Vec<(CompactString, CompactString)>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object of identifier values")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut by_kind: BTreeMap<CompactString, IdentifierValues> = BTreeMap::new();
        while let Some(kind) = map.next_key::<CompactString>()? {
            by_kind.insert(kind, map.next_value()?);
        }
        let mut identifiers = Vec::with_capacity(by_kind.len());
        for (kind, values) in by_kind {
            match values {
                IdentifierValues::One(value) => identifiers.push((kind, value)),
                IdentifierValues::Many(values) => {
                    identifiers.extend(values.into_iter().map(|value| (kind.clone(), value)))
                }
            }
        }
        Ok(identifiers)
    }
}

/// One identifier kind's value: a string or an array of strings; nulls, numbers and nesting
/// are left to the general parser.
enum IdentifierValues {
    One(CompactString),
    Many(Vec<CompactString>),
}

impl<'de> de::Deserialize<'de> for IdentifierValues {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(IdentifierValuesVisitor)
    }
}

struct IdentifierValuesVisitor;

impl<'de> Visitor<'de> for IdentifierValuesVisitor {
    type Value = IdentifierValues;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a string or an array of strings")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<IdentifierValues, E> {
        Ok(IdentifierValues::One(value.into()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<IdentifierValues, E> {
        Ok(IdentifierValues::One(value.into()))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<IdentifierValues, A::Error> {
        let mut values = Vec::new();
        while let Some(value) = seq.next_element::<CompactString>()? {
            values.push(value);
        }
        Ok(IdentifierValues::Many(values))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::event::{parse_event, parse_general};

    /// Both parsers on one message: the same event, or the same error.
    fn assert_same(payload: &str) {
        assert_eq!(
            parse_event(payload.as_bytes(), "web"),
            parse_general(payload.as_bytes(), "web"),
            "{payload}"
        );
    }

    #[test]
    fn the_common_shape_takes_the_direct_path() {
        let line = r#"{"event_id":"w1","source":"web","event_type":"page_view",
            "timestamp":"2026-03-01T12:00:00Z","identifiers":{"email":["a@x.com","b@x.com"],
            "crm_id":"77"},"traits":{"first_name":"Ann","address":{"city":"Springfield"}},
            "properties":{"amount":3.25,"tags":["a"]},"extra":{"x":[1,null]}}"#;
        assert!(super::parse(line, "web").is_some());
        assert_same(line);
    }

    #[test]
    fn odd_shapes_give_what_the_general_parser_gives() {
        for line in [
            // A repeated field: the general parser keeps the last value.
            r#"{"event_id":"a","event_id":"b","event_type":"t","timestamp":"2026-03-01T12:00:00Z"}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","identifiers":{"email":"x@y.z","email":"q@y.z"}}"#,
            // Numbers, nulls and nesting where strings are expected.
            r#"{"event_id":7,"event_type":"t","timestamp":"2026-03-01T12:00:00Z"}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","source":9}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","source":null}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","identifiers":null}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","identifiers":{"phone":[5,null,"1"]}}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","identifiers":{"phone":[["1"]]}}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","traits":null}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","properties":null}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","properties":[1]}"#,
            // Blank required fields, a bad time, a lone surrogate in an ignored field.
            r#"{"event_id":"  ","event_type":"t","timestamp":"2026-03-01T12:00:00Z"}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"soon"}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","note":"\ud800"}"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z","n":1e400}"#,
            // Escaped field names, Segment messages, not an object, trailing text.
            r#"{"event\u005fid":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z"}"#,
            r#"{"type":"track","messageId":"m","event":"e","timestamp":"2026-03-01T12:00:00Z","userId":"u"}"#,
            r#"["event_id"]"#,
            r#"{"event_id":"a","event_type":"t","timestamp":"2026-03-01T12:00:00Z"} x"#,
            "",
        ] {
            assert_same(line);
        }
    }

    fn json_string() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"a@x.com\"".to_owned()),
            Just("\"  \"".to_owned()),
            Just("\"2026-03-01T12:00:00Z\"".to_owned()),
            "[a-z \\\\\"é]{0,6}".prop_map(|text| serde_json::to_string(&text).unwrap()),
        ]
    }

    fn json_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            json_string(),
            Just("null".to_owned()),
            Just("12".to_owned()),
            Just("-0.5".to_owned()),
            Just("true".to_owned()),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec(("[a-z_]{1,3}", inner), 0..3).prop_map(|pairs| {
                    let fields: Vec<String> = pairs
                        .into_iter()
                        .map(|(key, value)| format!("\"{key}\":{value}"))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
    }

    fn field_name() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "event_id",
            "event_type",
            "timestamp",
            "source",
            "identifiers",
            "traits",
            "properties",
            "type",
            "messageId",
            "extra",
        ])
    }

    proptest! {
        /// Messages built from the envelope's field names with values of every type, some
        /// fields repeated or missing: the direct path never disagrees with the general one.
        #[test]
        fn both_paths_agree(
            fields in prop::collection::vec((field_name(), json_value()), 0..9),
            base in prop::bool::ANY,
        ) {
            let mut parts: Vec<String> = Vec::new();
            if base {
                parts.push("\"event_id\":\"e1\"".into());
                parts.push("\"event_type\":\"view\"".into());
                parts.push("\"timestamp\":\"2026-03-01T12:00:00Z\"".into());
            }
            parts.extend(fields.into_iter().map(|(name, value)| format!("\"{name}\":{value}")));
            assert_same(&format!("{{{}}}", parts.join(",")));
        }
    }
}
