//! Where a hash profile's pepper lives, and how the HMAC is computed with
//! it: in process from the local keyring, or by the provider holding the
//! key (AWS KMS `GenerateMac`, an HSM's `C_Sign`, Vault transit `hmac`),
//! which never gives it
//! out. A remote pepper's MACs are asked for a whole batch before the
//! batch is computed, concurrently (README "Key providers").

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::GenericClient;

use super::{KeyIdentity, ProfilePin};
use crate::crypto::onion::{HmacHash, Layer, Onion};
use crate::db::kms::{self, KmsKey};
use crate::keys::KeyProvider;
use crate::keys::aws;
use crate::keys::ops::{Key, OpError, Providers};
use crate::keys::vault;
use crate::scope::{JobError, ScopeContext, fatal};

/// A new hash, or why the item fails: (error code, message).
pub type NewHash = Result<Vec<u8>, (&'static str, String)>;

/// A profile's pepper, ready for a job.
pub enum Pepper {
    /// In process: a key of the local keyring (the hot path keeps the
    /// keyed HMAC state).
    Local(Arc<Onion>),
    /// Held by a provider (an HSM, AWS KMS, Vault transit), which computes
    /// the HMACs.
    Remote {
        layer: Layer,
        key: Key,
        what: String,
    },
}

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pepper::Local(onion) => onion.fmt(f),
            Pepper::Remote { what, .. } => f.write_str(what),
        }
    }
}

impl Pepper {
    /// The pepper the pinned profile names, checked before any item: it
    /// exists, is declared for exactly the target's HMAC, and its provider
    /// can compute that HMAC (an HSM's key is looked up and its attributes
    /// checked; KMS is first asked with the first batch).
    pub async fn load(
        c: &impl GenericClient,
        pin: &mut ProfilePin,
        hash: HmacHash,
        ctx: &ScopeContext,
        new_hashes: bool,
    ) -> Result<Pepper, JobError> {
        let output_len = pin.output_len.map(|n| n as usize);
        let layer = Layer::new(hash, output_len, &pin.name)
            .map_err(|e| fatal(format!("hash profile {:?}: {e}", pin.name)))?;
        let Some(id) = pin.kms_key_id else {
            let key_ref = pin.key_ref.as_deref().unwrap_or_default();
            return local(ctx, key_ref, hash, layer, pin);
        };
        let key = kms::kms_keys_by_id(c, &[id]).await?.pop().ok_or_else(|| {
            fatal(format!(
                "hash profile {:?}: params.kms_key_id {id} names no kms_keys row",
                pin.name
            ))
        })?;
        let what = format!(
            "hash profile {:?} pepper (kms_keys {id}, {:?})",
            pin.name, key.key_ref
        );
        check_row(&key, hash, &what, new_hashes)?;
        // The key the job started with, or none: the row's reference,
        // provider or server edited since would change the pepper under
        // the same profile (half a table under one key, half another).
        let identity = KeyIdentity {
            provider: key.provider.clone(),
            location: key.location.clone(),
            external_key_ref: key.key_ref.clone(),
            algorithm: key.algorithm.clone(),
        };
        match &pin.kms_key {
            Some(first) if *first != identity => {
                return Err(fatal(format!(
                    "{what}: the kms_keys row was changed since the job started (it named {} {:?} at {:?}); restore it, or queue a new job with a new profile",
                    first.provider,
                    first.external_key_ref,
                    first.location.as_deref().unwrap_or_default()
                )));
            }
            Some(_) => {}
            None => pin.kms_key = Some(identity),
        }
        match key.provider.as_str() {
            "local" => return local(ctx, &key.key_ref, hash, layer, pin),
            // An alias can be moved to another key: the pepper would change
            // under the profile without any row changing.
            "aws" if key.key_ref.starts_with("alias/") || key.key_ref.contains(":alias/") => {
                return Err(fatal(format!(
                    "{what}: a pepper must name its KMS key by key ARN or key id, not an alias (an alias can be moved to another key)"
                )));
            }
            "aws" if aws::mac_algorithm(hash).is_none() => {
                return Err(fatal(format!(
                    "{what}: KMS HMAC keys compute HMAC-SHA-256 and HMAC-SHA-512; {hash} is not supported by the aws provider"
                )));
            }
            "vault" => {
                vault::hmac_key(&key.key_ref).map_err(|e| fatal(format!("{what}: {e}")))?;
            }
            _ => {}
        }
        let (aws, vault) = (aws::Clients::default(), vault::Clients::default());
        let providers = Providers {
            keyring: None,
            pkcs11: ctx.pkcs11.as_ref(),
            aws: &aws,
            vault: &vault,
        };
        let found = Key::of(&key, &providers, Some(hash)).await;
        Ok(Pepper::Remote {
            layer,
            key: found.map_err(|e| op_error(&what, e))?,
            what,
        })
    }

    /// The profile's layer: its version chain and output length.
    pub fn layer(&self) -> &Layer {
        match self {
            Pepper::Local(onion) => onion.layer(),
            Pepper::Remote { layer, .. } => layer,
        }
    }

    /// The new hash of each `(item id, old hash)`, computed by the provider
    /// that holds the pepper ([`aws::CONCURRENCY`] KMS requests at a time;
    /// an HSM's on one session per core), cut to the profile's length.
    /// With `verify` the provider checks each MAC once more (`VerifyMac`,
    /// `C_Verify`) before it may be written. A refusing provider fails the
    /// job; an unreachable one is the batch's transient error. Empty for a
    /// local pepper, which computes in place.
    pub async fn remote(
        &self,
        olds: Vec<(i64, Vec<u8>)>,
        verify: bool,
    ) -> Result<HashMap<i64, NewHash>, JobError> {
        let Pepper::Remote { layer, key, what } = self else {
            return Ok(HashMap::new());
        };
        let messages: Vec<&[u8]> = olds.iter().map(|(_, m)| m.as_slice()).collect();
        let macs = key
            .hmac(layer.hash(), &messages, verify)
            .await
            .map_err(|e| op_error(what, e))?;
        Ok(olds
            .iter()
            .zip(macs)
            .map(|((id, _), mac)| {
                let new = match mac {
                    Ok(Some(m)) => cut(layer, m),
                    Ok(None) => Err(not_verified()),
                    Err(why) => Err(("data", format!("the key provider: {why}"))),
                };
                (*id, new)
            })
            .collect())
    }
}

/// A provider's full-length MAC cut to the profile's length; a MAC of
/// another length (a key of another size, a proxy in the way) fails the
/// item rather than be stored short.
fn cut(layer: &Layer, mac: Vec<u8>) -> NewHash {
    let want = layer.hash().output_len();
    if mac.len() != want {
        return Err((
            "data",
            format!(
                "the key provider returned a {}-byte MAC, {} gives {want}",
                mac.len(),
                layer.hash()
            ),
        ));
    }
    Ok(layer.truncate(mac))
}

fn not_verified() -> (&'static str, String) {
    (
        "verify",
        "the key provider did not verify the new hash it computed; nothing written".into(),
    )
}

/// A local pepper: the keyring's key, declared for exactly the target's
/// HMAC (a pepper declared for another hash would be used under a name it
/// was not made for).
fn local(
    ctx: &ScopeContext,
    key_ref: &str,
    hash: HmacHash,
    layer: Layer,
    pin: &ProfilePin,
) -> Result<Pepper, JobError> {
    let keyring = ctx.keys("read the pepper from")?;
    let secret = keyring.secret(key_ref).map_err(|e| fatal(e.to_string()))?;
    if !secret.algorithm.eq_ignore_ascii_case(&hash.alias()) {
        return Err(fatal(format!(
            "key {key_ref:?} is declared {}, the profile {:?} of target {} needs an {} pepper",
            secret.algorithm,
            pin.name,
            hash.alias(),
            hash.alias()
        )));
    }
    let onion = Onion::new(hash, secret.bytes.clone(), layer.output_len(), &pin.name)
        .map_err(|e| fatal(format!("hash profile {:?}: {e}", pin.name)))?;
    Ok(Pepper::Local(Arc::new(onion)))
}

/// A `kms_keys` row usable as the pepper of `hash`: enabled, active (or,
/// to verify what a job made, retired), declared for exactly that HMAC.
fn check_row(key: &KmsKey, hash: HmacHash, what: &str, new_hashes: bool) -> Result<(), JobError> {
    if !key.provider_enabled {
        return Err(fatal(format!("{what}: its kms_providers row is disabled")));
    }
    if key.status == "disabled" || (new_hashes && key.status != "active") {
        return Err(fatal(format!(
            "{what}: the key is {}{}",
            key.status,
            if new_hashes {
                ", not active: no new hashes are made with it"
            } else {
                ""
            }
        )));
    }
    match key.algorithm.as_deref() {
        Some(a) if a.eq_ignore_ascii_case(&hash.alias()) => Ok(()),
        Some(a) => Err(fatal(format!(
            "{what}: the key is declared {a}, the target needs an {} pepper",
            hash.alias()
        ))),
        None => Err(fatal(format!(
            "{what}: the row declares no algorithm; set kms_keys.algorithm to {}",
            hash.alias()
        ))),
    }
}

fn op_error(what: &str, e: OpError) -> JobError {
    match e {
        OpError::Unavailable(_) => JobError::Transient(format!("{what}: {e}")),
        OpError::Refused(_) | OpError::Integrity(_) => fatal(format!("{what}: {e}")),
    }
}
