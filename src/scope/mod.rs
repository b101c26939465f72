//! The scopes: what a job does to its items. Each scope validates a job
//! before any item is touched (`prepare`), then reads batches, computes the
//! new values off the async executor and writes them in the batch's
//! transaction.
//!
//! - [`hashes`]: HMAC onion over keyed lookup hashes (SPEC §5.4, §6.4).
//! - [`signatures`]: classical signatures verified and countersigned with
//!   ML-DSA / SLH-DSA (SPEC §5.3, §6.3).
//! - [`wrappers`]: DEK wrappers re-wrapped under ML-KEM / X-Wing layers
//!   (SPEC §5.1, §5.2, §6.2).

pub mod hashes;
pub mod signatures;
pub mod wrappers;

use std::path::PathBuf;
use std::sync::Arc;

use crate::db::jobs::ClaimedJob;

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

/// What a scope needs from the process around it.
#[derive(Debug, Clone, Default)]
pub struct ScopeContext {
    pub keyring: Option<PathBuf>,
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

/// Run `compute` over `rows` on the blocking pool, split into one chunk
/// per core (at least `min_chunk` rows each), and fold the parts in order
/// with `merge`.
pub(crate) async fn compute_parallel<R, C, P>(
    plan: &Arc<P>,
    rows: Vec<R>,
    min_chunk: usize,
    empty: C,
    compute: fn(&P, &[R]) -> C,
    merge: fn(&mut C, C),
) -> Result<C, JobError>
where
    R: Send + Sync + 'static,
    C: Send + 'static,
    P: Send + Sync + 'static,
{
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = rows.len().div_ceil(threads).max(min_chunk).max(1);
    let rows = Arc::new(rows);
    let mut tasks = Vec::new();
    for start in (0..rows.len()).step_by(per) {
        let (plan, rows) = (Arc::clone(plan), Arc::clone(&rows));
        let end = (start + per).min(rows.len());
        tasks.push(tokio::task::spawn_blocking(move || {
            compute(&plan, &rows[start..end])
        }));
    }
    let mut out = empty;
    for t in tasks {
        let part = t
            .await
            .map_err(|e| JobError::Fatal(format!("item computation panicked: {e}")))?;
        merge(&mut out, part);
    }
    Ok(out)
}

/// The compare-and-set write of a scope: rows are rewritten only if they
/// still hold what the batch read; the others are locked, re-read and
/// recomputed in the same transaction, so neither the application's
/// concurrent write nor the migration is lost.
pub(crate) trait CasWrite {
    type Updates: Default;
    /// The item ids a set of updates rewrites.
    fn ids(u: &Self::Updates) -> &[i64];
    /// Rewrite the items still as read (with their backups); the ids done.
    async fn cas_update(
        &self,
        tx: &impl tokio_postgres::GenericClient,
        job_id: i64,
        u: &Self::Updates,
    ) -> Result<Vec<i64>, JobError>;
    /// Lock and re-read `ids` (those still in the selection) and compute
    /// them again: (items found, updates, failures, skipped).
    async fn relock_and_compute(
        &self,
        tx: &impl tokio_postgres::GenericClient,
        ids: &[i64],
    ) -> Result<(usize, Self::Updates, Vec<ItemFailure>, i64), JobError>;
}

/// Write one computed batch through [`CasWrite`] and count it.
pub(crate) async fn write_cas<S: CasWrite>(
    scope: &S,
    tx: &impl tokio_postgres::GenericClient,
    job_id: i64,
    dry_run: bool,
    (updates, mut failures, mut skipped): (S::Updates, Vec<ItemFailure>, i64),
) -> Result<(BatchCounts, Vec<ItemFailure>), JobError> {
    let wanted = S::ids(&updates);
    let mut migrated = wanted.len() as i64;
    if !dry_run {
        let done = scope.cas_update(tx, job_id, &updates).await?;
        migrated = done.len() as i64;
        if done.len() < wanted.len() {
            let done: std::collections::HashSet<i64> = done.into_iter().collect();
            let conflicted: Vec<i64> = wanted
                .iter()
                .copied()
                .filter(|id| !done.contains(id))
                .collect();
            let (found, again, more_failures, more_skipped) =
                scope.relock_and_compute(tx, &conflicted).await?;
            // Items deleted or moved out of the selection meanwhile are no
            // longer items of this job.
            skipped += (conflicted.len() - found) as i64 + more_skipped;
            failures.extend(more_failures);
            let n = scope.cas_update(tx, job_id, &again).await?;
            if n.len() != S::ids(&again).len() {
                return Err(JobError::Transient("items changed while locked".into()));
            }
            migrated += n.len() as i64;
        }
    }
    let counts = BatchCounts {
        migrated,
        skipped,
        failed: failures.len() as i64,
        integrity: failures.iter().filter(|f| f.code == "integrity").count() as i64,
        ..BatchCounts::default()
    };
    Ok((counts, failures))
}

/// A validated job of some scope. One per running job, so the size
/// difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Prepared {
    Hashes(hashes::HashesJob),
    Wrappers(wrappers::WrappersJob),
    Signatures(signatures::SignaturesJob),
}

/// The items of one batch as read, before any computation.
pub enum Rows {
    Hashes(Vec<crate::db::hashes::HashRow>),
    Wrappers(Vec<crate::db::wrappers::WrapperRow>),
    Signatures(Vec<crate::db::signatures::SignatureRow>),
}

impl Rows {
    /// How many items, and the id of the last (the next keyset cursor).
    pub fn extent(&self) -> (i64, Option<i64>) {
        match self {
            Rows::Hashes(r) => (r.len() as i64, r.last().map(|r| r.id)),
            Rows::Wrappers(r) => (r.len() as i64, r.last().map(|r| r.id)),
            Rows::Signatures(r) => (r.len() as i64, r.last().map(|r| r.id)),
        }
    }
}

/// The new values of one batch, ready to be written (one per batch in
/// flight).
#[allow(clippy::large_enum_variant)]
pub enum Computed {
    Hashes(hashes::Computed),
    Wrappers(wrappers::Computed),
    Signatures(signatures::Computed),
}

impl Computed {
    /// Bytes the items written by this batch add to the database, new
    /// values minus the ones they replace (backups not included).
    pub fn growth_bytes(&self) -> i64 {
        let len = |v: &[Vec<u8>]| v.iter().map(|b| b.len() as i64).sum::<i64>();
        let opt = |v: &[Option<Vec<u8>>]| v.iter().flatten().map(|b| b.len() as i64).sum::<i64>();
        match self {
            Computed::Hashes(h) => {
                let u = &h.updates;
                len(&u.new_hashes) - len(&u.old_hashes)
                    + u.new_versions.iter().map(|v| v.len() as i64).sum::<i64>()
                    - u.old_versions.iter().map(|v| v.len() as i64).sum::<i64>()
            }
            Computed::Wrappers(w) => {
                let u = &w.updates;
                let json = |v: &[serde_json::Value]| {
                    v.iter().map(|j| j.to_string().len() as i64).sum::<i64>()
                };
                let old_suites: i64 = u
                    .old_suites
                    .iter()
                    .flatten()
                    .map(|j| j.to_string().len() as i64)
                    .sum();
                len(&u.new_wrap1)
                    + json(&u.new_suites)
                    + len(&u.layers.ciphertexts)
                    + len(&u.layers.public_keys)
                    + json(&u.layers.aads)
                    + json(&u.layers.metas)
                    + 40 * u.layers.wrapper_ids.len() as i64
                    - opt(&u.old_wrap1)
                    - opt(&u.old_wrap2)
                    - old_suites
                    - u.replaced_layer_bytes
            }
            Computed::Signatures(s) => {
                let r = &s.rows;
                len(&r.signatures)
                    + len(&r.payload_hashes)
                    + r.subject_tables.iter().map(|t| t.len() as i64).sum::<i64>()
                    + r.subject_pks.iter().map(|t| t.len() as i64).sum::<i64>()
                    + r.contexts.iter().map(|t| t.len() as i64).sum::<i64>()
                    + 60 * r.source_ids.len() as i64
            }
        }
    }

    /// (items to write, skipped, failed) of this batch.
    pub fn outcome(&self) -> (i64, i64, i64) {
        match self {
            Computed::Hashes(h) => (
                h.updates.ids.len() as i64,
                h.skipped,
                h.failures.len() as i64,
            ),
            Computed::Wrappers(w) => (
                w.updates.ids.len() as i64,
                w.skipped,
                w.failures.len() as i64,
            ),
            Computed::Signatures(s) => (
                s.rows.source_ids.len() as i64,
                s.skipped,
                s.failures.len() as i64,
            ),
        }
    }
}

fn unsupported(scope: &str) -> JobError {
    JobError::Fatal(format!(
        "scope {scope:?} is not supported by this pqmig build"
    ))
}

impl Prepared {
    /// Validate the job and resolve its target; nothing is written.
    pub async fn prepare(
        c: &impl tokio_postgres::GenericClient,
        job: &ClaimedJob,
        ctx: &ScopeContext,
    ) -> Result<Prepared, JobError> {
        if let Some(e) = &job.selection_error {
            return Err(JobError::Fatal(e.clone()));
        }
        match job.scope.as_str() {
            "hashes" => Ok(Prepared::Hashes(
                hashes::HashesJob::prepare(c, job, ctx).await?,
            )),
            "wrappers" => Ok(Prepared::Wrappers(
                wrappers::WrappersJob::prepare(c, job, ctx).await?,
            )),
            "signatures" => Ok(Prepared::Signatures(
                signatures::SignaturesJob::prepare(c, job, ctx).await?,
            )),
            other => Err(unsupported(other)),
        }
    }

    /// The checks that need only the database (no key material): what
    /// `pqmig enqueue` runs when no keyring is configured where it runs.
    pub async fn validate(
        c: &impl tokio_postgres::GenericClient,
        job: &ClaimedJob,
    ) -> Result<(), JobError> {
        if let Some(e) = &job.selection_error {
            return Err(JobError::Fatal(e.clone()));
        }
        match job.scope.as_str() {
            "hashes" => hashes::HashesJob::check(c, job).await.map(|_| ()),
            "wrappers" => wrappers::WrappersJob::check(c, job).await.map(|_| ()),
            "signatures" => signatures::SignaturesJob::check(c, job).await.map(|_| ()),
            other => Err(unsupported(other)),
        }
    }

    pub fn common(&self) -> &crate::selection::Common {
        match self {
            Prepared::Hashes(h) => h.common(),
            Prepared::Wrappers(w) => w.common(),
            Prepared::Signatures(s) => s.common(),
        }
    }

    /// The largest batch adaptive sizing may reach, so the memory a batch
    /// holds stays bounded whatever the job's size (about 3 MiB of new
    /// values per batch; two batches are in flight). 3 MiB rather than 8:
    /// sizing reaches the cap within a 10k-item job, so a 10k job already
    /// shows the steady-state peak (one-layer wrappers, written in
    /// statements of `db::STATEMENT_BYTES`: 32 MiB at 10k, 33 at 200k and
    /// at 1M). It costs some throughput: 20k one-layer wrappers,
    /// alternating runs, median 4,242 items/s against 4,921 with 8 MiB
    /// (still above the combined ceiling of the same run).
    pub fn max_batch(&self) -> i64 {
        const BATCH_BYTES: i64 = 3 << 20;
        let per_item = match self {
            Prepared::Hashes(_) => 256,
            Prepared::Wrappers(w) => w.item_bytes(),
            Prepared::Signatures(s) => s.item_bytes(),
        };
        (BATCH_BYTES / per_item.max(1)).clamp(100, 10_000)
    }

    /// Items after `after` in the selection, at most `cap`.
    pub async fn count(
        &self,
        c: &impl tokio_postgres::GenericClient,
        after: i64,
        cap: i64,
    ) -> Result<i64, JobError> {
        match self {
            Prepared::Hashes(h) => h.count(c, after, cap).await,
            Prepared::Wrappers(w) => w.count(c, after, cap).await,
            Prepared::Signatures(s) => s.count(c, after, cap).await,
        }
    }

    /// The next `n` items after `after`, in id order.
    pub async fn fetch(
        &self,
        c: &impl tokio_postgres::GenericClient,
        after: i64,
        n: i64,
    ) -> Result<Rows, JobError> {
        match self {
            Prepared::Hashes(h) => Ok(Rows::Hashes(h.fetch(c, after, n).await?)),
            Prepared::Wrappers(w) => Ok(Rows::Wrappers(w.fetch(c, after, n).await?)),
            Prepared::Signatures(s) => Ok(Rows::Signatures(s.fetch(c, after, n).await?)),
        }
    }

    /// The CPU part of a batch, on a blocking thread.
    pub async fn compute(&self, rows: Rows) -> Result<Computed, JobError> {
        match (self, rows) {
            (Prepared::Hashes(h), Rows::Hashes(r)) => {
                Ok(Computed::Hashes(h.compute_off_thread(r).await?))
            }
            (Prepared::Wrappers(w), Rows::Wrappers(r)) => {
                Ok(Computed::Wrappers(w.compute_off_thread(r).await?))
            }
            (Prepared::Signatures(s), Rows::Signatures(r)) => {
                Ok(Computed::Signatures(s.compute_off_thread(r).await?))
            }
            _ => unreachable!("rows come from the same scope"),
        }
    }

    /// Write a computed batch inside the caller's transaction.
    pub async fn write(
        &self,
        tx: &impl tokio_postgres::GenericClient,
        job_id: i64,
        computed: Computed,
    ) -> Result<(BatchCounts, Vec<ItemFailure>), JobError> {
        match (self, computed) {
            (Prepared::Hashes(h), Computed::Hashes(c)) => h.write(tx, job_id, c).await,
            (Prepared::Wrappers(w), Computed::Wrappers(c)) => w.write(tx, job_id, c).await,
            (Prepared::Signatures(s), Computed::Signatures(c)) => s.write(tx, job_id, c).await,
            _ => unreachable!("computed by the same scope"),
        }
    }

    /// What the job's `result` must record before its first batch (see
    /// [`hashes::ProfilePin`]), if anything.
    pub fn pin_to_record(&self) -> Option<serde_json::Value> {
        match self {
            Prepared::Hashes(h) => h.pin_to_record(),
            Prepared::Wrappers(w) => w.pin_to_record(),
            Prepared::Signatures(_) => None,
        }
    }

    /// In the transaction that marks the job `done`.
    pub async fn on_done(
        &self,
        tx: &impl tokio_postgres::GenericClient,
        job_id: i64,
    ) -> Result<(), JobError> {
        match self {
            Prepared::Hashes(h) => h.on_done(tx, job_id).await,
            Prepared::Wrappers(_) | Prepared::Signatures(_) => Ok(()),
        }
    }
}
