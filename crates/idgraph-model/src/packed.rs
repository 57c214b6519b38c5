//! A compact binary form of profiles, for the state store.
//!
//! A profile's JSON is its output format, and for years the store kept exactly those bytes.
//! But most of a profile's JSON is field names, quotes and 24-character timestamps, and the
//! store writes every changed profile to its write-ahead log, its memtable, its flushed files
//! and again at every compaction. This form keeps the same data in about a third of the bytes:
//!
//! - unsigned integers are LEB128 varints, signed ones zigzag varints, floats their 8 bytes;
//! - strings are a varint length and UTF-8 bytes;
//! - *symbols* (identifier kinds, sources, trait names, event types, currencies, channels),
//!   which repeat within a profile, are written out once and then referred to by number;
//! - timestamps in the engine's canonical form (`2026-01-03T13:24:13.000Z`) are milliseconds
//!   since 1970, any other text is kept as it is, and a timestamp seen before in the record
//!   (first and last seen dates repeat a lot) is referred to by number.
//!
//! Decoding gives back exactly the profile that was encoded (property tests check it), so a
//! profile read from the store encodes to the same JSON as the one that was written. The
//! layout is positional: adding a field means a new format version, which the state record
//! carries in its header. This module only encodes and decodes; it knows nothing of the store.

use compact_str::CompactString;

use crate::{ComputedTraits, Profile, ProfileIdentifier, SortedMap, TimedNumber, TraitValue};

/// Symbols (and distinct timestamps) beyond this many per record are written out in full
/// every time; the bound keeps the writer's linear search short for profiles with unusually
/// many distinct ones.
const MAX_SYMBOLS: usize = 256;

/// A packed record that cannot be decoded, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("packed record is damaged at byte {offset}: {reason}")]
pub struct PackedError {
    pub offset: usize,
    pub reason: &'static str,
}

/// Writes values in the packed form; see the module documentation for the layout.
pub struct PackWriter<'a> {
    bytes: Vec<u8>,
    symbols: Vec<&'a str>,
    times: Vec<&'a str>,
}

impl<'a> PackWriter<'a> {
    pub fn with_capacity(capacity: usize) -> Self {
        PackWriter {
            bytes: Vec::with_capacity(capacity),
            symbols: Vec::with_capacity(16),
            times: Vec::with_capacity(16),
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub fn byte(&mut self, byte: u8) {
        self.bytes.push(byte);
    }

    pub fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.bytes.push(value as u8 | 0x80);
            value >>= 7;
        }
        self.bytes.push(value as u8);
    }

    pub fn signed(&mut self, value: i64) {
        self.varint(((value << 1) ^ (value >> 63)) as u64);
    }

    pub fn float(&mut self, value: f64) {
        self.bytes.extend_from_slice(&value.to_bits().to_le_bytes());
    }

    pub fn count(&mut self, count: usize) {
        self.varint(count as u64);
    }

    pub fn str(&mut self, text: &str) {
        self.count(text.len());
        self.bytes.extend_from_slice(text.as_bytes());
    }

    /// `None` as 0, `Some(text)` as its length plus one and the text.
    pub fn optional_str(&mut self, text: Option<&str>) {
        match text {
            None => self.varint(0),
            Some(text) => {
                self.varint(text.len() as u64 + 1);
                self.bytes.extend_from_slice(text.as_bytes());
            }
        }
    }

    /// A repeated short string: an odd varint refers to an earlier symbol by number, an even
    /// one gives the length of a new symbol that follows.
    pub fn symbol(&mut self, text: &'a str) {
        if let Some(index) = self.symbols.iter().position(|known| *known == text) {
            self.varint(((index as u64) << 1) | 1);
            return;
        }
        self.varint((text.len() as u64) << 1);
        self.bytes.extend_from_slice(text.as_bytes());
        remember(&mut self.symbols, text);
    }

    /// A timestamp: a varint whose lowest bit is 1 holds canonical milliseconds; with lowest
    /// bits 10 it refers to an earlier timestamp of the record by number; with 00 it gives
    /// the length of text that follows.
    pub fn time(&mut self, text: &'a str) {
        if let Some(index) = self.times.iter().position(|known| *known == text) {
            self.varint(((index as u64) << 2) | 0b10);
            return;
        }
        match canonical_millis(text) {
            Some(millis) => self.varint((millis << 1) | 1),
            None => {
                self.varint((text.len() as u64) << 2);
                self.bytes.extend_from_slice(text.as_bytes());
            }
        }
        remember(&mut self.times, text);
    }
}

/// Reads what [`PackWriter`] wrote, in the same order.
pub struct PackReader<'b> {
    bytes: &'b [u8],
    position: usize,
    symbols: Vec<CompactString>,
    times: Vec<CompactString>,
}

impl<'b> PackReader<'b> {
    pub fn new(bytes: &'b [u8]) -> Self {
        PackReader {
            bytes,
            position: 0,
            symbols: Vec::new(),
            times: Vec::new(),
        }
    }

    fn damaged(&self, reason: &'static str) -> PackedError {
        PackedError {
            offset: self.position,
            reason,
        }
    }

    /// Succeeds only if every byte was read: trailing bytes mean a format this build does not
    /// know, or damage.
    pub fn finish(self) -> Result<(), PackedError> {
        if self.position == self.bytes.len() {
            Ok(())
        } else {
            Err(self.damaged("unexpected bytes after the record"))
        }
    }

    pub fn byte(&mut self) -> Result<u8, PackedError> {
        let byte = *self
            .bytes
            .get(self.position)
            .ok_or_else(|| self.damaged("the record ends early"))?;
        self.position += 1;
        Ok(byte)
    }

    pub fn varint(&mut self) -> Result<u64, PackedError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.damaged("a number is longer than ten bytes"))
    }

    pub fn signed(&mut self) -> Result<i64, PackedError> {
        let zigzag = self.varint()?;
        Ok((zigzag >> 1) as i64 ^ -((zigzag & 1) as i64))
    }

    pub fn float(&mut self) -> Result<f64, PackedError> {
        let bytes = self.take(8)?;
        let bits = u64::from_le_bytes(bytes.try_into().expect("took eight bytes"));
        Ok(f64::from_bits(bits))
    }

    /// A count of items that follow; each takes at least one byte, so a count larger than
    /// what is left is damage (and must not size an allocation).
    pub fn count(&mut self) -> Result<usize, PackedError> {
        let count = self.varint()?;
        if count > (self.bytes.len() - self.position) as u64 {
            return Err(self.damaged("a count exceeds the bytes left"));
        }
        Ok(count as usize)
    }

    fn take(&mut self, length: usize) -> Result<&'b [u8], PackedError> {
        let end = self
            .position
            .checked_add(length)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| self.damaged("the record ends early"))?;
        let taken = &self.bytes[self.position..end];
        self.position = end;
        Ok(taken)
    }

    fn text(&mut self, length: u64) -> Result<&'b str, PackedError> {
        let length = usize::try_from(length).map_err(|_| self.damaged("a length is too large"))?;
        let start = self.position;
        let bytes = self.take(length)?;
        std::str::from_utf8(bytes).map_err(|_| PackedError {
            offset: start,
            reason: "a string is not UTF-8",
        })
    }

    pub fn str(&mut self) -> Result<&'b str, PackedError> {
        let length = self.varint()?;
        self.text(length)
    }

    pub fn string(&mut self) -> Result<String, PackedError> {
        self.str().map(str::to_owned)
    }

    pub fn compact(&mut self) -> Result<CompactString, PackedError> {
        self.str().map(CompactString::from)
    }

    pub fn optional_string(&mut self) -> Result<Option<String>, PackedError> {
        match self.varint()? {
            0 => Ok(None),
            length => self.text(length - 1).map(|text| Some(text.to_owned())),
        }
    }

    pub fn symbol(&mut self) -> Result<CompactString, PackedError> {
        let tag = self.varint()?;
        if tag & 1 == 1 {
            return recall(&self.symbols, tag >> 1)
                .ok_or_else(|| self.damaged("a symbol refers to one not yet defined"));
        }
        let symbol = CompactString::from(self.text(tag >> 1)?);
        remember(&mut self.symbols, symbol.clone());
        Ok(symbol)
    }

    pub fn time(&mut self) -> Result<CompactString, PackedError> {
        let tag = self.varint()?;
        let time = match tag & 0b11 {
            0b10 => {
                return recall(&self.times, tag >> 2)
                    .ok_or_else(|| self.damaged("a time refers to one not yet read"));
            }
            0b00 => CompactString::from(self.text(tag >> 2)?),
            _ => canonical_text(tag >> 1).ok_or_else(|| self.damaged("a time is out of range"))?,
        };
        remember(&mut self.times, time.clone());
        Ok(time)
    }

    /// A counted list, each item read by `item`.
    pub fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, PackedError>,
    ) -> Result<Vec<T>, PackedError> {
        let count = self.count()?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(item(self)?);
        }
        Ok(items)
    }
}

/// Adds a new symbol or time to the record's table, while the table has room; writer and
/// reader apply the same rule, so their numbering agrees.
fn remember<T>(table: &mut Vec<T>, entry: T) {
    if table.len() < MAX_SYMBOLS {
        table.push(entry);
    }
}

/// Entry `index` of a record's table of symbols or times, if it was defined.
fn recall(table: &[CompactString], index: u64) -> Option<CompactString> {
    table.get(usize::try_from(index).ok()?).cloned()
}

/// Appends `profile` to `writer`.
pub fn pack_profile<'a>(writer: &mut PackWriter<'a>, profile: &'a Profile) {
    writer.str(&profile.customer_id);
    writer.time(&profile.created_at);
    writer.varint(profile.version);
    writer.count(profile.identifiers.len());
    for identifier in &profile.identifiers {
        writer.symbol(&identifier.kind);
        writer.str(&identifier.value);
        writer.time(&identifier.first_seen);
        writer.time(&identifier.last_seen);
        writer.symbol(&identifier.source);
    }
    writer.count(profile.traits.len());
    for (name, value) in &profile.traits {
        writer.symbol(name);
        writer.str(&value.value);
        writer.symbol(&value.source);
        writer.time(&value.updated_at);
    }
    pack_computed(writer, &profile.computed);
    writer.count(profile.absorbed_ids.len());
    for id in &profile.absorbed_ids {
        writer.str(id);
    }
}

fn pack_computed<'a>(writer: &mut PackWriter<'a>, computed: &'a ComputedTraits) {
    writer.varint(computed.event_count);
    writer.count(computed.events.len());
    for (source, by_type) in &computed.events {
        writer.symbol(source);
        writer.count(by_type.len());
        for (event_type, count) in by_type {
            writer.symbol(event_type);
            writer.varint(*count);
        }
    }
    writer.time(&computed.first_seen);
    writer.time(&computed.last_seen);
    writer.varint(computed.order_count);
    writer.count(computed.lifetime_value_minor.len());
    for (currency, amount) in &computed.lifetime_value_minor {
        writer.symbol(currency);
        writer.signed(*amount);
    }
    writer.count(computed.channels.len());
    for channel in &computed.channels {
        writer.symbol(channel);
    }
    let present = u8::from(computed.latest_sentiment.is_some())
        | u8::from(computed.follower_reach.is_some()) << 1;
    writer.byte(present);
    for timed in [&computed.latest_sentiment, &computed.follower_reach]
        .into_iter()
        .flatten()
    {
        writer.float(timed.value);
        writer.time(&timed.at);
    }
}

/// Reads a profile that [`pack_profile`] wrote.
pub fn unpack_profile(reader: &mut PackReader) -> Result<Profile, PackedError> {
    let customer_id = reader.string()?;
    let created_at = reader.time()?;
    let version = reader.varint()?;
    let identifiers = reader.list(|reader| {
        Ok(ProfileIdentifier {
            kind: reader.symbol()?,
            value: reader.compact()?,
            first_seen: reader.time()?,
            last_seen: reader.time()?,
            source: reader.symbol()?,
        })
    })?;
    let traits = reader.list(|reader| {
        let name = reader.symbol()?;
        let value = TraitValue {
            value: reader.compact()?,
            source: reader.symbol()?,
            updated_at: reader.time()?,
        };
        Ok((name, value))
    })?;
    let computed = unpack_computed(reader)?;
    let absorbed_ids = reader.list(PackReader::string)?;
    Ok(Profile {
        customer_id,
        created_at,
        version,
        identifiers,
        traits: SortedMap::from_iter(traits),
        computed,
        absorbed_ids,
    })
}

fn unpack_computed(reader: &mut PackReader) -> Result<ComputedTraits, PackedError> {
    let event_count = reader.varint()?;
    let events = reader.list(|reader| {
        let source = reader.symbol()?;
        let by_type = reader.list(|reader| Ok((reader.symbol()?, reader.varint()?)))?;
        Ok((source, SortedMap::from_iter(by_type)))
    })?;
    let first_seen = reader.time()?;
    let last_seen = reader.time()?;
    let order_count = reader.varint()?;
    let lifetime_value_minor = reader.list(|reader| Ok((reader.symbol()?, reader.signed()?)))?;
    let channels = reader.list(PackReader::symbol)?;
    let present = reader.byte()?;
    if present > 0b11 {
        return Err(reader.damaged("unknown optional computed traits"));
    }
    let mut timed = || -> Result<TimedNumber, PackedError> {
        Ok(TimedNumber {
            value: reader.float()?,
            at: reader.time()?,
        })
    };
    let latest_sentiment = (present & 1 != 0).then(&mut timed).transpose()?;
    let follower_reach = (present & 2 != 0).then(&mut timed).transpose()?;
    Ok(ComputedTraits {
        event_count,
        events: SortedMap::from_iter(events),
        first_seen,
        last_seen,
        order_count,
        lifetime_value_minor: SortedMap::from_iter(lifetime_value_minor),
        channels: channels.into_iter().collect(),
        latest_sentiment,
        follower_reach,
    })
}

/// Milliseconds since 1970 of a timestamp in exactly the form the engine writes
/// (`YYYY-MM-DDTHH:MM:SS.mmmZ`, a valid date from 1970 on, seconds below 60), so that
/// [`canonical_text`] gives back the same text; `None` for anything else. Hand-written
/// rather than through chrono: a profile carries a dozen timestamps and is packed on every
/// change, and this is a few dozen instructions instead of a few hundred.
fn canonical_millis(text: &str) -> Option<u64> {
    let bytes: &[u8; 24] = text.as_bytes().try_into().ok()?;
    let separators = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ];
    if separators
        .iter()
        .any(|&(at, separator)| bytes[at] != separator)
    {
        return None;
    }
    let digit = |at: usize| {
        let value = bytes[at].wrapping_sub(b'0');
        (value < 10).then_some(u64::from(value))
    };
    let two = |at: usize| Some(digit(at)? * 10 + digit(at + 1)?);
    let year = two(0)? * 100 + two(2)?;
    let (month, day) = (two(5)?, two(8)?);
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    let millis = two(20)? * 10 + digit(22)?;
    let valid = year >= 1970
        && (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && hour < 24
        && minute < 60
        && second < 60;
    if !valid {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((((days * 24 + hour) * 60 + minute) * 60 + second) * 1000 + millis)
}

/// The canonical text of `millis` since 1970; `None` past year 9999.
fn canonical_text(millis: u64) -> Option<CompactString> {
    let seconds = millis / 1000;
    let (year, month, day) = civil_from_days(seconds / 86_400);
    if year > 9999 {
        return None;
    }
    let second_of_day = seconds % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let mut put = |start: usize, width: usize, mut value: u64| {
        for index in (start..start + width).rev() {
            text[index] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, second_of_day / 3600);
    put(14, 2, second_of_day / 60 % 60);
    put(17, 2, second_of_day % 60);
    put(20, 3, millis % 1000);
    Some(CompactString::from(
        std::str::from_utf8(&text).expect("digits and separators are ASCII"),
    ))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date from 1970 on, in the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`, on a year that starts in March so that leap days come last).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let (era, year_of_era) = (year / 400, year % 400);
    let month_from_march = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month, day) of a day counted from 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let days = days + 719_468;
    let (era, day_of_era) = (days / 146_097, days % 146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SortedSet;
    use proptest::prelude::*;

    fn round_trip(profile: &Profile) -> Profile {
        let mut writer = PackWriter::with_capacity(256);
        pack_profile(&mut writer, profile);
        let bytes = writer.into_bytes();
        let mut reader = PackReader::new(&bytes);
        let decoded = unpack_profile(&mut reader).unwrap();
        reader.finish().unwrap();
        decoded
    }

    fn sample() -> Profile {
        let seen = |first: &str, last: &str, kind: &str, value: &str| ProfileIdentifier {
            kind: kind.into(),
            value: value.into(),
            first_seen: first.into(),
            last_seen: last.into(),
            source: "web".into(),
        };
        Profile {
            customer_id: "cus_5e3387855965798c467b659c".into(),
            created_at: "2026-01-01T03:38:04.000Z".into(),
            version: 13,
            identifiers: vec![
                seen(
                    "2026-01-03T13:24:13.000Z",
                    "2026-01-17T14:03:58.000Z",
                    "cookie_id",
                    "ck-98d2cb4ba92cdea2",
                ),
                seen(
                    "2026-01-13T10:51:47.000Z",
                    "2026-01-15T13:04:17.000Z",
                    "email",
                    "ana@example.com",
                ),
                seen(
                    "2026-01-01T03:38:04.000Z",
                    "2026-01-18T21:43:26.000Z",
                    "email",
                    "ana.lee@example.com",
                ),
            ],
            traits: [(
                CompactString::from("first_name"),
                TraitValue {
                    value: "Ana".into(),
                    source: "web".into(),
                    updated_at: "2026-01-18T21:43:26.000Z".into(),
                },
            )]
            .into_iter()
            .collect(),
            computed: ComputedTraits {
                event_count: 20,
                events: [(
                    CompactString::from("web"),
                    [("page_view".into(), 12), ("search".into(), 8)]
                        .into_iter()
                        .collect(),
                )]
                .into_iter()
                .collect(),
                first_seen: "2026-01-01T03:38:04.000Z".into(),
                last_seen: "2026-01-18T21:43:26.000Z".into(),
                order_count: 1,
                lifetime_value_minor: [(CompactString::from("EUR"), -1250)].into_iter().collect(),
                channels: [CompactString::from("web")].into_iter().collect(),
                latest_sentiment: Some(TimedNumber {
                    value: -0.25,
                    at: "2026-01-02T00:00:00.000Z".into(),
                }),
                follower_reach: None,
            },
            absorbed_ids: vec!["cus_a4914d9964ce347190a7ab59".into()],
        }
    }

    #[test]
    fn a_typical_profile_packs_into_a_third_of_its_json() {
        let profile = sample();
        let mut writer = PackWriter::with_capacity(256);
        pack_profile(&mut writer, &profile);
        let packed = writer.into_bytes().len();
        let json = crate::ProfileJson::encode(&profile).as_str().len();
        assert!(packed * 3 <= json, "packed {packed} bytes, JSON {json}");
        assert_eq!(round_trip(&profile), profile);
    }

    #[test]
    fn timestamps_outside_the_canonical_form_are_kept_as_text() {
        for text in [
            "2026-01-03T13:24:13Z",
            "2026-02-30T00:00:00.000Z",
            "1969-12-31T23:59:59.999Z",
            "2026-01-03T24:00:00.000Z",
            "2016-12-31T23:59:60.000Z",
            "2026-01-03 13:24:13.000Z",
            "+026-01-03T13:24:13.000Z",
            "",
        ] {
            assert_eq!(canonical_millis(text), None, "{text}");
        }
        let mut profile = sample();
        profile.created_at = "yesterday".into();
        profile.computed.first_seen = "2016-12-31T23:59:60.000Z".into();
        assert_eq!(round_trip(&profile), profile);
    }

    #[test]
    fn canonical_timestamps_are_milliseconds_since_1970() {
        assert_eq!(canonical_millis("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            canonical_millis("2026-01-01T03:38:04.250Z"),
            Some(1_767_238_684_250)
        );
        assert_eq!(
            canonical_text(253_402_300_799_999).as_deref(),
            Some("9999-12-31T23:59:59.999Z")
        );
        assert_eq!(canonical_text(253_402_300_800_000), None);
    }

    #[test]
    fn damaged_records_are_refused_not_misread() {
        let profile = sample();
        let mut writer = PackWriter::with_capacity(256);
        pack_profile(&mut writer, &profile);
        let bytes = writer.into_bytes();
        for length in 0..bytes.len() {
            let mut reader = PackReader::new(&bytes[..length]);
            assert!(
                unpack_profile(&mut reader)
                    .and_then(|_| reader.finish())
                    .is_err(),
                "a record cut to {length} bytes was accepted"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let mut reader = PackReader::new(&longer);
        unpack_profile(&mut reader).unwrap();
        assert_eq!(
            reader.finish().unwrap_err().reason,
            "unexpected bytes after the record"
        );
        let mut huge_count = Vec::new();
        let mut writer = PackWriter::with_capacity(16);
        writer.str("cus_1");
        writer.time("2026-01-01T00:00:00.000Z");
        writer.varint(1);
        writer.varint(u64::MAX);
        huge_count.extend(writer.into_bytes());
        let error = unpack_profile(&mut PackReader::new(&huge_count)).unwrap_err();
        assert_eq!(error.reason, "a count exceeds the bytes left");
    }

    /// Timestamps in and out of the canonical form, including the edges of its range.
    fn time() -> impl Strategy<Value = CompactString> {
        prop_oneof![
            (0u64..253_402_300_800_000).prop_map(|millis| canonical_text(millis).unwrap()),
            Just(CompactString::from("1970-01-01T00:00:00.000Z")),
            Just(CompactString::from("9999-12-31T23:59:59.999Z")),
            "[0-9T:.Z-]{0,26}".prop_map(CompactString::from),
        ]
    }

    /// Strings drawn from a small alphabet so that symbols repeat, plus arbitrary text.
    fn symbol() -> impl Strategy<Value = CompactString> {
        prop_oneof![
            "[ab]{0,2}".prop_map(CompactString::from),
            "\\PC{0,30}".prop_map(CompactString::from),
        ]
    }

    fn identifier() -> impl Strategy<Value = ProfileIdentifier> {
        (symbol(), symbol(), time(), time(), symbol()).prop_map(
            |(kind, value, first_seen, last_seen, source)| ProfileIdentifier {
                kind,
                value,
                first_seen,
                last_seen,
                source,
            },
        )
    }

    fn trait_value() -> impl Strategy<Value = TraitValue> {
        (symbol(), symbol(), time()).prop_map(|(value, source, updated_at)| TraitValue {
            value,
            source,
            updated_at,
        })
    }

    fn timed() -> impl Strategy<Value = Option<TimedNumber>> {
        prop::option::of((any::<f64>(), time()).prop_map(|(value, at)| TimedNumber { value, at }))
    }

    fn computed() -> impl Strategy<Value = ComputedTraits> {
        (
            (any::<u64>(), any::<u64>(), time(), time()),
            prop::collection::vec(
                (
                    symbol(),
                    prop::collection::vec((symbol(), any::<u64>()), 0..4),
                ),
                0..4,
            ),
            prop::collection::vec((symbol(), any::<i64>()), 0..3),
            prop::collection::vec(symbol(), 0..3),
            (timed(), timed()),
        )
            .prop_map(
                |(
                    (event_count, order_count, first_seen, last_seen),
                    events,
                    ltv,
                    channels,
                    (sentiment, reach),
                )| {
                    ComputedTraits {
                        event_count,
                        events: events
                            .into_iter()
                            .map(|(source, types)| (source, types.into_iter().collect()))
                            .collect(),
                        first_seen,
                        last_seen,
                        order_count,
                        lifetime_value_minor: ltv.into_iter().collect(),
                        channels: channels.into_iter().collect::<SortedSet<_>>(),
                        latest_sentiment: sentiment,
                        follower_reach: reach,
                    }
                },
            )
    }

    fn profile() -> impl Strategy<Value = Profile> {
        (
            ("\\PC{0,30}", time(), any::<u64>()),
            prop::collection::vec(identifier(), 0..5),
            prop::collection::vec((symbol(), trait_value()), 0..4),
            computed(),
            prop::collection::vec("\\PC{0,30}", 0..3),
        )
            .prop_map(
                |(
                    (customer_id, created_at, version),
                    identifiers,
                    traits,
                    computed,
                    absorbed_ids,
                )| {
                    Profile {
                        customer_id,
                        created_at,
                        version,
                        identifiers,
                        traits: traits.into_iter().collect(),
                        computed,
                        absorbed_ids,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn a_packed_profile_unpacks_to_the_same_json(profile in profile()) {
            let decoded = round_trip(&profile);
            // Compared as JSON, because NaN sentiments are not equal to themselves.
            let json = |profile: &Profile| crate::ProfileJson::encode(profile).as_str().to_owned();
            prop_assert_eq!(json(&decoded), json(&profile));
            let bits = |timed: &Option<TimedNumber>| timed.as_ref().map(|t| t.value.to_bits());
            prop_assert_eq!(bits(&decoded.computed.latest_sentiment), bits(&profile.computed.latest_sentiment));
            prop_assert_eq!(bits(&decoded.computed.follower_reach), bits(&profile.computed.follower_reach));
        }

        #[test]
        fn canonical_timestamps_convert_both_ways_as_chrono_does(millis in 0u64..253_402_300_800_000) {
            let text = canonical_text(millis).unwrap();
            prop_assert_eq!(canonical_millis(&text), Some(millis));
            let chrono = chrono::DateTime::from_timestamp_millis(millis as i64)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            prop_assert_eq!(text.as_str(), chrono.as_str());
        }

        #[test]
        fn only_valid_canonical_dates_are_packed_as_numbers(
            fields in (1900u32..10000, 0u32..14, 0u32..33, 0u32..26, 0u32..62, 0u32..62, 0u32..1000)
        ) {
            let (year, month, day, hour, minute, second, millis) = fields;
            let text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z");
            let chrono = chrono::NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.3fZ")
                .ok()
                .filter(|_| year >= 1970 && second < 60)
                .map(|time| time.and_utc().timestamp_millis() as u64);
            prop_assert_eq!(canonical_millis(&text), chrono);
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut reader = PackReader::new(&bytes);
            let _ = unpack_profile(&mut reader).and_then(|_| reader.finish());
        }
    }
}
