//! The hash onion of SPEC §5.4: new_hash = HMAC-H(pepper, old_hash), cut to
//! the profile's output_len when set, and new_version = profile/old_version.
//! This is the hashes scope's per-item hot path, so the HMAC is keyed once
//! and its state cloned per item instead of re-hashing the pepper each time.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac, SimpleHmac};
use sha2::{Sha256, Sha512};
use sha3::{Sha3_256, Sha3_512};
use zeroize::Zeroizing;

/// Shortest pepper accepted: HMAC keys under 256 bits would undercut the
/// ~128-bit post-quantum margin the HMAC algorithms are seeded with.
pub const MIN_PEPPER_LEN: usize = 32;

/// Shortest truncated output: below 128 bits collisions become practical.
pub const MIN_OUTPUT_LEN: usize = 16;

/// The hash function under the HMAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HmacHash {
    Sha256,
    Sha512,
    Sha3_256,
    Sha3_512,
}

impl HmacHash {
    /// From `crypto_algorithms.variant` of an `HMAC` row ("SHA3-256", …).
    pub fn from_variant(variant: &str) -> Option<HmacHash> {
        [
            HmacHash::Sha256,
            HmacHash::Sha512,
            HmacHash::Sha3_256,
            HmacHash::Sha3_512,
        ]
        .into_iter()
        .find(|h| h.variant().eq_ignore_ascii_case(variant))
    }

    /// From an alias such as "HMAC-SHA3-256", case-insensitively.
    pub fn from_alias(alias: &str) -> Option<HmacHash> {
        let prefix = alias.get(..5)?;
        if !prefix.eq_ignore_ascii_case("HMAC-") {
            return None;
        }
        HmacHash::from_variant(&alias[5..])
    }

    /// The `crypto_algorithms.variant` spelling.
    pub fn variant(self) -> &'static str {
        match self {
            HmacHash::Sha256 => "SHA-256",
            HmacHash::Sha512 => "SHA-512",
            HmacHash::Sha3_256 => "SHA3-256",
            HmacHash::Sha3_512 => "SHA3-512",
        }
    }

    /// The alias spelling, as used for keyring algorithms ("HMAC-SHA-256").
    pub fn alias(self) -> String {
        format!("HMAC-{}", self.variant())
    }

    /// Untruncated HMAC output length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HmacHash::Sha256 | HmacHash::Sha3_256 => 32,
            HmacHash::Sha512 | HmacHash::Sha3_512 => 64,
        }
    }
}

impl fmt::Display for HmacHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HMAC-{}", self.variant())
    }
}

/// Why an onion could not be built from a profile and its pepper.
#[derive(Debug, thiserror::Error)]
pub enum OnionError {
    #[error("output_len {len} is out of range for {hash}: must be {MIN_OUTPUT_LEN}..={max} bytes")]
    OutputLen {
        len: usize,
        hash: HmacHash,
        max: usize,
    },
    #[error(
        "the pepper is {len} bytes, too short for a 256-bit pepper (at least {MIN_PEPPER_LEN})"
    )]
    PepperTooShort { len: usize },
    #[error(
        "profile name {name:?} is unusable in a version chain: it must be non-empty and contain no '/'"
    )]
    ProfileName { name: String },
}

/// The HMAC keyed once with the pepper. Cloning copies the inner and outer
/// pad states, which are as secret as the pepper; the crates' `zeroize`
/// feature wipes the hash states on drop. sha3 0.12 has no block-level API,
/// so SHA-3 goes through `SimpleHmac`, whose outer-pad block hmac 0.13 does
/// not wipe: a known gap, accepted for the hot path's sake.
#[derive(Clone)]
enum Keyed {
    Sha256(Hmac<Sha256>),
    Sha512(Hmac<Sha512>),
    Sha3_256(SimpleHmac<Sha3_256>),
    Sha3_512(SimpleHmac<Sha3_512>),
}

impl Keyed {
    fn new(hash: HmacHash, pepper: &[u8]) -> Keyed {
        // HMAC takes keys of any length, so these never fail.
        const ANY_LEN: &str = "HMAC accepts keys of any length";
        match hash {
            HmacHash::Sha256 => Keyed::Sha256(Hmac::new_from_slice(pepper).expect(ANY_LEN)),
            HmacHash::Sha512 => Keyed::Sha512(Hmac::new_from_slice(pepper).expect(ANY_LEN)),
            HmacHash::Sha3_256 => {
                Keyed::Sha3_256(SimpleHmac::new_from_slice(pepper).expect(ANY_LEN))
            }
            HmacHash::Sha3_512 => {
                Keyed::Sha3_512(SimpleHmac::new_from_slice(pepper).expect(ANY_LEN))
            }
        }
    }
}

impl Keyed {
    #[inline]
    fn mac(&self, data: &[u8], out_len: usize) -> Vec<u8> {
        match self {
            Keyed::Sha256(m) => mac_once(m, data, out_len),
            Keyed::Sha512(m) => mac_once(m, data, out_len),
            Keyed::Sha3_256(m) => mac_once(m, data, out_len),
            Keyed::Sha3_512(m) => mac_once(m, data, out_len),
        }
    }
}

#[inline]
fn mac_once<M: Mac + Clone>(keyed: &M, data: &[u8], out_len: usize) -> Vec<u8> {
    let mut mac = keyed.clone();
    mac.update(data);
    mac.finalize().into_bytes()[..out_len].to_vec()
}

/// One hash profile's layer of the onion, whoever holds its pepper: the
/// version chain it extends and the length it cuts the HMAC to. A pepper
/// in a KMS or an HSM computes the HMAC there; [`Onion`] computes it here.
#[derive(Debug, Clone)]
pub struct Layer {
    hash: HmacHash,
    output_len: Option<usize>,
    profile_name: String,
    /// `profile_name + "/"`, built once for `is_migrated` and `new_version`.
    prefix: String,
    out_len: usize,
}

impl Layer {
    /// The layer of `profile_name`. `output_len` (bytes) truncates the
    /// output when set and must be 16..=the hash's output length.
    pub fn new(
        hash: HmacHash,
        output_len: Option<usize>,
        profile_name: &str,
    ) -> Result<Layer, OnionError> {
        let max = hash.output_len();
        if let Some(len) = output_len
            && !(MIN_OUTPUT_LEN..=max).contains(&len)
        {
            return Err(OnionError::OutputLen { len, hash, max });
        }
        // A '/' inside a name would make "a/b/v1" read as profile "a" too.
        if profile_name.is_empty() || profile_name.contains('/') {
            return Err(OnionError::ProfileName {
                name: profile_name.to_owned(),
            });
        }
        Ok(Layer {
            hash,
            output_len,
            profile_name: profile_name.to_owned(),
            prefix: format!("{profile_name}/"),
            out_len: output_len.unwrap_or(max),
        })
    }

    pub fn hash(&self) -> HmacHash {
        self.hash
    }

    pub fn output_len(&self) -> Option<usize> {
        self.output_len
    }

    pub fn profile_name(&self) -> &str {
        &self.profile_name
    }

    /// A full HMAC output cut to the profile's output_len (when set).
    pub fn truncate(&self, mut mac: Vec<u8>) -> Vec<u8> {
        mac.truncate(self.out_len);
        mac
    }

    /// The version after this layer: `profile_name/old_version`.
    pub fn new_version(&self, old_version: &str) -> String {
        let mut v = String::with_capacity(self.prefix.len() + old_version.len());
        v.push_str(&self.prefix);
        v.push_str(old_version);
        v
    }

    /// Whether this layer is already the outermost one of `version`.
    pub fn is_migrated(&self, version: &str) -> bool {
        version.starts_with(&self.prefix)
    }
}

/// One hash profile's onion layer with its pepper in process, ready to
/// apply to many items.
pub struct Onion {
    layer: Layer,
    /// Held (zeroized on drop) for the onion's lifetime; the hot path uses
    /// the keyed state derived from it.
    pepper: Zeroizing<Vec<u8>>,
    keyed: Keyed,
}

impl Onion {
    /// Key the HMAC for `profile_name`. `output_len` (bytes) truncates the
    /// output when set and must be 16..=the hash's output length.
    pub fn new(
        hash: HmacHash,
        pepper: Zeroizing<Vec<u8>>,
        output_len: Option<usize>,
        profile_name: &str,
    ) -> Result<Onion, OnionError> {
        let layer = Layer::new(hash, output_len, profile_name)?;
        if pepper.len() < MIN_PEPPER_LEN {
            return Err(OnionError::PepperTooShort { len: pepper.len() });
        }
        Ok(Onion {
            layer,
            keyed: Keyed::new(hash, &pepper),
            pepper,
        })
    }

    /// The profile's layer: its version chain and output length.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    pub fn hash(&self) -> HmacHash {
        self.layer.hash
    }

    pub fn output_len(&self) -> Option<usize> {
        self.layer.output_len
    }

    pub fn profile_name(&self) -> &str {
        &self.layer.profile_name
    }

    /// HMAC-H(pepper, old_hash), truncated to output_len when set.
    pub fn rehash(&self, old_hash: &[u8]) -> Vec<u8> {
        self.keyed.mac(old_hash, self.layer.out_len)
    }

    /// [`Onion::rehash`] through an HMAC keyed afresh from the pepper, not
    /// the cached keyed state: what verify-before-write compares against,
    /// so a corrupted cached state cannot vouch for itself.
    pub fn rehash_fresh(&self, old_hash: &[u8]) -> Vec<u8> {
        Keyed::new(self.layer.hash, &self.pepper).mac(old_hash, self.layer.out_len)
    }

    /// The version after this layer: `profile_name/old_version`.
    pub fn new_version(&self, old_version: &str) -> String {
        self.layer.new_version(old_version)
    }

    /// Whether this layer is already the outermost one of `version`.
    pub fn is_migrated(&self, version: &str) -> bool {
        self.layer.is_migrated(version)
    }
}

impl fmt::Debug for Onion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Onion")
            .field("hash", &self.layer.hash)
            .field(
                "pepper",
                &format_args!("<redacted {} bytes>", self.pepper.len()),
            )
            .field("output_len", &self.layer.output_len)
            .field("profile_name", &self.layer.profile_name)
            .finish()
    }
}

#[cfg(test)]
impl Onion {
    /// Simulates a corrupted cached HMAC state (a fault in memory): the
    /// hot path keyed with another pepper than the one held.
    pub(crate) fn with_corrupted_cache(mut self, other: &[u8]) -> Onion {
        self.keyed = Keyed::new(self.layer.hash, other);
        self
    }
}
