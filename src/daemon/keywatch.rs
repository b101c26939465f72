//! The keyring file watched while the daemon runs (SPEC §4): every few
//! seconds its identity, size and times are compared with the file loaded,
//! and a changed file is read at once, so a rotation is logged (`keyring
//! reloaded`) or refused (a warning, the old keys kept) when it happens,
//! not when the next job happens to start. SIGHUP (`pqmig run`) reads it
//! whether changed or not.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::keys::Keyring;

/// How often the file is looked at: a stat, nothing read unless it changed.
pub const EVERY: Duration = Duration::from_secs(5);

pub struct KeyWatch {
    pub keyring: Arc<Keyring>,
    pub every: Duration,
}

impl KeyWatch {
    pub async fn run(self, token: CancellationToken) {
        // Said at start, not only by the first job that needs it.
        let path = self.keyring.path().display();
        match self.keyring.current() {
            Ok(keys) => tracing::info!(keyring = %path, keys = keys.len(), "keyring loaded"),
            Err(e) => {
                tracing::warn!(error = %e, "the keyring cannot be used yet; jobs that need it wait (missing) or fail")
            }
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every) => self.run_once(),
                _ = token.cancelled() => return,
            }
        }
    }

    /// Read the file if it changed; the keyring logs what came of it. A
    /// missing file with no keys loaded yet is left to the jobs to report.
    pub fn run_once(&self) {
        let _ = self.keyring.current();
    }
}
