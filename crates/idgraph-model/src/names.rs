//! Person names as CRMs export them: a full name in one field (`Jane A. Doe`, `Doe, Jane`,
//! `Dr Jane Doe Jr`), honorifics in front of a first name, middle initials after it, and
//! generational suffixes after a last name.
//!
//! Matching compares first and last names, so each part goes to a trait of its own:
//! `first_name`, `middle_name` (middle names and initials), `last_name` and `name_suffix`
//! (`jr`, `sr`, `ii`, …). Honorifics are dropped. Every part is folded as names are
//! ([`fold_text`]). Nothing here guesses beyond that: a name of one word is a first name, and
//! a name written family-name first without a comma (`Li Wei`) is read first-name first, as
//! matching also compares first and last names swapped.
//!
//! The last name keeps its suffix as well (`kowalski jr`), as it did before `name_suffix`
//! existed: the match model does not compare suffixes yet, and without them in the last name
//! a father and a son of one name and address would score as one person.

use crate::normalize::fold_text;

/// Titles dropped from the front of a name.
const HONORIFICS: [&str; 12] = [
    "mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "dame", "rev", "fr", "madam",
];

/// Generational suffixes, in the form they are kept in.
fn suffix_of(word: &str) -> Option<&'static str> {
    Some(match word {
        "jr" | "junior" => "jr",
        "sr" | "senior" => "sr",
        "ii" | "2nd" => "ii",
        "iii" | "3rd" => "iii",
        "iv" | "4th" => "iv",
        _ => return None,
    })
}

/// The parts of a person's name, each folded; empty where absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameParts {
    pub first: String,
    pub middle: String,
    pub last: String,
    pub suffix: String,
}

/// The words of `value`, each folded (a hyphenated or accented word stays one word).
fn folded_words(value: &str) -> Vec<String> {
    value
        .split(|c: char| c.is_whitespace() || c == ',')
        .map(fold_text)
        .filter(|word| !word.is_empty())
        .collect()
}

/// [`folded_words`] with honorifics dropped from the front.
fn words(value: &str) -> Vec<String> {
    let mut words = folded_words(value);
    let titles = words
        .iter()
        .take_while(|word| HONORIFICS.contains(&word.as_str()))
        .count();
    // A name that is only a title ("Dr") keeps it rather than becoming empty.
    if titles < words.len() {
        words.drain(..titles);
    }
    words
}

/// Copies a trailing generational suffix of `words` into `suffix`, and takes it off `words`
/// when `remove`.
fn take_suffix(words: &mut Vec<String>, suffix: &mut String, remove: bool) {
    if words.len() > 1 {
        if let Some(found) = words.last().and_then(|word| suffix_of(word)) {
            *suffix = found.to_owned();
            if remove {
                words.pop();
            }
        }
    }
}

/// Splits a full name given in one field. `Doe, Jane A.` is read last name first (the comma
/// says so); otherwise first name first, last word the last name, words between middle names.
/// `None` for a value without a word.
pub fn split_full_name(value: &str) -> Option<NameParts> {
    let mut parts = NameParts::default();
    if let Some((last, given)) = value.split_once(',') {
        let mut last_words = words(last);
        let mut given_words = words(given);
        // "Doe, Jane, Jr" or "Doe Jr, Jane": the suffix stays with the last name.
        take_suffix(&mut given_words, &mut parts.suffix, true);
        if !parts.suffix.is_empty() {
            last_words.push(parts.suffix.clone());
        }
        take_suffix(&mut last_words, &mut parts.suffix, false);
        if !last_words.is_empty() && !given_words.is_empty() {
            parts.last = last_words.join(" ");
            parts.first = given_words.remove(0);
            parts.middle = given_words.join(" ");
            return Some(parts);
        }
    }
    let mut words = words(value);
    take_suffix(&mut words, &mut parts.suffix, true);
    match words.len() {
        0 => return None,
        1 => parts.first = words.remove(0),
        _ => {
            parts.last = words.pop().expect("two words or more");
            parts.first = words.remove(0);
            parts.middle = words.join(" ");
        }
    }
    if !parts.suffix.is_empty() && !parts.last.is_empty() {
        parts.last = format!("{} {}", parts.last, parts.suffix);
    }
    Some(parts)
}

/// A first name field tidied: honorifics dropped, and initials written after the name
/// (`Ann M.`) moved to the middle name. Returns (first, middle); a field of several full
/// words (`Mary Ann`) is one double first name and stays whole.
pub fn split_first_name(value: &str) -> (String, String) {
    let mut words = words(value);
    let initials = words
        .iter()
        .rev()
        .take_while(|word| word.chars().count() == 1)
        .count()
        .min(words.len().saturating_sub(1));
    let middle = words.split_off(words.len() - initials).join(" ");
    (words.join(" "), middle)
}

/// A last name field folded, and its generational suffix (`Doe Jr.`) found. Returns (last,
/// suffix); the last name keeps the suffix (see the module documentation).
pub fn split_last_name(value: &str) -> (String, String) {
    let mut words = folded_words(value);
    let mut suffix = String::new();
    take_suffix(&mut words, &mut suffix, false);
    (words.join(" "), suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(first: &str, middle: &str, last: &str, suffix: &str) -> Option<NameParts> {
        Some(NameParts {
            first: first.into(),
            middle: middle.into(),
            last: last.into(),
            suffix: suffix.into(),
        })
    }

    #[test]
    fn full_names_split_into_their_parts() {
        assert_eq!(split_full_name("Jane Doe"), parts("jane", "", "doe", ""));
        assert_eq!(split_full_name("Li Wei"), parts("li", "", "wei", ""));
        assert_eq!(split_full_name("Doe, Jane"), parts("jane", "", "doe", ""));
        assert_eq!(
            split_full_name("DOE, Jane A."),
            parts("jane", "a", "doe", "")
        );
        assert_eq!(
            split_full_name("Dr. Jane Anne Doe Jr."),
            parts("jane", "anne", "doe jr", "jr")
        );
        assert_eq!(
            split_full_name("Mr John Smith III"),
            parts("john", "", "smith iii", "iii")
        );
        assert_eq!(
            split_full_name("Doe Jr, John"),
            parts("john", "", "doe jr", "jr")
        );
        assert_eq!(
            split_full_name("Doe, John, Sr."),
            parts("john", "", "doe sr", "sr")
        );
        assert_eq!(
            split_full_name("Jean-Luc Picard"),
            parts("jean luc", "", "picard", "")
        );
        assert_eq!(
            split_full_name("José Álvarez"),
            parts("jose", "", "alvarez", "")
        );
        assert_eq!(split_full_name("Madonna"), parts("madonna", "", "", ""));
    }

    #[test]
    fn what_is_not_a_name_is_not_made_one() {
        assert_eq!(split_full_name(""), None);
        assert_eq!(split_full_name("  , "), None);
        assert_eq!(split_full_name("..."), None);
        // A lone title or suffix stays what it is rather than vanishing.
        assert_eq!(split_full_name("Dr"), parts("dr", "", "", ""));
        assert_eq!(split_full_name("Jr"), parts("jr", "", "", ""));
    }

    #[test]
    fn first_names_lose_titles_and_trailing_initials() {
        assert_eq!(split_first_name("Ann M."), ("ann".into(), "m".into()));
        assert_eq!(split_first_name("Ann M J"), ("ann".into(), "m j".into()));
        assert_eq!(split_first_name("Mrs Ann"), ("ann".into(), String::new()));
        assert_eq!(
            split_first_name("Mary Ann"),
            ("mary ann".into(), String::new())
        );
        // An initial alone is the first name itself.
        assert_eq!(split_first_name("J."), ("j".into(), String::new()));
        assert_eq!(
            split_first_name("J. Robert"),
            ("j robert".into(), String::new())
        );
    }

    #[test]
    fn last_names_name_their_generational_suffix() {
        assert_eq!(split_last_name("Doe Jr."), ("doe jr".into(), "jr".into()));
        assert_eq!(
            split_last_name("Smith, III"),
            ("smith iii".into(), "iii".into())
        );
        assert_eq!(
            split_last_name("Van Der Berg"),
            ("van der berg".into(), String::new())
        );
        // A surname that is a suffix word alone stays a surname.
        assert_eq!(split_last_name("Senior"), ("senior".into(), String::new()));
    }
}
