//! The keys of the signatures scope: the target signing keys, unsealed
//! from `signing_keys.private_key_enc` with their KEK (SPEC §4), and the
//! source signers' public keys.

use tokio_postgres::GenericClient;

use crate::crypto::sig::{SigAlg, Signer};
use crate::db::signatures::SigningKeyRow;
use crate::keys::LocalKeyring;
use crate::keys::ops::{Key, OpError, Providers};
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
    // The KEK's provider opens the sealed seed; a key in an HSM, KMS or
    // Vault never leaves it.
    let (aws, vault) = (
        crate::keys::aws::Clients::default(),
        crate::keys::vault::Clients::default(),
    );
    let providers = Providers {
        keyring: Some(keyring),
        pkcs11,
        aws: &aws,
        vault: &vault,
    };
    let name = &k.name;
    let opened = match Key::of(&kek_row, &providers, None).await {
        Ok(kek) => kek.unseal_signing_key(sealed, name).await,
        Err(e) => Err(e),
    };
    let seed = opened.map_err(|e| match e {
        OpError::Integrity(_) => UnsealError::Fatal(format!(
            "signing key {name:?}: private_key_enc does not open with its KEK (wrong key, another key's name, or tampered)"
        )),
        OpError::Refused(why) => UnsealError::Fatal(format!("signing key {name:?}: {why}")),
        OpError::Unavailable(why) => UnsealError::ForNow(format!("signing key {name:?}: {why}")),
    })?;
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
