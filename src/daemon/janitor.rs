//! One replica at a time (a PostgreSQL advisory lock) deletes the finished
//! jobs older than `maintenance.retention`, with their events, item errors
//! and ranges, so the jobs table and the queries over it (`GROUP BY
//! status`, `pqmig status`) stay small. A job whose backups are not purged
//! is never deleted: they are the only way back.

use std::sync::Arc;

use deadpool_postgres::Object;
use tokio_util::sync::CancellationToken;

use super::{ServiceError, Shared, jitter};
use crate::db::maintenance::{self, Deleted};
use crate::db::{Failure, classify};

/// Jobs per delete statement (each its own transaction), so no statement
/// holds many row locks or runs long; halved while one is too slow.
pub const CHUNK_JOBS: i64 = 1_000;

pub struct Janitor {
    pub shared: Arc<Shared>,
}

impl Janitor {
    /// One round: `None` when another replica holds the maintenance lock,
    /// else what this round deleted.
    pub async fn run_once(&self) -> Result<Option<Deleted>, ServiceError> {
        let client = self.shared.client().await?;
        if !maintenance::maintenance_try_lock(&**client).await? {
            tracing::debug!("maintenance: another replica holds the lock");
            return Ok(None);
        }
        let lock = Locked(Some(client));
        let mut deleted = Deleted::default();
        // Empty backup partitions of expired jobs first: a job with a
        // partition is never deleted.
        let retention = self.shared.maintenance.retention;
        let mut result =
            match crate::db::backups::drop_empty_partitions(lock.client(), retention).await {
                Ok(0) => Ok(()),
                Ok(n) => {
                    tracing::info!(
                        partitions = n,
                        "dropped the empty backup partitions of expired jobs"
                    );
                    Ok(())
                }
                Err(e) => Err(e),
            };
        if result.is_ok() {
            result = self.delete_expired(&lock, &mut deleted).await;
        }
        lock.release().await;
        if deleted.jobs > 0 {
            tracing::info!(
                jobs = deleted.jobs,
                events = deleted.events,
                item_errors = deleted.item_errors,
                ranges = deleted.ranges,
                retention = %humantime::format_duration(self.shared.maintenance.retention),
                "deleted finished jobs past the retention"
            );
        }
        result?;
        Ok(Some(deleted))
    }

    /// Chunk after chunk in id order until one comes back short; `deleted`
    /// and the metric count each committed chunk, also when a later one
    /// fails.
    async fn delete_expired(
        &self,
        lock: &Locked,
        deleted: &mut Deleted,
    ) -> Result<(), tokio_postgres::Error> {
        let retention = self.shared.maintenance.retention;
        let (mut after_id, mut limit) = (0, CHUNK_JOBS);
        loop {
            match maintenance::jobs_delete_expired(lock.client(), retention, after_id, limit).await
            {
                Ok((chunk, last)) => {
                    *deleted += chunk;
                    self.shared
                        .metrics
                        .maintenance_deleted_jobs
                        .inc_by(chunk.jobs);
                    match last {
                        Some(id) if chunk.jobs == limit as u64 => after_id = id,
                        _ => return Ok(()),
                    }
                }
                // A job with a great many item errors: fewer jobs at once.
                Err(e) if limit > 1 && classify(&e) == Failure::TooSlow => {
                    limit = (limit / 2).max(1);
                    tracing::debug!(limit, "maintenance: a delete was too slow; smaller chunks");
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn run(self, token: CancellationToken) {
        loop {
            // Dropping a round mid-way is safe: its lock goes with its
            // connection (see Locked), the chunk in flight commits or not.
            tokio::select! {
                r = self.run_once() => if let Err(e) = r {
                    tracing::warn!(error = %e, "maintenance round failed");
                },
                _ = token.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(jitter(self.shared.maintenance.interval, 0.1)) => {}
                _ = token.cancelled() => return,
            }
        }
    }
}

/// A pooled connection whose session holds the maintenance lock. Released
/// by [`Locked::release`]; dropped without it (a round cancelled at
/// shutdown) or when the unlock fails, the connection is taken out of the
/// pool and closed, so the lock ends with its session instead of going
/// back to the pool held, which would keep every replica from maintenance
/// for as long as that connection lives.
struct Locked(Option<Object>);

impl Locked {
    fn client(&self) -> &tokio_postgres::Client {
        self.0.as_ref().expect("held until released")
    }

    async fn release(mut self) {
        let client = self.0.take().expect("held until released");
        match maintenance::maintenance_unlock(&**client).await {
            Ok(true) => drop(client),
            Ok(false) | Err(_) => drop(Object::take(client)),
        }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}
