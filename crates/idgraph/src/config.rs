//! Loading the configuration: `config/default.toml` (compiled in), then the `--config` file,
//! then `IDGRAPH__SECTION__KEY` environment variables; unknown keys are errors that name the
//! key; the result is validated before anything starts.

use std::path::Path;

use anyhow::{bail, Context, Result};
use idgraph_engine::{EngineConfig, DEFAULT_CONFIG_TOML};
use idgraph_store_rocksdb::StorageConfig;
use serde::Deserialize;
use toml::{Table, Value};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub engine: EngineConfig,
    pub storage: StorageConfig,
    pub resolve: ResolveConfig,
    pub kafka: idgraph_kafka::KafkaConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

/// `[http]`: the worker's operations endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// The profile API's address; empty turns the API off.
    pub api_listen: String,
    /// A bearer token the profile API requires; empty requires none.
    pub api_token: String,
    /// Serve the API on a reachable address without a token (see
    /// [`HttpConfig::check_api_exposure`]).
    pub api_allow_anonymous: bool,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

impl HttpConfig {
    /// The limits both servers apply.
    pub fn limits(&self) -> crate::http::Limits {
        crate::http::Limits {
            max_connections: self.max_connections,
            header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
            request_timeout: std::time::Duration::from_millis(self.request_timeout_ms),
        }
    }

    /// The API's token, if one is set.
    pub fn token(&self) -> Option<String> {
        Some(self.api_token.trim().to_owned()).filter(|token| !token.is_empty())
    }

    /// Refuses to serve the profile API on `listen` (the value of `setting`) when other hosts
    /// can reach it and no token guards it, unless `http.api_allow_anonymous` says something
    /// in front of idgraph checks callers: a plain `docker run` must not serve customer data
    /// to anyone.
    pub fn check_api_exposure(&self, listen: &str, setting: &str) -> Result<()> {
        if self.token().is_some() || self.api_allow_anonymous || is_loopback(listen) {
            return Ok(());
        }
        bail!(
            "{setting} is {listen:?}, which other hosts can reach, and http.api_token is empty, \
             so the profile API would serve customer data to anyone; set http.api_token (best \
             from IDGRAPH__HTTP__API_TOKEN), listen on a loopback address such as \
             127.0.0.1:9465, or set http.api_allow_anonymous = true if a proxy in front of \
             idgraph authenticates every caller"
        )
    }
}

/// Whether `listen` (`host:port`) is reachable from this host only. A name other than
/// `localhost` counts as reachable: it may resolve to any interface.
fn is_loopback(listen: &str) -> bool {
    if let Ok(address) = listen.trim().parse::<std::net::SocketAddr>() {
        return address.ip().is_loopback();
    }
    let host = listen
        .trim()
        .rsplit_once(':')
        .map_or(listen, |(host, _)| host);
    host.eq_ignore_ascii_case("localhost")
}

/// `[resolve]`: file mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveConfig {
    pub batch_size: usize,
    /// Batches per checkpoint: one state write, one profile record per changed customer.
    pub checkpoint_interval: usize,
    pub default_source: String,
    pub progress_interval_secs: u64,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Tables whose keys are names chosen by the user (identifier kinds, sources, librdkafka
/// properties), not settings.
const OPEN_TABLES: [&str; 5] = [
    "engine.identifiers.max_per_profile",
    "engine.normalize.date_order_by_source",
    "engine.mappings",
    "kafka.sources",
    "kafka.client",
];

/// The prefix of environment variables that override single keys.
const ENV_PREFIX: &str = "IDGRAPH__";

impl AppConfig {
    /// Defaults, then `file`, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        Self::load_with_env(file, std::env::vars())
    }

    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let defaults: Table = DEFAULT_CONFIG_TOML
            .parse()
            .context("the built-in config/default.toml is invalid")?;
        let mut merged = defaults.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let user: Table = text
                .parse()
                .with_context(|| format!("config file {} is not valid toml", path.display()))?;
            merge(&mut merged, user, &defaults, "")
                .with_context(|| format!("in config file {}", path.display()))?;
        }
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        overrides.sort();
        for (name, raw) in overrides {
            apply_env_override(&mut merged, &defaults, &name, &raw)?;
        }
        let config: AppConfig = Value::Table(merged)
            .try_into()
            .context("configuration has a value of the wrong type")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.engine.validate()?;
        if self.storage.block_cache_mb == 0 {
            bail!("storage.block_cache_mb must be at least 1");
        }
        // RocksDB slows writes down at 20 level-0 files; a trigger near that would stall them.
        if !(1..=16).contains(&self.storage.l0_compaction_trigger) {
            bail!(
                "storage.l0_compaction_trigger is {}; it must be between 1 and 16",
                self.storage.l0_compaction_trigger
            );
        }
        if self.resolve.batch_size == 0 {
            bail!("resolve.batch_size must be at least 1");
        }
        if self.http.max_connections == 0 {
            bail!("http.max_connections must be at least 1");
        }
        if self.http.header_read_timeout_ms == 0 || self.http.request_timeout_ms == 0 {
            bail!("http.header_read_timeout_ms and http.request_timeout_ms must be at least 1");
        }
        if self.resolve.checkpoint_interval == 0 {
            bail!("resolve.checkpoint_interval must be at least 1 (batches per checkpoint)");
        }
        if let Err(problem) = self.kafka.validate() {
            bail!("{problem}");
        }
        if self.resolve.default_source.trim().is_empty() {
            bail!("resolve.default_source must name a source such as \"web\"");
        }
        Ok(())
    }
}

/// Merges `user` into `into`, refusing keys that the defaults do not have (except inside
/// [`OPEN_TABLES`]).
fn merge(into: &mut Table, user: Table, defaults: &Table, prefix: &str) -> Result<()> {
    for (key, value) in user {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let open = OPEN_TABLES.contains(&prefix);
        let Some(default) = defaults.get(&key) else {
            if open {
                into.insert(key, value);
                continue;
            }
            bail!("unknown configuration key {path:?}; see config/default.toml for every key");
        };
        match (default, value) {
            (Value::Table(default_table), Value::Table(user_table)) => {
                let Some(Value::Table(target)) = into.get_mut(&key) else {
                    unreachable!("merged config starts as a copy of the defaults");
                };
                merge(target, user_table, default_table, &path)?;
            }
            (Value::Table(_), other) => {
                bail!(
                    "configuration key {path:?} must be a table, found {}",
                    other.type_str()
                )
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
    Ok(())
}

/// `IDGRAPH__ENGINE__FUZZY__THRESHOLD=14` sets `engine.fuzzy.threshold`. The value is read as
/// TOML (a number, a boolean, a list) and otherwise taken as a plain string.
fn apply_env_override(merged: &mut Table, defaults: &Table, name: &str, raw: &str) -> Result<()> {
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    let dotted = path.join(".");
    let value = format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_owned()));
    let mut user = Table::new();
    let (leaf, parents) = path.split_last().expect("split yields at least one part");
    let mut cursor = &mut user;
    for part in parents {
        cursor = cursor
            .entry(part.clone())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .expect("just inserted a table");
    }
    cursor.insert(leaf.clone(), value);
    merge(merged, user, defaults, "")
        .with_context(|| format!("in environment variable {name} (key {dotted:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The whole error message for the defaults with one environment override.
    fn error_with_override(name: &str, value: &str) -> String {
        format!(
            "{:#}",
            AppConfig::load_with_env(None, env(&[(name, value)])).unwrap_err()
        )
    }

    #[test]
    fn defaults_load_and_validate() {
        let config = AppConfig::load_with_env(None, env(&[])).unwrap();
        assert_eq!(config.resolve.batch_size, 2000);
        assert_eq!(config.engine.identifiers.max_per_profile["user_id"], 1);
    }

    #[test]
    fn a_file_overrides_only_what_it_names_and_may_add_identifier_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[engine.fuzzy]\nthreshold = 15.5\n[engine.identifiers.max_per_profile]\ncrm_id = 1\n",
        )
        .unwrap();
        let config = AppConfig::load_with_env(Some(&path), env(&[])).unwrap();
        assert_eq!(config.engine.fuzzy.threshold, 15.5);
        assert_eq!(config.engine.fuzzy.max_candidates, 32);
        assert_eq!(config.engine.identifiers.max_per_profile["crm_id"], 1);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[engine.fuzzy]\ntreshold = 15\n").unwrap();
        let error = format!(
            "{:#}",
            AppConfig::load_with_env(Some(&path), env(&[])).unwrap_err()
        );
        assert!(error.contains("engine.fuzzy.treshold"), "{error}");
        let error = error_with_override("IDGRAPH__STORAGE__CACHE", "1");
        assert!(
            error.contains("storage.cache") && error.contains("IDGRAPH__STORAGE__CACHE"),
            "{error}"
        );
    }

    #[test]
    fn environment_overrides_single_keys_with_typed_values() {
        let config = AppConfig::load_with_env(
            None,
            env(&[
                ("IDGRAPH__ENGINE__FUZZY__THRESHOLD", "14"),
                ("IDGRAPH__RESOLVE__DEFAULT_SOURCE", "mobile"),
                ("IDGRAPH__ENGINE__FUZZY__ENABLED", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(config.engine.fuzzy.threshold, 14.0);
        assert_eq!(config.resolve.default_source, "mobile");
        assert!(!config.engine.fuzzy.enabled);
    }

    #[test]
    fn invalid_values_get_an_actionable_message() {
        let error = error_with_override("IDGRAPH__ENGINE__PROTECTION__GENERIC_THRESHOLD", "1");
        assert!(
            error.contains("generic_threshold") && error.contains("at least 2"),
            "{error}"
        );
    }

    #[test]
    fn a_compaction_trigger_that_would_stall_writes_is_refused() {
        let error = error_with_override("IDGRAPH__STORAGE__L0_COMPACTION_TRIGGER", "40");
        assert!(
            error.contains("storage.l0_compaction_trigger is 40") && error.contains("1 and 16"),
            "{error}"
        );
    }
}

#[cfg(test)]
mod mapping_tests {
    use super::*;

    #[test]
    fn a_source_mapping_loads_and_a_bad_pointer_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "[engine.mappings.crm]\nevent_id = \"/id\"\nevent_type = \"/kind\"\ntimestamp = \"/at\"\nidentifiers = { \"/contact/mail\" = \"email\" }\n").unwrap();
        let config = AppConfig::load_with_env(Some(&good), Vec::new()).unwrap();
        assert_eq!(
            config.engine.mappings["crm"].identifiers["/contact/mail"],
            "email"
        );
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[engine.mappings.crm]\nevent_id = \"id\"\nevent_type = \"/kind\"\ntimestamp = \"/at\"\n").unwrap();
        let error = format!(
            "{:#}",
            AppConfig::load_with_env(Some(&bad), Vec::new()).unwrap_err()
        );
        assert!(
            error.contains("engine.mappings.crm") && error.contains("\"id\""),
            "{error}"
        );
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    #[test]
    fn the_shipped_production_override_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/production.toml");
        let config = AppConfig::load_with_env(Some(&path), Vec::new()).unwrap();
        assert!(config.storage.sync_writes);
        assert_eq!(config.resolve.batch_size, 10_000);
    }

    #[test]
    fn the_production_api_refuses_to_start_without_a_token_and_starts_with_one() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/production.toml");
        let open = AppConfig::load_with_env(Some(&path), Vec::new()).unwrap();
        let error = open
            .http
            .check_api_exposure(&open.http.api_listen, "http.api_listen")
            .unwrap_err()
            .to_string();
        for named in [
            "http.api_listen",
            "0.0.0.0:9465",
            "http.api_token",
            "IDGRAPH__HTTP__API_TOKEN",
            "http.api_allow_anonymous",
        ] {
            assert!(error.contains(named), "{named} missing from: {error}");
        }
        let token = vec![("IDGRAPH__HTTP__API_TOKEN".to_owned(), "s3cret".to_owned())];
        let guarded = AppConfig::load_with_env(Some(&path), token).unwrap();
        assert!(guarded
            .http
            .check_api_exposure(&guarded.http.api_listen, "http.api_listen")
            .is_ok());
        let anonymous = vec![(
            "IDGRAPH__HTTP__API_ALLOW_ANONYMOUS".to_owned(),
            "true".to_owned(),
        )];
        let opted_out = AppConfig::load_with_env(Some(&path), anonymous).unwrap();
        assert!(opted_out
            .http
            .check_api_exposure(&opted_out.http.api_listen, "http.api_listen")
            .is_ok());
    }

    #[test]
    fn only_loopback_addresses_count_as_private() {
        for private in [
            "127.0.0.1:9465",
            "127.0.0.2:1",
            "[::1]:9465",
            "localhost:9465",
        ] {
            assert!(is_loopback(private), "{private}");
        }
        for reachable in ["0.0.0.0:9465", "[::]:9465", "10.0.0.5:9465", "idgraph:9465"] {
            assert!(!is_loopback(reachable), "{reachable}");
        }
    }
}

impl AppConfig {
    /// The input-derived metric labels operators configured: the sources (Kafka source
    /// topics, file mode's default source, sources with a field mapping) and the identifier
    /// kinds with a per-profile limit.
    pub fn metric_labels(&self) -> idgraph_kafka::MetricLabels {
        let sources = self
            .kafka
            .sources
            .keys()
            .chain(self.engine.mappings.keys())
            .chain(std::iter::once(&self.resolve.default_source))
            .cloned();
        let kinds = self.engine.identifiers.max_per_profile.keys().cloned();
        idgraph_kafka::MetricLabels::new(sources, kinds)
    }
}
