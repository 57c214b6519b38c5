//! Candidate search: blocking rules as data. Each rule builds one key from a record's values;
//! two records that share any key are compared. The rules are chosen so that each survives a
//! different corruption (a typo in the surname, a wrong birth date, a move, swapped names), so
//! a true pair shares at least one key unless nearly everything about it changed.
//!
//! A key is stored as `rule:part:part…`, so the rule's name is part of the stored form and
//! must never change; a new rule takes a new name. Keys held by more than
//! `fuzzy.max_block_size` profiles stop yielding candidates (see the engine).

use idgraph_model::normalize::DATE_OF_BIRTH;

use super::text::{house_number, soundex, street_name};

/// How one part of a key is derived from a record's values.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// The field's normalized value.
    Value(&'static str),
    /// The American Soundex of the field's first word.
    Soundex(&'static str),
    /// The field's first character.
    Initial(&'static str),
    /// The year of a YYYY-MM-DD date field.
    Year(&'static str),
    /// The house number of a street field.
    HouseNumber(&'static str),
    /// The name of a street field without its number.
    StreetName(&'static str),
    /// First and last name in alphabetical order, so a swapped pair gives the same key.
    NamePair,
    /// The Soundex codes of first and last name in alphabetical order.
    SoundexPair,
}

/// A blocking rule: its stored name and the parts its key is made of. A record lacking any
/// part gets no key from the rule.
#[derive(Debug, Clone, Copy)]
pub struct BlockingRule {
    pub name: &'static str,
    parts: &'static [Part],
    /// Whether many people share the rule's keys in a large graph (a birth year, a city):
    /// such keys are searched only when the selective ones found nothing to link to.
    pub broad: bool,
}

const FIRST: &str = "first_name";
const LAST: &str = "last_name";

/// The rules, most selective first: candidates are gathered in this order up to
/// `fuzzy.max_candidates`, the broad ones only when the others found nothing to link to.
pub const BLOCKING_RULES: &[BlockingRule] = &[
    BlockingRule {
        name: "nn",
        parts: &[Part::NamePair],
        broad: false,
    },
    BlockingRule {
        name: "ld",
        parts: &[Part::Soundex(LAST), Part::Value(DATE_OF_BIRTH)],
        broad: false,
    },
    BlockingRule {
        name: "fd",
        parts: &[Part::Initial(FIRST), Part::Value(DATE_OF_BIRTH)],
        broad: false,
    },
    BlockingRule {
        name: "lp",
        parts: &[
            Part::Soundex(LAST),
            Part::Initial(FIRST),
            Part::Value("postcode"),
        ],
        broad: false,
    },
    BlockingRule {
        name: "dp",
        parts: &[Part::Value(DATE_OF_BIRTH), Part::Value("postcode")],
        broad: false,
    },
    BlockingRule {
        name: "ph",
        parts: &[Part::Value("postcode"), Part::HouseNumber("street")],
        broad: false,
    },
    BlockingRule {
        name: "ly",
        parts: &[Part::Soundex(LAST), Part::Year(DATE_OF_BIRTH)],
        broad: true,
    },
    BlockingRule {
        name: "fy",
        parts: &[Part::Soundex(FIRST), Part::Year(DATE_OF_BIRTH)],
        broad: true,
    },
    BlockingRule {
        name: "sl",
        parts: &[Part::StreetName("street"), Part::Soundex(LAST)],
        broad: true,
    },
    BlockingRule {
        name: "lc",
        parts: &[Part::Soundex(LAST), Part::Value("city")],
        broad: true,
    },
    BlockingRule {
        name: "ss",
        parts: &[Part::SoundexPair],
        broad: true,
    },
    BlockingRule {
        name: "db",
        parts: &[Part::Value(DATE_OF_BIRTH)],
        broad: true,
    },
];

/// Blocking keys for the values `value_of` returns (normalized; empty counts as missing).
pub fn blocking_keys_from<'a>(value_of: impl Fn(&str) -> Option<&'a str>) -> Vec<String> {
    let get = |name: &str| value_of(name).filter(|v| !v.is_empty());
    let mut keys = Vec::with_capacity(BLOCKING_RULES.len());
    let mut parts: Vec<String> = Vec::with_capacity(3);
    'rules: for rule in BLOCKING_RULES {
        parts.clear();
        for part in rule.parts {
            let Some(value) = part_value(*part, &get) else {
                continue 'rules;
            };
            parts.push(value);
        }
        keys.push(block_key(rule.name, &parts));
    }
    keys
}

/// Whether a stored key comes from a broad rule (see [`BlockingRule::broad`]).
pub fn is_broad_key(key: &str) -> bool {
    let rule = key.split(':').next().unwrap_or_default();
    BLOCKING_RULES
        .iter()
        .any(|candidate| candidate.broad && candidate.name == rule)
}

/// The key one rule gives for the values `value_of` returns, if they have every part.
pub fn rule_key<'a>(rule_name: &str, value_of: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
    let get = |name: &str| value_of(name).filter(|v| !v.is_empty());
    let rule = BLOCKING_RULES.iter().find(|rule| rule.name == rule_name)?;
    let parts = rule
        .parts
        .iter()
        .map(|part| part_value(*part, &get))
        .collect::<Option<Vec<String>>>()?;
    Some(block_key(rule.name, &parts))
}

fn part_value<'a>(part: Part, get: &impl Fn(&str) -> Option<&'a str>) -> Option<String> {
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    match part {
        Part::Value(field) => get(field).map(str::to_owned),
        Part::Soundex(field) => get(field).map(soundex).and_then(non_empty),
        Part::Initial(field) => get(field)?.chars().next().map(String::from),
        Part::Year(field) => {
            let year = get(field)?.split('-').next()?;
            (year.len() == 4).then(|| year.to_owned())
        }
        Part::HouseNumber(field) => house_number(get(field)?).map(str::to_owned),
        Part::StreetName(field) => non_empty(street_name(get(field)?).to_owned()),
        Part::NamePair => {
            let (first, last) = (get(FIRST)?, get(LAST)?);
            let (low, high) = if first <= last {
                (first, last)
            } else {
                (last, first)
            };
            Some(format!("{low}:{high}"))
        }
        Part::SoundexPair => {
            let (first, last) = (soundex(get(FIRST)?), soundex(get(LAST)?));
            if first.is_empty() || last.is_empty() {
                return None;
            }
            let (low, high) = if first <= last {
                (first, last)
            } else {
                (last, first)
            };
            Some(format!("{low}:{high}"))
        }
    }
}

/// Keys under which an identifier value is found by values one edit or transposition away:
/// the value itself and the value with each character deleted in turn. Two values one
/// substitution or transposition apart share a deletion; one insertion apart, the shorter
/// value and a deletion of the longer.
pub fn identifier_typo_keys(kind: &str, value: &str) -> Vec<String> {
    let chars: Vec<char> = value.chars().collect();
    let mut keys = Vec::with_capacity(chars.len() + 1);
    keys.push(block_key("it", &[kind, value]));
    for skip in 0..chars.len() {
        let variant: String = chars
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, c)| *c)
            .collect();
        let key = block_key("it", &[kind, &variant]);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// `rule:part:part…`, built in one allocation: every event with traits needs several.
fn block_key(rule: &str, parts: &[impl AsRef<str>]) -> String {
    let length = rule.len()
        + parts
            .iter()
            .map(|part| part.as_ref().len() + 1)
            .sum::<usize>();
    let mut key = String::with_capacity(length);
    key.push_str(rule);
    for part in parts {
        key.push(':');
        key.push_str(part.as_ref());
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn keys(pairs: &[(&str, &str)]) -> Vec<String> {
        let map: BTreeMap<&str, &str> = pairs.iter().copied().collect();
        blocking_keys_from(|name| map.get(name).copied())
    }

    fn share_a_key(a: &[String], b: &[String]) -> bool {
        a.iter().any(|k| b.contains(k))
    }

    #[test]
    fn blocking_keys_keep_their_stored_form() {
        // Blocking keys are stored; a state written by an earlier version must still match.
        let keys = keys(&[
            ("first_name", "élise"),
            ("last_name", "lee"),
            ("date_of_birth", "1980-02-29"),
            ("postcode", "2000"),
        ]);
        for old in [
            "ld:L000:1980-02-29",
            "fd:é:1980-02-29",
            "lp:L000:é:2000",
            "dp:1980-02-29:2000",
        ] {
            assert!(keys.iter().any(|k| k == old), "{old} missing from {keys:?}");
        }
    }

    #[test]
    fn a_typo_in_every_field_that_keys_use_still_shares_a_key() {
        let original = keys(&[
            ("first_name", "ann"),
            ("last_name", "lee"),
            ("date_of_birth", "1980-02-29"),
            ("street", "12 high st"),
            ("postcode", "2000"),
        ]);
        let corrupted = [
            // Wrong birth day and postcode.
            keys(&[
                ("first_name", "ann"),
                ("last_name", "lee"),
                ("date_of_birth", "1980-02-20"),
                ("postcode", "3000"),
            ]),
            // Swapped names, another birth date and postcode.
            keys(&[
                ("first_name", "lee"),
                ("last_name", "ann"),
                ("date_of_birth", "1981-02-29"),
                ("postcode", "3000"),
            ]),
            // Typos in both names and the date's year, same address.
            keys(&[
                ("first_name", "anne"),
                ("last_name", "leigh"),
                ("date_of_birth", "1908-02-29"),
                ("street", "12 high st"),
                ("postcode", "2000"),
            ]),
        ];
        for other in corrupted {
            assert!(share_a_key(&original, &other), "{other:?}");
        }
    }

    #[test]
    fn only_keys_many_people_share_are_broad() {
        assert!(is_broad_key("db:1980-02-29"));
        assert!(is_broad_key("lc:L000:bristol"));
        assert!(!is_broad_key("nn:ann:lee"));
        assert!(!is_broad_key("it:national_id:577612"));
        // Every rule that keys on a birth date and something more is selective.
        for rule in BLOCKING_RULES
            .iter()
            .filter(|r| ["ld", "fd", "dp"].contains(&r.name))
        {
            assert!(!rule.broad, "{}", rule.name);
        }
    }

    #[test]
    fn identifier_keys_meet_one_edit_away() {
        let original = identifier_typo_keys("national_id", "5779612");
        for typo in ["5797612", "5779618", "577612", "57796123"] {
            let other = identifier_typo_keys("national_id", typo);
            assert!(share_a_key(&original, &other), "{typo}");
        }
        let far = identifier_typo_keys("national_id", "1234567");
        assert!(!share_a_key(&original, &far));
    }
}
