//! The match features of profiles: what candidate search reads of a profile it compares an
//! event or another profile with (when it was created, its remembered trait values and its
//! compared identifiers), kept for many more profiles than the decoded state cache holds.
//!
//! Candidate search scores up to `fuzzy.max_candidates` profiles per event, and most of them
//! are strangers the event does not join. Loading each one meant a store read and decoding a
//! whole profile (identifiers with their times, traits, computed traits, blocking keys) only to
//! compare a handful of values, and the decoded profile then pushed hotter records out of the
//! [`StateCache`](crate::StateCache). Measured on 1M generated events, that was about a third of
//! resolving. A [`MatchFeatures`] holds only the compared values, in a few allocations, so a
//! budget holds several times as many of them as of decoded profiles.
//!
//! The cache never changes a result: an entry is made from the state a read would return, and
//! a batch forgets an entry as soon as it changes that customer (see `Batch`); while a batch
//! may change a customer, the customer is in the decoded cache, which is asked first.

use std::sync::Arc;

use idgraph_model::CompactString;
use rustc_hash::FxHashMap;

use crate::matching::model::push_values_of_kind;
use crate::matching::Side;
use crate::state::{memory, ProfileState};

/// The compared values of one live profile.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchFeatures {
    /// The profile's creation time: candidates with equal scores are ordered by it.
    pub created_at: CompactString,
    /// Each remembered trait with the range of its values in `values`, in the profile's
    /// (sorted) order.
    fields: Vec<(CompactString, u32, u32)>,
    values: Vec<CompactString>,
    /// `(kind, value)` of the identifiers of compared kinds, in the profile's order.
    identifiers: Vec<(CompactString, CompactString)>,
}

impl MatchFeatures {
    /// The features of `state`, keeping the identifiers of `compared_kinds` only (the model
    /// compares no others).
    pub fn of(state: &ProfileState, compared_kinds: &[CompactString]) -> Self {
        let value_count = state.trait_history.values().map(Vec::len).sum();
        let mut fields = Vec::with_capacity(state.trait_history.len());
        let mut values = Vec::with_capacity(value_count);
        for (field, field_values) in &state.trait_history {
            let start = values.len() as u32;
            values.extend(field_values.iter().cloned());
            fields.push((field.clone(), start, values.len() as u32));
        }
        let identifiers = state
            .profile
            .identifiers
            .iter()
            .filter(|identifier| compared_kinds.contains(&identifier.kind))
            .map(|identifier| (identifier.kind.clone(), identifier.value.clone()))
            .collect();
        MatchFeatures {
            created_at: state.profile.created_at.clone(),
            fields,
            values,
            identifiers,
        }
    }

    /// About how many bytes of memory the features take with their `Arc`, for the budget.
    fn estimated_bytes(&self) -> usize {
        use std::mem::size_of;
        let heap_strings: usize = self
            .values
            .iter()
            .chain(self.identifiers.iter().map(|(_, value)| value))
            .filter(|value| value.is_heap_allocated())
            .map(|value| memory::string(value.len()))
            .sum();
        memory::PER_ALLOCATION
            + 16
            + size_of::<MatchFeatures>()
            + memory::vec(self.fields.len(), size_of::<(CompactString, u32, u32)>())
            + memory::vec(self.values.len(), size_of::<CompactString>())
            + memory::vec(
                self.identifiers.len(),
                size_of::<(CompactString, CompactString)>(),
            )
            + heap_strings
    }
}

impl Side for MatchFeatures {
    fn trait_values(&self, field: &str) -> &[CompactString] {
        self.fields
            .iter()
            .find(|(name, _, _)| name == field)
            .map_or(&[], |(_, start, end)| {
                &self.values[*start as usize..*end as usize]
            })
    }

    fn push_identifier_values<'s>(&'s self, kind: &str, out: &mut Vec<&'s str>) {
        push_values_of_kind(self.identifiers.iter().map(|(k, v)| (k, v)), kind, out)
    }
}

/// A customer id's entry in the features cache.
#[derive(Debug, Clone)]
pub(crate) enum FeatureEntry {
    Live(Arc<MatchFeatures>),
    Redirect(String),
}

impl FeatureEntry {
    fn estimated_bytes(&self, id: &str) -> usize {
        memory::hash_slot::<FeatureEntry>()
            + memory::string(id.len())
            + match self {
                FeatureEntry::Live(features) => features.estimated_bytes(),
                FeatureEntry::Redirect(to) => memory::string(to.len()),
            }
    }
}

/// Feature entries by customer id, in two generations bounded by estimated memory, as the
/// [`StateCache`](crate::StateCache) keeps decoded records: an entry used moves into the
/// current generation, and when that holds half the budget the older one is dropped.
#[derive(Debug, Default)]
pub(crate) struct FeatureCache {
    current: FxHashMap<String, FeatureEntry>,
    previous: FxHashMap<String, FeatureEntry>,
    current_bytes: usize,
    previous_bytes: usize,
    max_bytes: usize,
}

impl FeatureCache {
    pub(crate) fn new(max_bytes: usize) -> Self {
        FeatureCache {
            max_bytes,
            ..FeatureCache::default()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub(crate) fn estimated_bytes(&self) -> usize {
        self.current_bytes + self.previous_bytes
    }

    pub(crate) fn clear(&mut self) {
        *self = FeatureCache::new(self.max_bytes);
    }

    /// The entry of `id`, if cached; it moves into the current generation.
    pub(crate) fn get(&mut self, id: &str) -> Option<FeatureEntry> {
        if let Some(entry) = self.current.get(id) {
            return Some(entry.clone());
        }
        let (id, entry) = self.previous.remove_entry(id)?;
        let bytes = entry.estimated_bytes(&id);
        self.previous_bytes = self.previous_bytes.saturating_sub(bytes);
        self.admit(id, entry.clone(), bytes);
        Some(entry)
    }

    /// Caches the entry of `id` (a budget of 0 caches nothing).
    pub(crate) fn insert(&mut self, id: &str, entry: FeatureEntry) {
        if self.max_bytes == 0 {
            return;
        }
        let bytes = entry.estimated_bytes(id);
        self.forget(id);
        self.admit(id.to_owned(), entry, bytes);
    }

    fn admit(&mut self, id: String, entry: FeatureEntry, bytes: usize) {
        if self.current_bytes + bytes > self.max_bytes / 2 {
            self.previous = std::mem::take(&mut self.current);
            self.previous_bytes = std::mem::take(&mut self.current_bytes);
        }
        self.current_bytes += bytes;
        self.current.insert(id, entry);
    }

    /// Drops the entry of `id`: the customer is about to change.
    pub(crate) fn forget(&mut self, id: &str) {
        if let Some((id, entry)) = self.current.remove_entry(id) {
            self.current_bytes = self
                .current_bytes
                .saturating_sub(entry.estimated_bytes(&id));
        }
        if let Some((id, entry)) = self.previous.remove_entry(id) {
            self.previous_bytes = self
                .previous_bytes
                .saturating_sub(entry.estimated_bytes(&id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::new_profile;
    use idgraph_model::ProfileIdentifier;

    fn state_with(id: &str, last_names: &[&str]) -> ProfileState {
        let mut state = new_profile(id.to_owned(), "2026-01-01T00:00:00.000Z");
        state.trait_history.insert(
            "last_name".into(),
            last_names.iter().map(|n| CompactString::from(*n)).collect(),
        );
        state
            .trait_history
            .insert("city".into(), vec!["springfield".into()]);
        let profile = Arc::make_mut(&mut state.profile);
        for (kind, value) in [("email", "a@x.com"), ("cookie", "c1"), ("email", "b@x.com")] {
            profile.identifiers.push(ProfileIdentifier {
                kind: kind.into(),
                value: value.into(),
                first_seen: "2026-01-01T00:00:00.000Z".into(),
                last_seen: "2026-01-01T00:00:00.000Z".into(),
                source: "web".into(),
            });
        }
        state
    }

    fn identifier_values<'s>(side: &'s impl Side, kind: &str) -> Vec<&'s str> {
        let mut values = Vec::new();
        side.push_identifier_values(kind, &mut values);
        values
    }

    #[test]
    fn features_answer_as_the_profile_they_come_from() {
        let state = state_with("cus_1", &["lee", "li"]);
        let features = MatchFeatures::of(&state, &["email".into()]);
        let profile = crate::matching::ProfileSide {
            history: &state.trait_history,
            identifiers: &state.profile.identifiers,
        };
        for field in ["last_name", "city", "first_name"] {
            assert_eq!(features.trait_values(field), profile.trait_values(field));
        }
        assert_eq!(
            identifier_values(&features, "email"),
            identifier_values(&profile, "email")
        );
        assert!(
            identifier_values(&features, "cookie").is_empty(),
            "kinds the model does not compare are left out"
        );
        assert_eq!(features.created_at, state.profile.created_at);
    }

    #[test]
    fn the_cache_stays_within_its_budget_and_forgets_on_request() {
        let entry = |n: usize| {
            let state = state_with(&format!("cus_{n}"), &["lee"]);
            FeatureEntry::Live(Arc::new(MatchFeatures::of(&state, &[])))
        };
        let one = entry(0).estimated_bytes("cus_0");
        let mut cache = FeatureCache::new(8 * one);
        for n in 0..100 {
            cache.insert(&format!("cus_{n}"), entry(n));
            assert!(cache.estimated_bytes() <= 9 * one, "{}", cache.len());
        }
        assert!(cache.get("cus_99").is_some());
        assert!(cache.get("cus_0").is_none(), "old entries are dropped");
        cache.forget("cus_99");
        assert!(cache.get("cus_99").is_none());
        let mut off = FeatureCache::new(0);
        off.insert("cus_1", entry(1));
        assert_eq!(off.len(), 0);
    }
}
