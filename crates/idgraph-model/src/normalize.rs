//! Normalization of identifiers and traits (docs/formats.md §2).
//!
//! The normalized form is what the identity graph stores and compares, so every rule here is
//! part of the matching contract: changing one changes which events link.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use chrono::NaiveDate;
use compact_str::CompactString;
use regex::RegexSet;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use crate::event::RawEvent;
use crate::sorted::SortedMap;

/// Settings for normalization; the `[engine.normalize]` table of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    /// ISO 3166 region used for phone numbers written without a country code.
    pub default_phone_region: String,
    /// Ignore dots and `+tags` in the local part of gmail addresses.
    pub email_provider_rules: bool,
    /// Prefix social handles with the event's `network` property (`twitter:annlee`).
    pub social_handle_network_prefix: bool,
    /// How to read ambiguous numeric dates such as 03/04/1980: "dmy" or "mdy".
    pub date_order: DateOrder,
    /// `date_order` for the sources that write dates the other way (source name → order).
    #[serde(default)]
    pub date_order_by_source: BTreeMap<String, DateOrder>,
    /// Identifier values (after normalization) that never link anything.
    pub blocked_values: Vec<String>,
    /// Regular expressions; an identifier value (after normalization) matching any is blocked.
    pub blocked_patterns: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DateOrder {
    Dmy,
    Mdy,
}

/// A normalized, non-blocked identifier: a node of the identity graph.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: CompactString,
    pub value: CompactString,
}

impl Identifier {
    pub fn new(kind: impl Into<CompactString>, value: impl Into<CompactString>) -> Self {
        Identifier {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// The storage key of this identifier's graph node: kind and value separated by a NUL,
    /// which neither can contain after normalization.
    pub fn node_key(&self) -> String {
        join_with_nul(&self.kind, &self.value)
    }
}

/// `first` and `second` joined by a NUL byte, the separator of composite state keys.
pub fn join_with_nul(first: &str, second: &str) -> String {
    let mut key = String::with_capacity(first.len() + 1 + second.len());
    key.push_str(first);
    key.push('\0');
    key.push_str(second);
    key
}

/// Why a field was left out of matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// The value could not be understood (an unparsable phone, a date that is not a date).
    Invalid,
    /// The value is a known junk or configured blocked value.
    Blocked,
    /// The field's JSON type was wrong (an object where an identifier or a string belongs).
    WrongType,
}

/// One field of a valid event that was dropped from matching: a data-quality problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QualityIssue {
    /// `identifiers.<kind>` or `traits.<name>`; for a wrongly typed field, the field as sent
    /// (`identifiers`, `anonymousId`, or a mapping's JSON pointer).
    pub field: String,
    pub kind: IssueKind,
}

/// An event after normalization.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizedEvent {
    pub raw: RawEvent,
    /// Usable identifiers, de-duplicated, in (kind, value) order.
    pub identifiers: Vec<Identifier>,
    /// Traits with the matching fields normalized; other traits trimmed.
    pub traits: SortedMap<CompactString, CompactString>,
    pub issues: Vec<QualityIssue>,
}

/// Trait names that take part in fuzzy matching and get matching-grade normalization.
pub const NAME_TRAITS: [&str; 2] = ["first_name", "last_name"];
/// Middle names and initials, kept apart from the first name.
pub const MIDDLE_NAME: &str = "middle_name";
/// A generational suffix (`jr`, `sr`, `ii`, `iii`, `iv`), named apart; the last name keeps
/// it too until the match model compares suffixes (see [`crate::names`]).
pub const NAME_SUFFIX: &str = "name_suffix";
const TEXT_TRAITS: [&str; 4] = ["street", "address_line2", "city", "state"];
pub const DATE_OF_BIRTH: &str = "date_of_birth";

/// Values that people and systems type when they have no value.
const BUILT_IN_JUNK: [&str; 16] = [
    "null",
    "undefined",
    "none",
    "nil",
    "n/a",
    "na",
    "unknown",
    "test",
    "test@test.com",
    "test@example.com",
    "noemail@noemail.com",
    "no@email.com",
    "email@email.com",
    "00000000-0000-0000-0000-000000000000",
    "anonymous",
    "[object object]",
];

/// Normalizes raw events; built once from config and shared.
#[derive(Debug, Clone)]
pub struct Normalizer {
    config: NormalizeConfig,
    region: phonenumber::country::Id,
    blocked_patterns: RegexSet,
    phones: PhoneCache,
}

/// How many phone results [`PhoneCache`] keeps before it starts over.
const PHONE_CACHE_ENTRIES: usize = 65_536;

/// Phone numbers already normalized, by their trimmed input form. Parsing and validating a
/// number against its region's metadata is the dearest part of normalizing an event, and a
/// customer's number comes back in event after event. A result depends on the input alone,
/// so the cache never changes one; when full it is emptied, which keeps it small without
/// bookkeeping.
#[derive(Default)]
struct PhoneCache(Mutex<FxHashMap<Box<str>, Result<String, IssueKind>>>);

impl PhoneCache {
    fn get_or_insert_with(
        &self,
        value: &str,
        normalize: impl FnOnce() -> Result<String, IssueKind>,
    ) -> Result<String, IssueKind> {
        if let Some(known) = self.lock().get(value) {
            return known.clone();
        }
        // Not under the lock: another thread may normalize the same number meanwhile, and
        // both get the same answer.
        let result = normalize();
        let mut phones = self.lock();
        if phones.len() >= PHONE_CACHE_ENTRIES {
            phones.clear();
        }
        phones.insert(value.into(), result.clone());
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FxHashMap<Box<str>, Result<String, IssueKind>>> {
        // A panic elsewhere cannot leave a wrong entry: entries are inserted whole.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A clone starts empty: the cache is an optimization, not state.
impl Clone for PhoneCache {
    fn clone(&self) -> Self {
        PhoneCache::default()
    }
}

impl std::fmt::Debug for PhoneCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhoneCache")
            .field("entries", &self.lock().len())
            .finish()
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NormalizeConfigError {
    #[error("engine.normalize.default_phone_region {0:?} is not an iso 3166 region code such as \"US\" or \"AU\"")]
    UnknownRegion(String),
    #[error("engine.normalize.blocked_patterns has an invalid regular expression: {0}")]
    BadPattern(#[from] regex::Error),
}

impl Normalizer {
    pub fn new(config: NormalizeConfig) -> Result<Self, NormalizeConfigError> {
        let region = config
            .default_phone_region
            .to_ascii_uppercase()
            .parse::<phonenumber::country::Id>()
            .map_err(|_| {
                NormalizeConfigError::UnknownRegion(config.default_phone_region.clone())
            })?;
        let blocked_patterns = RegexSet::new(&config.blocked_patterns)?;
        Ok(Normalizer {
            config,
            region,
            blocked_patterns,
            phones: PhoneCache::default(),
        })
    }

    pub fn normalize(&self, raw: RawEvent) -> NormalizedEvent {
        let mut issues: Vec<QualityIssue> = raw
            .wrong_type_fields
            .iter()
            .map(|field| QualityIssue {
                field: field.clone(),
                kind: IssueKind::WrongType,
            })
            .collect();
        let mut identifiers = Vec::with_capacity(raw.identifiers.len());
        let network = raw.properties.get("network").and_then(|v| v.as_str());
        for (kind, value) in &raw.identifiers {
            let kind = kind.trim().to_ascii_lowercase();
            match self.identifier_value(&kind, value, network) {
                Ok(normalized) => identifiers.push(Identifier::new(kind, normalized)),
                Err(issue_kind) => {
                    // A missing value is not a quality problem worth counting twice; an empty
                    // string is a junk value and is counted as blocked.
                    issues.push(QualityIssue {
                        field: format!("identifiers.{kind}"),
                        kind: issue_kind,
                    });
                }
            }
        }
        identifiers.sort();
        identifiers.dedup();
        let reading = DateReading::new(self.date_order_of(&raw.source), raw.time().date_naive());
        let traits = self.traits(&raw.traits, reading, &mut issues);
        NormalizedEvent {
            raw,
            identifiers,
            traits,
            issues,
        }
    }

    /// Normalizes one identifier value, or says why it cannot link anything.
    pub fn identifier_value(
        &self,
        kind: &str,
        value: &str,
        network: Option<&str>,
    ) -> Result<String, IssueKind> {
        let trimmed = value.trim();
        if is_junk(trimmed) {
            return Err(IssueKind::Blocked);
        }
        let normalized = match kind {
            "email" => normalize_email(trimmed, self.config.email_provider_rules)?,
            "phone" => self.normalize_phone(trimmed)?,
            "social_handle" => {
                normalize_handle(trimmed, network, self.config.social_handle_network_prefix)?
            }
            "national_id" => trimmed
                .chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_uppercase)
                .collect(),
            _ => trimmed.replace('\0', ""),
        };
        if normalized.is_empty() || is_junk(&normalized) || self.is_blocked(&normalized) {
            return Err(IssueKind::Blocked);
        }
        Ok(normalized)
    }

    /// How `source` writes ambiguous numeric dates.
    fn date_order_of(&self, source: &str) -> DateOrder {
        self.config
            .date_order_by_source
            .get(source)
            .copied()
            .unwrap_or(self.config.date_order)
    }

    fn is_blocked(&self, value: &str) -> bool {
        self.config.blocked_values.iter().any(|b| b == value)
            || self.blocked_patterns.is_match(value)
    }

    fn normalize_phone(&self, value: &str) -> Result<String, IssueKind> {
        self.phones
            .get_or_insert_with(value, || self.parse_phone(value))
    }

    fn parse_phone(&self, value: &str) -> Result<String, IssueKind> {
        let digits = value.chars().filter(char::is_ascii_digit).count();
        if digits < 6 {
            return Err(IssueKind::Invalid);
        }
        if value.chars().filter(char::is_ascii_digit).all(|c| c == '0') {
            return Err(IssueKind::Blocked);
        }
        let number =
            phonenumber::parse(Some(self.region), value).map_err(|_| IssueKind::Invalid)?;
        if !phonenumber::is_valid(&number) {
            return Err(IssueKind::Invalid);
        }
        Ok(number.format().mode(phonenumber::Mode::E164).to_string())
    }

    fn traits(
        &self,
        raw: &SortedMap<CompactString, CompactString>,
        reading: DateReading,
        issues: &mut Vec<QualityIssue>,
    ) -> SortedMap<CompactString, CompactString> {
        let mut traits = SortedMap::new();
        let has_name_fields = NAME_TRAITS.iter().any(|field| raw.get(*field).is_some());
        for (name, value) in raw {
            let normalized = match name.as_str() {
                "first_name" => {
                    let (first, middle) = crate::names::split_first_name(value);
                    keep_part(&mut traits, raw, MIDDLE_NAME, middle);
                    first
                }
                "last_name" => {
                    let (last, suffix) = crate::names::split_last_name(value);
                    keep_part(&mut traits, raw, NAME_SUFFIX, suffix);
                    last
                }
                // A full name in one field, when the parts are not given: split into them.
                "name" | "full_name" if !has_name_fields => {
                    if let Some(parts) = crate::names::split_full_name(value) {
                        keep_part(&mut traits, raw, "first_name", parts.first);
                        keep_part(&mut traits, raw, "last_name", parts.last);
                        keep_part(&mut traits, raw, MIDDLE_NAME, parts.middle);
                        keep_part(&mut traits, raw, NAME_SUFFIX, parts.suffix);
                    }
                    continue;
                }
                n if TEXT_TRAITS.contains(&n) || n == MIDDLE_NAME || n == NAME_SUFFIX => {
                    let text = fold_text(value);
                    if n == "street" {
                        abbreviate_street(&text)
                    } else {
                        text
                    }
                }
                DATE_OF_BIRTH => match parse_date(value, reading) {
                    Some(date) => date.format("%Y-%m-%d").to_string(),
                    None => {
                        if !value.trim().is_empty() {
                            issues.push(QualityIssue {
                                field: format!("traits.{name}"),
                                kind: IssueKind::Invalid,
                            });
                        }
                        continue;
                    }
                },
                "postcode" => value
                    .chars()
                    .filter(|c| c.is_alphanumeric())
                    .flat_map(char::to_uppercase)
                    .collect(),
                "country" => value.trim().to_ascii_uppercase(),
                _ => value.trim().to_owned(),
            };
            // The junk list is for identifiers, where "null" or "test@test.com" would link
            // strangers. A trait keeps its value: "NA" is Namibia's country code and "Na" a
            // surname, and a placeholder that many profiles share weighs little in matching.
            if !normalized.is_empty() {
                traits.insert(name.clone(), normalized.into());
            }
        }
        traits
    }
}

/// Sets a name part found inside another field, unless the event gives that part itself.
fn keep_part(
    traits: &mut SortedMap<CompactString, CompactString>,
    raw: &SortedMap<CompactString, CompactString>,
    field: &str,
    value: String,
) {
    if !value.is_empty() && raw.get(field).is_none() {
        traits.insert(field.into(), value.into());
    }
}

fn is_junk(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    if value.is_ascii() {
        // Nearly every value: compared case-insensitively in place rather than lower-cased
        // into a copy (the junk list is lower case, and `to_lowercase` of ASCII text is its
        // ASCII lower case, so the answer is the same).
        return BUILT_IN_JUNK
            .iter()
            .any(|junk| junk.eq_ignore_ascii_case(value))
            || is_one_repeated_character(value.chars().map(|c| c.to_ascii_lowercase()));
    }
    let lower = value.to_lowercase();
    BUILT_IN_JUNK.contains(&lower.as_str()) || is_one_repeated_character(lower.chars())
}

/// "aaaaaa", "111111", "xxxxxx@xxxxxx": six or more of one character, ignoring punctuation;
/// `chars` are the value's characters, lower-cased.
fn is_one_repeated_character(chars: impl Iterator<Item = char>) -> bool {
    let mut significant = chars.filter(|c| c.is_alphanumeric());
    let Some(first) = significant.next() else {
        return false;
    };
    let mut count = 1;
    for c in significant {
        if c != first {
            return false;
        }
        count += 1;
    }
    count >= 6
}

/// Lower-cases and validates an address; with provider rules, gmail's dots and `+tags` are
/// dropped because gmail delivers all those spellings to one mailbox.
pub fn normalize_email(value: &str, provider_rules: bool) -> Result<String, IssueKind> {
    let lower = value.to_lowercase();
    let (local, domain) = lower.split_once('@').ok_or(IssueKind::Invalid)?;
    let valid = !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && !lower.chars().any(|c| c.is_whitespace() || c.is_control());
    if !valid {
        return Err(IssueKind::Invalid);
    }
    if provider_rules && (domain == "gmail.com" || domain == "googlemail.com") {
        let local = local.split('+').next().unwrap_or(local).replace('.', "");
        if local.is_empty() {
            return Err(IssueKind::Invalid);
        }
        return Ok(format!("{local}@gmail.com"));
    }
    Ok(lower)
}

fn normalize_handle(value: &str, network: Option<&str>, prefix: bool) -> Result<String, IssueKind> {
    let handle = value.trim_start_matches('@').to_lowercase();
    if handle.is_empty() || handle.chars().any(char::is_whitespace) {
        return Err(IssueKind::Invalid);
    }
    Ok(match (prefix, network) {
        (true, Some(network)) => format!("{}:{handle}", network.to_lowercase()),
        _ => handle,
    })
}

/// Unicode-normalizes (NFKD, accents dropped), case-folds, removes punctuation and collapses
/// spaces: "  José  O'Neil-Smith " → "jose oneil smith".
pub fn fold_text(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut pending_space = false;
    for c in value.nfkd().filter(|c| !is_combining_mark(*c)) {
        if c.is_alphanumeric() {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.extend(c.to_lowercase());
        } else if c.is_whitespace() || c == '-' || c == '/' || c == ',' {
            pending_space = true;
        }
        // Other punctuation (apostrophes, dots) joins: "o'neil" → "oneil", "st." → "st".
    }
    out
}

/// Replaces common street words by their postal abbreviation so "12 High Street" and
/// "12 high st." compare equal.
fn abbreviate_street(text: &str) -> String {
    text.split(' ')
        .map(|word| match word {
            "street" => "st",
            "road" => "rd",
            "avenue" => "ave",
            "drive" => "dr",
            "lane" => "ln",
            "boulevard" => "blvd",
            "court" => "ct",
            "place" => "pl",
            "terrace" => "tce",
            "highway" => "hwy",
            "apartment" => "apt",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How to read a date of birth: the order of an ambiguous numeric date, and the latest day a
/// birth can be (the event's own date), which places a two-digit year.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateReading {
    pub order: DateOrder,
    pub latest: NaiveDate,
}

impl DateReading {
    /// Reads with `order`, for an event on `latest`.
    pub fn new(order: DateOrder, latest: NaiveDate) -> Self {
        DateReading { order, latest }
    }
}

/// A date of birth in one of the forms CRMs export, or `None` when it fits none; a value is
/// never guessed. Accepted:
/// - ISO dates (`1980-02-29`, `1980/02/29`, `1980.02.29`, `19800229`) and a timestamp's date;
/// - numeric dates with the year last (`29/02/1980`, `4/2/71`, `04-02-1971`), day-first or
///   month-first by `reading.order` unless one part is above 12;
/// - month names or their first three letters, before or after the day, with or without a
///   comma (`17-Jun-93`, `Apr 2 1971`, `June 17, 1993`, `2nd April 1971`), and after a leading
///   four-digit year (`1971 Apr 2`).
///
/// A two-digit year is the latest year ending in those digits that does not put the birth
/// after `reading.latest`: `4/2/71` read in 2026 is 1971, `1/1/25` is 2025 and `1/1/27` is
/// 1927. Years before 1900 or after 2100 are refused as typos or placeholders.
pub fn parse_date(value: &str, reading: DateReading) -> Option<NaiveDate> {
    let value = value.trim();
    // Timestamps such as 1980-02-29T00:00:00Z: the date part is the date of birth.
    if value.len() > 10 && value.as_bytes().get(10) == Some(&b'T') {
        return parse_date(&value[..10], reading);
    }
    if value.len() == 8 && value.bytes().all(|b| b.is_ascii_digit()) {
        return NaiveDate::parse_from_str(value, "%Y%m%d")
            .ok()
            .and_then(plausible);
    }
    let parts: Vec<&str> = value
        .split(['/', '-', '.', ' ', ','])
        .filter(|part| !part.is_empty())
        .collect();
    let [first, second, third] = parts[..] else {
        return None;
    };
    let date = match (month_number(first), month_number(second)) {
        // Apr 2 1971, June 17, 1993
        (Some(month), None) => day_month_year(second, month, third, reading)?,
        // 17-Jun-93, 2 April 1971, or 1971 Apr 2
        (None, Some(month)) if is_year4(first) => {
            ymd(first.parse().ok()?, month, day_number(third)?)?
        }
        (None, Some(month)) => day_month_year(first, month, third, reading)?,
        (None, None) => numeric_date(first, second, third, reading)?,
        (Some(_), Some(_)) => return None,
    };
    plausible(date)
}

/// A numeric date: year first (four digits, as in ISO) or last.
fn numeric_date(first: &str, second: &str, third: &str, reading: DateReading) -> Option<NaiveDate> {
    let number = |part: &str| -> Option<u32> {
        (part.len() <= 2 && part.bytes().all(|b| b.is_ascii_digit())).then(|| part.parse().ok())?
    };
    if is_year4(first) {
        return ymd(first.parse().ok()?, number(second)?, number(third)?);
    }
    let (a, b) = (number(first)?, number(second)?);
    let (day, month) = if a > 12 {
        (a, b)
    } else if b > 12 {
        (b, a)
    } else {
        match reading.order {
            DateOrder::Dmy => (a, b),
            DateOrder::Mdy => (b, a),
        }
    };
    with_year(day, month, third, reading)
}

fn day_month_year(day: &str, month: u32, year: &str, reading: DateReading) -> Option<NaiveDate> {
    with_year(day_number(day)?, month, year, reading)
}

/// The date of `day` and `month` in `year`, four digits or two (placed by `reading.latest`).
fn with_year(day: u32, month: u32, year: &str, reading: DateReading) -> Option<NaiveDate> {
    if !year.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match year.len() {
        4 => ymd(year.parse().ok()?, month, day),
        2 => {
            use chrono::Datelike;
            let two: i32 = year.parse().ok()?;
            let latest = reading.latest;
            let same_century = latest.year() - latest.year().rem_euclid(100) + two;
            match ymd(same_century, month, day) {
                Some(date) if date <= latest => Some(date),
                // After the event: the century before (a 29 February that century lacks is
                // no date at all).
                _ => ymd(same_century - 100, month, day),
            }
        }
        _ => None,
    }
}

fn ymd(year: i32, month: u32, day: u32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(year, month, day)
}

fn is_year4(part: &str) -> bool {
    part.len() == 4 && part.bytes().all(|b| b.is_ascii_digit())
}

/// A day of the month, with an English ordinal suffix or without (`2`, `02`, `2nd`, `17th`).
fn day_number(part: &str) -> Option<u32> {
    let digits = part.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &part[digits.len()..];
    let ordinal = ["", "st", "nd", "rd", "th"].contains(&suffix.to_ascii_lowercase().as_str());
    (ordinal && (1..=2).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())?
}

/// The month an English month name or its usual abbreviation (`Jun`, `June`, `Sept`) names.
fn month_number(part: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
    ];
    let word = part.to_ascii_lowercase();
    if word.len() < 3 || !word.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let position = MONTHS.iter().position(|month| {
        *month == word || month[..3] == word || (word == "sept" && *month == "september")
    })?;
    Some(position as u32 + 1)
}

/// Births before 1900 or after 2100 are typos or placeholders, not dates of birth.
fn plausible(date: NaiveDate) -> Option<NaiveDate> {
    use chrono::Datelike;
    (1900..=2100).contains(&date.year()).then_some(date)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalizer() -> Normalizer {
        Normalizer::new(NormalizeConfig {
            default_phone_region: "US".into(),
            email_provider_rules: true,
            social_handle_network_prefix: false,
            date_order: DateOrder::Dmy,
            date_order_by_source: BTreeMap::new(),
            blocked_values: vec!["+14155550000".into()],
            blocked_patterns: vec!["^guest-".into()],
        })
        .unwrap()
    }

    #[test]
    fn emails_are_lower_cased_and_gmail_spellings_collapse() {
        let n = normalizer();
        assert_eq!(
            n.identifier_value("email", " Ann.Lee@Example.com ", None),
            Ok("ann.lee@example.com".into())
        );
        assert_eq!(
            n.identifier_value("email", "Ann.Lee+shop@GMail.com", None),
            Ok("annlee@gmail.com".into())
        );
        assert_eq!(
            n.identifier_value("email", "not-an-email", None),
            Err(IssueKind::Invalid)
        );
        assert_eq!(
            n.identifier_value("email", "test@test.com", None),
            Err(IssueKind::Blocked)
        );
    }

    #[test]
    fn phones_become_e164_with_the_default_region() {
        let n = normalizer();
        assert_eq!(
            n.identifier_value("phone", "(415) 555-0132", None),
            Ok("+14155550132".into())
        );
        assert_eq!(
            n.identifier_value("phone", "+61 2 9374 4000", None),
            Ok("+61293744000".into())
        );
        assert_eq!(
            n.identifier_value("phone", "000-000-0000", None),
            Err(IssueKind::Blocked)
        );
        assert_eq!(
            n.identifier_value("phone", "12", None),
            Err(IssueKind::Invalid)
        );
        assert_eq!(
            n.identifier_value("phone", "415 555 0000", None),
            Err(IssueKind::Blocked)
        );
    }

    #[test]
    fn a_phone_seen_before_normalizes_the_same_way() {
        let n = normalizer();
        for _ in 0..3 {
            assert_eq!(
                n.identifier_value("phone", "(415) 555-0132", None),
                Ok("+14155550132".into())
            );
            assert_eq!(
                n.identifier_value("phone", "415 555 0000", None),
                Err(IssueKind::Blocked)
            );
            assert_eq!(
                n.identifier_value("phone", "+1 999 12", None),
                Err(IssueKind::Invalid)
            );
        }
        let copy = n.clone();
        assert_eq!(
            copy.identifier_value("phone", "(415) 555-0132", None),
            Ok("+14155550132".into())
        );
    }

    #[test]
    fn a_full_phone_cache_starts_over_and_still_answers() {
        let cache = PhoneCache::default();
        let calls = std::cell::Cell::new(0);
        let normalize = |value: &str| {
            calls.set(calls.get() + 1);
            Ok(format!("+{value}"))
        };
        for i in 0..=PHONE_CACHE_ENTRIES {
            let value = i.to_string();
            cache
                .get_or_insert_with(&value, || normalize(&value))
                .unwrap();
        }
        assert_eq!(calls.get(), PHONE_CACHE_ENTRIES + 1);
        assert_eq!(
            cache.lock().len(),
            1,
            "emptied when full, then the last one added"
        );
        assert_eq!(
            cache.get_or_insert_with("0", || normalize("0")),
            Ok("+0".into())
        );
        assert_eq!(
            calls.get(),
            PHONE_CACHE_ENTRIES + 2,
            "recomputed after the reset"
        );
        let last = PHONE_CACHE_ENTRIES.to_string();
        cache
            .get_or_insert_with(&last, || normalize(&last))
            .unwrap();
        assert_eq!(calls.get(), PHONE_CACHE_ENTRIES + 2, "still cached");
    }

    #[test]
    fn handles_junk_and_patterns() {
        let n = normalizer();
        assert_eq!(
            n.identifier_value("social_handle", "@AnnLee", None),
            Ok("annlee".into())
        );
        assert_eq!(
            n.identifier_value("user_id", "undefined", None),
            Err(IssueKind::Blocked)
        );
        assert_eq!(
            n.identifier_value("cookie_id", "", None),
            Err(IssueKind::Blocked)
        );
        assert_eq!(
            n.identifier_value("cookie_id", "guest-17", None),
            Err(IssueKind::Blocked)
        );
        assert_eq!(n.identifier_value("crm_id", " 77 ", None), Ok("77".into()));
    }

    #[test]
    fn junk_is_recognized_in_any_case_and_script() {
        for junk in [
            "NULL",
            "Test@Test.COM",
            "N/A",
            "AAAAAA",
            "x-X-x-X-x-X",
            "ÄÄÄäää",
            "ÉÉÉÉÉÉ",
        ] {
            assert!(is_junk(junk), "{junk} is junk");
        }
        // Greek capital sigma lower-cases to a final sigma at the end of a word, so the
        // word's characters differ once lower-cased: not one repeated character.
        for value in ["ΣΣΣΣΣΣ", "nulls", "Ann", "AAAAAb", "ÄÄÄÄÄ"] {
            assert!(!is_junk(value), "{value} is not junk");
        }
    }

    #[test]
    fn text_is_folded_and_streets_abbreviated() {
        assert_eq!(fold_text("  José  O'Neil-Smith "), "jose oneil smith");
        assert_eq!(
            abbreviate_street(&fold_text("12 High Street")),
            "12 high st"
        );
    }

    /// Read as an event of 2026-03-01 would read them.
    fn date(value: &str, order: DateOrder) -> Option<String> {
        let latest = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        parse_date(value, DateReading::new(order, latest)).map(|d| d.to_string())
    }

    #[test]
    fn dates_of_birth_parse_from_common_formats() {
        let d = |s| date(s, DateOrder::Dmy);
        assert_eq!(d("1980-02-29"), Some("1980-02-29".into()));
        assert_eq!(d("19800229"), Some("1980-02-29".into()));
        assert_eq!(d("1980-02-29T00:00:00Z"), Some("1980-02-29".into()));
        assert_eq!(d("29/02/1980"), Some("1980-02-29".into()));
        assert_eq!(d("02/29/1980"), Some("1980-02-29".into()));
        assert_eq!(d("03/04/1980"), Some("1980-04-03".into()));
        assert_eq!(d("29 Feb 1980"), Some("1980-02-29".into()));
        assert_eq!(d("1981-02-29"), None);
        assert_eq!(d("yesterday"), None);
        assert_eq!(
            date("03/04/1980", DateOrder::Mdy),
            Some("1980-03-04".into())
        );
    }

    /// The formats CRMs export, each read as a person would.
    #[test]
    fn crm_dates_with_two_digit_years_and_month_names_parse() {
        let d = |s| date(s, DateOrder::Dmy);
        let m = |s| date(s, DateOrder::Mdy);
        assert_eq!(d("4/2/71"), Some("1971-02-04".into()));
        assert_eq!(m("4/2/71"), Some("1971-04-02".into()));
        assert_eq!(
            d("21/9/1990"),
            Some("1990-09-21".into()),
            "a part above 12 decides"
        );
        assert_eq!(m("21/9/1990"), Some("1990-09-21".into()));
        assert_eq!(d("17-Jun-93"), Some("1993-06-17".into()));
        assert_eq!(d("17 JUN 1993"), Some("1993-06-17".into()));
        assert_eq!(d("Apr 2 1971"), Some("1971-04-02".into()));
        assert_eq!(d("Apr 2, 1971"), Some("1971-04-02".into()));
        assert_eq!(d("June 17, 1993"), Some("1993-06-17".into()));
        assert_eq!(d("2 April 1971"), Some("1971-04-02".into()));
        assert_eq!(d("2nd April 1971"), Some("1971-04-02".into()));
        assert_eq!(d("Sept 3 1988"), Some("1988-09-03".into()));
        assert_eq!(d("1971 Apr 2"), Some("1971-04-02".into()));
        assert_eq!(d("1971/4/2"), Some("1971-04-02".into()));
    }

    /// A two-digit year is the latest that does not put the birth after the event.
    #[test]
    fn two_digit_years_never_put_a_birth_after_the_event() {
        let d = |s| date(s, DateOrder::Dmy);
        assert_eq!(d("1/1/25"), Some("2025-01-01".into()));
        assert_eq!(
            d("28/2/26"),
            Some("2026-02-28".into()),
            "the day before the event"
        );
        assert_eq!(
            d("2/3/26"),
            Some("1926-03-02".into()),
            "the day after the event"
        );
        assert_eq!(d("1/1/27"), Some("1927-01-01".into()));
        assert_eq!(d("17-Jun-93"), Some("1993-06-17".into()));
        assert_eq!(d("1/1/00"), Some("2000-01-01".into()));
        // 29 February 1900 does not exist, and 2000 is after the event of 1999.
        let latest = NaiveDate::from_ymd_opt(1999, 6, 1).unwrap();
        assert_eq!(
            parse_date("29/2/00", DateReading::new(DateOrder::Dmy, latest)),
            None
        );
    }

    /// What is not clearly a date is refused, not guessed.
    #[test]
    fn odd_dates_are_refused() {
        let d = |s| date(s, DateOrder::Dmy);
        for odd in [
            "13/13/1990",
            "31-Feb-90",
            "1990",
            "Jun 1990",
            "12/05",
            "1/2/3",
            "1/2/199",
            "00/00/0000",
            "Foo 2 1971",
            "Apr May 1971",
            "2x April 1971",
            "12/05/1850",
            "1/2/3/1990",
            "",
        ] {
            assert_eq!(d(odd), None, "{odd:?} was read as a date");
        }
    }

    /// Full names, honorifics, initials and suffixes land in the traits matching compares.
    #[test]
    fn names_as_crms_write_them_become_their_parts() {
        let traits = |json: &str| {
            let event = format!(
                r#"{{"event_id":"1","event_type":"t","timestamp":"2026-01-01T00:00:00Z","traits":{json}}}"#
            );
            let raw = crate::event::parse_event(event.as_bytes(), "web").unwrap();
            let traits = normalizer().normalize(raw).traits;
            traits
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            traits(r#"{"name":"Doe, Jane A."}"#),
            "first_name=jane last_name=doe middle_name=a"
        );
        assert_eq!(
            traits(r#"{"full_name":"Dr John Smith Jr"}"#),
            "first_name=john last_name=smith jr name_suffix=jr"
        );
        assert_eq!(
            traits(r#"{"first_name":"Mrs Ann M.","last_name":"Lee III"}"#),
            "first_name=ann last_name=lee iii middle_name=m name_suffix=iii"
        );
        // Given parts win over what another field implies.
        assert_eq!(
            traits(r#"{"first_name":"Ann M.","middle_name":"Marie"}"#),
            "first_name=ann middle_name=marie"
        );
        // With the parts given, a full name is kept as it was sent.
        assert_eq!(
            traits(r#"{"first_name":"Ann","name":"Ann Lee"}"#),
            "first_name=ann name=Ann Lee"
        );
    }

    #[test]
    fn each_source_may_write_dates_its_own_way() {
        let mut config = normalizer().config.clone();
        config
            .date_order_by_source
            .insert("crm".into(), DateOrder::Mdy);
        let normalizer = Normalizer::new(config).unwrap();
        let read = |source: &str| {
            let raw = crate::event::parse_event(
                br#"{"event_id":"1","event_type":"t","timestamp":"2026-01-01T00:00:00Z","traits":{"date_of_birth":"03/04/80"}}"#,
                source,
            )
            .unwrap();
            normalizer
                .normalize(raw)
                .traits
                .get("date_of_birth")
                .cloned()
        };
        assert_eq!(read("crm").as_deref(), Some("1980-03-04"));
        assert_eq!(read("web").as_deref(), Some("1980-04-03"));
    }

    #[test]
    fn bad_fields_are_dropped_and_reported_but_the_event_survives() {
        let raw = crate::event::parse_event(
            br#"{"event_id":"1","event_type":"t","timestamp":"2026-01-01T00:00:00Z",
            "identifiers":{"phone":"call me","email":"A@b.co"},"traits":{"date_of_birth":"31/31/1999","first_name":"Ann"}}"#,
            "web",
        )
        .unwrap();
        let event = normalizer().normalize(raw);
        assert_eq!(event.identifiers, vec![Identifier::new("email", "a@b.co")]);
        assert_eq!(
            event.traits.get("first_name").map(CompactString::as_str),
            Some("ann")
        );
        assert!(!event.traits.contains_key("date_of_birth"));
        let fields: Vec<_> = event.issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(fields, vec!["identifiers.phone", "traits.date_of_birth"]);
    }

    #[test]
    fn traits_keep_values_that_would_be_junk_as_identifiers() {
        let raw = crate::event::parse_event(
            br#"{"event_id":"1","event_type":"t","timestamp":"2026-01-01T00:00:00Z",
            "identifiers":{"email":"test@test.com","user_id":"NA"},
            "traits":{"country":"NA","last_name":"Na","first_name":"  "}}"#,
            "web",
        )
        .unwrap();
        let event = normalizer().normalize(raw);
        assert!(event.identifiers.is_empty(), "{:?}", event.identifiers);
        assert_eq!(
            event.traits.get("country").map(CompactString::as_str),
            Some("NA")
        );
        assert_eq!(
            event.traits.get("last_name").map(CompactString::as_str),
            Some("na")
        );
        assert!(
            !event.traits.contains_key("first_name"),
            "blank is no value"
        );
    }

    #[test]
    fn a_wrongly_typed_field_is_a_quality_issue_of_the_kept_event() {
        let raw = crate::event::parse_event(
            br#"{"event_id":"1","event_type":"t","timestamp":"2026-01-01T00:00:00Z",
            "identifiers":{"email":"a@b.co","phone":{"n":1}},"traits":"none"}"#,
            "web",
        )
        .unwrap();
        let event = normalizer().normalize(raw);
        assert_eq!(event.identifiers, vec![Identifier::new("email", "a@b.co")]);
        let issues: Vec<_> = event
            .issues
            .iter()
            .map(|i| (i.field.as_str(), i.kind))
            .collect();
        assert_eq!(
            issues,
            [
                ("identifiers.phone", IssueKind::WrongType),
                ("traits", IssueKind::WrongType)
            ]
        );
    }
}
