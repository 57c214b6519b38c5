//! Why an input message could not become an event.

use serde::{Deserialize, Serialize};

/// The class of a dead-lettered message; also the `failure_kind` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    InvalidUtf8,
    InvalidJson,
    EmptyPayload,
    WrongType,
    MissingField,
    InvalidTimestamp,
    TooLarge,
    /// An output record the producer or the broker refused for good (too large for the
    /// broker, an invalid topic): its reference goes to the dead-letter topic instead.
    Undeliverable,
}

impl FailureKind {
    pub const ALL: [FailureKind; 8] = [
        FailureKind::InvalidUtf8,
        FailureKind::InvalidJson,
        FailureKind::EmptyPayload,
        FailureKind::WrongType,
        FailureKind::MissingField,
        FailureKind::InvalidTimestamp,
        FailureKind::TooLarge,
        FailureKind::Undeliverable,
    ];

    /// The stable snake_case name used in records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::InvalidUtf8 => "invalid_utf8",
            FailureKind::InvalidJson => "invalid_json",
            FailureKind::EmptyPayload => "empty_payload",
            FailureKind::WrongType => "wrong_type",
            FailureKind::MissingField => "missing_field",
            FailureKind::InvalidTimestamp => "invalid_timestamp",
            FailureKind::TooLarge => "too_large",
            FailureKind::Undeliverable => "undeliverable",
        }
    }
}

/// A message that is bad data: it goes to the dead-letter output, it is never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    pub kind: FailureKind,
    /// A readable reason that names the offending field or value.
    pub reason: String,
    /// The offending field, when one field is to blame.
    pub field: Option<String>,
}

impl ParseError {
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> Self {
        ParseError {
            kind,
            reason: reason.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }
}
