//! Configuration: defaults, precedence of file < environment < flags, and
//! errors that name the key, the source and the reason.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use pqmig::config::{Config, ConfigError, FlagOverrides, LogFormat, Sources};

fn load(
    file: Option<&str>,
    env: &[(&str, &str)],
    flags: FlagOverrides,
) -> Result<Config, ConfigError> {
    let tmp = file.map(|text| {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(text.as_bytes()).expect("write");
        f
    });
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |name: &str| env.get(name).cloned();
    let flags = FlagOverrides {
        config: tmp
            .as_ref()
            .map(|f| f.path().to_owned())
            .or(flags.config.clone()),
        ..flags
    };
    Config::load(&Sources {
        flags,
        env: &lookup,
    })
}

fn err(r: Result<Config, ConfigError>) -> String {
    match r {
        Ok(c) => panic!("expected a config error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_match_the_spec() {
    let c = load(None, &[], FlagOverrides::default()).expect("defaults are valid");
    assert_eq!(c.worker.concurrency.get(), 4);
    assert_eq!(c.worker.poll_interval, Duration::from_secs(1));
    assert_eq!(c.worker.heartbeat_interval, Duration::from_secs(15));
    assert_eq!(c.worker.lease, Duration::from_secs(60));
    assert_eq!(c.worker.rescue_interval, Duration::from_secs(15));
    assert_eq!(c.worker.max_attempts.get(), 5);
    assert_eq!(c.worker.retry_backoff, Duration::from_secs(30));
    assert_eq!(c.worker.retry_backoff_max, Duration::from_secs(3600));
    assert_eq!(c.worker.shutdown_timeout, Duration::from_secs(25));
    assert_eq!(c.worker.batch_target, Duration::from_secs(1));
    assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:9464");
    assert_eq!(
        c.log_format, None,
        "auto: text on a terminal, JSON otherwise"
    );
    assert!(c.database.url.is_none());
}

#[test]
fn file_then_environment_then_flags() {
    let file = r#"
        [database]
        url = "postgres://file@127.0.0.1/file"
        [worker]
        concurrency = 2
        lease = "90s"
        poll_interval = "250ms"
        [log]
        format = "text"
    "#;
    let env = [
        ("DATABASE_URL", "postgres://env@127.0.0.1/env"),
        ("PQMIG_CONCURRENCY", "6"),
        ("PQMIG_LEASE", "2m"),
    ];
    let flags = FlagOverrides {
        concurrency: Some(8),
        ..Default::default()
    };
    let c = load(Some(file), &env, flags).expect("valid");
    assert_eq!(c.worker.concurrency.get(), 8, "flag beats env and file");
    assert_eq!(c.worker.lease, Duration::from_secs(120), "env beats file");
    assert_eq!(
        c.worker.poll_interval,
        Duration::from_millis(250),
        "file beats default"
    );
    assert_eq!(
        c.database.url.as_ref().expect("url").expose(),
        "postgres://env@127.0.0.1/env"
    );
    assert_eq!(c.log_format, Some(LogFormat::Text));
    assert_eq!(
        c.database.pool_size.get(),
        12,
        "pool defaults to concurrency + 4"
    );
}

#[test]
fn pqmig_database_url_wins_over_database_url() {
    let env = [
        ("DATABASE_URL", "postgres://a@127.0.0.1/a"),
        ("PQMIG_DATABASE_URL", "postgres://b@127.0.0.1/b"),
    ];
    let c = load(None, &env, FlagOverrides::default()).expect("valid");
    assert_eq!(
        c.database.url.expect("url").expose(),
        "postgres://b@127.0.0.1/b"
    );
}

#[test]
fn bad_duration_names_key_and_source() {
    let msg = err(load(
        None,
        &[("PQMIG_LEASE", "sixty")],
        FlagOverrides::default(),
    ));
    assert!(msg.contains("worker.lease"), "{msg}");
    assert!(msg.contains("PQMIG_LEASE"), "{msg}");
    assert!(msg.contains("invalid duration"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");

    let msg = err(load(
        Some("[worker]\nheartbeat_interval = \"5 parsecs\"\n"),
        &[],
        FlagOverrides::default(),
    ));
    assert!(msg.contains("worker.heartbeat_interval"), "{msg}");
    assert!(
        msg.contains(".toml") || msg.contains("/tmp"),
        "names the file: {msg}"
    );
}

#[test]
fn zero_duration_and_out_of_range_numbers_are_rejected() {
    let msg = err(load(
        None,
        &[("PQMIG_POLL_INTERVAL", "0s")],
        FlagOverrides::default(),
    ));
    assert!(
        msg.contains("worker.poll_interval") && msg.contains("greater than zero"),
        "{msg}"
    );
    let msg = err(load(
        None,
        &[("PQMIG_CONCURRENCY", "0")],
        FlagOverrides::default(),
    ));
    assert!(
        msg.contains("worker.concurrency") && msg.contains("out of range"),
        "{msg}"
    );
    let msg = err(load(
        None,
        &[("PQMIG_MAX_ATTEMPTS", "many")],
        FlagOverrides::default(),
    ));
    assert!(
        msg.contains("worker.max_attempts") && msg.contains("PQMIG_MAX_ATTEMPTS"),
        "{msg}"
    );
}

#[test]
fn lease_must_outlast_two_heartbeats() {
    let env = [("PQMIG_HEARTBEAT_INTERVAL", "40s"), ("PQMIG_LEASE", "60s")];
    let msg = err(load(None, &env, FlagOverrides::default()));
    assert!(
        msg.contains("worker.lease") && msg.contains("heartbeat_interval"),
        "{msg}"
    );
}

#[test]
fn unknown_key_is_named() {
    let msg = err(load(
        Some("[worker]\nconcurency = 3\n"),
        &[],
        FlagOverrides::default(),
    ));
    assert!(msg.contains("concurency"), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
    let msg = err(load(Some("[wroker]\n"), &[], FlagOverrides::default()));
    assert!(msg.contains("wroker"), "{msg}");
}

#[test]
fn wrong_type_in_file_is_named() {
    let msg = err(load(
        Some("[worker]\nconcurrency = \"four\"\n"),
        &[],
        FlagOverrides::default(),
    ));
    assert!(msg.contains("line 2"), "{msg}");
}

#[test]
fn missing_database_url_says_how_to_set_it() {
    let c = load(None, &[], FlagOverrides::default()).expect("valid without url");
    let msg = c.database.require_url().expect_err("no url").to_string();
    assert!(msg.contains("database.url"), "{msg}");
    assert!(msg.contains("DATABASE_URL"), "{msg}");
}

#[test]
fn bad_values_are_named() {
    let cases = [
        ("PQMIG_METRICS_ADDR", "localhost", "metrics.listen"),
        ("PQMIG_LOG_FORMAT", "xml", "log.format"),
        ("DATABASE_URL", "postgres://u@h:notaport/db", "database.url"),
    ];
    for (var, value, key) in cases {
        let msg = err(load(None, &[(var, value)], FlagOverrides::default()));
        assert!(
            msg.contains(key) && msg.contains(var),
            "{var}={value}: {msg}"
        );
    }
}

#[test]
fn missing_config_file_is_an_error() {
    let flags = FlagOverrides {
        config: Some("/nonexistent/pqmig.toml".into()),
        ..Default::default()
    };
    let msg = err(load(None, &[], flags));
    assert!(msg.contains("/nonexistent/pqmig.toml"), "{msg}");
}

#[test]
fn password_never_shows_in_debug_or_errors() {
    let env = [(
        "DATABASE_URL",
        "postgres://app:s3cr3t-pw@db.internal:5432/app",
    )];
    let c = load(None, &env, FlagOverrides::default()).expect("valid");
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cr3t-pw"), "{debug}");
    assert!(debug.contains("app:***@db.internal"), "{debug}");
    let kv = pqmig::config::redact_url("host=db user=app password=s3cr3t-pw dbname=app");
    assert!(
        !kv.contains("s3cr3t-pw") && kv.contains("password=***"),
        "{kv}"
    );

    let env = [(
        "DATABASE_URL",
        "postgres://app:s3cr3t-pw@db.internal:notaport/app",
    )];
    let msg = err(load(None, &env, FlagOverrides::default()));
    assert!(!msg.contains("s3cr3t-pw"), "{msg}");
}

/// The example file documents every key with its default value.
#[test]
fn example_config_documents_every_key_with_its_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pqmig.example.toml");
    let text = std::fs::read_to_string(path).expect("example config");
    let flags = FlagOverrides {
        config: Some(path.into()),
        ..Default::default()
    };
    let example = load(None, &[], flags).expect("example config is valid");
    let defaults = load(None, &[], FlagOverrides::default()).expect("defaults");
    // Same values as the built-in defaults (the URL aside, which has none).
    let strip = |c: &Config| {
        let mut c = c.clone();
        c.database.url = None;
        c.file = None;
        format!("{c:?}")
    };
    assert_eq!(strip(&example), strip(&defaults));

    // Every key the loader accepts appears in the example, set to its
    // default or (where the default is derived or absent) commented out.
    let mut documented = Vec::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((lhs, _)) = line.trim_start_matches('#').split_once('=') {
            let name = lhs.trim();
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                documented.push(format!("{section}.{name}"));
            }
        }
    }
    let mut expected: Vec<String> = [
        "database.url",
        "database.pool_size",
        "database.connect_timeout",
        "worker.concurrency",
        "worker.poll_interval",
        "worker.heartbeat_interval",
        "worker.lease",
        "worker.rescue_interval",
        "worker.max_attempts",
        "worker.retry_backoff",
        "worker.retry_backoff_max",
        "worker.shutdown_timeout",
        "worker.batch_target",
        "metrics.listen",
        "keys.keyring",
        "log.format",
        "log.level",
    ]
    .map(String::from)
    .to_vec();
    documented.sort();
    expected.sort();
    assert_eq!(documented, expected);
}
