//! The compare-and-set write every scope that rewrites rows shares, and
//! the parallel computation of a batch.

use std::sync::Arc;

use super::{BatchCounts, ItemFailure, JobError};

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
