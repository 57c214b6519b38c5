//! Duplicate events within an event-time window (docs/formats.md §4) and the expiry of per-event records:
//! how a processed event is recorded in [`Table::Events`] and evidence in
//! [`Table::Evidence`] (each with its event time in front), and the clock that says which
//! records are still inside their window.
//!
//! The window is measured in event time, never wall-clock time, so that the same input in the
//! same order gives the same answers whenever it runs. "Now" is the [`EventClock`]: the
//! `CLOCK_RANK`-th latest event time seen so far, so that a handful of events with clocks far
//! in the future cannot close the window for everything else. A record older than the clock
//! minus the window no longer makes an event a duplicate; the store may then drop it
//! (RocksDB does, in compaction), and because the clock only moves forward, dropping it
//! changes no answer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::store::{StateRead, StateStore, StoreError, Table};

/// The key of the event clock in [`Table::Meta`].
pub const EVENT_CLOCK_KEY: &[u8] = b"event_clock";

/// How many of the latest event times the clock keeps; the oldest of them is "now".
pub const CLOCK_RANK: usize = 100;

/// The first byte of a record that carries its event time. Records written before the window
/// existed (a bare customer id, which starts with a letter; MessagePack evidence, which starts
/// with a map marker) never expire.
const TIMED_RECORD: u8 = 0x01;

/// `[0x01][event time, 8 bytes big-endian][body]`.
pub fn timed(time_ms: i64, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(9 + body.len());
    bytes.push(TIMED_RECORD);
    bytes.extend_from_slice(&time_ms.to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// The body of a record written by [`timed`], or the whole of an older, untimed one.
pub fn untimed(bytes: &[u8]) -> &[u8] {
    match record_time_of(bytes) {
        Some(_) => &bytes[9..],
        None => bytes,
    }
}

/// A processed event's record: the customer it went to and, if known, its event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Milliseconds since the Unix epoch; `None` for records of older versions.
    pub time_ms: Option<i64>,
    pub customer_id: String,
}

impl EventRecord {
    /// The customer id, [`timed`].
    pub fn encode(time_ms: i64, customer_id: &str) -> Vec<u8> {
        timed(time_ms, customer_id.as_bytes())
    }

    pub fn decode(bytes: &[u8]) -> Self {
        EventRecord {
            time_ms: record_time_of(bytes),
            customer_id: String::from_utf8_lossy(untimed(bytes)).into_owned(),
        }
    }

    /// Whether the record still makes an event with the same key a duplicate.
    pub fn within(&self, horizon_ms: Option<i64>) -> bool {
        match (self.time_ms, horizon_ms) {
            (Some(time), Some(horizon)) => time >= horizon,
            _ => true,
        }
    }
}

/// The event time of a stored record, read without decoding the rest (for a compaction
/// filter); `None` for records without one.
pub fn record_time_of(bytes: &[u8]) -> Option<i64> {
    if bytes.len() < 9 || bytes[0] != TIMED_RECORD {
        return None;
    }
    Some(i64::from_be_bytes(bytes[1..9].try_into().ok()?))
}

/// The latest [`CLOCK_RANK`] event times seen, oldest on top.
#[derive(Debug, Clone, Default)]
pub struct EventClock {
    latest: BinaryHeap<Reverse<i64>>,
}

impl PartialEq for EventClock {
    fn eq(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }
}

impl EventClock {
    /// The clock as the store holds it; a new one if it holds none.
    pub fn load(store: &impl StateRead) -> Result<Self, StoreError> {
        let Some(bytes) = store.get(Table::Meta, EVENT_CLOCK_KEY)? else {
            return Ok(EventClock::default());
        };
        if bytes.len() % 8 != 0 || bytes.len() / 8 > CLOCK_RANK {
            return Err(StoreError::Corrupt {
                table: Table::Meta.name(),
                key: "event_clock".into(),
                reason: format!("{} bytes is not a list of event times", bytes.len()),
            });
        }
        let latest = bytes
            .chunks_exact(8)
            .map(|t| Reverse(i64::from_be_bytes(t.try_into().expect("eight bytes"))))
            .collect();
        Ok(EventClock { latest })
    }

    /// The times in a fixed order, for [`Table::Meta`].
    pub fn encode(&self) -> Vec<u8> {
        let mut times: Vec<i64> = self.latest.iter().map(|t| t.0).collect();
        times.sort_unstable();
        times.iter().flat_map(|t| t.to_be_bytes()).collect()
    }

    /// Counts one more event.
    pub fn observe(&mut self, time_ms: i64) {
        if self.latest.len() < CLOCK_RANK {
            self.latest.push(Reverse(time_ms));
        } else if self.latest.peek().is_some_and(|oldest| time_ms > oldest.0) {
            self.latest.pop();
            self.latest.push(Reverse(time_ms));
        }
    }

    /// "Now" in event time: the oldest of the latest [`CLOCK_RANK`] times, once that many
    /// events were seen.
    pub fn now(&self) -> Option<i64> {
        (self.latest.len() == CLOCK_RANK).then(|| self.latest.peek().expect("full").0)
    }

    /// The oldest event time still inside a window of `window_ms` (none: everything is).
    pub fn horizon(&self, window_ms: Option<i64>) -> Option<i64> {
        Some(self.now()?.saturating_sub(window_ms?))
    }
}

/// How long per-event records are kept, in milliseconds of event time (`None`: for ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Event records: the duplicate window.
    pub events_ms: Option<i64>,
    pub evidence_ms: Option<i64>,
}

/// Tells `store` which event and evidence records have left their windows, by the event clock
/// of its committed state; callers do this after each committed write.
pub fn expire_old_records<S: StateStore>(
    store: &mut S,
    retention: Retention,
) -> Result<(), StoreError> {
    let clock = EventClock::load(&*store)?;
    for (table, window) in [
        (Table::Events, retention.events_ms),
        (Table::Evidence, retention.evidence_ms),
    ] {
        if let Some(horizon) = clock.horizon(window) {
            store.expire_before(table, horizon);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::{StateStore, WriteSet};

    #[test]
    fn records_read_back_and_older_ones_stay_readable() {
        let record = EventRecord::decode(&EventRecord::encode(-5, "cus_1"));
        assert_eq!(
            (record.time_ms, record.customer_id.as_str()),
            (Some(-5), "cus_1")
        );
        let legacy = EventRecord::decode(b"cus_2");
        assert_eq!(
            (legacy.time_ms, legacy.customer_id.as_str()),
            (None, "cus_2")
        );
        assert!(
            legacy.within(Some(i64::MAX)),
            "untimed records never expire"
        );
        assert!(record.within(Some(-5)) && !record.within(Some(-4)));
        assert!(record.within(None));
    }

    #[test]
    fn a_few_far_future_times_do_not_move_the_clock() {
        let mut clock = EventClock::default();
        for t in 0..200 {
            clock.observe(t);
        }
        assert_eq!(clock.now(), Some(100));
        for _ in 0..(CLOCK_RANK - 1) {
            clock.observe(i64::MAX / 2);
        }
        assert_eq!(
            clock.now(),
            Some(199),
            "99 outliers leave now at the 100th latest"
        );
        assert_eq!(clock.horizon(Some(50)), Some(149));
        assert_eq!(clock.horizon(None), None);
    }

    #[test]
    fn the_clock_needs_a_hundred_events_and_survives_the_store() {
        let mut clock = EventClock::default();
        for t in 0..99 {
            clock.observe(t * 7);
        }
        assert_eq!(clock.now(), None);
        clock.observe(10_000);
        assert_eq!(clock.now(), Some(0));
        let mut store = MemoryStore::default();
        let mut writes = WriteSet::default();
        writes.put(Table::Meta, EVENT_CLOCK_KEY, clock.encode());
        store.write(&writes).unwrap();
        assert_eq!(EventClock::load(&store).unwrap(), clock);
        assert_eq!(
            EventClock::load(&MemoryStore::default()).unwrap(),
            EventClock::default()
        );
    }
}
