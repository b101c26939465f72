//! Configuration: a raw layer read from the TOML file, the environment and
//! flags (later sources win), then validated into typed [`Config`].
//!
//! Every error names the key and where its value came from, so an operator
//! can fix it without reading code: `worker.lease: invalid duration "6o s"
//! (from PQMIG_LEASE): ...`.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod connstring;
mod database;
pub mod keys;

pub use connstring::{ConnString, redact_url, split_conn_string};
pub use database::{
    CREDENTIAL_PASSWORD, CREDENTIAL_URL, DatabaseConfig, DatabaseUrl, RootCerts, Secret, SslMode,
};
use keys::Value;
pub use keys::{KEYS, RawConfig};

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
    /// A walk that commits no batch for this long (throttle, pace and pause
    /// waits not counted) releases its range as stalled.
    pub stall_timeout: Duration,
    /// Estimated items per range when a job is split.
    pub range_items: i64,
}

/// When batches wait for the database (SPEC §7 leaves it to us; README's
/// "Throttling" documents it). `None`: that check is off.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Bytes of WAL the slowest standby may be behind.
    pub max_replication_lag_bytes: Option<u64>,
    /// Age of the oldest open transaction (other than pqmig's own).
    pub max_transaction_age: Option<Duration>,
    /// WAL written per second, measured between checks.
    pub max_wal_bytes_per_second: Option<u64>,
    /// Items per second for all replicas together.
    pub max_items_per_second: Option<f64>,
    pub check_interval: Duration,
}

/// The work one replica at a time does for all.
#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// How often the exposure inventory is sampled.
    pub inventory_interval: Duration,
    /// Finished jobs (with their events, item errors and ranges) older than
    /// this are deleted, never one whose backups are not purged.
    pub retention: Duration,
    pub interval: Duration,
}

impl Default for WorkerConfig {
    /// The defaults of [`KEYS`].
    fn default() -> Self {
        let v = Values {
            raw: &RawConfig::default(),
        };
        v.worker().expect("the defaults of KEYS are valid")
    }
}

/// Where the web console is served (`console.listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleListen {
    /// Beside /metrics, on `metrics.listen` (unset or empty).
    Metrics,
    /// On a listener of its own.
    Own(SocketAddr),
    /// Not served (`off`).
    Off,
}

impl std::fmt::Display for ConsoleListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleListen::Metrics => f.write_str("metrics.listen"),
            ConsoleListen::Own(addr) => write!(f, "{addr}"),
            ConsoleListen::Off => f.write_str("off"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    pub database: DatabaseConfig,
    pub worker: WorkerConfig,
    pub throttle: ThrottleConfig,
    pub maintenance: MaintenanceConfig,
    pub metrics_listen: SocketAddr,
    pub console_listen: ConsoleListen,
    pub keyring: Option<PathBuf>,
    /// `keys.pkcs11_module` and `keys.pkcs11_pin_file`: the PKCS#11 module
    /// and user PIN of the `pkcs11` key provider (both, or neither).
    pub pkcs11: Option<crate::keys::pkcs11::Pkcs11Settings>,
    /// `evidence.attest_dir`: where a job's attestation is written when it
    /// ends `done` and when `pqmig verify` passes (README "Evidence for
    /// auditors").
    pub attest_dir: Option<PathBuf>,
    /// `None`: text on a terminal, JSON otherwise (decided by the caller).
    pub log_format: Option<LogFormat>,
    pub log_level: String,
}

/// The settings of `[database]` as the sources gave them, for
/// [`database::validate`]: text, not yet checked.
#[derive(Default)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub url_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
    /// `$CREDENTIALS_DIRECTORY` (systemd): relative file paths are taken
    /// from there. Not a config key.
    pub credentials_dir: Option<PathBuf>,
}

impl FlagOverrides {
    /// The flags that are set, by key.
    fn values(&self) -> Vec<(&'static str, Value)> {
        let text = |k, v: &Option<String>| v.clone().map(|v| (k, Value::Text(v)));
        let path = |k, v: &Option<PathBuf>| {
            v.as_ref()
                .map(|p| (k, Value::Text(p.to_string_lossy().into_owned())))
        };
        [
            text("database.url", &self.database_url),
            self.concurrency
                .map(|n| ("worker.concurrency", Value::Int(n))),
            text("metrics.listen", &self.metrics_addr),
            path("keys.keyring", &self.keyring),
            text("log.format", &self.log_format),
            text("log.level", &self.log_level),
        ]
        .into_iter()
        .flatten()
        .collect()
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
        let (file, mut raw) = match explicit {
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
        raw.merge(RawConfig::from_env(env)?);
        raw.merge(RawConfig::from_flags(&sources.flags.values()));
        let credentials_dir = credentials(&mut raw, env);
        let v = Values { raw: &raw };
        let worker = v.worker()?;
        let pkcs11 = match v.pkcs11(credentials_dir.as_deref())? {
            Some(p) => {
                let p = p.with_sessions_for(worker.concurrency.get());
                let default = (p.max_sessions as i64).min(4096);
                let n = v.int_in("keys.pkcs11_sessions", default, 4096)?;
                Some(crate::keys::pkcs11::Pkcs11Settings {
                    max_sessions: n as usize,
                    ..p
                })
            }
            None => None,
        };
        // Every walk holds up to two connections (the batch it writes and
        // the read ahead of the next); the rescuer, the governor, the
        // sampler and the janitor share three more. Claims and heartbeats
        // have a connection of their own, outside the pool.
        let database = database::validate(
            v.database(credentials_dir),
            &v,
            2 * worker.concurrency.get() as i64 + 3,
            worker.batch_target,
        )?;
        let listen = v.text("metrics.listen").unwrap_or_default();
        let metrics_listen = listen.parse::<SocketAddr>().map_err(|e| {
            v.invalid(
                "metrics.listen",
                format!("{listen:?} is not an address:port ({e})"),
            )
        })?;
        let console_listen = v.console_listen(metrics_listen)?;
        let log_format = match v.text("log.format").as_deref().map(str::trim) {
            None | Some("auto") => None,
            Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                return Err(v.invalid(
                    "log.format",
                    format!("{other:?} is not one of text, json, auto"),
                ));
            }
        };
        let log_level = v.text("log.level").unwrap_or_default();
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| v.invalid("log.level", format!("invalid filter {log_level:?}: {e}")))?;
        let throttle = v.throttle()?;
        let maintenance = MaintenanceConfig {
            inventory_interval: v.positive_duration("inventory.interval")?,
            retention: v.positive_duration("maintenance.retention")?,
            interval: v.positive_duration("maintenance.interval")?,
        };
        Ok(Config {
            file,
            database,
            worker,
            throttle,
            maintenance,
            metrics_listen,
            console_listen,
            keyring: v.text("keys.keyring").map(PathBuf::from),
            pkcs11,
            attest_dir: v.attest_dir()?,
            log_format,
            log_level,
        })
    }
}

/// Under systemd, `LoadCredential=database-url:…` and
/// `LoadCredential=database-password:…` are used when no other source
/// names a URL or a password file; relative file paths are taken from
/// `$CREDENTIALS_DIRECTORY`, which is returned.
fn credentials(raw: &mut RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let dir = PathBuf::from(env("CREDENTIALS_DIRECTORY").filter(|v| !v.is_empty())?);
    let unset = |raw: &RawConfig, name| raw.get(name).is_none();
    if unset(raw, "database.url")
        && unset(raw, "database.url_file")
        && dir.join(CREDENTIAL_URL).is_file()
    {
        raw.set(
            "database.url_file",
            Value::Text(CREDENTIAL_URL.into()),
            format!("$CREDENTIALS_DIRECTORY/{CREDENTIAL_URL}"),
        );
    }
    if unset(raw, "database.password_file") && dir.join(CREDENTIAL_PASSWORD).is_file() {
        raw.set(
            "database.password_file",
            Value::Text(CREDENTIAL_PASSWORD.into()),
            format!("$CREDENTIALS_DIRECTORY/{CREDENTIAL_PASSWORD}"),
        );
    }
    Some(dir)
}

/// Typed reads of the raw layer, with [`KEYS`]' defaults; every error names
/// the key, its source and the reason.
pub(crate) struct Values<'a> {
    raw: &'a RawConfig,
}

impl Values<'_> {
    pub(crate) fn origin(&self, key: &'static str) -> String {
        self.raw.origin(key)
    }

    pub(crate) fn invalid(&self, key: &'static str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            key,
            origin: self.origin(key),
            reason,
        }
    }

    /// The value as given, else the table's default.
    fn value(&self, key: &'static str) -> Option<Value> {
        match self.raw.get(key) {
            Some(r) => Some(r.value.clone()),
            None => keys::lookup(key)
                .and_then(|k| k.default)
                .map(|d| Value::Text(d.to_owned())),
        }
    }

    pub(crate) fn text(&self, key: &'static str) -> Option<String> {
        match self.value(key)? {
            Value::Text(s) => Some(s),
            Value::Int(n) => Some(n.to_string()),
        }
    }

    /// An integer in `1..=max` (`default` when unset and the table has none).
    pub(crate) fn int_in(
        &self,
        key: &'static str,
        default: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let n = match self.value(key) {
            None => default,
            Some(Value::Int(n)) => n,
            Some(Value::Text(t)) => t
                .trim()
                .parse()
                .map_err(|_| self.invalid(key, format!("{t:?} is not an integer")))?,
        };
        if !(1..=max).contains(&n) {
            return Err(self.invalid(key, format!("{n} is out of range 1..={max}")));
        }
        Ok(n)
    }

    /// A humantime duration (`None`: unset, with no default).
    pub(crate) fn duration(&self, key: &'static str) -> Result<Option<Duration>, ConfigError> {
        self.text(key)
            .map(|text| {
                humantime::parse_duration(text.trim()).map_err(|e| {
                    self.invalid(
                        key,
                        format!("invalid duration {text:?}: {e} (examples: 500ms, 30s, 5m)"),
                    )
                })
            })
            .transpose()
    }

    /// A duration greater than zero; every such key has a default.
    pub(crate) fn positive_duration(&self, key: &'static str) -> Result<Duration, ConfigError> {
        let d = self
            .duration(key)?
            .unwrap_or_else(|| panic!("{key} has a default in KEYS"));
        if d.is_zero() {
            return Err(self.invalid(key, "must be greater than zero".into()));
        }
        Ok(d)
    }

    fn path(&self, key: &'static str) -> Option<PathBuf> {
        self.text(key).map(PathBuf::from)
    }

    fn database(&self, credentials_dir: Option<PathBuf>) -> RawDatabase {
        RawDatabase {
            url: self.text("database.url"),
            url_file: self.path("database.url_file"),
            password_file: self.path("database.password_file"),
            sslmode: self.text("database.sslmode"),
            sslrootcert: self.path("database.sslrootcert"),
            credentials_dir,
        }
    }

    /// An integer in `0..=max`, 0 meaning "off" (`None`).
    fn optional_int(&self, key: &'static str, max: i64) -> Result<Option<i64>, ConfigError> {
        let n = match self.value(key) {
            None => 0,
            Some(Value::Int(n)) => n,
            Some(Value::Text(t)) => t
                .trim()
                .parse()
                .map_err(|_| self.invalid(key, format!("{t:?} is not an integer")))?,
        };
        if !(0..=max).contains(&n) {
            return Err(self.invalid(key, format!("{n} is out of range 0..={max} (0: off)")));
        }
        Ok((n > 0).then_some(n))
    }

    /// `keys.pkcs11_module` and `keys.pkcs11_pin_file`, both or neither;
    /// a relative PIN file is taken from `$CREDENTIALS_DIRECTORY` (systemd
    /// `LoadCredential=`) when there is one.
    fn pkcs11(
        &self,
        credentials_dir: Option<&Path>,
    ) -> Result<Option<crate::keys::pkcs11::Pkcs11Settings>, ConfigError> {
        let module = self
            .text("keys.pkcs11_module")
            .filter(|t| !t.trim().is_empty());
        let pin = self
            .text("keys.pkcs11_pin_file")
            .filter(|t| !t.trim().is_empty());
        match (module, pin) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::Missing {
                key: "keys.pkcs11_pin_file",
                hint: "keys.pkcs11_module is set: name the file holding the token's user PIN",
            }),
            (None, Some(_)) => Err(ConfigError::Missing {
                key: "keys.pkcs11_module",
                hint: "keys.pkcs11_pin_file is set: name the PKCS#11 module (.so) of the HSM",
            }),
            (Some(module), Some(pin)) => {
                let pin = PathBuf::from(pin);
                let pin_file = match credentials_dir {
                    Some(dir) if pin.is_relative() => dir.join(pin),
                    _ => pin,
                };
                Ok(Some(crate::keys::pkcs11::Pkcs11Settings::new(
                    PathBuf::from(module),
                    pin_file,
                )))
            }
        }
    }

    /// `evidence.attest_dir`: unset, or an existing directory.
    fn attest_dir(&self) -> Result<Option<PathBuf>, ConfigError> {
        const KEY: &str = "evidence.attest_dir";
        let Some(dir) = self.text(KEY).filter(|d| !d.trim().is_empty()) else {
            return Ok(None);
        };
        let path = PathBuf::from(&dir);
        if !path.is_dir() {
            return Err(self.invalid(
                KEY,
                format!(
                    "{dir:?} is not an existing directory (create it, writable by pqmig's user)"
                ),
            ));
        }
        Ok(Some(path))
    }

    /// `console.listen`: unset or empty, `off`, or an address other than
    /// `metrics.listen` (whose listener already serves the console).
    fn console_listen(&self, metrics: SocketAddr) -> Result<ConsoleListen, ConfigError> {
        const KEY: &str = "console.listen";
        let text = self.text(KEY).unwrap_or_default();
        match text.trim() {
            "" => Ok(ConsoleListen::Metrics),
            "off" => Ok(ConsoleListen::Off),
            addr => {
                let addr = addr.parse::<SocketAddr>().map_err(|e| {
                    self.invalid(
                        KEY,
                        format!("{text:?} is not an address:port or \"off\" ({e})"),
                    )
                })?;
                // Port 0 (tests) binds two different ports.
                if addr == metrics && addr.port() != 0 {
                    return Err(self.invalid(
                        KEY,
                        format!("{addr} is metrics.listen; leave console.listen unset to serve the console there"),
                    ));
                }
                Ok(ConsoleListen::Own(addr))
            }
        }
    }

    fn throttle(&self) -> Result<ThrottleConfig, ConfigError> {
        const MB: u64 = 1 << 20;
        Ok(ThrottleConfig {
            max_replication_lag_bytes: self
                .optional_int("throttle.max_replication_lag_mb", 1 << 30)?
                .map(|n| n as u64 * MB),
            max_transaction_age: self
                .duration("throttle.max_transaction_age")?
                .filter(|d| !d.is_zero()),
            max_wal_bytes_per_second: self
                .optional_int("throttle.max_wal_mb_per_second", 1 << 20)?
                .map(|n| n as u64 * MB),
            max_items_per_second: self
                .optional_int("throttle.max_items_per_second", 1 << 40)?
                .map(|n| n as f64),
            check_interval: self.positive_duration("throttle.check_interval")?,
        })
    }

    fn worker(&self) -> Result<WorkerConfig, ConfigError> {
        let concurrency = self.int_in("worker.concurrency", 4, 1024)?;
        let max_attempts = self.int_in("worker.max_attempts", 5, 1000)?;
        let d = |key| self.positive_duration(key);
        let worker = WorkerConfig {
            concurrency: NonZeroUsize::new(concurrency as usize).expect("checked range"),
            poll_interval: d("worker.poll_interval")?,
            heartbeat_interval: d("worker.heartbeat_interval")?,
            lease: d("worker.lease")?,
            rescue_interval: d("worker.rescue_interval")?,
            max_attempts: NonZeroU32::new(max_attempts as u32).expect("checked range"),
            retry_backoff: d("worker.retry_backoff")?,
            retry_backoff_max: d("worker.retry_backoff_max")?,
            shutdown_timeout: d("worker.shutdown_timeout")?,
            batch_target: d("worker.batch_target")?,
            stall_timeout: d("worker.stall_timeout")?,
            range_items: self.int_in("worker.range_items", 100_000, 1_000_000_000)?,
        };
        // A lease renewed less than twice per period expires on one slow heartbeat.
        if worker.heartbeat_interval * 2 > worker.lease {
            return Err(self.invalid(
                "worker.lease",
                format!(
                    "{} must be at least twice worker.heartbeat_interval ({})",
                    humantime::format_duration(worker.lease),
                    humantime::format_duration(worker.heartbeat_interval)
                ),
            ));
        }
        if worker.stall_timeout < worker.batch_target * 2 {
            return Err(self.invalid(
                "worker.stall_timeout",
                format!(
                    "{} must be at least twice worker.batch_target ({})",
                    humantime::format_duration(worker.stall_timeout),
                    humantime::format_duration(worker.batch_target)
                ),
            ));
        }
        if worker.retry_backoff > worker.retry_backoff_max {
            return Err(self.invalid(
                "worker.retry_backoff",
                "must not exceed worker.retry_backoff_max".into(),
            ));
        }
        Ok(worker)
    }
}
