//! Samples the gauges that need a query (queue depth, oldest pending age,
//! schema version, the exposure inventory) at a bounded rate, so a scrape
//! never queries the database; its success also feeds `/readyz`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Shared, jitter};
use crate::db::{inventory, migrate};

/// Queue and readiness sampling period.
pub const QUEUE_EVERY: Duration = Duration::from_secs(5);
/// The inventory scans item tables: far less often.
pub const INVENTORY_EVERY: Duration = Duration::from_secs(60);

pub async fn run(shared: Arc<Shared>, token: CancellationToken) {
    let mut last_inventory: Option<Instant> = None;
    loop {
        match sample_queue(&shared).await {
            Ok(()) => shared.health.database_ok.store(true, Ordering::Relaxed),
            Err(e) => {
                shared.health.database_ok.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "sampling the database failed");
            }
        }
        // The inventory scans item tables: a slow or failed scan is logged,
        // retried at its own pace, and never marks the database unreachable.
        if last_inventory.is_none_or(|t| t.elapsed() >= INVENTORY_EVERY) {
            last_inventory = Some(Instant::now());
            if let Err(e) = sample_inventory(&shared).await {
                tracing::warn!(error = %e, "sampling the exposure inventory failed");
            }
        }
        pool_gauges(&shared);
        tokio::select! {
            _ = tokio::time::sleep(jitter(QUEUE_EVERY, 0.1)) => {}
            _ = token.cancelled() => return,
        }
    }
}

fn pool_gauges(shared: &Shared) {
    let status = shared.pool.status();
    let g = &shared.metrics.db_pool_connections;
    g.with_label_values(&["idle"]).set(status.available as i64);
    g.with_label_values(&["in_use"])
        .set(status.size.saturating_sub(status.available) as i64);
    g.with_label_values(&["max"]).set(status.max_size as i64);
}

/// Schema version and queue depth; the server cancels it after 3 s.
async fn sample_queue(shared: &Shared) -> Result<(), String> {
    let err = |e: tokio_postgres::Error| crate::db::error_chain(&e);
    let mut client = shared.client().await?;
    let tx = client.transaction().await.map_err(err)?;
    crate::db::local_statement_timeout(&tx, Duration::from_secs(3))
        .await
        .map_err(err)?;
    let schema_ok = migrate::check_current(&*tx).await.is_ok();
    shared.health.schema_ok.store(schema_ok, Ordering::Relaxed);
    let (by_status, age) = inventory::queue_sample(&*tx).await.map_err(err)?;
    tx.commit().await.map_err(err)?;
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

/// The exposure inventory; the server cancels it after 30 s.
async fn sample_inventory(shared: &Shared) -> Result<(), String> {
    let err = |e: tokio_postgres::Error| crate::db::error_chain(&e);
    let mut client = shared.client().await?;
    let tx = client.transaction().await.map_err(err)?;
    crate::db::local_statement_timeout(&tx, Duration::from_secs(30))
        .await
        .map_err(err)?;
    let exposed = inventory::exposed_items(&*tx).await.map_err(err)?;
    tx.commit().await.map_err(err)?;
    let m = &shared.metrics;
    m.exposed_items.reset();
    for e in exposed {
        m.exposed_items
            .with_label_values(&[e.scope, e.algorithm.as_str()])
            .set(e.items as f64);
    }
    Ok(())
}
