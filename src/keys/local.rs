//! The `local` key provider: a JSON keyring file (SPEC §4), refused unless
//! it is private to pqmig's user (or root-owned and at most group-readable,
//! as a Kubernetes Secret volume mounts it), and validated whole at load
//! time so a bad key fails the load rather than a job halfway through.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::source::Stamp;
use super::{KeyError, KeyProvider, KeySecret};

/// A keyring is a handful of keys; anything larger is the wrong file.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy)]
enum SecretLen {
    Exact(usize, &'static str),
    AtLeast(usize, &'static str),
}

/// Canonical names and secret sizes. Seeds, not expanded keys, are stored
/// so public keys can always be re-derived (FIPS 203 d||z for ML-KEM).
const ALGORITHMS: &[(&str, SecretLen)] = &[
    ("AES-256-GCM", SecretLen::Exact(32, "")),
    ("X25519", SecretLen::Exact(32, "")),
    (
        "ML-KEM-768",
        SecretLen::Exact(64, " (the FIPS 203 seed d||z)"),
    ),
    (
        "ML-KEM-1024",
        SecretLen::Exact(64, " (the FIPS 203 seed d||z)"),
    ),
    ("X-Wing", SecretLen::Exact(32, " (the X-Wing seed)")),
    ("Ed25519", SecretLen::Exact(32, " (the RFC 8032 seed)")),
    (
        "HMAC-SHA-256",
        SecretLen::AtLeast(32, "too short for a 256-bit pepper"),
    ),
    (
        "HMAC-SHA-512",
        SecretLen::AtLeast(32, "too short for a 256-bit pepper"),
    ),
    (
        "HMAC-SHA3-256",
        SecretLen::AtLeast(32, "too short for a 256-bit pepper"),
    ),
    (
        "HMAC-SHA3-512",
        SecretLen::AtLeast(32, "too short for a 256-bit pepper"),
    ),
];

// The serde names show in type errors ("expected struct KeyEntry").
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "Keyring")]
struct RawKeyring {
    version: u32,
    keys: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "KeyEntry")]
struct RawEntry {
    #[serde(rename = "ref")]
    key_ref: String,
    algorithm: String,
    secret: Zeroizing<String>,
}

/// The keys of one keyring file, held in memory as [`Zeroizing`] bytes.
pub struct LocalKeyring {
    path: PathBuf,
    keys: BTreeMap<String, KeySecret>,
}

impl LocalKeyring {
    /// Check the file's owner and mode, then read and validate every key.
    pub fn load(path: &Path) -> Result<LocalKeyring, KeyError> {
        Self::load_stamped(path).map(|(keys, _)| keys)
    }

    /// [`LocalKeyring::load`], with the identity of the file read.
    pub(super) fn load_stamped(path: &Path) -> Result<(LocalKeyring, Stamp), KeyError> {
        let err = |reason: String| KeyError::Keyring {
            path: path.to_path_buf(),
            reason,
        };
        // Checked on the open descriptor, so the file judged is the file read.
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyError::Missing {
                path: path.to_path_buf(),
            },
            _ => err(format!("cannot open: {e}")),
        })?;
        let meta = file
            .metadata()
            .map_err(|e| err(format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(err("is not a regular file".into()));
        }
        check_private(
            path,
            meta.mode(),
            meta.uid(),
            rustix::process::geteuid().as_raw(),
        )
        .map_err(err)?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(err(format!(
                "is {} bytes, larger than any keyring should be",
                meta.len()
            )));
        }

        // Sized up front so the buffer never reallocates and leaves copies.
        let mut raw = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
        file.read_to_end(&mut raw)
            .map_err(|e| err(format!("cannot read: {e}")))?;
        let parsed: RawKeyring = serde_json::from_slice(&raw)
            .map_err(|e| err(format!("invalid JSON: {}", redact_quoted(&e.to_string()))))?;
        if parsed.version != 1 {
            return Err(err(format!(
                "unsupported version {} (this pqmig reads version 1)",
                parsed.version
            )));
        }

        let mut keys = BTreeMap::new();
        for entry in &parsed.keys {
            let secret = decode_entry(entry).map_err(err)?;
            if keys.insert(entry.key_ref.clone(), secret).is_some() {
                return Err(err(format!(
                    "key {:?} appears more than once",
                    entry.key_ref
                )));
            }
        }
        let keyring = LocalKeyring {
            path: path.to_path_buf(),
            keys,
        };
        Ok((keyring, Stamp::of(&meta)))
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The file this keyring was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every key, by reference.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &KeySecret)> {
        self.keys.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// The canonical name of an algorithm a keyring may hold (case-insensitive
/// match) and the size of a freshly generated secret for it.
pub fn generated_len(algorithm: &str) -> Option<(&'static str, usize)> {
    ALGORITHMS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(algorithm))
        .map(|(name, len)| match len {
            SecretLen::Exact(n, _) | SecretLen::AtLeast(n, _) => (*name, *n),
        })
}

/// Names of every algorithm a keyring may hold.
pub fn algorithm_names() -> Vec<&'static str> {
    ALGORITHMS.iter().map(|(name, _)| *name).collect()
}

impl KeyProvider for LocalKeyring {
    fn secret(&self, key_ref: &str) -> Result<KeySecret, KeyError> {
        self.keys
            .get(key_ref)
            .cloned()
            .ok_or_else(|| KeyError::NotFound {
                key_ref: key_ref.to_owned(),
            })
    }
}

impl fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: BTreeMap<&str, &str> = self
            .keys
            .iter()
            .map(|(r, s)| (r.as_str(), s.algorithm.as_str()))
            .collect();
        f.debug_struct("LocalKeyring")
            .field("path", &self.path)
            .field("keys", &keys)
            .finish()
    }
}

/// PostgreSQL's rule for `ssl_key_file`: owned by pqmig's user with no
/// group or other bits (0600 or stricter), or owned by root with at most
/// group read (0640 or stricter), as a Kubernetes Secret volume mounts it
/// (root, group fsGroup). The fix is named: an operator meets this at
/// start-up. Public so the rule can be tested without root.
pub fn check_private(path: &Path, mode: u32, owner: u32, euid: u32) -> Result<(), String> {
    let shown = mode & 0o7777;
    let path = path.display();
    if owner == euid {
        if mode & 0o077 != 0 {
            return Err(format!(
                "is accessible by group or others (mode {shown:04o}); a keyring owned by pqmig's user must be 0600 or stricter: run chmod 600 {path}"
            ));
        }
        return Ok(());
    }
    if owner == 0 {
        if mode & 0o037 != 0 {
            return Err(format!(
                "is owned by root with mode {shown:04o}; a root-owned keyring may be group-readable but no more (0640 or stricter): run chmod 640 {path} (on Kubernetes: defaultMode 0440)"
            ));
        }
        return Ok(());
    }
    Err(format!(
        "is owned by uid {owner}, neither pqmig's user (uid {euid}) nor root: run chown {euid} {path} and chmod 600 {path}, or run pqmig as uid {owner}"
    ))
}

fn decode_entry(entry: &RawEntry) -> Result<KeySecret, String> {
    let key_ref = &entry.key_ref;
    let Some(&(algorithm, len)) = ALGORITHMS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(&entry.algorithm))
    else {
        let known: Vec<&str> = ALGORITHMS.iter().map(|(name, _)| *name).collect();
        // Any valid secret encodes to 44+ characters, so a short value is a
        // misspelt name worth echoing and a long one might be a misplaced key.
        let shown = if entry.algorithm.len() <= 24 {
            format!("{:?}", entry.algorithm)
        } else {
            format!("of {} characters", entry.algorithm.len())
        };
        return Err(format!(
            "key {key_ref:?}: unknown algorithm {shown} (known: {})",
            known.join(", ")
        ));
    };
    let bytes = Zeroizing::new(STANDARD.decode(entry.secret.as_bytes()).map_err(|e| {
        // DecodeError's Display names the offending byte; report only where.
        let why = match e {
            base64::DecodeError::InvalidByte(at, _) => format!("invalid character at offset {at}"),
            base64::DecodeError::InvalidLength(_) => "truncated or over-long input".into(),
            base64::DecodeError::InvalidLastSymbol { offset, .. } => {
                format!("invalid last character at offset {offset}")
            }
            base64::DecodeError::InvalidPadding => "missing or misplaced padding".into(),
        };
        format!("key {key_ref:?}: secret is not valid base64 (standard alphabet, padded): {why}")
    })?);
    let n = bytes.len();
    match len {
        SecretLen::Exact(want, what) if n != want => {
            return Err(format!(
                "key {key_ref:?} ({algorithm}): secret is {n} bytes, expected {want}{what}"
            ));
        }
        SecretLen::AtLeast(min, why) if n < min => {
            return Err(format!(
                "key {key_ref:?} ({algorithm}): secret is {n} bytes, {why} (at least {min})"
            ));
        }
        _ => {}
    }
    Ok(KeySecret {
        algorithm: algorithm.to_owned(),
        bytes,
    })
}

/// serde quotes offending *values* in double quotes (field names go in
/// backticks); a value in a malformed keyring may be a secret, so drop them.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut chars = msg.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '"' {
            out.push_str("…\"");
            let mut escaped = false;
            for c in chars.by_ref() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => break,
                    _ => escaped = false,
                }
            }
        }
    }
    out
}
