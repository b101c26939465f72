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

    pub fn ciphertext_len(self) -> usize {
        match self {
            Kem::MlKem768 => 1088,
            Kem::MlKem1024 => 1568,
            Kem::XWing => 1120,
        }
    }
}

/// A decapsulation key expanded from its seed, with its public key. The
/// secret parts are wiped on drop.
pub struct KemKeyPair {
    kem: Kem,
    public: Vec<u8>,
    /// The ML-KEM private key in FIPS 203 encoding.
    sk_m: Zeroizing<Vec<u8>>,
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
            Kem::MlKem768 => {
                let kp = mlkem768::generate_key_pair(array(seed, "seed")?);
                let (sk, pk) = kp.into_parts();
                Ok(KemKeyPair {
                    kem,
                    public: pk.as_slice().to_vec(),
                    sk_m: Zeroizing::new(sk.as_slice().to_vec()),
                    sk_x: None,
                })
            }
            Kem::MlKem1024 => {
                let kp = mlkem1024::generate_key_pair(array(seed, "seed")?);
                let (sk, pk) = kp.into_parts();
                Ok(KemKeyPair {
                    kem,
                    public: pk.as_slice().to_vec(),
                    sk_m: Zeroizing::new(sk.as_slice().to_vec()),
                    sk_x: None,
                })
            }
            Kem::XWing => {
                let mut expanded = Zeroizing::new([0u8; 96]);
                let mut xof = shake::Shake256::default();
                xof.update(seed);
                xof.finalize_xof().read(&mut expanded[..]);
                let d_z: [u8; 64] = expanded[..64].try_into().expect("64 bytes");
                let mut sk_x = Zeroizing::new([0u8; 32]);
                sk_x.copy_from_slice(&expanded[64..]);
                let (sk, pk_m) = mlkem768::generate_key_pair(d_z).into_parts();
                let pk_x = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*sk_x));
                let mut public = pk_m.as_slice().to_vec();
                public.extend_from_slice(pk_x.as_bytes());
                Ok(KemKeyPair {
                    kem,
                    public,
                    sk_m: Zeroizing::new(sk.as_slice().to_vec()),
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
        let ss = match self.kem {
            Kem::MlKem768 => {
                let sk = mlkem768::MlKem768PrivateKey::try_from(&self.sk_m[..])
                    .map_err(|_| KemError("ML-KEM-768 private key size".into()))?;
                let ct = mlkem768::MlKem768Ciphertext::try_from(ct).expect("length checked");
                mlkem768::decapsulate(&sk, &ct)
            }
            Kem::MlKem1024 => {
                let sk = mlkem1024::MlKem1024PrivateKey::try_from(&self.sk_m[..])
                    .map_err(|_| KemError("ML-KEM-1024 private key size".into()))?;
                let ct = mlkem1024::MlKem1024Ciphertext::try_from(ct).expect("length checked");
                mlkem1024::decapsulate(&sk, &ct)
            }
            Kem::XWing => {
                let sk = mlkem768::MlKem768PrivateKey::try_from(&self.sk_m[..])
                    .map_err(|_| KemError("X-Wing private key size".into()))?;
                let (ct_m, ct_x) = ct.split_at(1088);
                let ct_m = mlkem768::MlKem768Ciphertext::try_from(ct_m).expect("length checked");
                let ss_m = Zeroizing::new(mlkem768::decapsulate(&sk, &ct_m));
                let sk_x = x25519_dalek::StaticSecret::from(**self.sk_x.as_ref().expect("X-Wing"));
                let ct_x: [u8; 32] = ct_x.try_into().expect("32 bytes");
                let ss_x = sk_x.diffie_hellman(&x25519_dalek::PublicKey::from(ct_x));
                let pk_x: [u8; 32] = self.public[1184..].try_into().expect("32 bytes");
                return Ok(xwing_combine(&ss_m, ss_x.as_bytes(), &ct_x, &pk_x));
            }
        };
        Ok(Zeroizing::new(ss))
    }
}

/// SHA3-256(ss_M || ss_X || ct_X || pk_X || label).
fn xwing_combine(
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
