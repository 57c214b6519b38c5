//! The string predicates comparison levels are made of: edit distance, Jaro–Winkler,
//! phonetic codes, initials, nicknames and generational suffixes. Pure functions of their
//! arguments; every input is a value normalized by `idgraph_model::normalize`.

use rphonetic::DoubleMetaphone;

use super::nicknames::NICKNAMES;

/// Whether `a` and `b` are at most one insertion, deletion, substitution or transposition of
/// two neighbouring characters apart (optimal string alignment distance ≤ 1), computed in one
/// pass instead of filling a distance matrix: it runs for every pair of values compared.
pub fn at_most_one_edit(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    if a.is_ascii() && b.is_ascii() {
        // Nearly every value: compared as bytes, without collecting characters.
        return one_edit_apart(a.as_bytes(), b.as_bytes());
    }
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    one_edit_apart(&a, &b)
}

fn one_edit_apart<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if long.len() - short.len() > 1 {
        return false;
    }
    let prefix = short
        .iter()
        .zip(long.iter())
        .take_while(|(x, y)| x == y)
        .count();
    if short.len() == long.len() {
        let rest = prefix + 1;
        // One substitution: everything after the first difference agrees.
        if short[rest..] == long[rest..] {
            return true;
        }
        // One transposition of neighbours.
        rest < short.len()
            && short[prefix] == long[rest]
            && short[rest] == long[prefix]
            && short[rest + 1..] == long[rest + 1..]
    } else {
        // One insertion into the shorter value.
        short[prefix..] == long[prefix + 1..]
    }
}

/// Jaro–Winkler similarity, 0 to 1: exactly what `strsim::jaro_winkler` returns.
///
/// Scoring asks for it on nearly every pair of names and streets. strsim walks `char`s
/// through generic iterators, allocates its match flags and scans each row of the match
/// window from the start; it was an eighth of scoring a candidate. ASCII values up to 64
/// bytes (nearly all of them) take a byte path with the flags in two `u64`s instead, which
/// does the same arithmetic in the same order and so returns the same bits (a test compares
/// them); anything else goes to strsim.
pub fn jaro_winkler(a: &str, b: &str) -> f64 {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    if x.len() > 64 || y.len() > 64 || !a.is_ascii() || !b.is_ascii() {
        return strsim::jaro_winkler(a, b);
    }
    let similarity = ascii_jaro(x, y);
    if similarity > 0.7 {
        let prefix = x.iter().take(4).zip(y).take_while(|(p, q)| p == q).count();
        similarity + 0.1 * prefix as f64 * (1.0 - similarity)
    } else {
        similarity
    }
}

/// Jaro similarity of two byte strings of at most 64 bytes, as `strsim::generic_jaro`
/// computes it.
fn ascii_jaro(a: &[u8], b: &[u8]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    } else if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let search_range = (a.len().max(b.len()) / 2).saturating_sub(1);
    let (mut a_flags, mut b_flags) = (0u64, 0u64);
    let mut matches = 0usize;
    for (i, &byte) in a.iter().enumerate() {
        let low = i.saturating_sub(search_range);
        let high = b.len().min(i + search_range + 1);
        for (j, &other) in b.iter().enumerate().take(high).skip(low) {
            if other == byte && b_flags & (1 << j) == 0 {
                a_flags |= 1 << i;
                b_flags |= 1 << j;
                matches += 1;
                break;
            }
        }
    }
    if matches == 0 {
        return 0.0;
    }
    let mut transpositions = 0usize;
    let mut remaining_b = b_flags;
    for (i, &byte) in a.iter().enumerate() {
        if a_flags & (1 << i) != 0 {
            let j = remaining_b.trailing_zeros() as usize;
            remaining_b &= remaining_b - 1;
            if b[j] != byte {
                transpositions += 1;
            }
        }
    }
    transpositions /= 2;
    ((matches as f64 / a.len() as f64)
        + (matches as f64 / b.len() as f64)
        + ((matches - transpositions) as f64 / matches as f64))
        / 3.0
}

/// Whether one value is a single letter (optionally followed by a dot) that starts the other:
/// "j" and "john".
pub fn is_initial_of(a: &str, b: &str) -> bool {
    fn initial(value: &str) -> Option<char> {
        let mut chars = value.trim_end_matches('.').chars();
        let first = chars.next()?;
        chars.next().is_none().then_some(first)
    }
    match (initial(a), initial(b)) {
        (Some(x), None) => b.starts_with(x),
        (None, Some(y)) => a.starts_with(y),
        _ => false,
    }
}

/// Whether two normalized first names are known variants of one name (Bob is Robert).
pub fn are_nicknames(a: &str, b: &str) -> bool {
    NICKNAMES
        .iter()
        .any(|group| group.contains(&a) && group.contains(&b))
}

/// The primary and alternate Double Metaphone codes of `value`'s letters (words joined), or
/// `None` for a value with no letters.
pub fn phonetic_codes(value: &str) -> Option<(String, String)> {
    let letters: String = value.chars().filter(|c| c.is_alphabetic()).collect();
    if letters.is_empty() {
        return None;
    }
    let encoder = DoubleMetaphone::default();
    let result = encoder.double_metaphone(&letters);
    let primary = result.primary();
    if primary.is_empty() {
        return None;
    }
    Some((primary, result.alternate()))
}

/// Whether two values sound alike: one of each side's Double Metaphone codes agree.
pub fn sound_alike(a: &str, b: &str) -> bool {
    let (Some((a1, a2)), Some((b1, b2))) = (phonetic_codes(a), phonetic_codes(b)) else {
        return false;
    };
    a1 == b1 || a1 == b2 || (!a2.is_empty() && (a2 == b1 || a2 == b2))
}

/// Suffixes that tell a parent from a child of the same name.
const GENERATIONAL_SUFFIXES: [&str; 6] = ["jr", "sr", "ii", "iii", "iv", "junior"];

/// The generational suffix a name ends with ("smith jr" → "jr"), if any.
pub fn generational_suffix(name: &str) -> Option<&str> {
    let last_word = name.rsplit(' ').next()?.trim_end_matches('.');
    if name.len() == last_word.len() {
        // A name that is nothing but "jr" is a name, not a suffix.
        return None;
    }
    GENERATIONAL_SUFFIXES
        .iter()
        .find(|suffix| **suffix == last_word)
        .map(|suffix| if *suffix == "junior" { "jr" } else { suffix })
}

/// `name` without its generational suffix.
pub fn without_generational_suffix(name: &str) -> &str {
    match generational_suffix(name) {
        Some(_) => name
            .rsplit_once(' ')
            .map_or(name, |(head, _)| head.trim_end()),
        None => name,
    }
}

/// The leading house number of a street address ("12a high st" → "12a"), if it has one.
pub fn house_number(street: &str) -> Option<&str> {
    let first = street.split(' ').next()?;
    first
        .starts_with(|c: char| c.is_ascii_digit())
        .then_some(first)
}

/// A street address without its leading house number ("12 high st" → "high st").
pub fn street_name(street: &str) -> &str {
    match house_number(street) {
        Some(number) => street[number.len()..].trim_start(),
        None => street,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_edit_covers_typing_errors_and_nothing_more() {
        for (a, b) in [
            ("smith", "smyth"),
            ("smith", "smiht"),
            ("smith", "smth"),
            ("smith", "smitth"),
            ("1945-08-30", "1954-08-30"),
            ("", "a"),
        ] {
            assert!(at_most_one_edit(a, b), "{a} {b}");
            assert!(at_most_one_edit(b, a), "{b} {a}");
        }
        for (a, b) in [
            ("smith", "smoth2"),
            ("smith", "msiht"),
            ("ab", "ba c"),
            ("abcd", "badc"),
        ] {
            assert!(!at_most_one_edit(a, b), "{a} {b}");
        }
    }

    #[test]
    fn one_edit_agrees_with_the_optimal_string_alignment_distance() {
        let words = [
            "", "a", "ab", "ba", "abc", "acb", "bac", "abd", "abcd", "abdc", "xbcd",
        ];
        for a in words {
            for b in words {
                assert_eq!(
                    at_most_one_edit(a, b),
                    strsim::osa_distance(a, b) <= 1,
                    "{a:?} {b:?}"
                );
            }
        }
    }

    #[test]
    fn jaro_winkler_gives_strsims_bits() {
        let words = [
            "",
            "a",
            "ab",
            "ba",
            "martha",
            "marhta",
            "dwayne",
            "duane",
            "dixon",
            "dicksonx",
            "jones",
            "johnson",
            "12 high st",
            "12 hihg st",
            "40 high street",
            "catherine",
            "kathryn",
            "aaaa",
            "aaab",
            "zoë",
            "zoe",
            "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmn",
            "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl",
        ];
        for a in words {
            for b in words {
                assert_eq!(
                    jaro_winkler(a, b).to_bits(),
                    strsim::jaro_winkler(a, b).to_bits(),
                    "{a:?} {b:?}"
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn jaro_winkler_gives_strsims_bits_on_any_ascii(a in "[a-e 0-3]{0,70}", b in "[a-e 0-3]{0,70}") {
            proptest::prop_assert_eq!(
                jaro_winkler(&a, &b).to_bits(),
                strsim::jaro_winkler(&a, &b).to_bits()
            );
        }
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
    fn phonetic_codes_hear_spelling_variants() {
        assert!(sound_alike("catherine", "kathryn"));
        assert!(sound_alike("smith", "smyth"));
        assert!(sound_alike("stephen", "steven"));
        assert!(!sound_alike("smith", "jones"));
        assert!(!sound_alike("123", "123"));
    }

    #[test]
    fn suffixes_initials_and_house_numbers() {
        assert_eq!(generational_suffix("smith jr"), Some("jr"));
        assert_eq!(generational_suffix("smith junior"), Some("jr"));
        assert_eq!(generational_suffix("jr"), None);
        assert_eq!(without_generational_suffix("smith jr."), "smith");
        assert!(is_initial_of("j", "john"));
        assert!(is_initial_of("john", "j."));
        assert!(!is_initial_of("j", "k"));
        assert_eq!(house_number("12a high st"), Some("12a"));
        assert_eq!(street_name("12a high st"), "high st");
        assert_eq!(street_name("high st"), "high st");
    }
}
