//! The KEMs a `pqmig-wrap-v1` layer can use (SPEC §5.2), with keys in seed
//! form (SPEC §4): ML-KEM-768 and ML-KEM-1024 (FIPS 203, 64-byte seed
//! d || z) and X-Wing (draft-connolly-cfrg-xwing-kem, 32-byte seed).
//!
//! ML-KEM is libcrux's formally verified implementation. X-Wing is the
//! draft's combiner over that ML-KEM-768 and X25519 (x25519-dalek):
//!
//! ```text
//! expanded      = SHAKE-256(seed, 96)        d||z = expanded[0..64], sk_X = expanded[64..96]
//! pk            = pk_M (1184) || pk_X (32)
//! ct            = ct_M (1088) || ct_X (32)
//! ss            = SHA3-256(ss_M || ss_X || ct_X || pk_X || "\.//^\")
//! ```
//!
//! It is checked against the draft's test vectors and against the
//! independent RustCrypto `x-wing` crate (tests/wrappers.rs).

use libcrux_ml_kem::{mlkem768, mlkem1024};
use sha3::Digest;
use shake::{ExtendableOutput, Update, XofReader};
use zeroize::Zeroizing;

/// The X-Wing label (`\.//^\`).
const XWING_LABEL: &[u8; 6] = b"\\.//^\\";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kem {
    MlKem768,
    MlKem1024,
    XWing,
}

/// A KEM operation failed: the input has the wrong size or shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KemError(pub String);

impl Kem {
    /// From an alias of SPEC §3.3 (case-insensitive).
    pub fn from_alias(alias: &str) -> Option<Kem> {
        match alias.to_ascii_uppercase().as_str() {
            "ML-KEM-768" => Some(Kem::MlKem768),
            "ML-KEM-1024" => Some(Kem::MlKem1024),
            "X-WING" => Some(Kem::XWing),
            _ => None,
        }
    }

    /// The canonical alias, as written to `crypto_suite.kem` and the keyring.
    pub fn alias(self) -> &'static str {
        match self {
            Kem::MlKem768 => "ML-KEM-768",
            Kem::MlKem1024 => "ML-KEM-1024",
            Kem::XWing => "X-Wing",
        }
    }

    pub fn seed_len(self) -> usize {
        match self {
            Kem::MlKem768 | Kem::MlKem1024 => 64,
            Kem::XWing => 32,
        }
    }

    pub fn public_key_len(self) -> usize {
        match self {
            Kem::MlKem768 => 1184,
            Kem::MlKem1024 => 1568,
            Kem::XWing => 1216,
        }
    }

    /// The NIST security category (FIPS 203; X-Wing is ML-KEM-768's).
    pub fn nist_level(self) -> u8 {
        match self {
            Kem::MlKem768 | Kem::XWing => 3,
            Kem::MlKem1024 => 5,
        }
    }

    /// Whether a classical KEM is combined with the PQ one (X-Wing).
    pub fn is_hybrid(self) -> bool {
        self == Kem::XWing
    }

    /// Whether wrapping under `self` what `source` protects now would
    /// weaken it: a lower NIST category, or a hybrid given up.
    pub fn is_downgrade_from(self, source: Kem) -> bool {
        self.nist_level() < source.nist_level() || (source.is_hybrid() && !self.is_hybrid())
    }

    pub fn ciphertext_len(self) -> usize {
        match self {
            Kem::MlKem768 => 1088,
            Kem::MlKem1024 => 1568,
            Kem::XWing => 1120,
        }
    }
}

// libcrux's "unpacked" key pairs hold the matrix and vectors already
// sampled and in NTT form, so encapsulation and decapsulation skip
// re-deriving them from the encoded keys. The AVX2 code is used when the
// CPU has AVX2.

mod unpacked768 {
    #[cfg(target_arch = "x86_64")]
    pub use libcrux_ml_kem::mlkem768::avx2::unpacked::MlKem768KeyPairUnpacked as Avx2;
    pub use libcrux_ml_kem::mlkem768::portable::unpacked::MlKem768KeyPairUnpacked as Portable;
}

mod unpacked1024 {
    #[cfg(target_arch = "x86_64")]
    pub use libcrux_ml_kem::mlkem1024::avx2::unpacked::MlKem1024KeyPairUnpacked as Avx2;
    pub use libcrux_ml_kem::mlkem1024::portable::unpacked::MlKem1024KeyPairUnpacked as Portable;
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Generates the unpacked key pair type of one parameter set.
macro_rules! unpacked_pair {
    ($name:ident, $m:ident, $module:ident, $ct:ty) => {
        enum $name {
            #[cfg(target_arch = "x86_64")]
            Avx2(Box<$module::Avx2>),
            Portable(Box<$module::Portable>),
        }

        impl $name {
            fn from_seed(seed: [u8; 64]) -> $name {
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    return $name::Avx2(Box::new(
                        libcrux_ml_kem::$m::avx2::unpacked::generate_key_pair(seed),
                    ));
                }
                $name::Portable(Box::new(
                    libcrux_ml_kem::$m::portable::unpacked::generate_key_pair(seed),
                ))
            }

            /// The encoded public key, without ever encoding the private key.
            fn public_key(&self) -> Vec<u8> {
                match self {
                    #[cfg(target_arch = "x86_64")]
                    $name::Avx2(k) => {
                        libcrux_ml_kem::$m::avx2::unpacked::key_pair_serialized_public_key(k)
                            .as_slice()
                            .to_vec()
                    }
                    $name::Portable(k) => {
                        libcrux_ml_kem::$m::portable::unpacked::key_pair_serialized_public_key(k)
                            .as_slice()
                            .to_vec()
                    }
                }
            }

            fn encapsulate(&self, r: [u8; 32]) -> (Vec<u8>, [u8; 32]) {
                let (ct, ss) = match self {
                    #[cfg(target_arch = "x86_64")]
                    $name::Avx2(k) => {
                        libcrux_ml_kem::$m::avx2::unpacked::encapsulate(k.public_key(), r)
                    }
                    $name::Portable(k) => {
                        libcrux_ml_kem::$m::portable::unpacked::encapsulate(k.public_key(), r)
                    }
                };
                (ct.as_slice().to_vec(), ss)
            }

            fn decapsulate(&self, ct: &$ct) -> [u8; 32] {
                match self {
                    #[cfg(target_arch = "x86_64")]
                    $name::Avx2(k) => libcrux_ml_kem::$m::avx2::unpacked::decapsulate(k, ct),
                    $name::Portable(k) => {
                        libcrux_ml_kem::$m::portable::unpacked::decapsulate(k, ct)
                    }
                }
            }
        }

        /// libcrux does not wipe its key types: overwrite the secret parts
        /// with a key pair of the all-zero seed before the memory is freed.
        impl Drop for $name {
            fn drop(&mut self) {
                match self {
                    #[cfg(target_arch = "x86_64")]
                    $name::Avx2(k) => {
                        libcrux_ml_kem::$m::avx2::unpacked::generate_key_pair_mut([0; 64], k)
                    }
                    $name::Portable(k) => {
                        libcrux_ml_kem::$m::portable::unpacked::generate_key_pair_mut([0; 64], k)
                    }
                }
            }
        }
    };
}

unpacked_pair!(Pair768, mlkem768, unpacked768, mlkem768::MlKem768Ciphertext);
unpacked_pair!(
    Pair1024,
    mlkem1024,
    unpacked1024,
    mlkem1024::MlKem1024Ciphertext
);

enum Unpacked {
    MlKem768(Pair768),
    MlKem1024(Pair1024),
}

/// A decapsulation key expanded from its seed, with its public key. The
/// secret parts are wiped on drop.
pub struct KemKeyPair {
    kem: Kem,
    public: Vec<u8>,
    /// The ML-KEM part, unpacked for speed.
    pair: Unpacked,
    /// X-Wing only: the X25519 secret.
    sk_x: Option<Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for KemKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KemKeyPair")
            .field("kem", &self.kem)
            .field("secret", &"<redacted>")
            .finish()
    }
}

fn array<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], KemError> {
    bytes
        .try_into()
        .map_err(|_| KemError(format!("{what} is {} bytes, expected {N}", bytes.len())))
}

impl KemKeyPair {
    /// Expand a seed (64-byte d || z for ML-KEM, 32 bytes for X-Wing).
    pub fn from_seed(kem: Kem, seed: &[u8]) -> Result<KemKeyPair, KemError> {
        if seed.len() != kem.seed_len() {
            return Err(KemError(format!(
                "{} seed is {} bytes, expected {}",
                kem.alias(),
                seed.len(),
                kem.seed_len()
            )));
        }
        match kem {
            // The public key comes from the unpacked pair: the packed
            // key pair libcrux's `generate_key_pair` returns would leave an
            // encoded private key behind, unwiped.
            Kem::MlKem768 => {
                let d_z = Zeroizing::new(array::<64>(seed, "seed")?);
                let pair = Pair768::from_seed(*d_z);
                Ok(KemKeyPair {
                    kem,
                    public: pair.public_key(),
                    pair: Unpacked::MlKem768(pair),
                    sk_x: None,
                })
            }
            Kem::MlKem1024 => {
                let d_z = Zeroizing::new(array::<64>(seed, "seed")?);
                let pair = Pair1024::from_seed(*d_z);
                Ok(KemKeyPair {
                    kem,
                    public: pair.public_key(),
                    pair: Unpacked::MlKem1024(pair),
                    sk_x: None,
                })
            }
            Kem::XWing => {
                let mut expanded = Zeroizing::new([0u8; 96]);
                let mut xof = shake::Shake256::default();
                xof.update(seed);
                xof.finalize_xof().read(&mut expanded[..]);
                let d_z = Zeroizing::new(<[u8; 64]>::try_from(&expanded[..64]).expect("64 bytes"));
                let mut sk_x = Zeroizing::new([0u8; 32]);
                sk_x.copy_from_slice(&expanded[64..]);
                let pair = Pair768::from_seed(*d_z);
                let pk_x = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*sk_x));
                let mut public = pair.public_key();
                public.extend_from_slice(pk_x.as_bytes());
                Ok(KemKeyPair {
                    kem,
                    public,
                    pair: Unpacked::MlKem768(pair),
                    sk_x: Some(sk_x),
                })
            }
        }
    }

    pub fn kem(&self) -> Kem {
        self.kem
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// The shared secret of `ct`. ML-KEM rejects implicitly: a wrong or
    /// altered ciphertext gives a different secret, never an error, so
    /// the wrap's commitment and tag are what catch it.
    pub fn decapsulate(&self, ct: &[u8]) -> Result<Zeroizing<[u8; 32]>, KemError> {
        if ct.len() != self.kem.ciphertext_len() {
            return Err(KemError(format!(
                "{} ciphertext is {} bytes, expected {}",
                self.kem.alias(),
                ct.len(),
                self.kem.ciphertext_len()
            )));
        }
        let (ct_m, ct_x) = ct.split_at(match self.kem {
            Kem::XWing => 1088,
            _ => ct.len(),
        });
        let ss_m = Zeroizing::new(match &self.pair {
            Unpacked::MlKem768(p) => p.decapsulate(
                &mlkem768::MlKem768Ciphertext::try_from(ct_m).expect("length checked"),
            ),
            Unpacked::MlKem1024(p) => p.decapsulate(
                &mlkem1024::MlKem1024Ciphertext::try_from(ct_m).expect("length checked"),
            ),
        });
        let Some(sk_x) = &self.sk_x else {
            return Ok(ss_m);
        };
        let sk_x = x25519_dalek::StaticSecret::from(**sk_x);
        let ct_x: [u8; 32] = ct_x.try_into().expect("32 bytes");
        let ss_x = sk_x.diffie_hellman(&x25519_dalek::PublicKey::from(ct_x));
        let pk_x: [u8; 32] = self.public[1184..].try_into().expect("32 bytes");
        Ok(xwing_combine(&ss_m, ss_x.as_bytes(), &ct_x, &pk_x))
    }

    /// Encapsulate to this key pair's public key with fresh randomness,
    /// through the unpacked key: (ciphertext, shared secret).
    pub fn encapsulate(&self) -> (Vec<u8>, Zeroizing<[u8; 32]>) {
        let mut r = Zeroizing::new([0u8; 64]);
        rand::fill(&mut r[..]);
        self.encapsulate_with(&r)
    }

    /// [`KemKeyPair::encapsulate`] with explicit randomness (64 bytes; the
    /// first 32 for ML-KEM, the rest X-Wing's X25519 ephemeral secret).
    /// Gives exactly what [`encapsulate_with`] gives for the encoded key.
    pub fn encapsulate_with(&self, r: &[u8; 64]) -> (Vec<u8>, Zeroizing<[u8; 32]>) {
        let m = Zeroizing::new(<[u8; 32]>::try_from(&r[..32]).expect("32 bytes"));
        let (mut ct, ss_m) = match &self.pair {
            Unpacked::MlKem768(p) => p.encapsulate(*m),
            Unpacked::MlKem1024(p) => p.encapsulate(*m),
        };
        let ss_m = Zeroizing::new(ss_m);
        if self.kem != Kem::XWing {
            return (ct, ss_m);
        }
        let ek_x = x25519_dalek::StaticSecret::from(<[u8; 32]>::try_from(&r[32..]).expect("32"));
        let ct_x = x25519_dalek::PublicKey::from(&ek_x);
        let pk_x: [u8; 32] = self.public[1184..].try_into().expect("32 bytes");
        let ss_x = ek_x.diffie_hellman(&x25519_dalek::PublicKey::from(pk_x));
        let ss = xwing_combine(&ss_m, ss_x.as_bytes(), ct_x.as_bytes(), &pk_x);
        ct.extend_from_slice(ct_x.as_bytes());
        (ct, ss)
    }
}

/// SHA3-256(ss_M || ss_X || ct_X || pk_X || label): X-Wing's combiner (a
/// token's halves are combined here too).
pub fn xwing_combine(
    ss_m: &[u8; 32],
    ss_x: &[u8; 32],
    ct_x: &[u8; 32],
    pk_x: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    let mut h = sha3::Sha3_256::new();
    Digest::update(&mut h, ss_m);
    Digest::update(&mut h, ss_x);
    Digest::update(&mut h, ct_x);
    Digest::update(&mut h, pk_x);
    Digest::update(&mut h, XWING_LABEL);
    Zeroizing::new(h.finalize().into())
}

/// Encapsulate to `public_key` with explicit randomness: 32 bytes for
/// ML-KEM, 64 for X-Wing (ML-KEM's 32, then the X25519 ephemeral secret).
/// Returns (ciphertext, shared secret).
pub fn encapsulate_with(
    kem: Kem,
    public_key: &[u8],
    randomness: &[u8],
) -> Result<(Vec<u8>, Zeroizing<[u8; 32]>), KemError> {
    if public_key.len() != kem.public_key_len() {
        return Err(KemError(format!(
            "{} public key is {} bytes, expected {}",
            kem.alias(),
            public_key.len(),
            kem.public_key_len()
        )));
    }
    match kem {
        Kem::MlKem768 => {
            let pk = mlkem768::MlKem768PublicKey::try_from(public_key).expect("length checked");
            if !mlkem768::validate_public_key(&pk) {
                return Err(KemError(
                    "ML-KEM-768 public key fails the FIPS 203 check".into(),
                ));
            }
            let (ct, ss) = mlkem768::encapsulate(&pk, array(randomness, "randomness")?);
            Ok((ct.as_slice().to_vec(), Zeroizing::new(ss)))
        }
        Kem::MlKem1024 => {
            let pk = mlkem1024::MlKem1024PublicKey::try_from(public_key).expect("length checked");
            if !mlkem1024::validate_public_key(&pk) {
                return Err(KemError(
                    "ML-KEM-1024 public key fails the FIPS 203 check".into(),
                ));
            }
            let (ct, ss) = mlkem1024::encapsulate(&pk, array(randomness, "randomness")?);
            Ok((ct.as_slice().to_vec(), Zeroizing::new(ss)))
        }
        Kem::XWing => {
            let r: Zeroizing<[u8; 64]> = Zeroizing::new(array(randomness, "randomness")?);
            let (pk_m, pk_x) = public_key.split_at(1184);
            let pk_m = mlkem768::MlKem768PublicKey::try_from(pk_m).expect("length checked");
            if !mlkem768::validate_public_key(&pk_m) {
                return Err(KemError(
                    "X-Wing ML-KEM-768 public key fails the FIPS 203 check".into(),
                ));
            }
            let (ct_m, ss_m) = mlkem768::encapsulate(&pk_m, r[..32].try_into().expect("32 bytes"));
            let ss_m = Zeroizing::new(ss_m);
            let ek_x =
                x25519_dalek::StaticSecret::from(<[u8; 32]>::try_from(&r[32..]).expect("32"));
            let ct_x = x25519_dalek::PublicKey::from(&ek_x);
            let pk_x: [u8; 32] = pk_x.try_into().expect("32 bytes");
            let ss_x = ek_x.diffie_hellman(&x25519_dalek::PublicKey::from(pk_x));
            let ss = xwing_combine(&ss_m, ss_x.as_bytes(), ct_x.as_bytes(), &pk_x);
            let mut ct = ct_m.as_slice().to_vec();
            ct.extend_from_slice(ct_x.as_bytes());
            Ok((ct, ss))
        }
    }
}

/// Encapsulate with fresh randomness from the operating system.
pub fn encapsulate(
    kem: Kem,
    public_key: &[u8],
) -> Result<(Vec<u8>, Zeroizing<[u8; 32]>), KemError> {
    let mut r = Zeroizing::new([0u8; 64]);
    let n = if kem == Kem::XWing { 64 } else { 32 };
    rand::fill(&mut r[..n]);
    encapsulate_with(kem, public_key, &r[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kem_round_trips_and_sizes_match() {
        for kem in [Kem::MlKem768, Kem::MlKem1024, Kem::XWing] {
            let seed = vec![3u8; kem.seed_len()];
            let kp = KemKeyPair::from_seed(kem, &seed).unwrap();
            assert_eq!(kp.public_key().len(), kem.public_key_len());
            let (ct, ss) = encapsulate(kem, kp.public_key()).unwrap();
            assert_eq!(ct.len(), kem.ciphertext_len());
            assert_eq!(*kp.decapsulate(&ct).unwrap(), *ss);
            let mut bad = ct.clone();
            bad[0] ^= 1;
            assert_ne!(*kp.decapsulate(&bad).unwrap(), *ss, "{kem:?}");
            assert!(kp.decapsulate(&ct[1..]).is_err());
            assert!(KemKeyPair::from_seed(kem, &seed[1..]).is_err());
        }
    }
}
