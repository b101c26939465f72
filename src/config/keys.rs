//! The table of configuration keys — the one place a key is declared —
//! and the raw layer built from it: the TOML file, then the environment,
//! then the flags, the later source winning, each value remembering where
//! it came from for error messages.

use std::collections::BTreeMap;
use std::path::Path;

use super::ConfigError;

/// How a key's value is written in the TOML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
}

/// One configuration key (SPEC §8.2).
#[derive(Debug)]
pub struct Key {
    /// `section.name` in the TOML file.
    pub name: &'static str,
    /// Environment variables, weakest first: a later one that is set wins.
    pub env: &'static [&'static str],
    /// The command-line flag, named in error messages.
    pub flag: Option<&'static str>,
    pub kind: Kind,
    /// The default, as it would be written in the file (`None`: derived
    /// or absent); `config/pqmig.example.toml` documents these.
    pub default: Option<&'static str>,
    /// Keys that are two spellings of one setting (`url` and `url_file`):
    /// a source that gives one replaces what an earlier one gave of both.
    pub alternative_to: Option<&'static str>,
}

const fn key(name: &'static str, env: &'static [&'static str], kind: Kind) -> Key {
    Key {
        name,
        env,
        flag: None,
        kind,
        default: None,
        alternative_to: None,
    }
}

impl Key {
    const fn flag(mut self, flag: &'static str) -> Key {
        self.flag = Some(flag);
        self
    }

    const fn default(mut self, default: &'static str) -> Key {
        self.default = Some(default);
        self
    }

    const fn alternative_to(mut self, other: &'static str) -> Key {
        self.alternative_to = Some(other);
        self
    }
}

use Kind::{Int, Text};

/// Every key pqmig reads.
pub const KEYS: &[Key] = &[
    key(
        "database.url",
        &["DATABASE_URL", "PQMIG_DATABASE_URL"],
        Text,
    )
    .flag("--database-url")
    .alternative_to("database.url_file"),
    key("database.url_file", &["PQMIG_DATABASE_URL_FILE"], Text).alternative_to("database.url"),
    key(
        "database.password_file",
        &["PQMIG_DATABASE_PASSWORD_FILE"],
        Text,
    ),
    key("database.sslmode", &[], Text),
    key("database.sslrootcert", &[], Text),
    key("database.pool_size", &[], Int),
    key("database.connect_timeout", &[], Text).default("10s"),
    key("database.pool_wait_timeout", &[], Text).default("10s"),
    key("database.statement_timeout", &[], Text).default("60s"),
    key("database.lock_timeout", &[], Text).default("10s"),
    key("database.idle_in_transaction_timeout", &[], Text).default("60s"),
    key("worker.concurrency", &["PQMIG_CONCURRENCY"], Int)
        .flag("--concurrency")
        .default("4"),
    key("worker.poll_interval", &["PQMIG_POLL_INTERVAL"], Text).default("1s"),
    key(
        "worker.heartbeat_interval",
        &["PQMIG_HEARTBEAT_INTERVAL"],
        Text,
    )
    .default("15s"),
    key("worker.lease", &["PQMIG_LEASE"], Text).default("60s"),
    key("worker.rescue_interval", &["PQMIG_RESCUE_INTERVAL"], Text).default("15s"),
    key("worker.max_attempts", &["PQMIG_MAX_ATTEMPTS"], Int).default("5"),
    key("worker.retry_backoff", &[], Text).default("30s"),
    key("worker.retry_backoff_max", &[], Text).default("1h"),
    // Kubernetes sends SIGKILL 30 s after SIGTERM by default.
    key("worker.shutdown_timeout", &["PQMIG_SHUTDOWN_TIMEOUT"], Text).default("25s"),
    key("worker.batch_target", &["PQMIG_BATCH_TARGET"], Text).default("1s"),
    // A walk that commits no batch for this long (its throttle, pace and
    // pause waits not counted) gives its range back.
    key("worker.stall_timeout", &["PQMIG_STALL_TIMEOUT"], Text).default("10m"),
    // A job is split into id ranges of about this many (estimated) items,
    // which any replica claims.
    key("worker.range_items", &["PQMIG_RANGE_ITEMS"], Int).default("100000"),
    // Batches wait while the database is unhealthy (0: that check is off).
    key(
        "throttle.max_replication_lag_mb",
        &["PQMIG_THROTTLE_REPLICATION_LAG_MB"],
        Int,
    )
    .default("1024"),
    key(
        "throttle.max_transaction_age",
        &["PQMIG_THROTTLE_TRANSACTION_AGE"],
        Text,
    )
    .default("10m"),
    key(
        "throttle.max_wal_mb_per_second",
        &["PQMIG_THROTTLE_WAL_MB_PER_SECOND"],
        Int,
    )
    .default("0"),
    // Items per second for all replicas together (0: no budget).
    key(
        "throttle.max_items_per_second",
        &["PQMIG_THROTTLE_ITEMS_PER_SECOND"],
        Int,
    )
    .default("0"),
    key(
        "throttle.check_interval",
        &["PQMIG_THROTTLE_CHECK_INTERVAL"],
        Text,
    )
    .default("5s"),
    // One replica at a time samples the exposure inventory this often.
    key("inventory.interval", &["PQMIG_INVENTORY_INTERVAL"], Text).default("10m"),
    // One replica at a time deletes finished jobs older than the retention
    // (never one whose backups are not purged), this often.
    key("maintenance.retention", &["PQMIG_RETENTION"], Text).default("30d"),
    key(
        "maintenance.interval",
        &["PQMIG_MAINTENANCE_INTERVAL"],
        Text,
    )
    .default("1h"),
    key("metrics.listen", &["PQMIG_METRICS_ADDR"], Text)
        .flag("--metrics-addr")
        .default("127.0.0.1:9464"),
    // The read-only web console: unset serves it on metrics.listen, an
    // address on a listener of its own, "off" nowhere.
    key("console.listen", &["PQMIG_CONSOLE_ADDR"], Text),
    key("keys.keyring", &["PQMIG_KEYRING"], Text).flag("--keyring"),
    key("keys.pkcs11_module", &["PQMIG_PKCS11_MODULE"], Text),
    key("keys.pkcs11_pin_file", &["PQMIG_PKCS11_PIN_FILE"], Text),
    // Default: worker.concurrency × cores (see keys::pkcs11).
    key("keys.pkcs11_sessions", &["PQMIG_PKCS11_SESSIONS"], Int),
    key("evidence.attest_dir", &["PQMIG_ATTEST_DIR"], Text),
    key("log.format", &["PQMIG_LOG_FORMAT"], Text)
        .flag("--log-format")
        .default("auto"),
    key("log.level", &["PQMIG_LOG"], Text)
        .flag("--log")
        .default("info"),
];

pub fn lookup(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

fn known(name: &'static str) -> &'static Key {
    lookup(name).unwrap_or_else(|| panic!("{name} is not in KEYS"))
}

/// A value as a source gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Int(i64),
}

/// The winning value of a key so far, and where it came from.
#[derive(Debug, Clone)]
pub struct Raw {
    pub value: Value,
    pub origin: String,
}

/// The raw layer: every key a source set, the later source winning.
#[derive(Debug, Default)]
pub struct RawConfig(BTreeMap<&'static str, Raw>);

impl RawConfig {
    /// The value of a key (`None`: no source set it).
    pub fn get(&self, name: &'static str) -> Option<&Raw> {
        self.0.get(known(name).name)
    }

    /// Where a key's value came from.
    pub fn origin(&self, name: &'static str) -> String {
        self.0
            .get(name)
            .map_or_else(|| "default".into(), |r| r.origin.clone())
    }

    /// Set a key, replacing its alternative's value.
    pub fn set(&mut self, name: &'static str, value: Value, origin: String) {
        let key = known(name);
        if let Some(other) = key.alternative_to {
            self.0.remove(other);
        }
        self.0.insert(key.name, Raw { value, origin });
    }

    /// Remember where a value came from without changing it.
    pub fn set_origin(&mut self, name: &'static str, origin: String) {
        if let Some(r) = self.0.get_mut(name) {
            r.origin = origin;
        }
    }

    /// Every key the file sets, checked against the table: an unknown key
    /// or a value of the wrong type is an error naming it and its line.
    pub fn from_toml(text: &str) -> Result<RawConfig, String> {
        use toml::Spanned;
        type Section = BTreeMap<Spanned<String>, Spanned<toml::Value>>;
        let doc: BTreeMap<Spanned<String>, Spanned<Section>> =
            toml::from_str(text).map_err(|e| {
                let mut msg = e.message().trim().replace('\n', " ");
                if let Some(span) = e.span() {
                    msg = format!("line {}: {msg}", line_of(text, span.start));
                }
                msg
            })?;
        let mut raw = RawConfig::default();
        for (section, entries) in doc {
            let known_section = KEYS
                .iter()
                .any(|k| k.name.split('.').next() == Some(section.get_ref().as_str()));
            if !known_section {
                return Err(format!(
                    "line {}: unknown section [{}]",
                    line_of(text, section.span().start),
                    section.get_ref()
                ));
            }
            for (name, value) in entries.into_inner() {
                let line = line_of(text, name.span().start);
                let full = format!("{}.{}", section.get_ref(), name.get_ref());
                let Some(key) = lookup(&full) else {
                    return Err(format!("line {line}: unknown key {full}"));
                };
                let value = match (key.kind, value.into_inner()) {
                    (Kind::Text, toml::Value::String(s)) => Value::Text(s),
                    (Kind::Int, toml::Value::Integer(n)) => Value::Int(n),
                    (kind, other) => {
                        return Err(format!(
                            "line {line}: {full} must be {}, got {}",
                            match kind {
                                Kind::Text => "a string",
                                Kind::Int => "an integer",
                            },
                            other.type_str()
                        ));
                    }
                };
                if let Some(other) = key.alternative_to
                    && raw.0.contains_key(other)
                {
                    return Err(format!(
                        "line {line}: set either {} or {}, not both",
                        key.name, other
                    ));
                }
                raw.0.insert(
                    key.name,
                    Raw {
                        value,
                        origin: String::new(),
                    },
                );
            }
        }
        Ok(raw)
    }

    /// Read a TOML file (see [`RawConfig::from_toml`]); values name the file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut raw = Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        for r in raw.0.values_mut() {
            r.origin = path.display().to_string();
        }
        Ok(raw)
    }

    /// Lay `other` over this layer (a later source).
    pub fn merge(&mut self, other: RawConfig) {
        for (name, r) in other.0 {
            self.set(name, r.value, r.origin);
        }
    }

    /// The environment variables of the table. Empty values count as unset.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<RawConfig, ConfigError> {
        let mut raw = RawConfig::default();
        for key in KEYS {
            for var in key.env {
                let Some(text) = env(var).filter(|v| !v.is_empty()) else {
                    continue;
                };
                let value = match key.kind {
                    Kind::Text => Value::Text(text),
                    Kind::Int => {
                        Value::Int(text.trim().parse().map_err(|_| ConfigError::Invalid {
                            key: key.name,
                            origin: (*var).into(),
                            reason: format!("{text:?} is not an integer"),
                        })?)
                    }
                };
                raw.set(key.name, value, (*var).into());
            }
        }
        Ok(raw)
    }

    /// Values given as flags (`key name`, value), named by their flag.
    pub fn from_flags(flags: &[(&'static str, Value)]) -> RawConfig {
        let mut raw = RawConfig::default();
        for (name, value) in flags {
            let key = known(name);
            let origin = key.flag.unwrap_or(key.name).to_owned();
            raw.set(key.name, value.clone(), origin);
        }
        raw
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}
