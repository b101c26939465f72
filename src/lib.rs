//! pqmig moves data stored in PostgreSQL onto post-quantum cryptography,
//! driven by a job queue in the same database.
//!
//! Layout, in the order data flows (README's "Code map" says the same):
//!
//! - [`cli`]: the clap arguments, dispatched to [`cmd`]; [`cmd`]: one
//!   module per command (run, migrate, enqueue, plan, status, cancel and
//!   resume, verify / rollback / purge-backups, inventory, keys, demo, bench).
//! - [`config`]: one table of keys; file, environment and flags →
//!   validated [`config::Config`]. [`telemetry`]: logging setup.
//! - [`daemon`]: the worker daemon's services — producer (claim), executor
//!   (one job: its lease, then its batch walk), rescuer, listener, sampler,
//!   janitor (retention), watchdog — and [`http`] / [`metrics`] for what it
//!   exports; [`console`]: the read-only web console it serves.
//! - [`job`]: a job's definition ([`job::JobSpec`], [`job::ScopeKind`]);
//!   [`selection`]: its JSONB selection, parsed strictly.
//! - [`scope`]: what a job does to its items, one folder per scope behind
//!   the `Scope` and `Aftercare` traits (hashes, wrappers, signatures).
//! - [`crypto`]: the SPEC §5 formats over maintained crates; [`keys`]: key
//!   providers (the local keyring file) and signing keys.
//! - [`db`]: connections, the pool, schema migrations; all SQL lives here.
//! - [`deadlines`]: NIST IR 8547's transition dates per algorithm.
//! - [`sample`]: legacy sample data for demo, bench and tests.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod console;
pub mod crypto;
pub mod daemon;
pub mod db;
pub mod deadlines;
pub mod evidence;
pub mod http;
pub mod job;
pub mod keys;
pub mod metrics;
pub mod sample;
pub mod scope;
pub mod selection;
pub mod telemetry;

/// Lower-case hex, as logs, fingerprints and the audit chain print bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `90` seconds → `1m30s`: durations as `status` and the console print them.
pub fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}
