//! What this process can do with a `kms_keys` row (`pqmig keys list`), and
//! a harmless operation with each key to prove it (`pqmig keys check`):
//! seal and open a fixed string, encapsulate to the key and decapsulate,
//! or an HMAC. Only descriptions and public-key fingerprints come out.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::pkcs11::{HsmError, Pkcs11Settings};
use super::{KeyProvider, KeySecret, LocalKeyring};
use crate::crypto::kem::{Kem, KemKeyPair};
use crate::crypto::onion::{HmacHash, Onion};
use crate::crypto::{aead, wrap};
use crate::db::kms::KmsKey;

const PROBE: &[u8] = b"pqmig keys check";

/// The HMAC a row's key is declared for (`None`: not an HMAC key).
fn hmac_of(key: &KmsKey) -> Result<Option<HmacHash>, String> {
    match key.algorithm.as_deref() {
        Some(a) if a.to_ascii_uppercase().starts_with("HMAC-") => HmacHash::from_alias(a)
            .map(Some)
            .ok_or_else(|| format!("unknown HMAC {a}")),
        _ => Ok(None),
    }
}

/// A `pkcs11` row's token and key, found (the token logged in, the key
/// checked, as an AES key or as the HMAC key it is declared for): the
/// module, the token label.
fn hsm_of(
    pkcs11: Option<&Pkcs11Settings>,
    key: &KmsKey,
) -> Result<(std::sync::Arc<super::pkcs11::Hsm>, String), String> {
    if !key.provider_enabled {
        return Err("its kms_providers row is disabled".into());
    }
    let settings = pkcs11.ok_or("keys.pkcs11_module and keys.pkcs11_pin_file are not set")?;
    let algorithm = key.algorithm.as_deref().unwrap_or("AES-256-GCM");
    let hmac = hmac_of(key)?;
    let x25519 = is_x25519(key);
    let kem = token_kem(key);
    if hmac.is_none() && !x25519 && kem.is_none() && !algorithm.eq_ignore_ascii_case("AES-256-GCM")
    {
        return Err(format!(
            "the pkcs11 provider uses AES-256-GCM, X25519, ML-KEM-768, ML-KEM-1024, X-Wing and HMAC keys; {algorithm} is not supported by it"
        ));
    }
    let token = key
        .location
        .clone()
        .ok_or("its pkcs11 kms_providers row names no token (location)")?;
    let hsm = super::pkcs11::open(settings).map_err(|e| e.to_string())?;
    let t = hsm.token(&token).map_err(|e| e.to_string())?;
    match hmac {
        Some(hash) => hsm.hmac_key(&t, &key.key_ref, hash).map(drop),
        None if x25519 => hsm.x25519_key(&t, &key.key_ref).map(drop),
        None if kem.is_some() => hsm
            .ml_kem_key(&t, &key.key_ref, kem.expect("matched"))
            .map(drop),
        None => hsm.aes_key(&t, &key.key_ref).map(drop),
    }
    .map_err(|e| e.to_string())?;
    Ok((hsm, token))
}

/// The KEM a `pkcs11` row declares (ML-KEM-768/1024, or X-Wing: its
/// ML-KEM-768 and X25519 halves under one label).
fn token_kem(key: &KmsKey) -> Option<Kem> {
    key.algorithm.as_deref().and_then(Kem::from_alias)
}

/// The row is declared an X25519 key.
fn is_x25519(key: &KmsKey) -> bool {
    key.algorithm
        .as_deref()
        .is_some_and(|a| a.eq_ignore_ascii_case("X25519"))
}

/// Why a row's key cannot be used here, or (Ok) what it can be used for.
pub fn usable(
    keyring: Option<&LocalKeyring>,
    pkcs11: Option<&Pkcs11Settings>,
    key: &KmsKey,
) -> Result<&'static str, String> {
    if key.provider == "pkcs11" {
        let (hsm, token) = hsm_of(pkcs11, key)?;
        if let Some(kem) = token_kem(key) {
            // A target layer key needs its public key object too; the
            // private key opens existing layers either way.
            return match hsm.ml_kem_public_object(&token, &key.key_ref, kem) {
                Ok(Some(_)) => {
                    Ok("decapsulate pqmig-wrap-v1 layers, layer key of new wraps (in its token)")
                }
                Ok(None) => Ok(
                    "decapsulate pqmig-wrap-v1 layers (in its token; no public key object: not a layer key of new wraps)",
                ),
                Err(e @ HsmError::Unavailable(_)) => Err(e.to_string()),
                Err(_) => Ok(
                    "decapsulate pqmig-wrap-v1 layers (in its token; its public key object cannot be used, keys check says why: not a layer key of new wraps)",
                ),
            };
        }
        return Ok(match hmac_of(key)? {
            Some(_) => "hmac (in its token)",
            None if is_x25519(key) => "open legacy-x25519 (in its token)",
            None => "open/unseal (in its token)",
        });
    }
    if key.provider == "aws" {
        region_of(key)?;
        return Ok(match hmac_of(key)? {
            Some(_) => "hmac (in AWS KMS; keys check asks it)",
            None => "open legacy-aws-kms (in AWS KMS; keys check asks it)",
        });
    }
    if key.provider == "vault" {
        if !key.provider_enabled {
            return Err("its kms_providers row is disabled".into());
        }
        super::vault::base_of(key.location.as_deref().unwrap_or_default())?;
        return Ok(match hmac_of(key)? {
            Some(_) => "hmac (in Vault transit; keys check asks it)",
            None => "open legacy-vault-transit/unseal (in Vault transit; keys check asks it)",
        });
    }
    let secret = secret_of(keyring, key)?;
    uses(&secret.algorithm).ok_or_else(|| unused(&secret.algorithm))
}

/// A `vault` row's key used once: an HMAC key computes and verifies an
/// HMAC of a test string; another encrypts and decrypts one (with
/// associated data, as pqmig's wraps and signing keys use it).
pub async fn try_vault(clients: &super::vault::Clients, key: &KmsKey) -> Result<String, String> {
    if !key.provider_enabled {
        return Err("its kms_providers row is disabled".into());
    }
    let vault = clients
        .get(key.location.as_deref().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    if let Some(hash) = hmac_of(key)? {
        let macs = vault
            .hmac(&key.key_ref, hash, &[PROBE], true)
            .await
            .map_err(|e| format!("hmac: {e}"))?;
        return match macs.into_iter().next() {
            Some(Ok(Some(mac))) if mac.len() == hash.output_len() => Ok(format!(
                "Vault transit computed and verified an {hash} of a test string"
            )),
            Some(Err(why)) => Err(format!("hmac: {why}")),
            _ => Err(format!("Vault transit's {hash} and its verify disagree")),
        };
    }
    let aad = b"pqmig-keys-check";
    let sealed = vault
        .encrypt(&key.key_ref, PROBE, aad)
        .await
        .map_err(|e| format!("encrypt: {e}"))?;
    match vault
        .decrypt(&key.key_ref, &[(&sealed, aad)])
        .await
        .map_err(|e| format!("decrypt: {e}"))?
        .pop()
    {
        Some(Ok(back)) if back.as_slice() == PROBE => {
            Ok("Vault transit encrypted and decrypted a test string".into())
        }
        Some(Err(why)) => Err(format!("decrypt: {why}")),
        _ => Err("Vault transit encrypt and decrypt disagree".into()),
    }
}

/// An `aws` row's region (its provider's `location`), the row enabled.
fn region_of(key: &KmsKey) -> Result<&str, String> {
    if !key.provider_enabled {
        return Err("its kms_providers row is disabled".into());
    }
    super::aws::region_of(key)
}

/// An `aws` row's key used once: a test string encrypted and decrypted
/// by KMS, with the context of a `legacy-aws-kms` wrap of the nil uuid (so
/// a policy conditioned on pqmig's context key allows it; `kms:Encrypt`
/// is needed too, for this check alone).
pub async fn try_aws(clients: &super::aws::Clients, key: &KmsKey) -> Result<String, String> {
    let region = region_of(key)?;
    let kms = clients.get(region).await;
    if let Some(hash) = hmac_of(key)? {
        // An HMAC key: a MAC of a test string, and KMS verifying it.
        let algorithm = super::aws::mac_algorithm(hash).ok_or_else(|| {
            format!("KMS HMAC keys compute HMAC-SHA-256 and HMAC-SHA-512, not {hash}")
        })?;
        let mac = kms
            .generate_mac(&key.key_ref, algorithm.clone(), PROBE)
            .await
            .map_err(|e| format!("GenerateMac: {e}"))?;
        if !kms
            .verify_mac(&key.key_ref, algorithm, PROBE, &mac)
            .await
            .map_err(|e| format!("VerifyMac: {e}"))?
        {
            return Err("KMS GenerateMac and VerifyMac disagree".into());
        }
        return Ok(format!(
            "KMS computed and verified an {hash} of a test string (region {region})"
        ));
    }
    let context = (
        wrap::AWS_KMS_CONTEXT_KEY,
        "00000000-0000-0000-0000-000000000000",
    );
    let blob = kms
        .encrypt(&key.key_ref, PROBE, context)
        .await
        .map_err(|e| format!("Encrypt: {e}"))?;
    let back = kms
        .decrypt(&key.key_ref, &blob, context)
        .await
        .map_err(|e| format!("Decrypt: {e}"))?;
    if back.as_slice() != PROBE {
        return Err("KMS Encrypt and Decrypt disagree".into());
    }
    Ok(format!(
        "KMS encrypted and decrypted a test string (region {region})"
    ))
}

/// What a key of `algorithm` is used for by the scopes.
fn uses(algorithm: &str) -> Option<&'static str> {
    match algorithm {
        // Legacy wraps, and the KEK of sealed signing keys.
        "AES-256-GCM" => Some("open/unseal"),
        "X25519" => Some("open"),
        a if Kem::from_alias(a).is_some() => Some("decapsulate"),
        a if a.starts_with("HMAC-") => Some("hmac"),
        _ => None,
    }
}

fn unused(algorithm: &str) -> String {
    format!("{algorithm} keys have no use as kms_keys rows")
}

/// The row's secret from the keyring, checked against what the row says.
fn secret_of(keyring: Option<&LocalKeyring>, key: &KmsKey) -> Result<KeySecret, String> {
    if key.provider != "local" {
        return Err(format!("provider {} is not supported yet", key.provider));
    }
    if !key.provider_enabled {
        return Err("its kms_providers row is disabled".into());
    }
    let keyring = keyring.ok_or("no keyring loaded")?;
    let secret = match &key.algorithm {
        Some(a) => keyring.secret_for(&key.key_ref, a),
        None => keyring.secret(&key.key_ref),
    };
    secret.map_err(|e| e.to_string())
}

/// Use the row's key once, harmlessly: what was done, or why it failed.
pub fn try_key(
    keyring: Option<&LocalKeyring>,
    pkcs11: Option<&Pkcs11Settings>,
    key: &KmsKey,
) -> Result<String, String> {
    if key.provider == "pkcs11" {
        let (hsm, token) = hsm_of(pkcs11, key)?;
        if let Some(hash) = hmac_of(key)? {
            let macs = hsm
                .hmac(&token, &key.key_ref, hash, &[PROBE], true)
                .map_err(|e| e.to_string())?;
            return match macs.first() {
                Some(Some(mac)) if mac.len() == hash.output_len() => Ok(format!(
                    "computed and verified an {hash} of a test string in token {token:?}"
                )),
                _ => Err(format!("{hash} sign and verify in the token disagree")),
            };
        }
        if is_x25519(key) {
            // A test string sealed to the token's public key, opened by
            // the token's agreement.
            let public = hsm
                .x25519_public(&token, &key.key_ref)
                .map_err(|e| e.to_string())?;
            let sealed = wrap::seal_legacy_x25519(&public, "pqmig-keys-check", PROBE);
            let peer = wrap::legacy_x25519_eph(&sealed).expect("a wrap just made");
            let (shared, _) = hsm
                .x25519_agree(&token, &key.key_ref, peer)
                .map_err(|e| e.to_string())?;
            let opened =
                wrap::open_legacy_x25519_agreed(&shared, &public, "pqmig-keys-check", &sealed)
                    .map_err(|e| format!("X25519 agreement in the token: {e}"))?;
            if opened.as_slice() != PROBE {
                return Err("X25519 seal and open in the token disagree".into());
            }
            return Ok(format!(
                "sealed to its public key and opened in token {token:?}; {}",
                fingerprint(&public)
            ));
        }
        if let Some(kem) = token_kem(key) {
            // With a public key object: encapsulated to it, and the token
            // decapsulates the same secret (what a layer key needs).
            let public = hsm
                .ml_kem_public_object(&token, &key.key_ref, kem)
                .map_err(|e| e.to_string())?;
            if let Some(public) = public {
                return Ok(format!(
                    "encapsulated to its public key and decapsulated in token {token:?} ({}); {}",
                    kem.alias(),
                    fingerprint(&public)
                ));
            }
            // No public key to encapsulate to (the token keeps the private
            // key alone): a test ciphertext decapsulated twice. ML-KEM
            // rejects implicitly, so the same secret both times shows the
            // key and the mechanism at work.
            let mut ct = vec![0u8; kem.ciphertext_len()];
            rand::fill(&mut ct[..]);
            let once = hsm
                .ml_kem_decapsulate(&token, &key.key_ref, kem, &ct)
                .map_err(|e| e.to_string())?;
            let twice = hsm
                .ml_kem_decapsulate(&token, &key.key_ref, kem, &ct)
                .map_err(|e| e.to_string())?;
            if *once != *twice {
                return Err(format!(
                    "{} decapsulation in the token gives two secrets for one ciphertext",
                    kem.alias()
                ));
            }
            return Ok(format!(
                "decapsulated a test ciphertext in token {token:?} ({})",
                kem.alias()
            ));
        }
        let aad = b"pqmig-keys-check";
        let sealed = hsm
            .aes_gcm_seal(&token, &key.key_ref, PROBE, aad)
            .map_err(|e| e.to_string())?;
        let opened = hsm
            .aes_gcm_open(&token, &key.key_ref, &sealed, aad)
            .map_err(|e| e.to_string())?;
        if opened.as_slice() != PROBE {
            return Err("AES-256-GCM seal and open in the token disagree".into());
        }
        return Ok(format!(
            "sealed and opened a test string in token {token:?}"
        ));
    }
    let secret = secret_of(keyring, key)?;
    let alg = secret.algorithm.as_str();
    let fixed = |b: &[u8]| -> Result<Zeroizing<[u8; 32]>, String> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| format!("{alg} secret is {} bytes, expected 32", b.len()))?;
        Ok(Zeroizing::new(arr))
    };
    match alg {
        "AES-256-GCM" => {
            let k = fixed(&secret.bytes)?;
            let sealed = aead::seal(&k, PROBE, b"pqmig-keys-check");
            let opened = aead::open(&k, &sealed, b"pqmig-keys-check").map_err(|e| e.to_string())?;
            if opened.as_slice() != PROBE {
                return Err("AES-256-GCM seal and open disagree".into());
            }
            Ok("sealed and opened a test string".into())
        }
        "X25519" => {
            let k = fixed(&secret.bytes)?;
            let public = wrap::x25519_public(&k);
            let sealed = wrap::seal_legacy_x25519(&public, "pqmig-keys-check", PROBE);
            let opened = wrap::open_legacy_x25519(&k, "pqmig-keys-check", &sealed)
                .map_err(|e| e.to_string())?;
            if opened.as_slice() != PROBE {
                return Err("X25519 seal and open disagree".into());
            }
            Ok(format!(
                "sealed to its public key and opened; {}",
                fingerprint(&public)
            ))
        }
        a if Kem::from_alias(a).is_some() => {
            let kem = Kem::from_alias(a).expect("matched");
            let pair = KemKeyPair::from_seed(kem, &secret.bytes).map_err(|e| e.to_string())?;
            let (ct, shared) = pair.encapsulate();
            let back = pair.decapsulate(&ct).map_err(|e| e.to_string())?;
            if *back != *shared {
                return Err(format!(
                    "{a} decapsulation does not give the encapsulated secret"
                ));
            }
            Ok(format!(
                "encapsulated to its public key and decapsulated; {}",
                fingerprint(pair.public_key())
            ))
        }
        a if a.starts_with("HMAC-") => {
            let hash = HmacHash::from_alias(a).ok_or_else(|| format!("unknown HMAC {a}"))?;
            let onion = Onion::new(hash, secret.bytes.clone(), None, "pqmig-keys-check")
                .map_err(|e| e.to_string())?;
            let mac = onion.rehash(PROBE);
            if mac.len() != hash.output_len() {
                return Err(format!("{a} gave {} bytes", mac.len()));
            }
            Ok("computed an HMAC of a test string".into())
        }
        other => Err(unused(other)),
    }
}

/// `public key N bytes, SHA-256 hex` (public, safe to print).
fn fingerprint(public: &[u8]) -> String {
    format!(
        "public key {} bytes, SHA-256 {}",
        public.len(),
        crate::hex(&Sha256::digest(public))
    )
}
