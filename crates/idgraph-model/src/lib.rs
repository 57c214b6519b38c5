//! The data model of idgraph: the touchpoint event envelope and its parsers (canonical and
//! Segment Spec), normalization of identifiers and traits (docs/formats.md §2), and the output records
//! (enriched events, profiles, identity changes, dead letters) with their `schema_version`.
//!
//! This crate does no I/O and holds no state: it turns bytes into events and events into
//! normalized values. Resolution lives in `idgraph-engine`.

mod canonical;
pub mod error;
pub mod event;
pub mod json;
pub mod names;
pub mod normalize;
pub mod packed;
pub mod records;
pub mod sorted;

pub use error::{FailureKind, ParseError};
pub use event::{parse_event, parse_mapped, FieldMapping, RawEvent};
pub use json::WriteJson;
pub use normalize::{
    Identifier, IssueKind, NormalizeConfig, NormalizedEvent, Normalizer, QualityIssue,
};
pub use records::*;
pub use sorted::{SortedMap, SortedSet};
