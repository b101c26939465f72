//! The keyring a process works with over time (SPEC §4): the file read
//! again when it changed (another file, size, mtime or ctime), on SIGHUP,
//! and otherwise served from memory. A new file that does not load keeps
//! the keys loaded before, with one warning per file; a missing file (a
//! Kubernetes Secret being swapped) is transient.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{KeyError, LocalKeyring};

/// What tells one keyring file from its next version without reading it.
/// The ctime is there for chmod and chown, which change no content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub(super) fn of(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The file behind `path` (symlinks followed, as a Secret volume's are).
fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path).ok().map(|m| Stamp::of(&m))
}

/// A keyring file and the keys last loaded from it.
pub struct Keyring {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    loaded: Option<(Stamp, Arc<LocalKeyring>)>,
    /// The file last refused while older keys were in use (`None`: it was
    /// missing), so each refused version is warned about once.
    refused: Option<Option<Stamp>>,
}

impl Keyring {
    /// Nothing is read until keys are asked for.
    pub fn new(path: PathBuf) -> Keyring {
        Keyring {
            path,
            state: Mutex::new(State::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// No keys loaded yet and no file to load them from.
    pub fn missing(&self) -> bool {
        let state = self.state.lock().expect("keyring state");
        state.loaded.is_none() && std::fs::metadata(&self.path).is_err()
    }

    /// The keys to start a piece of work with: those loaded before while
    /// the file is unchanged, else the file read again. A changed file that
    /// does not load, or a missing one, leaves the keys loaded before in
    /// use; with none loaded yet its error is returned
    /// ([`KeyError::is_transient`] for a missing file).
    pub fn current(&self) -> Result<Arc<LocalKeyring>, KeyError> {
        let mut state = self.state.lock().expect("keyring state");
        if let Some((at, keys)) = &state.loaded {
            let now = stamp(&self.path);
            if now == Some(*at) || (state.refused == Some(now)) {
                return Ok(Arc::clone(keys));
            }
        }
        self.load(&mut state, false)
    }

    /// Read the file now, changed or not (SIGHUP): the number of keys it
    /// holds, or why it was refused (the keys loaded before stay in use).
    /// Either way the outcome is logged.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let mut state = self.state.lock().expect("keyring state");
        let had = state.loaded.is_some();
        match self.load(&mut state, true) {
            Ok(keys) => Ok(keys.len()),
            Err(e) if had => Err(e),
            Err(e) => {
                tracing::warn!(keyring = %self.path.display(), error = %e, "keyring not reloaded, and no keys were loaded before");
                Err(e)
            }
        }
    }

    fn load(&self, state: &mut State, forced: bool) -> Result<Arc<LocalKeyring>, KeyError> {
        let path = self.path.display();
        match LocalKeyring::load_stamped(&self.path) {
            Ok((keys, at)) => {
                let keys = Arc::new(keys);
                let before = state.loaded.replace((at, Arc::clone(&keys)));
                state.refused = None;
                // A first load is no news (one-shot commands load once).
                if before.is_some() || forced {
                    tracing::info!(keyring = %path, keys = keys.len(), "keyring reloaded");
                } else {
                    tracing::debug!(keyring = %path, keys = keys.len(), "keyring loaded");
                }
                Ok(keys)
            }
            Err(e) => {
                let Some((_, old)) = &state.loaded else {
                    return Err(e);
                };
                let now = stamp(&self.path);
                if forced || state.refused != Some(now) {
                    let old_keys = old.len();
                    if e.is_transient() {
                        tracing::warn!(keyring = %path, error = %e, keys = old_keys, "keyring file missing (a Secret being swapped?): keeping the keys loaded before");
                    } else {
                        tracing::warn!(keyring = %path, error = %e, keys = old_keys, "keyring not reloaded: keeping the keys loaded before");
                    }
                }
                state.refused = Some(now);
                if forced { Err(e) } else { Ok(Arc::clone(old)) }
            }
        }
    }
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("path", &self.path).finish()
    }
}
