//! Profile building: applying an event to a profile and merging two profiles.
//!
//! Every rule here is order-independent for independent events: the latest value of a trait
//! is chosen by event time (ties by value), sums are integers, sets are ordered. That is what
//! lets the property tests shuffle independent events and expect the same profiles.

use std::sync::Arc;

use idgraph_model::normalize::NAME_TRAITS;
use idgraph_model::{
    CompactString, ComputedTraits, Identifier, NormalizedEvent, Profile, ProfileIdentifier,
    SortedMap, TimedNumber, TraitValue,
};
use serde_json::Value;

use crate::matching::{blocking_keys_from, MATCH_FIELDS};
use crate::state::ProfileState;

/// Event types that count as an order, whatever the source.
const ORDER_EVENT_TYPES: [&str; 5] = [
    "order_completed",
    "purchase",
    "order",
    "transaction",
    "checkout_completed",
];

/// A new, empty profile created by an event.
pub fn new_profile(customer_id: String, timestamp: &str) -> ProfileState {
    ProfileState {
        profile: Arc::new(Profile {
            customer_id,
            created_at: timestamp.into(),
            version: 0,
            identifiers: Vec::new(),
            traits: SortedMap::new(),
            computed: ComputedTraits {
                first_seen: timestamp.into(),
                last_seen: timestamp.into(),
                ..ComputedTraits::default()
            },
            absorbed_ids: Vec::new(),
        }),
        root: None,
        trait_history: SortedMap::new(),
        blocking_keys: Vec::new(),
        evidence_count: 0,
    }
}

/// Adds an identifier the profile does not hold yet, keeping the list sorted.
pub fn add_identifier(
    state: &mut ProfileState,
    identifier: &Identifier,
    source: &str,
    timestamp: &str,
) {
    let list = &mut Arc::make_mut(&mut state.profile).identifiers;
    let position = list.partition_point(|i| {
        (i.kind.as_str(), i.value.as_str()) < (&identifier.kind, &identifier.value)
    });
    if list
        .get(position)
        .is_some_and(|i| i.kind == identifier.kind && i.value == identifier.value)
    {
        return;
    }
    list.insert(
        position,
        ProfileIdentifier {
            kind: identifier.kind.clone(),
            value: identifier.value.clone(),
            first_seen: timestamp.into(),
            last_seen: timestamp.into(),
            source: source.into(),
        },
    );
}

/// Applies one event to its profile: identifier times, traits, trait history and computed
/// traits.
pub fn apply_event(
    state: &mut ProfileState,
    event: &NormalizedEvent,
    timestamp: &str,
    history_len: usize,
) {
    let source = &event.raw.source;
    let profile = Arc::make_mut(&mut state.profile);
    for identifier in &event.identifiers {
        if let Ok(i) = profile.identifiers.binary_search_by(|p| {
            (p.kind.as_str(), p.value.as_str()).cmp(&(&identifier.kind, &identifier.value))
        }) {
            let held = &mut profile.identifiers[i];
            if timestamp < held.first_seen.as_str() {
                overwrite(&mut held.first_seen, timestamp);
                overwrite(&mut held.source, source);
            }
            if timestamp > held.last_seen.as_str() {
                overwrite(&mut held.last_seen, timestamp);
            }
        }
    }
    for (name, normalized) in &event.traits {
        let shown = display_value(event, name, normalized);
        match profile.traits.get_mut(name) {
            Some(current) => {
                if (timestamp, shown) > (current.updated_at.as_str(), current.value.as_str()) {
                    overwrite(&mut current.value, shown);
                    overwrite(&mut current.source, source);
                    overwrite(&mut current.updated_at, timestamp);
                }
            }
            None => {
                let value = TraitValue {
                    value: shown.into(),
                    source: source.clone(),
                    updated_at: timestamp.into(),
                };
                profile.traits.insert(name.clone(), value);
            }
        }
        if MATCH_FIELDS.contains(&name.as_str()) {
            let history = match state.trait_history.get_mut(name) {
                Some(history) => history,
                None => state.trait_history.get_or_default(name.clone()),
            };
            remember(history, normalized, history_len);
        }
    }
    update_computed(&mut profile.computed, event, timestamp);
    profile.version += 1;
}

/// Traits a profile shows as people wrote them (trimmed) rather than normalized.
const SHOWN_AS_WRITTEN: [&str; 5] = ["first_name", "last_name", "street", "city", "postcode"];

/// Profiles show names and addresses as people wrote them, dates of birth as ISO dates.
fn display_value<'a>(event: &'a NormalizedEvent, name: &str, normalized: &'a str) -> &'a str {
    let is_matching_text = NAME_TRAITS.contains(&name) || SHOWN_AS_WRITTEN.contains(&name);
    match event.raw.traits.get(name) {
        Some(raw) if is_matching_text && name != "date_of_birth" => raw.trim(),
        _ => normalized,
    }
}

/// Replaces a string's contents in its own buffer. Profile fields are rewritten by almost
/// every event, mostly with a value of the same length (a timestamp), so a value too long to
/// be stored inline still costs no allocation.
fn overwrite(slot: &mut CompactString, value: &str) {
    slot.clear();
    slot.push_str(value);
}

/// Later event time wins; at the same time the larger value wins, so the result does not
/// depend on which event arrived first.
fn is_newer(candidate: &TraitValue, current: &TraitValue) -> bool {
    (candidate.updated_at.as_str(), candidate.value.as_str())
        > (current.updated_at.as_str(), current.value.as_str())
}

/// Keeps a value in a short history: a value already there is left where it is, a new one is
/// appended, and the list is kept sorted so the history does not depend on arrival order.
fn remember(history: &mut Vec<CompactString>, value: &str, limit: usize) {
    if limit == 0 || history.iter().any(|v| v == value) {
        return;
    }
    if history.len() >= limit {
        // Once full, new spellings are not recorded: the first values seen are kept.
        return;
    }
    let position = history.partition_point(|v| v.as_str() < value);
    history.insert(position, value.into());
}

fn update_computed(computed: &mut ComputedTraits, event: &NormalizedEvent, timestamp: &str) {
    let raw = &event.raw;
    computed.event_count += 1;
    // Most events repeat a source and type the profile has seen: look before allocating keys.
    let by_type = match computed.events.get_mut(&raw.source) {
        Some(by_type) => by_type,
        None => computed.events.get_or_default(raw.source.clone()),
    };
    match by_type.get_mut(&raw.event_type) {
        Some(count) => *count += 1,
        None => {
            by_type.insert(raw.event_type.clone(), 1);
        }
    }
    if computed.first_seen.is_empty() || timestamp < computed.first_seen.as_str() {
        overwrite(&mut computed.first_seen, timestamp);
    }
    if timestamp > computed.last_seen.as_str() {
        overwrite(&mut computed.last_seen, timestamp);
    }
    if !computed.channels.contains(&raw.source) {
        computed.channels.insert(raw.source.clone());
    }
    let amount = raw.properties.get("amount").and_then(Value::as_f64);
    let is_order = ORDER_EVENT_TYPES.contains(&raw.event_type.as_str())
        || (raw.source == "transaction" && amount.is_some());
    if is_order {
        computed.order_count += 1;
        if let Some(amount) = amount {
            let currency = raw
                .properties
                .get("currency")
                .and_then(Value::as_str)
                .map(|code| CompactString::from(code.to_ascii_uppercase()))
                .unwrap_or_else(|| "XXX".into());
            *computed.lifetime_value_minor.get_or_default(currency) +=
                (amount * 100.0).round() as i64;
        }
    }
    if let Some(sentiment) = raw.properties.get("sentiment").and_then(Value::as_f64) {
        keep_latest(&mut computed.latest_sentiment, sentiment, timestamp);
    }
    if let Some(followers) = raw.properties.get("followers").and_then(Value::as_f64) {
        keep_latest(&mut computed.follower_reach, followers, timestamp);
    }
}

fn keep_latest(slot: &mut Option<TimedNumber>, value: f64, at: &str) {
    let newer = match slot {
        None => true,
        Some(current) => (at, value) > (current.at.as_str(), current.value),
    };
    if newer {
        *slot = Some(TimedNumber {
            value,
            at: at.into(),
        });
    }
}

/// Folds `absorbed` into `survivor`. Identifier sets are disjoint (each identifier belongs to
/// one profile), so their lists interleave.
pub fn merge_into(survivor: &mut ProfileState, absorbed: ProfileState, history_len: usize) {
    let ProfileState {
        profile: other,
        trait_history,
        blocking_keys,
        ..
    } = absorbed;
    let other = Arc::unwrap_or_clone(other);
    let profile = Arc::make_mut(&mut survivor.profile);
    for identifier in other.identifiers {
        let list = &mut profile.identifiers;
        let position = list.partition_point(|i| {
            (i.kind.as_str(), i.value.as_str()) < (&identifier.kind, &identifier.value)
        });
        list.insert(position, identifier);
    }
    for (name, value) in other.traits {
        match profile.traits.get(&name) {
            Some(current) if !is_newer(&value, current) => {}
            _ => {
                profile.traits.insert(name, value);
            }
        }
    }
    for (name, values) in trait_history {
        let history = survivor.trait_history.get_or_default(name);
        for value in values {
            remember(history, &value, history_len);
        }
    }
    for key in blocking_keys {
        if let Err(position) = survivor.blocking_keys.binary_search(&key) {
            survivor.blocking_keys.insert(position, key);
        }
    }
    merge_computed(&mut profile.computed, other.computed);
    profile.absorbed_ids.push(other.customer_id);
    profile.absorbed_ids.extend(other.absorbed_ids);
    profile.version += 1;
}

fn merge_computed(into: &mut ComputedTraits, other: ComputedTraits) {
    into.event_count += other.event_count;
    for (source, types) in other.events {
        let entry = into.events.get_or_default(source);
        for (event_type, count) in types {
            *entry.get_or_default(event_type) += count;
        }
    }
    if other.first_seen < into.first_seen {
        into.first_seen = other.first_seen;
    }
    if other.last_seen > into.last_seen {
        into.last_seen = other.last_seen;
    }
    into.order_count += other.order_count;
    for (currency, minor) in other.lifetime_value_minor {
        *into.lifetime_value_minor.get_or_default(currency) += minor;
    }
    into.channels.extend(other.channels);
    if let Some(s) = other.latest_sentiment {
        keep_latest(&mut into.latest_sentiment, s.value, &s.at);
    }
    if let Some(f) = other.follower_reach {
        keep_latest(&mut into.follower_reach, f.value, &f.at);
    }
}

/// The blocking keys of a profile after `event`: from the event's values, with the profile's
/// remembered values filling fields the event lacks.
pub fn profile_blocking_keys(state: &ProfileState, event: &NormalizedEvent) -> Vec<String> {
    blocking_keys_from(|field| {
        event
            .traits
            .get(field)
            .or_else(|| state.trait_history.get(field).and_then(|h| h.first()))
            .map(CompactString::as_str)
    })
}
