//! Samples the gauges that need a query (queue depth, oldest pending age,
//! schema version, the exposure inventory) at a bounded rate, so a scrape
//! never queries the database; its success also feeds `/readyz`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{ServiceError, Shared, jitter};
use crate::db::{inventory, migrate};

/// Queue and readiness sampling period.
pub const QUEUE_EVERY: Duration = Duration::from_secs(5);
/// The inventory walks the item tables: far less often.
pub const INVENTORY_EVERY: Duration = Duration::from_secs(60);

pub struct Sampler {
    pub shared: Arc<Shared>,
}

impl Sampler {
    pub async fn run(self, token: CancellationToken) {
        let mut last_inventory: Option<Instant> = None;
        loop {
            let inventory = last_inventory.is_none_or(|t| t.elapsed() >= INVENTORY_EVERY);
            if inventory {
                last_inventory = Some(Instant::now());
            }
            self.run_once(inventory).await;
            tokio::select! {
                _ = tokio::time::sleep(jitter(QUEUE_EVERY, 0.1)) => {}
                _ = token.cancelled() => return,
            }
        }
    }

    /// One round: queue and readiness, the pool gauges, and the inventory
    /// when asked. Failures are logged (and the database marked
    /// unreachable when the queue sample fails); the inventory's scan
    /// failing never marks the database unreachable.
    pub async fn run_once(&self, inventory: bool) {
        let shared = &self.shared;
        match self.sample_queue().await {
            Ok(()) => shared.health.database_ok.store(true, Ordering::Relaxed),
            Err(e) => {
                shared.health.database_ok.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "sampling the database failed");
            }
        }
        if inventory && let Err(e) = self.sample_inventory().await {
            tracing::warn!(error = %e, "sampling the exposure inventory failed");
        }
        self.pool_gauges();
    }

    fn pool_gauges(&self) {
        let status = self.shared.pool.status();
        let g = &self.shared.metrics.db_pool_connections;
        g.with_label_values(&["idle"]).set(status.available as i64);
        g.with_label_values(&["in_use"])
            .set(status.size.saturating_sub(status.available) as i64);
        g.with_label_values(&["max"]).set(status.max_size as i64);
    }

    /// Schema version and queue depth; the server cancels it after 3 s.
    async fn sample_queue(&self) -> Result<(), ServiceError> {
        let shared = &self.shared;
        let mut client = shared.client().await?;
        let tx = client.transaction().await?;
        crate::db::local_statement_timeout(&tx, Duration::from_secs(3)).await?;
        let schema_ok = migrate::check_current(&*tx).await.is_ok();
        shared.health.schema_ok.store(schema_ok, Ordering::Relaxed);
        let (by_status, age) = inventory::queue_sample(&*tx).await?;
        tx.commit().await?;
        let m = &shared.metrics;
        for status in crate::metrics::QUEUE_STATUSES {
            let n = by_status
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            m.queue_jobs.with_label_values(&[status]).set(n);
        }
        m.queue_oldest_pending_age.set(age);
        Ok(())
    }

    /// The exposure inventory, counted in bounded statements.
    async fn sample_inventory(&self) -> Result<(), ServiceError> {
        let client = self.shared.client().await?;
        let counted = inventory::inventory_count(&**client, inventory::SLICE_IDS).await?;
        drop(client);
        let m = &self.shared.metrics;
        m.exposed_items.reset();
        for e in counted.inventory.vulnerable {
            m.exposed_items
                .with_label_values(&[e.scope.as_str(), e.algorithm.as_str()])
                .set(e.items as f64);
        }
        Ok(())
    }
}
