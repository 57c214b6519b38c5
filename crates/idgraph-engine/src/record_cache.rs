//! Profile records collected over a checkpoint interval, at most one per customer (the record
//! cache of Kafka Streams).
//!
//! A profile touched by several batches of one interval is emitted once, in its state at the
//! end of the interval and with the metadata of the last event that touched it: exactly the
//! record that batch-by-batch emission would have made last. The cache holds no profile
//! state, only which records to make: the states come with the checkpoint (see
//! [`crate::StateCache::pin_customers`] for why nothing else may hold them). Downstream consumers that keep
//! the last record per customer see the same table; they see fewer intermediate versions.

use std::sync::Arc;

use idgraph_model::{ProfileJson, ProfileRecord, RecordMeta, SCHEMA_VERSION};
use rustc_hash::FxHashMap;

use crate::state::ProfileState;

/// The profile records of one batch, not yet encoded (see [`crate::ResolvedBatch::split`]).
#[derive(Debug, Default)]
pub struct ProfileUpdates {
    /// Records of ids absorbed by the batch's merges, in the order they were absorbed.
    pub tombstones: Vec<ProfileRecord>,
    /// Live profiles the batch touched, in first-touch order, with their records' metadata.
    pub live: Vec<(String, RecordMeta)>,
}

#[derive(Debug)]
enum Pending {
    Live(RecordMeta),
    Tombstone(ProfileRecord),
}

/// A live record whose profile state the checkpoint does not hold: a caller's bug.
#[derive(Debug, thiserror::Error)]
#[error("the checkpoint holds no state for profile {0}, which has a record to emit")]
pub struct MissingProfile(pub String);

/// The newest record per customer since the cache was last emptied, in first-touch order.
#[derive(Debug, Default)]
pub struct ProfileRecordCache {
    records: Vec<(String, Pending)>,
    positions: FxHashMap<String, usize>,
}

impl ProfileRecordCache {
    /// Takes in a later batch's records; each replaces the one its customer already has.
    pub fn absorb(&mut self, updates: ProfileUpdates) {
        for tombstone in updates.tombstones {
            let id = tombstone.customer_id.clone();
            self.upsert(id, Pending::Tombstone(tombstone));
        }
        for (id, meta) in updates.live {
            self.upsert(id, Pending::Live(meta));
        }
    }

    fn upsert(&mut self, id: String, record: Pending) {
        match self.positions.get(&id) {
            Some(&position) => self.records[position].1 = record,
            None => {
                self.positions.insert(id.clone(), self.records.len());
                self.records.push((id, record));
            }
        }
    }

    /// How many records the cache holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Encodes and hands out every record, leaving the cache empty; `state` gives each live
    /// profile's state at the end of the interval.
    pub fn take_records<'s>(
        &mut self,
        state: impl Fn(&str) -> Option<&'s Arc<ProfileState>>,
    ) -> Result<Vec<ProfileRecord>, MissingProfile> {
        self.positions.clear();
        self.records
            .drain(..)
            .map(|(id, record)| match record {
                Pending::Tombstone(tombstone) => Ok(tombstone),
                Pending::Live(meta) => match state(&id) {
                    Some(state) => Ok(live_record(id, state, meta)),
                    None => Err(MissingProfile(id)),
                },
            })
            .collect()
    }
}

/// The output record of a live profile.
pub(crate) fn live_record(id: String, state: &ProfileState, meta: RecordMeta) -> ProfileRecord {
    ProfileRecord {
        schema_version: SCHEMA_VERSION,
        customer_id: id,
        profile: Some(ProfileJson::encode(&state.profile)),
        merged_into: None,
        meta,
    }
}
