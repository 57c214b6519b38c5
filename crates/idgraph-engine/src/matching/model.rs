//! The Fellegi–Sunter model: per compared field, a comparison kind and one weight per level,
//! log2(m/u), where m is how often two records of the same person reach the level and u how
//! often two records of different people do. A pair's score is the sum of its fields'
//! weights; a field missing on either side adds nothing.
//!
//! The model also keeps apart what the sum alone would blur: agreement on where someone lives
//! does not cancel a clear disagreement on who they are. [`MatchScore`] therefore carries the
//! disagreement on names and dates separately, and [`MatchModel::verdict`] refuses a link whose traits clearly
//! disagree however well the rest agrees.

use idgraph_model::{CompactString, FieldScore, Identifier, ProfileIdentifier, SortedMap};

use super::comparison::{ComparisonKind, Partners, ELSE, EXACT};
use crate::config::{ComparisonConfig, FuzzyConfig, ProtectionConfig};
use idgraph_model::RefusalRule;

/// One compared field (a trait, or an identifier kind), ready to score.
#[derive(Debug, Clone)]
struct CompiledComparison {
    field: CompactString,
    kind: ComparisonKind,
    /// log2(m/u) per level, in the kind's level order.
    weights: Vec<f64>,
    /// The index of the kind's "exact" level (not always the first: a name's Jr/Sr check
    /// comes before it).
    exact: usize,
    refuse_when_different: bool,
    /// Where a prepared side keeps the values of the field's `swap_with` partner (see
    /// [`PreparedSide`]).
    partner_slot: Option<usize>,
    /// The compared traits of the field's `implied_by`, as indices into the model's traits.
    implied_by_traits: Vec<usize>,
}

impl CompiledComparison {
    fn new(field: &str, config: &ComparisonConfig) -> Self {
        let weights = config
            .comparison
            .levels()
            .iter()
            .map(|level| (config.m[*level] / config.u[*level]).log2())
            .collect();
        CompiledComparison {
            field: field.into(),
            kind: config.comparison,
            weights,
            exact: config.comparison.index_of(EXACT),
            refuse_when_different: config.refuse_when_different.unwrap_or(false),
            partner_slot: None,
            implied_by_traits: Vec::new(),
        }
    }

    fn label(&self, level: usize) -> &'static str {
        self.kind.levels()[level]
    }
}

/// One side of a comparison: the values it holds per trait and per identifier kind.
pub trait Side {
    /// Every value held for a trait (normalized, non-empty), or none.
    fn trait_values(&self, field: &str) -> &[CompactString];

    /// Appends every value held for an identifier kind to `out`, in the side's order.
    fn push_identifier_values<'s>(&'s self, kind: &str, out: &mut Vec<&'s str>);
}

/// An event's traits and identifiers.
pub struct EventSide<'a> {
    pub traits: &'a SortedMap<CompactString, CompactString>,
    pub identifiers: &'a [Identifier],
}

impl Side for EventSide<'_> {
    fn trait_values(&self, field: &str) -> &[CompactString] {
        self.traits.get(field).map_or(&[], std::slice::from_ref)
    }

    fn push_identifier_values<'s>(&'s self, kind: &str, out: &mut Vec<&'s str>) {
        push_values_of_kind(
            self.identifiers.iter().map(|i| (&i.kind, &i.value)),
            kind,
            out,
        )
    }
}

/// Appends the values of one kind among `(kind, value)` pairs to `out`.
pub(crate) fn push_values_of_kind<'a>(
    identifiers: impl Iterator<Item = (&'a CompactString, &'a CompactString)>,
    kind: &str,
    out: &mut Vec<&'a str>,
) {
    out.extend(
        identifiers
            .filter(|(k, _)| *k == kind)
            .map(|(_, value)| value.as_str()),
    )
}

/// A profile's remembered trait values and its identifiers.
pub struct ProfileSide<'a> {
    pub history: &'a SortedMap<CompactString, Vec<CompactString>>,
    pub identifiers: &'a [ProfileIdentifier],
}

impl Side for ProfileSide<'_> {
    fn trait_values(&self, field: &str) -> &[CompactString] {
        self.history.get(field).map_or(&[], Vec::as_slice)
    }

    fn push_identifier_values<'s>(&'s self, kind: &str, out: &mut Vec<&'s str>) {
        push_values_of_kind(
            self.identifiers.iter().map(|i| (&i.kind, &i.value)),
            kind,
            out,
        )
    }
}

/// A side's values looked up once for every field the model compares ([`MatchModel::prepare`]),
/// so that scoring it against many others does not look each field up by name again.
#[derive(Debug, Clone)]
pub struct PreparedSide<'s> {
    /// The values of each compared trait, in the model's order, then of each swap partner
    /// that is not compared itself.
    traits: Vec<&'s [CompactString]>,
    /// The values of the compared identifier kinds, kind after kind; `identifier_ends[k]` is
    /// where kind `k`'s end.
    identifiers: Vec<&'s str>,
    identifier_ends: Vec<usize>,
}

impl<'s> PreparedSide<'s> {
    fn identifiers_of(&self, comparison: usize) -> &[&'s str] {
        let start = match comparison {
            0 => 0,
            k => self.identifier_ends[k - 1],
        };
        &self.identifiers[start..self.identifier_ends[comparison]]
    }
}

/// The score of one side against another, with what the verdict needs besides the total.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchScore {
    pub total: f64,
    /// The traits' part of `total`, without the identifier comparisons.
    pub trait_total: f64,
    /// Every compared field, traits first, in configuration order.
    pub fields: Vec<FieldScore>,
    /// The sum of the negative weights of names and dates: how clearly the two sides are
    /// different people. Where someone lives may change; who they are does not.
    pub personal_disagreement: f64,
    /// `personal_disagreement` plus the agreement of birth dates, which no family shares:
    /// the measure of "clearly another person".
    pub personal_conflict: f64,
    /// The values both sides agree on exactly, per trait, for term-frequency adjustment.
    pub exact_values: Vec<(CompactString, CompactString)>,
    /// The pair of values each compared field's level came from, aligned with `fields`
    /// (`None` for a missing field): the similarities are filled in from them only for a
    /// score that becomes a link ([`MatchScore::with_similarities`]), as most candidates
    /// scored never do.
    compared_values: Vec<Option<(CompactString, CompactString)>>,
    /// Both sides hold identifiers of a compared kind and none of them are alike: two
    /// accounts, which makes a disagreement on a name or date decisive.
    pub distinct_identifiers: bool,
    /// A single-valued identifier kind (e.g. national id) whose values clearly differ.
    pub different_identifier: Option<CompactString>,
}

impl MatchScore {
    /// The score with each compared field's Jaro–Winkler similarity of the values its level
    /// came from, for the evidence of a link.
    pub fn with_similarities(mut self) -> Self {
        for (field, values) in self.fields.iter_mut().zip(&self.compared_values) {
            if let (Some((a, b)), true) = (values, field.similarity == 0.0) {
                field.similarity = round3(strsim::jaro_winkler(a, b));
            }
        }
        self
    }

    /// Whether any field could be compared at all; a score of nothing is not evidence.
    pub fn has_evidence(&self) -> bool {
        self.fields.iter().any(|f| f.level != "missing")
    }
}

/// What the model says about a scored pair.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Above the threshold with nothing against it.
    Link,
    /// Not enough evidence: no link, and nothing to report.
    Below,
    /// Enough evidence, or an identifier link, that a rule refuses: report it.
    Refused(RefusalRule, Option<CompactString>),
}

/// The compiled comparison model of `[engine.fuzzy]` with the conflict rules of
/// `[engine.protection]`.
#[derive(Debug, Clone)]
pub struct MatchModel {
    traits: Vec<CompiledComparison>,
    identifiers: Vec<CompiledComparison>,
    /// The fields a prepared side holds values of: every compared trait, then each swap
    /// partner that is not compared itself.
    prepared_fields: Vec<CompactString>,
    threshold: f64,
    reference_profiles: f64,
    conflict_score: f64,
    distinct_identity_conflict_score: f64,
}

impl MatchModel {
    /// Builds the model from validated configuration.
    pub fn new(fuzzy: &FuzzyConfig, protection: &ProtectionConfig) -> Self {
        let mut prepared_fields: Vec<CompactString> = fuzzy
            .fields
            .keys()
            .map(|field| field.as_str().into())
            .collect();
        let mut traits = Vec::with_capacity(fuzzy.fields.len());
        for (field, config) in &fuzzy.fields {
            let mut comparison = CompiledComparison::new(field, config);
            comparison.implied_by_traits = config
                .implied_by
                .iter()
                .filter_map(|other| fuzzy.fields.keys().position(|field| field == other))
                .collect();
            comparison.partner_slot = config
                .swap_with
                .as_deref()
                .map(|partner| slot_of(&mut prepared_fields, partner));
            traits.push(comparison);
        }
        MatchModel {
            traits,
            identifiers: fuzzy
                .identifiers
                .iter()
                .map(|(kind, config)| CompiledComparison::new(kind, config))
                .collect(),
            prepared_fields,
            threshold: fuzzy.threshold,
            reference_profiles: fuzzy.reference_profiles.max(1) as f64,
            conflict_score: protection.conflict_score,
            distinct_identity_conflict_score: protection.distinct_identity_conflict_score,
        }
    }

    /// Looks up `side`'s values of every field the model compares, for
    /// [`MatchModel::score_prepared`]: a side scored against many others (an event against
    /// its candidates) is prepared once.
    pub fn prepare<'s>(&self, side: &'s impl Side) -> PreparedSide<'s> {
        let traits = self
            .prepared_fields
            .iter()
            .map(|field| side.trait_values(field))
            .collect();
        let mut identifiers = Vec::new();
        let mut identifier_ends = Vec::with_capacity(self.identifiers.len());
        for comparison in &self.identifiers {
            side.push_identifier_values(&comparison.field, &mut identifiers);
            identifier_ends.push(identifiers.len());
        }
        PreparedSide {
            traits,
            identifiers,
            identifier_ends,
        }
    }

    /// The identifier kinds the model compares; it looks at no other kind.
    pub fn identifier_kinds(&self) -> Vec<CompactString> {
        self.identifiers.iter().map(|c| c.field.clone()).collect()
    }

    /// The traits the model compares with their comparison kinds, in scoring order.
    pub fn trait_comparisons(&self) -> impl Iterator<Item = (&str, ComparisonKind)> {
        self.traits.iter().map(|c| (c.field.as_str(), c.kind))
    }

    /// The level index each trait comparison reaches for `left` against `right` (`None`
    /// where either side lacks the field): the comparison vector EM training counts.
    pub fn comparison_vector(&self, left: &impl Side, right: &impl Side) -> Vec<Option<u8>> {
        let (left, right) = (self.prepare(left), self.prepare(right));
        self.trait_levels(&left, &right)
            .into_iter()
            .map(|found| found.map(|(level, _, _)| level as u8))
            .collect()
    }

    /// Per trait comparison, the best level over every pair of values and the pair it came
    /// from; `None` where either side lacks the field.
    fn trait_levels<'v>(
        &self,
        left: &PreparedSide<'v>,
        right: &PreparedSide<'v>,
    ) -> Vec<Option<(usize, &'v str, &'v str)>> {
        self.traits
            .iter()
            .enumerate()
            .map(|(index, comparison)| {
                let partners = match comparison.partner_slot {
                    Some(slot) => Partners {
                        left: left.traits[slot],
                        right: right.traits[slot],
                    },
                    None => Partners::default(),
                };
                best_level(
                    comparison,
                    left.traits[index].iter().map(CompactString::as_str),
                    right.traits[index].iter().map(CompactString::as_str),
                    partners,
                )
            })
            .collect()
    }

    /// Scores `left` against `right`: per field, every value of one side against every
    /// value of the other, the best weight wins.
    pub fn score(&self, left: &impl Side, right: &impl Side) -> MatchScore {
        self.score_prepared(&self.prepare(left), &self.prepare(right))
    }

    /// Visits every compared field of `left` against `right` in scoring order: traits, then
    /// identifiers, each with its best level, weight (zero for an agreement another agreeing
    /// field implies) and the pair of values it came from, or `None` for a trait either side
    /// lacks. [`MatchModel::score_prepared`] and [`MatchModel::screen_prepared`] both add the
    /// weights in this order, so their totals are the same number to the last bit.
    fn walk_fields<'v>(
        &self,
        left: &PreparedSide<'v>,
        right: &PreparedSide<'v>,
        mut visit: impl FnMut(Field<'_, 'v>),
    ) {
        let levels = self.trait_levels(left, right);
        for (index, comparison) in self.traits.iter().enumerate() {
            let Some((level, a, b)) = levels[index] else {
                visit(Field::MissingTrait(comparison));
                continue;
            };
            let mut weight = comparison.weights[level];
            // Agreeing on a field that another agreeing field implies (the city of an
            // agreeing postcode) is the same evidence twice.
            let implied = comparison.implied_by_traits.iter().any(|&other| {
                levels[other].is_some_and(|(level, _, _)| level == self.traits[other].exact)
            });
            if implied && weight > 0.0 {
                weight = 0.0;
            }
            visit(Field::Trait(comparison, level, weight, a, b));
        }
        visit(Field::TraitsDone);
        for (index, comparison) in self.identifiers.iter().enumerate() {
            let Some((level, a, b)) = best_level(
                comparison,
                left.identifiers_of(index).iter().copied(),
                right.identifiers_of(index).iter().copied(),
                Partners::default(),
            ) else {
                continue;
            };
            visit(Field::Identifier(
                comparison,
                level,
                comparison.weights[level],
                a,
                b,
            ));
        }
    }

    /// The total [`MatchModel::score_prepared`] would give, without the per-field account:
    /// what candidate search needs to set aside a candidate that cannot reach the threshold
    /// (the term-frequency discount applied afterwards only lowers a score).
    pub fn screen_prepared(&self, left: &PreparedSide<'_>, right: &PreparedSide<'_>) -> f64 {
        let mut total = 0.0;
        self.walk_fields(left, right, |field| match field {
            Field::Trait(_, _, weight, _, _) | Field::Identifier(_, _, weight, _, _) => {
                total += weight
            }
            Field::MissingTrait(_) | Field::TraitsDone => {}
        });
        round3(total)
    }

    /// Scores two prepared sides (see [`MatchModel::score`]).
    pub fn score_prepared(&self, left: &PreparedSide<'_>, right: &PreparedSide<'_>) -> MatchScore {
        let mut result = MatchScore {
            total: 0.0,
            trait_total: 0.0,
            fields: Vec::with_capacity(self.traits.len() + self.identifiers.len()),
            personal_disagreement: 0.0,
            personal_conflict: 0.0,
            exact_values: Vec::new(),
            compared_values: Vec::with_capacity(self.traits.len() + self.identifiers.len()),
            distinct_identifiers: false,
            different_identifier: None,
        };
        let mut any_alike = false;
        let mut any_different = false;
        self.walk_fields(left, right, |field| match field {
            Field::MissingTrait(comparison) => {
                result.fields.push(missing(&comparison.field));
                result.compared_values.push(None);
            }
            Field::Trait(comparison, level, weight, a, b) => {
                if comparison.kind.is_personal() && weight < 0.0 {
                    result.personal_disagreement += weight;
                    result.personal_conflict += weight;
                } else if comparison.kind.offsets_disagreement() {
                    result.personal_conflict += weight;
                }
                if level == comparison.exact {
                    result
                        .exact_values
                        .push((comparison.field.clone(), a.into()));
                }
                result.total += weight;
                result.fields.push(field_score(comparison, level, weight));
                result.compared_values.push(Some((a.into(), b.into())));
            }
            Field::TraitsDone => result.trait_total = round3(result.total),
            Field::Identifier(comparison, level, weight, a, b) => {
                if comparison.label(level) == ELSE {
                    any_different = true;
                    if comparison.refuse_when_different && result.different_identifier.is_none() {
                        result.different_identifier = Some(comparison.field.clone());
                    }
                } else {
                    any_alike = true;
                }
                result.total += weight;
                result.fields.push(field_score(comparison, level, weight));
                result.compared_values.push(Some((a.into(), b.into())));
            }
        });
        result.distinct_identifiers = any_different && !any_alike;
        result.total = round3(result.total);
        result
    }

    /// Why a scored pair must stay apart whatever links it, if it must: a different
    /// single-valued identifier, or names and dates that clearly say another person (two
    /// clear disagreements that no agreeing birth date outweighs; for two sides with their
    /// own, different identifiers, one).
    pub fn conflict(&self, score: &MatchScore) -> Option<(RefusalRule, Option<CompactString>)> {
        if let Some(kind) = &score.different_identifier {
            return Some((RefusalRule::KindLimit, Some(kind.clone())));
        }
        let clear = score.personal_conflict <= self.conflict_score
            || (score.distinct_identifiers
                && score.personal_disagreement <= self.distinct_identity_conflict_score);
        clear.then_some((RefusalRule::ConflictingTraits, None))
    }

    /// The score a link needs in a graph that has created `profiles` profiles: the
    /// configured threshold up to `fuzzy.reference_profiles`, then one more bit each time the
    /// graph doubles. The threshold stands for the prior odds that two records are one
    /// person, which fall as the number of people a record could belong to grows.
    pub fn threshold_for(&self, profiles: u64) -> f64 {
        let growth = (profiles as f64 / self.reference_profiles).log2().max(0.0);
        self.threshold + growth
    }

    /// Link, no link, or a refused link worth reporting, against `threshold`
    /// ([`MatchModel::threshold_for`]).
    pub fn verdict(&self, score: &MatchScore, threshold: f64) -> Verdict {
        if score.total < threshold {
            return Verdict::Below;
        }
        match self.conflict(score) {
            Some((rule, kind)) => Verdict::Refused(rule, kind),
            None => Verdict::Link,
        }
    }
}

/// One compared field, as [`MatchModel::walk_fields`] visits it: the comparison, its level,
/// its weight and the two values, or a trait one side lacks; `TraitsDone` comes between the
/// traits and the identifiers.
enum Field<'c, 'v> {
    MissingTrait(&'c CompiledComparison),
    Trait(&'c CompiledComparison, usize, f64, &'v str, &'v str),
    TraitsDone,
    Identifier(&'c CompiledComparison, usize, f64, &'v str, &'v str),
}

/// The index of `field` in `fields`, added at the end if it is not there yet.
fn slot_of(fields: &mut Vec<CompactString>, field: &str) -> usize {
    match fields.iter().position(|known| known == field) {
        Some(slot) => slot,
        None => {
            fields.push(field.into());
            fields.len() - 1
        }
    }
}

/// The level with the highest weight over every pair of values, with that pair; `None`
/// when either side has no value.
fn best_level<'a>(
    comparison: &CompiledComparison,
    left: impl Iterator<Item = &'a str>,
    right: impl Iterator<Item = &'a str> + Clone,
    partners: Partners<'_>,
) -> Option<(usize, &'a str, &'a str)> {
    let mut best: Option<(usize, &str, &str)> = None;
    for a in left.filter(|v| !v.is_empty()) {
        for b in right.clone().filter(|v| !v.is_empty()) {
            let level = comparison.kind.level_of(a, b, partners);
            let better = match best {
                None => true,
                Some((current, _, _)) => comparison.weights[level] > comparison.weights[current],
            };
            if better {
                best = Some((level, a, b));
            }
            if level == comparison.exact {
                return best;
            }
        }
    }
    best
}

fn missing(field: &str) -> FieldScore {
    FieldScore {
        field: field.into(),
        level: "missing".into(),
        similarity: 0.0,
        weight: 0.0,
    }
}

/// A compared field's score; its similarity is 1 for exact agreement and otherwise filled in
/// by [`MatchScore::with_similarities`].
fn field_score(comparison: &CompiledComparison, level: usize, weight: f64) -> FieldScore {
    FieldScore {
        field: comparison.field.clone(),
        level: comparison.label(level).into(),
        similarity: if level == comparison.exact { 1.0 } else { 0.0 },
        weight: round3(weight),
    }
}

/// Rounds for output so that scores print the same everywhere.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EngineConfig;

    fn model() -> MatchModel {
        let config = EngineConfig::defaults();
        MatchModel::new(&config.fuzzy, &config.protection)
    }

    fn history(pairs: &[(&str, &[&str])]) -> SortedMap<CompactString, Vec<CompactString>> {
        pairs
            .iter()
            .map(|(field, values)| {
                let values = values.iter().map(|v| CompactString::from(*v)).collect();
                (CompactString::from(*field), values)
            })
            .collect()
    }

    proptest::proptest! {
        /// Screening a candidate adds the same weights in the same order as scoring it, so
        /// setting one aside below the threshold never changes a decision.
        #[test]
        fn screening_gives_the_total_scoring_gives(
            left in proptest::collection::vec((0usize..6, 0usize..5), 0..9),
            right in proptest::collection::vec((0usize..6, 0usize..5), 0..9),
        ) {
            const FIELDS: [&str; 6] =
                ["first_name", "last_name", "date_of_birth", "street", "city", "postcode"];
            const VALUES: [[&str; 5]; 6] = [
                ["ann", "anne", "anna", "bob", "a"],
                ["lee", "leigh", "lee jr", "smith", "smyth"],
                ["1980-02-29", "1980-03-29", "1980-29-02", "1981-02-28", "1908-02-29"],
                ["12 high st", "12 high rd", "21 high st", "4 low rd", "12 hgh st"],
                ["leeds", "leads", "york", "springfield", "sprngfield"],
                ["ls6 2ab", "ls6 2ba", "62701", "62704", "ls62ab"],
            ];
            let sides: Vec<SortedMap<CompactString, Vec<CompactString>>> = [left, right]
                .iter()
                .map(|picks| {
                    let mut history: SortedMap<CompactString, Vec<CompactString>> = SortedMap::new();
                    for &(field, value) in picks {
                        history
                            .get_or_default(FIELDS[field].into())
                            .push(VALUES[field][value].into());
                    }
                    history
                })
                .collect();
            let model = model();
            let side = |h| ProfileSide { history: h, identifiers: &[] };
            let (left, right) = (side(&sides[0]), side(&sides[1]));
            let (a, b) = (model.prepare(&left), model.prepare(&right));
            let screened = model.screen_prepared(&a, &b);
            let scored = model.score_prepared(&a, &b).total;
            proptest::prop_assert_eq!(screened.to_bits(), scored.to_bits());
        }
    }

    #[test]
    fn the_best_value_of_a_profile_wins_even_after_a_jr_mismatch() {
        // The Jr/Sr level comes first in a name's levels; it must not end the search for
        // the exact value the profile also holds.
        // The profile's values are sorted: "smith" is compared first.
        let profile = history(&[("last_name", &["smith", "smith jr"])]);
        let event = history(&[("last_name", &["smith jr"])]);
        let side = |h| ProfileSide {
            history: h,
            identifiers: &[],
        };
        let score = model().score(&side(&event), &side(&profile));
        let last = score
            .fields
            .iter()
            .find(|f| f.field == "last_name")
            .unwrap();
        assert_eq!(last.level, "exact");
        assert_eq!(last.similarity, 1.0);
        assert_eq!(score.exact_values.len(), 1);
    }
}
