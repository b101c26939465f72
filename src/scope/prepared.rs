//! [`Prepared`]: a job of any scope behind one type, so the executor,
//! `plan` and `bench` hold one without knowing which scope it is. Each
//! batch's rows and computed values travel as opaque values that only the
//! scope that made them opens.

use std::any::Any;

use serde_json::Value;
use tokio_postgres::{Client, Transaction};

use super::{BatchCounts, BoxFuture, ItemFailure, JobError, Outcome, Scope};
use crate::selection::Common;

/// The items of one batch as read, before any computation.
pub struct Rows {
    /// How many items.
    pub len: i64,
    /// The id of the last (the next keyset cursor).
    pub last: Option<i64>,
    items: Box<dyn Any + Send>,
}

/// The new values of one batch, ready to be written.
pub struct Computed {
    pub outcome: Outcome,
    /// See [`Scope::growth_bytes`].
    pub growth_bytes: i64,
    values: Box<dyn Any + Send>,
}

/// The object-safe face of [`Scope`].
trait Erased: Send + Sync {
    fn common(&self) -> &Common;
    fn item_bytes(&self) -> i64;
    fn pin_to_record(&self) -> Option<Value>;
    fn preflight<'a>(&'a self, c: &'a mut Client) -> BoxFuture<'a, Result<(), JobError>>;
    fn count<'a>(
        &'a self,
        c: &'a Client,
        after: i64,
        cap: i64,
    ) -> BoxFuture<'a, Result<i64, JobError>>;
    fn id_bounds<'a>(
        &'a self,
        c: &'a Client,
    ) -> BoxFuture<'a, Result<Option<(i64, i64)>, JobError>>;
    fn estimate<'a>(
        &'a self,
        c: &'a Client,
        lo: i64,
        hi: i64,
    ) -> BoxFuture<'a, Result<i64, JobError>>;
    fn fetch<'a>(
        &'a self,
        c: &'a Client,
        after: i64,
        upto: i64,
        n: i64,
    ) -> BoxFuture<'a, Result<Rows, JobError>>;
    fn compute(&self, rows: Rows) -> BoxFuture<'_, Result<Computed, JobError>>;
    fn write<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        job_id: i64,
        c: Computed,
    ) -> BoxFuture<'a, Result<(BatchCounts, Vec<ItemFailure>), JobError>>;
    fn on_done<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        job_id: i64,
    ) -> BoxFuture<'a, Result<(), JobError>>;
}

impl<S: Scope> Erased for S {
    fn common(&self) -> &Common {
        Scope::common(self)
    }

    fn item_bytes(&self) -> i64 {
        Scope::item_bytes(self)
    }

    fn pin_to_record(&self) -> Option<Value> {
        Scope::pin_to_record(self)
    }

    fn preflight<'a>(&'a self, c: &'a mut Client) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(Scope::preflight(self, c))
    }

    fn count<'a>(
        &'a self,
        c: &'a Client,
        after: i64,
        cap: i64,
    ) -> BoxFuture<'a, Result<i64, JobError>> {
        Box::pin(Scope::count(self, c, after, cap))
    }

    fn id_bounds<'a>(
        &'a self,
        c: &'a Client,
    ) -> BoxFuture<'a, Result<Option<(i64, i64)>, JobError>> {
        Box::pin(Scope::id_bounds(self, c))
    }

    fn estimate<'a>(
        &'a self,
        c: &'a Client,
        lo: i64,
        hi: i64,
    ) -> BoxFuture<'a, Result<i64, JobError>> {
        Box::pin(Scope::estimate(self, c, lo, hi))
    }

    fn fetch<'a>(
        &'a self,
        c: &'a Client,
        after: i64,
        upto: i64,
        n: i64,
    ) -> BoxFuture<'a, Result<Rows, JobError>> {
        Box::pin(async move {
            let rows = Scope::fetch(self, c, after, upto, n).await?;
            Ok(Rows {
                len: rows.len() as i64,
                last: rows.last().map(S::row_id),
                items: Box::new(rows),
            })
        })
    }

    fn compute(&self, rows: Rows) -> BoxFuture<'_, Result<Computed, JobError>> {
        Box::pin(async move {
            let rows = *rows
                .items
                .downcast::<Vec<S::Row>>()
                .expect("rows read by the same scope");
            let c = Scope::compute(self, rows).await?;
            Ok(Computed {
                outcome: S::outcome(&c),
                growth_bytes: S::growth_bytes(&c),
                values: Box::new(c),
            })
        })
    }

    fn write<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        job_id: i64,
        c: Computed,
    ) -> BoxFuture<'a, Result<(BatchCounts, Vec<ItemFailure>), JobError>> {
        let c = *c
            .values
            .downcast::<S::Computed>()
            .expect("computed by the same scope");
        Box::pin(Scope::write(self, tx, job_id, c))
    }

    fn on_done<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        job_id: i64,
    ) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(Scope::on_done(self, tx, job_id))
    }
}

/// A validated job of some scope, its keys loaded; see [`Scope`].
pub struct Prepared(Box<dyn Erased>);

impl Prepared {
    pub(super) fn new(scope: impl Scope) -> Prepared {
        Prepared(Box::new(scope))
    }

    pub fn common(&self) -> &Common {
        self.0.common()
    }

    /// What the job's `result` must record before its first batch.
    pub fn pin_to_record(&self) -> Option<Value> {
        self.0.pin_to_record()
    }

    /// The largest batch adaptive sizing may reach, so the memory a batch
    /// holds stays bounded whatever the job's size: about 3 MiB of new
    /// values per batch (two batches are in flight). README's Benchmarks
    /// give the measured trade-off.
    pub fn max_batch(&self) -> i64 {
        const BATCH_BYTES: i64 = 3 << 20;
        (BATCH_BYTES / self.0.item_bytes().max(1)).clamp(100, 10_000)
    }

    /// See [`Scope::preflight`].
    pub async fn preflight(&self, c: &mut Client) -> Result<(), JobError> {
        self.0.preflight(c).await
    }

    /// Items after `after` in the selection, at most `cap`.
    pub async fn count(&self, c: &Client, after: i64, cap: i64) -> Result<i64, JobError> {
        self.0.count(c, after, cap).await
    }

    /// See [`Scope::id_bounds`].
    pub async fn id_bounds(&self, c: &Client) -> Result<Option<(i64, i64)>, JobError> {
        self.0.id_bounds(c).await
    }

    /// See [`Scope::estimate`].
    pub async fn estimate(&self, c: &Client, lo: i64, hi: i64) -> Result<i64, JobError> {
        self.0.estimate(c, lo, hi).await
    }

    /// The first `n` selected items with `after < id <= upto`, in id order.
    pub async fn fetch(&self, c: &Client, after: i64, upto: i64, n: i64) -> Result<Rows, JobError> {
        self.0.fetch(c, after, upto, n).await
    }

    /// The CPU part of a batch, off the async executor.
    pub async fn compute(&self, rows: Rows) -> Result<Computed, JobError> {
        self.0.compute(rows).await
    }

    /// Write a computed batch inside the caller's transaction.
    pub async fn write(
        &self,
        tx: &Transaction<'_>,
        job_id: i64,
        computed: Computed,
    ) -> Result<(BatchCounts, Vec<ItemFailure>), JobError> {
        self.0.write(tx, job_id, computed).await
    }

    /// In the transaction that marks the job `done`.
    pub async fn on_done(&self, tx: &Transaction<'_>, job_id: i64) -> Result<(), JobError> {
        self.0.on_done(tx, job_id).await
    }
}
