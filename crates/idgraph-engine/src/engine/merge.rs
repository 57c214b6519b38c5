//! Merging two profiles: union by size of their identifier sets, the older id surviving, the
//! absorbed id redirecting, evidence and the change feed; or, when a guard says no, the
//! refusal reported instead.

use std::sync::Arc;

use idgraph_model::{ChangeKind, Identifier, LinkRule, RefusalRule};

use super::{empty_node, EventContext, Group};
use crate::batch::Batch;
use crate::profile::merge_into;
use crate::state::{EvidenceLink, ProfileState, RootInfo};
use crate::stats::BatchStats;
use crate::store::{StateRead, StoreError};
use crate::{Engine, EngineError};

impl Engine {
    /// Merges `group`'s profile into `primary` or records why not. Returns the id the event
    /// now belongs to (the older profile's id survives a merge).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn merge_or_refuse<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        ctx: &mut EventContext<'_>,
        primary: &str,
        group: &Group,
        via: Option<Identifier>,
        rule: LinkRule,
        stats: &mut BatchStats,
    ) -> Result<String, EngineError> {
        let Some(other_id) = batch.resolve_id(&group.customer_id)? else {
            return Ok(primary.to_owned());
        };
        if other_id == primary {
            return Ok(primary.to_owned());
        }
        let primary_state = batch.profile(primary)?;
        let other_state = batch.profile(&other_id)?;
        let agreement = self.profile_agreement(ctx.event, &primary_state, &other_state);
        let linking_kind = group.linking[0].kind.clone();
        let refusal = if self.all_generic(batch, &group.linking)? {
            Some((RefusalRule::GenericValue, Some(linking_kind.clone())))
        } else {
            self.merge_refusal(
                &primary_state,
                &other_state,
                &group.linking,
                agreement.as_ref(),
            )
        };
        if let Some((rule, kind)) = refusal {
            ctx.refuse(primary, rule, Some(other_id), kind, &linking_kind, stats);
            self.note_conflicts(batch, ctx, &group.linking, primary, stats)?;
            return Ok(primary.to_owned());
        }
        let other_link = group.linking.first().cloned();
        Ok(self.merge(
            batch,
            ctx,
            primary_state,
            other_state,
            via,
            other_link,
            rule,
            stats,
        )?)
    }

    /// Merges two live profiles; the older one's id survives. Returns the survivor's id.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn merge<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        ctx: &mut EventContext<'_>,
        primary: Arc<ProfileState>,
        other: Arc<ProfileState>,
        via: Option<Identifier>,
        other_link: Option<Identifier>,
        rule: LinkRule,
        stats: &mut BatchStats,
    ) -> Result<String, StoreError> {
        let age = |s: &ProfileState| (s.profile.created_at.clone(), s.profile.customer_id.clone());
        let (survivor, absorbed) = if age(&primary) <= age(&other) {
            (primary, other)
        } else {
            (other, primary)
        };
        let survivor_id = survivor.profile.customer_id.clone();
        let absorbed_id = absorbed.profile.customer_id.clone();
        let root = match (survivor.root.clone(), absorbed.root.clone()) {
            (Some(a), Some(b)) => Some(self.union(batch, &a, &b, &survivor_id)?),
            (None, Some(root)) | (Some(root), None) => {
                self.set_root_customer(batch, &root, &survivor_id)?;
                Some(root)
            }
            (None, None) => None,
        };
        // Dropping every other handle first lets both profiles change in place: the batch's
        // own handle on the absorbed one goes with its redirect, and the survivor is changed
        // through the batch. Copying them instead was ~2% of resolving.
        drop(survivor);
        batch.put_redirect(&absorbed_id, &survivor_id);
        for id in &absorbed.profile.absorbed_ids {
            batch.put_redirect(id, &survivor_id);
        }
        let absorbed = Arc::unwrap_or_clone(absorbed);
        let history_len = self.config.fuzzy.trait_history;
        let survivor = batch.profile_mut(&survivor_id)?;
        survivor.root = root;
        merge_into(survivor, absorbed, history_len);
        batch.add_evidence(
            &survivor_id,
            ctx.evidence(EvidenceLink::Merged {
                absorbed: absorbed_id.clone(),
                via,
                other: other_link,
                rule: rule.clone(),
            }),
        )?;
        ctx.change(
            &survivor_id,
            ChangeKind::Merged {
                survivor: survivor_id.clone(),
                absorbed: vec![absorbed_id.clone()],
                rule,
            },
        );
        ctx.merged_ids.push(absorbed_id);
        stats.merges += 1;
        Ok(survivor_id)
    }

    /// Union by size of two roots; the new root records `customer_id`. Equal sizes pick the
    /// smaller key so the result is deterministic.
    pub(super) fn union<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        a: &str,
        b: &str,
        customer_id: &str,
    ) -> Result<String, StoreError> {
        if a == b {
            self.set_root_customer(batch, a, customer_id)?;
            return Ok(a.to_owned());
        }
        let (_, root_a) = batch.find(a)?;
        let (_, root_b) = batch.find(b)?;
        let (big, big_info, small) =
            if (root_a.size, std::cmp::Reverse(a)) >= (root_b.size, std::cmp::Reverse(b)) {
                (a, root_a.size + root_b.size, b)
            } else {
                (b, root_a.size + root_b.size, a)
            };
        let mut small_node = batch.node(small)?.unwrap_or_else(empty_node);
        small_node.parent = Some(big.to_owned());
        small_node.root = None;
        batch.put_node(small, small_node)?;
        let mut big_node = batch.node(big)?.unwrap_or_else(empty_node);
        big_node.root = Some(RootInfo {
            customer_id: customer_id.to_owned(),
            size: big_info,
        });
        batch.put_node(big, big_node)?;
        Ok(big.to_owned())
    }

    pub(super) fn set_root_customer<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        root: &str,
        customer_id: &str,
    ) -> Result<(), StoreError> {
        let mut node = batch.node(root)?.unwrap_or_else(empty_node);
        let size = node.root.as_ref().map_or(1, |r| r.size);
        node.root = Some(RootInfo {
            customer_id: customer_id.to_owned(),
            size,
        });
        batch.put_node(root, node)?;
        Ok(())
    }
}
