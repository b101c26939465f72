//! Everything that talks to PostgreSQL: connections, the pool and (in the
//! submodules) one function per statement.
//!
//! - [`tls`]: rustls with libpq's `sslmode` semantics, for every connection.
//! - [`migrate`]: applying `migrations/` and checking the schema version.
//! - [`lock`]: a session advisory lock on a pooled connection, for work one
//!   replica at a time does (the inventory's counting pass).
//!
//! Every connection carries pqmig's session settings as startup `options`
//! (`statement_timeout`, `lock_timeout`, `idle_in_transaction_session_timeout`)
//! and an `application_name` naming the process, so they hold from the first
//! statement, survive `RESET ALL`, and cost no round trip. The URL's own
//! `options` come after them and win.

pub mod algorithms;
pub mod audit;
pub mod backups;
pub mod evidence;

pub mod filter;
pub mod hashes;
pub mod health;
pub mod inventory;
pub mod jobs;
pub mod kms;
pub mod leases;
pub mod lock;
pub mod maintenance;
pub mod migrate;
pub mod pauses;
pub mod ranges;
pub mod sample;
pub mod signatures;
pub mod status;
pub mod tls;
pub mod wrappers;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};

use crate::config::DatabaseConfig;

/// About the most bytes of values one batch statement carries. A
/// tokio-postgres connection keeps buffers as large as the largest message
/// it has sent (the codec's write buffer and the client's encode buffer)
/// for as long as it lives: with each batch in one statement every pooled
/// connection that ever wrote a batch held twice its size, and a long
/// job's RSS stepped up each time the pool opened one more connection
/// (README's Benchmarks). So a batch is written as a few statements of
/// about this size, in its one transaction.
pub const STATEMENT_BYTES: usize = 256 << 10;

/// Bytes counted for a JSON value in [`statement_chunks`] weights (the
/// values written are small objects; an estimate saves serialising twice).
pub const JSON_WEIGHT: usize = 256;

/// Consecutive ranges covering `0..n`, each of items weighing (by
/// `weight`, in bytes) at most [`STATEMENT_BYTES`] together, or of one
/// item heavier than that.
pub fn statement_chunks(n: usize, weight: impl Fn(usize) -> usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for i in 0..n {
        let w = weight(i);
        if i > start && bytes + w > STATEMENT_BYTES {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += w;
    }
    if start < n {
        out.push(start..n);
    }
    out
}

/// The name CLI connections show in `pg_stat_activity`; the daemon's add
/// their worker id.
pub const APPLICATION_NAME: &str = "pqmig";

/// The connection config: the URL without the TLS keys tokio-postgres does
/// not know, the password file, pqmig's session settings and defaults for
/// what the URL leaves unsaid.
fn pg_config(
    cfg: &DatabaseConfig,
    application_name: &str,
) -> Result<tokio_postgres::Config, crate::config::ConfigError> {
    use crate::config::SslMode;
    use tokio_postgres::config::SslMode as PgSslMode;

    let url = cfg.require_url()?;
    let split = crate::config::split_conn_string(url.expose()).expect("validated in config");
    let mut pg: tokio_postgres::Config = split.rest.parse().expect("validated in config");
    if let Some(password) = &cfg.password {
        pg.password(password.expose());
    }
    pg.ssl_mode(match cfg.sslmode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    });
    if !split.names("connect_timeout") {
        pg.connect_timeout(cfg.connect_timeout);
    }
    if !split.names("application_name") {
        pg.application_name(application_name);
    }
    // A peer that vanished without a FIN/RST (failover, a dropped NAT entry)
    // is noticed in about a minute instead of the kernel's two hours.
    if !split.names("keepalives_idle") {
        pg.keepalives_idle(Duration::from_secs(30));
    }
    if !split.names("keepalives_interval") {
        pg.keepalives_interval(Duration::from_secs(10));
    }
    if !split.names("keepalives_retries") {
        pg.keepalives_retries(3);
    }
    let mut options: Vec<String> = [
        ("statement_timeout", cfg.statement_timeout),
        ("lock_timeout", cfg.lock_timeout),
        (
            "idle_in_transaction_session_timeout",
            cfg.idle_in_transaction_timeout,
        ),
    ]
    .into_iter()
    .filter_map(|(name, d)| d.map(|d| format!("-c {name}={}", millis(d))))
    .collect();
    if let Some(own) = pg.get_options() {
        options.push(own.to_owned());
    }
    if !options.is_empty() {
        pg.options(options.join(" "));
    }
    Ok(pg)
}

/// The host when pqmig would talk to a remote server without checking its
/// certificate and name (anything below verify-full), for a start-up warning.
pub fn unverified_remote_host(cfg: &DatabaseConfig) -> Option<String> {
    use tokio_postgres::config::Host;
    if cfg.sslmode == crate::config::SslMode::VerifyFull {
        return None;
    }
    let pg = pg_config(cfg, APPLICATION_NAME).ok()?;
    pg.get_hosts().iter().find_map(|h| match h {
        Host::Tcp(name) => {
            let loopback = name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            (!loopback).then(|| name.clone())
        }
        Host::Unix(_) => None,
    })
}

/// Whole milliseconds, rounded up (PostgreSQL's unit for these settings).
fn millis(d: Duration) -> u128 {
    d.as_micros().div_ceil(1000)
}

/// One dedicated connection (migrations, CLI commands). The connection
/// task ends when the returned client is dropped.
pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = connect_raw(cfg, APPLICATION_NAME).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %error_chain(&e), "database connection closed");
        }
    });
    Ok(client)
}

/// The shared pool. `Verified` recycling runs a cheap query on every
/// checkout, so a connection the server killed (restart, failover,
/// `pg_terminate_backend`) is dropped and replaced instead of handed out.
pub fn pool(cfg: &DatabaseConfig, application_name: &str) -> anyhow::Result<Pool> {
    let pg = pg_config(cfg, application_name)?;
    let manager = Manager::from_config(
        pg,
        tls::Connector::new(cfg)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(cfg.pool_size.get())
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(cfg.pool_wait_timeout))
        .create_timeout(Some(cfg.connect_timeout))
        // A connection handed back mid-query (a dropped future) fails its
        // check within this and is replaced instead of stalling the caller.
        .recycle_timeout(Some(cfg.connect_timeout))
        .build()?)
}

/// A pool error as one line an operator can act on.
pub fn pool_error(pool: &Pool, e: &PoolError) -> String {
    use deadpool_postgres::TimeoutType;
    let timeouts = pool.timeouts();
    let secs = |d: Option<Duration>| humantime::format_duration(d.unwrap_or_default()).to_string();
    match e {
        PoolError::Timeout(TimeoutType::Wait) => format!(
            "database pool: no free connection within {} (all {} in use; raise database.pool_size or database.pool_wait_timeout)",
            secs(timeouts.wait),
            pool.status().max_size
        ),
        PoolError::Timeout(TimeoutType::Create) => format!(
            "database pool: connecting took longer than database.connect_timeout ({})",
            secs(timeouts.create)
        ),
        PoolError::Timeout(TimeoutType::Recycle) => format!(
            "database pool: checking a pooled connection took longer than {}",
            secs(timeouts.recycle)
        ),
        PoolError::Backend(e) => match tls_failure(e) {
            Some(t) => format!("cannot connect to the database: {t}"),
            None => error_chain(e),
        },
        other => error_chain(other),
    }
}

/// The TLS failure behind a connection error, if that is what it was.
fn tls_failure(e: &tokio_postgres::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<tls::TlsFailure>() {
            return Some(t.to_string());
        }
        cause = c.source();
    }
    // tokio-postgres' own words when the server answers "no TLS here".
    let text = e.to_string();
    text.contains("server does not support TLS").then(|| {
        "database TLS: the server does not accept TLS connections (sslmode=require or stricter)"
            .to_owned()
    })
}

/// Host, port and database of a connection config, for error messages
/// (never the password).
pub fn describe(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().or(pg.get_user()).unwrap_or("?");
    format!("{host}:{port}/{db}")
}

/// A dedicated connection whose messages (notifications) the caller polls.
pub async fn connect_raw(
    cfg: &DatabaseConfig,
    application_name: &str,
) -> anyhow::Result<(
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tls::TlsStream>,
)> {
    let pg = pg_config(cfg, application_name)?;
    let connector = tls::Connector::new(cfg)?;
    pg.connect(connector).await.map_err(|e| {
        let reason = tls_failure(&e).unwrap_or_else(|| error_chain(&e));
        anyhow::anyhow!(
            "cannot connect to the database at {}: {reason}",
            describe(&pg)
        )
    })
}

/// What a failed statement means for the caller, by its SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `statement_timeout` (57014) or `lock_timeout` (55P03): the same
    /// work in a smaller piece may go through.
    TooSlow,
    /// The connection went away, the server is restarting or out of
    /// resources, or the statement lost a race: retry later.
    Transient,
    /// Retrying will not help (a constraint, a type, a permission).
    Permanent,
}

/// Classify a failed statement (see [`Failure`]).
pub fn classify(e: &tokio_postgres::Error) -> Failure {
    if matches!(e.code().map(|c| c.code()), Some("57014" | "55P03")) {
        Failure::TooSlow
    } else if is_transient(e) {
        Failure::Transient
    } else {
        Failure::Permanent
    }
}

/// Errors worth retrying: the connection went away, the server is
/// restarting, or the statement lost a race or hit a timeout.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("57P")
                || matches!(
                    c,
                    "40001"
                        | "40P01"
                        | "57014"
                        | "55P03"
                        | "53100"
                        | "53200"
                        | "53300"
                        | "53400"
                        | "25006"
                )
        }
        // No SQLSTATE: retry only a dead connection or an I/O error; a
        // type or protocol mismatch will not heal by retrying.
        None => {
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                if c.is::<std::io::Error>() {
                    return true;
                }
                cause = c.source();
            }
            false
        }
    }
}

/// The planner's row estimate for `select` (its `Plan Rows`, from
/// `EXPLAIN`: no row is read).
pub async fn explain_rows(
    c: &impl tokio_postgres::GenericClient,
    select: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<i64, tokio_postgres::Error> {
    let plan: serde_json::Value = c
        .query_one(&format!("EXPLAIN (FORMAT JSON) {select}"), params)
        .await?
        .get(0);
    Ok(plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0).round() as i64)
}

/// Bound the statements of the caller's transaction (`SET LOCAL`).
pub async fn local_statement_timeout(
    tx: &tokio_postgres::Transaction<'_>,
    timeout: Duration,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}",
        timeout.as_millis()
    ))
    .await
}

/// An error with its causes on one line. tokio-postgres' own `Display` is
/// only "db error"; the server's message is in the source chain. Of a
/// server error only the code, message and object names are kept: its
/// DETAIL can quote a whole row (e.g. "Failing row contains ..."), which
/// must not reach job errors or logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(db) = c.downcast_ref::<tokio_postgres::error::DbError>() {
            let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            for (label, name) in [
                ("table", db.table()),
                ("column", db.column()),
                ("constraint", db.constraint()),
            ] {
                if let Some(name) = name {
                    text.push_str(&format!(" ({label} {name})"));
                }
            }
            parts.push(text);
            break;
        }
        let t = c.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cause = c.source();
    }
    parts.join(": ").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::{STATEMENT_BYTES, statement_chunks};

    #[test]
    fn statement_chunks_cover_every_item_once_within_the_limit() {
        let weights = [
            1000, 70_000, 200_000, 300_000, 5, 5, 100_000, 100_000, 100_000,
        ];
        let chunks = statement_chunks(weights.len(), |i| weights[i]);
        let flat: Vec<usize> = chunks.iter().cloned().flatten().collect();
        assert_eq!(flat, (0..weights.len()).collect::<Vec<_>>());
        for r in &chunks {
            let sum: usize = weights[r.clone()].iter().sum();
            assert!(sum <= STATEMENT_BYTES || r.len() == 1, "{r:?} weighs {sum}");
        }
        // Greedy: a chunk ends only where the next item would not fit.
        for w in chunks.windows(2) {
            let sum: usize = weights[w[0].clone()].iter().sum();
            assert!(sum + weights[w[1].start] > STATEMENT_BYTES, "{w:?}");
        }
        assert_eq!(chunks.len(), 5, "{chunks:?}");
        assert!(statement_chunks(0, |_| 1).is_empty());
        assert_eq!(statement_chunks(3, |_| 1), vec![0..3]);
    }
}
