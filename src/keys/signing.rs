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
    // Sealed by the KEK's provider: a key in an HSM, KMS or Vault never
    // leaves it.
    let (aws, vault) = (
        super::aws::Clients::default(),
        super::vault::Clients::default(),
    );
    let providers = super::ops::Providers {
        keyring: Some(keyring),
        pkcs11,
        aws: &aws,
        vault: &vault,
    };
    let kek = super::ops::Key::of(&kek_row, &providers, None)
        .await
        .map_err(|e| SigningKeyError::Usage(format!("--kek: {e}")))?;
    let sealed = kek
        .seal_signing_key(&seed, name)
        .await
        .map_err(|e| SigningKeyError::Usage(format!("--kek: {e}")))?;
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
