//! Prometheus metrics (SPEC §8.3), on a registry of our own that the HTTP
//! listener serves. Labels are bounded: scope, status, kind, state,
//! algorithm — never a job or item id. Known label values start at 0 so
//! dashboards and `increase()` see a series from the first scrape.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub const SCOPES: &[&str] = &["wrappers", "signatures", "hashes"];
pub const FINISH_STATUSES: &[&str] = &["done", "failed", "released", "lost"];
pub const FAILURE_KINDS: &[&str] = &["integrity", "data", "other"];
pub const QUEUE_STATUSES: &[&str] = &["pending", "running", "done", "failed", "cancelled"];
/// Why batches wait (see `daemon::governor`).
pub const THROTTLE_REASONS: &[&str] = &[
    "replication_lag",
    "transaction_age",
    "wal_rate",
    "items_budget",
];

pub struct Metrics {
    pub registry: Registry,
    pub jobs_claimed: IntCounterVec,
    pub jobs_finished: IntCounterVec,
    pub items_processed: IntCounterVec,
    pub item_failures: IntCounterVec,
    pub batch_duration: HistogramVec,
    pub jobs_running: IntGaugeVec,
    pub worker_slots: IntGaugeVec,
    pub queue_jobs: IntGaugeVec,
    pub queue_oldest_pending_age: Gauge,
    pub leases_reclaimed: IntCounter,
    pub leases_lost: IntCounter,
    pub claim_duration: Histogram,
    pub db_pool_connections: IntGaugeVec,
    pub listener_connected: IntGauge,
    pub exposed_items: GaugeVec,
    pub inventory_last_success: Gauge,
    pub throttled_seconds: prometheus::CounterVec,
    pub throttle_active: IntGaugeVec,
    pub maintenance_deleted_jobs: IntCounter,
    pub job_duration: HistogramVec,
    pub job_wait: HistogramVec,
    pub batch_retries: IntCounterVec,
    pub heartbeat_failures: IntCounter,
    pub items_remaining: IntGaugeVec,
    pub attestations: IntCounterVec,
}

/// The failure kind label of an item error code.
pub fn failure_kind(code: &str) -> &'static str {
    match code {
        "integrity" => "integrity",
        "data" | "version_too_long" => "data",
        _ => "other",
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let m = Metrics {
            jobs_claimed: cv("pqmig_jobs_claimed_total", "Jobs claimed by this process.", &["scope"]),
            jobs_finished: cv(
                "pqmig_jobs_finished_total",
                "Jobs this process stopped working on, by how: done, failed, released (back to pending), lost (lease lost).",
                &["scope", "status"],
            ),
            items_processed: cv(
                "pqmig_items_processed_total",
                "Items migrated or skipped as already migrated.",
                &["scope"],
            ),
            item_failures: cv(
                "pqmig_item_failures_total",
                "Items that failed; kind integrity means existing data failed authentication.",
                &["scope", "kind"],
            ),
            batch_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new("pqmig_batch_duration_seconds", "Wall time of one committed batch.").buckets(
                        vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
                    ),
                    &["scope"],
                )
                .expect("valid metric"),
            ),
            jobs_running: gv("pqmig_jobs_running", "Jobs this process is working on.", &["scope"]),
            worker_slots: gv("pqmig_worker_slots", "Worker slots of this process by state.", &["state"]),
            queue_jobs: gv(
                "pqmig_queue_jobs",
                "Jobs in pq_migration_jobs by status (sampled).",
                &["status"],
            ),
            queue_oldest_pending_age: reg(
                r,
                Gauge::new(
                    "pqmig_queue_oldest_pending_age_seconds",
                    "Age of the oldest due pending job, 0 when none (sampled).",
                )
                .expect("valid metric"),
            ),
            leases_reclaimed: reg(
                r,
                IntCounter::new(
                    "pqmig_leases_reclaimed_total",
                    "Expired leases this process's rescuer returned to pending or failed.",
                )
                .expect("valid metric"),
            ),
            leases_lost: reg(
                r,
                IntCounter::new(
                    "pqmig_leases_lost_total",
                    "Jobs this process dropped because a fenced write found its lease gone.",
                )
                .expect("valid metric"),
            ),
            claim_duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("pqmig_claim_duration_seconds", "Latency of one claim statement.")
                        .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
                )
                .expect("valid metric"),
            ),
            db_pool_connections: gv(
                "pqmig_db_pool_connections",
                "Database pool connections by state: idle, in_use, max.",
                &["state"],
            ),
            listener_connected: reg(
                r,
                IntGauge::new(
                    "pqmig_listener_connected",
                    "1 while the LISTEN connection for wake-ups is up.",
                )
                .expect("valid metric"),
            ),
            exposed_items: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "pqmig_exposed_items",
                        "Items still protected only by quantum-vulnerable crypto, including classical copies kept in backups (sampled).",
                    ),
                    &["scope", "algorithm"],
                )
                .expect("valid metric"),
            ),
            inventory_last_success: reg(
                r,
                Gauge::new(
                    "pqmig_inventory_last_success_timestamp_seconds",
                    "When the exposure inventory this process exports was counted (Unix time; 0: never).",
                )
                .expect("valid metric"),
            ),
            throttled_seconds: reg(
                r,
                prometheus::CounterVec::new(
                    Opts::new(
                        "pqmig_throttled_seconds_total",
                        "Seconds this process's batches waited for the database's health or the items budget, by reason.",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            throttle_active: gv(
                "pqmig_throttle_active",
                "1 while this process holds its batches back for this reason.",
                &["reason"],
            ),
            maintenance_deleted_jobs: reg(
                r,
                IntCounter::new(
                    "pqmig_maintenance_deleted_jobs_total",
                    "Finished jobs past the retention this process deleted.",
                )
                .expect("valid metric"),
            ),
            job_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pqmig_job_duration_seconds",
                        "From a job's first claim to its end, for the jobs this process ended, by how they ended.",
                    )
                    .buckets(vec![1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 12.0 * 3600.0, 86400.0, 7.0 * 86400.0]),
                    &["scope", "status"],
                )
                .expect("valid metric"),
            ),
            job_wait: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pqmig_job_wait_seconds",
                        "From when a job was due (queued, re-queued or its scheduled_at) to its claim by this process.",
                    )
                    .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 3600.0]),
                    &["scope"],
                )
                .expect("valid metric"),
            ),
            batch_retries: cv(
                "pqmig_batch_retries_total",
                "Statements of a job retried by this process, by reason: too_slow (a server timeout, retried smaller) or transient (connection, serialization, deadlock: retried after a backoff).",
                &["reason"],
            ),
            heartbeat_failures: reg(
                r,
                IntCounter::new(
                    "pqmig_heartbeat_failures_total",
                    "Lease renewals that failed to reach the database (the lease is still held until it expires).",
                )
                .expect("valid metric"),
            ),
            attestations: cv(
                "pqmig_attestations_total",
                "Job attestations this process wrote to evidence.attest_dir when a job ended done (result written), or could not (failed: see the log).",
                &["result"],
            ),
            items_remaining: gv(
                "pqmig_items_remaining",
                "Items still to walk in pending and running jobs, by scope, from their (estimated) totals (sampled).",
                &["scope"],
            ),
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new("pqmig_build_info", "Build of this process (always 1)."),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        reg(&m.registry, build);
        let providers = crate::keys::meter::get();
        reg(&m.registry, providers.requests.clone());
        reg(&m.registry, providers.seconds.clone());
        let process = prometheus::process_collector::ProcessCollector::for_self();
        m.registry
            .register(Box::new(process))
            .expect("process collector");

        for scope in SCOPES {
            m.jobs_claimed.with_label_values(&[scope]);
            m.items_processed.with_label_values(&[scope]);
            m.batch_duration.with_label_values(&[scope]);
            m.jobs_running.with_label_values(&[scope]);
            m.job_wait.with_label_values(&[scope]);
            m.items_remaining.with_label_values(&[scope]);
            for status in ["done", "failed"] {
                m.job_duration.with_label_values(&[scope, status]);
            }
            for status in FINISH_STATUSES {
                m.jobs_finished.with_label_values(&[scope, status]);
            }
            for kind in FAILURE_KINDS {
                m.item_failures.with_label_values(&[scope, kind]);
            }
        }
        for status in QUEUE_STATUSES {
            m.queue_jobs.with_label_values(&[status]);
        }
        for reason in ["too_slow", "transient"] {
            m.batch_retries.with_label_values(&[reason]);
        }
        for state in ["busy", "free"] {
            m.worker_slots.with_label_values(&[state]);
        }
        for result in ["written", "failed"] {
            m.attestations.with_label_values(&[result]);
        }
        for state in ["idle", "in_use", "max"] {
            m.db_pool_connections.with_label_values(&[state]);
        }
        for reason in THROTTLE_REASONS {
            m.throttled_seconds.with_label_values(&[reason]);
            m.throttle_active.with_label_values(&[reason]);
        }
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    /// Label value for a scope name from the database (bounded: unknown
    /// scopes never reach a label).
    pub fn scope_label(scope: &str) -> &'static str {
        SCOPES
            .iter()
            .find(|s| **s == scope)
            .copied()
            .unwrap_or("other")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
