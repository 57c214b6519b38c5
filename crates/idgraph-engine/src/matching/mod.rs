//! Fuzzy matching: candidate search by blocking rules, and Fellegi–Sunter scoring of a
//! candidate with ordered comparison levels per field.
//!
//! [`blocking`] says which profiles are worth comparing, [`comparison`] which level of
//! agreement two values reach, [`model`] what each level weighs and what a score means, and
//! [`text`] holds the string predicates levels are made of; [`train`] estimates m and u from
//! unlabelled records. Everything here is a pure function
//! of its inputs: no state, no I/O.

pub mod blocking;
pub mod comparison;
pub mod model;
mod nicknames;
pub mod text;
pub mod train;

pub use blocking::{
    blocking_keys_from, identifier_typo_keys, is_broad_key, rule_key, BLOCKING_RULES,
};
pub use comparison::ComparisonKind;
pub use model::{EventSide, MatchModel, MatchScore, PreparedSide, ProfileSide, Side, Verdict};
pub use text::{are_nicknames, soundex};

use idgraph_model::{CompactString, SortedMap};

/// The traits a profile remembers past values of, for matching: every trait a comparison may
/// be configured for.
pub const MATCH_FIELDS: [&str; 8] = [
    "first_name",
    "last_name",
    "date_of_birth",
    "street",
    "address_line2",
    "city",
    "postcode",
    "state",
];

/// Blocking keys for a set of normalized traits.
pub fn blocking_keys(traits: &SortedMap<CompactString, CompactString>) -> Vec<String> {
    blocking_keys_from(|name| traits.get(name).map(CompactString::as_str))
}
