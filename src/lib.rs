//! pqmig moves data stored in PostgreSQL onto post-quantum cryptography,
//! driven by a job queue in the same database.
//!
//! Layout (data flows top to bottom):
//!
//! - [`cli`]: the command line (SPEC §8.1) and its exit codes.
//! - [`demo`]: `pqmig demo`, end to end on a scratch database.
//! - [`enqueue`]: `pqmig enqueue`, validated like the daemon validates.
//! - [`inventory`]: `pqmig inventory`, vulnerable vs PQ-protected items.
//! - [`status`]: `pqmig status`, the job table and one job's details.
//! - [`config`]: file, environment and flags → validated [`config::Config`].
//! - [`telemetry`]: logging setup.
//! - [`daemon`]: the worker daemon: producer (claim), executor (one job),
//!   rescuer (expired leases), listener (NOTIFY wake-ups).
//! - [`selection`]: a job's JSONB selection, parsed strictly.
//! - [`aftercare`]: `pqmig verify`, `rollback`, `purge-backups`.
//! - [`bench`]: `pqmig bench`, one job through the real daemon path.
//! - [`plan`]: `pqmig plan`, a job's size, growth and time from a sample.
//! - [`sample`]: legacy sample data for demo, bench and tests.
//! - [`scope`]: what a job does to its items (hashes, wrappers;
//!   signatures to come).
//! - [`crypto`]: the SPEC §5 formats over maintained crates (HMAC onion,
//!   AES-GCM, ML-KEM / X-Wing, wrappers).
//! - [`keys`]: key providers (the local keyring file).
//! - [`db`]: connections, the pool, schema migrations; all SQL lives here.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod db;
pub mod http;
pub mod job;
pub mod keys;
pub mod metrics;
pub mod sample;
pub mod scope;
pub mod selection;
pub mod telemetry;
