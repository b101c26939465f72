//! Large tables (#19): a job split into id ranges that every replica
//! claims, bounded reads under a short `statement_timeout`, kills of range
//! holders, cancel/resume/verify/rollback of a split job, the rescuer's
//! grace after its own database trouble, and the governor's brakes.

mod big;
mod ranges;
mod throttle;

use crate::support::hashes::Fixture;

/// How many of the job's ranges are in each status.
pub async fn range_statuses(fx: &Fixture, job: i64) -> (i64, i64, i64) {
    let r = fx
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'pending'), \
                    count(*) FILTER (WHERE status = 'running'), \
                    count(*) FILTER (WHERE status = 'done') \
             FROM pq_migration_ranges WHERE job_id = $1",
            &[&job],
        )
        .await
        .expect("ranges");
    (r.get(0), r.get(1), r.get(2))
}

/// A series of a daemon's /metrics text, e.g.
/// `pqmig_throttle_active{reason="replication_lag"}`.
pub fn metric(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}
