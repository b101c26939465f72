//! `pqmig plan`: what a job would do, without queueing it: how many items
//! it matches, how much the stored data grows, and how long the crypto
//! takes, measured on a sample of real items. Nothing is written.

use std::time::Instant;

use serde::Serialize;

use super::UsageError;
use super::enqueue::JobRequest;
use crate::config::Config;
use crate::scope::ScopeContext;

/// Items the dry run computes at most.
const SAMPLE: i64 = 50;

/// The `--json` document (stable keys).
#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub scope: String,
    /// Items the selection matches (before skipping those already done).
    pub matched: i64,
    /// `matched` is the planner's estimate: the exact count did not finish
    /// within `database.statement_timeout` (a large table).
    pub matched_estimated: bool,
    /// Items of the sample, and what the job would do with them.
    pub sampled: i64,
    pub sample_migrate: i64,
    pub sample_skip: i64,
    pub sample_fail: i64,
    /// Bytes a migrated item adds to the database (new values minus the
    /// ones they replace, including replaced layer rows; negative when a
    /// re-wrap drops layers; backups not included), from the sample.
    pub bytes_per_item: Option<f64>,
    pub estimated_growth_bytes: Option<f64>,
    /// Items/s of the computation alone (all cores), from the sample.
    pub crypto_items_per_second: Option<f64>,
    /// matched / that rate: a lower bound, the database adds to it.
    pub estimated_crypto_seconds: Option<f64>,
}

pub async fn run(config: &Config, args: &JobRequest, json: bool) -> anyhow::Result<()> {
    let client = &super::connect(config).await?;
    let (_, spec) = super::enqueue::resolve(client, args).await?;
    if config.keyring.is_none() {
        return Err(UsageError(
            "plan runs the job's crypto on a sample and needs the keyring (keys.keyring or PQMIG_KEYRING)"
                .into(),
        )
        .into());
    }
    let ctx = ScopeContext::of(config);
    let job = spec
        .scope
        .prepare(client, &spec, &ctx)
        .await
        .map_err(super::enqueue::would_fail)?;
    let cap = job.common().limit.unwrap_or(i64::MAX);
    let err = |e: crate::scope::JobError| anyhow::anyhow!("{e}");
    let (matched, matched_estimated) = match job.count(client, i64::MIN, cap).await {
        Ok(n) => (n, false),
        Err(crate::scope::JobError::TooSlow(_)) => {
            let n = match job.id_bounds(client).await.map_err(err)? {
                Some((lo, hi)) => job
                    .estimate(client, lo.saturating_sub(1), hi)
                    .await
                    .map_err(err)?,
                None => 0,
            };
            (n.min(cap), true)
        }
        Err(e) => return Err(err(e)),
    };
    let rows = job
        .fetch(client, i64::MIN, i64::MAX, SAMPLE.min(cap))
        .await
        .map_err(err)?;
    let sampled = rows.len;
    let t = Instant::now();
    let computed = job.compute(rows).await.map_err(err)?;
    let secs = t.elapsed().as_secs_f64();
    let crate::scope::Outcome {
        write: migrate,
        skip,
        fail,
    } = computed.outcome;
    let bytes_per_item = (migrate > 0).then(|| computed.growth_bytes as f64 / migrate as f64);
    let rate = (sampled > 0).then(|| sampled as f64 / secs.max(1e-6));
    let report = PlanReport {
        scope: spec.scope.to_string(),
        matched,
        matched_estimated,
        sampled,
        sample_migrate: migrate,
        sample_skip: skip,
        sample_fail: fail,
        estimated_growth_bytes: bytes_per_item
            .map(|b| b * matched as f64 * migrate as f64 / sampled.max(1) as f64),
        bytes_per_item,
        crypto_items_per_second: rate,
        estimated_crypto_seconds: rate.map(|r| matched as f64 / r),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "plan for a {} job (nothing queued, nothing written):",
        report.scope
    );
    if report.matched_estimated {
        println!(
            "  matched items      ~{} (planner estimate: the exact count exceeded database.statement_timeout)",
            report.matched
        );
    } else {
        println!("  matched items      {}", report.matched);
    }
    println!(
        "  sample             {} items: {} to migrate, {} already done, {} would fail",
        report.sampled, migrate, skip, fail
    );
    match report.bytes_per_item {
        Some(b) => println!(
            "  storage growth     {b:.0} bytes per migrated item, about {} in all (plus backups until purged)",
            human_bytes(report.estimated_growth_bytes.unwrap_or(0.0))
        ),
        None => println!("  storage growth     none in the sample"),
    }
    match (
        report.crypto_items_per_second,
        report.estimated_crypto_seconds,
    ) {
        (Some(r), Some(s)) => println!(
            "  estimated time     {} of crypto at {r:.0} items/s on this machine; database writes add to it",
            super::status::short_duration(s)
        ),
        _ => println!("  estimated time     no items to sample"),
    }
    Ok(())
}

/// `1.5 MB`; negative when a re-wrap to fewer layers frees space.
fn human_bytes(b: f64) -> String {
    let sign = if b < 0.0 { "-" } else { "" };
    match b.abs() {
        a if a >= 1e9 => format!("{sign}{:.1} GB", a / 1e9),
        a if a >= 1e6 => format!("{sign}{:.1} MB", a / 1e6),
        a if a >= 1e3 => format!("{sign}{:.1} kB", a / 1e3),
        a => format!("{sign}{a:.0} B"),
    }
}
