//! Data safety (SPEC §4–§6): verify that really checks and the backups it
//! guards, wraps bound to their row, exact countersignature evidence, no
//! silent downgrade.

mod hashes;
mod signatures;
mod wrappers;
