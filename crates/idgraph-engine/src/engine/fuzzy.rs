//! Fuzzy links inside the engine: finding candidate profiles through the blocking index,
//! scoring them with the match model, listing profiles under their keys, and bridging: an
//! event that joined one profile and matches another merges them too, so the order in which
//! a person's records arrive does not decide whether they end up together.

use idgraph_model::{CompactString, FieldScore, Identifier, LinkRule, NormalizedEvent};

use super::{fuzzy_rule, EventContext};
use crate::batch::{Batch, CandidateView};
use crate::blocking_index::{Block, Listed};
use crate::matching::model::round3;
use crate::matching::{
    blocking_keys, identifier_typo_keys, is_broad_key, rule_key, EventSide, MatchScore,
    PreparedSide, Side, Verdict,
};
use crate::profile::profile_blocking_keys;
use crate::stats::BatchStats;
use crate::store::StateRead;
use crate::{Engine, EngineError};

/// What an event's candidate search found, judged by the model.
#[derive(Default)]
pub(super) struct EventMatches {
    /// The best candidate the event links to.
    pub best: Option<Candidate>,
    /// Others it links to as well: bridged once the event joined `best`.
    pub also_matched: Vec<Candidate>,
    /// Candidates above the threshold that a rule refused: reported.
    pub refused: Vec<Candidate>,
}

/// What scoring one candidate gave: the whole account with the candidate's creation time, or
/// only the total of one that cannot reach the threshold.
enum Scored {
    /// Boxed: most candidates are set aside, and this one is a few hundred bytes.
    Full(Box<(CompactString, Candidate)>),
    Below(f64),
}

/// A scored candidate profile.
pub(super) struct Candidate {
    pub id: String,
    pub score: MatchScore,
    pub verdict: Verdict,
}

impl Engine {
    /// Blocking keys of an event's own values: its traits and, for identifier kinds compared
    /// with typo blocking, its identifiers' near values.
    pub(super) fn event_search_keys(
        &self,
        event: &NormalizedEvent,
        identifiers: &[Identifier],
    ) -> Vec<String> {
        let mut keys = self.identifier_keys(identifiers);
        keys.extend(blocking_keys(&event.traits));
        keys
    }

    /// The typo-blocking keys of `identifiers` whose kind asks for them.
    fn identifier_keys(&self, identifiers: &[Identifier]) -> Vec<String> {
        let mut keys = Vec::new();
        for identifier in identifiers {
            if self.blocks_on_typos(&identifier.kind) {
                keys.extend(identifier_typo_keys(&identifier.kind, &identifier.value));
            }
        }
        keys
    }

    fn blocks_on_typos(&self, kind: &str) -> bool {
        self.config
            .fuzzy
            .identifiers
            .get(kind)
            .is_some_and(|c| c.block_on_typos == Some(true))
    }

    /// The live profiles listed under `keys` (generic keys skipped), scored against `side`
    /// and ordered best first: higher score, then older profile, then smaller id, so ties
    /// never depend on arrival order. Selective keys are searched first (up to `limit`
    /// profiles); broad ones (a birth year, a city: shared by many in a large graph) only if
    /// none of those links, with the same limit again. Most events that have a match find it
    /// through a selective key, and a broad key's profiles are mostly strangers.
    pub(super) fn fuzzy_candidates<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        side: &impl Side,
        keys: &[String],
        exclude: Option<&str>,
        limit: usize,
        stats: &mut BatchStats,
    ) -> Result<Vec<Candidate>, EngineError> {
        let (broad, selective): (Vec<&String>, Vec<&String>) =
            keys.iter().partition(|key| is_broad_key(key));
        let mut seen: Vec<String> = Vec::new();
        let mut scored = Vec::new();
        // Candidates set aside by screening: how many, and the best of their totals.
        let mut screened_out = 0u32;
        let mut best_screened: Option<f64> = None;
        let side = self.model.prepare(side);
        let threshold = self.model.threshold_for(batch.profiles_known());
        for phase in [selective, broad] {
            let found = self.listed_profiles(batch, &phase, exclude, &mut seen, limit)?;
            for candidate in found {
                match self.score_candidate(batch, &side, candidate, threshold)? {
                    Scored::Full(full) => scored.push(*full),
                    Scored::Below(total) => {
                        screened_out += 1;
                        best_screened = Some(best_screened.map_or(total, |best| best.max(total)));
                    }
                }
            }
            if scored.iter().any(|(_, c)| c.verdict == Verdict::Link) {
                break;
            }
        }
        if scored.is_empty() && screened_out == 0 {
            return Ok(Vec::new());
        }
        stats
            .candidates_per_event
            .push(scored.len() as u32 + screened_out);
        scored.sort_by(|(created_a, a), (created_b, b)| {
            b.score
                .total
                .total_cmp(&a.score.total)
                .then_with(|| created_a.cmp(created_b))
                .then_with(|| a.id.cmp(&b.id))
        });
        let best_full = scored.first().map(|(_, best)| best.score.total);
        if let Some(best) = best_full.into_iter().chain(best_screened).reduce(f64::max) {
            stats.fuzzy_scores.push(best);
        }
        Ok(scored.into_iter().map(|(_, candidate)| candidate).collect())
    }

    /// Up to `limit` live profiles listed under `keys` that are not in `seen` (which they
    /// join) nor `exclude`, as candidate search compares them.
    fn listed_profiles<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        keys: &[&String],
        exclude: Option<&str>,
        seen: &mut Vec<String>,
        limit: usize,
    ) -> Result<Vec<(String, CandidateView)>, EngineError> {
        let mut found = Vec::new();
        let mut listed = Vec::new();
        'keys: for key in keys {
            listed.clear();
            match batch.block(key)? {
                Block::Oversize => continue,
                Block::Listed(customers) => listed.extend_from_slice(customers),
            }
            for customer in &listed {
                let id = customer.to_id();
                // A live id already listed resolves to itself: skip it before resolving.
                if Some(id.as_str()) == exclude || seen.contains(&id) {
                    continue;
                }
                let Some((live, view)) = batch.candidate(id, &self.compared_kinds)? else {
                    continue;
                };
                if Some(live.as_str()) == exclude || seen.contains(&live) {
                    continue;
                }
                seen.push(live.clone());
                found.push((live, view));
                if found.len() >= limit {
                    break 'keys;
                }
            }
        }
        Ok(found)
    }

    /// One candidate's score, term-frequency discount and verdict, with its creation time
    /// for ordering; or only its total, when even that falls short of `threshold`. Most
    /// candidates are strangers, and the discount applied after scoring only lowers a score,
    /// so such a candidate is below the threshold whatever its account would say: the
    /// per-field account (names, levels, compared values) is built only for the others.
    fn score_candidate<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        side: &PreparedSide<'_>,
        (id, view): (String, CandidateView),
        threshold: f64,
    ) -> Result<Scored, EngineError> {
        let candidate_side = self.model.prepare(&view);
        let total = self.model.screen_prepared(side, &candidate_side);
        if total < threshold {
            return Ok(Scored::Below(total));
        }
        let mut score = self.model.score_prepared(side, &candidate_side);
        drop(candidate_side);
        let created_at = view.created_at().clone();
        drop(view);
        self.discount_common_values(batch, &mut score)?;
        let verdict = self.model.verdict(&score, threshold);
        Ok(Scored::Full(Box::new((
            created_at,
            Candidate { id, score, verdict },
        ))))
    }

    /// Term frequency: agreeing on a full name or a birth date that many profiles share says
    /// less than agreeing on a rare one. The blocking index already counts the profiles per
    /// name pair and per birth date, so the agreement's weight drops by log2 of that count
    /// (a value held by one profile, the prior's assumption, keeps its weight; a key too
    /// common to be listed counts as twice the block limit).
    fn discount_common_values<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        score: &mut MatchScore,
    ) -> Result<(), EngineError> {
        const COMMON_VALUE_RULES: [(&str, &str); 2] =
            [("nn", "first_name,last_name"), ("db", "date_of_birth")];
        for (rule, fields) in COMMON_VALUE_RULES {
            let agreed = |field: &str| {
                score
                    .exact_values
                    .iter()
                    .find(|(name, _)| name == field)
                    .map(|(_, value)| value.as_str())
            };
            if !fields.split(',').all(|field| agreed(field).is_some()) {
                continue;
            }
            let Some(key) = rule_key(rule, agreed) else {
                continue;
            };
            let holders = match batch.block(&key)? {
                Block::Oversize => 2 * self.config.fuzzy.max_block_size,
                Block::Listed(customers) => customers.len(),
            };
            if holders < 2 {
                continue;
            }
            let discount = -(holders as f64).log2();
            score.total = round3(score.total + discount);
            score.fields.push(FieldScore {
                field: fields.into(),
                level: "term_frequency".into(),
                similarity: 1.0,
                weight: round3(discount),
            });
        }
        Ok(())
    }

    /// The candidates the model links an event to, and those a rule refused.
    pub(super) fn event_candidates<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        event: &NormalizedEvent,
        new_identifiers: &[Identifier],
        stats: &mut BatchStats,
    ) -> Result<EventMatches, EngineError> {
        let mut matches = EventMatches::default();
        if !self.config.fuzzy.enabled || event.traits.is_empty() {
            return Ok(matches);
        }
        let keys = self.event_search_keys(event, new_identifiers);
        let side = EventSide {
            traits: &event.traits,
            identifiers: new_identifiers,
        };
        let limit = self.config.fuzzy.max_candidates;
        let candidates = self.fuzzy_candidates(batch, &side, &keys, None, limit, stats)?;
        for candidate in candidates {
            match candidate.verdict {
                Verdict::Link if matches.best.is_none() => matches.best = Some(candidate),
                Verdict::Link => matches.also_matched.push(candidate),
                Verdict::Refused(..) => matches.refused.push(candidate),
                Verdict::Below => {}
            }
        }
        Ok(matches)
    }

    /// The profiles `primary` matches now that an event (which joined it through an
    /// identifier) listed it under `new_keys`: candidates found there, scored against the
    /// whole grown profile.
    pub(super) fn search_from_profile<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        primary: &str,
        new_keys: &[String],
        stats: &mut BatchStats,
    ) -> Result<Vec<Candidate>, EngineError> {
        let state = batch.profile(primary)?;
        let limit = self.config.fuzzy.max_candidates_on_growth;
        self.fuzzy_candidates(batch, &*state, new_keys, Some(primary), limit, stats)
    }

    /// Merges into `primary` the `candidates` the model linked it to (at most
    /// `fuzzy.max_bridges`), guards permitting; a refusal is reported. Returns the id the
    /// event belongs to afterwards.
    pub(super) fn bridge<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        ctx: &mut EventContext<'_>,
        primary: String,
        candidates: Vec<Candidate>,
        stats: &mut BatchStats,
    ) -> Result<String, EngineError> {
        let mut primary = primary;
        let mut bridged = 0;
        for candidate in candidates {
            if bridged >= self.config.fuzzy.max_bridges {
                break;
            }
            let Some(live) = batch.resolve_id(&candidate.id)? else {
                continue;
            };
            if live == primary {
                continue;
            }
            match candidate.verdict {
                Verdict::Below => continue,
                Verdict::Refused(rule, kind) => {
                    ctx.refuse(&primary, rule, Some(live), kind, FUZZY_LINK, stats);
                }
                Verdict::Link => {
                    let primary_state = batch.profile(&primary)?;
                    let other_state = batch.profile(&live)?;
                    if let Some((rule, kind)) =
                        self.merge_refusal(&primary_state, &other_state, &[], None)
                    {
                        drop((primary_state, other_state));
                        ctx.refuse(&primary, rule, Some(live), kind, FUZZY_LINK, stats);
                        continue;
                    }
                    stats.fuzzy_links += 1;
                    let rule: LinkRule = fuzzy_rule(candidate.score);
                    primary = self.merge(
                        batch,
                        ctx,
                        primary_state,
                        other_state,
                        None,
                        None,
                        rule,
                        stats,
                    )?;
                    bridged += 1;
                }
            }
        }
        Ok(primary)
    }

    /// Reports fuzzy candidates above the threshold that a rule kept from `customer_id`.
    pub(super) fn report_refused_candidates(
        &self,
        ctx: &mut EventContext<'_>,
        customer_id: &str,
        refused: Vec<Candidate>,
        stats: &mut BatchStats,
    ) {
        for candidate in refused {
            if let Verdict::Refused(rule, kind) = candidate.verdict {
                ctx.refuse(
                    customer_id,
                    rule,
                    Some(candidate.id),
                    kind,
                    FUZZY_LINK,
                    stats,
                );
            }
        }
    }

    /// Lists `customer_id` under the blocking keys of its new values and identifiers, and
    /// returns the keys it was not listed under before: where profiles it did not match
    /// before may now be found.
    pub(super) fn add_to_blocks<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        customer_id: &str,
        event: &NormalizedEvent,
    ) -> Result<Vec<String>, EngineError> {
        let state = batch.profile(customer_id)?;
        let mut keys = profile_blocking_keys(&state, event);
        drop(state);
        keys.extend(self.identifier_keys(&event.identifiers));
        let mut added = Vec::new();
        let max_block_size = self.config.fuzzy.max_block_size;
        for key in keys {
            let state = batch.profile_mut(customer_id)?;
            let Err(position) = state.blocking_keys.binary_search(&key) else {
                continue;
            };
            state.blocking_keys.insert(position, key.clone());
            match batch.list_under(&key, customer_id, max_block_size)? {
                Listed::AlreadyOversize => {}
                Listed::Added | Listed::BecameOversize => added.push(key),
            }
        }
        Ok(added)
    }
}

/// The `linking_kind` of a refused fuzzy link in the change feed.
const FUZZY_LINK: &str = "fuzzy";
