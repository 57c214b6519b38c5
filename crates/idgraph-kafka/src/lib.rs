//! The Kafka edge of idgraph, and the only crate that links rdkafka: the streaming worker
//! (`idgraph run`) that consumes touchpoint topics, resolves them with the engine and produces
//! the five outputs of docs/formats.md §3; the development broker (librdkafka's mock cluster, which
//! speaks the real Kafka protocol over TCP); and small tools that load a JSON Lines file into
//! the source topics and read a topic back.
//!
//! It holds no resolution logic (that is `idgraph-engine`) and does not open RocksDB itself:
//! the worker is generic over the engine's `StateStore` and the binary hands it the RocksDB
//! store. Crash safety comes from checkpoints of that store and a log of each batch's input
//! offsets kept in it, which a restart resolves again: see [`worker`] and [`batch_log`].

pub mod batch_log;
pub mod broker;
pub mod client;
pub mod committer;
pub mod config;
pub mod error;
pub mod gauges;
pub mod latency;
pub mod metrics;
pub mod readiness;
mod rebalance;
pub mod sender;
pub mod sink;
pub mod tools;
pub mod topics;
pub mod worker;

pub use broker::DevBroker;
pub use config::KafkaConfig;
pub use error::KafkaWorkerError;
pub use metrics::{MetricLabels, Metrics};
pub use worker::{ShutdownWatch, Worker, WorkerSummary};
