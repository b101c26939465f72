//! The commands of SPEC §8.1, one module each. `cli` parses the arguments
//! into the plain option types here and calls one of these; nothing below
//! knows about clap.
//!
//! - [`run`]: `pqmig run` (the daemon, with its signal handling), `migrate`.
//! - [`enqueue`], [`plan`]: a job from flags, queued or dry-run on a sample.
//! - [`status`]: the job table, one job, `--watch`.
//! - [`jobs`]: `cancel`, `resume`.
//! - [`aftercare`]: `verify`, `rollback`, `purge-backups`.
//! - [`inventory`]: vulnerable and protected items.
//! - [`keys`]: `keys generate`, `keys signing`.
//! - [`demo`], [`bench`]: end to end on a scratch database.

pub mod aftercare;
pub mod attest;
pub mod audit;
pub mod bench;
pub mod demo;
pub mod enqueue;
pub mod inventory;
pub mod jobs;
pub mod keys;
pub mod pause;
pub mod plan;
pub mod run;
pub mod status;

use crate::config::Config;
use crate::db;

/// An error that is the caller's to fix (bad flag, bad config, missing
/// input): exit code 2 rather than 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `Err(UsageError(msg))` as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Exit codes of SPEC §8.1: 2 for usage or configuration errors, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let usage = err.chain().any(|e| {
        e.downcast_ref::<UsageError>().is_some()
            || e.downcast_ref::<crate::config::ConfigError>().is_some()
    });
    if usage { 2 } else { 1 }
}

/// A connection for a command, refused on a schema older than this build.
/// Who an operator command is recorded as in job events and pauses.
pub fn who() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

pub async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let client = db::connect(&config.database).await?;
    db::migrate::check_current(&client).await?;
    Ok(client)
}
