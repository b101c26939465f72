//! The scopes: what a job does to its items. A scope is one unit: its
//! name is parsed once into a [`ScopeKind`], and everything else goes
//! through two traits every scope implements, so the executor, `plan`,
//! `bench`, `verify` and `rollback` never match on a scope.
//!
//! - [`Scope`]: a validated job with its keys loaded — count, fetch a
//!   batch, compute it off the async executor, write it in the batch's
//!   transaction. [`Prepared`] is any scope's job behind one type.
//! - [`Aftercare`]: a finished job — `verify` and `rollback`.
//!
//! One folder per scope:
//!
//! - [`hashes`]: HMAC onion over keyed lookup hashes (SPEC §5.4, §6.4).
//! - [`signatures`]: classical signatures verified and countersigned with
//!   ML-DSA / SLH-DSA (SPEC §5.3, §6.3).
//! - [`wrappers`]: DEK wrappers re-wrapped under ML-KEM / X-Wing layers
//!   (SPEC §5.1, §5.2, §6.2).

mod cas;
pub mod hashes;
mod prepared;
pub mod signatures;
pub mod wrappers;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use tokio_postgres::{Client, Transaction};

pub(crate) use cas::{CasWrite, compute_parallel, write_cas};
pub use prepared::{Computed, Prepared, Rows};

use crate::job::JobSpec;
pub use crate::job::ScopeKind;
use crate::keys::{Keyring, LocalKeyring};
use crate::selection::Common;

impl ScopeKind {
    /// Validate the job and load its keys; nothing is written.
    pub async fn prepare(
        self,
        c: &Client,
        spec: &JobSpec,
        ctx: &ScopeContext,
    ) -> Result<Prepared, JobError> {
        ctx.settle().await;
        Ok(match self {
            ScopeKind::Hashes => Prepared::new(hashes::HashesJob::prepare(c, spec, ctx).await?),
            ScopeKind::Wrappers => {
                Prepared::new(wrappers::WrappersJob::prepare(c, spec, ctx).await?)
            }
            ScopeKind::Signatures => {
                Prepared::new(signatures::SignaturesJob::prepare(c, spec, ctx).await?)
            }
        })
    }

    /// The checks that need only the database (no key material): what
    /// `pqmig enqueue` runs when no keyring is configured where it runs.
    pub async fn validate(self, c: &Client, spec: &JobSpec) -> Result<(), JobError> {
        match self {
            ScopeKind::Hashes => hashes::HashesJob::check(c, spec).await.map(|_| ()),
            ScopeKind::Wrappers => wrappers::WrappersJob::check(c, spec).await.map(|_| ()),
            ScopeKind::Signatures => signatures::SignaturesJob::check(c, spec).await.map(|_| ()),
        }
    }

    /// Whether `verify` of its jobs needs the keyring (the pepper, the KEKs
    /// that open the wraps); signatures verify with public keys.
    pub fn verify_needs_keyring(self) -> bool {
        !matches!(self, ScopeKind::Signatures)
    }

    /// What `verify` and `rollback` of a finished job need. `keys`: load
    /// the key material too (verify); rollback needs none.
    pub async fn aftercare(
        self,
        c: &Client,
        spec: &JobSpec,
        ctx: &ScopeContext,
        keys: bool,
    ) -> Result<Box<dyn Aftercare>, JobError> {
        if keys {
            ctx.settle().await;
        }
        Ok(match self {
            ScopeKind::Hashes => Box::new(hashes::aftercare(c, spec, ctx, keys).await?),
            ScopeKind::Wrappers => Box::new(wrappers::aftercare(ctx, keys)?),
            ScopeKind::Signatures => Box::new(signatures::Aftercare),
        })
    }
}

/// Why a job or batch did not go through, classified where it happened.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job cannot succeed as written: it ends `failed` with this message.
    #[error("{0}")]
    Fatal(String),
    /// Connection loss, timeouts, serialization failures: retry with backoff.
    #[error("transient: {0}")]
    Transient(String),
    /// A statement hit `statement_timeout` or `lock_timeout`: retry the
    /// batch with half as many items.
    #[error("too slow: {0}")]
    TooSlow(String),
    /// Zero rows from a fenced write: cancelled or reclaimed elsewhere.
    #[error("lease lost")]
    LeaseLost,
}

pub(crate) fn fatal(msg: impl Into<String>) -> JobError {
    JobError::Fatal(msg.into())
}

impl From<tokio_postgres::Error> for JobError {
    fn from(e: tokio_postgres::Error) -> Self {
        let text = format!("database: {}", crate::db::error_chain(&e));
        match crate::db::classify(&e) {
            crate::db::Failure::TooSlow => JobError::TooSlow(text),
            crate::db::Failure::Transient => JobError::Transient(text),
            crate::db::Failure::Permanent => JobError::Fatal(text),
        }
    }
}

impl From<deadpool_postgres::PoolError> for JobError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => {
                JobError::Transient(format!("database pool: {}", crate::db::error_chain(&other)))
            }
        }
    }
}

/// What a job's target algorithm must be (SPEC §6.1).
pub(crate) struct TargetRule<'a> {
    /// `crypto_algorithms.class`, and with it `name` when set.
    pub class: &'a str,
    pub name: Option<&'a str>,
    /// What the scope needs, for the message: "a KEM: the wrappers scope
    /// needs ML-KEM-768, ML-KEM-1024 or X-Wing".
    pub needs: &'a str,
    /// `params.pq` must be true.
    pub pq: bool,
}

/// The job's target algorithm `id`, checked against `rule`, and (unless
/// the job is checked after the fact) `active`, or `experimental` with
/// `allow_experimental`. Every failure names the algorithm.
pub(crate) async fn target_algorithm(
    c: &impl tokio_postgres::GenericClient,
    spec: &JobSpec,
    id: i64,
    rule: TargetRule<'_>,
    allow_experimental: bool,
) -> Result<crate::db::algorithms::Algorithm, JobError> {
    let algo = crate::db::algorithms::algorithm_by_id(c, id)
        .await?
        .ok_or_else(|| fatal(format!("target algorithm id {id} does not exist")))?;
    let label = algo.label();
    if algo.class != rule.class || rule.name.is_some_and(|n| algo.name != n) {
        return Err(fatal(format!(
            "target algorithm {label} (id {id}) is not {}",
            rule.needs
        )));
    }
    if rule.pq && algo.params.get("pq").and_then(Value::as_bool) != Some(true) {
        return Err(fatal(format!(
            "target algorithm {label} (id {id}) is not post-quantum"
        )));
    }
    // A finished job is checked with what it ran with, whatever has been
    // deprecated since.
    if !spec.aftercare() {
        algo.check_usable(allow_experimental).map_err(fatal)?;
    }
    Ok(algo)
}

/// Bytes in a batch's values (for [`Scope::growth_bytes`]).
pub(crate) fn total_len<T: AsRef<[u8]>>(values: &[T]) -> i64 {
    values.iter().map(|v| v.as_ref().len() as i64).sum()
}

/// How long [`ScopeContext::settle`] waits for a missing keyring file;
/// past it the job's transient-error retries take over.
pub const KEYRING_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// What a scope needs from the process around it.
#[derive(Debug, Clone, Default)]
pub struct ScopeContext {
    /// Shared by every job of a daemon, so a changed file is read once.
    pub keyring: Option<Arc<Keyring>>,
    /// `keys.pkcs11_*`: the HSM that holds keys of provider `pkcs11`.
    pub pkcs11: Option<crate::keys::pkcs11::Pkcs11Settings>,
}

impl ScopeContext {
    /// The keyring at `path` (keys.keyring), read when first needed.
    pub fn new(path: Option<PathBuf>) -> ScopeContext {
        ScopeContext {
            keyring: path.map(|p| Arc::new(Keyring::new(p))),
            pkcs11: None,
        }
    }

    /// The keyring and the HSM a configuration names.
    pub fn of(config: &crate::config::Config) -> ScopeContext {
        ScopeContext {
            pkcs11: config.pkcs11.clone(),
            ..ScopeContext::new(config.keyring.clone())
        }
    }

    /// Give a missing keyring file a moment to appear before work that
    /// may need it: a Secret volume between two versions, a file being
    /// put in place. Only while no keys were loaded yet (after that the
    /// keys loaded before are used); polled, at most [`KEYRING_GRACE`].
    pub async fn settle(&self) {
        let Some(keyring) = &self.keyring else {
            return;
        };
        let deadline = tokio::time::Instant::now() + KEYRING_GRACE;
        while keyring.missing() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The keys, or why not: a missing file is transient (a Secret being
    /// swapped), any other problem or no keyring configured is fatal and
    /// says what the keys were needed for.
    pub(crate) fn keys(&self, what: &str) -> Result<Arc<LocalKeyring>, JobError> {
        let keyring = self.keyring.as_ref().ok_or_else(|| {
            fatal(format!(
                "no keyring configured (keys.keyring or PQMIG_KEYRING) to {what}"
            ))
        })?;
        keyring.current().map_err(|e| match e.is_transient() {
            true => JobError::Transient(e.to_string()),
            false => fatal(e.to_string()),
        })
    }
}

/// The counts of one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchCounts {
    pub migrated: i64,
    pub skipped: i64,
    /// Of `skipped`: sources of a subject another source of the batch
    /// stands for (signatures).
    pub duplicates: i64,
    pub failed: i64,
    /// Item failures that are failed authentication of existing data.
    pub integrity: i64,
}

impl BatchCounts {
    pub fn walked(&self) -> i64 {
        self.migrated + self.skipped + self.failed
    }
}

/// One item failure, recorded in `pq_migration_item_errors`.
#[derive(Debug, Clone)]
pub struct ItemFailure {
    pub item_id: i64,
    pub code: &'static str,
    pub message: String,
}

/// What a computed batch would do: items to write, skip, fail.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub write: i64,
    pub skip: i64,
    pub fail: i64,
}

/// A validated job of one scope, its keys loaded. The executor drives it
/// through [`Prepared`]; `plan` and `bench` use the same calls.
pub trait Scope: Send + Sync + 'static {
    /// One item as read.
    type Row: Send + Sync + 'static;
    /// The new values of one batch.
    type Computed: Send + 'static;

    fn common(&self) -> &Common;
    /// Bytes one item holds in memory at most while its batch is in
    /// flight (bounds the batch size).
    fn item_bytes(&self) -> i64;
    /// What the job's `result` must record before its first batch (what
    /// it pinned: a profile, a policy), unless it is there already.
    fn pin_to_record(&self) -> Option<Value> {
        None
    }
    fn row_id(row: &Self::Row) -> i64;

    /// Checks a daemon makes when it starts (or restarts) the job, after
    /// `prepare` and before any item: what needs the selection's rows
    /// (`pqmig enqueue` does not run them). Nothing by default.
    fn preflight(&self, c: &mut Client) -> impl Future<Output = Result<(), JobError>> + Send {
        let _ = c;
        std::future::ready(Ok(()))
    }

    /// Items after `after` in the selection, at most `cap` (`pqmig plan`;
    /// a job never counts, it estimates).
    fn count(
        &self,
        c: &Client,
        after: i64,
        cap: i64,
    ) -> impl Future<Output = Result<i64, JobError>> + Send;
    /// The smallest and largest id the selection's table holds within the
    /// selection's `id_from..=id_to` (the id index's two ends, no scan);
    /// `None`: no rows.
    fn id_bounds(
        &self,
        c: &Client,
    ) -> impl Future<Output = Result<Option<(i64, i64)>, JobError>> + Send;
    /// The planner's estimate of the selected items with `lo < id <= hi`.
    fn estimate(
        &self,
        c: &Client,
        lo: i64,
        hi: i64,
    ) -> impl Future<Output = Result<i64, JobError>> + Send;
    /// The first `n` selected items with `after < id <= upto`, in id order:
    /// one read over a bounded slice of the table, however sparse the
    /// selection.
    fn fetch(
        &self,
        c: &Client,
        after: i64,
        upto: i64,
        n: i64,
    ) -> impl Future<Output = Result<Vec<Self::Row>, JobError>> + Send;
    /// The CPU part of a batch, off the async executor.
    fn compute(
        &self,
        rows: Vec<Self::Row>,
    ) -> impl Future<Output = Result<Self::Computed, JobError>> + Send;
    fn outcome(c: &Self::Computed) -> Outcome;
    /// Bytes the batch adds to the database, new values minus the ones
    /// they replace (backups not included): `plan`'s growth estimate.
    fn growth_bytes(c: &Self::Computed) -> i64;
    /// Write a computed batch inside the caller's transaction.
    fn write(
        &self,
        tx: &Transaction<'_>,
        job_id: i64,
        c: Self::Computed,
    ) -> impl Future<Output = Result<(BatchCounts, Vec<ItemFailure>), JobError>> + Send;
    /// In the transaction that marks the job `done`.
    fn on_done(
        &self,
        _tx: &Transaction<'_>,
        _job_id: i64,
    ) -> impl Future<Output = Result<(), JobError>> + Send {
        async { Ok(()) }
    }
}

/// A boxed future, for the object-safe traits.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A finished job: `pqmig verify` and `pqmig rollback`.
pub trait Aftercare: Send + Sync {
    /// Re-check every item the job migrated with the key material.
    fn verify<'a>(
        &'a self,
        c: &'a Client,
        job_id: i64,
    ) -> BoxFuture<'a, Result<VerifyReport, JobError>>;
    /// Restore about `n` backups from `at` on, in the caller's
    /// transaction.
    fn rollback_page<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        job_id: i64,
        at: crate::db::backups::Cursor,
        n: i64,
    ) -> BoxFuture<'a, Result<RollbackPage, JobError>>;
    /// Every item whose stored value is still the one the job wrote, as
    /// (item id, [`crate::evidence::value_hash`] of that value), in any
    /// order: the leaves of a job attestation
    /// ([`crate::evidence::attest::current_leaves`] sorts them by id).
    fn leaves<'a>(
        &'a self,
        c: &'a Client,
        job_id: i64,
    ) -> BoxFuture<'a, Result<Vec<crate::evidence::Leaf>, JobError>>;
}

/// What a verify found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Items checked (mismatches included).
    pub checked: i64,
    /// Items changed since the job (moved on by the application or a later
    /// job): not checked, said with `changed_note`.
    pub changed: i64,
    pub changed_note: &'static str,
    /// (item id, why) of every item that did not verify.
    pub mismatches: Vec<(i64, String)>,
}

/// One page of a rollback.
#[derive(Debug, Default, Clone, Copy)]
pub struct RollbackPage {
    /// Items restored.
    pub restored: i64,
    /// Backups looked at.
    pub seen: i64,
    /// Where the next page starts (`None`: no backups left).
    pub next: Option<crate::db::backups::Cursor>,
}
