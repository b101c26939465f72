//! The `[database]` settings: the connection string and where its secrets
//! come from (the URL, a URL or password file, systemd credentials), TLS,
//! per-session timeouts and the pool. Secrets are zeroized when dropped and
//! print as `***` in every `Debug`, `Display` and error.

use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use zeroize::Zeroizing;

use super::connstring::redact_url;
use super::connstring::split_conn_string;
use super::{ConfigError, RawDatabase, Values};

/// Names of the files pqmig picks up from `$CREDENTIALS_DIRECTORY` (systemd
/// `LoadCredential=`) when no other source names a URL or password file.
pub const CREDENTIAL_URL: &str = "database-url";
pub const CREDENTIAL_PASSWORD: &str = "database-password";

/// A secret string (a password): zeroized on drop, `***` when printed.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(s: &str) -> Secret {
        Secret(Zeroizing::new(s.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A database URL whose password never reaches `Debug` or `Display`.
#[derive(Clone)]
pub struct DatabaseUrl(Zeroizing<String>);

impl DatabaseUrl {
    pub fn new(url: &str) -> DatabaseUrl {
        DatabaseUrl(Zeroizing::new(url.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The same server and credentials, another database.
    pub fn with_database(&self, dbname: &str) -> Result<DatabaseUrl, ConfigError> {
        let url: &str = &self.0;
        let Some(authority_start) = url.find("://").map(|i| i + 3) else {
            // key=value form: a later dbname wins.
            return Ok(DatabaseUrl::new(&format!("{url} dbname={dbname}")));
        };
        let (head, query) = match url.find('?') {
            Some(q) => (&url[..q], &url[q..]),
            None => (url, ""),
        };
        let base = match head[authority_start..].find('/') {
            Some(slash) => &head[..authority_start + slash],
            None => head,
        };
        Ok(DatabaseUrl::new(&format!("{base}/{dbname}{query}")))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `sslmode` as libpq defines it. `allow` (plaintext first) is not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, plaintext otherwise; the certificate
    /// is checked only against a configured `sslrootcert`.
    Prefer,
    /// TLS or fail; the certificate is checked only against a configured
    /// `sslrootcert` (libpq's compatibility rule: then it acts as verify-ca).
    Require,
    /// TLS, certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, chain checked and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s.trim() {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "\"allow\" (plaintext first) is not supported; use prefer, require, verify-ca or verify-full"
                        .into(),
                );
            }
            other => {
                return Err(format!(
                    "{other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The CA certificates of `sslrootcert`, read once at start-up.
#[derive(Clone)]
pub struct RootCerts {
    pub path: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for RootCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RootCerts({}, {} certificates)",
            self.path.display(),
            self.certs.len()
        )
    }
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: Option<DatabaseUrl>,
    /// From `password_file`; replaces the URL's (which must then have none).
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<RootCerts>,
    pub pool_size: NonZeroUsize,
    pub connect_timeout: Duration,
    /// How long a caller waits for a free pooled connection.
    pub pool_wait_timeout: Duration,
    /// Session settings sent with every connection; `None`: pqmig sets
    /// nothing and the server's (or role's) default applies.
    pub statement_timeout: Option<Duration>,
    pub lock_timeout: Option<Duration>,
    pub idle_in_transaction_timeout: Option<Duration>,
}

impl DatabaseConfig {
    /// The URL, or an error naming every way to set it.
    pub fn require_url(&self) -> Result<&DatabaseUrl, ConfigError> {
        self.url.as_ref().ok_or(ConfigError::Missing {
            key: "database.url",
            hint: "set DATABASE_URL (or PQMIG_DATABASE_URL, PQMIG_DATABASE_URL_FILE), --database-url, or [database] url / url_file in the config file",
        })
    }
}

/// A path as given, or relative to `$CREDENTIALS_DIRECTORY` when that is
/// set and the path is relative (systemd `LoadCredential=name:…` → `name`).
fn resolve(path: &Path, credentials: Option<&Path>) -> PathBuf {
    match credentials {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_owned(),
    }
}

/// Read a secret from a file into zeroizing memory. The error names the
/// file, never its content.
fn read_secret(
    key: &'static str,
    origin: &str,
    path: &Path,
    trim_all: bool,
) -> Result<Zeroizing<String>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        key,
        origin: origin.to_owned(),
        reason,
    };
    let bytes = Zeroizing::new(
        std::fs::read(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?,
    );
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| invalid(format!("{} is not UTF-8 text", path.display())))?;
    // `echo pw > file` leaves a newline that is not part of the password.
    let text = if trim_all {
        text.trim()
    } else {
        text.strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text)
    };
    if text.is_empty() {
        return Err(invalid(format!("{} is empty", path.display())));
    }
    Ok(Zeroizing::new(text.to_owned()))
}

fn read_root_certs(path: &Path, origin: &str) -> Result<RootCerts, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        key: "database.sslrootcert",
        origin: origin.to_owned(),
        reason,
    };
    if path.as_os_str() == "system" {
        return Err(invalid(
            "\"system\" is not supported; give the path of a PEM bundle instead (e.g. /etc/ssl/certs/ca-certificates.crt)".into(),
        ));
    }
    let pem =
        std::fs::read(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            invalid(format!(
                "{} is not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(RootCerts {
        path: path.to_owned(),
        certs,
    })
}

/// A session timeout: a humantime duration, `0` for "leave the server's
/// setting alone". PostgreSQL takes whole milliseconds up to 2^31 - 1.
fn session_timeout(key: &'static str, v: &Values<'_>) -> Result<Option<Duration>, ConfigError> {
    let text = v.text(key).unwrap_or_default();
    if text.trim() == "0" {
        return Ok(None);
    }
    let Some(d) = v.duration(key)?.filter(|d| !d.is_zero()) else {
        return Ok(None);
    };
    if d < Duration::from_millis(1) || d.as_millis() > i32::MAX as u128 {
        return Err(v.invalid(
            key,
            format!("{text:?} is out of range 1ms..24days (or 0 to leave it to the server)"),
        ));
    }
    Ok(Some(d))
}

/// Validate `[database]`. `pool_default` is derived from the worker
/// concurrency; `batch_target` bounds the statement timeout from below.
pub(super) fn validate(
    d: RawDatabase,
    v: &Values<'_>,
    pool_default: i64,
    batch_target: Duration,
) -> Result<DatabaseConfig, ConfigError> {
    let invalid = |key: &'static str, reason: String| v.invalid(key, reason);
    let creds = d.credentials_dir.as_deref();

    // The URL, given inline or read from a file.
    let url_text: Option<(Zeroizing<String>, &'static str)> = match (&d.url, &d.url_file) {
        (Some(u), _) => Some((Zeroizing::new(u.clone()), "database.url")),
        (None, Some(path)) => {
            let path = resolve(path, creds);
            let origin = format!("{}, file {}", v.origin("database.url_file"), path.display());
            Some((
                read_secret("database.url_file", &origin, &path, true)?,
                "database.url_file",
            ))
        }
        (None, None) => None,
    };
    let mut sslmode_from_url = None;
    let mut rootcert_from_url = None;
    let mut url_has_password = false;
    let url = match url_text {
        Some((text, key)) => {
            let split = split_conn_string(&text).map_err(|e| {
                invalid(
                    key,
                    format!("not a valid PostgreSQL connection string: {e}"),
                )
            })?;
            // The error text never echoes the URL, which may hold a password.
            let pg = tokio_postgres::Config::from_str(&split.rest).map_err(|e| {
                invalid(
                    key,
                    format!("not a valid PostgreSQL connection string: {e}"),
                )
            })?;
            url_has_password = pg.get_password().is_some();
            sslmode_from_url = split.sslmode;
            rootcert_from_url = split.sslrootcert;
            Some(DatabaseUrl(text))
        }
        None => None,
    };
    let url_origin = if d.url.is_some() {
        v.origin("database.url")
    } else {
        v.origin("database.url_file")
    };

    let password = match &d.password_file {
        Some(path) => {
            let path = resolve(path, creds);
            let origin = format!(
                "{}, file {}",
                v.origin("database.password_file"),
                path.display()
            );
            if url_has_password {
                return Err(invalid(
                    "database.password_file",
                    format!(
                        "the database URL (from {url_origin}) carries a password too; keep one of them"
                    ),
                ));
            }
            Some(Secret(read_secret(
                "database.password_file",
                &origin,
                &path,
                false,
            )?))
        }
        None => None,
    };

    // TLS: from the URL or the config keys; a disagreement is an error
    // rather than a silent choice between a strict and a lax setting.
    let key_mode = d
        .sslmode
        .as_deref()
        .map(|m| SslMode::from_str(m).map_err(|e| invalid("database.sslmode", e)))
        .transpose()?;
    let url_mode = sslmode_from_url
        .as_deref()
        .map(|m| {
            SslMode::from_str(m)
                .map_err(|e| invalid("database.url", format!("sslmode in the URL: {e}")))
        })
        .transpose()?;
    let sslmode = match (key_mode, url_mode) {
        (Some(k), Some(u)) if k != u => {
            return Err(invalid(
                "database.sslmode",
                format!(
                    "{k} disagrees with sslmode={u} in the database URL (from {url_origin}); set it in one place"
                ),
            ));
        }
        (k, u) => k.or(u).unwrap_or(SslMode::Prefer),
    };
    let key_root = d.sslrootcert.as_ref().map(|p| resolve(p, creds));
    let url_root = rootcert_from_url.map(|p| resolve(Path::new(&p), creds));
    let root_path = match (key_root, url_root) {
        (Some(k), Some(u)) if k != u => {
            return Err(invalid(
                "database.sslrootcert",
                format!(
                    "{} disagrees with sslrootcert={} in the database URL (from {url_origin}); set it in one place",
                    k.display(),
                    u.display()
                ),
            ));
        }
        (Some(k), _) => Some((k, v.origin("database.sslrootcert"))),
        (None, Some(u)) => Some((u, url_origin.clone())),
        (None, None) => None,
    };
    let sslrootcert = match (&root_path, sslmode) {
        // libpq ignores the CA without TLS; so do we (no file to read).
        (_, SslMode::Disable) => None,
        (Some((path, origin)), _) => Some(read_root_certs(path, origin)?),
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(invalid(
                "database.sslmode",
                format!(
                    "{sslmode} needs the CA that signed the server's certificate: set database.sslrootcert (or sslrootcert= in the URL)"
                ),
            ));
        }
        (None, _) => None,
    };

    let pool_size = v.int_in("database.pool_size", pool_default, 1000)?;
    let statement_timeout = session_timeout("database.statement_timeout", v)?;
    if let Some(st) = statement_timeout
        && st <= batch_target
    {
        return Err(invalid(
            "database.statement_timeout",
            format!(
                "{} must be longer than worker.batch_target ({}), or every batch would time out",
                humantime::format_duration(st),
                humantime::format_duration(batch_target)
            ),
        ));
    }
    Ok(DatabaseConfig {
        url,
        password,
        sslmode,
        sslrootcert,
        pool_size: NonZeroUsize::new(pool_size as usize).expect("checked range"),
        connect_timeout: v.positive_duration("database.connect_timeout")?,
        pool_wait_timeout: v.positive_duration("database.pool_wait_timeout")?,
        statement_timeout,
        lock_timeout: session_timeout("database.lock_timeout", v)?,
        idle_in_transaction_timeout: session_timeout("database.idle_in_transaction_timeout", v)?,
    })
}
