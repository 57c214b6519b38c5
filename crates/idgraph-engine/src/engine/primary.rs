//! Where an event goes: its identifiers grouped by the profile they already belong to, the
//! profile it joins (strongest known identifier, else the best fuzzy candidate, else a new
//! profile), and its new identifiers attached there unless a limit refuses them.

use idgraph_model::{
    ChangeKind, Identifier, LinkRule, NormalizedEvent, RefusalRule, ResolutionAction,
};

use super::{customer_id_for, empty_node, fuzzy_rule, EventContext, Group};
use crate::batch::Batch;
use crate::profile::{add_identifier, new_profile};
use crate::state::{EvidenceLink, NodeRecord, RootInfo};
use crate::stats::BatchStats;
use crate::store::StateRead;
use crate::{BatchOutcome, Engine, EngineError};

impl Engine {
    /// Splits the event's identifiers into groups by the profile they already belong to, and
    /// new ones. Generic values are left out of both. `node_keys` are the identifiers' node
    /// keys, in order.
    pub(super) fn lookup_identifiers<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        event: &NormalizedEvent,
        node_keys: &[String],
        stats: &mut BatchStats,
    ) -> Result<(Vec<Group>, Vec<Identifier>), EngineError> {
        let mut groups: Vec<Group> = Vec::new();
        let mut new_identifiers = Vec::new();
        for (identifier, node_key) in event.identifiers.iter().zip(node_keys) {
            let generic = batch.node_generic(node_key)?;
            match generic {
                None => new_identifiers.push(identifier.clone()),
                Some(true) => stats.generic_identifier_hits += 1,
                Some(false) => {
                    let (_, root) = batch.find(node_key)?;
                    match groups
                        .iter_mut()
                        .find(|g| g.customer_id == root.customer_id)
                    {
                        Some(group) => group.linking.push(identifier.clone()),
                        None => groups.push(Group {
                            customer_id: root.customer_id,
                            linking: vec![identifier.clone()],
                        }),
                    }
                }
            }
        }
        for group in &mut groups {
            self.sort_by_priority(&mut group.linking);
        }
        let mut keyed = Vec::with_capacity(groups.len());
        for group in groups {
            let created_at = batch
                .profile(&group.customer_id)?
                .profile
                .created_at
                .clone();
            let rank = self.rank(&group.linking[0].kind);
            keyed.push(((rank, created_at, group.customer_id.clone()), group));
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        self.sort_by_priority(&mut new_identifiers);
        Ok((keyed.into_iter().map(|(_, g)| g).collect(), new_identifiers))
    }

    /// Picks the profile the event joins: the profile of its strongest known identifier, unless
    /// the event's strongest new identifier outranks it and could not join it (a second
    /// user_id), in which case the event starts a new profile. With no known identifier, a
    /// fuzzy match or a new profile.
    pub(super) fn choose_primary<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        ctx: &mut EventContext<'_>,
        groups: &[Group],
        new_identifiers: &[Identifier],
        outcome: &mut BatchOutcome,
    ) -> Result<(String, ResolutionAction, LinkRule), EngineError> {
        // A link refused because the traits conflict; reported once the new profile exists.
        let mut refused_link: Option<&Group> = None;
        // Fuzzy candidates above the threshold that a rule refused; the same.
        let mut refused_candidates = Vec::new();
        if let Some(best) = groups.first() {
            let link = &best.linking[0];
            let rule = LinkRule::SharedIdentifier {
                kind: link.kind.clone(),
                value: link.value.clone(),
            };
            let state = batch.profile(&best.customer_id)?;
            let outranked_and_blocked = match new_identifiers.first() {
                Some(top_new) if self.rank(&top_new.kind) < self.rank(&link.kind) => {
                    self.addition_refusal(&state, top_new, 1).is_some()
                }
                _ => false,
            };
            let agreement = self.event_agreement(ctx.event, &state);
            // A shared value with another person's name and birth date behind it is a shared
            // phone or tablet, not this customer.
            let conflicting = agreement.as_ref().is_some_and(|s| self.traits_conflict(s));
            // Corroboration of a weak link comes from the traits, not from identifiers that
            // merely look alike.
            let agreement = agreement.map(|s| s.trait_total);
            // Weak identifiers tie a new strong identifier to a known customer only when the
            // event's traits corroborate it: a shared tablet seeing a new email is a new person.
            let weak_link_to_known = best.linking.iter().all(|i| self.is_weak(&i.kind))
                && new_identifiers.iter().any(|i| !self.is_weak(&i.kind))
                && state.has_strong_identifier(&self.config.identifiers.weak_kinds)
                && agreement.is_none_or(|score| score < self.config.protection.weak_link_min_score);
            if conflicting {
                refused_link = Some(best);
            } else if !outranked_and_blocked && !weak_link_to_known {
                return Ok((best.customer_id.clone(), ResolutionAction::Matched, rule));
            }
        } else {
            let matches =
                self.event_candidates(batch, ctx.event, new_identifiers, &mut outcome.stats)?;
            refused_candidates = matches.refused;
            if let Some(candidate) = matches.best {
                ctx.also_matched = matches.also_matched;
                outcome.stats.fuzzy_links += 1;
                // Profiles the event matched but a rule kept apart are reported on the one
                // it joins.
                let refused = std::mem::take(&mut refused_candidates);
                self.report_refused_candidates(ctx, &candidate.id, refused, &mut outcome.stats);
                let rule = fuzzy_rule(candidate.score);
                return Ok((candidate.id, ResolutionAction::Matched, rule));
            }
        }
        let customer_id = customer_id_for(&ctx.event.raw.source, &ctx.event.raw.event_id);
        let state = new_profile(customer_id.clone(), &ctx.timestamp);
        batch.put_profile(state);
        outcome.stats.profiles_created += 1;
        batch.note_profile_created();
        batch.add_evidence(
            &customer_id,
            ctx.evidence(EvidenceLink::Created {
                identifiers: new_identifiers.to_vec(),
            }),
        )?;
        ctx.change(
            &customer_id,
            ChangeKind::Created {
                identifiers: new_identifiers.to_vec(),
            },
        );
        if let Some(group) = refused_link {
            let linking_kind = &group.linking[0].kind;
            let (other, kind) = (Some(group.customer_id.clone()), Some(linking_kind.clone()));
            ctx.refuse(
                &customer_id,
                RefusalRule::ConflictingTraits,
                other,
                kind,
                linking_kind,
                &mut outcome.stats,
            );
            self.note_conflicts(batch, ctx, &group.linking, &customer_id, &mut outcome.stats)?;
        }
        self.report_refused_candidates(ctx, &customer_id, refused_candidates, &mut outcome.stats);
        Ok((customer_id, ResolutionAction::New, LinkRule::Created))
    }

    /// Adds the event's new identifiers to `primary`, strongest first, refusing any that would
    /// break a per-kind limit or the profile size limit.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attach_new_identifiers<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        ctx: &mut EventContext<'_>,
        primary: &str,
        new_identifiers: &[Identifier],
        via: Option<&Identifier>,
        rule: LinkRule,
        stats: &mut BatchStats,
    ) -> Result<(), EngineError> {
        for identifier in new_identifiers {
            let state = batch.profile(primary)?;
            if let Some(refusal) = self.addition_refusal(&state, identifier, 1) {
                let kind = Some(identifier.kind.clone());
                ctx.refuse(primary, refusal, None, kind, &identifier.kind, stats);
                continue;
            }
            let key = identifier.node_key();
            let root = state.root.clone();
            // A handle still held would make the change below copy the whole profile.
            drop(state);
            match root {
                Some(root) => {
                    batch.put_node(
                        &key,
                        NodeRecord {
                            parent: Some(root.clone()),
                            ..empty_node()
                        },
                    )?;
                    let mut root_node = batch.node(&root)?.unwrap_or_else(empty_node);
                    if let Some(info) = root_node.root.as_mut() {
                        info.size += 1;
                    }
                    batch.put_node(&root, root_node)?;
                }
                None => {
                    batch.put_node(
                        &key,
                        NodeRecord {
                            root: Some(RootInfo {
                                customer_id: primary.to_owned(),
                                size: 1,
                            }),
                            ..empty_node()
                        },
                    )?;
                    batch.profile_mut(primary)?.root = Some(key.clone());
                }
            }
            let state = batch.profile_mut(primary)?;
            add_identifier(state, identifier, &ctx.event.raw.source, &ctx.timestamp);
            let is_creation = state.profile.version == 0;
            if !is_creation {
                batch.add_evidence(
                    primary,
                    ctx.evidence(EvidenceLink::IdentifierAdded {
                        identifier: identifier.clone(),
                        via: via.cloned(),
                        rule: rule.clone(),
                    }),
                )?;
            }
            ctx.change(
                primary,
                ChangeKind::IdentifierAdded {
                    kind: identifier.kind.clone(),
                    value: identifier.value.clone(),
                    rule: if is_creation {
                        LinkRule::Created
                    } else {
                        rule.clone()
                    },
                },
            );
        }
        Ok(())
    }
}
