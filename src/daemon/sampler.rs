//! Samples the gauges that need a query (queue depth, oldest pending age,
//! schema version, the exposure inventory) at a bounded rate, so a scrape
//! never queries the database; its success also feeds `/readyz`. One
//! replica at a time counts the inventory for all.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{ServiceError, Shared, jitter};
use crate::db::inventory::{self, Inventory, Snapshot};
use crate::db::lock::SessionLock;
use crate::db::migrate;

/// Queue, readiness and inventory-gauge sampling period.
pub const QUEUE_EVERY: Duration = Duration::from_secs(5);

/// The sampler of one replica.
///
/// Every round (every [`QUEUE_EVERY`]) it reads the queue and the newest
/// inventory snapshot: cheap, on every replica. Beside the rounds, the
/// counting pass ([`Sampler::count_once`]) walks the item tables; it runs
/// on the one replica holding the advisory lock
/// [`inventory::INVENTORY_LOCK_KEY`], at most once per `inventory.interval`
/// judged from the newest snapshot, so restarts and added replicas do not
/// count more often.
pub struct Sampler {
    pub shared: Arc<Shared>,
    /// `inventory.interval`.
    pub inventory_interval: Duration,
    /// The `pqmig_exposed_items` label pairs last exported, so lines gone
    /// from a newer snapshot are removed without resetting the others.
    exported: Mutex<Vec<(String, String)>>,
}

/// What a call of [`Sampler::count_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountOutcome {
    /// A snapshot is newer than `inventory.interval`.
    NotDue,
    /// Another replica holds the lock (and is counting).
    Busy,
    /// This replica counted and wrote a snapshot.
    Counted { statements: u64 },
}

impl Sampler {
    pub fn new(shared: Arc<Shared>, inventory_interval: Duration) -> Sampler {
        Sampler {
            shared,
            inventory_interval,
            exported: Mutex::new(Vec::new()),
        }
    }

    pub async fn run(self, token: CancellationToken) {
        let rounds = async {
            loop {
                self.run_once().await;
                tokio::time::sleep(jitter(QUEUE_EVERY, 0.1)).await;
            }
        };
        // A pass over large tables takes minutes: it runs beside the rounds,
        // which keep the queue gauges and readiness fresh meanwhile.
        let counting = async {
            let every = QUEUE_EVERY.min(self.inventory_interval);
            loop {
                self.count_logged().await;
                tokio::time::sleep(jitter(every, 0.1)).await;
            }
        };
        // Dropping a pass mid-way closes its connection, releasing the lock.
        tokio::select! {
            _ = async { tokio::join!(rounds, counting) } => {}
            _ = token.cancelled() => {}
        }
    }

    /// One round: queue and readiness, the inventory gauges from the newest
    /// snapshot, and the pool gauges. Failures are logged (and the database
    /// marked unreachable when the queue sample fails); reading the
    /// snapshot failing never marks the database unreachable.
    pub async fn run_once(&self) {
        let shared = &self.shared;
        match self.sample_queue().await {
            Ok(()) => shared.health.database_ok.store(true, Ordering::Relaxed),
            Err(e) => {
                shared.health.database_ok.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "sampling the database failed");
            }
        }
        if let Err(e) = self.export_inventory().await {
            tracing::warn!(error = %e, "reading the exposure inventory failed");
        }
        self.pool_gauges();
    }

    /// The counting pass, if it is due and this replica gets the lock: the
    /// item tables walked in bounded slices, then the snapshot written in
    /// one short transaction (older ones pruned) and exported at once.
    pub async fn count_once(&self) -> Result<CountOutcome, ServiceError> {
        let interval = self.inventory_interval;
        let client = self.shared.client().await?;
        if !inventory::inventory_due(&**client, interval).await? {
            return Ok(CountOutcome::NotDue);
        }
        let Some(mut lock) =
            SessionLock::try_acquire(client, inventory::INVENTORY_LOCK_KEY).await?
        else {
            return Ok(CountOutcome::Busy);
        };
        let counted = self.count_locked(&mut lock).await;
        let released = lock.release().await;
        let outcome = counted?;
        released?;
        if let CountOutcome::Counted { .. } = outcome {
            self.export_inventory().await?;
        }
        Ok(outcome)
    }

    async fn count_locked(&self, lock: &mut SessionLock) -> Result<CountOutcome, ServiceError> {
        // The previous holder may have written a snapshot since the check.
        if !inventory::inventory_due(&***lock.client(), self.inventory_interval).await? {
            return Ok(CountOutcome::NotDue);
        }
        let started = Instant::now();
        let counted = inventory::inventory_count(&***lock.client(), inventory::SLICE_IDS).await?;
        if !counted.not_counted.is_empty() {
            tracing::warn!(fields = ?counted.not_counted, "registered hash fields left out of the exposure inventory: their table has no integer id with a unique index to walk");
        }
        let tx = lock.client_mut().transaction().await?;
        inventory::inventory_insert(&*tx, &counted.inventory).await?;
        let pruned = inventory::inventory_prune(&*tx, inventory::KEEP_SNAPSHOTS).await?;
        tx.commit().await?;
        let elapsed = started.elapsed();
        if elapsed > self.inventory_interval {
            tracing::warn!(?elapsed, interval = ?self.inventory_interval, statements = counted.statements, "counting the exposure inventory took longer than inventory.interval; raise it");
        } else {
            tracing::info!(
                ?elapsed,
                statements = counted.statements,
                pruned,
                "counted the exposure inventory"
            );
        }
        Ok(CountOutcome::Counted {
            statements: counted.statements,
        })
    }

    /// [`Sampler::count_once`], logged: a failed pass never marks the
    /// database unreachable (the rounds judge that).
    async fn count_logged(&self) {
        if let Err(e) = self.count_once().await {
            tracing::warn!(error = %e, "counting the exposure inventory failed");
        }
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
        let q = inventory::queue_sample(&*tx).await?;
        tx.commit().await?;
        let m = &shared.metrics;
        for status in crate::metrics::QUEUE_STATUSES {
            let n = q
                .by_status
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            m.queue_jobs.with_label_values(&[status]).set(n);
        }
        m.queue_oldest_pending_age.set(q.oldest_pending_age);
        for scope in crate::metrics::SCOPES {
            let n = q
                .remaining
                .iter()
                .find(|(s, _)| s == scope)
                .map_or(0, |(_, n)| *n);
            m.items_remaining.with_label_values(&[scope]).set(n);
        }
        Ok(())
    }

    /// The newest snapshot into `pqmig_exposed_items` and its time into
    /// `pqmig_inventory_last_success_timestamp_seconds` (0: none yet).
    async fn export_inventory(&self) -> Result<(), ServiceError> {
        let client = self.shared.client().await?;
        let snapshot = inventory::inventory_latest(&**client).await?;
        drop(client);
        self.export(snapshot.as_ref());
        Ok(())
    }

    fn export(&self, snapshot: Option<&Snapshot>) {
        let m = &self.shared.metrics;
        let empty = Inventory::default();
        let inventory = snapshot.map_or(&empty, |s| &s.inventory);
        let now: Vec<(String, String)> = inventory
            .vulnerable
            .iter()
            .map(|e| (e.scope.clone(), e.algorithm.clone()))
            .collect();
        for e in &inventory.vulnerable {
            m.exposed_items
                .with_label_values(&[e.scope.as_str(), e.algorithm.as_str()])
                .set(e.items as f64);
        }
        let mut exported = self.exported.lock().expect("exported labels");
        for gone in exported.iter().filter(|l| !now.contains(l)) {
            let _ = m
                .exposed_items
                .remove_label_values(&[gone.0.as_str(), gone.1.as_str()]);
        }
        *exported = now;
        m.inventory_last_success
            .set(snapshot.map_or(0.0, |s| s.sampled_at_unix));
    }
}
