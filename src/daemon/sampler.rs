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
        let inventory_due = last_inventory.is_none_or(|t| t.elapsed() >= INVENTORY_EVERY);
        match tokio::time::timeout(Duration::from_secs(4), sample(&shared, inventory_due)).await {
            Ok(Ok(())) => {
                shared.health.database_ok.store(true, Ordering::Relaxed);
                if inventory_due {
                    last_inventory = Some(Instant::now());
                }
            }
            Ok(Err(e)) => {
                shared.health.database_ok.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "sampling the database failed");
            }
            Err(_) => {
                shared.health.database_ok.store(false, Ordering::Relaxed);
                tracing::warn!("sampling the database timed out");
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

async fn sample(shared: &Shared, with_inventory: bool) -> Result<(), String> {
    let client = shared
        .pool
        .get()
        .await
        .map_err(|e| crate::db::error_chain(&e))?;
    let schema_ok = migrate::check_current(&client).await.is_ok();
    shared.health.schema_ok.store(schema_ok, Ordering::Relaxed);
    let (by_status, age) = inventory::queue_sample(&**client)
        .await
        .map_err(|e| crate::db::error_chain(&e))?;
    let m = &shared.metrics;
    for status in crate::metrics::QUEUE_STATUSES {
        let n = by_status
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        m.queue_jobs.with_label_values(&[status]).set(n);
    }
    m.queue_oldest_pending_age.set(age);
    if with_inventory {
        let exposed = inventory::exposed_items(&**client)
            .await
            .map_err(|e| crate::db::error_chain(&e))?;
        m.exposed_items.reset();
        for e in exposed {
            m.exposed_items
                .with_label_values(&[e.scope, e.algorithm.as_str()])
                .set(e.items as f64);
        }
    }
    Ok(())
}
