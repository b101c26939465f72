//! The keys existing wrappers are opened with, and the opening itself:
//! legacy wraps (every wrap the row holds, compared), `pqmig-wrap-v1`
//! wraps bound to their row (the AAD of the template their job pinned).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio_postgres::GenericClient;
use zeroize::Zeroizing;

use super::policy::{AadValues, PolicyPin, kem_of, render_aad, template_of};
use crate::crypto::kem::{Kem, KemKeyPair};
use crate::crypto::suite;
use crate::crypto::wrap::{self, WrapError};
use crate::db::kms::{self, KmsKey};
use crate::db::wrappers::{self as dbw, RemoteOpen, WrapperRow};
use crate::keys::aws::{self, Kms, KmsError};
use crate::keys::pkcs11::{self, Hsm, HsmError, Pkcs11Settings};
use crate::keys::vault::{self, Vault, VaultError};
use crate::keys::{KeyProvider, LocalKeyring};
use crate::scope::{JobError, fatal};

/// A key an existing wrapper is opened with.
pub enum SourceKey {
    Aes(Zeroizing<[u8; 32]>),
    X25519(Zeroizing<[u8; 32]>),
    Kem(KemKeyPair),
    /// An AES-256-GCM KEK held by an HSM (provider `pkcs11`), which opens
    /// the wrap itself: the key never leaves the token.
    Hsm {
        hsm: Arc<Hsm>,
        token: String,
        key: String,
    },
    /// An X25519 key held by an HSM (provider `pkcs11`), which computes
    /// the agreement of a `legacy-x25519` wrap itself (`CKM_ECDH1_DERIVE`).
    HsmX25519 {
        hsm: Arc<Hsm>,
        token: String,
        key: String,
    },
    /// An ML-KEM private key held by an HSM (provider `pkcs11`), which
    /// decapsulates a `pqmig-wrap-v1` layer itself (`CKM_ML_KEM`).
    HsmKem {
        hsm: Arc<Hsm>,
        token: String,
        key: String,
        kem: Kem,
    },
    /// A key in AWS KMS (provider `aws`), which decrypts `legacy-aws-kms`
    /// wraps itself, a batch's at once ([`SourceKeys::open_remote`]).
    Aws {
        kms: Arc<Kms>,
        key_id: String,
    },
    /// An `aes256-gcm96` key in Vault / OpenBao transit (provider
    /// `vault`), which decrypts `legacy-vault-transit` wraps itself, a
    /// batch's in a few requests ([`SourceKeys::open_remote`]).
    Vault {
        vault: Arc<Vault>,
        key: String,
    },
}

/// The item failure code of a provider that is down: never recorded; a
/// batch with one is a transient error of the job (released, retried).
pub(super) const UNAVAILABLE: &str = "provider-unavailable";

/// Why a key cannot be used.
enum Unusable {
    /// The key itself: gone from the keyring or the token, or of a kind
    /// that opens no wrapper. The items that need it fail (`data`); the
    /// job goes on with the others.
    Key(String),
    /// This process cannot use the key's provider for it: a provider pqmig
    /// does not support, one not set up here (no module, token, region or
    /// Vault token), or one without the operation (mechanism). The job
    /// fails before any item that needs the key is written, naming the
    /// provider and what is missing: every such item would fail alike.
    Setup(String),
    /// The provider is down: the job's transient error.
    ForNow(String),
}

/// A `pkcs11` key: its token and label checked now, so a missing one is
/// said once per key (`shallow`: the module, token and mechanism only, not
/// the key itself).
fn hsm_key(
    settings: Option<&Pkcs11Settings>,
    key: &KmsKey,
    shallow: bool,
) -> Result<SourceKey, Unusable> {
    let what = format!("key {} ({:?}) of provider pkcs11", key.id, key.key_ref);
    let settings = settings.ok_or_else(|| {
        Unusable::Setup(format!(
            "{what}: this process has no PKCS#11 module: set keys.pkcs11_module and keys.pkcs11_pin_file"
        ))
    })?;
    let algorithm = key.algorithm.as_deref().unwrap_or("AES-256-GCM");
    let x25519 = algorithm.eq_ignore_ascii_case("X25519");
    let kem = Kem::from_alias(algorithm);
    if kem.is_none() && !x25519 && !algorithm.eq_ignore_ascii_case("AES-256-GCM") {
        return Err(Unusable::Key(format!(
            "{what} is a {algorithm} key, which opens no wrapper"
        )));
    }
    let token = key.location.clone().ok_or_else(|| {
        Unusable::Setup(format!(
            "{what}: its kms_providers row names no token (location)"
        ))
    })?;
    let setup = |e: HsmError| match e {
        HsmError::Unavailable(m) => Unusable::ForNow(m),
        other => Unusable::Setup(format!("{what}: {other}")),
    };
    let hsm = pkcs11::open(settings).map_err(setup)?;
    let t = hsm.token(&token).map_err(setup)?;
    let (has, mechanism, format) = match (kem, x25519) {
        // X-Wing: its X25519 half also needs CKM_ECDH1_DERIVE.
        (Some(Kem::XWing), _) if !Hsm::does_x25519(&t) => {
            (false, "CKM_ECDH1_DERIVE", "pqmig-wrap-v1")
        }
        (Some(_), _) => (Hsm::does_ml_kem(&t), "CKM_ML_KEM", "pqmig-wrap-v1"),
        (None, true) => (Hsm::does_x25519(&t), "CKM_ECDH1_DERIVE", "legacy-x25519"),
        (None, false) => (Hsm::does_aes_gcm(&t), "CKM_AES_GCM", "legacy-aes-gcm"),
    };
    if !has {
        return Err(Unusable::Setup(format!(
            "{what}: token {token:?} has no {mechanism} mechanism, which opening its {format} wraps needs"
        )));
    }
    if !shallow {
        let found = match (kem, x25519) {
            (Some(kem), _) => hsm.ml_kem_key(&t, &key.key_ref, kem).map(drop),
            (None, true) => hsm.x25519_key(&t, &key.key_ref).map(drop),
            (None, false) => hsm.aes_key(&t, &key.key_ref).map(drop),
        };
        found.map_err(|e| match e {
            HsmError::Unavailable(m) => Unusable::ForNow(m),
            // The token will not do it for any key: its setup.
            HsmError::Unsupported(m) => Unusable::Setup(m),
            other => Unusable::Key(other.to_string()),
        })?;
    }
    let key = key.key_ref.clone();
    Ok(match (kem, x25519) {
        (Some(kem), _) => SourceKey::HsmKem {
            hsm,
            token,
            key,
            kem,
        },
        (None, true) => SourceKey::HsmX25519 { hsm, token, key },
        (None, false) => SourceKey::Hsm { hsm, token, key },
    })
}

/// Resolve a `kms_keys` row into a usable key: the local keyring's secret,
/// or the HSM that holds it.
fn source_key(
    keyring: &dyn KeyProvider,
    pkcs11_settings: Option<&Pkcs11Settings>,
    key: &KmsKey,
    shallow: bool,
) -> Result<SourceKey, Unusable> {
    match key.provider.as_str() {
        "local" => local_key(keyring, key).map_err(Unusable::Key),
        "pkcs11" => hsm_key(pkcs11_settings, key, shallow),
        "aws" | "vault" => unreachable!("remote keys are resolved before, on the async threads"),
        other => Err(Unusable::Setup(format!(
            "key {} ({:?}): provider {other} is not supported yet (README, Key providers)",
            key.id, key.key_ref
        ))),
    }
}

fn local_key(keyring: &dyn KeyProvider, key: &KmsKey) -> Result<SourceKey, String> {
    let secret = keyring.secret(&key.key_ref).map_err(|e| e.to_string())?;
    let fixed = |b: &[u8]| -> Zeroizing<[u8; 32]> {
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(b);
        k
    };
    match secret.algorithm.as_str() {
        "AES-256-GCM" => Ok(SourceKey::Aes(fixed(&secret.bytes))),
        "X25519" => Ok(SourceKey::X25519(fixed(&secret.bytes))),
        other => match Kem::from_alias(other) {
            Some(kem) => KemKeyPair::from_seed(kem, &secret.bytes)
                .map(SourceKey::Kem)
                .map_err(|e| format!("key {:?}: {e}", key.key_ref)),
            None => Err(format!(
                "key {:?} is a {other} key, which cannot open a wrapper",
                key.key_ref
            )),
        },
    }
}

/// The keys existing wrappers are opened with, by `kms_keys.id`, resolved
/// once per job; an error is the reason a key cannot be used (a `data`
/// failure of the items that need it).
pub struct SourceKeys {
    keyring: Arc<LocalKeyring>,
    /// `keys.pkcs11_*`, for keys held by an HSM.
    pkcs11: Option<Pkcs11Settings>,
    /// AWS KMS clients, by region.
    aws: aws::Clients,
    /// Vault clients, by location.
    vault: vault::Clients,
    keys: Mutex<HashMap<i64, Arc<Result<SourceKey, String>>>>,
    /// Policies named by `pqmig-wrap-v1` wrappers, by id.
    policies: Mutex<HashMap<PolicyKey, Arc<PolicyAad>>>,
    /// The KEMs of `crypto_algorithms` rows, by id (loaded once).
    kem_algos: std::sync::OnceLock<HashMap<i64, Kem>>,
}

/// Ids of the keys a wrapper needs to be opened.
/// A `pqmig-wrap-v1` wrapper is opened through its layers only: the
/// kms1/kms2 a rewrite leaves in place are not needed any more.
fn needed_keys(row: &WrapperRow) -> impl Iterator<Item = i64> + '_ {
    let legacy = format_of(row) != Ok(wrap::FORMAT_V1);
    [row.kms1, row.kms2]
        .into_iter()
        .flatten()
        .filter(move |_| legacy)
        .chain(row.layers.iter().filter_map(|l| l.kms_key_id))
}

pub(super) fn format_of(row: &WrapperRow) -> Result<&str, String> {
    suite::format(row.suite.as_ref())
}

/// The policy a `pqmig-wrap-v1` wrapper names (`crypto_suite.policy_id`).
pub(super) fn suite_policy(row: &WrapperRow) -> Option<i64> {
    suite::policy_id(row.suite.as_ref())
}

/// The job that wrote a `pqmig-wrap-v1` wrapper (`crypto_suite.job_id`).
pub(super) fn suite_job(row: &WrapperRow) -> Option<i64> {
    suite::job_id(row.suite.as_ref())
}

/// The KEM a `pqmig-wrap-v1` wrapper names (`crypto_suite.kem`).
pub(super) fn suite_kem(row: &WrapperRow) -> Option<Kem> {
    suite::kem(row.suite.as_ref())
}

/// A policy as the AAD check of an existing wrap needs it: its name and
/// checked template, or why it cannot be used.
type PolicyAad = Result<(String, Value), String>;

/// (`crypto_suite.policy_id`, `crypto_suite.job_id`) of a v1 wrap.
type PolicyKey = (i64, Option<i64>);

/// Why a wrap did not open.
enum Opened {
    /// Its tag failed: tampered, or the wrong key.
    Tag,
    /// The key cannot be used for it (set up wrong).
    Unusable(String),
    /// The provider is down.
    ForNow(String),
}

/// The token's X25519 agreement with a `legacy-x25519` wrap's ephemeral
/// key, and the key's public key. A wrap too short to hold one, or whose
/// ephemeral key is a low-order point (no shared secret), is the data's
/// fault, decided here; a key with its top bit set or not reduced mod p is
/// passed in its canonical form (the same agreement): so whatever the
/// token then says is the token's.
fn agree_in_token(
    hsm: &Hsm,
    token: &str,
    key: &str,
    sealed: &[u8],
) -> Result<(Zeroizing<[u8; 32]>, [u8; 32]), Opened> {
    let eph = wrap::legacy_x25519_eph(sealed).ok_or(Opened::Tag)?;
    if !wrap::x25519_contributory(eph) {
        return Err(Opened::Tag);
    }
    // The same agreement (RFC 7748), in the one form every token takes.
    let eph = wrap::x25519_canonical(eph);
    hsm.x25519_agree(token, key, &eph).map_err(hsm_opened)
}

/// What an HSM's answer means for a wrap.
fn hsm_opened(e: HsmError) -> Opened {
    match e {
        HsmError::Authentication(_) => Opened::Tag,
        HsmError::Unavailable(m) => Opened::ForNow(m),
        HsmError::Config(m) | HsmError::Unsupported(m) => Opened::Unusable(m),
    }
}

/// An item failure: (code, message).
pub(super) type Failure = (&'static str, String);

impl SourceKeys {
    pub fn new(keyring: Arc<LocalKeyring>) -> SourceKeys {
        SourceKeys {
            keyring,
            pkcs11: None,
            aws: aws::Clients::default(),
            vault: vault::Clients::default(),
            keys: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
            kem_algos: std::sync::OnceLock::new(),
        }
    }

    /// Keys of provider `pkcs11` are opened through this module and PIN.
    pub fn with_pkcs11(mut self, settings: Option<Pkcs11Settings>) -> SourceKeys {
        self.pkcs11 = settings;
        self
    }

    /// Look up (once) the keys these wrappers are opened with, and for
    /// `pqmig-wrap-v1` wrappers the policy whose AAD they must carry.
    pub async fn resolve(
        &self,
        c: &impl GenericClient,
        rows: &[&WrapperRow],
    ) -> Result<(), JobError> {
        if self.kem_algos.get().is_none() {
            let algos = crate::db::algorithms::algorithms_of_class(c, "kem").await?;
            let map = algos
                .iter()
                .filter_map(|a| kem_of(a).map(|k| (a.id, k)))
                .collect();
            let _ = self.kem_algos.set(map);
        }
        let mut policies: Vec<(i64, Option<i64>)> = {
            let cache = self.policies.lock().expect("policy cache");
            rows.iter()
                .filter_map(|r| suite_policy(r).map(|p| (p, suite_job(r))))
                .filter(|k| !cache.contains_key(k))
                .collect()
        };
        policies.sort_unstable();
        policies.dedup();
        let mut job_ids: Vec<i64> = policies.iter().filter_map(|(_, j)| *j).collect();
        job_ids.dedup();
        let pins: HashMap<i64, PolicyPin> = crate::db::jobs::jobs_pinned(c, &job_ids, "policy")
            .await?
            .into_iter()
            .filter_map(|(j, v)| Some((j, serde_json::from_value(v).ok()?)))
            .collect();
        for (id, job) in policies {
            // The template the writing job pinned; a wrap from before pins
            // (or whose job is gone) is checked against the policy as it is.
            let pinned = job.and_then(|j| pins.get(&j)).filter(|p| p.id == id);
            let found = match pinned {
                Some(p) => template_of(&p.policy()).map(|t| (p.name.clone(), t)),
                None => match dbw::policy_by_id(c, id).await? {
                    Some(p) => template_of(&p).map(|t| (p.name, t)),
                    None => Err(format!("policy {id} named by crypto_suite does not exist")),
                },
            };
            self.policies
                .lock()
                .expect("policy cache")
                .insert((id, job), Arc::new(found));
        }

        let wanted: Vec<i64> = {
            let cache = self.keys.lock().expect("key cache");
            rows.iter()
                .flat_map(|r| needed_keys(r))
                .filter(|id| !cache.contains_key(id))
                .collect()
        };
        let needed_by = |id: i64| {
            let row = rows.iter().find(|r| needed_keys(r).any(|k| k == id));
            format!(
                "wrapper {} needs it; set its provider up where pqmig runs, then resume the job",
                row.map_or(0, |r| r.id)
            )
        };
        self.resolve_ids(c, wanted, false, &needed_by).await
    }

    /// When a job starts whose selection names its keys (`kms_key_ids`):
    /// each must be one this process can open wraps with, else the job
    /// fails before any item, naming the key, its provider and what is
    /// missing.
    pub async fn check_named(&self, c: &impl GenericClient, ids: &[i64]) -> Result<(), JobError> {
        let named = |_: i64| "the selection names it (kms_key_ids)".to_owned();
        self.resolve_ids(c, ids.to_vec(), true, &named).await
    }

    /// Resolve these `kms_keys` rows (once): a key this process cannot use
    /// its provider for ([`Unusable::Setup`]; with `strict` any unusable
    /// key) fails the job, `needed_by` saying why it was looked up.
    async fn resolve_ids(
        &self,
        c: &impl GenericClient,
        mut wanted: Vec<i64>,
        strict: bool,
        needed_by: &(dyn Fn(i64) -> String + Sync),
    ) -> Result<(), JobError> {
        if wanted.is_empty() {
            return Ok(());
        }
        wanted.sort_unstable();
        wanted.dedup();
        let found = kms::kms_keys_by_id(c, &wanted).await?;
        let mut usable = Vec::with_capacity(wanted.len());
        for (id, key) in self.classify(wanted, found, false).await? {
            match key {
                Ok(k) => usable.push((id, Arc::new(Ok(k)))),
                Err(Unusable::Key(why)) if !strict => usable.push((id, Arc::new(Err(why)))),
                Err(Unusable::Key(why) | Unusable::Setup(why)) => {
                    return Err(fatal(format!("{why}: {}", needed_by(id))));
                }
                Err(Unusable::ForNow(why)) => return Err(JobError::Transient(why)),
            }
        }
        self.keys.lock().expect("key cache").extend(usable);
        Ok(())
    }

    /// When a job starts (in the daemon): every `kms_keys` row this process
    /// cannot use its provider for ([`Unusable::Setup`]) that a selected
    /// wrapper needs fails the job before any item. Such rows are few or
    /// none, so there is usually nothing to look for; when there are, one
    /// query looks for a selected wrapper that needs one, given at most
    /// `budget` (a table too large for that is checked batch by batch, as
    /// ever).
    pub async fn preflight(
        &self,
        c: &mut tokio_postgres::Client,
        filter: &dbw::WrapperFilter,
        budget: std::time::Duration,
    ) -> Result<(), JobError> {
        let all: Vec<KmsKey> = kms::kms_keys_all(&*c)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let ids: Vec<i64> = all.iter().map(|k| k.id).collect();
        // The provider of each (not each key in its token: a key that is
        // gone fails only its items, found by the batches).
        let unusable: Vec<(i64, String)> = self
            .classify(ids, all, true)
            .await?
            .into_iter()
            .filter_map(|(id, key)| match key {
                Err(Unusable::Setup(why)) => Some((id, why)),
                // Usable, gone (its items' failure), or a provider down
                // now (the batches that need it wait).
                _ => None,
            })
            .collect();
        if unusable.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = unusable.iter().map(|(id, _)| *id).collect();
        match dbw::first_needing(c, filter, &ids, budget).await? {
            dbw::Probe::Found { wrapper, key } => {
                let why = unusable
                    .iter()
                    .find(|(id, _)| *id == key)
                    .map_or("", |(_, why)| why.as_str());
                Err(fatal(format!(
                    "{why}: wrapper {wrapper} needs it (found when the job started, before any item); set its provider up where pqmig runs, then resume the job"
                )))
            }
            dbw::Probe::None => Ok(()),
            dbw::Probe::TooSlow => {
                tracing::info!(
                    keys = ?ids,
                    "could not tell in time whether the selection needs a key this process cannot use; each batch checks its own"
                );
                Ok(())
            }
        }
    }

    /// Each of `wanted` (rows `found`) made ready to open wraps with, or
    /// why it cannot be.
    async fn classify(
        &self,
        wanted: Vec<i64>,
        found: Vec<KmsKey>,
        shallow: bool,
    ) -> Result<Vec<(i64, Result<SourceKey, Unusable>)>, JobError> {
        let mut out = Vec::with_capacity(wanted.len());
        let mut local = Vec::with_capacity(wanted.len());
        for id in wanted {
            let Some(k) = found.iter().find(|k| k.id == id) else {
                let why = format!("kms_keys row {id} does not exist");
                out.push((id, Err(Unusable::Key(why))));
                continue;
            };
            let what = || format!("key {} ({:?}) of provider {}", k.id, k.key_ref, k.provider);
            match k.provider.as_str() {
                // AWS KMS keys: a client of their region; KMS checks the
                // key itself when asked to decrypt.
                "aws" => {
                    let region = k.location.as_deref().map(str::trim).unwrap_or_default();
                    let key = if region.is_empty() {
                        Err(Unusable::Setup(format!(
                            "{}: its kms_providers row names no region (location)",
                            what()
                        )))
                    } else {
                        Ok(SourceKey::Aws {
                            kms: self.aws.get(region).await,
                            key_id: k.key_ref.clone(),
                        })
                    };
                    out.push((id, key));
                }
                // Vault keys: a client of their server and mount; transit
                // checks the key when asked to decrypt. A token that cannot
                // be read, or a location that is no Vault address, is this
                // process's setup.
                "vault" => {
                    let key = self
                        .vault
                        .get(k.location.as_deref().unwrap_or_default())
                        .map(|vault| SourceKey::Vault {
                            vault,
                            key: k.key_ref.clone(),
                        })
                        .map_err(|e| Unusable::Setup(format!("{}: {e}", what())));
                    out.push((id, key));
                }
                _ => local.push(k.clone()),
            }
        }
        // The keyring and the HSM, off the async threads.
        let keyring = Arc::clone(&self.keyring);
        let settings = self.pkcs11.clone();
        let resolved = tokio::task::spawn_blocking(move || {
            local
                .iter()
                .map(|k| (k.id, source_key(&*keyring, settings.as_ref(), k, shallow)))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| fatal(format!("key resolution panicked: {e}")))?;
        out.extend(resolved);
        Ok(out)
    }

    /// Ask AWS KMS to open every `legacy-aws-kms` wrap of these rows (keys
    /// resolved before), [`aws::CONCURRENCY`] requests at a time, and keep
    /// each answer with its row for [`SourceKeys::recover`]. KMS refusing
    /// (access denied, key disabled or missing) fails the job, naming the
    /// KMS error code; KMS unreachable, throttling or failing after the
    /// client's retries is the job's transient error: nothing is written,
    /// the job is released and tried again.
    pub async fn open_remote(&self, rows: &mut [WrapperRow]) -> Result<(), JobError> {
        use futures_util::StreamExt;
        let mut asks = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if format_of(row) != Ok(wrap::FORMAT_LEGACY_AWS_KMS) {
                continue;
            }
            // A uuid that is no uuid is reported by `recover`.
            let Ok(uuid) = wrap::canonical_uuid(&row.uuid) else {
                continue;
            };
            for (slot, kid, sealed) in [(0usize, row.kms1, &row.wrap1), (1, row.kms2, &row.wrap2)] {
                let (Some(kid), Some(blob)) = (kid, sealed.as_ref().filter(|w| !w.is_empty()))
                else {
                    continue;
                };
                if let Some(key) = self.key(kid)
                    && let Ok(SourceKey::Aws { kms, key_id }) = &*key
                {
                    let stored = (row.uuid != uuid).then(|| row.uuid.clone());
                    let ask = (
                        Arc::clone(kms),
                        key_id.clone(),
                        blob.clone(),
                        uuid.clone(),
                        stored,
                    );
                    asks.push((i, slot, kid, ask));
                }
            }
        }
        self.open_vault(rows).await?;
        if asks.is_empty() {
            return Ok(());
        }
        let answers: Vec<_> = futures_util::stream::iter(asks.into_iter().map(
            |(i, slot, kid, (kms, key_id, blob, uuid, stored))| async move {
                let ctx = wrap::AWS_KMS_CONTEXT_KEY;
                let mut r = kms.decrypt(&key_id, &blob, (ctx, uuid.as_str())).await;
                // SPEC §5: a context with the uuid as stored (upper case)
                // is accepted too.
                if let (Err(KmsError::Integrity { .. }), Some(stored)) = (&r, &stored) {
                    r = kms.decrypt(&key_id, &blob, (ctx, stored.as_str())).await;
                }
                (i, slot, kid, key_id, r)
            },
        ))
        .buffer_unordered(aws::CONCURRENCY)
        .collect()
        .await;
        for (i, slot, kid, key_id, answer) in answers {
            let row = &mut rows[i];
            let what = || {
                format!(
                    "wrapper {} dek_wrap{} (key {kid}, {key_id:?})",
                    row.id,
                    slot + 1
                )
            };
            row.remote[slot] = Some(match answer {
                Ok(dek) => RemoteOpen::Dek(dek),
                Err(KmsError::Integrity { .. }) => RemoteOpen::Tag,
                Err(e @ KmsError::Refused { .. }) => return Err(fatal(format!("{}: {e}", what()))),
                Err(e @ KmsError::Unavailable(_)) => {
                    return Err(JobError::Transient(format!("{}: {e}", what())));
                }
            });
        }
        Ok(())
    }

    /// Ask Vault transit to open every `legacy-vault-transit` wrap of these
    /// rows: per key, one `decrypt` with the wraps as `batch_input`
    /// ([`vault::BATCH`] per request, [`vault::CONCURRENCY`] at a time),
    /// the uuid as `associated_data`. An item transit does not open is an
    /// `integrity` failure; Vault refusing (403, no such key) fails the
    /// job, Vault down, sealed or rate-limiting is its transient error.
    async fn open_vault(&self, rows: &mut [WrapperRow]) -> Result<(), JobError> {
        // (key id) -> [(row index, slot, uuid)]
        let mut by_key: HashMap<i64, Vec<(usize, usize, String)>> = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            if format_of(row) != Ok(wrap::FORMAT_LEGACY_VAULT) {
                continue;
            }
            let Ok(uuid) = wrap::canonical_uuid(&row.uuid) else {
                continue;
            };
            for (slot, kid, sealed) in [(0usize, row.kms1, &row.wrap1), (1, row.kms2, &row.wrap2)] {
                let (Some(kid), Some(_)) = (kid, sealed.as_ref().filter(|w| !w.is_empty())) else {
                    continue;
                };
                if let Some(key) = self.key(kid)
                    && let Ok(SourceKey::Vault { .. }) = &*key
                {
                    by_key.entry(kid).or_default().push((i, slot, uuid.clone()));
                }
            }
        }
        for (kid, asks) in by_key {
            let key = self.key(kid).expect("matched above");
            let Ok(SourceKey::Vault { vault, key: name }) = &*key else {
                continue;
            };
            let what = format!("wrappers' legacy-vault-transit wraps (key {kid}, {name:?})");
            let ask = |asks: &[(usize, usize, String)], rows: &[WrapperRow]| {
                let items: Vec<(Vec<u8>, Vec<u8>)> = asks
                    .iter()
                    .map(|(i, slot, aad)| {
                        let row = &rows[*i];
                        let sealed = if *slot == 0 { &row.wrap1 } else { &row.wrap2 };
                        (sealed.clone().unwrap_or_default(), aad.as_bytes().to_vec())
                    })
                    .collect();
                let vault = Arc::clone(vault);
                let (name, what) = (name.clone(), what.clone());
                async move {
                    let refs: Vec<(&[u8], &[u8])> = items
                        .iter()
                        .map(|(c, a)| (c.as_slice(), a.as_slice()))
                        .collect();
                    vault.decrypt(&name, &refs).await.map_err(|e| match e {
                        VaultError::Unavailable(_) => JobError::Transient(format!("{what}: {e}")),
                        VaultError::Refused { .. } => fatal(format!("{what}: {e}")),
                    })
                }
            };
            let mut answers = ask(&asks, rows).await?;
            // SPEC §5: associated data with the uuid as stored (upper
            // case) is accepted too, for the wraps the lowercase one did
            // not open.
            let again: Vec<(usize, (usize, usize, String))> = asks
                .iter()
                .enumerate()
                .filter(|(n, (i, _, uuid))| {
                    matches!(&answers[*n], Err(e) if vault::item_error(e) == vault::ItemError::Integrity)
                        && rows[*i].uuid != *uuid
                })
                .map(|(n, (i, slot, _))| (n, (*i, *slot, rows[*i].uuid.clone())))
                .collect();
            if !again.is_empty() {
                let (at, retry): (Vec<usize>, Vec<_>) = again.into_iter().unzip();
                for (n, answer) in at.into_iter().zip(ask(&retry, rows).await?) {
                    if answer.is_ok() {
                        answers[n] = answer;
                    }
                }
            }
            for ((i, slot, _), answer) in asks.into_iter().zip(answers) {
                rows[i].remote[slot] = Some(match answer {
                    Ok(dek) => RemoteOpen::Dek(dek),
                    Err(e) => match vault::item_error(&e) {
                        vault::ItemError::Integrity => RemoteOpen::Tag,
                        vault::ItemError::Policy => {
                            return Err(fatal(format!(
                                "{what}: wrapper {} dek_wrap{}: transit refuses it: {e}",
                                rows[i].id,
                                slot + 1
                            )));
                        }
                        vault::ItemError::Other => {
                            return Err(JobError::Transient(format!(
                                "{what}: wrapper {} dek_wrap{}: {e}",
                                rows[i].id,
                                slot + 1
                            )));
                        }
                    },
                });
            }
        }
        Ok(())
    }

    fn key(&self, id: i64) -> Option<Arc<Result<SourceKey, String>>> {
        self.keys.lock().expect("key cache").get(&id).cloned()
    }

    /// Recover the DEK of a wrapper: `Err((code, message))` otherwise.
    pub fn recover(&self, row: &WrapperRow) -> Result<Zeroizing<Vec<u8>>, Failure> {
        let format = format_of(row).map_err(|m| ("data", m))?;
        match format {
            wrap::FORMAT_LEGACY_AES
            | wrap::FORMAT_LEGACY_X25519
            | wrap::FORMAT_LEGACY_AWS_KMS
            | wrap::FORMAT_LEGACY_VAULT => self.recover_legacy(row, format),
            wrap::FORMAT_V1 => self.recover_v1(row),
            other => Err((
                "data",
                format!("unknown wrapper format {:?}", truncate(other)),
            )),
        }
    }

    /// Open every legacy wrap the row holds. When both `dek_wrap1` and
    /// `dek_wrap2` are there, both must open, to the same DEK (compared in
    /// constant time): a wrap that fails its tag, or two wraps that
    /// disagree, are tampering until shown otherwise (`integrity`); a wrap
    /// that cannot be checked (no key, wrong key type) is a `data` failure.
    fn recover_legacy(
        &self,
        row: &WrapperRow,
        format: &str,
    ) -> Result<Zeroizing<Vec<u8>>, Failure> {
        // SPEC §5: the AAD is the uuid's lowercase text; a wrap made with
        // the text as stored (upper case) is accepted too.
        let uuid = wrap::canonical_uuid(&row.uuid).map_err(|e| ("data", e))?;
        let open = |k: &SourceKey, sealed: &[u8]| {
            // A token's X25519 agreement does not depend on the uuid: once
            // per wrap, before the spellings are tried.
            let agreed = match k {
                SourceKey::HsmX25519 { hsm, token, key } => {
                    Some(agree_in_token(hsm, token, key, sealed)?)
                }
                _ => None,
            };
            let try_one = |u: &str| match k {
                SourceKey::Aes(k) => wrap::open_legacy_aes(k, u, sealed).map_err(|_| Opened::Tag),
                SourceKey::X25519(k) => {
                    wrap::open_legacy_x25519(k, u, sealed).map_err(|_| Opened::Tag)
                }
                SourceKey::Hsm { hsm, token, key } => hsm
                    .aes_gcm_open(token, key, sealed, u.as_bytes())
                    .map_err(hsm_opened),
                SourceKey::HsmX25519 { .. } => {
                    let (shared, public) = agreed.as_ref().expect("agreed above");
                    wrap::open_legacy_x25519_agreed(shared, public, u, sealed)
                        .map_err(|_| Opened::Tag)
                }
                SourceKey::Kem(_)
                | SourceKey::HsmKem { .. }
                | SourceKey::Aws { .. }
                | SourceKey::Vault { .. } => {
                    unreachable!("matched against the format below")
                }
            };
            // The stored spelling only after a failed tag: a provider
            // that is down, or a key that cannot be used, stays said.
            try_one(&uuid).or_else(|e| match e {
                Opened::Tag if row.uuid != uuid => try_one(&row.uuid),
                e => Err(e),
            })
        };
        let mut opened: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(2);
        let mut unchecked: Vec<String> = Vec::new();
        let mut failed: Vec<u8> = Vec::new();
        for (slot, kid, sealed) in [(1u8, row.kms1, &row.wrap1), (2, row.kms2, &row.wrap2)] {
            let Some(sealed) = sealed.as_deref().filter(|w| !w.is_empty()) else {
                continue;
            };
            let Some(kid) = kid else {
                unchecked.push(format!("dek_wrap{slot} has no kms{slot}_key_id"));
                continue;
            };
            let key = self.key(kid).expect("keys resolved before compute");
            let result = match (&*key, format) {
                (Err(e), _) => {
                    unchecked.push(format!("dek_wrap{slot}: {e}"));
                    continue;
                }
                (Ok(k @ (SourceKey::Aes(_) | SourceKey::Hsm { .. })), wrap::FORMAT_LEGACY_AES)
                | (
                    Ok(k @ (SourceKey::X25519(_) | SourceKey::HsmX25519 { .. })),
                    wrap::FORMAT_LEGACY_X25519,
                ) => open(k, sealed),
                (Ok(SourceKey::Aws { .. }), wrap::FORMAT_LEGACY_AWS_KMS)
                | (Ok(SourceKey::Vault { .. }), wrap::FORMAT_LEGACY_VAULT) => {
                    match &row.remote[usize::from(slot) - 1] {
                        Some(RemoteOpen::Dek(dek)) if dek.len() == wrap::DEK_LEN => Ok(dek.clone()),
                        Some(RemoteOpen::Dek(dek)) => Err(Opened::Unusable(format!(
                            "the key provider decrypted it to {} bytes, not a {}-byte DEK",
                            dek.len(),
                            wrap::DEK_LEN
                        ))),
                        Some(RemoteOpen::Tag) => Err(Opened::Tag),
                        None => Err(Opened::Unusable(
                            "the key provider was not asked to open it".into(),
                        )),
                    }
                }
                (Ok(_), _) => {
                    unchecked.push(format!(
                        "kms{slot}_key_id {kid} is not a key of the {format} format"
                    ));
                    continue;
                }
            };
            match result {
                Ok(dek) => opened.push(dek),
                Err(Opened::Tag) => failed.push(slot),
                Err(Opened::Unusable(m)) => unchecked.push(format!("dek_wrap{slot}: {m}")),
                Err(Opened::ForNow(m)) => return Err((UNAVAILABLE, m)),
            }
        }
        if !failed.is_empty() {
            let which: Vec<String> = failed.iter().map(|s| format!("dek_wrap{s}")).collect();
            return Err((
                "integrity",
                format!(
                    "{format}: {} does not open (authentication failed)",
                    which.join(" and ")
                ),
            ));
        }
        if let [a, b] = &opened[..]
            && !bool::from(a.ct_eq(b))
        {
            return Err((
                "integrity",
                format!("{format}: dek_wrap1 and dek_wrap2 open to different DEKs"),
            ));
        }
        if !unchecked.is_empty() {
            return Err(("data", format!("{format}: {}", unchecked.join("; "))));
        }
        opened
            .into_iter()
            .next()
            .ok_or_else(|| ("data", "the wrapper has no dek_wrap1 or dek_wrap2".into()))
    }

    /// Open a `pqmig-wrap-v1` wrapper, bound to its row: the AAD must be
    /// the one its policy's template gives for this row (uuid, id,
    /// wrap_version, policy), every layer's `kem_algo_id` and key the KEM
    /// `crypto_suite` names, so a wrap copied from another row or from an
    /// older version of this one (a backup) fails as `integrity`.
    fn recover_v1(&self, row: &WrapperRow) -> Result<Zeroizing<Vec<u8>>, Failure> {
        let data = |m: String| ("data", m);
        let integrity = |m: &str| ("integrity", format!("pqmig-wrap-v1: {m}"));
        let uuid = wrap::canonical_uuid(&row.uuid).map_err(data)?;
        let kc = suite::commitment(row.suite.as_ref())
            .ok_or_else(|| integrity("crypto_suite.kc is missing or not base64"))?;
        let kem =
            suite_kem(row).ok_or_else(|| integrity("crypto_suite.kem names no KEM pqmig knows"))?;
        if let Some(n) = suite::layers(row.suite.as_ref())
            && n as usize != row.layers.len()
        {
            return Err(integrity(&format!(
                "crypto_suite names {n} layers, {} are stored",
                row.layers.len()
            )));
        }
        if row.layers.is_empty() {
            return Err(integrity("no layers are stored"));
        }
        let aad = row.layers[0].aad.clone().unwrap_or(Value::Null);
        if row.layers.iter().any(|l| l.aad.as_ref() != Some(&aad)) {
            return Err(integrity("the layers disagree on the AAD"));
        }
        let policy_id =
            suite_policy(row).ok_or_else(|| integrity("crypto_suite.policy_id is missing"))?;
        let policy = self
            .policies
            .lock()
            .expect("policy cache")
            .get(&(policy_id, suite_job(row)))
            .cloned()
            .expect("policies resolved before compute");
        let (policy_name, template) = policy
            .as_ref()
            .as_ref()
            .map_err(|e| data(format!("cannot check the AAD: {e}")))?;
        let expected = render_aad(
            template,
            &AadValues {
                wrapper_id: row.id,
                wrapper_uuid: &uuid,
                policy_id,
                policy_name,
                wrap_version: row.wrap_version,
            },
        );
        if expected != aad {
            return Err(integrity(
                "the stored AAD is not the one policy's template gives for this row (uuid, id, wrap_version, policy): a wrap from another row or an older version",
            ));
        }
        let algos = self.kem_algos.get().expect("resolved before compute");
        let mut keys = Vec::with_capacity(row.layers.len());
        for l in &row.layers {
            if l.kem_algo_id.and_then(|id| algos.get(&id).copied()) != Some(kem) {
                return Err(integrity(&format!(
                    "layer {} kem_algo_id is not {} as crypto_suite says",
                    l.layer_no,
                    kem.alias()
                )));
            }
            let kid = l
                .kms_key_id
                .ok_or_else(|| data(format!("layer {} has no kms_key_id", l.layer_no)))?;
            let key = self.key(kid).expect("keys resolved before compute");
            match &*key {
                Ok(SourceKey::Kem(pair)) if pair.kem() == kem => keys.push((key.clone(), l)),
                Ok(SourceKey::HsmKem { kem: k, .. }) if *k == kem => keys.push((key.clone(), l)),
                Ok(_) => {
                    return Err(data(format!(
                        "layer {} key {kid} is not a {} key",
                        l.layer_no,
                        kem.alias()
                    )));
                }
                Err(e) => return Err(data(e.clone())),
            }
        }
        // Each layer's shared secret: in process, or in its key's token.
        let mut shared = Vec::with_capacity(keys.len());
        let mut ciphertexts = Vec::with_capacity(keys.len());
        for (k, l) in &keys {
            let ct = l.ciphertext.as_deref().unwrap_or_default();
            let secret = match &**k {
                Ok(SourceKey::Kem(pair)) => pair.decapsulate(ct).map_err(|e| integrity(&e.0))?,
                Ok(SourceKey::HsmKem {
                    hsm,
                    token,
                    key,
                    kem,
                }) => {
                    // A ciphertext of the wrong size: stored bytes were
                    // altered (said here, so a token's error is the token's).
                    if ct.len() != kem.ciphertext_len() {
                        return Err(integrity(&format!(
                            "layer {} {} ciphertext is {} bytes, expected {}",
                            l.layer_no,
                            kem.alias(),
                            ct.len(),
                            kem.ciphertext_len()
                        )));
                    }
                    hsm.ml_kem_decapsulate(token, key, *kem, ct).map_err(|e| {
                        match hsm_opened(e) {
                            Opened::ForNow(m) => (UNAVAILABLE, m),
                            Opened::Unusable(m) => data(format!("layer {}: {m}", l.layer_no)),
                            Opened::Tag => integrity(&format!(
                                "layer {}: the token refused the ciphertext",
                                l.layer_no
                            )),
                        }
                    })?
                }
                _ => unreachable!("checked above"),
            };
            shared.push(secret);
            ciphertexts.push(ct);
        }
        let wrap1 = row.wrap1.as_deref().unwrap_or_default();
        wrap::open_v1_shared(
            &uuid,
            &wrap::canonical_json(&aad),
            &shared,
            &ciphertexts,
            &kc,
            wrap1,
        )
        .map_err(|e| match e {
            WrapError::Auth => integrity("AES-256-GCM authentication failed"),
            WrapError::Commitment => integrity("key commitment does not match"),
            WrapError::Format(m) => integrity(&m),
        })
    }
}

/// At most 64 bytes of a stored string, for a message.
pub(super) fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
