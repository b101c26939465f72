//! What pqmig asks of a key, whoever holds it (SPEC §4: "a trait over
//! operations, not over secret export"). A [`Key`] is a `kms_keys` row
//! made ready for operations: seal and unseal a signing key, compute
//! HMACs with a pepper. The `local` provider does them in process with
//! the keyring's secret; `pkcs11`, `aws` and `vault` ask the HSM, KMS or
//! transit, and their keys never leave them. Every provider answers with
//! the same three kinds of failure ([`OpError`]), so a caller decides once
//! what each means for its job.
//!
//! Opening legacy wraps is per format (README "Key providers"): those
//! paths live with the wrappers scope, which batches them per provider.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::aws::{self, Kms, KmsError};
use super::pkcs11::{self, Hsm, HsmError, Pkcs11Settings};
use super::vault::{self, ItemResult, Vault, VaultError};
use super::{KeyProvider, signing::signing_key_aad};
use crate::crypto::onion::{HmacHash, Onion};
use crate::db::kms::KmsKey;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The sealed bytes do not open under this key and binding (a failed
    /// tag): the data's fault, or another key's.
    #[error("{0}")]
    Integrity(String),
    /// The key cannot be used: refused by the provider, missing, set up
    /// wrong, a provider this build lacks. Trying again changes nothing.
    #[error("{0}")]
    Refused(String),
    /// The provider is down, sealed, throttling or unreachable: try again
    /// later.
    #[error("{0}")]
    Unavailable(String),
}

impl From<KmsError> for OpError {
    fn from(e: KmsError) -> OpError {
        match e {
            KmsError::Integrity { .. } => OpError::Integrity(e.to_string()),
            KmsError::Refused { .. } => OpError::Refused(e.to_string()),
            KmsError::Unavailable(_) => OpError::Unavailable(e.to_string()),
        }
    }
}

impl From<HsmError> for OpError {
    fn from(e: HsmError) -> OpError {
        match e {
            HsmError::Authentication(_) => OpError::Integrity(e.to_string()),
            HsmError::Config(_) | HsmError::Unsupported(_) => OpError::Refused(e.to_string()),
            HsmError::Unavailable(_) => OpError::Unavailable(e.to_string()),
        }
    }
}

impl From<VaultError> for OpError {
    fn from(e: VaultError) -> OpError {
        match e {
            VaultError::Refused { .. } => OpError::Refused(e.to_string()),
            VaultError::Unavailable(_) => OpError::Unavailable(e.to_string()),
        }
    }
}

/// A `kms_keys` row's key, ready for operations.
pub enum Key {
    /// The keyring's secret, used in process.
    Local(super::KeySecret),
    /// A key in an HSM token.
    Pkcs11 {
        hsm: Arc<Hsm>,
        token: String,
        label: String,
    },
    /// A key in AWS KMS.
    Aws { kms: Arc<Kms>, key_id: String },
    /// A key in Vault / OpenBao transit.
    Vault { vault: Arc<Vault>, name: String },
}

/// Where a process finds its keys: the keyring, the HSM's settings, and
/// the clients of the remote providers (per piece of work).
pub struct Providers<'a> {
    pub keyring: Option<&'a dyn KeyProvider>,
    pub pkcs11: Option<&'a Pkcs11Settings>,
    pub aws: &'a aws::Clients,
    pub vault: &'a vault::Clients,
}

impl Key {
    /// The key of `row`, found through its provider. For `pkcs11` the
    /// token is logged in and the key looked up (as an AES key, or as the
    /// HMAC key `hmac` says); remote keys are checked by their first use.
    pub async fn of(
        row: &KmsKey,
        providers: &Providers<'_>,
        hmac: Option<HmacHash>,
    ) -> Result<Key, OpError> {
        if !row.provider_enabled {
            return Err(OpError::Refused("its kms_providers row is disabled".into()));
        }
        match row.provider.as_str() {
            "local" => {
                let keyring = providers.keyring.ok_or_else(|| {
                    OpError::Refused("no keyring configured (keys.keyring or PQMIG_KEYRING)".into())
                })?;
                let algorithm = match hmac {
                    Some(h) => h.alias(),
                    None => "AES-256-GCM".to_owned(),
                };
                let secret = super::kms_secret(keyring, row, &algorithm).map_err(|e| {
                    match e.is_transient() {
                        true => OpError::Unavailable(e.to_string()),
                        false => OpError::Refused(e.to_string()),
                    }
                })?;
                Ok(Key::Local(secret))
            }
            "pkcs11" => {
                let settings = providers.pkcs11.cloned().ok_or_else(|| {
                    OpError::Refused(
                        "held by provider pkcs11: set keys.pkcs11_module and keys.pkcs11_pin_file"
                            .into(),
                    )
                })?;
                let token = row.location.clone().ok_or_else(|| {
                    OpError::Refused(
                        "its pkcs11 kms_providers row names no token (location)".into(),
                    )
                })?;
                let label = row.key_ref.clone();
                let (t, l) = (token.clone(), label.clone());
                let hsm = tokio::task::spawn_blocking(move || {
                    let hsm = pkcs11::open(&settings)?;
                    let tok = hsm.token(&t)?;
                    match hmac {
                        Some(h) => hsm.hmac_key(&tok, &l, h).map(drop),
                        None => hsm.aes_key(&tok, &l).map(drop),
                    }?;
                    Ok::<_, HsmError>(hsm)
                })
                .await
                .map_err(|e| OpError::Refused(format!("the key lookup panicked: {e}")))??;
                Ok(Key::Pkcs11 { hsm, token, label })
            }
            "aws" => {
                let region = aws::region_of(row).map_err(OpError::Refused)?;
                Ok(Key::Aws {
                    kms: providers.aws.get(region).await,
                    key_id: row.key_ref.clone(),
                })
            }
            "vault" => Ok(Key::Vault {
                vault: providers
                    .vault
                    .get(row.location.as_deref().unwrap_or_default())?,
                name: row.key_ref.clone(),
            }),
            other => Err(OpError::Refused(format!(
                "provider {other} is not supported yet (README \"Key providers\")"
            ))),
        }
    }

    /// Seal a new signing key's seed, bound to its name (SPEC §4's
    /// `private_key_enc`, in each provider's form: README "Key providers").
    pub async fn seal_signing_key(&self, seed: &[u8], name: &str) -> Result<Vec<u8>, OpError> {
        let aad = signing_key_aad(name);
        match self {
            Key::Local(secret) => Ok(crate::crypto::aead::seal(&*kek(secret)?, seed, &aad)),
            Key::Pkcs11 { hsm, token, label } => {
                let (hsm, token, label) = (Arc::clone(hsm), token.clone(), label.clone());
                let seed = Zeroizing::new(seed.to_vec());
                blocking(move || Ok(hsm.aes_gcm_seal(&token, &label, &seed, &aad)?)).await
            }
            Key::Aws { kms, key_id } => Ok(kms
                .encrypt(key_id, seed, (aws::SIGNING_KEY_CONTEXT_KEY, name))
                .await?),
            Key::Vault { vault, name: key } => Ok(vault.encrypt(key, seed, &aad).await?),
        }
    }

    /// Open a signing key's `private_key_enc` sealed under this key for
    /// `name`; a failed tag is [`OpError::Integrity`].
    pub async fn unseal_signing_key(
        &self,
        sealed: &[u8],
        name: &str,
    ) -> Result<Zeroizing<Vec<u8>>, OpError> {
        let aad = signing_key_aad(name);
        let no = || OpError::Integrity("private_key_enc does not open with its KEK".into());
        match self {
            Key::Local(secret) => {
                crate::crypto::aead::open(&*kek(secret)?, sealed, &aad).map_err(|_| no())
            }
            Key::Pkcs11 { hsm, token, label } => {
                let (hsm, token, label) = (Arc::clone(hsm), token.clone(), label.clone());
                let sealed = sealed.to_vec();
                blocking(move || Ok(hsm.aes_gcm_open(&token, &label, &sealed, &aad)?)).await
            }
            Key::Aws { kms, key_id } => Ok(kms
                .decrypt(key_id, sealed, (aws::SIGNING_KEY_CONTEXT_KEY, name))
                .await?),
            Key::Vault { vault, name: key } => {
                match vault.decrypt(key, &[(sealed, &aad)]).await?.pop() {
                    Some(Ok(seed)) => Ok(seed),
                    Some(Err(e)) if vault::item_error(&e) == vault::ItemError::Integrity => {
                        Err(no())
                    }
                    Some(Err(e)) => Err(OpError::Refused(format!("transit: {e}"))),
                    None => Err(OpError::Unavailable("transit answered nothing".into())),
                }
            }
        }
    }

    /// The full-length HMAC-`hash` of each message; with `verify` the
    /// provider checks each one it made (KMS `VerifyMac`, `C_Verify`,
    /// transit `verify`), `None` standing for one it did not verify. KMS is
    /// asked [`aws::CONCURRENCY`] at a time, an HSM on one session per
    /// core, transit [`vault::BATCH`] messages per request; in process for
    /// a local key.
    pub async fn hmac(
        &self,
        hash: HmacHash,
        messages: &[&[u8]],
        verify: bool,
    ) -> Result<Vec<ItemResult<Option<Vec<u8>>>>, OpError> {
        match self {
            Key::Local(secret) => {
                let onion = Onion::new(hash, secret.bytes.clone(), None, "pqmig")
                    .map_err(|e| OpError::Refused(e.to_string()))?;
                Ok(messages
                    .iter()
                    .map(|m| {
                        let mac = onion.rehash(m);
                        let good = !verify || onion.rehash_fresh(m) == mac;
                        Ok(good.then_some(mac))
                    })
                    .collect())
            }
            Key::Aws { kms, key_id } => {
                use futures_util::StreamExt;
                let algorithm = aws::mac_algorithm(hash).ok_or_else(|| {
                    OpError::Refused(format!(
                        "KMS HMAC keys compute HMAC-SHA-256 and HMAC-SHA-512; {hash} is not supported by the aws provider"
                    ))
                })?;
                // By index: a closure over borrowed items trips rustc's
                // higher-ranked lifetime check where the future must be Send.
                let answers: Vec<Result<ItemResult<Option<Vec<u8>>>, KmsError>> =
                    futures_util::stream::iter(0..messages.len())
                        .map(|i| aws_mac(kms, key_id, algorithm.clone(), messages[i], verify))
                        .buffered(aws::CONCURRENCY)
                        .collect()
                        .await;
                answers
                    .into_iter()
                    .map(|a| a.map_err(OpError::from))
                    .collect()
            }
            Key::Vault { vault, name } => {
                let out = vault.hmac(name, hash, messages, verify).await?;
                // The key's policy refusing the version is the key's
                // problem, anything else the server's: not the item's.
                for r in &out {
                    if let Err(e) = r {
                        return Err(match vault::item_error(e) {
                            vault::ItemError::Policy => {
                                OpError::Refused(format!("transit refuses it: {e}"))
                            }
                            _ => OpError::Unavailable(format!("transit: {e}")),
                        });
                    }
                }
                Ok(out)
            }
            Key::Pkcs11 { hsm, token, label } => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let per = messages.len().div_ceil(cores).max(64);
                let mut tasks = Vec::new();
                for part in messages.chunks(per) {
                    let part: Vec<Vec<u8>> = part.iter().map(|m| m.to_vec()).collect();
                    let (hsm, token, label) = (Arc::clone(hsm), token.clone(), label.clone());
                    tasks.push(blocking(move || {
                        let refs: Vec<&[u8]> = part.iter().map(Vec::as_slice).collect();
                        Ok(hsm.hmac(&token, &label, hash, &refs, verify)?)
                    }));
                }
                let mut out = Vec::with_capacity(messages.len());
                for t in tasks {
                    out.extend(t.await?.into_iter().map(Ok));
                }
                Ok(out)
            }
        }
    }
}

/// One KMS HMAC (and, with `verify`, KMS's check of it).
async fn aws_mac(
    kms: &Kms,
    key_id: &str,
    algorithm: aws_sdk_kms::types::MacAlgorithmSpec,
    message: &[u8],
    verify: bool,
) -> Result<ItemResult<Option<Vec<u8>>>, KmsError> {
    if message.len() > aws::MAX_MAC_MESSAGE {
        return Ok(Err(format!(
            "{} bytes, more than KMS GenerateMac takes ({})",
            message.len(),
            aws::MAX_MAC_MESSAGE
        )));
    }
    let mac = kms.generate_mac(key_id, algorithm.clone(), message).await?;
    let good = !verify || kms.verify_mac(key_id, algorithm, message, &mac).await?;
    Ok(Ok(good.then_some(mac)))
}

/// An AES-256-GCM KEK's bytes.
fn kek(secret: &super::KeySecret) -> Result<Zeroizing<[u8; 32]>, OpError> {
    <[u8; 32]>::try_from(&secret.bytes[..])
        .map(Zeroizing::new)
        .map_err(|_| OpError::Refused("not a 32-byte key".into()))
}

/// Run an HSM call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::Refused(format!("the HSM call panicked: {e}")))?
}
