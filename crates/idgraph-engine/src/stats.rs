//! Counters a batch produces: the raw material of metrics and data-quality reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one batch (or, added up, one run) did. Keys are sources, kinds, rules and failure
/// kinds: never customer data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Valid events per source.
    pub events: BTreeMap<String, u64>,
    /// Dead-lettered messages per failure kind.
    pub dead_letters: BTreeMap<String, u64>,
    /// Resolution actions (new, matched, merged, duplicate).
    pub actions: BTreeMap<String, u64>,
    /// Events that joined an existing profile (matched or merged), per source.
    pub matched_by_source: BTreeMap<String, u64>,
    /// Events with no usable identifier, per source.
    pub no_identifier_by_source: BTreeMap<String, u64>,
    /// Identifier values dropped as invalid, per kind.
    pub invalid_identifiers: BTreeMap<String, u64>,
    /// Identifier values dropped as junk or blocked, per kind.
    pub blocked_identifiers: BTreeMap<String, u64>,
    /// Trait values dropped as invalid, per trait.
    pub invalid_traits: BTreeMap<String, u64>,
    /// Fields left out of otherwise valid events because their JSON type was wrong, per field.
    #[serde(default)]
    pub wrong_type_fields: BTreeMap<String, u64>,
    /// Events carrying each trait, per source then trait.
    pub trait_present: BTreeMap<String, BTreeMap<String, u64>>,
    pub profiles_created: u64,
    pub merges: u64,
    pub merges_refused: BTreeMap<String, u64>,
    /// Identifier values that became generic.
    pub identifiers_made_generic: u64,
    /// Identifier occurrences ignored because the value is generic.
    pub generic_identifier_hits: u64,
    /// Events linked by fuzzy matching.
    pub fuzzy_links: u64,
    /// Best fuzzy score of each event that had candidates.
    pub fuzzy_scores: Vec<f64>,
    /// Candidates scored per event that went through fuzzy matching.
    pub candidates_per_event: Vec<u32>,
    /// Identifier counts of the profiles written by the batch.
    pub profile_sizes: Vec<u32>,
    /// Event counts of the profiles written by the batch (how much activity a profile joins).
    pub profile_event_counts: Vec<u64>,
}

impl BatchStats {
    /// Adds `other`'s counters into `self`, for a run's totals. The per-profile, score and
    /// candidate samples are not kept: they belong to their batch (the worker's metrics
    /// observe them batch by batch), and appending them made a long run's totals grow by a
    /// few values per event, without end.
    pub fn absorb(&mut self, other: BatchStats) {
        fn add(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
            for (k, v) in from {
                *into.entry(k).or_default() += v;
            }
        }
        add(&mut self.events, other.events);
        add(&mut self.dead_letters, other.dead_letters);
        add(&mut self.actions, other.actions);
        add(&mut self.matched_by_source, other.matched_by_source);
        add(
            &mut self.no_identifier_by_source,
            other.no_identifier_by_source,
        );
        add(&mut self.invalid_identifiers, other.invalid_identifiers);
        add(&mut self.blocked_identifiers, other.blocked_identifiers);
        add(&mut self.invalid_traits, other.invalid_traits);
        add(&mut self.wrong_type_fields, other.wrong_type_fields);
        for (source, traits) in other.trait_present {
            add(self.trait_present.entry(source).or_default(), traits);
        }
        self.profiles_created += other.profiles_created;
        self.merges += other.merges;
        add(&mut self.merges_refused, other.merges_refused);
        self.identifiers_made_generic += other.identifiers_made_generic;
        self.generic_identifier_hits += other.generic_identifier_hits;
        self.fuzzy_links += other.fuzzy_links;
    }

    pub fn total_events(&self) -> u64 {
        self.events.values().sum()
    }

    pub fn total_dead_letters(&self) -> u64 {
        self.dead_letters.values().sum()
    }
}

pub(crate) fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    if let Some(v) = map.get_mut(key) {
        *v += 1;
    } else {
        map.insert(key.to_owned(), 1);
    }
}

/// The data-quality figures of README, Operations, computed from accumulated [`BatchStats`]: what the
/// quality topic and `quality.json` carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityReport {
    pub schema_version: u32,
    /// Valid events per source.
    pub events: BTreeMap<String, u64>,
    /// Dead-lettered messages per failure kind.
    pub dead_letters: BTreeMap<String, u64>,
    /// Share of each source's events that carried no usable identifier.
    pub no_identifier_share: BTreeMap<String, f64>,
    /// Identifier values dropped as invalid, per kind.
    pub invalid_identifiers: BTreeMap<String, u64>,
    /// Identifier values dropped as junk or blocked, per kind.
    pub blocked_identifiers: BTreeMap<String, u64>,
    /// Trait values dropped as invalid, per trait.
    pub invalid_traits: BTreeMap<String, u64>,
    /// Fields left out of otherwise valid events because their JSON type was wrong, per field.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wrong_type_fields: BTreeMap<String, u64>,
    /// Per source, the share of events that carried each trait.
    pub trait_completeness: BTreeMap<String, BTreeMap<String, f64>>,
    /// Share of each source's events that joined an existing profile.
    pub match_rate: BTreeMap<String, f64>,
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        // Four decimals: enough for a dashboard, and stable in text form.
        ((part as f64 / whole as f64) * 10_000.0).round() / 10_000.0
    }
}

impl QualityReport {
    pub fn from_stats(stats: &BatchStats) -> Self {
        let per_source = |counts: &BTreeMap<String, u64>| -> BTreeMap<String, f64> {
            stats
                .events
                .iter()
                .map(|(source, total)| {
                    (
                        source.clone(),
                        share(counts.get(source).copied().unwrap_or(0), *total),
                    )
                })
                .collect()
        };
        let trait_completeness = stats
            .trait_present
            .iter()
            .map(|(source, traits)| {
                let total = stats.events.get(source).copied().unwrap_or(0);
                let shares = traits
                    .iter()
                    .map(|(name, n)| (name.clone(), share(*n, total)))
                    .collect();
                (source.clone(), shares)
            })
            .collect();
        QualityReport {
            schema_version: idgraph_model::SCHEMA_VERSION,
            events: stats.events.clone(),
            dead_letters: stats.dead_letters.clone(),
            no_identifier_share: per_source(&stats.no_identifier_by_source),
            invalid_identifiers: stats.invalid_identifiers.clone(),
            blocked_identifiers: stats.blocked_identifiers.clone(),
            invalid_traits: stats.invalid_traits.clone(),
            wrong_type_fields: stats.wrong_type_fields.clone(),
            trait_completeness,
            match_rate: per_source(&stats.matched_by_source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_totals_add_counters_and_do_not_grow_with_samples() {
        let mut totals = BatchStats::default();
        for _ in 0..1000 {
            let mut batch = BatchStats::default();
            bump(&mut batch.events, "web");
            batch.merges = 2;
            batch.fuzzy_scores = vec![20.0; 50];
            batch.candidates_per_event = vec![3; 50];
            batch.profile_sizes = vec![4; 50];
            batch.profile_event_counts = vec![9; 50];
            totals.absorb(batch);
        }
        assert_eq!(totals.events["web"], 1000);
        assert_eq!(totals.merges, 2000);
        assert!(totals.fuzzy_scores.is_empty() && totals.candidates_per_event.is_empty());
        assert!(totals.profile_sizes.is_empty() && totals.profile_event_counts.is_empty());
    }
}
