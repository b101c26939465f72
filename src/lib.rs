//! pqmig moves data stored in PostgreSQL onto post-quantum cryptography,
//! driven by a job queue in the same database.
//!
//! Layout (data flows top to bottom):
//!
//! - [`cli`]: the command line (SPEC §8.1) and its exit codes.
//! - [`config`]: file, environment and flags → validated [`config::Config`].
//! - [`telemetry`]: logging setup.
//! - [`db`]: connections, the pool, schema migrations; all SQL lives here.

pub mod cli;
pub mod config;
pub mod db;
pub mod telemetry;
