//! Configuration: a raw layer read from the TOML file, the environment and
//! flags (later sources win), then validated into typed [`Config`].
//!
//! Every error names the key and where its value came from, so an operator
//! can fix it without reading code: `worker.lease: invalid duration "6o s"
//! (from PQMIG_LEASE): ...`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod connstring;
mod database;

pub use connstring::{ConnString, redact_url, split_conn_string};
pub use database::{
    CREDENTIAL_PASSWORD, CREDENTIAL_URL, DatabaseConfig, DatabaseUrl, RootCerts, Secret, SslMode,
};

/// Used when neither `--config` nor `PQMIG_CONFIG` is given and the file exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pqmig/pqmig.toml";

/// The local server the demo (and nothing else) falls back to.
pub const LOCAL_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {reason} (from {origin})")]
    Invalid {
        key: &'static str,
        origin: String,
        reason: String,
    },
    #[error("{key}: missing; {hint}")]
    Missing {
        key: &'static str,
        hint: &'static str,
    },
}

/// Values as found in one source, before validation. Field names are the
/// TOML keys; `deny_unknown_fields` turns a typo into an error naming it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub worker: RawWorker,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub keys: RawKeys,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub url_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
    pub pool_size: Option<i64>,
    pub connect_timeout: Option<String>,
    pub pool_wait_timeout: Option<String>,
    pub statement_timeout: Option<String>,
    pub lock_timeout: Option<String>,
    pub idle_in_transaction_timeout: Option<String>,
    /// `$CREDENTIALS_DIRECTORY` (systemd): relative file paths are taken
    /// from there. Not a config key.
    #[serde(skip)]
    pub credentials_dir: Option<PathBuf>,
}

impl fmt::Debug for RawDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawDatabase")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("url_file", &self.url_file)
            .field("password_file", &self.password_file)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_wait_timeout", &self.pool_wait_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("credentials_dir", &self.credentials_dir)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorker {
    pub concurrency: Option<i64>,
    pub poll_interval: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub lease: Option<String>,
    pub rescue_interval: Option<String>,
    pub max_attempts: Option<i64>,
    pub retry_backoff: Option<String>,
    pub retry_backoff_max: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub batch_target: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    pub keyring: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// Overrides given on the command line; they win over file and environment.
#[derive(Debug, Default, Clone)]
pub struct FlagOverrides {
    pub config: Option<PathBuf>,
    pub database_url: Option<String>,
    pub concurrency: Option<i64>,
    pub metrics_addr: Option<String>,
    pub keyring: Option<PathBuf>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
}

/// The sources a configuration is assembled from. Tests pass their own
/// environment instead of touching the process's.
pub struct Sources<'a> {
    pub flags: FlagOverrides,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub concurrency: NonZeroUsize,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    pub rescue_interval: Duration,
    pub max_attempts: NonZeroU32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub shutdown_timeout: Duration,
    pub batch_target: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: NonZeroUsize::new(4).expect("nonzero"),
            poll_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(15),
            lease: Duration::from_secs(60),
            rescue_interval: Duration::from_secs(15),
            max_attempts: NonZeroU32::new(5).expect("nonzero"),
            retry_backoff: Duration::from_secs(30),
            retry_backoff_max: Duration::from_secs(3600),
            // Kubernetes sends SIGKILL 30 s after SIGTERM by default.
            shutdown_timeout: Duration::from_secs(25),
            batch_target: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    pub database: DatabaseConfig,
    pub worker: WorkerConfig,
    pub metrics_listen: SocketAddr,
    pub keyring: Option<PathBuf>,
    /// `None`: text on a terminal, JSON otherwise (decided by the caller).
    pub log_format: Option<LogFormat>,
    pub log_level: String,
}

/// Where each key's winning value came from, for error messages.
#[derive(Default)]
struct Origins(BTreeMap<&'static str, String>);

impl Origins {
    fn of(&self, key: &'static str) -> String {
        self.0.get(key).cloned().unwrap_or_else(|| "default".into())
    }
}

/// Set `slot` to `value` when present and remember its origin.
fn layer<T>(
    slot: &mut Option<T>,
    value: Option<T>,
    key: &'static str,
    origin: &str,
    o: &mut Origins,
) {
    if let Some(v) = value {
        *slot = Some(v);
        o.0.insert(key, origin.to_owned());
    }
}

impl Config {
    /// Read file, environment and flags and validate the result.
    pub fn load(sources: &Sources<'_>) -> Result<Config, ConfigError> {
        let env = sources.env;
        let explicit = sources.flags.config.clone().or_else(|| {
            env("PQMIG_CONFIG")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        });
        let (file, raw_file) = match explicit {
            Some(path) => {
                let raw = RawConfig::from_file(&path)?;
                (Some(path), raw)
            }
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                let path = PathBuf::from(DEFAULT_CONFIG_PATH);
                let raw = RawConfig::from_file(&path)?;
                (Some(path), raw)
            }
            None => (None, RawConfig::default()),
        };
        let mut origins = Origins::default();
        let mut raw = RawConfig::default();
        let file_origin = file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if raw_file.database.url.is_some() && raw_file.database.url_file.is_some() {
            return Err(ConfigError::Invalid {
                key: "database.url_file",
                origin: file_origin,
                reason: "set either url or url_file, not both".into(),
            });
        }
        raw.merge_from(raw_file, &file_origin, &mut origins);
        raw.merge_env(env, &mut origins)?;
        raw.merge_flags(&sources.flags, &mut origins);
        raw.merge_credentials(env, &mut origins);
        raw.validate(file, &origins)
    }
}

impl RawConfig {
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parse TOML text; the error is one line naming the offending key.
    pub fn from_toml(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| {
            let mut msg = e.message().trim().replace('\n', " ");
            if let Some(span) = e.span() {
                let line = text[..span.start].matches('\n').count() + 1;
                msg = format!("line {line}: {msg}");
            }
            msg
        })
    }

    fn merge_from(&mut self, other: RawConfig, origin: &str, o: &mut Origins) {
        let (d, w) = (&mut self.database, &mut self.worker);
        let od = other.database;
        // `url` and `url_file` are two forms of one setting: a later source
        // giving either replaces both.
        if od.url.is_some() || od.url_file.is_some() {
            d.url = None;
            d.url_file = None;
        }
        layer(&mut d.url, od.url, "database.url", origin, o);
        layer(&mut d.url_file, od.url_file, "database.url_file", origin, o);
        let database_keys: [(&mut Option<String>, Option<String>, &'static str); 6] = [
            (&mut d.sslmode, od.sslmode, "database.sslmode"),
            (
                &mut d.connect_timeout,
                od.connect_timeout,
                "database.connect_timeout",
            ),
            (
                &mut d.pool_wait_timeout,
                od.pool_wait_timeout,
                "database.pool_wait_timeout",
            ),
            (
                &mut d.statement_timeout,
                od.statement_timeout,
                "database.statement_timeout",
            ),
            (
                &mut d.lock_timeout,
                od.lock_timeout,
                "database.lock_timeout",
            ),
            (
                &mut d.idle_in_transaction_timeout,
                od.idle_in_transaction_timeout,
                "database.idle_in_transaction_timeout",
            ),
        ];
        for (slot, value, key) in database_keys {
            layer(slot, value, key, origin, o);
        }
        layer(
            &mut d.password_file,
            od.password_file,
            "database.password_file",
            origin,
            o,
        );
        layer(
            &mut d.sslrootcert,
            od.sslrootcert,
            "database.sslrootcert",
            origin,
            o,
        );
        layer(
            &mut d.pool_size,
            od.pool_size,
            "database.pool_size",
            origin,
            o,
        );
        let ow = other.worker;
        layer(
            &mut w.concurrency,
            ow.concurrency,
            "worker.concurrency",
            origin,
            o,
        );
        layer(
            &mut w.poll_interval,
            ow.poll_interval,
            "worker.poll_interval",
            origin,
            o,
        );
        let hb = ow.heartbeat_interval;
        layer(
            &mut w.heartbeat_interval,
            hb,
            "worker.heartbeat_interval",
            origin,
            o,
        );
        layer(&mut w.lease, ow.lease, "worker.lease", origin, o);
        let ri = ow.rescue_interval;
        layer(
            &mut w.rescue_interval,
            ri,
            "worker.rescue_interval",
            origin,
            o,
        );
        layer(
            &mut w.max_attempts,
            ow.max_attempts,
            "worker.max_attempts",
            origin,
            o,
        );
        layer(
            &mut w.retry_backoff,
            ow.retry_backoff,
            "worker.retry_backoff",
            origin,
            o,
        );
        let rbm = ow.retry_backoff_max;
        layer(
            &mut w.retry_backoff_max,
            rbm,
            "worker.retry_backoff_max",
            origin,
            o,
        );
        let st = ow.shutdown_timeout;
        layer(
            &mut w.shutdown_timeout,
            st,
            "worker.shutdown_timeout",
            origin,
            o,
        );
        layer(
            &mut w.batch_target,
            ow.batch_target,
            "worker.batch_target",
            origin,
            o,
        );
        let listen = other.metrics.listen;
        layer(
            &mut self.metrics.listen,
            listen,
            "metrics.listen",
            origin,
            o,
        );
        layer(
            &mut self.keys.keyring,
            other.keys.keyring,
            "keys.keyring",
            origin,
            o,
        );
        layer(
            &mut self.log.format,
            other.log.format,
            "log.format",
            origin,
            o,
        );
        layer(&mut self.log.level, other.log.level, "log.level", origin, o);
    }

    /// The fixed environment names of SPEC §8.2. Empty values count as unset.
    fn merge_env(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        o: &mut Origins,
    ) -> Result<(), ConfigError> {
        let get = |name: &str| env(name).filter(|v| !v.is_empty());
        let int = |name: &'static str, key: &'static str| -> Result<Option<i64>, ConfigError> {
            get(name)
                .map(|v| {
                    v.trim().parse::<i64>().map_err(|_| ConfigError::Invalid {
                        key,
                        origin: name.into(),
                        reason: format!("{v:?} is not an integer"),
                    })
                })
                .transpose()
        };
        let mut one = RawConfig::default();
        let mut names: Vec<(&'static str, &'static str)> = Vec::new();
        // PQMIG_DATABASE_URL wins over the conventional DATABASE_URL, and
        // PQMIG_DATABASE_URL_FILE over both.
        for name in ["DATABASE_URL", "PQMIG_DATABASE_URL"] {
            if let Some(v) = get(name) {
                one.database.url = Some(v);
                names.retain(|(k, _)| *k != "database.url");
                names.push(("database.url", name));
            }
        }
        if let Some(v) = get("PQMIG_DATABASE_URL_FILE") {
            one.database.url = None;
            one.database.url_file = Some(PathBuf::from(v));
            names.retain(|(k, _)| *k != "database.url");
            names.push(("database.url_file", "PQMIG_DATABASE_URL_FILE"));
        }
        if let Some(v) = get("PQMIG_DATABASE_PASSWORD_FILE") {
            one.database.password_file = Some(PathBuf::from(v));
            names.push(("database.password_file", "PQMIG_DATABASE_PASSWORD_FILE"));
        }
        let strings: [(&str, &'static str, &mut Option<String>); 9] = [
            (
                "PQMIG_POLL_INTERVAL",
                "worker.poll_interval",
                &mut one.worker.poll_interval,
            ),
            (
                "PQMIG_HEARTBEAT_INTERVAL",
                "worker.heartbeat_interval",
                &mut one.worker.heartbeat_interval,
            ),
            ("PQMIG_LEASE", "worker.lease", &mut one.worker.lease),
            (
                "PQMIG_RESCUE_INTERVAL",
                "worker.rescue_interval",
                &mut one.worker.rescue_interval,
            ),
            (
                "PQMIG_SHUTDOWN_TIMEOUT",
                "worker.shutdown_timeout",
                &mut one.worker.shutdown_timeout,
            ),
            (
                "PQMIG_BATCH_TARGET",
                "worker.batch_target",
                &mut one.worker.batch_target,
            ),
            (
                "PQMIG_METRICS_ADDR",
                "metrics.listen",
                &mut one.metrics.listen,
            ),
            ("PQMIG_LOG_FORMAT", "log.format", &mut one.log.format),
            ("PQMIG_LOG", "log.level", &mut one.log.level),
        ];
        for (name, key, slot) in strings {
            if let Some(v) = get(name) {
                *slot = Some(v);
                names.push((key, name));
            }
        }
        if let Some(v) = int("PQMIG_CONCURRENCY", "worker.concurrency")? {
            one.worker.concurrency = Some(v);
            names.push(("worker.concurrency", "PQMIG_CONCURRENCY"));
        }
        if let Some(v) = int("PQMIG_MAX_ATTEMPTS", "worker.max_attempts")? {
            one.worker.max_attempts = Some(v);
            names.push(("worker.max_attempts", "PQMIG_MAX_ATTEMPTS"));
        }
        if let Some(v) = get("PQMIG_KEYRING") {
            one.keys.keyring = Some(PathBuf::from(v));
            names.push(("keys.keyring", "PQMIG_KEYRING"));
        }
        // Merge with a placeholder origin, then name the variable per key.
        self.merge_from(one, "", o);
        for (key, name) in names {
            o.0.insert(key, name.to_owned());
        }
        Ok(())
    }

    /// Under systemd, `LoadCredential=database-url:…` and
    /// `LoadCredential=database-password:…` are used when no other source
    /// names a URL or a password file; relative file paths are taken from
    /// `$CREDENTIALS_DIRECTORY`.
    fn merge_credentials(&mut self, env: &dyn Fn(&str) -> Option<String>, o: &mut Origins) {
        let Some(dir) = env("CREDENTIALS_DIRECTORY").filter(|v| !v.is_empty()) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let d = &mut self.database;
        if d.url.is_none() && d.url_file.is_none() && dir.join(CREDENTIAL_URL).is_file() {
            d.url_file = Some(PathBuf::from(CREDENTIAL_URL));
            o.0.insert(
                "database.url_file",
                format!("$CREDENTIALS_DIRECTORY/{CREDENTIAL_URL}"),
            );
        }
        if d.password_file.is_none() && dir.join(CREDENTIAL_PASSWORD).is_file() {
            d.password_file = Some(PathBuf::from(CREDENTIAL_PASSWORD));
            o.0.insert(
                "database.password_file",
                format!("$CREDENTIALS_DIRECTORY/{CREDENTIAL_PASSWORD}"),
            );
        }
        d.credentials_dir = Some(dir);
    }

    fn merge_flags(&mut self, f: &FlagOverrides, o: &mut Origins) {
        let pairs: [(&'static str, &str, bool); 6] = [
            ("database.url", "--database-url", f.database_url.is_some()),
            (
                "worker.concurrency",
                "--concurrency",
                f.concurrency.is_some(),
            ),
            ("metrics.listen", "--metrics-addr", f.metrics_addr.is_some()),
            ("keys.keyring", "--keyring", f.keyring.is_some()),
            ("log.format", "--log-format", f.log_format.is_some()),
            ("log.level", "--log", f.log_level.is_some()),
        ];
        let one = RawConfig {
            database: RawDatabase {
                url: f.database_url.clone(),
                ..Default::default()
            },
            worker: RawWorker {
                concurrency: f.concurrency,
                ..Default::default()
            },
            metrics: RawMetrics {
                listen: f.metrics_addr.clone(),
            },
            keys: RawKeys {
                keyring: f.keyring.clone(),
            },
            log: RawLog {
                format: f.log_format.clone(),
                level: f.log_level.clone(),
            },
        };
        self.merge_from(one, "", o);
        for (key, flag, set) in pairs {
            if set {
                o.0.insert(key, flag.to_owned());
            }
        }
    }

    fn validate(self, file: Option<PathBuf>, o: &Origins) -> Result<Config, ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            key,
            origin: o.of(key),
            reason,
        };
        let dur = |key: &'static str, v: &Option<String>, default: Duration| match v {
            Some(text) => parse_positive_duration(key, text, o),
            None => Ok(default),
        };
        let int_in = |key, v, default, max| int_in(key, v, default, max, o);

        let defaults = WorkerConfig::default();
        let w = &self.worker;
        let concurrency = int_in("worker.concurrency", w.concurrency, 4, 1024)?;
        let max_attempts = int_in("worker.max_attempts", w.max_attempts, 5, 1000)?;
        let worker = WorkerConfig {
            concurrency: NonZeroUsize::new(concurrency as usize).expect("checked range"),
            poll_interval: dur(
                "worker.poll_interval",
                &w.poll_interval,
                defaults.poll_interval,
            )?,
            heartbeat_interval: dur(
                "worker.heartbeat_interval",
                &w.heartbeat_interval,
                defaults.heartbeat_interval,
            )?,
            lease: dur("worker.lease", &w.lease, defaults.lease)?,
            rescue_interval: dur(
                "worker.rescue_interval",
                &w.rescue_interval,
                defaults.rescue_interval,
            )?,
            max_attempts: NonZeroU32::new(max_attempts as u32).expect("checked range"),
            retry_backoff: dur(
                "worker.retry_backoff",
                &w.retry_backoff,
                defaults.retry_backoff,
            )?,
            retry_backoff_max: dur(
                "worker.retry_backoff_max",
                &w.retry_backoff_max,
                defaults.retry_backoff_max,
            )?,
            shutdown_timeout: dur(
                "worker.shutdown_timeout",
                &w.shutdown_timeout,
                defaults.shutdown_timeout,
            )?,
            batch_target: dur(
                "worker.batch_target",
                &w.batch_target,
                defaults.batch_target,
            )?,
        };
        // A lease renewed less than twice per period expires on one slow heartbeat.
        if worker.heartbeat_interval * 2 > worker.lease {
            return Err(invalid(
                "worker.lease",
                format!(
                    "{} must be at least twice worker.heartbeat_interval ({})",
                    humantime::format_duration(worker.lease),
                    humantime::format_duration(worker.heartbeat_interval)
                ),
            ));
        }
        if worker.retry_backoff > worker.retry_backoff_max {
            return Err(invalid(
                "worker.retry_backoff",
                "must not exceed worker.retry_backoff_max".into(),
            ));
        }

        // Every worker holds one connection while it writes a batch; the
        // claim loop, the heartbeats and the rescuer share a few more.
        let database = database::validate(self.database, o, concurrency + 4, worker.batch_target)?;

        let listen = self.metrics.listen.as_deref().unwrap_or("127.0.0.1:9464");
        let metrics_listen = listen.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "metrics.listen",
                format!("{listen:?} is not an address:port ({e})"),
            )
        })?;

        let log_format = match self.log.format.as_deref().map(str::trim) {
            None | Some("auto") => None,
            Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?} is not one of text, json, auto"),
                ));
            }
        };
        let log_level = self.log.level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid("log.level", format!("invalid filter {log_level:?}: {e}")))?;

        Ok(Config {
            file,
            database,
            worker,
            metrics_listen,
            keyring: self.keys.keyring,
            log_format,
            log_level,
        })
    }
}

/// A humantime duration; the error names the key, the source and examples.
fn parse_duration(key: &'static str, text: &str, o: &Origins) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text.trim()).map_err(|e| ConfigError::Invalid {
        key,
        origin: o.of(key),
        reason: format!("invalid duration {text:?}: {e} (examples: 500ms, 30s, 5m)"),
    })
}

fn parse_positive_duration(
    key: &'static str,
    text: &str,
    o: &Origins,
) -> Result<Duration, ConfigError> {
    let d = parse_duration(key, text, o)?;
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            origin: o.of(key),
            reason: "must be greater than zero".into(),
        });
    }
    Ok(d)
}

fn int_in(
    key: &'static str,
    v: Option<i64>,
    default: i64,
    max: i64,
    o: &Origins,
) -> Result<i64, ConfigError> {
    let n = v.unwrap_or(default);
    if !(1..=max).contains(&n) {
        return Err(ConfigError::Invalid {
            key,
            origin: o.of(key),
            reason: format!("{n} is out of range 1..={max}"),
        });
    }
    Ok(n)
}
