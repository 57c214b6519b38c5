//! Engine settings: the `[engine]` table of the config file.
//!
//! The structs have no serde defaults on purpose: every default lives in
//! `config/default.toml`, which the loader reads first, so the file is the one place to look.

use std::collections::BTreeMap;

use idgraph_model::NormalizeConfig;

use crate::matching::comparison::ELSE;
use crate::matching::{ComparisonKind, MATCH_FIELDS};
use serde::{Deserialize, Serialize};

/// `config/default.toml`, compiled in so that every build carries its documented defaults.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../../config/default.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub normalize: NormalizeConfig,
    pub identifiers: IdentifiersConfig,
    pub protection: ProtectionConfig,
    pub fuzzy: FuzzyConfig,
    pub dead_letter: DeadLetterConfig,
    pub duplicates: DuplicatesConfig,
    pub retention: RetentionConfig,
    pub cache: CacheConfig,
    /// Source name → how to read that source's own format (instead of the canonical
    /// envelope or Segment Spec).
    pub mappings: BTreeMap<String, idgraph_model::FieldMapping>,
}

/// How long an event id is remembered to recognise a re-sent event (docs/formats.md §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuplicatesConfig {
    /// The window in days of event time; 0 remembers every event id for ever.
    pub window_days: u32,
}

impl DuplicatesConfig {
    /// The window in milliseconds, if there is one.
    pub fn window_ms(&self) -> Option<i64> {
        days_in_ms(self.window_days)
    }
}

/// `days` as milliseconds; 0 (for ever) as none.
fn days_in_ms(days: u32) -> Option<i64> {
    (days > 0).then(|| i64::from(days) * 86_400_000)
}

/// How long per-event records other than the duplicate window's are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Days of event time the evidence behind `explain` is kept; 0 keeps it for ever.
    pub evidence_days: u32,
}

impl EngineConfig {
    /// How long event and evidence records are kept.
    pub fn retention(&self) -> crate::duplicates::Retention {
        crate::duplicates::Retention {
            events_ms: self.duplicates.window_ms(),
            evidence_ms: days_in_ms(self.retention.evidence_days),
        }
    }
}

/// The decoded-state cache kept between batches ([`crate::StateCache`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory (MiB, estimated) of the records (identifier nodes, profiles, blocking keys)
    /// kept decoded between batches, a quarter of it for profiles' match features; 0 turns
    /// the cache off.
    pub max_mb: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifiersConfig {
    /// Kinds from strongest to weakest; decides which profile an event joins when a merge is
    /// refused. Kinds not listed rank after all listed ones, in name order.
    pub priority: Vec<String>,
    /// Kinds that identify a device or browser, not a person: they may attach an event or an
    /// anonymous profile but never merge two profiles that both have strong identifiers.
    pub weak_kinds: Vec<String>,
    /// Most identifiers of a kind one profile may hold.
    pub max_per_profile: BTreeMap<String, u32>,
    /// The limit for kinds not in `max_per_profile`.
    pub default_max_per_profile: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionConfig {
    /// An identifier value seen on this many distinct profiles becomes generic.
    pub generic_threshold: u32,
    /// Most identifiers a profile may hold.
    pub max_profile_identifiers: u32,
    /// Trait disagreement (the sum of the negative field weights) at or below which the two
    /// sides of a link are different people, whatever else agrees: the link is refused as
    /// `conflicting_traits` and counted against the linking value.
    pub conflict_score: f64,
    /// The same for a pair whose compared identifiers all clearly differ (two accounts),
    /// counting names and dates only: one clear disagreement there is enough.
    pub distinct_identity_conflict_score: f64,
    /// Least trait score with which a device or cookie may merge two profiles that both hold
    /// strong identifiers.
    pub weak_link_min_score: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuzzyConfig {
    pub enabled: bool,
    /// Sum of field weights at or above which an event links to a candidate, in a graph of
    /// up to `reference_profiles` profiles.
    pub threshold: f64,
    /// Graph size (profiles created) past which the threshold rises by one per doubling.
    pub reference_profiles: u64,
    /// Most candidate profiles scored per search.
    pub max_candidates: usize,
    /// Most candidates scored when a profile that grew through an identifier looks under its
    /// new blocking keys for profiles it now matches.
    pub max_candidates_on_growth: usize,
    /// A blocking key shared by more profiles than this stops producing candidates.
    pub max_block_size: usize,
    /// Past values kept per matching trait, so old addresses and name spellings still match.
    pub trait_history: usize,
    /// Most further profiles one event may merge by fuzzy match after it has joined one
    /// (bridging two profiles of one person); bounds the work a single event can cause.
    pub max_bridges: usize,
    /// Trait name → how it is compared and what each level weighs.
    pub fields: BTreeMap<String, ComparisonConfig>,
    /// Identifier kind → how values of that kind are compared when both sides hold one.
    pub identifiers: BTreeMap<String, ComparisonConfig>,
}

/// One compared field: its comparison kind and, per level, m (how often two records of the
/// same person reach it) and u (how often two records of different people do). The level's
/// weight is log2(m/u).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComparisonConfig {
    pub comparison: ComparisonKind,
    pub m: BTreeMap<String, f64>,
    pub u: BTreeMap<String, f64>,
    /// The field this one is compared with for swapped values (first and last name).
    pub swap_with: Option<String>,
    /// Fields whose exact agreement implies agreement on this one (a postcode implies its
    /// city): then this field's agreement adds nothing, as it is the same evidence.
    #[serde(default)]
    pub implied_by: Vec<String>,
    /// Identifiers only: clearly different values refuse the link (a second national id).
    pub refuse_when_different: Option<bool>,
    /// Identifiers only: find candidates whose value is one edit or transposition away.
    pub block_on_typos: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Messages larger than this are dead-lettered unparsed as `too_large`.
    pub max_message_bytes: usize,
    /// How much of a payload a dead letter keeps.
    pub max_payload_bytes: usize,
}

/// A setting that cannot work, with the key to fix.
#[derive(Debug, thiserror::Error)]
#[error("engine.{key}: {problem}")]
pub struct ConfigProblem {
    pub key: String,
    pub problem: String,
}

impl EngineConfig {
    /// The defaults from `config/default.toml`.
    pub fn defaults() -> Self {
        #[derive(Deserialize)]
        struct File {
            engine: EngineConfig,
        }
        // Keys outside [engine] belong to other crates; a lenient outer struct ignores them.
        let file: File = toml::from_str(DEFAULT_CONFIG_TOML)
            .expect("config/default.toml has a valid [engine] table");
        file.engine
    }

    /// Checks the settings that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        let problem = |key: &str, problem: String| {
            Err(ConfigProblem {
                key: key.to_owned(),
                problem,
            })
        };
        if self.protection.generic_threshold < 2 {
            return problem(
                "protection.generic_threshold",
                format!(
                    "must be at least 2 (one profile is never generic), got {}",
                    self.protection.generic_threshold
                ),
            );
        }
        if self.protection.conflict_score >= self.protection.weak_link_min_score {
            return problem(
                "protection.conflict_score",
                format!(
                    "must be below protection.weak_link_min_score ({}), got {}",
                    self.protection.weak_link_min_score, self.protection.conflict_score
                ),
            );
        }
        if self.protection.max_profile_identifiers == 0 {
            return problem(
                "protection.max_profile_identifiers",
                "must be at least 1".into(),
            );
        }
        if self.fuzzy.max_candidates == 0 && self.fuzzy.enabled {
            return problem(
                "fuzzy.max_candidates",
                "must be at least 1 when fuzzy matching is enabled".into(),
            );
        }
        for (field, comparison) in &self.fuzzy.fields {
            let key = format!("fuzzy.fields.{field}");
            if !MATCH_FIELDS.contains(&field.as_str()) {
                return problem(
                    &key,
                    format!(
                        "is not a trait fuzzy matching can compare; use one of {MATCH_FIELDS:?}"
                    ),
                );
            }
            comparison.validate(&key, false)?;
            for other in comparison.swap_with.iter().chain(&comparison.implied_by) {
                if !self.fuzzy.fields.contains_key(other) {
                    return problem(
                        &key,
                        format!("names {other:?}, which has no [engine.fuzzy.fields.{other}]"),
                    );
                }
            }
        }
        for (kind, comparison) in &self.fuzzy.identifiers {
            comparison.validate(&format!("fuzzy.identifiers.{kind}"), true)?;
        }
        for (source, mapping) in &self.mappings {
            if let Some(bad) = mapping
                .pointers()
                .find(|p| !p.is_empty() && !p.starts_with('/'))
            {
                return problem(
                    &format!("mappings.{source}"),
                    format!("{bad:?} is not a json pointer; pointers start with \"/\", e.g. \"/contact/email\""),
                );
            }
        }
        if self.dead_letter.max_payload_bytes == 0 {
            return problem("dead_letter.max_payload_bytes", "must be at least 1".into());
        }
        Ok(())
    }
}

impl ComparisonConfig {
    /// Checks that m and u name exactly the comparison's levels, with probabilities in (0, 1].
    fn validate(&self, key: &str, is_identifier: bool) -> Result<(), ConfigProblem> {
        let problem = |problem: String| {
            Err(ConfigProblem {
                key: key.to_owned(),
                problem,
            })
        };
        let levels = self.comparison.levels();
        for (name, table) in [("m", &self.m), ("u", &self.u)] {
            for level in levels {
                match table.get(*level) {
                    None => {
                        return problem(format!(
                            "{name} has no probability for level {level:?}; the levels of {:?} are {levels:?}",
                            self.comparison
                        ))
                    }
                    Some(p) if !(*p > 0.0 && *p <= 1.0) => {
                        return problem(format!(
                            "{name}.{level} must be above 0 and at most 1, got {p}"
                        ))
                    }
                    Some(_) => {}
                }
            }
            if let Some(unknown) = table.keys().find(|level| !levels.contains(&level.as_str())) {
                return problem(format!(
                    "{name} names level {unknown:?}, which {:?} does not have; its levels are {levels:?}",
                    self.comparison
                ));
            }
        }
        debug_assert_eq!(levels.last(), Some(&ELSE));
        if !is_identifier && (self.refuse_when_different.is_some() || self.block_on_typos.is_some())
        {
            return problem(
                "refuse_when_different and block_on_typos apply to identifiers only".into(),
            );
        }
        if is_identifier && (self.swap_with.is_some() || !self.implied_by.is_empty()) {
            return problem("swap_with and implied_by apply to traits only".into());
        }
        Ok(())
    }
}
