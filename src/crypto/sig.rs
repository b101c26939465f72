//! Signature algorithms of SPEC §5.3: the classical sources pqmig verifies
//! (Ed25519 pure, ECDSA P-256 with SHA-256 and r || s) and the PQ
//! countersignatures it makes (ML-DSA, FIPS 204, hedged and pure, from
//! libcrux; SLH-DSA, FIPS 205, pure, from RustCrypto), each with a context
//! string. Private keys are in seed form (SPEC §4): ξ (32 bytes) for ML-DSA,
//! the RFC 8032 seed for Ed25519, the scalar for ECDSA, and for SLH-DSA its
//! FIPS 205 encoding SK.seed || SK.prf || PK.seed || PK.root (64 bytes at
//! level 1; the last 16 are public, so this is the seed plus its check).

use zeroize::Zeroizing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SigAlg {
    MlDsa44,
    MlDsa65,
    MlDsa87,
    SlhDsaSha2_128s,
    SlhDsaSha2_128f,
    Ed25519,
    EcdsaP256,
}

/// A signature or key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SigError(pub String);

const ALL: [SigAlg; 7] = [
    SigAlg::MlDsa44,
    SigAlg::MlDsa65,
    SigAlg::MlDsa87,
    SigAlg::SlhDsaSha2_128s,
    SigAlg::SlhDsaSha2_128f,
    SigAlg::Ed25519,
    SigAlg::EcdsaP256,
];

impl SigAlg {
    /// From an alias of SPEC §3.3 (case-insensitive).
    pub fn from_alias(alias: &str) -> Option<SigAlg> {
        ALL.into_iter()
            .find(|a| a.alias().eq_ignore_ascii_case(alias))
    }

    /// From a `crypto_algorithms` row's name and variant.
    pub fn from_row(name: &str, variant: Option<&str>) -> Option<SigAlg> {
        let alias = match variant {
            Some(v) if !v.is_empty() => format!("{name}-{v}"),
            _ => name.to_owned(),
        };
        SigAlg::from_alias(&alias).or_else(|| match alias.to_ascii_uppercase().as_str() {
            "ECDSA-P-256" => Some(SigAlg::EcdsaP256),
            _ => None,
        })
    }

    pub fn alias(self) -> &'static str {
        match self {
            SigAlg::MlDsa44 => "ML-DSA-44",
            SigAlg::MlDsa65 => "ML-DSA-65",
            SigAlg::MlDsa87 => "ML-DSA-87",
            SigAlg::SlhDsaSha2_128s => "SLH-DSA-SHA2-128s",
            SigAlg::SlhDsaSha2_128f => "SLH-DSA-SHA2-128f",
            SigAlg::Ed25519 => "Ed25519",
            SigAlg::EcdsaP256 => "ECDSA-P256",
        }
    }

    pub fn is_pq(self) -> bool {
        !matches!(self, SigAlg::Ed25519 | SigAlg::EcdsaP256)
    }

    /// The NIST security category of a PQ algorithm (FIPS 204/205); the
    /// classical ones have none against a quantum adversary (0).
    pub fn nist_level(self) -> u8 {
        match self {
            SigAlg::MlDsa44 => 2,
            SigAlg::MlDsa65 => 3,
            SigAlg::MlDsa87 => 5,
            SigAlg::SlhDsaSha2_128s | SigAlg::SlhDsaSha2_128f => 1,
            SigAlg::Ed25519 | SigAlg::EcdsaP256 => 0,
        }
    }

    /// Whether countersigning what `source` signed with `self` would be
    /// weaker than the source (a lower NIST category).
    pub fn is_downgrade_from(self, source: SigAlg) -> bool {
        self.nist_level() < source.nist_level()
    }

    /// Bytes of the private key as stored (seed form).
    pub fn seed_len(self) -> usize {
        match self {
            SigAlg::SlhDsaSha2_128s | SigAlg::SlhDsaSha2_128f => 64,
            _ => 32,
        }
    }
}

/// A fresh private key in seed form.
pub fn generate_seed(alg: SigAlg) -> Zeroizing<Vec<u8>> {
    match alg {
        SigAlg::SlhDsaSha2_128s | SigAlg::SlhDsaSha2_128f => {
            let mut s = Zeroizing::new([0u8; 48]);
            rand::fill(&mut s[..]);
            let sk = slh_keygen(alg, &s[..16], &s[16..32], &s[32..]);
            Zeroizing::new(sk)
        }
        SigAlg::EcdsaP256 => loop {
            // A random 32-byte string is a valid scalar with overwhelming
            // probability; retry the rare one that is not.
            let mut s = Zeroizing::new(vec![0u8; 32]);
            rand::fill(&mut s[..]);
            if p256::ecdsa::SigningKey::from_slice(&s).is_ok() {
                break s;
            }
        },
        _ => {
            let mut s = Zeroizing::new(vec![0u8; 32]);
            rand::fill(&mut s[..]);
            s
        }
    }
}

/// FIPS 205 slh_keygen_internal, encoded as the private key.
pub fn slh_keygen(alg: SigAlg, sk_seed: &[u8], sk_prf: &[u8], pk_seed: &[u8]) -> Vec<u8> {
    match alg {
        SigAlg::SlhDsaSha2_128s => {
            slh_dsa::SigningKey::<slh_dsa::Sha2_128s>::slh_keygen_internal(sk_seed, sk_prf, pk_seed)
                .to_vec()
        }
        SigAlg::SlhDsaSha2_128f => {
            slh_dsa::SigningKey::<slh_dsa::Sha2_128f>::slh_keygen_internal(sk_seed, sk_prf, pk_seed)
                .to_vec()
        }
        other => panic!("slh_keygen for {other:?}"),
    }
}

/// A private key expanded for signing; secret parts wiped on drop.
pub struct Signer {
    alg: SigAlg,
    public: Vec<u8>,
    /// ML-DSA: the expanded FIPS 204 signing key; others: the seed.
    secret: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.alg)
            .field("secret", &"<redacted>")
            .finish()
    }
}

// libcrux's ML-DSA key types do not wipe themselves: every copy of the
// expanded signing key made here is overwritten before it is dropped.
macro_rules! mldsa {
    ($m:ident, $seed:expr) => {{
        let xi = Zeroizing::new(
            <[u8; 32]>::try_from($seed)
                .map_err(|_| SigError("ML-DSA seed must be 32 bytes".into()))?,
        );
        let mut kp = libcrux_ml_dsa::$m::generate_key_pair(*xi);
        let secret = Zeroizing::new(kp.signing_key.as_slice().to_vec());
        zeroize::Zeroize::zeroize(kp.signing_key.as_mut_slice());
        (kp.verification_key.as_slice().to_vec(), secret)
    }};
}

macro_rules! mldsa_sign {
    ($m:ident, $sk:expr, $msg:expr, $ctx:expr) => {{
        let mut sk =
            libcrux_ml_dsa::MLDSASigningKey::new($sk[..].try_into().expect("expanded at load"));
        let mut r = Zeroizing::new([0u8; 32]);
        rand::fill(&mut r[..]);
        let signed = libcrux_ml_dsa::$m::sign(&sk, $msg, $ctx, *r)
            .map(|s| s.as_slice().to_vec())
            .map_err(|e| SigError(format!("ML-DSA signing failed: {e:?}")));
        zeroize::Zeroize::zeroize(sk.as_mut_slice());
        signed
    }};
}

macro_rules! mldsa_verify {
    ($m:ident, $pk:expr, $msg:expr, $ctx:expr, $sig:expr) => {{
        match ($pk.try_into(), $sig.try_into()) {
            (Ok(pk), Ok(sig)) => libcrux_ml_dsa::$m::verify(
                &libcrux_ml_dsa::MLDSAVerificationKey::new(pk),
                $msg,
                $ctx,
                &libcrux_ml_dsa::MLDSASignature::new(sig),
            )
            .is_ok(),
            _ => false,
        }
    }};
}

impl Signer {
    /// Expand a private key in seed form.
    pub fn from_seed(alg: SigAlg, seed: &[u8]) -> Result<Signer, SigError> {
        if seed.len() != alg.seed_len() {
            return Err(SigError(format!(
                "{} private key is {} bytes, expected {}",
                alg.alias(),
                seed.len(),
                alg.seed_len()
            )));
        }
        let (public, secret) = match alg {
            SigAlg::MlDsa44 => mldsa!(ml_dsa_44, seed),
            SigAlg::MlDsa65 => mldsa!(ml_dsa_65, seed),
            SigAlg::MlDsa87 => mldsa!(ml_dsa_87, seed),
            SigAlg::SlhDsaSha2_128s => {
                let sk = slh_dsa::SigningKey::<slh_dsa::Sha2_128s>::try_from(seed)
                    .map_err(|_| SigError("invalid SLH-DSA-SHA2-128s private key".into()))?;
                let vk: &slh_dsa::VerifyingKey<slh_dsa::Sha2_128s> = sk.as_ref();
                (vk.to_vec(), Zeroizing::new(seed.to_vec()))
            }
            SigAlg::SlhDsaSha2_128f => {
                let sk = slh_dsa::SigningKey::<slh_dsa::Sha2_128f>::try_from(seed)
                    .map_err(|_| SigError("invalid SLH-DSA-SHA2-128f private key".into()))?;
                let vk: &slh_dsa::VerifyingKey<slh_dsa::Sha2_128f> = sk.as_ref();
                (vk.to_vec(), Zeroizing::new(seed.to_vec()))
            }
            SigAlg::Ed25519 => {
                let sk = ed25519_dalek::SigningKey::from_bytes(&seed.try_into().expect("32"));
                (
                    sk.verifying_key().to_bytes().to_vec(),
                    Zeroizing::new(seed.to_vec()),
                )
            }
            SigAlg::EcdsaP256 => {
                let sk = p256::ecdsa::SigningKey::from_slice(seed)
                    .map_err(|_| SigError("invalid ECDSA P-256 private key".into()))?;
                (
                    sk.verifying_key().to_sec1_bytes().to_vec(),
                    Zeroizing::new(seed.to_vec()),
                )
            }
        };
        Ok(Signer {
            alg,
            public,
            secret,
        })
    }

    pub fn alg(&self) -> SigAlg {
        self.alg
    }

    /// The raw public key as `signing_keys.public_key` holds it.
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// Sign `msg`; `ctx` is the FIPS 204/205 context string (at most 255
    /// bytes), unused by the classical algorithms.
    pub fn sign(&self, msg: &[u8], ctx: &[u8]) -> Result<Vec<u8>, SigError> {
        if ctx.len() > 255 {
            return Err(SigError(format!(
                "the context is {} bytes, at most 255 allowed",
                ctx.len()
            )));
        }
        match self.alg {
            SigAlg::MlDsa44 => mldsa_sign!(ml_dsa_44, self.secret, msg, ctx),
            SigAlg::MlDsa65 => mldsa_sign!(ml_dsa_65, self.secret, msg, ctx),
            SigAlg::MlDsa87 => mldsa_sign!(ml_dsa_87, self.secret, msg, ctx),
            SigAlg::SlhDsaSha2_128s => {
                let sk = slh_dsa::SigningKey::<slh_dsa::Sha2_128s>::try_from(&self.secret[..])
                    .expect("checked at load");
                slh_sign(&sk, msg, ctx)
            }
            SigAlg::SlhDsaSha2_128f => {
                let sk = slh_dsa::SigningKey::<slh_dsa::Sha2_128f>::try_from(&self.secret[..])
                    .expect("checked at load");
                slh_sign(&sk, msg, ctx)
            }
            SigAlg::Ed25519 => {
                use ed25519_dalek::Signer as _;
                let sk = ed25519_dalek::SigningKey::from_bytes(
                    &self.secret[..].try_into().expect("32 bytes"),
                );
                Ok(sk.sign(msg).to_bytes().to_vec())
            }
            SigAlg::EcdsaP256 => {
                use p256::ecdsa::signature::Signer as _;
                let sk = p256::ecdsa::SigningKey::from_slice(&self.secret)
                    .map_err(|_| SigError("invalid ECDSA P-256 private key".into()))?;
                let sig: p256::ecdsa::Signature = sk.sign(msg);
                Ok(sig.to_bytes().to_vec())
            }
        }
    }
}

fn slh_sign<P: slh_dsa::ParameterSet>(
    sk: &slh_dsa::SigningKey<P>,
    msg: &[u8],
    ctx: &[u8],
) -> Result<Vec<u8>, SigError> {
    // Hedged: fresh randomness (n bytes) rather than the deterministic variant.
    let mut r = Zeroizing::new([0u8; 16]);
    rand::fill(&mut r[..]);
    sk.try_sign_with_context(msg, ctx, Some(&r[..]))
        .map(|s| s.to_vec())
        .map_err(|_| SigError("SLH-DSA signing failed".into()))
}

/// FIPS 205 slh_sign (pure, with a context) with the caller's `opt_rand`
/// (`n` = 16 bytes), or the deterministic variant when it is `None`: what
/// the ACVP sigGen vectors pin. `sk` is the 64-byte private key as stored.
/// pqmig itself signs through [`Signer::sign`], with fresh randomness.
pub fn slh_sign_with(
    alg: SigAlg,
    sk: &[u8],
    msg: &[u8],
    ctx: &[u8],
    opt_rand: Option<&[u8]>,
) -> Result<Vec<u8>, SigError> {
    fn sign<P: slh_dsa::ParameterSet>(
        alg: SigAlg,
        sk: &[u8],
        msg: &[u8],
        ctx: &[u8],
        opt_rand: Option<&[u8]>,
    ) -> Result<Vec<u8>, SigError> {
        let sk = slh_dsa::SigningKey::<P>::try_from(sk)
            .map_err(|_| SigError(format!("invalid {} private key", alg.alias())))?;
        // slh-dsa panics on an opt_rand of the wrong length.
        if let Some(r) = opt_rand.filter(|r| r.len() != 16) {
            return Err(SigError(format!(
                "opt_rand is {} bytes, expected 16",
                r.len()
            )));
        }
        sk.try_sign_with_context(msg, ctx, opt_rand)
            .map(|s| s.to_vec())
            .map_err(|_| SigError("SLH-DSA signing failed (context over 255 bytes?)".into()))
    }
    match alg {
        SigAlg::SlhDsaSha2_128s => sign::<slh_dsa::Sha2_128s>(alg, sk, msg, ctx, opt_rand),
        SigAlg::SlhDsaSha2_128f => sign::<slh_dsa::Sha2_128f>(alg, sk, msg, ctx, opt_rand),
        other => Err(SigError(format!("{} is not SLH-DSA", other.alias()))),
    }
}

fn slh_verify<P: slh_dsa::ParameterSet>(pk: &[u8], msg: &[u8], ctx: &[u8], sig: &[u8]) -> bool {
    let (Ok(vk), Ok(sig)) = (
        slh_dsa::VerifyingKey::<P>::try_from(pk),
        slh_dsa::Signature::<P>::try_from(sig),
    ) else {
        return false;
    };
    vk.try_verify_with_context(msg, ctx, &sig).is_ok()
}

/// Whether `sig` is a valid signature of `msg` under the raw public key.
/// Malformed keys or signatures are simply invalid.
pub fn verify(alg: SigAlg, public_key: &[u8], msg: &[u8], ctx: &[u8], sig: &[u8]) -> bool {
    match alg {
        SigAlg::MlDsa44 => mldsa_verify!(ml_dsa_44, public_key, msg, ctx, sig),
        SigAlg::MlDsa65 => mldsa_verify!(ml_dsa_65, public_key, msg, ctx, sig),
        SigAlg::MlDsa87 => mldsa_verify!(ml_dsa_87, public_key, msg, ctx, sig),
        SigAlg::SlhDsaSha2_128s => slh_verify::<slh_dsa::Sha2_128s>(public_key, msg, ctx, sig),
        SigAlg::SlhDsaSha2_128f => slh_verify::<slh_dsa::Sha2_128f>(public_key, msg, ctx, sig),
        SigAlg::Ed25519 => {
            let (Ok(pk), Ok(sig)) = (
                <[u8; 32]>::try_from(public_key),
                ed25519_dalek::Signature::from_slice(sig),
            ) else {
                return false;
            };
            ed25519_dalek::VerifyingKey::from_bytes(&pk)
                .is_ok_and(|vk| vk.verify_strict(msg, &sig).is_ok())
        }
        SigAlg::EcdsaP256 => {
            use p256::ecdsa::signature::Verifier as _;
            let (Ok(vk), Ok(sig)) = (
                p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key),
                p256::ecdsa::Signature::from_slice(sig),
            ) else {
                return false;
            };
            vk.verify(msg, &sig).is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_and_verifies_with_context() {
        for alg in ALL {
            if alg == SigAlg::SlhDsaSha2_128s {
                continue; // seconds per signature: covered by the integration tests
            }
            let s = Signer::from_seed(alg, &generate_seed(alg)).unwrap();
            let sig = s.sign(b"payload", b"users").unwrap();
            assert!(
                verify(alg, s.public_key(), b"payload", b"users", &sig),
                "{alg:?}"
            );
            assert!(
                !verify(alg, s.public_key(), b"payloae", b"users", &sig),
                "{alg:?}"
            );
            assert!(
                !verify(alg, s.public_key(), b"payload", b"users", &sig[1..]),
                "{alg:?}"
            );
            if alg.is_pq() {
                assert!(
                    !verify(alg, s.public_key(), b"payload", b"other", &sig),
                    "{alg:?}"
                );
                assert!(s.sign(b"x", &[0u8; 256]).is_err());
            }
        }
    }
}
