//! How much the generator spoils what people and systems write. The normal mix is the gentle
//! variation of well-kept sources (nicknames, a few typos, date formats); the hard mix adds
//! what silo'ed sources with hand-typed and scanned data show: keyboard typos, OCR
//! confusions, phonetic spellings, initials, missing and swapped fields, day and month
//! swapped, digits mistyped or transposed, and typos in emails and phone numbers.
//!
//! The corruptions are written from what data-entry studies describe, not from any data set
//! the engine is scored on, so the two stay independent.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

/// Which corruption mix the generator applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Noise {
    /// Today's mix: nicknames, 5% name typos, date formats, street-type spellings, moves.
    #[default]
    Normal,
    /// Harder than typical customer data: see the module documentation.
    Hard,
}

impl std::str::FromStr for Noise {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "normal" => Ok(Noise::Normal),
            "hard" => Ok(Noise::Hard),
            other => Err(format!(
                "unknown noise mix {other:?}; use \"normal\" or \"hard\""
            )),
        }
    }
}

/// Per-event probabilities of the hard mix's corruptions.
struct Rates {
    name_typo: f64,
    name_ocr: f64,
    name_phonetic: f64,
    first_initial: f64,
    first_missing: f64,
    last_missing: f64,
    names_swapped: f64,
    dob_missing: f64,
    dob_day_month_swapped: f64,
    dob_digit: f64,
    street_typo: f64,
    street_missing: f64,
    city_typo: f64,
    city_missing: f64,
    postcode_digit: f64,
    identifier_typo: f64,
}

const HARD: Rates = Rates {
    name_typo: 0.12,
    name_ocr: 0.03,
    name_phonetic: 0.05,
    first_initial: 0.03,
    first_missing: 0.04,
    last_missing: 0.02,
    names_swapped: 0.03,
    dob_missing: 0.08,
    dob_day_month_swapped: 0.04,
    dob_digit: 0.05,
    street_typo: 0.12,
    street_missing: 0.05,
    city_typo: 0.06,
    city_missing: 0.05,
    postcode_digit: 0.05,
    identifier_typo: 0.04,
};

/// Spoils the traits of one event in place (hard mix only). Values are the written forms
/// (dates as YYYY-MM-DD or another format the generator chose).
pub fn corrupt_traits(rng: &mut ChaCha8Rng, noise: Noise, traits: &mut Map<String, Value>) {
    if noise == Noise::Normal {
        return;
    }
    let rates = &HARD;
    for field in ["first_name", "last_name"] {
        spoil_text(rng, traits, field, |rng, name| {
            if rng.gen_bool(rates.name_typo) {
                keyboard_typo(rng, name)
            } else if rng.gen_bool(rates.name_ocr) {
                ocr_confusion(rng, name)
            } else if rng.gen_bool(rates.name_phonetic) {
                phonetic_respelling(rng, name)
            } else {
                name.to_owned()
            }
        });
    }
    if rng.gen_bool(rates.first_initial) {
        spoil_text(rng, traits, "first_name", |_, name| {
            name.chars().next().map(String::from).unwrap_or_default()
        });
    }
    if rng.gen_bool(rates.names_swapped) {
        let first = traits.remove("first_name");
        let last = traits.remove("last_name");
        if let Some(last) = last {
            traits.insert("first_name".into(), last);
        }
        if let Some(first) = first {
            traits.insert("last_name".into(), first);
        }
    }
    drop_with(rng, traits, "first_name", rates.first_missing);
    drop_with(rng, traits, "last_name", rates.last_missing);
    if traits.contains_key("date_of_birth") {
        spoil_text(rng, traits, "date_of_birth", |rng, date| {
            if rng.gen_bool(rates.dob_day_month_swapped) {
                swap_day_and_month(date)
            } else if rng.gen_bool(rates.dob_digit) {
                digit_slip(rng, date)
            } else {
                date.to_owned()
            }
        });
        drop_with(rng, traits, "date_of_birth", rates.dob_missing);
    }
    if traits.contains_key("street") {
        spoil_sometimes(rng, traits, "street", rates.street_typo, keyboard_typo);
        drop_with(rng, traits, "street", rates.street_missing);
        spoil_sometimes(rng, traits, "city", rates.city_typo, keyboard_typo);
        drop_with(rng, traits, "city", rates.city_missing);
        spoil_sometimes(rng, traits, "postcode", rates.postcode_digit, digit_slip);
    }
}

/// Spoils an email or phone number as typed by hand (hard mix only): one keyboard slip in an
/// email's local part, or one digit mistyped or two transposed in a phone number.
pub fn corrupt_identifier(rng: &mut ChaCha8Rng, noise: Noise, kind: &str, value: &str) -> String {
    if noise == Noise::Normal || !rng.gen_bool(HARD.identifier_typo) {
        return value.to_owned();
    }
    match kind {
        "email" => match value.split_once('@') {
            Some((local, domain)) => format!("{}@{domain}", keyboard_typo(rng, local)),
            None => value.to_owned(),
        },
        "phone" => digit_slip(rng, value),
        _ => value.to_owned(),
    }
}

fn spoil_text(
    rng: &mut ChaCha8Rng,
    traits: &mut Map<String, Value>,
    field: &str,
    spoil: impl FnOnce(&mut ChaCha8Rng, &str) -> String,
) {
    if let Some(Value::String(text)) = traits.get(field) {
        let spoiled = spoil(rng, text);
        traits.insert(field.into(), json!(spoiled));
    }
}

/// Spoils a field with `spoil` in a `share` of events.
fn spoil_sometimes(
    rng: &mut ChaCha8Rng,
    traits: &mut Map<String, Value>,
    field: &str,
    share: f64,
    spoil: fn(&mut ChaCha8Rng, &str) -> String,
) {
    spoil_text(rng, traits, field, |rng, text| {
        if rng.gen_bool(share) {
            spoil(rng, text)
        } else {
            text.to_owned()
        }
    });
}

fn drop_with(rng: &mut ChaCha8Rng, traits: &mut Map<String, Value>, field: &str, share: f64) {
    if traits.contains_key(field) && rng.gen_bool(share) {
        traits.remove(field);
    }
}

/// The keys around each letter on a QWERTY keyboard.
fn neighbours(c: char) -> &'static str {
    match c {
        'q' => "wa",
        'w' => "qes",
        'e' => "wrd",
        'r' => "etf",
        't' => "ryg",
        'y' => "tuh",
        'u' => "yij",
        'i' => "uok",
        'o' => "ipl",
        'p' => "o",
        'a' => "qsz",
        's' => "adwx",
        'd' => "sfe",
        'f' => "dgr",
        'g' => "fht",
        'h' => "gjy",
        'j' => "hku",
        'k' => "jli",
        'l' => "ko",
        'z' => "xa",
        'x' => "zcs",
        'c' => "xvd",
        'v' => "cbf",
        'b' => "vng",
        'n' => "bmh",
        'm' => "nj",
        _ => "",
    }
}

/// One slip of the fingers: a neighbouring key, a dropped or doubled letter, or two letters
/// transposed. Never the first letter, which people get right far more often.
fn keyboard_typo(rng: &mut ChaCha8Rng, word: &str) -> String {
    let mut chars: Vec<char> = word.chars().collect();
    if chars.len() < 3 {
        return word.to_owned();
    }
    let at = rng.gen_range(1..chars.len() - 1);
    match rng.gen_range(0..4) {
        0 => {
            let lower = chars[at].to_ascii_lowercase();
            if let Some(next) = neighbours(lower).chars().collect::<Vec<_>>().choose(rng) {
                chars[at] = *next;
            }
        }
        1 => {
            chars.remove(at);
        }
        2 => chars.insert(at, chars[at]),
        _ => chars.swap(at, at + 1),
    }
    chars.into_iter().collect()
}

/// A scanner's misreading of letter shapes.
fn ocr_confusion(rng: &mut ChaCha8Rng, word: &str) -> String {
    const CONFUSIONS: [(&str, &str); 8] = [
        ("rn", "m"),
        ("m", "rn"),
        ("cl", "d"),
        ("d", "cl"),
        ("e", "c"),
        ("i", "l"),
        ("u", "v"),
        ("h", "b"),
    ];
    let applicable: Vec<&(&str, &str)> = CONFUSIONS
        .iter()
        .filter(|(from, _)| word[1.min(word.len())..].contains(from))
        .collect();
    match applicable.choose(rng) {
        Some((from, to)) => {
            let (head, tail) = word.split_at(1.min(word.len()));
            format!("{head}{}", tail.replacen(from, to, 1))
        }
        None => word.to_owned(),
    }
}

/// A spelling that sounds the same.
fn phonetic_respelling(rng: &mut ChaCha8Rng, word: &str) -> String {
    const SOUNDS: [(&str, &str); 12] = [
        ("ph", "f"),
        ("f", "ph"),
        ("ck", "k"),
        ("c", "k"),
        ("k", "c"),
        ("y", "i"),
        ("ie", "y"),
        ("ee", "ea"),
        ("th", "t"),
        ("z", "s"),
        ("s", "z"),
        ("ou", "ow"),
    ];
    let lower = word.to_lowercase();
    let applicable: Vec<&(&str, &str)> = SOUNDS
        .iter()
        .filter(|(from, _)| lower.contains(from))
        .collect();
    match applicable.choose(rng) {
        Some((from, to)) => lower.replacen(from, to, 1),
        None => word.to_owned(),
    }
}

/// YYYY-MM-DD with day and month exchanged, when the day can be a month.
fn swap_day_and_month(date: &str) -> String {
    let parts: Vec<&str> = date.split('-').collect();
    match parts.as_slice() {
        [year, month, day] if day.parse::<u32>().is_ok_and(|d| (1..=12).contains(&d)) => {
            format!("{year}-{day}-{month}")
        }
        _ => date.to_owned(),
    }
}

/// One digit mistyped, or two neighbouring digits transposed.
fn digit_slip(rng: &mut ChaCha8Rng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let digits: Vec<usize> = (0..chars.len())
        .filter(|i| chars[*i].is_ascii_digit())
        .collect();
    let Some(&at) = digits.choose(rng) else {
        return text.to_owned();
    };
    let next_is_digit = chars.get(at + 1).is_some_and(char::is_ascii_digit);
    if next_is_digit && rng.gen_bool(0.5) {
        chars.swap(at, at + 1);
    } else {
        let old = chars[at].to_digit(10).unwrap_or(0);
        let new = (old + rng.gen_range(1..10)) % 10;
        chars[at] = char::from_digit(new, 10).unwrap_or('0');
    }
    chars.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn every_corruption_changes_little() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let typo = keyboard_typo(&mut rng, "margaret");
            assert!(strsim::osa_distance(&typo, "margaret") <= 1, "{typo}");
            let slip = digit_slip(&mut rng, "1980-02-27");
            assert!(strsim::osa_distance(&slip, "1980-02-27") <= 1, "{slip}");
        }
        assert_eq!(swap_day_and_month("1980-02-07"), "1980-07-02");
        assert_eq!(swap_day_and_month("1980-02-27"), "1980-02-27");
        let misread = ocr_confusion(&mut rng, "lind");
        assert!(misread.starts_with('l') && misread != "lind", "{misread}");
    }

    #[test]
    fn the_normal_mix_changes_nothing_and_draws_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut traits = Map::new();
        traits.insert("first_name".into(), json!("Ann"));
        corrupt_traits(&mut rng, Noise::Normal, &mut traits);
        assert_eq!(traits["first_name"], json!("Ann"));
        let mut fresh = ChaCha8Rng::seed_from_u64(7);
        assert_eq!(rng.gen::<u64>(), fresh.gen::<u64>());
    }
}
