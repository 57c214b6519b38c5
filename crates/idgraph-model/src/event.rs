//! The touchpoint event envelope and its parsers (canonical envelope and Segment Spec).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{FailureKind, ParseError};
use crate::sorted::SortedMap;

/// One touchpoint as it arrived, before normalization.
///
/// Identifier and trait values are kept raw here; [`crate::normalize`] turns them into the
/// forms that the identity graph stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawEvent {
    pub event_id: CompactString,
    pub source: CompactString,
    pub event_type: CompactString,
    /// The event time as sent, in RFC 3339.
    pub timestamp: CompactString,
    /// Raw identifier values in input order, as `(kind, value)`; a kind may repeat.
    pub identifiers: Vec<(CompactString, CompactString)>,
    /// Raw trait values by trait name.
    pub traits: SortedMap<CompactString, CompactString>,
    /// Free-form event properties, passed through to the enriched event.
    pub properties: Map<String, Value>,
    /// Optional fields left out because their value had the wrong type (`identifiers`,
    /// `identifiers.email`, `traits`, `properties`, Segment's `anonymousId`, …): the event is
    /// kept without them, and normalizing reports each as a quality issue.
    pub wrong_type_fields: Vec<String>,
}

impl RawEvent {
    /// The event time parsed as UTC.
    pub fn time(&self) -> DateTime<Utc> {
        // `parse_event` has already validated the timestamp, so this cannot fail for events
        // that came from it; a hand-built event with a bad time sorts as the epoch.
        DateTime::parse_from_rfc3339(&self.timestamp)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }
}

/// Segment Spec message types that the parser recognises.
const SEGMENT_TYPES: [&str; 5] = ["identify", "track", "page", "screen", "alias"];

/// Trait names that the Segment Spec carries inside `traits` but that idgraph treats as
/// identifiers.
const SEGMENT_IDENTIFIER_TRAITS: [&str; 2] = ["email", "phone"];

/// Parses one message (a Kafka value or a JSONL line) into a [`RawEvent`].
///
/// `default_source` names the source for messages that do not say their own (Segment Spec
/// messages normally do not). Both the canonical envelope and Segment Spec messages are
/// accepted; a message with a Segment `type` and no `event_id` is read as Segment Spec.
pub fn parse_event(payload: &[u8], default_source: &str) -> Result<RawEvent, ParseError> {
    if let Some(event) = std::str::from_utf8(payload)
        .ok()
        .and_then(|text| crate::canonical::parse(text, default_source))
    {
        validate_timestamp(&event.timestamp)?;
        return Ok(event);
    }
    parse_general(payload, default_source)
}

/// [`parse_event`] through a JSON tree of the whole message: every accepted shape and every
/// error.
pub(crate) fn parse_general(payload: &[u8], default_source: &str) -> Result<RawEvent, ParseError> {
    let object = decode_object(payload)?;
    let is_segment = !object.contains_key("event_id")
        && object
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| SEGMENT_TYPES.contains(&t));
    let event = if is_segment {
        parse_segment(&object, default_source)?
    } else {
        parse_canonical(object, default_source)?
    };
    validate_timestamp(&event.timestamp)?;
    Ok(event)
}

/// Bytes → a JSON object, or the reason they are not one.
fn decode_object(payload: &[u8]) -> Result<Map<String, Value>, ParseError> {
    let text = std::str::from_utf8(payload).map_err(|e| {
        ParseError::new(
            FailureKind::InvalidUtf8,
            format!("payload is not valid utf-8: {e}"),
        )
    })?;
    if text.trim().is_empty() {
        return Err(ParseError::new(
            FailureKind::EmptyPayload,
            "payload is empty",
        ));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ParseError::new(
            FailureKind::InvalidJson,
            format!("payload is not valid json: {e}"),
        )
    })?;
    match value {
        Value::Object(object) => Ok(object),
        other => Err(ParseError::new(
            FailureKind::WrongType,
            format!("payload must be a json object, found {}", json_type(&other)),
        )),
    }
}

/// How to read a source's own JSON format without code: JSON pointers (RFC 6901, e.g.
/// `/contact/email`) to the envelope's fields. The `[engine.mappings.<source>]` config table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    pub event_id: String,
    pub event_type: String,
    pub timestamp: String,
    /// JSON pointer → identifier kind; a pointer may lead to a string, number or array.
    #[serde(default)]
    pub identifiers: BTreeMap<String, String>,
    /// JSON pointer → trait name.
    #[serde(default)]
    pub traits: BTreeMap<String, String>,
    /// JSON pointer to an object passed through as the event's properties.
    #[serde(default)]
    pub properties: Option<String>,
}

impl FieldMapping {
    /// Every pointer of the mapping, for validation.
    pub fn pointers(&self) -> impl Iterator<Item = &str> {
        [&self.event_id, &self.event_type, &self.timestamp]
            .into_iter()
            .chain(self.identifiers.keys())
            .chain(self.traits.keys())
            .chain(self.properties.iter())
            .map(String::as_str)
    }
}

/// Parses a message of a source that declared a [`FieldMapping`].
pub fn parse_mapped(
    payload: &[u8],
    mapping: &FieldMapping,
    source: &str,
) -> Result<RawEvent, ParseError> {
    let object = Value::Object(decode_object(payload)?);
    let required = |pointer: &str| -> Result<String, ParseError> {
        let missing = || {
            ParseError::new(
                FailureKind::MissingField,
                format!("required field at json pointer {pointer:?} is missing or empty"),
            )
            .with_field(pointer)
        };
        match object.pointer(pointer) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            None | Some(Value::Null) | Some(Value::String(_)) => Err(missing()),
            Some(other) => Err(ParseError::new(
                FailureKind::WrongType,
                format!(
                    "field at json pointer {pointer:?} must be a string, found {}",
                    json_type(other)
                ),
            )
            .with_field(pointer)),
        }
    };
    let event_id = required(&mapping.event_id)?;
    let event_type = required(&mapping.event_type)?;
    let timestamp = required(&mapping.timestamp)?;
    let mut identifiers = Vec::new();
    let mut wrong_type_fields = Vec::new();
    for (pointer, kind) in &mapping.identifiers {
        if let Some(value) = object.pointer(pointer) {
            if !collect_identifier_values(kind, value, &mut identifiers) {
                wrong_type_fields.push(pointer.clone());
            }
        }
    }
    let mut traits = SortedMap::new();
    for (pointer, name) in &mapping.traits {
        if let Some(text) = object.pointer(pointer).and_then(scalar_text) {
            traits.insert(name.as_str().into(), text.into());
        }
    }
    let properties = mapping
        .properties
        .as_deref()
        .and_then(|pointer| object.pointer(pointer))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    validate_timestamp(&timestamp)?;
    Ok(RawEvent {
        event_id: event_id.into(),
        source: source.into(),
        event_type: event_type.into(),
        timestamp: timestamp.into(),
        identifiers,
        traits,
        properties,
        wrong_type_fields,
    })
}

/// Takes the envelope's values out of the parsed message instead of copying them: every
/// canonical event comes this way, and the message is dropped right after.
fn parse_canonical(
    mut object: Map<String, Value>,
    default_source: &str,
) -> Result<RawEvent, ParseError> {
    let event_id = require(take_string(&mut object, "event_id")?, "event_id")?;
    let event_type = require(take_string(&mut object, "event_type")?, "event_type")?;
    let timestamp = require(take_string(&mut object, "timestamp")?, "timestamp")?;
    let source = take_string(&mut object, "source")?.unwrap_or_else(|| default_source.to_owned());
    let mut identifiers = Vec::new();
    let mut wrong_type_fields = Vec::new();
    match object.remove("identifiers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(ids)) => {
            for (kind, value) in ids {
                match value {
                    Value::String(text) => identifiers.push((kind.into(), text.into())),
                    other => {
                        if !collect_identifier_values(&kind, &other, &mut identifiers) {
                            wrong_type_fields.push(format!("identifiers.{kind}"));
                        }
                    }
                }
            }
        }
        Some(_) => wrong_type_fields.push("identifiers".to_owned()),
    }
    let traits = match object.get("traits") {
        None | Some(Value::Null) => SortedMap::new(),
        Some(Value::Object(traits)) => collect_traits(traits, &[]),
        Some(_) => {
            wrong_type_fields.push("traits".to_owned());
            SortedMap::new()
        }
    };
    let properties = match object.remove("properties") {
        Some(Value::Null) | None => Map::new(),
        Some(Value::Object(properties)) => properties,
        Some(_) => {
            wrong_type_fields.push("properties".to_owned());
            Map::new()
        }
    };
    Ok(RawEvent {
        event_id: event_id.into(),
        source: source.into(),
        event_type: event_type.into(),
        timestamp: timestamp.into(),
        identifiers,
        traits,
        properties,
        wrong_type_fields,
    })
}

/// Maps a Segment Spec message onto the envelope: `messageId` → `event_id`, `userId` →
/// `user_id`, `anonymousId` and `previousId` → `cookie_id`, `context.device.id` →
/// `device_id`, `email`/`phone` traits → identifiers, the rest of the traits → traits.
fn parse_segment(
    object: &Map<String, Value>,
    default_source: &str,
) -> Result<RawEvent, ParseError> {
    let message_type = required_string(object, "type")?;
    let event_id = required_string(object, "messageId")?;
    let timestamp = required_string(object, "timestamp")?;
    let source = optional_string(object, "source")?.unwrap_or_else(|| default_source.to_owned());
    let event_type = match message_type.as_str() {
        "track" => optional_string(object, "event")?.unwrap_or_else(|| "track".to_owned()),
        other => other.to_owned(),
    };
    let mut identifiers = Vec::new();
    let mut wrong_type_fields = Vec::new();
    for (field, kind) in [
        ("userId", "user_id"),
        ("anonymousId", "cookie_id"),
        ("previousId", "cookie_id"),
    ] {
        if let Some(value) = object.get(field) {
            if !collect_identifier_values(kind, value, &mut identifiers) {
                wrong_type_fields.push(field.to_owned());
            }
        }
    }
    let context = object.get("context").and_then(Value::as_object);
    if let Some(device_id) = context
        .and_then(|c| c.get("device"))
        .and_then(|d| d.get("id"))
    {
        if !collect_identifier_values("device_id", device_id, &mut identifiers) {
            wrong_type_fields.push("context.device.id".to_owned());
        }
    }
    let mut traits = SortedMap::new();
    let trait_objects = [
        context
            .and_then(|c| c.get("traits"))
            .and_then(Value::as_object),
        object.get("traits").and_then(Value::as_object),
    ];
    for trait_object in trait_objects.into_iter().flatten() {
        for kind in SEGMENT_IDENTIFIER_TRAITS {
            if let Some(value) = trait_object.get(kind) {
                if !collect_identifier_values(kind, value, &mut identifiers) {
                    wrong_type_fields.push(format!("traits.{kind}"));
                }
            }
        }
        traits.extend(collect_traits(trait_object, &SEGMENT_IDENTIFIER_TRAITS));
    }
    let properties = object
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    Ok(RawEvent {
        event_id: event_id.into(),
        source: source.into(),
        event_type: event_type.into(),
        timestamp: timestamp.into(),
        identifiers,
        traits,
        properties,
        wrong_type_fields,
    })
}

fn validate_timestamp(timestamp: &str) -> Result<(), ParseError> {
    DateTime::parse_from_rfc3339(timestamp)
        .map(|_| ())
        .map_err(|e| {
            ParseError::new(
                FailureKind::InvalidTimestamp,
                format!("timestamp {timestamp:?} is not rfc 3339: {e}"),
            )
            .with_field("timestamp")
        })
}

fn required_string(object: &Map<String, Value>, field: &str) -> Result<String, ParseError> {
    require(optional_string(object, field)?, field)
}

/// A required field's value, or why it is missing.
fn require(value: Option<String>, field: &str) -> Result<String, ParseError> {
    match value {
        Some(value) if !value.trim().is_empty() => Ok(value),
        Some(_) => Err(ParseError::new(
            FailureKind::MissingField,
            format!("required field {field:?} is empty"),
        )
        .with_field(field)),
        None => Err(ParseError::new(
            FailureKind::MissingField,
            format!("required field {field:?} is missing"),
        )
        .with_field(field)),
    }
}

/// [`optional_string`], moving a string value out of `object` instead of copying it.
fn take_string(object: &mut Map<String, Value>, field: &str) -> Result<Option<String>, ParseError> {
    if let Some(Value::String(_)) = object.get(field) {
        if let Some(Value::String(text)) = object.remove(field) {
            return Ok(Some(text));
        }
    }
    optional_string(object, field)
}

fn optional_string(object: &Map<String, Value>, field: &str) -> Result<Option<String>, ParseError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        // Numeric ids are common in exports; accepting them loses nothing.
        Some(Value::Number(n)) if field != "timestamp" => Ok(Some(n.to_string())),
        Some(other) => Err(ParseError::new(
            FailureKind::WrongType,
            format!(
                "field {field:?} must be a string, found {}",
                json_type(other)
            ),
        )
        .with_field(field)),
    }
}

/// Adds the values of one identifier kind: a string, a number, or an array of them. Nulls are
/// skipped (they say "no value"). Returns false, adding nothing, if the value has another type
/// (an object, an array of arrays): the sender's schema is broken for this field, and the
/// event is kept without it.
fn collect_identifier_values(
    kind: &str,
    value: &Value,
    out: &mut Vec<(CompactString, CompactString)>,
) -> bool {
    let well_typed = match value {
        Value::Array(items) => items
            .iter()
            .all(|item| matches!(item, Value::Null | Value::String(_) | Value::Number(_))),
        Value::Null | Value::String(_) | Value::Number(_) => true,
        _ => false,
    };
    if !well_typed {
        return false;
    }
    let items = match value {
        Value::Array(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    for item in items {
        match item {
            Value::String(s) => out.push((kind.into(), s.as_str().into())),
            Value::Number(n) => out.push((kind.into(), n.to_string().into())),
            _ => {}
        }
    }
    true
}

/// Keeps scalar trait values as strings; nested objects (a Segment `address`) are flattened
/// one level with the inner key (`address.city` → `city`).
pub(crate) fn collect_traits(
    object: &Map<String, Value>,
    skip: &[&str],
) -> SortedMap<CompactString, CompactString> {
    let mut traits = SortedMap::new();
    for (key, value) in object {
        if skip.contains(&key.as_str()) {
            continue;
        }
        match value {
            Value::Object(inner) => {
                for (inner_key, inner_value) in inner {
                    if let Some(text) = scalar_text(inner_value) {
                        traits.insert(map_segment_trait(inner_key).into(), text.into());
                    }
                }
            }
            other => {
                if let Some(text) = scalar_text(other) {
                    traits.insert(map_segment_trait(key).into(), text.into());
                }
            }
        }
    }
    traits
}

/// Segment's reserved trait names in camelCase map onto idgraph's snake_case traits.
fn map_segment_trait(key: &str) -> String {
    match key {
        "firstName" => "first_name",
        "lastName" => "last_name",
        "birthday" => "date_of_birth",
        "postalCode" => "postcode",
        other => other,
    }
    .to_owned()
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crm_mapping() -> FieldMapping {
        FieldMapping {
            event_id: "/id".into(),
            event_type: "/kind".into(),
            timestamp: "/at".into(),
            identifiers: [
                ("/contact/mail".to_owned(), "email".to_owned()),
                ("/crm_ref".to_owned(), "crm_id".to_owned()),
            ]
            .into(),
            traits: [("/person/given".to_owned(), "first_name".to_owned())].into(),
            properties: Some("/extra".into()),
        }
    }

    #[test]
    fn a_field_mapping_reads_a_native_format() {
        let line = br#"{"id":"c-1","kind":"signup","at":"2026-03-01T12:00:00Z","crm_ref":77,
            "contact":{"mail":["Ann@X.com","ann@y.com"]},"person":{"given":"Ann"},"extra":{"plan":"gold"}}"#;
        let event = parse_mapped(line, &crm_mapping(), "crm").unwrap();
        assert_eq!(
            (
                event.event_id.as_str(),
                event.source.as_str(),
                event.event_type.as_str()
            ),
            ("c-1", "crm", "signup")
        );
        assert_eq!(
            event.identifiers,
            vec![
                ("email".into(), "Ann@X.com".into()),
                ("email".into(), "ann@y.com".into()),
                ("crm_id".into(), "77".into()),
            ]
        );
        assert_eq!(event.traits["first_name"], "Ann");
        assert_eq!(event.properties["plan"], "gold");
    }

    #[test]
    fn a_mapped_message_without_its_id_names_the_pointer() {
        let error = parse_mapped(
            br#"{"kind":"x","at":"2026-03-01T12:00:00Z"}"#,
            &crm_mapping(),
            "crm",
        )
        .unwrap_err();
        assert_eq!(error.kind, FailureKind::MissingField);
        assert_eq!(error.field.as_deref(), Some("/id"));
        assert!(error.reason.contains("\"/id\""), "{}", error.reason);
    }

    #[test]
    fn canonical_envelope_keeps_every_identifier_value_and_custom_kinds() {
        let line = br#"{"event_id":"w1","source":"web","event_type":"page_view",
            "timestamp":"2026-03-01T12:00:00Z",
            "identifiers":{"email":["a@x.com","b@x.com"],"crm_id":"77"},
            "traits":{"first_name":"Ann"},"properties":{"amount":3}}"#;
        let event = parse_event(line, "web").unwrap();
        assert_eq!(
            event.identifiers,
            vec![
                ("crm_id".into(), "77".into()),
                ("email".into(), "a@x.com".into()),
                ("email".into(), "b@x.com".into()),
            ]
        );
        assert_eq!(event.traits["first_name"], "Ann");
    }

    #[test]
    fn segment_identify_maps_user_anonymous_device_and_traits() {
        let line = br#"{"type":"identify","messageId":"m1","timestamp":"2026-03-01T12:00:00Z",
            "userId":"u-1","anonymousId":"anon-9","context":{"device":{"id":"dev-3"}},
            "traits":{"email":"Ann@X.com","firstName":"Ann","address":{"city":"Springfield"}}}"#;
        let event = parse_event(line, "mobile").unwrap();
        assert_eq!(event.source, "mobile");
        assert_eq!(event.event_type, "identify");
        assert!(event
            .identifiers
            .contains(&("user_id".into(), "u-1".into())));
        assert!(event
            .identifiers
            .contains(&("cookie_id".into(), "anon-9".into())));
        assert!(event
            .identifiers
            .contains(&("device_id".into(), "dev-3".into())));
        assert!(event
            .identifiers
            .contains(&("email".into(), "Ann@X.com".into())));
        assert_eq!(event.traits["first_name"], "Ann");
        assert_eq!(event.traits["city"], "Springfield");
    }

    #[test]
    fn failures_are_classified() {
        let kind = |payload: &[u8]| parse_event(payload, "web").unwrap_err().kind;
        assert_eq!(kind(b"{not json"), FailureKind::InvalidJson);
        assert_eq!(kind(b"\xff\xfe"), FailureKind::InvalidUtf8);
        assert_eq!(kind(b"  "), FailureKind::EmptyPayload);
        assert_eq!(kind(b"[1,2]"), FailureKind::WrongType);
        assert_eq!(
            kind(br#"{"event_type":"x","timestamp":"2026-03-01T12:00:00Z"}"#),
            FailureKind::MissingField
        );
        assert_eq!(
            kind(br#"{"event_id":"1","event_type":"x","timestamp":"yesterday"}"#),
            FailureKind::InvalidTimestamp
        );
        assert_eq!(
            kind(br#"{"event_id":{"a":1},"event_type":"x","timestamp":"2026-03-01T12:00:00Z"}"#),
            FailureKind::WrongType,
            "a required field of the wrong type"
        );
    }

    #[test]
    fn optional_fields_of_the_wrong_type_are_left_out_and_the_event_kept() {
        let event = parse_event(
            br#"{"event_id":"1","event_type":"x","timestamp":"2026-03-01T12:00:00Z",
            "identifiers":{"email":{"a":1},"phone":[["+1"]],"user_id":"u-1"},
            "traits":"none","properties":[1]}"#,
            "web",
        )
        .unwrap();
        assert_eq!(event.identifiers, vec![("user_id".into(), "u-1".into())]);
        assert_eq!(
            event.wrong_type_fields,
            [
                "identifiers.email",
                "identifiers.phone",
                "traits",
                "properties"
            ]
        );
        let event = parse_event(
            br#"{"event_id":"2","event_type":"x","timestamp":"2026-03-01T12:00:00Z","identifiers":"a@b.co"}"#,
            "web",
        )
        .unwrap();
        assert_eq!(event.wrong_type_fields, ["identifiers"]);
        let segment = parse_event(
            br#"{"type":"track","messageId":"s2","userId":"u-2","anonymousId":{"x":1},
            "event":"Order","timestamp":"2026-01-01T00:00:00Z","context":{"traits":{"email":[{}]}}}"#,
            "web",
        )
        .unwrap();
        assert_eq!(segment.identifiers, vec![("user_id".into(), "u-2".into())]);
        assert_eq!(segment.wrong_type_fields, ["anonymousId", "traits.email"]);
    }
}
