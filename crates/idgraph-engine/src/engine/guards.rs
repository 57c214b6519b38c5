//! Over-merge protection (README, Matching): the rules that keep two profiles, or a profile and an
//! identifier, apart, and the trait scores they judge by. Each refusal names its rule; the
//! caller reports it.

use std::collections::BTreeMap;

use idgraph_model::{CompactString, Identifier, NormalizedEvent, RefusalRule, SortedMap};

use super::EventContext;
use crate::batch::Batch;
use crate::matching::model::push_values_of_kind;
use crate::matching::{EventSide, MatchScore, Side, MATCH_FIELDS};
use crate::state::ProfileState;
use crate::stats::BatchStats;
use crate::store::StateRead;
use crate::{Engine, EngineError};
use idgraph_model::ChangeKind;

impl Engine {
    /// Why `count` more identifiers like `identifier` cannot join `state`, if they cannot.
    pub(super) fn addition_refusal(
        &self,
        state: &ProfileState,
        identifier: &Identifier,
        count: usize,
    ) -> Option<RefusalRule> {
        if state.count_of_kind(&identifier.kind) + count > self.kind_limit(&identifier.kind) {
            Some(RefusalRule::KindLimit)
        } else if state.profile.identifiers.len() + count
            > self.config.protection.max_profile_identifiers as usize
        {
            Some(RefusalRule::MaxProfileSize)
        } else {
            None
        }
    }

    /// Why two profiles must stay apart, if they must; `linking` are the identifiers on
    /// `other`'s side that the event shares (empty for a fuzzy link, whose score was judged
    /// already), `agreement` the score between the two sides (`None` when nothing could be
    /// compared).
    pub(super) fn merge_refusal(
        &self,
        primary: &ProfileState,
        other: &ProfileState,
        linking: &[Identifier],
        agreement: Option<&MatchScore>,
    ) -> Option<(RefusalRule, Option<CompactString>)> {
        let weak = &self.config.identifiers.weak_kinds;
        let protection = &self.config.protection;
        if agreement.is_some_and(|score| self.traits_conflict(score)) {
            return Some((
                RefusalRule::ConflictingTraits,
                linking.first().map(|i| i.kind.clone()),
            ));
        }
        let agreement = agreement.map(|score| score.trait_total);
        if !linking.is_empty()
            && linking.iter().all(|i| self.is_weak(&i.kind))
            && primary.has_strong_identifier(weak)
            && other.has_strong_identifier(weak)
            && agreement.is_none_or(|score| score < protection.weak_link_min_score)
        {
            return Some((RefusalRule::WeakIdentifier, Some(linking[0].kind.clone())));
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for identifier in primary
            .profile
            .identifiers
            .iter()
            .chain(&other.profile.identifiers)
        {
            *counts.entry(identifier.kind.as_str()).or_default() += 1;
        }
        if let Some((kind, _)) = counts
            .iter()
            .find(|(kind, count)| **count > self.kind_limit(kind))
        {
            return Some((RefusalRule::KindLimit, Some((*kind).into())));
        }
        let size = primary.profile.identifiers.len() + other.profile.identifiers.len();
        if size > protection.max_profile_identifiers as usize {
            return Some((RefusalRule::MaxProfileSize, None));
        }
        None
    }

    /// Whether a scored pair's names and dates clearly say two people, whatever links them.
    pub(super) fn traits_conflict(&self, score: &MatchScore) -> bool {
        matches!(
            self.model.conflict(score),
            Some((RefusalRule::ConflictingTraits, _))
        )
    }

    /// The score between an event and a profile its identifier points at.
    pub(super) fn event_agreement(
        &self,
        event: &NormalizedEvent,
        profile: &ProfileState,
    ) -> Option<MatchScore> {
        if event.traits.is_empty() {
            return None;
        }
        let side = EventSide {
            traits: &event.traits,
            identifiers: &event.identifiers,
        };
        let result = self.model.score(&side, profile);
        result.has_evidence().then_some(result)
    }

    /// The score between two profiles, the first seen together with the current event.
    pub(super) fn profile_agreement(
        &self,
        event: &NormalizedEvent,
        primary: &ProfileState,
        other: &ProfileState,
    ) -> Option<MatchScore> {
        let mut known = primary.trait_history.clone();
        for field in MATCH_FIELDS {
            if let Some(value) = event.traits.get(field) {
                let values = known.get_or_default(field.into());
                if !values.contains(value) {
                    values.push(value.clone());
                }
            }
        }
        let side = WithEvent {
            history: &known,
            profile: primary,
            event,
        };
        let result = self.model.score(&side, other);
        result.has_evidence().then_some(result)
    }

    pub(super) fn all_generic<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        identifiers: &[Identifier],
    ) -> Result<bool, EngineError> {
        for identifier in identifiers {
            if batch.node_generic(&identifier.node_key())? != Some(true) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Records that `linking` identifiers were seen with profile `seen_with`; a value seen
    /// with enough distinct profiles becomes generic.
    pub(super) fn note_conflicts<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        ctx: &mut EventContext<'_>,
        linking: &[Identifier],
        seen_with: &str,
        stats: &mut BatchStats,
    ) -> Result<(), EngineError> {
        let threshold = self.config.protection.generic_threshold as usize;
        for identifier in linking {
            let key = identifier.node_key();
            let Some(mut node) = batch.node(&key)? else {
                continue;
            };
            if node.generic || node.conflicts.iter().any(|c| c == seen_with) {
                continue;
            }
            node.conflicts.push(seen_with.to_owned());
            // The value's own profile plus the distinct others it was seen with.
            if node.conflicts.len() + 1 >= threshold {
                node.generic = true;
                stats.identifiers_made_generic += 1;
                let (_, root) = batch.find(&key)?;
                ctx.change(
                    &root.customer_id,
                    ChangeKind::IdentifierGeneric {
                        kind: identifier.kind.clone(),
                        value: identifier.value.clone(),
                        profiles_seen: (node.conflicts.len() + 1) as u32,
                    },
                );
            }
            batch.put_node(&key, node)?;
        }
        Ok(())
    }
}

/// A profile's values with one event's added: the side a profile shows while that event is
/// being resolved.
struct WithEvent<'a> {
    history: &'a SortedMap<CompactString, Vec<CompactString>>,
    profile: &'a ProfileState,
    event: &'a NormalizedEvent,
}

impl Side for WithEvent<'_> {
    fn trait_values(&self, field: &str) -> &[CompactString] {
        self.history.get(field).map_or(&[], Vec::as_slice)
    }

    fn push_identifier_values<'s>(&'s self, kind: &str, out: &mut Vec<&'s str>) {
        let start = out.len();
        let held = self.profile.profile.identifiers.iter();
        push_values_of_kind(held.map(|i| (&i.kind, &i.value)), kind, out);
        for identifier in &self.event.identifiers {
            if identifier.kind == kind && !out[start..].contains(&identifier.value.as_str()) {
                out.push(&identifier.value);
            }
        }
    }
}
