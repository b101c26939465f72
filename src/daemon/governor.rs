//! The governor: every `throttle.check_interval` it reads the database's
//! health (replication lag, oldest open transaction, WAL rate) and the
//! number of ranges being walked, and publishes a [`Brake`] that every walk
//! of this process reads between batches: a reason to wait, and this
//! process's per-walk share of the global items budget. A reason holds
//! until its measure falls below 80% of its threshold, so a value hovering
//! at the threshold does not flap. Each change is logged once per process
//! and shown in `pqmig_throttle_active{reason}`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::{ServiceError, Shared, jitter};
use crate::db::{health, ranges};
use crate::metrics::THROTTLE_REASONS;

/// Below this fraction of its threshold a reason is lifted.
const RESUME_AT: f64 = 0.8;

/// What the walks of this process are told between batches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Brake {
    /// Why batches wait now (one of [`THROTTLE_REASONS`]), if they do.
    pub reason: Option<&'static str>,
    /// The global items/s budget, if one is set.
    pub items_budget: Option<f64>,
    /// Ranges being walked by every replica at the last check.
    pub walking: i64,
}

impl Brake {
    /// Items per second one walk may do: the budget divided by the ranges
    /// being walked, counting at least the `local` walks of this process
    /// (known at once, where the global count is as of the last check).
    pub fn items_share(&self, local: usize) -> Option<f64> {
        let walks = self.walking.max(local as i64).max(1);
        self.items_budget.map(|b| b / walks as f64)
    }
}

pub struct Governor {
    pub shared: Arc<Shared>,
    /// The WAL position at the last check, for the rate.
    last_wal: Mutex<Option<(i64, Instant)>>,
    /// `pqmig_throttled_seconds_total{reason="items_budget"}` at the last
    /// check: walks waited for the budget since when it grew.
    last_budget_wait: Mutex<f64>,
    /// Said once: the lag check cannot see the standbys.
    warned_hidden: std::sync::atomic::AtomicBool,
}

impl Governor {
    pub fn new(shared: Arc<Shared>) -> Governor {
        Governor {
            shared,
            last_wal: Mutex::new(None),
            last_budget_wait: Mutex::new(0.0),
            warned_hidden: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// One check: read, decide, publish. Returns the brake now in force.
    pub async fn run_once(&self) -> Result<Brake, ServiceError> {
        let t = &self.shared.throttle;
        let health_checked = t.max_replication_lag_bytes.is_some()
            || t.max_transaction_age.is_some()
            || t.max_wal_bytes_per_second.is_some();
        let client = self.shared.client().await?;
        let reading = if health_checked {
            health::health_read(&**client).await?
        } else {
            health::Reading::default()
        };
        let walking = match t.max_items_per_second {
            Some(_) => ranges::ranges_running(&**client).await?,
            None => 0,
        };
        drop(client);
        if reading.replication_hidden
            && t.max_replication_lag_bytes.is_some()
            && !self
                .warned_hidden
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "standbys are connected but this role cannot see their replay positions; replication lag is not checked (grant pg_monitor)"
            );
        }
        let current = self.shared.brake.borrow().reason;
        let (reason, detail) = self.decide(&reading, current);
        let brake = Brake {
            reason,
            items_budget: t.max_items_per_second,
            walking,
        };
        self.publish(brake, current, &detail);
        Ok(brake)
    }

    /// The first reason (in [`THROTTLE_REASONS`] order) whose measure is
    /// over its threshold, or still over [`RESUME_AT`] of it when it is the
    /// reason in force; with a line saying what was measured.
    fn decide(
        &self,
        r: &health::Reading,
        current: Option<&'static str>,
    ) -> (Option<&'static str>, String) {
        let t = &self.shared.throttle;
        let wal_rate = {
            let mut last = self.last_wal.lock().expect("wal");
            let now = Instant::now();
            let rate = match (*last, r.wal_bytes) {
                (Some((b0, t0)), Some(b1)) if now > t0 => {
                    Some((b1 - b0).max(0) as f64 / (now - t0).as_secs_f64())
                }
                _ => None,
            };
            *last = r.wal_bytes.map(|b| (b, now));
            rate
        };
        let checks: [(&'static str, Option<f64>, Option<f64>, &str); 3] = [
            (
                "replication_lag",
                r.replication_lag_bytes.map(|b| b as f64),
                t.max_replication_lag_bytes.map(|b| b as f64),
                "bytes",
            ),
            (
                "transaction_age",
                r.oldest_transaction_seconds,
                t.max_transaction_age.map(|d| d.as_secs_f64()),
                "s",
            ),
            (
                "wal_rate",
                wal_rate,
                t.max_wal_bytes_per_second.map(|b| b as f64),
                "bytes/s",
            ),
        ];
        for (reason, value, limit, unit) in checks {
            let (Some(value), Some(limit)) = (value, limit) else {
                continue;
            };
            let over = if current == Some(reason) {
                value > limit * RESUME_AT
            } else {
                value > limit
            };
            if over {
                return (
                    Some(reason),
                    format!("{reason} {value:.0} {unit} over the limit {limit:.0} {unit}"),
                );
            }
        }
        (None, String::new())
    }

    /// Tell the walks, set the gauges, log a change.
    fn publish(&self, brake: Brake, before: Option<&'static str>, detail: &str) {
        self.shared.brake.send_if_modified(|b| {
            let changed = *b != brake;
            *b = brake;
            changed
        });
        let m = &self.shared.metrics;
        let budget_waited = m
            .throttled_seconds
            .with_label_values(&["items_budget"])
            .get();
        let budget_active = {
            let mut last = self.last_budget_wait.lock().expect("budget");
            let grew = budget_waited > *last;
            *last = budget_waited;
            grew
        };
        for reason in THROTTLE_REASONS {
            let active =
                brake.reason == Some(*reason) || (*reason == "items_budget" && budget_active);
            m.throttle_active
                .with_label_values(&[reason])
                .set(i64::from(active));
        }
        match (before, brake.reason) {
            (None, Some(_)) => tracing::warn!(detail, "throttling: batches wait for the database"),
            (Some(old), Some(new)) if old != new => {
                tracing::warn!(detail, previous = old, "throttling for another reason")
            }
            (Some(old), None) => tracing::info!(reason = old, "throttle lifted: batches resume"),
            _ => {}
        }
    }

    pub async fn run(self, token: CancellationToken) {
        loop {
            if let Err(e) = self.run_once().await {
                tracing::warn!(error = %e, "checking the database's health failed; the last decision holds");
            }
            tokio::select! {
                _ = tokio::time::sleep(jitter(self.shared.throttle.check_interval, 0.1)) => {}
                _ = token.cancelled() => return,
            }
        }
    }
}
