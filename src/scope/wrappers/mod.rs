//! The `wrappers` scope (SPEC §5.1, §5.2, §6.2): recover each wrapper's DEK
//! (legacy formats via kms1 and kms2, `pqmig-wrap-v1` via its layers),
//! choose the policy's layer keys, build a `pqmig-wrap-v1` wrap, open it
//! again with the provider's keys (verify before write) and write it with
//! compare-and-set (see `db::wrappers`).
//!
//! - [`policy`]: layer selection and the AAD template of a policy.
//! - [`keys`]: the keys existing wraps open with, and the opening.
//! - [`compute`]: one wrapper's re-wrap, and a batch's new values.
//! - [`aftercare`]: `verify` and `rollback` of a finished job.

mod aftercare;
mod compute;
pub mod keys;
pub mod policy;

use std::sync::Arc;

use serde_json::{Value, json};
use tokio_postgres::{Client, GenericClient, Transaction};

pub use aftercare::{WrappersAftercare, aftercare};
pub use compute::{Computed, LayerKey, LayerSecret, Plan};
pub use keys::SourceKeys;
use policy::{LayerSelection, PolicyPin, aad_template, kem_of};

use super::{
    BatchCounts, ItemFailure, JobError, Outcome, Scope, ScopeContext, TargetRule, fatal,
    target_algorithm,
};
use crate::crypto::kem::{Kem, KemKeyPair};
use crate::crypto::wrap;
use crate::db::kms;
use crate::db::wrappers::{self as dbw, Policy, WrapperFilter, WrapperRow, WrapperUpdates};
use crate::job::JobSpec;
use crate::keys::pkcs11::{self, HsmError};
use crate::selection::{self, Common};

/// A wrappers job checked against the database, its keys not loaded.
pub struct Checked {
    sel: selection::Wrappers,
    filter: WrapperFilter,
    /// To record in the job's `result` (None: recorded already).
    pin: Option<PolicyPin>,
    policy: Policy,
    mode: LayerSelection,
    kem: Kem,
    kem_algo_id: i64,
    template: Value,
    candidates: Vec<kms::PolicyKey>,
}

/// How long a job's start may look for a selected wrapper that needs a
/// key this process cannot use ([`SourceKeys::preflight`]).
const PREFLIGHT_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

pub struct WrappersJob {
    sel: selection::Wrappers,
    filter: WrapperFilter,
    pin: Option<PolicyPin>,
    plan: Arc<Plan>,
}

impl WrappersJob {
    /// Validate the job and load its keys; nothing is written.
    pub async fn prepare(
        c: &impl GenericClient,
        spec: &JobSpec,
        ctx: &ScopeContext,
    ) -> Result<WrappersJob, JobError> {
        let job = Self::check(c, spec).await?.load_keys(spec.id, ctx).await?;
        // The keys the selection names, before any item: one this process
        // cannot open wraps with fails the job now, not item by item.
        if let Some(ids) = &job.sel.kms_key_ids {
            job.plan.source.check_named(c, ids).await?;
        }
        Ok(job)
    }

    /// Every check that needs only the database.
    pub async fn check(c: &impl GenericClient, spec: &JobSpec) -> Result<Checked, JobError> {
        let sel =
            selection::parse_wrappers(spec.selection.as_ref()).map_err(|e| fatal(e.to_string()))?;
        let policy_id = spec.target_policy_id.ok_or_else(|| {
            fatal("target_policy_id is required for the wrappers scope (the policy to wrap under)")
        })?;
        let policy = dbw::policy_by_id(c, policy_id)
            .await?
            .ok_or_else(|| fatal(format!("target policy id {policy_id} does not exist")))?;
        let mode = LayerSelection::parse(&policy.layer_selection).ok_or_else(|| {
            fatal(format!(
                "policy {:?}: unknown layer_selection {:?}",
                policy.name, policy.layer_selection
            ))
        })?;
        if policy.min_layers < 1 || policy.max_layers < policy.min_layers {
            return Err(fatal(format!(
                "policy {:?}: min_layers {} and max_layers {} do not allow any layer count",
                policy.name, policy.min_layers, policy.max_layers
            )));
        }
        let algo_id = match spec.target_algo_id {
            Some(id) => id,
            None => dbw::policy_kem(c, policy.id).await?.ok_or_else(|| {
                fatal(format!(
                    "no target KEM: the job has no target_algo_id and policy {:?} has no kem in policy_algorithms",
                    policy.name
                ))
            })?,
        };
        let rule = TargetRule {
            class: "kem",
            name: None,
            needs: "a KEM: the wrappers scope needs ML-KEM-768, ML-KEM-1024 or X-Wing",
            pq: true,
        };
        let algo = target_algorithm(c, spec, algo_id, rule, sel.common.allow_experimental).await?;
        let label = algo.label();
        let kem = kem_of(&algo).ok_or_else(|| {
            fatal(format!(
                "target algorithm {label} (id {algo_id}) is not supported for wrapping (ML-KEM-768, ML-KEM-1024 or X-Wing)"
            ))
        })?;
        let template = aad_template(&policy).map_err(fatal)?;
        let pin = PolicyPin {
            id: policy.id,
            name: policy.name.clone(),
            aad_template: template.clone(),
        };
        let pin = match spec.pin("policy") {
            None => Some(pin),
            Some(v) if serde_json::from_value::<PolicyPin>(v.clone()).ok() == Some(pin) => None,
            Some(_) => {
                return Err(fatal(format!(
                    "policy {:?} (id {}) was renamed or its aad_template changed since the job started: the job stops here (its wraps would carry two templates); restore the policy, or queue a new job",
                    policy.name, policy.id
                )));
            }
        };
        let filter = WrapperFilter::new(&sel);
        // Once, when the job first starts (its policy not pinned yet): a
        // resume or a range's walk relies on the per-item check.
        if !sel.allow_downgrade && pin.is_some() {
            refuse_downgrade(c, &sel, &filter, kem).await?;
        }

        let all = kms::policy_keys(c, policy.id).await?;
        let candidates: Vec<kms::PolicyKey> = all
            .iter()
            .filter(|k| {
                k.key.status == "active"
                    && matches!(k.key.purpose.as_str(), "wrap" | "both")
                    && k.key.provider_enabled
                    && k.key
                        .algorithm
                        .as_deref()
                        .is_some_and(|a| a.eq_ignore_ascii_case(kem.alias()))
                    && (mode != LayerSelection::Random || k.weight > 0)
            })
            .cloned()
            .collect();
        let min = policy.min_layers as usize;
        if candidates.len() < min {
            return Err(fatal(format!(
                "policy {:?} has {} usable {} keys (active, purpose wrap or both, provider enabled{}), needs at least min_layers {min}; it lists {} keys in all",
                policy.name,
                candidates.len(),
                kem.alias(),
                if mode == LayerSelection::Random {
                    ", weight > 0"
                } else {
                    ""
                },
                all.len()
            )));
        }
        Ok(Checked {
            sel,
            filter,
            pin,
            policy,
            mode,
            kem,
            kem_algo_id: algo_id,
            template,
            candidates,
        })
    }
}

/// How far the downgrade check looks before the first item: spans of
/// `PROBE_SPAN` ids from the selection's lowest, at most `PROBE_SPANS` of
/// them (each statement reads a bounded slice, like a batch).
const PROBE_SPAN: i64 = 100_000;
const PROBE_SPANS: usize = 20;

/// SPEC §6.1 "no silent downgrade": a job whose selection holds a
/// `pqmig-wrap-v1` wrapper under a stronger KEM than the target (a higher
/// NIST category, or a hybrid) fails before any item, naming one, unless
/// the selection sets `allow_downgrade`. The look ahead is bounded (the
/// first `PROBE_SPANS * PROBE_SPAN` ids: all of a table of a few million
/// rows); beyond it, and for a wrapper rewritten meanwhile, each item is
/// checked when it is processed and fails as `downgrade`, unchanged.
async fn refuse_downgrade(
    c: &impl GenericClient,
    sel: &selection::Wrappers,
    filter: &WrapperFilter,
    target: Kem,
) -> Result<(), JobError> {
    let may_hold_v1 = sel
        .formats
        .as_ref()
        .is_none_or(|f| f.iter().any(|f| f == wrap::FORMAT_V1));
    let stronger: Vec<String> = [Kem::MlKem768, Kem::MlKem1024, Kem::XWing]
        .into_iter()
        .filter(|k| target.is_downgrade_from(*k))
        .map(|k| k.alias().to_ascii_lowercase())
        .collect();
    if !may_hold_v1 || stronger.is_empty() {
        return Ok(());
    }
    let (from, to) = sel.common.id_window();
    let Some((lo, hi)) = dbw::wrappers_bounds(c, from, to).await? else {
        return Ok(());
    };
    let mut after = lo.saturating_sub(1);
    for _ in 0..PROBE_SPANS {
        let upto = after.saturating_add(PROBE_SPAN).min(hi);
        if let Some((id, kem)) = dbw::wrappers_find_kem(c, filter, &stronger, after, upto).await? {
            return Err(fatal(format!(
                "the selection holds wrappers under {kem} (e.g. id {id}); re-wrapping them under {} would weaken them: narrow the selection or set selection.allow_downgrade",
                target.alias()
            )));
        }
        after = upto;
        if after >= hi {
            return Ok(());
        }
    }
    tracing::info!(
        checked_upto = after,
        max_id = hi,
        "downgrade check before the job covered the first ids only; the rest is checked item by item"
    );
    Ok(())
}

impl Checked {
    /// The layer keys, last: a keyring problem is reported only for a job
    /// that is otherwise valid.
    pub async fn load_keys(self, job_id: i64, ctx: &ScopeContext) -> Result<WrappersJob, JobError> {
        let keyring = ctx.keys("read the wrapping keys from")?;
        let mut layer_keys = Vec::with_capacity(self.candidates.len());
        for c in &self.candidates {
            let what = format!(
                "layer key {} ({:?}) of policy {:?}",
                c.key.id, c.key.key_ref, self.policy.name
            );
            let key = match c.key.provider.as_str() {
                "pkcs11" => token_layer_key(&what, &c.key, self.kem, ctx).await?,
                "local" => {
                    let secret = crate::keys::kms_secret(&*keyring, &c.key, self.kem.alias())
                        .map_err(|e| fatal(format!("{what}: {e}")))?;
                    let pair = KemKeyPair::from_seed(self.kem, &secret.bytes)
                        .map_err(|e| fatal(format!("{what}: {e}")))?;
                    LayerSecret::Here(pair)
                }
                other => {
                    return Err(fatal(format!(
                        "{what}: provider {other} cannot hold a layer key (a layer key lives in the keyring or, ML-KEM, in a pkcs11 token; README \"Key providers\")"
                    )));
                }
            };
            layer_keys.push(LayerKey {
                kms_key_id: c.key.id,
                weight: c.weight,
                key,
            });
        }
        Ok(WrappersJob {
            filter: self.filter,
            pin: self.pin,
            plan: Arc::new(Plan {
                job_id,
                verify: self.sel.common.verify,
                allow_downgrade: self.sel.allow_downgrade,
                policy: self.policy,
                mode: self.mode,
                kem: self.kem,
                kem_algo_id: self.kem_algo_id,
                template: self.template,
                layer_keys,
                source: SourceKeys::new(keyring).with_pkcs11(ctx.pkcs11.clone()),
            }),
            sel: self.sel,
        })
    }
}

/// A layer key held in an HSM token: its public key, checked to be the
/// private key's, which must decapsulate there (ML-KEM, or X-Wing as its
/// two halves). A token that is down is the job's transient error; one
/// set up wrong fails the job before any item.
async fn token_layer_key(
    what: &str,
    key: &kms::KmsKey,
    kem: Kem,
    ctx: &ScopeContext,
) -> Result<LayerSecret, JobError> {
    let settings = ctx.pkcs11.clone().ok_or_else(|| {
        fatal(format!(
            "{what}: held by provider pkcs11, and this process has no PKCS#11 module: set keys.pkcs11_module and keys.pkcs11_pin_file"
        ))
    })?;
    let token = key.location.clone().ok_or_else(|| {
        fatal(format!(
            "{what}: its pkcs11 kms_providers row names no token (location)"
        ))
    })?;
    let (t, label) = (token.clone(), key.key_ref.clone());
    let found = tokio::task::spawn_blocking(move || {
        let hsm = pkcs11::open(&settings)?;
        let public = hsm.ml_kem_public(&t, &label, kem)?;
        Ok::<_, HsmError>((hsm, public))
    })
    .await
    .map_err(|e| fatal(format!("{what}: the key lookup panicked: {e}")))?;
    let (hsm, public) = found.map_err(|e| match e {
        HsmError::Unavailable(m) => JobError::Transient(format!("{what}: {m}")),
        other => fatal(format!("{what}: {other}")),
    })?;
    Ok(LayerSecret::Token {
        hsm,
        token,
        label: key.key_ref.clone(),
        kem,
        public,
    })
}

impl WrappersJob {
    /// The keys of these rows, and what a remote provider (AWS KMS) makes
    /// of their wraps, asked for all at once.
    async fn resolve_keys(
        &self,
        c: &impl GenericClient,
        rows: &mut [WrapperRow],
    ) -> Result<(), JobError> {
        let refs: Vec<&WrapperRow> = rows.iter().collect();
        self.plan.source.resolve(c, &refs).await?;
        self.plan.source.open_remote(rows).await
    }
}

impl Scope for WrappersJob {
    type Row = WrapperRow;
    type Computed = Computed;

    fn common(&self) -> &Common {
        &self.sel.common
    }

    /// A rewritten wrapper's layers (ciphertexts and public keys), the
    /// wrap, the suite and the old row.
    fn item_bytes(&self) -> i64 {
        let p = &self.plan;
        let layers = (p.policy.max_layers as usize)
            .min(p.layer_keys.len())
            .max(1);
        (layers * (p.kem.ciphertext_len() + p.kem.public_key_len() + 200) + 600) as i64
    }

    /// The policy the job wraps under, unless recorded already.
    fn pin_to_record(&self) -> Option<Value> {
        self.pin.as_ref().map(|p| json!({ "policy": p }))
    }

    /// A source key this process cannot use its provider for fails the
    /// job before any item, when a selected wrapper needs it (beyond the
    /// keys `kms_key_ids` names, which `prepare` checked: the layers' keys
    /// of the wrappers they select).
    async fn preflight(&self, c: &mut Client) -> Result<(), JobError> {
        self.plan
            .source
            .preflight(c, &self.filter, PREFLIGHT_BUDGET)
            .await
    }

    fn row_id(row: &WrapperRow) -> i64 {
        row.id
    }

    async fn count(&self, c: &Client, after: i64, cap: i64) -> Result<i64, JobError> {
        Ok(dbw::wrappers_count(c, &self.filter, after, cap).await?)
    }

    /// The next batch, with every key its wrappers need resolved.
    async fn id_bounds(&self, c: &Client) -> Result<Option<(i64, i64)>, JobError> {
        let (from, to) = self.sel.common.id_window();
        Ok(dbw::wrappers_bounds(c, from, to).await?)
    }

    async fn estimate(&self, c: &Client, lo: i64, hi: i64) -> Result<i64, JobError> {
        Ok(dbw::wrappers_estimate(c, &self.filter, lo, hi).await?)
    }

    async fn fetch(
        &self,
        c: &Client,
        after: i64,
        upto: i64,
        n: i64,
    ) -> Result<Vec<WrapperRow>, JobError> {
        let mut rows = dbw::wrappers_fetch_batch(c, &self.filter, after, upto, n).await?;
        self.resolve_keys(c, &mut rows).await?;
        Ok(rows)
    }

    /// Split across the cores on blocking threads.
    /// A wrap its key provider could not open for now (an HSM that is
    /// down) makes the whole batch a transient error: nothing is written,
    /// the job is released and tried again.
    async fn compute(&self, rows: Vec<WrapperRow>) -> Result<Computed, JobError> {
        let c = super::compute_parallel(
            &self.plan,
            rows,
            8,
            Computed::default(),
            Plan::compute,
            compute::merge,
        )
        .await?;
        if let Some(f) = c.failures.iter().find(|f| f.code == keys::UNAVAILABLE) {
            return Err(JobError::Transient(format!(
                "wrapper {}: {}",
                f.item_id, f.message
            )));
        }
        Ok(c)
    }

    fn outcome(c: &Computed) -> Outcome {
        Outcome {
            write: c.updates.ids.len() as i64,
            skip: c.skipped,
            fail: c.failures.len() as i64,
        }
    }

    fn growth_bytes(c: &Computed) -> i64 {
        c.growth_bytes()
    }

    /// Compare-and-set, see [`super::write_cas`].
    async fn write(
        &self,
        tx: &Transaction<'_>,
        job_id: i64,
        c: Computed,
    ) -> Result<(BatchCounts, Vec<ItemFailure>), JobError> {
        let parts = (c.updates, c.failures, c.skipped);
        super::write_cas(self, tx, job_id, self.sel.common.dry_run, parts).await
    }
}

impl super::CasWrite for WrappersJob {
    type Updates = WrapperUpdates;

    fn ids(u: &WrapperUpdates) -> &[i64] {
        &u.ids
    }

    async fn cas_update(
        &self,
        tx: &impl GenericClient,
        job_id: i64,
        u: &WrapperUpdates,
    ) -> Result<Vec<i64>, JobError> {
        Ok(dbw::wrappers_update_batch(tx, job_id, u, self.sel.common.backup).await?)
    }

    async fn relock_and_compute(
        &self,
        tx: &impl GenericClient,
        ids: &[i64],
    ) -> Result<(usize, WrapperUpdates, Vec<ItemFailure>, i64), JobError> {
        let mut rows = dbw::wrappers_lock_rows(tx, &self.filter, ids).await?;
        self.resolve_keys(tx, &mut rows).await?;
        let found = rows.len();
        let plan = Arc::clone(&self.plan);
        let again = tokio::task::spawn_blocking(move || plan.compute(&rows))
            .await
            .map_err(|e| fatal(format!("wrapper computation panicked: {e}")))?;
        Ok((found, again.updates, again.failures, again.skipped))
    }
}
