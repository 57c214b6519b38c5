//! Comparisons: for each kind of field, the ordered levels of agreement two values can reach
//! (Splink's comparison levels). The first level whose predicate holds is the pair's level;
//! `else` is always last. A missing value never reaches this code: it is no evidence, weight 0.
//!
//! Adding a level is a change here only: name it in [`ComparisonKind::levels`], test it in the
//! kind's `level_of` arm, and give it m and u in `config/default.toml`.

use idgraph_model::CompactString;
use serde::{Deserialize, Serialize};

use super::text::{
    are_nicknames, at_most_one_edit, generational_suffix, house_number, is_initial_of,
    jaro_winkler, sound_alike, street_name, without_generational_suffix,
};

/// How the values of one field are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComparisonKind {
    /// Personal names: typos, phonetic spellings, nicknames, initials, first and last name
    /// swapped, and a generational suffix (Jr, Sr) that tells parent from child.
    Name,
    /// Dates (YYYY-MM-DD): day and month swapped, one digit mistyped, same year and month.
    Date,
    /// Street addresses: the house number and the street name compared apart.
    Street,
    /// Other free text (city, address line 2, state): typos and close spellings.
    Text,
    /// Codes and identifiers (postcodes, national ids, phones): one digit mistyped or two
    /// transposed.
    Code,
}

/// The label of the level every comparison ends with: clear disagreement.
pub const ELSE: &str = "else";

/// The label of the level of identical values, which every comparison has.
pub const EXACT: &str = "exact";

impl ComparisonKind {
    /// The kind's levels, in the order their predicates are tried.
    pub fn levels(self) -> &'static [&'static str] {
        match self {
            ComparisonKind::Name => &[
                "generation",
                "exact",
                "swapped",
                "one_edit",
                "cross_field",
                "nickname",
                "jaro_winkler_92",
                "phonetic",
                "initial",
                "jaro_winkler_80",
                ELSE,
            ],
            ComparisonKind::Date => &[
                "exact",
                "day_month_swapped",
                "one_digit",
                "year_month",
                ELSE,
            ],
            ComparisonKind::Street => &[
                "exact",
                "one_edit",
                "same_number_close_name",
                "jaro_winkler_88",
                "same_name",
                "cross_field",
                ELSE,
            ],
            ComparisonKind::Text => &["exact", "one_edit", "jaro_winkler_88", "cross_field", ELSE],
            ComparisonKind::Code => &["exact", "one_edit", ELSE],
        }
    }

    /// Whether the kind describes the person (a name or a birth date) rather than where
    /// they live or which account they use: a clear disagreement here says "another person".
    pub fn is_personal(self) -> bool {
        matches!(self, ComparisonKind::Name | ComparisonKind::Date)
    }

    /// Whether agreement on this kind speaks against a disagreement elsewhere. A shared birth
    /// date is personal; a shared surname or first name is what family members have, so it
    /// cannot vouch for two records whose other name or birth date clearly differs.
    pub fn offsets_disagreement(self) -> bool {
        matches!(self, ComparisonKind::Date)
    }

    /// The level index of a pair of values. `partners` are the values each side holds for
    /// the field this one may be swapped with (first and last name), empty if none.
    pub fn level_of(self, a: &str, b: &str, partners: Partners<'_>) -> usize {
        let label = match self {
            ComparisonKind::Name => name_level(a, b, partners),
            ComparisonKind::Date => date_level(a, b),
            ComparisonKind::Street => street_level(a, b, partners),
            ComparisonKind::Text => text_level(a, b, partners),
            ComparisonKind::Code => code_level(a, b),
        };
        self.index_of(label)
    }

    /// The index of a level label this kind has.
    pub fn index_of(self, label: &str) -> usize {
        self.levels()
            .iter()
            .position(|level| *level == label)
            .expect("every level a predicate returns is listed in levels()")
    }
}

/// The values both sides hold for a field's swap partner.
#[derive(Debug, Clone, Copy, Default)]
pub struct Partners<'a> {
    pub left: &'a [CompactString],
    pub right: &'a [CompactString],
}

/// Short words differ by one letter from other words ("ann", "dan"): one edit counts as a
/// typo only from this many characters on.
const MIN_TYPO_LENGTH: usize = 4;

fn is_typo(a: &str, b: &str) -> bool {
    a.chars().count().min(b.chars().count()) >= MIN_TYPO_LENGTH && at_most_one_edit(a, b)
}

/// Whether two names are the same name despite small differences: equal, one typo apart or
/// very close by Jaro–Winkler.
fn same_name(a: &str, b: &str) -> bool {
    a == b || is_typo(a, b) || jaro_winkler(a, b) >= 0.92
}

/// Whether two names differ only in spaces ("de silva" and "desilva", "h o" and "ho"): a
/// typing slip like any other.
fn same_without_spaces(a: &str, b: &str) -> bool {
    let letters = |s: &'_ str| s.chars().filter(|c| *c != ' ').collect::<Vec<char>>();
    (a.contains(' ') || b.contains(' ')) && letters(a) == letters(b)
}

fn name_level(a: &str, b: &str, partners: Partners<'_>) -> &'static str {
    if generational_suffix(a) != generational_suffix(b) {
        return "generation";
    }
    let (a, b) = (
        without_generational_suffix(a),
        without_generational_suffix(b),
    );
    if a == b {
        return "exact";
    }
    // One side's value written in the other field of the other side: both ways is a swap,
    // one way half of one, or a name typed into the wrong box.
    let in_right_partner = partners.right.iter().any(|p| same_name(a, p));
    let in_left_partner = partners.left.iter().any(|p| same_name(p, b));
    if in_right_partner && in_left_partner {
        return "swapped";
    }
    if is_typo(a, b) || same_without_spaces(a, b) {
        return "one_edit";
    }
    if in_right_partner || in_left_partner {
        return "cross_field";
    }
    if are_nicknames(a, b) {
        return "nickname";
    }
    let similarity = jaro_winkler(a, b);
    if similarity >= 0.92 {
        "jaro_winkler_92"
    } else if similarity >= 0.7 && sound_alike(a, b) {
        // Names that sound alike also look somewhat alike; testing only those spares the
        // phonetic encoding of every unrelated candidate.
        "phonetic"
    } else if is_initial_of(a, b) {
        "initial"
    } else if similarity >= 0.80 {
        "jaro_winkler_80"
    } else {
        ELSE
    }
}

/// A date's year, month and day as written (YYYY-MM-DD).
fn date_parts(date: &str) -> Option<(&str, &str, &str)> {
    let mut parts = date.splitn(3, '-');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

fn date_level(a: &str, b: &str) -> &'static str {
    if a == b {
        return "exact";
    }
    let (Some((ay, am, ad)), Some((by, bm, bd))) = (date_parts(a), date_parts(b)) else {
        return ELSE;
    };
    if ay == by && am == bd && ad == bm {
        "day_month_swapped"
    } else if at_most_one_edit(a, b) {
        // Over the whole date one edit is one digit mistyped or two neighbours transposed
        // (1945 and 1954); the dashes never move.
        "one_digit"
    } else if ay == by && am == bm {
        "year_month"
    } else {
        ELSE
    }
}

/// Whether two pieces of address text are the same despite a typo.
fn same_text(a: &str, b: &str) -> bool {
    !a.is_empty() && (a == b || is_typo(a, b) || jaro_winkler(a, b) >= 0.92)
}

fn street_level(a: &str, b: &str, partners: Partners<'_>) -> &'static str {
    if a == b {
        return "exact";
    }
    if is_typo(a, b) {
        return "one_edit";
    }
    let (name_a, name_b) = (street_name(a), street_name(b));
    let names_close = name_a == name_b || is_typo(name_a, name_b);
    let numbers = (house_number(a), house_number(b));
    let same_number = matches!(numbers, (Some(x), Some(y)) if x == y);
    if same_number && (names_close || jaro_winkler(name_a, name_b) >= 0.88) {
        "same_number_close_name"
    } else if jaro_winkler(a, b) >= 0.88 {
        "jaro_winkler_88"
    } else if names_close && !name_a.is_empty() {
        "same_name"
    } else if partners.right.iter().any(|p| same_text(name_a, p))
        || partners.left.iter().any(|p| same_text(p, name_b))
    {
        // The street written where the other record has its second address line.
        "cross_field"
    } else {
        ELSE
    }
}

fn text_level(a: &str, b: &str, partners: Partners<'_>) -> &'static str {
    if a == b {
        "exact"
    } else if a.chars().count().min(b.chars().count()) >= 3 && at_most_one_edit(a, b) {
        "one_edit"
    } else if jaro_winkler(a, b) >= 0.88 {
        "jaro_winkler_88"
    } else if partners.right.iter().any(|p| same_text(a, street_name(p)))
        || partners.left.iter().any(|p| same_text(street_name(p), b))
    {
        // Written in the other record's partner field (a second address line that is the
        // other's street); a street's house number is left out of the comparison.
        "cross_field"
    } else {
        ELSE
    }
}

fn code_level(a: &str, b: &str) -> &'static str {
    if a == b {
        "exact"
    } else if a.chars().count().min(b.chars().count()) >= 3 && at_most_one_edit(a, b) {
        "one_edit"
    } else {
        ELSE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(kind: ComparisonKind, a: &str, b: &str) -> &'static str {
        kind.levels()[kind.level_of(a, b, Partners::default())]
    }

    #[test]
    fn names_reach_the_level_of_their_corruption() {
        let name = ComparisonKind::Name;
        assert_eq!(label(name, "smith", "smith"), "exact");
        assert_eq!(label(name, "smith", "smiht"), "one_edit");
        assert_eq!(label(name, "robert", "bob"), "nickname");
        assert_eq!(label(name, "catherine", "kathryn"), "phonetic");
        assert_eq!(label(name, "j", "john"), "initial");
        assert_eq!(label(name, "smith jr", "smith"), "generation");
        assert_eq!(label(name, "smith jr", "smith jr."), "exact");
        assert_eq!(label(name, "isabella", "jack"), ELSE);
        assert_eq!(label(name, "de silva", "desilva"), "one_edit");
        let first = [CompactString::from("reid")];
        let last = [CompactString::from("vanessa")];
        let swapped = Partners {
            left: &first,
            right: &last,
        };
        // Event: first "vanessa", last "reid"; profile: first "reid", last "vanessa".
        let level = name.level_of("vanessa", "reid", swapped);
        assert_eq!(name.levels()[level], "swapped");
    }

    #[test]
    fn dates_reach_the_level_of_their_corruption() {
        let date = ComparisonKind::Date;
        assert_eq!(label(date, "1980-02-29", "1980-02-29"), "exact");
        assert_eq!(label(date, "1980-03-04", "1980-04-03"), "day_month_swapped");
        assert_eq!(label(date, "1980-03-04", "1980-03-05"), "one_digit");
        assert_eq!(label(date, "1945-08-30", "1954-08-30"), "one_digit");
        assert_eq!(label(date, "1980-03-04", "1980-03-27"), "year_month");
        assert_eq!(label(date, "1974-10-22", "1960-04-09"), ELSE);
    }

    #[test]
    fn streets_compare_number_and_name_apart() {
        let street = ComparisonKind::Street;
        assert_eq!(label(street, "12 high st", "12 high st"), "exact");
        assert_eq!(label(street, "12 high st", "12 hihg st"), "one_edit");
        assert_eq!(
            label(street, "12 high st", "12 highh stt"),
            "same_number_close_name"
        );
        assert_eq!(label(street, "12 high st", "40 high st"), "same_name");
        assert_eq!(label(street, "12 high st", "9 low rd"), ELSE);
    }

    #[test]
    fn codes_allow_one_digit_off() {
        let code = ComparisonKind::Code;
        assert_eq!(label(code, "2000", "2000"), "exact");
        assert_eq!(label(code, "4023", "4032"), "one_edit");
        assert_eq!(label(code, "4023", "5178"), ELSE);
        assert_eq!(label(code, "12", "13"), ELSE);
    }
}
