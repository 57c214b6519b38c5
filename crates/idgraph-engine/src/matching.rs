//! Fuzzy matching: blocking keys and Fellegi–Sunter style field scoring.
//!
//! Blocking keys narrow the profiles worth comparing; scoring compares an event's normalized
//! traits against a candidate's known trait values field by field and sums the log2 Bayes
//! factors from config. Everything here is a pure function of its inputs.

use idgraph_model::normalize::DATE_OF_BIRTH;
use idgraph_model::{CompactString, FieldScore, SortedMap};

use crate::config::{FieldWeights, FuzzyConfig};

/// The traits that fuzzy matching compares, in scoring order.
pub const MATCH_FIELDS: [&str; 6] = [
    "first_name",
    "last_name",
    "date_of_birth",
    "street",
    "city",
    "postcode",
];

/// American Soundex of the first word of `name` ("robert" → "R163"); empty for no letters.
pub fn soundex(name: &str) -> String {
    fn code(c: char) -> u8 {
        match c {
            'b' | 'f' | 'p' | 'v' => b'1',
            'c' | 'g' | 'j' | 'k' | 'q' | 's' | 'x' | 'z' => b'2',
            'd' | 't' => b'3',
            'l' => b'4',
            'm' | 'n' => b'5',
            'r' => b'6',
            'h' | 'w' => b'h',
            _ => b'0',
        }
    }
    let mut letters = name
        .chars()
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_lowercase());
    let Some(first) = letters.next() else {
        return String::new();
    };
    let mut out = vec![first.to_ascii_uppercase() as u8];
    let mut last = code(first);
    for c in letters {
        let digit = code(c);
        if digit == b'h' {
            // H and W do not separate letters with the same code.
            continue;
        }
        if digit != b'0' && digit != last {
            out.push(digit);
            if out.len() == 4 {
                break;
            }
        }
        last = digit;
    }
    out.resize(4, b'0');
    String::from_utf8(out).expect("soundex is ascii")
}

/// Blocking keys for a set of normalized traits. Each key needs all its parts, and each
/// combines fields that rarely change together, so a typo, a move or a new surname still
/// leaves at least one key shared with the old record.
pub fn blocking_keys(traits: &SortedMap<CompactString, CompactString>) -> Vec<String> {
    blocking_keys_from(|name| traits.get(name).map(CompactString::as_str))
}

/// [`blocking_keys`] over trait values looked up by `value_of` (normalized values; an empty
/// one counts as missing), so a caller that combines several sources of values need not
/// copy them into a map first.
pub fn blocking_keys_from<'a>(value_of: impl Fn(&str) -> Option<&'a str>) -> Vec<String> {
    let get = |name: &str| value_of(name).filter(|v| !v.is_empty());
    let first_initial = get("first_name").and_then(|f| f.chars().next());
    let last_sound = get("last_name").map(soundex).filter(|s| !s.is_empty());
    let dob = get(DATE_OF_BIRTH);
    let postcode = get("postcode");
    let mut initial_buffer = [0u8; 4];
    let initial = first_initial.map(|c| &*c.encode_utf8(&mut initial_buffer));
    let mut keys = Vec::new();
    if let (Some(sound), Some(dob)) = (&last_sound, dob) {
        keys.push(block_key("ld", &[sound, dob]));
    }
    if let (Some(initial), Some(dob)) = (initial, dob) {
        keys.push(block_key("fd", &[initial, dob]));
    }
    if let (Some(sound), Some(initial), Some(postcode)) = (&last_sound, initial, postcode) {
        keys.push(block_key("lp", &[sound, initial, postcode]));
    }
    if let (Some(dob), Some(postcode)) = (dob, postcode) {
        keys.push(block_key("dp", &[dob, postcode]));
    }
    keys
}

/// `rule:part:part…`, built in one allocation: every event with traits needs several, and
/// `format!` showed in profiles.
fn block_key(rule: &str, parts: &[&str]) -> String {
    let length = rule.len() + parts.iter().map(|part| part.len() + 1).sum::<usize>();
    let mut key = String::with_capacity(length);
    key.push_str(rule);
    for part in parts {
        key.push(':');
        key.push_str(part);
    }
    key
}

/// Groups of first names that are the same name (Bob is Robert).
const NICKNAMES: &[&[&str]] = &[
    &["robert", "bob", "rob", "bobby", "robbie"],
    &["william", "will", "bill", "billy", "liam"],
    &["richard", "rick", "dick", "rich", "ricky"],
    &["james", "jim", "jimmy", "jamie"],
    &["john", "jack", "johnny", "jon"],
    &["margaret", "maggie", "meg", "peggy", "marge"],
    &[
        "elizabeth",
        "liz",
        "beth",
        "betty",
        "eliza",
        "lisa",
        "libby",
    ],
    &[
        "katherine",
        "kate",
        "katie",
        "kathy",
        "kat",
        "catherine",
        "cathy",
    ],
    &["michael", "mike", "mikey", "mick"],
    &["christopher", "chris", "kit"],
    &["jennifer", "jen", "jenny"],
    &["thomas", "tom", "tommy"],
    &["anthony", "tony"],
    &["joseph", "joe", "joey"],
    &["daniel", "dan", "danny"],
    &["matthew", "matt"],
    &["alexander", "alex", "sasha", "xander"],
    &["alexandra", "alex", "sandra", "lexi"],
    &["patricia", "pat", "patty", "trish"],
    &["patrick", "pat", "paddy"],
    &["edward", "ed", "eddie", "ted", "ned"],
    &["susan", "sue", "susie"],
    &["deborah", "deb", "debbie"],
    &["rebecca", "becky", "becca"],
    &["samuel", "sam", "sammy"],
    &["samantha", "sam", "sammy"],
    &["benjamin", "ben", "benny"],
    &["nicholas", "nick", "nicky"],
    &["jonathan", "jon", "jonny"],
    &["victoria", "vicky", "tori"],
    &["andrew", "andy", "drew"],
    &["david", "dave", "davy"],
    &["stephen", "steve", "steven"],
    &["charles", "charlie", "chuck"],
    &["ann", "anne", "annie", "anna"],
];

/// Whether two normalized first names are known variants of one name.
pub fn are_nicknames(a: &str, b: &str) -> bool {
    NICKNAMES
        .iter()
        .any(|group| group.contains(&a) && group.contains(&b))
}

/// Agreement level of two date-of-birth strings (YYYY-MM-DD): one typo (a single component
/// off, or day and month swapped) is close.
fn date_agreement(a: &str, b: &str) -> Level {
    if a == b {
        return Level::Exact;
    }
    let parts = |d: &str| -> Option<(String, String, String)> {
        let mut it = d.split('-');
        Some((
            it.next()?.to_owned(),
            it.next()?.to_owned(),
            it.next()?.to_owned(),
        ))
    };
    let (Some((ay, am, ad)), Some((by, bm, bd))) = (parts(a), parts(b)) else {
        return Level::Disagree;
    };
    let same = [ay == by, am == bm, ad == bd]
        .iter()
        .filter(|s| **s)
        .count();
    let swapped = ay == by && am == bd && ad == bm;
    if same == 2 || swapped {
        Level::Close
    } else {
        Level::Disagree
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Disagree,
    Close,
    Exact,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Disagree => "disagree",
            Level::Close => "close",
            Level::Exact => "exact",
        }
    }
}

/// Compares every value one side has for a field with every value the other side has; the
/// best agreement counts.
fn field_level<'a>(
    field: &str,
    values: impl IntoIterator<Item = &'a CompactString>,
    known: &[CompactString],
    weights: &FieldWeights,
) -> (Level, f64) {
    let mut best = (Level::Disagree, 0.0f64);
    for event_value in values {
        for value in known {
            let similarity = strsim::jaro_winkler(event_value, value);
            let level = if event_value == value {
                Level::Exact
            } else if field == DATE_OF_BIRTH {
                date_agreement(event_value, value)
            } else if similarity >= weights.close_similarity
                || one_edit_apart(event_value, value)
                || (field == "first_name" && are_nicknames(event_value, value))
            {
                Level::Close
            } else {
                Level::Disagree
            };
            if (level, similarity) > (best.0, best.1) {
                best = (level, similarity);
            }
        }
    }
    best
}

/// One insertion, deletion, substitution or transposition apart, for values long enough that
/// one edit is a typo rather than another word.
fn one_edit_apart(a: &str, b: &str) -> bool {
    a.chars().count() >= 4 && strsim::damerau_levenshtein(a, b) <= 1
}

/// The score of an event's traits against a candidate's known values.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchScore {
    pub total: f64,
    pub fields: Vec<FieldScore>,
}

/// Scores `event_traits` against a candidate's `known` values (current and past, per field).
pub fn score(
    config: &FuzzyConfig,
    event_traits: &SortedMap<CompactString, CompactString>,
    known: &SortedMap<CompactString, Vec<CompactString>>,
) -> MatchScore {
    score_fields(
        config,
        |field| event_traits.get(field).into_iter().collect(),
        known,
    )
}

/// Scores two sets of known values against each other (a profile against a profile), taking
/// the best agreement per field.
pub fn score_known(
    config: &FuzzyConfig,
    left: &SortedMap<CompactString, Vec<CompactString>>,
    right: &SortedMap<CompactString, Vec<CompactString>>,
) -> MatchScore {
    score_fields(
        config,
        |field| {
            left.get(field)
                .map(|v| v.iter().collect())
                .unwrap_or_default()
        },
        right,
    )
}

fn score_fields<'a>(
    config: &FuzzyConfig,
    values_of: impl Fn(&str) -> Vec<&'a CompactString>,
    known: &SortedMap<CompactString, Vec<CompactString>>,
) -> MatchScore {
    let mut total = 0.0;
    let mut fields = Vec::with_capacity(MATCH_FIELDS.len());
    for field in MATCH_FIELDS {
        let Some(weights) = config.fields.get(field) else {
            continue;
        };
        let values: Vec<&CompactString> = values_of(field)
            .into_iter()
            .filter(|v| !v.is_empty())
            .collect();
        let known_values = known.get(field).filter(|v| !v.is_empty());
        let (level_name, similarity, weight) = match known_values {
            Some(known_values) if !values.is_empty() => {
                let (level, similarity) = field_level(field, values, known_values, weights);
                let weight = match level {
                    Level::Exact => weights.exact,
                    Level::Close => weights.close,
                    Level::Disagree => weights.disagree,
                };
                (level.name(), similarity, weight)
            }
            _ => ("missing", 0.0, 0.0),
        };
        total += weight;
        fields.push(FieldScore {
            field: field.into(),
            level: level_name.into(),
            similarity: round3(similarity),
            weight,
        });
    }
    MatchScore {
        total: round3(total),
        fields,
    }
}

impl MatchScore {
    /// Whether any field could be compared at all; a score of nothing is not evidence.
    pub fn has_evidence(&self) -> bool {
        self.fields.iter().any(|f| f.level != "missing")
    }
}

/// Rounds for output so that scores print the same everywhere.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EngineConfig;

    fn traits(pairs: &[(&str, &str)]) -> SortedMap<CompactString, CompactString> {
        pairs
            .iter()
            .map(|(k, v)| (CompactString::from(*k), CompactString::from(*v)))
            .collect()
    }

    fn known(pairs: &[(&str, &str)]) -> SortedMap<CompactString, Vec<CompactString>> {
        pairs
            .iter()
            .map(|(k, v)| (CompactString::from(*k), vec![CompactString::from(*v)]))
            .collect()
    }

    #[test]
    fn soundex_matches_the_reference_codes() {
        assert_eq!(soundex("robert"), "R163");
        assert_eq!(soundex("rupert"), "R163");
        assert_eq!(soundex("ashcraft"), "A261");
        assert_eq!(soundex("tymczak"), "T522");
        assert_eq!(soundex("lee"), "L000");
        assert_eq!(soundex(""), "");
    }

    #[test]
    fn blocking_keys_survive_a_typo_or_a_move() {
        let before = blocking_keys(&traits(&[
            ("first_name", "ann"),
            ("last_name", "lee"),
            ("date_of_birth", "1980-02-29"),
            ("postcode", "2000"),
        ]));
        let typo_and_moved = blocking_keys(&traits(&[
            ("first_name", "ann"),
            ("last_name", "leigh"),
            ("date_of_birth", "1980-02-29"),
            ("postcode", "3000"),
        ]));
        assert!(before.iter().any(|k| typo_and_moved.contains(k)));
    }

    #[test]
    fn blocking_keys_keep_their_stored_form() {
        // Blocking keys are stored; a state written by an earlier version must still match.
        let keys = blocking_keys(&traits(&[
            ("first_name", "élise"),
            ("last_name", "lee"),
            ("date_of_birth", "1980-02-29"),
            ("postcode", "2000"),
        ]));
        assert_eq!(
            keys,
            [
                "ld:L000:1980-02-29",
                "fd:é:1980-02-29",
                "lp:L000:é:2000",
                "dp:1980-02-29:2000"
            ]
        );
    }

    #[test]
    fn same_person_scores_above_threshold_and_namesakes_below() {
        let config = EngineConfig::defaults().fuzzy;
        let profile = known(&[
            ("first_name", "robert"),
            ("last_name", "smith"),
            ("date_of_birth", "1975-06-01"),
            ("street", "12 high st"),
            ("postcode", "2000"),
        ]);
        let nickname_typo = traits(&[
            ("first_name", "bob"),
            ("last_name", "smyth"),
            ("date_of_birth", "1975-06-01"),
            ("postcode", "2000"),
        ]);
        assert!(score(&config, &nickname_typo, &profile).total >= config.threshold);
        let namesake = traits(&[
            ("first_name", "robert"),
            ("last_name", "smith"),
            ("date_of_birth", "1982-11-23"),
            ("street", "9 low rd"),
            ("postcode", "2000"),
        ]);
        assert!(score(&config, &namesake, &profile).total < config.threshold);
    }

    #[test]
    fn missing_fields_neither_help_nor_hurt() {
        let config = EngineConfig::defaults().fuzzy;
        let result = score(
            &config,
            &traits(&[("first_name", "ann")]),
            &known(&[("last_name", "lee")]),
        );
        assert_eq!(result.total, 0.0);
        assert!(result.fields.iter().all(|f| f.level == "missing"));
    }
}
