//! `pqmig keys generate`: add a fresh random key to the keyring file. The
//! file is rewritten atomically (a private temporary file, fsync, rename),
//! so an interrupted run leaves the old keyring intact: key material is
//! never lost.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::document::SampleKeys;
use super::local::{self, LocalKeyring};
use crate::crypto::kem::{Kem, KemKeyPair};

/// What was created: never the secret.
#[derive(Debug)]
pub struct Generated {
    pub key_ref: String,
    pub algorithm: &'static str,
    /// The public key, for asymmetric keys.
    pub public_key: Option<Vec<u8>>,
}

impl Generated {
    /// One line for operators: reference, algorithm, public key size and
    /// SHA-256 fingerprint.
    pub fn describe(&self) -> String {
        match &self.public_key {
            Some(pk) => format!(
                "{} ({}): public key {} bytes, SHA-256 {}",
                self.key_ref,
                self.algorithm,
                pk.len(),
                crate::hex(&Sha256::digest(pk))
            ),
            None => format!("{} ({})", self.key_ref, self.algorithm),
        }
    }
}

/// Add a key `key_ref` of `algorithm` to the keyring at `path` (created
/// with mode 0600 if missing). An existing keyring must pass the same
/// checks as at start-up, and must not already hold `key_ref`.
pub fn add_key(path: &Path, key_ref: &str, algorithm: &str) -> Result<Generated, String> {
    let (algorithm, len) = local::generated_len(algorithm).ok_or_else(|| {
        format!(
            "unknown algorithm {algorithm:?} (known: {})",
            local::algorithm_names().join(", ")
        )
    })?;
    if key_ref.is_empty() || key_ref.len() > 512 || key_ref.chars().any(char::is_control) {
        return Err("--ref must be 1 to 512 printable characters (e.g. local:pq-a)".into());
    }
    let mut keys = SampleKeys::default();
    if path.exists() {
        let existing = LocalKeyring::load(path).map_err(|e| e.to_string())?;
        if existing.entries().any(|(r, _)| r == key_ref) {
            return Err(format!(
                "keyring {} already holds {key_ref:?}; keys are never replaced (choose a new reference)",
                path.display()
            ));
        }
        for (r, secret) in existing.entries() {
            let (name, _) = local::generated_len(&secret.algorithm).expect("validated at load");
            keys.add(r, name, secret.bytes.clone());
        }
    }
    let secret: Zeroizing<Vec<u8>> = keys.generate(key_ref, algorithm, len);
    let public_key = match algorithm {
        "X25519" => Some(
            crate::crypto::wrap::x25519_public(&secret[..].try_into().expect("32 bytes")).to_vec(),
        ),
        other => Kem::from_alias(other).map(|kem| {
            KemKeyPair::from_seed(kem, &secret)
                .expect("seed of the right size")
                .public_key()
                .to_vec()
        }),
    };
    write_atomically(path, &keys).map_err(|e| format!("keyring {}: {e}", path.display()))?;
    Ok(Generated {
        key_ref: key_ref.to_owned(),
        algorithm,
        public_key,
    })
}

fn write_atomically(path: &Path, keys: &SampleKeys) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(keys.to_json().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
