//! The `wrappers` scope (SPEC §5.1, §5.2, §6.2): recover each wrapper's DEK
//! (legacy formats via kms1 then kms2, `pqmig-wrap-v1` via its layers),
//! choose the policy's layer keys, build a `pqmig-wrap-v1` wrap, open it
//! again with the provider's keys (verify before write) and write it with
//! compare-and-set (see `db::wrappers`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_postgres::GenericClient;
use zeroize::Zeroizing;

use super::{BatchCounts, ItemFailure, JobError, ScopeContext};
use crate::crypto::kem::{Kem, KemKeyPair};
use crate::crypto::wrap::{self, WrapError};
use crate::db::jobs::ClaimedJob;
use crate::db::kms::{self, KmsKey};
use crate::db::wrappers::{
    self as dbw, NewLayers, Policy, WrapperFilter, WrapperRow, WrapperUpdates,
};
use crate::keys::{KeyProvider, LocalKeyring};
use crate::selection::{self, Common};

fn fatal(msg: impl Into<String>) -> JobError {
    JobError::Fatal(msg.into())
}

/// The placeholders an `aad_template` string may use (SPEC §5.2).
const PLACEHOLDERS: &[&str] = &[
    "wrapper_id",
    "wrapper_uuid",
    "policy_id",
    "policy_name",
    "wrap_version",
];

/// How the layer keys of a wrapper are chosen (SPEC §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSelection {
    Defined,
    RoundRobin,
    Random,
    HashMod,
}

impl LayerSelection {
    pub fn parse(s: &str) -> Option<LayerSelection> {
        match s {
            "defined" => Some(LayerSelection::Defined),
            "round_robin" => Some(LayerSelection::RoundRobin),
            "random" => Some(LayerSelection::Random),
            "hash_mod" => Some(LayerSelection::HashMod),
            _ => None,
        }
    }
}

/// Choose which of `count` candidate keys (most preferred first) wrap one
/// wrapper; returns their indexes in layer order.
///
/// - `defined`: the first min(max_layers, count).
/// - `round_robin`: min_layers keys from offset `wrapper_id mod count`.
/// - `hash_mod`: the same, the offset being the first 8 bytes of
///   SHA-256(uuid) as a big-endian integer, mod count.
/// - `random`: min_layers distinct keys drawn with probability
///   proportional to weight (keys of weight ≤ 0 are never drawn).
pub fn choose_layers(
    mode: LayerSelection,
    weights: &[i32],
    min_layers: usize,
    max_layers: usize,
    wrapper_id: i64,
    uuid: &str,
    rng: &mut impl rand::Rng,
) -> Vec<usize> {
    let count = weights.len();
    let rotate = |offset: usize| (0..min_layers).map(|i| (offset + i) % count).collect();
    match mode {
        LayerSelection::Defined => (0..max_layers.min(count)).collect(),
        LayerSelection::RoundRobin => rotate(wrapper_id.rem_euclid(count as i64) as usize),
        LayerSelection::HashMod => {
            let h = Sha256::digest(uuid.as_bytes());
            let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
            rotate((n % count as u64) as usize)
        }
        LayerSelection::Random => {
            let mut left: Vec<(usize, u64)> = weights
                .iter()
                .enumerate()
                .filter(|(_, w)| **w > 0)
                .map(|(i, w)| (i, *w as u64))
                .collect();
            let mut out = Vec::with_capacity(min_layers);
            while out.len() < min_layers && !left.is_empty() {
                let total: u64 = left.iter().map(|(_, w)| w).sum();
                let mut pick = rand::RngExt::random_range(rng, 0..total);
                let at = left
                    .iter()
                    .position(|(_, w)| {
                        if pick < *w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .expect("pick < total");
                out.push(left.remove(at).0);
            }
            out
        }
    }
}

/// One piece of a template string: literal text or a known placeholder.
enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'static str),
}

/// Split a template string into text and placeholders. Every `{` or `}`
/// must belong to a known placeholder, so no implementation can read the
/// template differently (an unknown `{name}`, `{}`, `{a b}` or a lone
/// brace is an error naming it).
fn pieces(s: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find(['{', '}']) {
        if at > 0 {
            out.push(Piece::Text(&rest[..at]));
        }
        let tail = &rest[at..];
        let known = PLACEHOLDERS.iter().find(|p| {
            tail.strip_prefix('{')
                .and_then(|t| t.strip_prefix(**p))
                .is_some_and(|t| t.starts_with('}'))
        });
        match known {
            Some(p) => {
                out.push(Piece::Placeholder(p));
                rest = &tail[p.len() + 2..];
            }
            None => {
                let shown: String = tail
                    .chars()
                    .take_while(|c| *c != '}')
                    .take(64)
                    .chain(tail.contains('}').then_some('}'))
                    .collect();
                return Err(format!(
                    "unknown placeholder {} (known: {}; a literal brace is not allowed)",
                    shown.escape_debug(),
                    PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// Check every value of a template: strings with known placeholders only,
/// in objects and arrays. Numbers, booleans and null are refused: the
/// canonical JSON of a number is not the same in every implementation.
fn check_template(v: &Value, path: &str) -> Result<(), String> {
    match v {
        Value::String(s) => pieces(s).map(|_| ()).map_err(|e| format!("{path}: {e}")),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_template(item, &format!("{path}[{i}]"))),
        Value::Object(map) => map
            .iter()
            .try_for_each(|(k, item)| check_template(item, &format!("{path}.{k:.64}"))),
        other => Err(format!(
            "{path}: template values must be strings, got {}",
            match other {
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            }
        )),
    }
}

/// Whether a checked template uses `placeholder` in any string value.
fn uses_placeholder(v: &Value, placeholder: &str) -> bool {
    match v {
        Value::String(s) => pieces(s)
            .unwrap_or_default()
            .iter()
            .any(|p| matches!(p, Piece::Placeholder(q) if *q == placeholder)),
        Value::Array(items) => items.iter().any(|i| uses_placeholder(i, placeholder)),
        Value::Object(map) => map.values().any(|i| uses_placeholder(i, placeholder)),
        _ => false,
    }
}

/// The policy's AAD template, or the default of SPEC §5.2; an unknown
/// placeholder, a stray brace or a non-string value is an error naming it.
pub fn aad_template(policy: &Policy) -> Result<Value, String> {
    let template = template_of(policy)?;
    // What binds a wrap to its row (SPEC §5.2's default has both): without
    // them an older wrap of the same row, copied back, would still open.
    for required in ["wrapper_uuid", "wrap_version"] {
        if !uses_placeholder(&template, required) {
            return Err(format!(
                "policy {:?}: aad_template must use {{{required}}} (it binds each wrap to its row and version)",
                policy.name
            ));
        }
    }
    Ok(template)
}

/// The template as [`aad_template`] checks it, without the placeholders a
/// new wrap needs: what opening an existing wrap renders.
fn template_of(policy: &Policy) -> Result<Value, String> {
    let template = match &policy.aad_template {
        None | Some(Value::Null) => {
            json!({"wrapper_uuid": "{wrapper_uuid}", "wrap_version": "{wrap_version}"})
        }
        Some(t @ Value::Object(_)) => t.clone(),
        Some(_) => {
            return Err(format!(
                "policy {:?}: aad_template must be a JSON object",
                policy.name
            ));
        }
    };
    check_template(&template, "aad_template")
        .map_err(|e| format!("policy {:?}: {e}", policy.name))?;
    Ok(template)
}

/// The policy a wrappers job wraps under, as it was when the job first
/// started (kept in `result.policy`): a job never writes under two
/// templates, and a wrap is checked against the template it was made
/// with, even after the policy is renamed, edited or deleted.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PolicyPin {
    pub id: i64,
    pub name: String,
    pub aad_template: Value,
}

impl PolicyPin {
    fn policy(&self) -> Policy {
        Policy {
            id: self.id,
            name: self.name.clone(),
            layer_selection: String::new(),
            min_layers: 0,
            max_layers: 0,
            aad_template: Some(self.aad_template.clone()),
        }
    }
}

/// The values of the placeholders for one wrapper.
pub struct AadValues<'a> {
    pub wrapper_id: i64,
    /// Canonical (36 characters, lowercase), see [`wrap::canonical_uuid`].
    pub wrapper_uuid: &'a str,
    pub policy_id: i64,
    pub policy_name: &'a str,
    pub wrap_version: i32,
}

impl AadValues<'_> {
    fn get(&self, placeholder: &str) -> String {
        match placeholder {
            "wrapper_id" => self.wrapper_id.to_string(),
            "wrapper_uuid" => self.wrapper_uuid.to_owned(),
            "policy_id" => self.policy_id.to_string(),
            "policy_name" => self.policy_name.to_owned(),
            "wrap_version" => self.wrap_version.to_string(),
            other => unreachable!("unknown placeholder {other} passed the template check"),
        }
    }
}

/// Substitute the placeholders into every string value of a checked
/// template, in one pass: a value that itself looks like a placeholder
/// (a policy named "{wrapper_uuid}") is inserted as it is.
pub fn render_aad(template: &Value, values: &AadValues<'_>) -> Value {
    match template {
        Value::String(s) => {
            let mut out = String::with_capacity(s.len() + 36);
            for piece in pieces(s).expect("checked by aad_template") {
                match piece {
                    Piece::Text(t) => out.push_str(t),
                    Piece::Placeholder(p) => out.push_str(&values.get(p)),
                }
            }
            Value::String(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| render_aad(i, values)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render_aad(v, values)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The KEM an algorithm row stands for, if pqmig can wrap with it.
pub fn kem_of(algo: &crate::db::algorithms::Algorithm) -> Option<Kem> {
    if algo.class != "kem" {
        return None;
    }
    match (
        algo.name.to_ascii_uppercase().as_str(),
        algo.variant.as_deref(),
    ) {
        ("ML-KEM", Some("768")) => Some(Kem::MlKem768),
        ("ML-KEM", Some("1024")) => Some(Kem::MlKem1024),
        ("X-WING", None | Some("")) => Some(Kem::XWing),
        _ => None,
    }
}

/// A key an existing wrapper is opened with.
pub enum SourceKey {
    Aes(Zeroizing<[u8; 32]>),
    X25519(Zeroizing<[u8; 32]>),
    Kem(KemKeyPair),
}

/// Resolve the secret of a `kms_keys` row into a usable key.
fn source_key(keyring: &dyn KeyProvider, key: &KmsKey) -> Result<SourceKey, String> {
    if key.provider != "local" {
        return Err(format!(
            "key {} ({:?}) belongs to provider {:?}, which this build does not implement",
            key.id, key.key_ref, key.provider
        ));
    }
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

/// A usable layer key of the target policy.
pub struct LayerKey {
    pub kms_key_id: i64,
    pub weight: i32,
    pub pair: KemKeyPair,
}

/// What the computation threads share for the whole job.
pub struct Plan {
    pub job_id: i64,
    pub policy: Policy,
    pub mode: LayerSelection,
    pub kem: Kem,
    pub kem_algo_id: i64,
    pub template: Value,
    pub layer_keys: Vec<LayerKey>,
    pub verify: bool,
    pub allow_downgrade: bool,
    pub source: SourceKeys,
}

/// The keys existing wrappers are opened with, by `kms_keys.id`, resolved
/// once per job; an error is the reason a key cannot be used (a `data`
/// failure of the items that need it).
pub struct SourceKeys {
    keyring: Arc<LocalKeyring>,
    keys: Mutex<HashMap<i64, Arc<Result<SourceKey, String>>>>,
    /// Policies named by `pqmig-wrap-v1` wrappers, by id.
    policies: Mutex<HashMap<PolicyKey, Arc<PolicyAad>>>,
    /// The KEMs of `crypto_algorithms` rows, by id (loaded once).
    kem_algos: std::sync::OnceLock<HashMap<i64, Kem>>,
}

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

pub struct WrappersJob {
    sel: selection::Wrappers,
    filter: WrapperFilter,
    pin: Option<PolicyPin>,
    plan: Arc<Plan>,
}

/// The new values of one batch.
pub struct Computed {
    pub updates: WrapperUpdates,
    pub failures: Vec<ItemFailure>,
    pub skipped: i64,
}

impl WrappersJob {
    /// Validate the job and load its keys; nothing is written.
    pub async fn prepare(
        c: &impl GenericClient,
        job: &ClaimedJob,
        ctx: &ScopeContext,
    ) -> Result<WrappersJob, JobError> {
        Self::check(c, job).await?.load_keys(job.lease.job_id, ctx)
    }

    /// Every check that needs only the database.
    pub async fn check(c: &impl GenericClient, job: &ClaimedJob) -> Result<Checked, JobError> {
        let sel =
            selection::parse_wrappers(job.selection.as_ref()).map_err(|e| fatal(e.to_string()))?;
        let policy_id = job.target_policy_id.ok_or_else(|| {
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
        let algo_id = match job.target_algo_id {
            Some(id) => id,
            None => dbw::policy_kem(c, policy.id).await?.ok_or_else(|| {
                fatal(format!(
                    "no target KEM: the job has no target_algo_id and policy {:?} has no kem in policy_algorithms",
                    policy.name
                ))
            })?,
        };
        let algo = crate::db::algorithms::algorithm_by_id(c, algo_id)
            .await?
            .ok_or_else(|| fatal(format!("target algorithm id {algo_id} does not exist")))?;
        let label = algo.label();
        if algo.class != "kem" {
            return Err(fatal(format!(
                "target algorithm {label} (id {algo_id}) is not a KEM: the wrappers scope needs ML-KEM-768, ML-KEM-1024 or X-Wing"
            )));
        }
        if algo.params.get("pq").and_then(Value::as_bool) != Some(true) {
            return Err(fatal(format!(
                "target algorithm {label} (id {algo_id}) is not post-quantum"
            )));
        }
        algo.check_usable(sel.common.allow_experimental)
            .map_err(fatal)?;
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
        let pin = match job.pinned.as_ref().and_then(|r| r.get("policy")) {
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
        if !sel.allow_downgrade {
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

/// SPEC §6.1 "no silent downgrade": a job whose selection holds a
/// `pqmig-wrap-v1` wrapper under a stronger KEM than the target (a higher
/// NIST category, or a hybrid) fails before any item, naming one, unless
/// the selection sets `allow_downgrade`. (Each item is checked again when
/// it is processed: a wrapper rewritten meanwhile cannot slip through.)
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
    if let Some((id, kem)) = dbw::wrappers_find_kem(c, filter, &stronger).await? {
        return Err(fatal(format!(
            "the selection holds wrappers under {kem} (e.g. id {id}); re-wrapping them under {} would weaken them: narrow the selection or set selection.allow_downgrade",
            target.alias()
        )));
    }
    Ok(())
}

impl Checked {
    /// The layer keys, last: a keyring problem is reported only for a job
    /// that is otherwise valid.
    pub fn load_keys(self, job_id: i64, ctx: &ScopeContext) -> Result<WrappersJob, JobError> {
        let path = ctx.keyring.as_ref().ok_or_else(|| {
            fatal("no keyring configured (keys.keyring or PQMIG_KEYRING) to read the wrapping keys from")
        })?;
        let keyring = Arc::new(LocalKeyring::load(path).map_err(|e| fatal(e.to_string()))?);
        let mut layer_keys = Vec::with_capacity(self.candidates.len());
        for c in &self.candidates {
            let secret =
                crate::keys::kms_secret(&*keyring, &c.key, self.kem.alias()).map_err(|e| {
                    fatal(format!(
                        "layer key {} of policy {:?}: {e}",
                        c.key.id, self.policy.name
                    ))
                })?;
            let pair = KemKeyPair::from_seed(self.kem, &secret.bytes)
                .map_err(|e| fatal(format!("layer key {:?}: {e}", c.key.key_ref)))?;
            layer_keys.push(LayerKey {
                kms_key_id: c.key.id,
                weight: c.weight,
                pair,
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
                source: SourceKeys::new(keyring),
            }),
            sel: self.sel,
        })
    }
}

/// What became of one wrapper.
pub enum Outcome {
    Skip,
    Fail(&'static str, String),
    Write(NewWrap),
}

/// A wrapper's new values.
pub struct NewWrap {
    pub wrap: Vec<u8>,
    pub suite: Value,
    pub aad: Value,
    pub layers: Vec<(i64, Vec<u8>, Vec<u8>)>,
}

/// Ids of the keys a wrapper needs to be opened.
fn needed_keys(row: &WrapperRow) -> impl Iterator<Item = i64> + '_ {
    [row.kms1, row.kms2]
        .into_iter()
        .flatten()
        .chain(row.layers.iter().filter_map(|l| l.kms_key_id))
}

fn format_of(row: &WrapperRow) -> Result<&str, String> {
    match &row.suite {
        None | Some(Value::Null) => Ok(wrap::FORMAT_LEGACY_AES),
        Some(s) => match s.get("format") {
            None | Some(Value::Null) => Ok(wrap::FORMAT_LEGACY_AES),
            Some(Value::String(f)) => Ok(f.as_str()),
            Some(_) => Err("crypto_suite.format is not a string".into()),
        },
    }
}

/// The policy a `pqmig-wrap-v1` wrapper names (`crypto_suite.policy_id`).
fn suite_policy(row: &WrapperRow) -> Option<i64> {
    row.suite
        .as_ref()
        .and_then(|s| s.get("policy_id"))
        .and_then(Value::as_i64)
}

/// The job that wrote a `pqmig-wrap-v1` wrapper (`crypto_suite.job_id`).
fn suite_job(row: &WrapperRow) -> Option<i64> {
    row.suite
        .as_ref()
        .and_then(|s| s.get("job_id"))
        .and_then(Value::as_i64)
}

/// The KEM a `pqmig-wrap-v1` wrapper names (`crypto_suite.kem`).
fn suite_kem(row: &WrapperRow) -> Option<Kem> {
    row.suite
        .as_ref()
        .and_then(|s| s.get("kem"))
        .and_then(Value::as_str)
        .and_then(Kem::from_alias)
}

/// A policy as the AAD check of an existing wrap needs it: its name and
/// checked template, or why it cannot be used.
type PolicyAad = Result<(String, Value), String>;

/// (`crypto_suite.policy_id`, `crypto_suite.job_id`) of a v1 wrap.
type PolicyKey = (i64, Option<i64>);

type Failure = (&'static str, String);

impl SourceKeys {
    pub fn new(keyring: Arc<LocalKeyring>) -> SourceKeys {
        SourceKeys {
            keyring,
            keys: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
            kem_algos: std::sync::OnceLock::new(),
        }
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

        let mut wanted: Vec<i64> = {
            let cache = self.keys.lock().expect("key cache");
            rows.iter()
                .flat_map(|r| needed_keys(r))
                .filter(|id| !cache.contains_key(id))
                .collect()
        };
        if wanted.is_empty() {
            return Ok(());
        }
        wanted.sort_unstable();
        wanted.dedup();
        let found = kms::kms_keys_by_id(c, &wanted).await?;
        let keyring = Arc::clone(&self.keyring);
        let resolved = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|id| {
                    let key = match found.iter().find(|k| k.id == id) {
                        Some(k) => source_key(&*keyring, k),
                        None => Err(format!("kms_keys row {id} does not exist")),
                    };
                    (id, Arc::new(key))
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| fatal(format!("key resolution panicked: {e}")))?;
        self.keys.lock().expect("key cache").extend(resolved);
        Ok(())
    }

    fn key(&self, id: i64) -> Option<Arc<Result<SourceKey, String>>> {
        self.keys.lock().expect("key cache").get(&id).cloned()
    }

    /// Recover the DEK of a wrapper: `Err((code, message))` otherwise.
    pub fn recover(&self, row: &WrapperRow) -> Result<Zeroizing<Vec<u8>>, Failure> {
        let format = format_of(row).map_err(|m| ("data", m))?;
        match format {
            wrap::FORMAT_LEGACY_AES | wrap::FORMAT_LEGACY_X25519 => {
                self.recover_legacy(row, format)
            }
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
            let try_one = |u: &str| match k {
                SourceKey::Aes(k) => wrap::open_legacy_aes(k, u, sealed),
                SourceKey::X25519(k) => wrap::open_legacy_x25519(k, u, sealed),
                SourceKey::Kem(_) => unreachable!("matched against the format below"),
            };
            try_one(&uuid).or_else(|e| {
                if row.uuid != uuid {
                    try_one(&row.uuid)
                } else {
                    Err(e)
                }
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
                (Ok(k @ SourceKey::Aes(_)), wrap::FORMAT_LEGACY_AES)
                | (Ok(k @ SourceKey::X25519(_)), wrap::FORMAT_LEGACY_X25519) => open(k, sealed),
                (Ok(_), _) => {
                    unchecked.push(format!(
                        "kms{slot}_key_id {kid} is not a key of the {format} format"
                    ));
                    continue;
                }
            };
            match result {
                Ok(dek) => opened.push(dek),
                Err(_) => failed.push(slot),
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
        let suite = row.suite.as_ref().expect("v1 has a suite");
        let uuid = wrap::canonical_uuid(&row.uuid).map_err(data)?;
        let kc = suite
            .get("kc")
            .and_then(Value::as_str)
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or_else(|| integrity("crypto_suite.kc is missing or not base64"))?;
        let kem =
            suite_kem(row).ok_or_else(|| integrity("crypto_suite.kem names no KEM pqmig knows"))?;
        if let Some(n) = suite.get("layers").and_then(Value::as_u64)
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
        let layers: Vec<(&KemKeyPair, &[u8])> = keys
            .iter()
            .map(|(k, l)| {
                let Ok(SourceKey::Kem(pair)) = &**k else {
                    unreachable!("checked above")
                };
                (pair, l.ciphertext.as_deref().unwrap_or_default())
            })
            .collect();
        let wrap1 = row.wrap1.as_deref().unwrap_or_default();
        wrap::open_v1(&uuid, &wrap::canonical_json(&aad), &layers, &kc, wrap1).map_err(|e| {
            match e {
                WrapError::Auth => integrity("AES-256-GCM authentication failed"),
                WrapError::Commitment => integrity("key commitment does not match"),
                // A ciphertext of the wrong size: stored bytes were altered.
                WrapError::Format(m) => integrity(&m),
            }
        })
    }
}

impl Plan {
    /// Claims to be in the target state: v1 under the same policy and KEM,
    /// every layer under one of the policy's keys. The claim is
    /// `crypto_suite`, which nothing authenticates, so [`Plan::process`]
    /// opens the wrap (bound to its row) before skipping it.
    fn claims_migrated(&self, row: &WrapperRow) -> bool {
        let Some(s) = &row.suite else { return false };
        s.get("format").and_then(Value::as_str) == Some(wrap::FORMAT_V1)
            && suite_policy(row) == Some(self.policy.id)
            && suite_kem(row) == Some(self.kem)
            && !row.layers.is_empty()
            && row.layers.iter().all(|l| {
                l.kms_key_id
                    .is_some_and(|id| self.layer_keys.iter().any(|k| k.kms_key_id == id))
            })
    }

    /// The whole item: skip, fail or the new values.
    pub fn process(&self, row: &WrapperRow, rng: &mut impl rand::Rng) -> Outcome {
        let claims_migrated = self.claims_migrated(row);
        let dek = match self.source.recover(row) {
            Ok(d) => d,
            Err((code, msg)) => return Outcome::Fail(code, msg),
        };
        if claims_migrated {
            return Outcome::Skip;
        }
        if format_of(row) == Ok(wrap::FORMAT_V1)
            && let Some(source) = suite_kem(row)
            && self.kem.is_downgrade_from(source)
            && !self.allow_downgrade
        {
            return Outcome::Fail(
                "downgrade",
                format!(
                    "wrapped under {}; re-wrapping it under {} would weaken it (selection.allow_downgrade permits it)",
                    source.alias(),
                    self.kem.alias()
                ),
            );
        }
        if dek.len() != wrap::DEK_LEN {
            return Outcome::Fail(
                "data",
                format!("the DEK is {} bytes, expected {}", dek.len(), wrap::DEK_LEN),
            );
        }
        let Some(version) = row.wrap_version.checked_add(1) else {
            return Outcome::Fail("data", "wrap_version is at its maximum".into());
        };
        let uuid = match wrap::canonical_uuid(&row.uuid) {
            Ok(u) => u,
            Err(e) => return Outcome::Fail("data", e),
        };
        let weights: Vec<i32> = self.layer_keys.iter().map(|k| k.weight).collect();
        let chosen = choose_layers(
            self.mode,
            &weights,
            self.policy.min_layers as usize,
            self.policy.max_layers as usize,
            row.id,
            &uuid,
            rng,
        );
        let aad = render_aad(
            &self.template,
            &AadValues {
                wrapper_id: row.id,
                wrapper_uuid: &uuid,
                policy_id: self.policy.id,
                policy_name: &self.policy.name,
                wrap_version: version,
            },
        );
        let aad_bytes = wrap::canonical_json(&aad);
        let keys: Vec<&LayerKey> = chosen.iter().map(|&i| &self.layer_keys[i]).collect();
        let pairs: Vec<&KemKeyPair> = keys.iter().map(|k| &k.pair).collect();
        let sealed = wrap::seal_v1_to(&uuid, &aad_bytes, &dek, &pairs);
        if self.verify {
            let layers: Vec<(&KemKeyPair, &[u8])> = keys
                .iter()
                .zip(&sealed.ciphertexts)
                .map(|(k, ct)| (&k.pair, ct.as_slice()))
                .collect();
            let ok = wrap::open_v1(&uuid, &aad_bytes, &layers, &sealed.commitment, &sealed.wrap)
                .is_ok_and(|opened| bool::from(opened.ct_eq(&dek)));
            if !ok {
                return Outcome::Fail(
                    "verify",
                    "the new wrap did not open to the same DEK; nothing written".into(),
                );
            }
        }
        let suite = json!({
            "format": wrap::FORMAT_V1,
            "kem": self.kem.alias(),
            "layers": keys.len(),
            "kdf": "HKDF-SHA-384",
            "aead": "AES-256-GCM",
            "kc": STANDARD.encode(sealed.commitment),
            "policy_id": self.policy.id,
            "job_id": self.job_id,
        });
        Outcome::Write(NewWrap {
            wrap: sealed.wrap,
            suite,
            aad,
            layers: keys
                .iter()
                .zip(sealed.ciphertexts)
                .map(|(k, ct)| (k.kms_key_id, ct, k.pair.public_key().to_vec()))
                .collect(),
        })
    }

    /// A batch, in order, on the calling thread.
    pub fn compute(&self, rows: &[WrapperRow]) -> Computed {
        let mut rng = rand::rng();
        let mut out = Computed {
            updates: WrapperUpdates::default(),
            failures: Vec::new(),
            skipped: 0,
        };
        let meta = json!({"job_id": self.job_id, "format": wrap::FORMAT_V1});
        for row in rows {
            match self.process(row, &mut rng) {
                Outcome::Skip => out.skipped += 1,
                Outcome::Fail(code, message) => out.failures.push(ItemFailure {
                    item_id: row.id,
                    code,
                    message,
                }),
                Outcome::Write(new) => {
                    let u = &mut out.updates;
                    u.ids.push(row.id);
                    u.old_versions.push(row.wrap_version);
                    u.old_wrap1.push(row.wrap1.clone());
                    u.old_wrap2.push(row.wrap2.clone());
                    u.old_suites.push(row.suite.clone());
                    u.replaced_layer_bytes += row
                        .layers
                        .iter()
                        .map(|l| i64::from(l.stored_bytes))
                        .sum::<i64>();
                    u.new_wrap1.push(new.wrap);
                    u.new_suites.push(new.suite);
                    let l: &mut NewLayers = &mut u.layers;
                    for (j, (kid, ct, pk)) in new.layers.into_iter().enumerate() {
                        l.wrapper_ids.push(row.id);
                        l.layer_nos.push(j as i16 + 1);
                        l.kms_key_ids.push(kid);
                        l.kem_algo_ids.push(self.kem_algo_id);
                        l.ciphertexts.push(ct);
                        l.public_keys.push(pk);
                        l.aads.push(new.aad.clone());
                        l.metas.push(meta.clone());
                    }
                }
            }
        }
        out
    }
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Append `b` to `a` (results of chunks computed in parallel, in order).
fn merge(a: &mut Computed, b: Computed) {
    let (u, v) = (&mut a.updates, b.updates);
    u.ids.extend(v.ids);
    u.old_versions.extend(v.old_versions);
    u.old_wrap1.extend(v.old_wrap1);
    u.old_wrap2.extend(v.old_wrap2);
    u.old_suites.extend(v.old_suites);
    u.replaced_layer_bytes += v.replaced_layer_bytes;
    u.new_wrap1.extend(v.new_wrap1);
    u.new_suites.extend(v.new_suites);
    let (l, m) = (&mut u.layers, v.layers);
    l.wrapper_ids.extend(m.wrapper_ids);
    l.layer_nos.extend(m.layer_nos);
    l.kms_key_ids.extend(m.kms_key_ids);
    l.kem_algo_ids.extend(m.kem_algo_ids);
    l.ciphertexts.extend(m.ciphertexts);
    l.public_keys.extend(m.public_keys);
    l.aads.extend(m.aads);
    l.metas.extend(m.metas);
    a.failures.extend(b.failures);
    a.skipped += b.skipped;
}

impl WrappersJob {
    pub fn common(&self) -> &Common {
        &self.sel.common
    }

    /// Bytes one rewritten wrapper holds in memory at most: its layers'
    /// ciphertexts and public keys, the wrap, the suite and the old row.
    pub fn item_bytes(&self) -> i64 {
        let p = &self.plan;
        let layers = (p.policy.max_layers as usize)
            .min(p.layer_keys.len())
            .max(1);
        (layers * (p.kem.ciphertext_len() + p.kem.public_key_len() + 200) + 600) as i64
    }

    /// What the job's `result` must record before its first batch (the
    /// policy it wraps under), unless it is there already.
    pub fn pin_to_record(&self) -> Option<Value> {
        self.pin.as_ref().map(|p| json!({ "policy": p }))
    }

    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    pub async fn count(
        &self,
        c: &impl GenericClient,
        after: i64,
        cap: i64,
    ) -> Result<i64, JobError> {
        Ok(dbw::wrappers_count(c, &self.filter, after, cap).await?)
    }

    /// The next batch, with every key its wrappers need resolved.
    pub async fn fetch(
        &self,
        c: &impl GenericClient,
        after: i64,
        n: i64,
    ) -> Result<Vec<WrapperRow>, JobError> {
        let rows = dbw::wrappers_fetch_batch(c, &self.filter, after, n).await?;
        self.resolve_keys(c, &rows).await?;
        Ok(rows)
    }

    async fn resolve_keys(
        &self,
        c: &impl GenericClient,
        rows: &[WrapperRow],
    ) -> Result<(), JobError> {
        let rows: Vec<&WrapperRow> = rows.iter().collect();
        self.plan.source.resolve(c, &rows).await
    }

    /// The CPU part of a batch, split across the cores on blocking threads.
    pub async fn compute_off_thread(&self, rows: Vec<WrapperRow>) -> Result<Computed, JobError> {
        let empty = Computed {
            updates: WrapperUpdates::default(),
            failures: Vec::new(),
            skipped: 0,
        };
        super::compute_parallel(&self.plan, rows, 8, empty, Plan::compute, merge).await
    }

    /// Write a computed batch in the caller's transaction (compare-and-
    /// set, see [`super::write_cas`]).
    pub async fn write(
        &self,
        tx: &impl GenericClient,
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
        let rows = dbw::wrappers_lock_rows(tx, &self.filter, ids).await?;
        self.resolve_keys(tx, &rows).await?;
        let found = rows.len();
        let plan = Arc::clone(&self.plan);
        let again = tokio::task::spawn_blocking(move || plan.compute(&rows))
            .await
            .map_err(|e| fatal(format!("wrapper computation panicked: {e}")))?;
        Ok((found, again.updates, again.failures, again.skipped))
    }
}

/// `pqmig verify` of a wrappers job: (checked, changed since, mismatches).
///
/// With backups, each backed-up wrapper is checked against its backup: one
/// the job still holds must open (bound to its row) to the DEK of the wrap
/// it replaced; one rewritten since (a later job re-wrapped it) counts as
/// checked when it still opens to that DEK, and as changed when it does not
/// (the application rotated it) or is gone. Without backups, every wrapper
/// the job wrote must open.
pub async fn verify_job(
    c: &impl GenericClient,
    keyring: Arc<LocalKeyring>,
    job_id: i64,
    page: i64,
) -> Result<(i64, i64, Vec<(i64, String)>), JobError> {
    let keys = Arc::new(SourceKeys::new(keyring));
    let (mut checked, mut changed, mut bad) = (0i64, 0i64, Vec::new());
    if dbw::backups_count(c, job_id).await? == 0 {
        let mut after = i64::MIN;
        loop {
            let rows = dbw::wrappers_of_job(c, job_id, after, page).await?;
            let Some(last) = rows.last().map(|r| r.id) else {
                break;
            };
            after = last;
            keys.resolve(c, &rows.iter().collect::<Vec<_>>()).await?;
            for row in &rows {
                checked += 1;
                if let Err((code, why)) = keys.recover(row) {
                    bad.push((row.id, format!("{code}: {why}")));
                }
            }
        }
        return Ok((checked, changed, bad));
    }
    let mut after = i64::MIN;
    loop {
        let backups = dbw::wrapper_backups_after(c, job_id, after, page).await?;
        let Some(last) = backups.last().map(|(b, _)| *b) else {
            break;
        };
        after = last;
        let ids: Vec<i64> = backups.iter().map(|(_, old)| old.id).collect();
        let now = dbw::wrappers_by_ids(c, &ids).await?;
        let all: Vec<&WrapperRow> = now.iter().chain(backups.iter().map(|(_, b)| b)).collect();
        keys.resolve(c, &all).await?;
        let k = Arc::clone(&keys);
        let (p_checked, p_changed, p_bad) = tokio::task::spawn_blocking(move || {
            let (mut checked, mut changed, mut bad) = (0i64, 0i64, Vec::new());
            for (_, old) in &backups {
                let Some(row) = now.iter().find(|r| r.id == old.id) else {
                    changed += 1;
                    continue;
                };
                let ours = suite_job(row) == Some(job_id) && format_of(row) == Ok(wrap::FORMAT_V1);
                let (current, before) = (k.recover(row), k.recover(old));
                match (ours, current, before) {
                    (_, Ok(a), Ok(b)) if bool::from(a.ct_eq(&b)) => checked += 1,
                    (false, _, _) => changed += 1,
                    (true, Err((code, why)), _) => bad.push((row.id, format!("{code}: {why}"))),
                    (true, Ok(_), Ok(_)) => bad.push((
                        row.id,
                        "opens to a different DEK than the wrap it replaced".into(),
                    )),
                    (true, Ok(_), Err((code, why))) => bad.push((
                        row.id,
                        format!("the backed-up wrap does not open ({code}: {why})"),
                    )),
                }
            }
            (checked, changed, bad)
        })
        .await
        .map_err(|e| fatal(format!("verification panicked: {e}")))?;
        checked += p_checked;
        changed += p_changed;
        bad.extend(p_bad);
    }
    Ok((checked + bad.len() as i64, changed, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(template: Value) -> Policy {
        Policy {
            id: 7,
            name: "p".into(),
            layer_selection: "defined".into(),
            min_layers: 1,
            max_layers: 1,
            aad_template: Some(template),
        }
    }

    #[test]
    fn templates_allow_only_known_placeholders_and_strings() {
        for (bad, why) in [
            (json!({"a": "{tenant}"}), "unknown placeholder {tenant}"),
            (json!({"a": "{}"}), "unknown placeholder {}"),
            (
                json!({"a": "{wrapper id}"}),
                "unknown placeholder {wrapper id}",
            ),
            (
                json!({"a": "x{wrapper_id"}),
                "unknown placeholder {wrapper_id",
            ),
            (json!({"a": "x}"}), "unknown placeholder }"),
            (
                json!({"a": {"b": ["{policy_id}", 3]}}),
                "aad_template.a.b[1]: template values must be strings, got a number",
            ),
            (json!({"a": true}), "got a boolean"),
            (json!({"a": null}), "got null"),
        ] {
            let e = aad_template(&policy(bad.clone())).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(
            aad_template(&policy(
                json!({"a": ["{wrapper_id}-{wrap_version}", {"b": "{wrapper_uuid}"}]})
            ))
            .is_ok()
        );
        // what binds a wrap to its row must be there
        for (t, missing) in [
            (json!({"v": "{wrap_version}"}), "{wrapper_uuid}"),
            (
                json!({"u": "{wrapper_uuid}", "p": "{policy_id}"}),
                "{wrap_version}",
            ),
        ] {
            let e = aad_template(&policy(t)).unwrap_err();
            assert!(e.contains(&format!("must use {missing}")), "{e}");
        }
        let default = Policy {
            aad_template: None,
            ..policy(json!({}))
        };
        assert!(aad_template(&default).is_ok());
    }

    #[test]
    fn placeholders_are_substituted_once() {
        let t = aad_template(&policy(
            json!({"n": "{policy_name}|{wrapper_uuid}", "v": "{wrap_version}"}),
        ))
        .unwrap();
        let values = AadValues {
            wrapper_id: 1,
            wrapper_uuid: "0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7e",
            policy_id: 7,
            policy_name: "{wrapper_uuid}{wrap_version}",
            wrap_version: 2,
        };
        assert_eq!(
            render_aad(&t, &values),
            json!({"n": "{wrapper_uuid}{wrap_version}|0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7e", "v": "2"})
        );
    }
}
