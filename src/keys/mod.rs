//! Key providers (SPEC §4): what a `kms_keys.external_key_ref` names. The
//! `local` keyring file resolves it to secret bytes ([`KeyProvider`]); the
//! `pkcs11` provider ([`pkcs11`]) keeps the key in an HSM and does the
//! AES-GCM and HMAC there; [`aws`] (AWS KMS) and [`vault`] (Vault or
//! OpenBao transit) likewise in their service. Other providers are not supported yet (README "Key
//! providers" has the matrix).

pub mod aws;
pub mod check;
pub mod document;
mod generate;
mod local;
pub mod meter;
pub mod ops;
pub mod pkcs11;
pub mod signing;
mod source;
pub mod vault;

use std::fmt;
use std::path::PathBuf;

use zeroize::Zeroizing;

pub use generate::{Generated, add_key};
pub use local::{LocalKeyring, check_private};
pub use source::Keyring;

/// Resolves key references to secrets. Implementations are shared between
/// worker threads, hence `Send + Sync`.
pub trait KeyProvider: Send + Sync {
    /// The secret named by `key_ref`, with the algorithm it is for.
    fn secret(&self, key_ref: &str) -> Result<KeySecret, KeyError>;

    /// Like [`KeyProvider::secret`], but a key made for another algorithm
    /// is an error: a pepper must never be used as a KEK, nor the reverse.
    fn secret_for(&self, key_ref: &str, algorithm: &str) -> Result<KeySecret, KeyError> {
        let secret = self.secret(key_ref)?;
        if secret.algorithm.eq_ignore_ascii_case(algorithm) {
            Ok(secret)
        } else {
            Err(KeyError::WrongAlgorithm {
                key_ref: key_ref.to_owned(),
                expected: algorithm.to_owned(),
                found: secret.algorithm.clone(),
            })
        }
    }
}

/// Secret key bytes, wiped from memory on drop and never printed.
#[derive(Clone)]
pub struct KeySecret {
    /// Canonical algorithm name, as listed in SPEC §4 (e.g. `HMAC-SHA3-256`).
    pub algorithm: String,
    pub bytes: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySecret")
            .field("algorithm", &self.algorithm)
            .field(
                "bytes",
                &format_args!("<redacted {} bytes>", self.bytes.len()),
            )
            .finish()
    }
}

/// Why a key could not be provided. Messages are one line and never carry
/// secret material, so they may go to logs and to a job's `error` column.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key {key_ref:?} is not in the keyring")]
    NotFound { key_ref: String },
    #[error("keyring {}: {reason}", path.display())]
    Keyring { path: PathBuf, reason: String },
    /// No file at the path (or a dangling link): an operator's mistake, or
    /// a Kubernetes Secret volume in the middle of a swap.
    #[error("keyring {}: no such file", path.display())]
    Missing { path: PathBuf },
    #[error(
        "key {key_ref:?}: provider {provider} is not supported yet (SPEC §4; README \"Key providers\")"
    )]
    UnsupportedProvider { key_ref: String, provider: String },
    #[error("key {key_ref:?} is a {found} key, expected {expected}")]
    WrongAlgorithm {
        key_ref: String,
        expected: String,
        found: String,
    },
}

impl KeyError {
    /// Worth retrying: the file may be back in a moment.
    pub fn is_transient(&self) -> bool {
        matches!(self, KeyError::Missing { .. })
    }
}

/// The secret of a `kms_keys` row for `algorithm`, through the provider its
/// `kms_providers` row names.
pub fn kms_secret(
    provider: &dyn KeyProvider,
    key: &crate::db::kms::KmsKey,
    algorithm: &str,
) -> Result<KeySecret, KeyError> {
    if key.provider != "local" {
        return Err(KeyError::UnsupportedProvider {
            key_ref: key.key_ref.clone(),
            provider: key.provider.clone(),
        });
    }
    provider.secret_for(&key.key_ref, algorithm)
}
