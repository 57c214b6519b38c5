//! The resolution engine: input messages in, state mutations and output records out.

mod fuzzy;
mod guards;
mod merge;
mod primary;

use std::sync::Arc;

use chrono::SecondsFormat;
use idgraph_model::{
    parse_event, parse_mapped, ChangeKind, CompactString, DeadLetter, EnrichedEvent, FailureKind,
    Identifier, IdentityChange, InputCoordinates, LinkRule, NormalizedEvent, Normalizer,
    ParseError, ProfileRecord, RecordMeta, RefusalRule, RefusedMerge, Resolution, ResolutionAction,
    SortedMap, SCHEMA_VERSION,
};
use rustc_hash::FxHashMap;
use xxhash_rust::xxh3::xxh3_128;

use crate::batch::Batch;
use crate::cache::StateCache;
use crate::config::{ConfigProblem, EngineConfig};
use crate::matching::{MatchModel, MatchScore};
use crate::profile::apply_event;
use crate::record_cache::{live_record, ProfileUpdates};
use crate::state::{
    encode_live, event_key, Evidence, EvidenceLink, NodeRecord, ProfileState, StampedEvidence,
};
use crate::stats::{bump, BatchStats};
use crate::store::{StateRead, StateStore, StoreError, Table, WriteSet};

/// One input message and where it came from.
#[derive(Debug, Clone, Copy)]
pub struct InputMessage<'a> {
    pub coordinates: &'a InputCoordinates,
    pub payload: &'a [u8],
    /// The source of messages that do not name one (e.g. the topic's source).
    pub default_source: &'a str,
}

impl<'a> InputMessage<'a> {
    /// Pairs each payload with its coordinates, all with one default source.
    pub fn batch(
        payloads: &'a [Vec<u8>],
        coordinates: &'a [InputCoordinates],
        default_source: &'a str,
    ) -> Vec<InputMessage<'a>> {
        payloads
            .iter()
            .zip(coordinates)
            .map(|(payload, coordinates)| InputMessage {
                coordinates,
                payload,
                default_source,
            })
            .collect()
    }
}

/// A message after [`Engine::prepare`]: parsed and normalized, or turned into its dead letter.
#[derive(Debug, Clone)]
pub struct PreparedMessage {
    pub coordinates: InputCoordinates,
    pub content: Prepared,
}

/// What preparing a message gave.
#[derive(Debug, Clone)]
pub enum Prepared {
    Event(Box<PreparedEvent>),
    DeadLetter(Box<DeadLetter>),
}

/// A normalized event with everything that can be derived from it alone, so that this work
/// is done wherever [`Engine::prepare`] runs rather than while resolving.
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    pub event: NormalizedEvent,
    /// The event time as outputs write it (RFC 3339, milliseconds, UTC).
    pub timestamp: CompactString,
    /// The metadata of the event's enriched record.
    enriched_meta: RecordMeta,
    /// The event's key in [`Table::Events`] (replay protection).
    event_key: String,
    /// The graph node key of each of the event's identifiers, in the same order.
    node_keys: Vec<String>,
}

impl PreparedEvent {
    fn new(event: NormalizedEvent, coordinates: &InputCoordinates) -> Self {
        let timestamp = event
            .raw
            .time()
            .to_rfc3339_opts(SecondsFormat::Millis, true)
            .into();
        let event_key = event_key(&event.raw.source, &event.raw.event_id);
        let node_keys = event.identifiers.iter().map(Identifier::node_key).collect();
        PreparedEvent {
            event,
            timestamp,
            enriched_meta: meta(coordinates, &["enriched"], 0),
            event_key,
            node_keys,
        }
    }
}

/// Everything a batch produced. The caller writes `writes` atomically, then emits the records.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    pub writes: WriteSet,
    pub enriched: Vec<EnrichedEvent>,
    pub profiles: Vec<ProfileRecord>,
    pub changes: Vec<IdentityChange>,
    pub dead_letters: Vec<DeadLetter>,
    pub stats: BatchStats,
}

/// A resolved batch whose changed profiles are not encoded yet.
///
/// Encoding a profile (its JSON for the output record, which the state record embeds) is a
/// large share of a batch's work and needs no state, so [`Engine::resolve_prepared`] leaves it
/// here: the caller may absorb the statistics, hand the write set to a
/// committer and start on the next batch (reading through [`ResolvedBatch::profiles`] with
/// [`crate::PendingWrites::with_profiles`]) while another thread encodes this one.
#[derive(Debug)]
pub struct ResolvedBatch {
    /// Every record and state change except the changed profiles': `writes` lacks their
    /// state records and `profiles` holds only the tombstones of absorbed ids.
    pub outcome: BatchOutcome,
    /// Profiles the batch touched that are still live, in first-touch order, with the
    /// metadata of their output records.
    profile_records: Vec<(String, Arc<ProfileState>, RecordMeta)>,
    /// Live profiles whose state changed, sorted by id.
    profile_writes: Vec<(String, Arc<ProfileState>)>,
}

impl ResolvedBatch {
    /// The changed live profiles as they will be stored, by id.
    pub fn profiles(&self) -> impl Iterator<Item = (&str, &Arc<ProfileState>)> {
        self.profile_writes
            .iter()
            .map(|(id, state)| (id.as_str(), state))
    }

    /// Encodes the changed profiles: their output records go after the tombstones in the
    /// returned outcome, and their state records into the returned write set, which must be
    /// committed atomically with the outcome's (see [`StateStore::write_parts`]).
    ///
    /// [`StateStore::write_parts`]: crate::StateStore::write_parts
    pub fn encode_profiles(self) -> (BatchOutcome, WriteSet) {
        let ResolvedBatch {
            mut outcome,
            profile_records,
            profile_writes,
        } = self;
        push_live_records(&mut outcome, profile_records);
        let mut writes = WriteSet::default();
        writes.ops.reserve(profile_writes.len());
        for (id, state) in profile_writes {
            writes.put(Table::Customers, id, encode_live(&state));
        }
        (outcome, writes)
    }

    /// The outcome without any profile record, and which profile records to make, for a
    /// [`ProfileRecordCache`] that emits them once per checkpoint. Drops the batch's hold on
    /// the profiles' states: a caller that writes state behind first pins their ids in the
    /// [`StateCache`] ([`ResolvedBatch::profile_ids`]) and takes the states from there at the
    /// checkpoint.
    ///
    /// [`ProfileRecordCache`]: crate::ProfileRecordCache
    pub fn split(self) -> (BatchOutcome, ProfileUpdates) {
        let ResolvedBatch {
            mut outcome,
            profile_records,
            ..
        } = self;
        let updates = ProfileUpdates {
            tombstones: std::mem::take(&mut outcome.profiles),
            live: profile_records
                .into_iter()
                .map(|(id, _, meta)| (id, meta))
                .collect(),
        };
        (outcome, updates)
    }

    /// Every live profile the batch changed or has a record for.
    pub fn profile_ids(&self) -> impl Iterator<Item = &str> {
        let changed = self.profile_writes.iter().map(|(id, _)| id.as_str());
        let recorded = self.profile_records.iter().map(|(id, _, _)| id.as_str());
        changed.chain(recorded)
    }

    /// The whole outcome with its profile records, for a caller that writes state behind
    /// but sends every batch's profile records: the changed profiles' state records are not
    /// made here. Pin their ids in the [`StateCache`] first ([`ResolvedBatch::profile_ids`]);
    /// [`crate::PendingWrites::close`] takes their states at the checkpoint.
    pub fn outcome_with_profile_records(self) -> BatchOutcome {
        let ResolvedBatch {
            mut outcome,
            profile_records,
            ..
        } = self;
        push_live_records(&mut outcome, profile_records);
        outcome
    }

    /// The whole outcome, with the profiles' state records appended to its write set.
    pub fn finish(self) -> BatchOutcome {
        let (mut outcome, profile_writes) = self.encode_profiles();
        outcome.writes.ops.extend(profile_writes.ops);
        outcome
    }
}

/// Appends the live profiles' output records, after the tombstones already in `outcome`.
fn push_live_records(
    outcome: &mut BatchOutcome,
    profile_records: Vec<(String, Arc<ProfileState>, RecordMeta)>,
) {
    outcome.profiles.reserve(profile_records.len());
    for (id, state, meta) in profile_records {
        outcome.profiles.push(live_record(id, &state, meta));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid engine configuration: {0}")]
    Config(#[from] ConfigProblem),
    #[error("invalid engine configuration: {0}")]
    Normalize(#[from] idgraph_model::normalize::NormalizeConfigError),
}

/// The identity-resolution engine. It holds configuration only; all state is passed in.
#[derive(Debug, Clone)]
pub struct Engine {
    config: EngineConfig,
    model: MatchModel,
    normalizer: Normalizer,
    priority: FxHashMap<String, usize>,
    /// The identifier kinds the match model compares: all that candidates' match features
    /// keep of their identifiers.
    compared_kinds: Vec<CompactString>,
    processor_version: String,
}

/// Profiles that an event's known identifiers point at, with the identifiers that link them.
struct Group {
    customer_id: String,
    linking: Vec<Identifier>,
}

/// Per-event output being assembled.
struct EventContext<'e> {
    event: &'e NormalizedEvent,
    timestamp: CompactString,
    /// The event time in milliseconds: evidence is stamped with it, so that it can expire.
    time_ms: i64,
    changes: Vec<ChangeKind>,
    changes_customer: Vec<String>,
    refused: Vec<RefusedMerge>,
    merged_ids: Vec<String>,
    /// Profiles besides the one joined that the event matched above the threshold: merged
    /// (bridged) once the event is applied.
    also_matched: Vec<fuzzy::Candidate>,
}

impl EventContext<'_> {
    fn change(&mut self, customer_id: &str, change: ChangeKind) {
        self.changes.push(change);
        self.changes_customer.push(customer_id.to_owned());
    }

    /// Records a refused merge (or refused identifier) in the event, the change feed and stats.
    fn refuse(
        &mut self,
        customer_id: &str,
        rule: RefusalRule,
        other_customer_id: Option<String>,
        kind: Option<CompactString>,
        linking_kind: &str,
        stats: &mut BatchStats,
    ) {
        bump(&mut stats.merges_refused, rule.as_str());
        self.refused.push(RefusedMerge {
            rule,
            other_customer_id: other_customer_id.clone(),
            kind: kind.clone(),
        });
        self.change(
            customer_id,
            ChangeKind::MergeRefused {
                rule,
                other_customer_id,
                kind,
                linking_kind: linking_kind.into(),
            },
        );
    }

    fn evidence(&self, link: EvidenceLink) -> StampedEvidence {
        StampedEvidence {
            time_ms: self.time_ms,
            evidence: Evidence {
                event_id: self.event.raw.event_id.clone(),
                source: self.event.raw.source.clone(),
                at: self.timestamp.clone(),
                link,
            },
        }
    }
}

impl Engine {
    pub fn new(config: EngineConfig, processor_version: &str) -> Result<Self, EngineError> {
        config.validate()?;
        let normalizer = Normalizer::new(config.normalize.clone())?;
        let priority = config
            .identifiers
            .priority
            .iter()
            .enumerate()
            .map(|(rank, kind)| (kind.clone(), rank))
            .collect();
        let model = MatchModel::new(&config.fuzzy, &config.protection);
        Ok(Engine {
            compared_kinds: model.identifier_kinds(),
            model,
            config,
            normalizer,
            priority,
            processor_version: processor_version.to_owned(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    /// Tells `store` which event and evidence records have left their windows
    /// (`engine.duplicates`, `engine.retention`), by the event clock of its committed state;
    /// call it after each committed write.
    pub fn expire_old_records<S: StateStore>(&self, store: &mut S) -> Result<(), StoreError> {
        crate::duplicates::expire_old_records(store, self.config.retention())
    }

    /// The version dead letters name as their processor.
    pub fn processor_version(&self) -> &str {
        &self.processor_version
    }

    /// Resolves a batch of messages against `store` without changing it. The outcome's write
    /// set holds every state change and the new input positions.
    pub fn process_batch<S: StateRead>(
        &self,
        store: &S,
        messages: &[InputMessage<'_>],
    ) -> Result<BatchOutcome, EngineError> {
        self.process_batch_cached(store, &mut StateCache::new(0), messages)
    }

    /// [`Engine::process_batch`] that takes decoded records from `cache` before reading the
    /// store and leaves what the batch read and wrote there. The cache then runs ahead of the
    /// store until `writes` is committed: if this fails, or the commit does, clear the cache
    /// before resolving anything else.
    pub fn process_batch_cached<S: StateRead>(
        &self,
        store: &S,
        cache: &mut StateCache,
        messages: &[InputMessage<'_>],
    ) -> Result<BatchOutcome, EngineError> {
        let prepared = messages
            .iter()
            .map(|message| self.prepare(message))
            .collect();
        self.process_prepared_cached(store, cache, prepared)
    }

    /// Parses and normalizes one message: the part of processing that needs no state, so a
    /// caller may run it ahead of resolution, on another thread. A message that cannot be
    /// read becomes its dead letter here.
    pub fn prepare(&self, message: &InputMessage<'_>) -> PreparedMessage {
        let parsed = if message.payload.len() > self.config.dead_letter.max_message_bytes {
            Err(ParseError::new(
                FailureKind::TooLarge,
                format!(
                    "payload is {} bytes, more than engine.dead_letter.max_message_bytes = {}",
                    message.payload.len(),
                    self.config.dead_letter.max_message_bytes
                ),
            ))
        } else if let Some(mapping) = self.config.mappings.get(message.default_source) {
            parse_mapped(message.payload, mapping, message.default_source)
        } else {
            parse_event(message.payload, message.default_source)
        };
        let content = match parsed {
            Ok(raw) => Prepared::Event(Box::new(PreparedEvent::new(
                self.normalizer.normalize(raw),
                message.coordinates,
            ))),
            Err(error) => Prepared::DeadLetter(Box::new(DeadLetter::new(
                &error,
                message.payload,
                self.config.dead_letter.max_payload_bytes,
                &self.processor_version,
                meta(message.coordinates, &["dead_letter"], 0),
            ))),
        };
        PreparedMessage {
            coordinates: message.coordinates.clone(),
            content,
        }
    }

    /// Resolves messages made by [`Engine::prepare`], in order; otherwise the same as
    /// [`Engine::process_batch_cached`], with byte-identical results.
    pub fn process_prepared_cached<S: StateRead>(
        &self,
        store: &S,
        cache: &mut StateCache,
        messages: Vec<PreparedMessage>,
    ) -> Result<BatchOutcome, EngineError> {
        Ok(self.resolve_prepared(store, cache, messages)?.finish())
    }

    /// [`Engine::process_prepared_cached`] up to, not including, encoding the profiles that
    /// changed: their output records and state records are made by [`ResolvedBatch::finish`]
    /// or [`ResolvedBatch::encode_profiles`], which need no state, so a caller may run them on
    /// another thread while it resolves the next batch.
    pub fn resolve_prepared<S: StateRead>(
        &self,
        store: &S,
        cache: &mut StateCache,
        messages: Vec<PreparedMessage>,
    ) -> Result<ResolvedBatch, EngineError> {
        let mut batch = Batch::new(store, cache, messages.len());
        prefetch(&mut batch, &messages)?;
        let mut outcome = BatchOutcome::default();
        // One enriched event per message and typically one or two changes: sized up front,
        // these vectors of large records are not copied again as they grow.
        outcome.enriched.reserve(messages.len());
        outcome.changes.reserve(messages.len() * 2);
        // Profiles touched by the batch, in first-touch order, with the last input to touch them.
        let mut touched: Vec<String> = Vec::with_capacity(messages.len());
        let mut last_touch: FxHashMap<String, InputCoordinates> =
            FxHashMap::with_capacity_and_hasher(messages.len(), Default::default());
        let mut tombstones: Vec<(String, String, InputCoordinates)> = Vec::new();
        for message in messages {
            let coordinates = &message.coordinates;
            batch.set_position(coordinates);
            let prepared = match message.content {
                Prepared::Event(prepared) => *prepared,
                Prepared::DeadLetter(dead_letter) => {
                    bump(
                        &mut outcome.stats.dead_letters,
                        dead_letter.failure_kind.as_str(),
                    );
                    outcome.dead_letters.push(*dead_letter);
                    continue;
                }
            };
            let result = self.resolve(&mut batch, prepared, coordinates, &mut outcome)?;
            for id in result.touched {
                if !last_touch.contains_key(&id) {
                    touched.push(id.clone());
                }
                last_touch.insert(id, message.coordinates.clone());
            }
            for (absorbed, survivor) in result.absorbed {
                tombstones.push((absorbed, survivor, message.coordinates.clone()));
            }
        }
        for (absorbed, survivor, coordinates) in tombstones {
            outcome.profiles.push(ProfileRecord {
                schema_version: SCHEMA_VERSION,
                customer_id: absorbed.clone(),
                profile: None,
                merged_into: Some(survivor),
                meta: meta(&coordinates, &["profile-tombstone:", &absorbed], 0),
            });
        }
        let mut profile_records = Vec::with_capacity(touched.len());
        for id in touched {
            // A profile absorbed later in the batch has no live record any more.
            let Some(live) = batch.resolve_id(&id)? else {
                continue;
            };
            if live != id {
                continue;
            }
            let state = batch.profile(&id)?;
            outcome
                .stats
                .profile_sizes
                .push(state.profile.identifiers.len() as u32);
            outcome
                .stats
                .profile_event_counts
                .push(state.profile.computed.event_count);
            let meta = meta(&last_touch[&id], &["profile:", &id], 0);
            profile_records.push((id, state, meta));
        }
        let (writes, profile_writes) = batch.finish();
        outcome.writes = writes;
        Ok(ResolvedBatch {
            outcome,
            profile_records,
            profile_writes,
        })
    }

    fn rank(&self, kind: &str) -> usize {
        self.priority
            .get(kind)
            .copied()
            .unwrap_or(self.priority.len())
    }

    fn is_weak(&self, kind: &str) -> bool {
        self.config.identifiers.weak_kinds.iter().any(|k| k == kind)
    }

    fn kind_limit(&self, kind: &str) -> usize {
        self.config
            .identifiers
            .max_per_profile
            .get(kind)
            .copied()
            .unwrap_or(self.config.identifiers.default_max_per_profile) as usize
    }

    /// Orders identifiers strongest first, then by kind and value.
    fn sort_by_priority(&self, identifiers: &mut [Identifier]) {
        identifiers.sort_by(|a, b| (self.rank(&a.kind), a).cmp(&(self.rank(&b.kind), b)));
    }

    fn resolve<S: StateRead>(
        &self,
        batch: &mut Batch<'_, S>,
        prepared: PreparedEvent,
        coordinates: &InputCoordinates,
        outcome: &mut BatchOutcome,
    ) -> Result<ResolveResult, EngineError> {
        let PreparedEvent {
            event: owned_event,
            timestamp,
            enriched_meta,
            event_key: key,
            node_keys,
        } = prepared;
        let event = &owned_event;
        let raw = &event.raw;
        record_quality(&mut outcome.stats, event);
        let time_ms = raw.time().timestamp_millis();
        let mut ctx = EventContext {
            event,
            timestamp,
            time_ms,
            changes: Vec::new(),
            changes_customer: Vec::new(),
            refused: Vec::new(),
            merged_ids: Vec::new(),
            also_matched: Vec::new(),
        };
        // Only events that are not duplicates move the clock, so replaying a batch changes
        // no state.
        let horizon = batch.event_horizon(self.config.duplicates.window_ms());
        let earlier = batch
            .earlier_event(&key)?
            .filter(|record| record.within(horizon));
        if let Some(earlier) = earlier {
            let previous = earlier.customer_id;
            let customer_id = batch.resolve_id(&previous)?.unwrap_or(previous);
            bump(
                &mut outcome.stats.actions,
                ResolutionAction::Duplicate.as_str(),
            );
            let resolution = resolution(ResolutionAction::Duplicate, LinkRule::SameEvent);
            let timestamp = ctx.timestamp;
            outcome.enriched.push(enriched(
                owned_event,
                timestamp,
                customer_id,
                resolution,
                enriched_meta,
            ));
            return Ok(ResolveResult::default());
        }

        let (groups, new_identifiers) =
            self.lookup_identifiers(batch, event, &node_keys, &mut outcome.stats)?;
        let mut touched = Vec::new();
        let (mut primary, action, rule) =
            self.choose_primary(batch, &mut ctx, &groups, &new_identifiers, outcome)?;
        touched.push(primary.clone());
        let primary_link = groups
            .iter()
            .find(|g| g.customer_id == primary)
            .and_then(|g| g.linking.first().cloned());

        // New identifiers join first, so that merge checks see the profile as it will be.
        let attach_rule = match &rule {
            LinkRule::Fuzzy { .. } => rule.clone(),
            _ => LinkRule::CoOccurrence,
        };
        self.attach_new_identifiers(
            batch,
            &mut ctx,
            &primary,
            &new_identifiers,
            primary_link.as_ref(),
            attach_rule,
            &mut outcome.stats,
        )?;

        for group in &groups {
            // A profile already refused for this event (conflicting traits) is not asked again.
            let already_refused = ctx
                .refused
                .iter()
                .any(|r| r.other_customer_id.as_deref() == Some(group.customer_id.as_str()));
            if already_refused
                || group.customer_id == primary
                || batch.resolve_id(&group.customer_id)?.as_deref() == Some(primary.as_str())
            {
                continue;
            }
            let link_rule = LinkRule::SharedIdentifier {
                kind: group.linking[0].kind.clone(),
                value: group.linking[0].value.clone(),
            };
            let via = primary_link
                .clone()
                .or_else(|| new_identifiers.first().cloned());
            primary = self.merge_or_refuse(
                batch,
                &mut ctx,
                &primary,
                group,
                via,
                link_rule,
                &mut outcome.stats,
            )?;
        }

        let history_len = self.config.fuzzy.trait_history;
        let state = batch.profile_mut(&primary)?;
        apply_event(state, event, &ctx.timestamp, history_len);
        let new_keys = self.add_to_blocks(batch, &primary, event)?;
        // Profiles of the same person must not stay apart because of the order their records
        // came in: an event that matched several profiles bridges them, and a profile that
        // gained values through an identifier looks for the ones it now matches under the
        // blocking keys those values gave it.
        if !ctx.also_matched.is_empty() {
            let matched = std::mem::take(&mut ctx.also_matched);
            primary = self.bridge(batch, &mut ctx, primary, matched, &mut outcome.stats)?;
        } else if self.config.fuzzy.enabled
            && action != ResolutionAction::New
            && !new_keys.is_empty()
        {
            let found = self.search_from_profile(batch, &primary, &new_keys, &mut outcome.stats)?;
            primary = self.bridge(batch, &mut ctx, primary, found, &mut outcome.stats)?;
        }
        batch.record_event(key, time_ms, &primary);
        batch.observe_event_time(time_ms);
        if matches!(rule, LinkRule::Fuzzy { .. })
            && new_identifiers.is_empty()
            && action == ResolutionAction::Matched
        {
            batch.add_evidence(
                &primary,
                ctx.evidence(EvidenceLink::EventLinked { rule: rule.clone() }),
            )?;
        }

        let action = if action == ResolutionAction::Matched && !ctx.merged_ids.is_empty() {
            ResolutionAction::Merged
        } else {
            action
        };
        bump(&mut outcome.stats.actions, action.as_str());
        if action != ResolutionAction::New {
            bump(&mut outcome.stats.matched_by_source, &raw.source);
        }
        let mut resolution = resolution(action, rule);
        resolution.merged_ids = std::mem::take(&mut ctx.merged_ids);
        resolution.refused = std::mem::take(&mut ctx.refused);
        let absorbed: Vec<(String, String)> = resolution
            .merged_ids
            .iter()
            .map(|id| (id.clone(), primary.clone()))
            .collect();
        for (ordinal, (change, customer_id)) in ctx
            .changes
            .drain(..)
            .zip(ctx.changes_customer.drain(..))
            .enumerate()
        {
            let customer_id = batch.resolve_id(&customer_id)?.unwrap_or(customer_id);
            outcome.changes.push(IdentityChange {
                schema_version: SCHEMA_VERSION,
                customer_id,
                event_id: raw.event_id.clone(),
                source: raw.source.clone(),
                at: ctx.timestamp.clone(),
                meta: meta(coordinates, &["change:", change.type_name()], ordinal),
                change,
            });
        }
        // The event is not read again: its values move into the enriched record.
        let timestamp = ctx.timestamp;
        outcome.enriched.push(enriched(
            owned_event,
            timestamp,
            primary.clone(),
            resolution,
            enriched_meta,
        ));
        // A merge may leave the event on the other profile's id (the older one survives): the
        // survivor changed too and needs its profile record.
        if !touched.contains(&primary) {
            touched.push(primary);
        }
        Ok(ResolveResult { touched, absorbed })
    }
}

/// Reads the stored records of every event of a batch in one go (see [`Batch::prefetch`])
/// before its events are resolved one by one.
fn prefetch<S: StateRead>(
    batch: &mut Batch<'_, S>,
    messages: &[PreparedMessage],
) -> Result<(), StoreError> {
    let event_keys: Vec<&str> = messages
        .iter()
        .filter_map(|message| match &message.content {
            Prepared::Event(prepared) => Some(prepared.event_key.as_str()),
            Prepared::DeadLetter(_) => None,
        })
        .collect();
    batch.prefetch(&event_keys)
}

/// The enriched record of an event: its prepared fields plus the resolution.
fn resolution(action: ResolutionAction, rule: LinkRule) -> Resolution {
    Resolution {
        action,
        rule,
        merged_ids: Vec::new(),
        refused: Vec::new(),
    }
}

/// The enriched record of a resolved event, made by moving the event's values rather than
/// copying them: the event is dropped right after.
fn enriched(
    event: NormalizedEvent,
    timestamp: CompactString,
    customer_id: String,
    resolution: Resolution,
    meta: RecordMeta,
) -> EnrichedEvent {
    let NormalizedEvent {
        raw,
        identifiers: normalized,
        traits,
        issues,
    } = event;
    let mut identifiers: SortedMap<CompactString, Vec<CompactString>> = SortedMap::new();
    for Identifier { kind, value } in normalized {
        identifiers.get_or_default(kind).push(value);
    }
    EnrichedEvent {
        schema_version: SCHEMA_VERSION,
        event_id: raw.event_id,
        customer_id,
        source: raw.source,
        event_type: raw.event_type,
        timestamp,
        identifiers,
        traits,
        properties: raw.properties,
        resolution,
        quality_issues: issues,
        meta,
    }
}

#[derive(Default)]
struct ResolveResult {
    touched: Vec<String>,
    absorbed: Vec<(String, String)>,
}

fn fuzzy_rule(matched: MatchScore) -> LinkRule {
    let matched = matched.with_similarities();
    LinkRule::Fuzzy {
        score: matched.total,
        fields: matched.fields,
    }
}

fn empty_node() -> NodeRecord {
    NodeRecord {
        parent: None,
        root: None,
        generic: false,
        conflicts: Vec::new(),
    }
}

fn record_quality(stats: &mut BatchStats, event: &NormalizedEvent) {
    let source = &event.raw.source;
    bump(&mut stats.events, source);
    if event.identifiers.is_empty() {
        bump(&mut stats.no_identifier_by_source, source);
    }
    for issue in &event.issues {
        if issue.kind == idgraph_model::IssueKind::WrongType {
            bump(&mut stats.wrong_type_fields, &issue.field);
            continue;
        }
        let (section, name) = issue.field.split_once('.').unwrap_or(("", &issue.field));
        let map = match (section, issue.kind) {
            ("traits", _) => &mut stats.invalid_traits,
            (_, idgraph_model::IssueKind::Invalid) => &mut stats.invalid_identifiers,
            (_, idgraph_model::IssueKind::Blocked | idgraph_model::IssueKind::WrongType) => {
                &mut stats.blocked_identifiers
            }
        };
        bump(map, name);
    }
    let present = match stats.trait_present.get_mut(source.as_str()) {
        Some(present) => present,
        None => stats
            .trait_present
            .entry(source.as_str().to_owned())
            .or_default(),
    };
    for name in event.traits.keys() {
        bump(present, name);
    }
}

/// The customer id of a profile created by an event: a hash of the event's source and id,
/// so it is the same on every replay and on every worker, with no counter to coordinate.
pub fn customer_id_for(source: &str, event_id: &str) -> String {
    let mut key = Vec::with_capacity(source.len() + 1 + event_id.len());
    key.extend_from_slice(source.as_bytes());
    key.push(0);
    key.extend_from_slice(event_id.as_bytes());
    let hash = xxh3_128(&key);
    let mut id = String::with_capacity(4 + 24);
    id.push_str("cus_");
    push_lower_hex(&mut id, hash >> 32, 24);
    id
}

/// Output metadata: the input coordinates and an idempotency key derived from them, the
/// output's kind and its ordinal, so a re-emitted record carries the same key.
/// `output` names the record; its parts are joined (e.g. `["profile:", id]`), so callers need
/// not format them into a string first.
fn meta(coordinates: &InputCoordinates, output: &[&str], ordinal: usize) -> RecordMeta {
    // The key hashes "<coordinates>\0<output>\0<ordinal>"; it is built by hand because every
    // output record needs one, and `format!` was a measurable share of resolving.
    let mut text = String::with_capacity(96);
    coordinates.write_display(&mut text);
    text.push('\0');
    for part in output {
        text.push_str(part);
    }
    text.push('\0');
    text.push_str(itoa::Buffer::new().format(ordinal));
    RecordMeta {
        input: coordinates.clone(),
        idempotency_key: lower_hex_128(xxh3_128(text.as_bytes())),
    }
}

/// `value` as 32 lower-case hex digits, as `format!("{value:032x}")` writes it.
fn lower_hex_128(value: u128) -> String {
    let mut text = String::with_capacity(32);
    push_lower_hex(&mut text, value, 32);
    text
}

/// Appends the low `digits` hex digits of `value`, zero-padded, as `format!("{value:0Nx}")`
/// would for a value that fits. Ids and idempotency keys are built on every event, where
/// `format!` and collecting chars were a measurable share of resolving.
fn push_lower_hex(out: &mut String, value: u128, digits: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buffer = [0u8; 32];
    for (index, byte) in buffer[..digits].iter_mut().enumerate() {
        let shift = (digits - 1 - index) * 4;
        *byte = DIGITS[((value >> shift) & 0xf) as usize];
    }
    // Every byte is an ASCII hex digit.
    out.push_str(std::str::from_utf8(&buffer[..digits]).expect("hex digits are ASCII"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_keep_their_published_form() {
        // Consumers drop duplicates by this key, so it must not change between versions.
        let coordinates = InputCoordinates::Kafka {
            topic: "events".into(),
            partition: 3,
            offset: 42,
        };
        let expected = xxh3_128("events/3@42\0profile:cus_1\x007".as_bytes());
        assert_eq!(
            meta(&coordinates, &["profile:", "cus_1"], 7).idempotency_key,
            format!("{expected:032x}")
        );
        for value in [0u128, 1, u128::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(lower_hex_128(value), format!("{value:032x}"));
        }
        // Customer ids are published and stored: their form must not change either.
        let hash = xxh3_128("web\0web-000123".as_bytes());
        assert_eq!(
            customer_id_for("web", "web-000123"),
            format!("cus_{:024x}", hash >> 32)
        );
    }
}
