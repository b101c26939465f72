//! The keys of the signatures scope: the target signing keys, unsealed
//! from `signing_keys.private_key_enc` with their KEK (SPEC §4), and the
//! source signers' public keys.

use tokio_postgres::GenericClient;

use crate::crypto::sig::{SigAlg, Signer};
use crate::db::signatures::SigningKeyRow;
use crate::keys::LocalKeyring;
use crate::keys::signing::signing_key_aad;
use crate::scope::JobError;

/// The [`SigAlg`] of a `crypto_algorithms` row, if pqmig implements it.
pub(super) async fn sig_alg_of(
    c: &impl GenericClient,
    algo_id: i64,
) -> Result<Option<SigAlg>, JobError> {
    Ok(crate::db::algorithms::algorithm_by_id(c, algo_id)
        .await?
        .and_then(|a| SigAlg::from_row(&a.name, a.variant.as_deref())))
}

/// A signing key of the target algorithm, decrypted.
pub struct TargetKey {
    pub id: i64,
    pub name: String,
    pub scope: Option<String>,
    pub signer: Signer,
}

/// A source signer's key as the computation needs it.
pub enum SourceKey {
    Usable(SigAlg, Vec<u8>),
    /// A `compromised` key: its signatures are integrity failures.
    Compromised(String),
    /// Unknown algorithm or missing row: a data failure.
    Unusable(String),
}

/// Why a signing key could not be unsealed: for good, or for now (the HSM
/// holding its KEK is down: the job's transient error).
#[derive(Debug, thiserror::Error)]
pub enum UnsealError {
    #[error("{0}")]
    Fatal(String),
    #[error("{0}")]
    ForNow(String),
}

impl From<String> for UnsealError {
    fn from(why: String) -> UnsealError {
        UnsealError::Fatal(why)
    }
}

impl From<UnsealError> for crate::scope::JobError {
    fn from(e: UnsealError) -> crate::scope::JobError {
        match e {
            UnsealError::Fatal(why) => crate::scope::fatal(why),
            UnsealError::ForNow(why) => crate::scope::JobError::Transient(why),
        }
    }
}

/// Decrypt a signing key's private key with its KEK (SPEC §4) and check it
/// against the stored public key.
pub async fn load_signing_key(
    c: &impl GenericClient,
    keyring: &LocalKeyring,
    pkcs11: Option<&crate::keys::pkcs11::Pkcs11Settings>,
    k: &SigningKeyRow,
    alg: SigAlg,
) -> Result<Signer, UnsealError> {
    let (Some(sealed), Some(kek_id)) = (&k.private_key_enc, k.kms_key_id) else {
        return Err(format!(
            "signing key {:?} has no private_key_enc or kms_key_id",
            k.name
        )
        .into());
    };
    let kek_row = crate::db::kms::kms_keys_by_id(c, &[kek_id])
        .await
        .map_err(|e| crate::db::error_chain(&e))?
        .pop()
        .ok_or_else(|| {
            format!(
                "signing key {:?}: kms_keys row {kek_id} does not exist",
                k.name
            )
        })?;
    let aad = signing_key_aad(&k.name);
    let seed = if kek_row.provider == "aws" {
        // KMS opens the sealed seed; its key never leaves KMS.
        use crate::keys::aws::{self, KmsError};
        let region =
            aws::region_of(&kek_row).map_err(|e| format!("signing key {:?}: {e}", k.name))?;
        let kms = aws::Clients::default().get(region).await;
        kms.decrypt(&kek_row.key_ref, sealed, (aws::SIGNING_KEY_CONTEXT_KEY, &k.name))
            .await
            .map_err(|e| match e {
                KmsError::Integrity { .. } => UnsealError::Fatal(format!(
                    "signing key {:?}: private_key_enc does not open with its KEK (wrong key, another key's name, or tampered)",
                    k.name
                )),
                KmsError::Unavailable(_) => UnsealError::ForNow(format!("signing key {:?}: {e}", k.name)),
                KmsError::Refused { .. } => UnsealError::Fatal(format!("signing key {:?}: {e}", k.name)),
            })?
    } else if kek_row.provider == "vault" {
        // Vault transit opens the sealed seed, the name as associated data.
        use crate::keys::vault::{self, VaultError};
        let fail = |e: VaultError| match e {
            VaultError::Unavailable(_) => {
                UnsealError::ForNow(format!("signing key {:?}: {e}", k.name))
            }
            VaultError::Refused { .. } => {
                UnsealError::Fatal(format!("signing key {:?}: {e}", k.name))
            }
        };
        let vault = vault::Clients::default()
            .get(kek_row.location.as_deref().unwrap_or_default())
            .map_err(fail)?;
        match vault
            .decrypt(&kek_row.key_ref, &[(sealed, &aad)])
            .await
            .map_err(fail)?
            .pop()
        {
            Some(Ok(seed)) => seed,
            _ => {
                return Err(UnsealError::Fatal(format!(
                    "signing key {:?}: private_key_enc does not open with its KEK (wrong key, another key's name, or tampered)",
                    k.name
                )));
            }
        }
    } else if kek_row.provider == "pkcs11" {
        // The KEK stays in the HSM, which opens the sealed seed.
        let settings = pkcs11.ok_or_else(|| {
            format!(
                "signing key {:?}: its KEK is held by provider pkcs11: set keys.pkcs11_module and keys.pkcs11_pin_file",
                k.name
            )
        })?;
        let token = kek_row.location.as_deref().ok_or_else(|| {
            format!(
                "signing key {:?}: its KEK's pkcs11 provider names no token",
                k.name
            )
        })?;
        crate::keys::pkcs11::open(settings)
            .and_then(|hsm| hsm.aes_gcm_open(token, &kek_row.key_ref, sealed, &aad))
            .map_err(|e| match e {
                crate::keys::pkcs11::HsmError::Authentication(_) => UnsealError::Fatal(format!(
                    "signing key {:?}: private_key_enc does not open with its KEK (wrong key or tampered)",
                    k.name
                )),
                crate::keys::pkcs11::HsmError::Unavailable(why) => {
                    UnsealError::ForNow(format!("signing key {:?}: {why}", k.name))
                }
                other => UnsealError::Fatal(format!("signing key {:?}: {other}", k.name)),
            })?
    } else {
        let kek = crate::keys::kms_secret(keyring, &kek_row, "AES-256-GCM")
            .map_err(|e| format!("signing key {:?}: {e}", k.name))?;
        let kek = zeroize::Zeroizing::new(
            <[u8; 32]>::try_from(&kek.bytes[..]).map_err(|_| "KEK size".to_owned())?,
        );
        crate::crypto::aead::open(&kek, sealed, &aad)
            .map_err(|_| format!("signing key {:?}: private_key_enc does not open with its KEK (wrong key or tampered)", k.name))?
    };
    let signer =
        Signer::from_seed(alg, &seed).map_err(|e| format!("signing key {:?}: {e}", k.name))?;
    if signer.public_key() != k.public_key.as_slice() {
        return Err(format!(
            "signing key {:?}: its private key does not match its public_key",
            k.name
        )
        .into());
    }
    Ok(signer)
}
