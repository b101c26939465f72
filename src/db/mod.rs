//! Everything that talks to PostgreSQL: connections, the pool and (in the
//! submodules) one function per statement.
//!
//! - [`migrate`]: applying `migrations/` and checking the schema version.

pub mod algorithms;
pub mod demo;
pub mod hashes;
pub mod inventory;
pub mod jobs;
pub mod kms;
pub mod migrate;
pub mod status;
pub mod wrappers;

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::DatabaseConfig;

/// Parse the configured URL; the config layer has validated it already.
fn pg_config(cfg: &DatabaseConfig) -> Result<tokio_postgres::Config, crate::config::ConfigError> {
    let url = cfg.require_url()?;
    let mut pg = tokio_postgres::Config::from_str(url.expose()).expect("validated in config");
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(cfg.connect_timeout);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("pqmig");
    }
    Ok(pg)
}

/// One dedicated connection (migrations, LISTEN, CLI commands). The
/// connection task ends when the returned client is dropped.
pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<tokio_postgres::Client> {
    let pg = pg_config(cfg)?;
    let (client, connection) = pg
        .connect(NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the database at {}: {e}", describe(&pg)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// The shared pool; `Verified` recycling runs a cheap check so a connection
/// killed by the server is replaced instead of handed out.
pub fn pool(cfg: &DatabaseConfig) -> anyhow::Result<Pool> {
    let pg = pg_config(cfg)?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(cfg.pool_size.get())
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(cfg.connect_timeout))
        .create_timeout(Some(cfg.connect_timeout))
        // A connection handed back mid-query (a dropped future) fails its
        // check within this and is replaced instead of stalling the caller.
        .recycle_timeout(Some(cfg.connect_timeout))
        .build()?)
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
) -> anyhow::Result<(
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
)> {
    let pg = pg_config(cfg)?;
    pg.connect(NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the database at {}: {e}", describe(&pg)))
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
