//! Engine settings: the `[engine]` table of the config file.
//!
//! The structs have no serde defaults on purpose: every default lives in
//! `config/default.toml`, which the loader reads first, so the file is the one place to look.

use std::collections::BTreeMap;

use idgraph_model::NormalizeConfig;
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
    pub cache: CacheConfig,
    /// Source name → how to read that source's own format (instead of the canonical
    /// envelope or Segment Spec).
    pub mappings: BTreeMap<String, idgraph_model::FieldMapping>,
}

/// The decoded-state cache kept between batches ([`crate::StateCache`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most records (identifier nodes, profiles, blocking keys) kept decoded; 0 turns it off.
    pub max_entries: usize,
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
    /// A trait score below this between the two sides of a link means two different people:
    /// the link is refused as `conflicting_traits` and counted against the linking value.
    pub conflict_score: f64,
    /// Least trait score with which a device or cookie may merge two profiles that both hold
    /// strong identifiers.
    pub weak_link_min_score: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuzzyConfig {
    pub enabled: bool,
    /// Sum of field weights at or above which an event links to a candidate.
    pub threshold: f64,
    /// Most candidate profiles scored per event.
    pub max_candidates: usize,
    /// A blocking key shared by more profiles than this stops producing candidates.
    pub max_block_size: usize,
    /// Past values kept per matching trait, so old addresses and name spellings still match.
    pub trait_history: usize,
    /// Field name → weights.
    pub fields: BTreeMap<String, FieldWeights>,
}

/// Log2 Bayes factors for one field's agreement levels, Fellegi–Sunter style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldWeights {
    pub exact: f64,
    pub close: f64,
    pub disagree: f64,
    /// Jaro-Winkler similarity at or above which two values are close.
    pub close_similarity: f64,
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
        // Scoring compares exactly these fields, so each needs weights.
        for required in crate::matching::MATCH_FIELDS {
            if !self.fuzzy.fields.contains_key(required) {
                return problem(
                    "fuzzy.fields",
                    format!("is missing weights for {required:?}"),
                );
            }
        }
        for (field, weights) in &self.fuzzy.fields {
            if !(0.0..=1.0).contains(&weights.close_similarity) {
                return problem(
                    &format!("fuzzy.fields.{field}.close_similarity"),
                    format!("must be between 0 and 1, got {}", weights.close_similarity),
                );
            }
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
