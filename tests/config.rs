//! Configuration: defaults, precedence of file < environment < flags, and
//! errors that name the key, the source and the reason.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use pqmig::config::{Config, ConfigError, FlagOverrides, LogFormat, Sources, SslMode};

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
    assert_eq!(c.worker.stall_timeout, Duration::from_secs(600));
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
        19,
        "pool defaults to 2 × concurrency + 3 (batch and read-ahead per walk)"
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
fn stall_timeout_must_outlast_two_batches() {
    let env = [("PQMIG_STALL_TIMEOUT", "3s"), ("PQMIG_BATCH_TARGET", "2s")];
    let msg = err(load(None, &env, FlagOverrides::default()));
    assert!(
        msg.contains("worker.stall_timeout") && msg.contains("worker.batch_target"),
        "{msg}"
    );
    let env = [("PQMIG_STALL_TIMEOUT", "4s"), ("PQMIG_BATCH_TARGET", "2s")];
    let c = load(None, &env, FlagOverrides::default()).expect("twice is enough");
    assert_eq!(c.worker.stall_timeout, Duration::from_secs(4));
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
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                documented.push(format!("{section}.{name}"));
            }
        }
    }
    // The table of keys is the one place a key is declared.
    let mut expected: Vec<String> = pqmig::config::KEYS
        .iter()
        .map(|k| k.name.to_owned())
        .collect();
    assert_eq!(expected.len(), 40);
    documented.sort();
    expected.sort();
    assert_eq!(documented, expected);
}

/// A file in a private temporary directory (kept alive by the returned dir).
fn secret_file(name: &str, content: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, content).expect("write");
    (dir, path)
}

fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("ca").pem()
}

#[test]
fn database_defaults() {
    let c = load(None, &[], FlagOverrides::default()).expect("defaults");
    let d = &c.database;
    assert_eq!(d.sslmode, SslMode::Prefer, "libpq's default");
    assert!(d.sslrootcert.is_none() && d.password.is_none());
    assert_eq!(d.connect_timeout, Duration::from_secs(10));
    assert_eq!(d.pool_wait_timeout, Duration::from_secs(10));
    assert_eq!(d.statement_timeout, Some(Duration::from_secs(60)));
    assert_eq!(d.lock_timeout, Some(Duration::from_secs(10)));
    assert_eq!(d.idle_in_transaction_timeout, Some(Duration::from_secs(60)));
    assert_eq!(d.pool_size.get(), 11, "2 × concurrency 4 + 3");
}

#[test]
fn session_timeouts_zero_and_bounds() {
    let file = "[database]\nstatement_timeout = \"0\"\nlock_timeout = \"0s\"\nidle_in_transaction_timeout = \"1500ms\"\n";
    let c = load(Some(file), &[], FlagOverrides::default()).expect("valid");
    assert_eq!(
        c.database.statement_timeout, None,
        "0 leaves it to the server"
    );
    assert_eq!(c.database.lock_timeout, None);
    assert_eq!(
        c.database.idle_in_transaction_timeout,
        Some(Duration::from_millis(1500))
    );

    let msg = err(load(
        Some("[database]\nstatement_timeout = \"500ms\"\n"),
        &[],
        FlagOverrides::default(),
    ));
    assert!(
        msg.contains("database.statement_timeout") && msg.contains("worker.batch_target"),
        "{msg}"
    );
    let msg = err(load(
        Some("[database]\nlock_timeout = \"30 days\"\n"),
        &[],
        FlagOverrides::default(),
    ));
    assert!(
        msg.contains("database.lock_timeout") && msg.contains("out of range"),
        "{msg}"
    );
    let msg = err(load(
        Some("[database]\nlock_timeout = \"soon\"\n"),
        &[],
        FlagOverrides::default(),
    ));
    assert!(
        msg.contains("database.lock_timeout") && msg.contains("invalid duration"),
        "{msg}"
    );
}

#[test]
fn password_file_is_read_and_never_printed() {
    let (_dir, path) = secret_file("pw", "Pa55-from-file\n");
    let env = [
        ("DATABASE_URL", "postgres://app@db.internal/app"),
        (
            "PQMIG_DATABASE_PASSWORD_FILE",
            path.to_str().expect("utf-8"),
        ),
    ];
    let c = load(None, &env, FlagOverrides::default()).expect("valid");
    let pw = c.database.password.as_ref().expect("password");
    assert_eq!(
        pw.expose(),
        "Pa55-from-file",
        "one trailing newline dropped"
    );
    let debug = format!("{c:?}");
    assert!(!debug.contains("Pa55-from-file"), "{debug}");

    // A URL with a password of its own conflicts; the error hides both.
    let env = [
        ("DATABASE_URL", "postgres://app:url-pw-9@db.internal/app"),
        (
            "PQMIG_DATABASE_PASSWORD_FILE",
            path.to_str().expect("utf-8"),
        ),
    ];
    let msg = err(load(None, &env, FlagOverrides::default()));
    assert!(
        msg.contains("database.password_file") && msg.contains("DATABASE_URL"),
        "{msg}"
    );
    assert!(!msg.contains("url-pw-9") && !msg.contains("Pa55"), "{msg}");
}

#[test]
fn unreadable_or_empty_secret_files_are_named() {
    let env = [
        ("DATABASE_URL", "postgres://app@db/app"),
        ("PQMIG_DATABASE_PASSWORD_FILE", "/nonexistent/pw"),
    ];
    let msg = err(load(None, &env, FlagOverrides::default()));
    assert!(
        msg.contains("database.password_file")
            && msg.contains("/nonexistent/pw")
            && msg.contains("PQMIG_DATABASE_PASSWORD_FILE"),
        "{msg}"
    );
    let (_dir, path) = secret_file("url", "\n");
    let msg = err(load(
        None,
        &[("PQMIG_DATABASE_URL_FILE", path.to_str().expect("utf-8"))],
        FlagOverrides::default(),
    ));
    assert!(
        msg.contains("database.url_file") && msg.contains("is empty"),
        "{msg}"
    );
    // A file that is not a connection string: named, its content not echoed.
    let (_dir, path) = secret_file("url", "postgres://u:hidden-pw@h:notaport/db\n");
    let msg = err(load(
        None,
        &[("PQMIG_DATABASE_URL_FILE", path.to_str().expect("utf-8"))],
        FlagOverrides::default(),
    ));
    assert!(msg.contains("database.url_file"), "{msg}");
    assert!(!msg.contains("hidden-pw"), "{msg}");
}

#[test]
fn url_file_and_url_are_one_setting() {
    let (_dir, path) = secret_file("url", "  postgres://f:file-pw@127.0.0.1/f \n");
    let p = path.to_str().expect("utf-8");
    // PQMIG_DATABASE_URL_FILE beats both URL variables of the same source.
    let env = [
        ("DATABASE_URL", "postgres://a@127.0.0.1/a"),
        ("PQMIG_DATABASE_URL", "postgres://b@127.0.0.1/b"),
        ("PQMIG_DATABASE_URL_FILE", p),
    ];
    let c = load(None, &env, FlagOverrides::default()).expect("valid");
    let url = c.database.url.as_ref().expect("url");
    assert_eq!(url.expose(), "postgres://f:file-pw@127.0.0.1/f", "trimmed");
    assert!(!format!("{c:?}").contains("file-pw"));

    // A later source wins whichever form it uses.
    let file = format!("[database]\nurl_file = {p:?}\n");
    let c = load(
        Some(&file),
        &[("DATABASE_URL", "postgres://env@127.0.0.1/env")],
        FlagOverrides::default(),
    )
    .expect("valid");
    assert_eq!(
        c.database.url.expect("url").expose(),
        "postgres://env@127.0.0.1/env"
    );
    let flags = FlagOverrides {
        database_url: Some("postgres://flag@127.0.0.1/flag".into()),
        ..Default::default()
    };
    let c = load(None, &[("PQMIG_DATABASE_URL_FILE", p)], flags).expect("valid");
    assert_eq!(
        c.database.url.expect("url").expose(),
        "postgres://flag@127.0.0.1/flag"
    );

    // Both in one file is ambiguous.
    let file = format!("[database]\nurl = \"postgres://x@h/x\"\nurl_file = {p:?}\n");
    let msg = err(load(Some(&file), &[], FlagOverrides::default()));
    assert!(
        msg.contains("database.url_file") && msg.contains("not both"),
        "{msg}"
    );
}

#[test]
fn systemd_credentials_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("database-url"),
        "postgres://pqmig@127.0.0.1/app\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("database-password"), "cred-pw").expect("write");
    std::fs::write(dir.path().join("other-pw"), "other-cred-pw\n").expect("write");
    let creds = dir.path().to_str().expect("utf-8");

    let c = load(
        None,
        &[("CREDENTIALS_DIRECTORY", creds)],
        FlagOverrides::default(),
    )
    .expect("valid");
    assert_eq!(
        c.database.url.as_ref().expect("url").expose(),
        "postgres://pqmig@127.0.0.1/app"
    );
    assert_eq!(c.database.password.expect("password").expose(), "cred-pw");

    // Relative paths are taken from $CREDENTIALS_DIRECTORY; an explicit
    // URL wins over the credential.
    let env = [
        ("CREDENTIALS_DIRECTORY", creds),
        ("DATABASE_URL", "postgres://env@127.0.0.1/env"),
        ("PQMIG_DATABASE_PASSWORD_FILE", "other-pw"),
    ];
    let c = load(None, &env, FlagOverrides::default()).expect("valid");
    assert_eq!(
        c.database.url.as_ref().expect("url").expose(),
        "postgres://env@127.0.0.1/env"
    );
    assert_eq!(
        c.database.password.expect("password").expose(),
        "other-cred-pw"
    );
}

#[test]
fn tls_settings_from_url_or_keys() {
    let (_dir, ca) = secret_file("ca.pem", &ca_pem());
    let ca = ca.to_str().expect("utf-8");
    let enc = ca.replace('/', "%2F");

    let url = format!("postgres://app@db.internal/app?sslmode=verify-full&sslrootcert={enc}");
    let c = load(None, &[("DATABASE_URL", &url)], FlagOverrides::default()).expect("valid");
    assert_eq!(c.database.sslmode, SslMode::VerifyFull);
    let rc = c.database.sslrootcert.as_ref().expect("root certs");
    assert_eq!((rc.path.to_str(), rc.certs.len()), (Some(ca), 1));

    let kv = format!("host=db.internal user=app sslmode=verify-ca sslrootcert='{ca}'");
    let c = load(None, &[("DATABASE_URL", &kv)], FlagOverrides::default()).expect("valid");
    assert_eq!(c.database.sslmode, SslMode::VerifyCa);

    let file = format!("[database]\nsslmode = \"verify-full\"\nsslrootcert = {ca:?}\n");
    let c = load(
        Some(&file),
        &[(
            "DATABASE_URL",
            "postgres://app@db.internal/app?sslmode=verify-full",
        )],
        FlagOverrides::default(),
    )
    .expect("agreeing URL and key");
    assert_eq!(c.database.sslmode, SslMode::VerifyFull);

    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(String, Env, &str); 5] = [
        (
            "[database]\nsslmode = \"require\"\n".into(),
            &[("DATABASE_URL", "postgres://a@h/a?sslmode=verify-full")],
            "disagrees with sslmode=verify-full",
        ),
        (
            "[database]\nsslmode = \"verify-full\"\n".into(),
            &[],
            "needs the CA",
        ),
        (
            "[database]\nsslmode = \"allow\"\n".into(),
            &[],
            "not supported",
        ),
        (
            "[database]\nsslmode = \"strict\"\n".into(),
            &[],
            "is not one of",
        ),
        (
            "[database]\nsslmode = \"verify-ca\"\nsslrootcert = \"/etc/hostname\"\n".into(),
            &[],
            "no PEM certificate",
        ),
    ];
    for (file, env, needle) in cases {
        let msg = err(load(Some(&file), env, FlagOverrides::default()));
        assert!(
            msg.contains(needle) && msg.contains("database.ssl"),
            "{file}: {msg}"
        );
    }
}

#[test]
fn redaction_covers_awkward_passwords() {
    use pqmig::config::redact_url;
    for (url, secret) in [
        ("postgres://u:p@ss@host/db", "ss@"),
        ("postgres://u:pa/ss@host/db", "pa/ss"),
        ("postgres://u:pa?ss@host/db?sslmode=require", "pa?ss"),
        (
            "postgres://u@host/db?password=qu3ry-pw&sslmode=require",
            "qu3ry-pw",
        ),
        ("host=h user=u password='two words' dbname=d", "words"),
        ("host=h password=a\\ b", "a\\"),
        ("host=h password='unterminated", "unterminated"),
    ] {
        let red = redact_url(url);
        assert!(!red.contains(secret), "{url} -> {red}");
    }
    assert_eq!(
        redact_url("postgres://u:pw@host:5432/db?sslmode=require"),
        "postgres://u:***@host:5432/db?sslmode=require"
    );
}

#[test]
fn a_malformed_key_value_string_is_not_echoed() {
    let msg = err(load(
        None,
        &[("DATABASE_URL", "host=h password=half other-half-pw")],
        FlagOverrides::default(),
    ));
    assert!(msg.contains("database.url"), "{msg}");
    assert!(!msg.contains("half"), "{msg}");
}

#[test]
fn the_pkcs11_provider_needs_its_module_and_pin_file_together() {
    let none = load(None, &[], FlagOverrides::default()).expect("valid");
    assert_eq!(none.pkcs11, None);
    let module = ("PQMIG_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so");
    let said = err(load(None, &[module], FlagOverrides::default()));
    assert!(said.starts_with("keys.pkcs11_pin_file: missing"), "{said}");
    let said = err(load(
        None,
        &[("PQMIG_PKCS11_PIN_FILE", "/run/pin")],
        FlagOverrides::default(),
    ));
    assert!(said.starts_with("keys.pkcs11_module: missing"), "{said}");
    // A relative PIN file is a systemd credential.
    let creds = tempfile::tempdir().unwrap();
    let dir = creds.path().display().to_string();
    let c = load(
        None,
        &[
            module,
            ("PQMIG_PKCS11_PIN_FILE", "pkcs11-pin"),
            ("CREDENTIALS_DIRECTORY", dir.as_str()),
        ],
        FlagOverrides::default(),
    )
    .expect("valid");
    let p = c.pkcs11.expect("pkcs11 settings");
    assert_eq!(p.pin_file, creds.path().join("pkcs11-pin"));
    assert_eq!(p.module.display().to_string(), module.1);
}
