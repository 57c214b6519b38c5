//! Synthetic touchpoints with ground truth, and the accuracy figures that compare a
//! resolution against that truth.
//!
//! [`generate`] writes a deterministic stream of events across the five sources (web, mobile,
//! transaction, community, listening) for a population of made-up customers, in the canonical
//! envelope and in Segment Spec, with the hard cases a real feed has: several emails, phones
//! and devices per customer, anonymous cookies that log in later, typos and nicknames, moved
//! addresses, shared in-store tablets and call-centre phones, junk values and malformed lines.
//! [`Noise::Hard`] adds the corruption of silo'ed, hand-typed and scanned sources (keyboard
//! and OCR typos, phonetic spellings, missing and swapped fields, day and month swapped,
//! mistyped dates, emails and phone numbers) on top. It also writes which customer each event
//! really belongs to. [`evaluate`] turns that truth
//! and a resolution's `(event_id, customer_id)` pairs into pairwise and B-cubed precision and
//! recall.
//!
//! This crate knows nothing about how idgraph resolves: it must not, or the figures would
//! measure the generator against itself. It does no I/O beyond the writers it is handed.

mod eval;
mod generate;
mod noise;
mod people;

pub use eval::{evaluate, Accuracy};
pub use generate::{generate, GenConfig, GenSummary, TruthRecord};
pub use noise::Noise;
