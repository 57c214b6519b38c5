//! What every Kafka client of the worker shares: its librdkafka settings, the optional parts
//! librdkafka was built with, and a first contact with the cluster whose failure says why
//! (a refused connection, a failed TLS handshake, failed authentication) instead of only
//! that it timed out.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;

use crate::config::KafkaConfig;
use crate::error::KafkaWorkerError;

/// Base librdkafka settings shared by every client: servers plus the user's extra properties
/// (`kafka.client`: security, compression, tuning).
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.bootstrap_servers);
    for (key, value) in &config.client {
        client.set(key, value);
    }
    client
}

/// Checks `kafka.client` the way librdkafka will read it when a client is created: an
/// unknown property, a value it does not take (`"security.protocol" = "SSLL"`) or a feature
/// this build lacks is refused with librdkafka's message. Nothing connects.
pub fn check_client_settings(config: &KafkaConfig) -> Result<(), KafkaWorkerError> {
    check_settings(&client_config(config))
}

fn check_settings(client: &ClientConfig) -> Result<(), KafkaWorkerError> {
    client
        .create_native_config()
        .map(drop)
        .map_err(|error| KafkaWorkerError::Config(format!("kafka.client: {error}")))
}

/// The optional parts this build of librdkafka has (its `builtin.features`: `ssl`,
/// `sasl_scram`, `zstd`, …), comma-separated. A managed cluster's TLS and SASL settings and
/// a producer's codec work only if they are listed here.
pub fn builtin_features() -> Result<String, KafkaWorkerError> {
    ClientConfig::new()
        .create_native_config()
        .and_then(|native| native.get("builtin.features"))
        .map_err(KafkaWorkerError::kafka(
            "read librdkafka's built-in features",
        ))
}

/// librdkafka's version and its built-in features, for the start-up log.
pub fn librdkafka_description() -> String {
    let (_, version) = rdkafka::util::get_rdkafka_version();
    match builtin_features() {
        Ok(features) => format!("librdkafka {version} ({features})"),
        Err(error) => format!("librdkafka {version} (features unknown: {error})"),
    }
}

/// Remembers the last error librdkafka reported: the cause behind a request that timed out.
/// A consumer's error events carry only a code; the reason ("SSL handshake failed: …
/// certificate verify failed", "Connection refused") comes as a log line, which rdkafka
/// delivers when the client is polled.
#[derive(Default)]
pub(crate) struct LastError(Mutex<Option<String>>);

impl LastError {
    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn remember(&self, reason: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
    }
}

impl ClientContext for LastError {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        // Levels are syslog's: the smaller, the graver (3 is an error, 4 a warning).
        let severity = level as i32;
        if severity <= RDKafkaLogLevel::Error as i32 {
            tracing::warn!(facility, message, "kafka client error");
            self.remember(message);
        } else if severity <= RDKafkaLogLevel::Warning as i32 {
            tracing::warn!(facility, message, "kafka client warning");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
        self.remember(reason);
    }
}

impl ConsumerContext for LastError {}

/// The cluster's metadata, fetched within `kafka.topics.admin_timeout_ms`. A failure names
/// the servers and librdkafka's last report, so a wrong CA, a wrong port or a refused login
/// reads as such.
pub fn cluster_metadata(config: &KafkaConfig) -> Result<Metadata, KafkaWorkerError> {
    let timeout_ms = config.topics.admin_timeout_ms;
    let probe: BaseConsumer<LastError> = client_config(config)
        .create_with_context(LastError::default())
        .map_err(KafkaWorkerError::kafka("create metadata client"))?;
    probe
        .fetch_metadata(None, Duration::from_millis(timeout_ms))
        .map_err(|error| {
            // rdkafka queues librdkafka's log lines for the client's poll: drain them so
            // the context sees the reason.
            while probe.poll(Duration::ZERO).is_some() {}
            KafkaWorkerError::Unreachable {
                bootstrap: config.bootstrap_servers.clone(),
                timeout_ms,
                reason: match probe.context().take() {
                    Some(reason) => format!("{error}; the last error reported was: {reason}"),
                    None => error.to_string(),
                },
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Managed clusters (MSK, Confluent Cloud, Aiven) need TLS and SASL, and producers may
    /// compress with any codec: a build without them cannot even be configured for them.
    #[test]
    fn librdkafka_is_built_with_tls_sasl_and_every_codec() {
        let features = builtin_features().unwrap();
        let features: Vec<&str> = features.split(',').collect();
        for needed in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_gssapi",
            "gzip",
            "zstd",
            "lz4",
            "snappy",
        ] {
            assert!(
                features.contains(&needed),
                "librdkafka lacks {needed}: {features:?}"
            );
        }
    }

    #[test]
    fn client_settings_librdkafka_does_not_take_are_refused_with_its_reason() {
        let settings = |pairs: &[(&str, &str)]| {
            let mut client = ClientConfig::new();
            for (key, value) in pairs {
                client.set(*key, *value);
            }
            check_settings(&client).map_err(|e| e.to_string())
        };
        assert!(settings(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "PLAIN")
        ])
        .is_ok());
        let error = settings(&[("security.protocol", "SSLL")]).unwrap_err();
        assert!(error.contains("security.protocol"), "{error}");
        let error = settings(&[("sasl.mechanism.typo", "PLAIN")]).unwrap_err();
        assert!(error.contains("sasl.mechanism.typo"), "{error}");
    }

    /// Security settings a managed cluster asks for are accepted by librdkafka when the
    /// client is created (a build without OpenSSL refuses SCRAM and SSL right there).
    #[test]
    fn clients_accept_tls_with_scram_and_plain_logins() {
        for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] {
            let consumer: Result<BaseConsumer, _> = ClientConfig::new()
                .set("bootstrap.servers", "127.0.0.1:1")
                .set("security.protocol", "SASL_SSL")
                .set("sasl.mechanisms", mechanism)
                .set("sasl.username", "idgraph")
                .set("sasl.password", "secret")
                .create();
            assert!(consumer.is_ok(), "{mechanism}: {:?}", consumer.err());
        }
    }
}
