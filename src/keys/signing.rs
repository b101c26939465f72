//! `pqmig keys signing`: a new signing key as a `signing_keys` row whose
//! private key (seed form) is sealed under an AES-256-GCM KEK of the
//! keyring or an HSM (SPEC §4): nonce(12) || AES-256-GCM(KEK, nonce, sk,
//! aad = "pqmig-signing-key:" || name); or, under an AWS KMS key, the
//! ciphertext blob of KMS `Encrypt` with the encryption context
//! {"pqmig:signing_key": name}.

use tokio_postgres::GenericClient;

use super::KeyProvider;
use crate::crypto::sig::{self, SigAlg, Signer};
use crate::db::{kms, signatures as dbs};

/// The additional data sealing a signing key's private key (SPEC §4).
pub fn signing_key_aad(name: &str) -> Vec<u8> {
    format!("pqmig-signing-key:{name}").into_bytes()
}

/// What was created: never the secret.
#[derive(Debug)]
pub struct CreatedSigningKey {
    pub id: i64,
    pub alg: SigAlg,
    pub public_key: Vec<u8>,
    pub kms_key_id: i64,
}

/// Why a signing key was not created: `Usage` for bad input (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Resolve `--kek` (a kms_keys id or external_key_ref) to its row.
async fn kek_row(c: &impl GenericClient, kek: &str) -> Result<kms::KmsKey, SigningKeyError> {
    let id = match kek.parse::<i64>() {
        Ok(id) => Some(id),
        Err(_) => kms::kms_key_by_ref(c, kek).await?,
    };
    let row = match id {
        Some(id) => kms::kms_keys_by_id(c, &[id]).await?.pop(),
        None => None,
    };
    row.ok_or_else(|| {
        SigningKeyError::Usage(format!(
            "--kek {kek:?}: no kms_keys row with that id or external_key_ref (register the AES-256-GCM key with `pqmig keys generate --register`)"
        ))
    })
}

/// Create the key and its row.
#[allow(clippy::too_many_arguments)]
pub async fn create_signing_key(
    c: &impl GenericClient,
    keyring: &dyn KeyProvider,
    pkcs11: Option<&super::pkcs11::Pkcs11Settings>,
    algorithm: &str,
    name: &str,
    kek: &str,
    scope: Option<&str>,
) -> Result<CreatedSigningKey, SigningKeyError> {
    let alg = SigAlg::from_alias(algorithm).ok_or_else(|| {
        SigningKeyError::Usage(format!(
            "--algorithm {algorithm:?}: expected ML-DSA-44, ML-DSA-65, ML-DSA-87, SLH-DSA-SHA2-128s, SLH-DSA-SHA2-128f, Ed25519 or ECDSA-P256"
        ))
    })?;
    if name.is_empty() || name.len() > 120 {
        return Err(SigningKeyError::Usage(
            "--name must be 1 to 120 bytes".into(),
        ));
    }
    let algo_id = crate::db::algorithms::algorithm_by_alias(c, alg.alias())
        .await?
        .ok_or_else(|| {
            SigningKeyError::Usage(format!(
                "alias {} is not in crypto_standard_aliases (run pqmig migrate)",
                alg.alias()
            ))
        })?;
    let kek_row = kek_row(c, kek).await?;
    if kek_row.status != "active" {
        return Err(SigningKeyError::Usage(format!(
            "--kek: kms_keys row {} is {}, not active",
            kek_row.id, kek_row.status
        )));
    }
    let seed = sig::generate_seed(alg);
    let signer =
        Signer::from_seed(alg, &seed).map_err(|e| SigningKeyError::Usage(e.to_string()))?;
    let aad = signing_key_aad(name);
    let sealed = if kek_row.provider == "aws" {
        // Sealed by KMS: its key never leaves KMS.
        let region = super::aws::region_of(&kek_row)
            .map_err(|e| SigningKeyError::Usage(format!("--kek: {e}")))?;
        let kms = super::aws::Clients::default().get(region).await;
        kms.encrypt(
            &kek_row.key_ref,
            &seed,
            (super::aws::SIGNING_KEY_CONTEXT_KEY, name),
        )
        .await
        .map_err(|e| SigningKeyError::Usage(format!("--kek: {e}")))?
    } else if kek_row.provider == "vault" {
        // Sealed by Vault transit (the name bound as associated data).
        let vault = super::vault::Clients::default()
            .get(kek_row.location.as_deref().unwrap_or_default())
            .map_err(|e| SigningKeyError::Usage(format!("--kek: {e}")))?;
        vault
            .encrypt(&kek_row.key_ref, &seed, &aad)
            .await
            .map_err(|e| SigningKeyError::Usage(format!("--kek: {e}")))?
    } else if kek_row.provider == "pkcs11" {
        // Sealed in the HSM: its KEK never leaves the token.
        let settings = pkcs11.ok_or_else(|| {
            SigningKeyError::Usage(
                "--kek is held by provider pkcs11: set keys.pkcs11_module and keys.pkcs11_pin_file"
                    .into(),
            )
        })?;
        let token = kek_row.location.as_deref().ok_or_else(|| {
            SigningKeyError::Usage(
                "--kek: its pkcs11 provider row names no token (location)".into(),
            )
        })?;
        super::pkcs11::open(settings)
            .and_then(|hsm| hsm.aes_gcm_seal(token, &kek_row.key_ref, &seed, &aad))
            .map_err(|e| SigningKeyError::Usage(format!("--kek: {e}")))?
    } else {
        let secret = super::kms_secret(keyring, &kek_row, "AES-256-GCM")
            .map_err(|e| SigningKeyError::Usage(format!("--kek: {e}")))?;
        let kek_bytes = zeroize::Zeroizing::new(
            <[u8; 32]>::try_from(&secret.bytes[..])
                .map_err(|_| SigningKeyError::Usage("--kek: not a 32-byte key".into()))?,
        );
        crate::crypto::aead::seal(&kek_bytes, &seed, &aad)
    };
    let id = dbs::signing_key_insert(
        c,
        algo_id,
        name,
        signer.public_key(),
        &sealed,
        kek_row.id,
        scope,
    )
    .await?
    .ok_or_else(|| {
        SigningKeyError::Usage(format!("a signing key named {name:?} exists already"))
    })?;
    Ok(CreatedSigningKey {
        id,
        alg,
        public_key: signer.public_key().to_vec(),
        kms_key_id: kek_row.id,
    })
}
