//! After a job: `pqmig verify JOB` re-checks every item the job migrated
//! with the key material, `pqmig rollback JOB` restores the backed-up
//! previous values, `pqmig purge-backups JOB` deletes the backups once the
//! job is done and verified. The scope's part of each is its
//! [`crate::scope::Aftercare`]; the rules around it live here.

use tokio_postgres::Client;

use super::UsageError;
use crate::config::Config;
use crate::db::{backups, jobs, status as dbs};
use crate::job::Purpose;
use crate::scope::{Aftercare, ScopeContext};

/// Rows per page of rollback.
const PAGE: i64 = 500;

/// Backups deleted per statement by `purge-backups`.
const PURGE_CHUNK: i64 = 10_000;

async fn job(client: &Client, id: i64) -> anyhow::Result<dbs::JobView> {
    dbs::job_get(client, id)
        .await?
        .ok_or_else(|| UsageError(format!("no job with id {id}")).into())
}

/// The job's status and `finished_at` now: the marks a command records
/// apply to exactly this state of the job.
async fn finish_state(client: &Client, id: i64) -> anyhow::Result<jobs::FinishState> {
    jobs::job_finish_state(client, id)
        .await?
        .ok_or_else(|| UsageError(format!("no job with id {id}")).into())
}

fn changed_meanwhile(job_id: i64) -> anyhow::Error {
    anyhow::anyhow!(
        "job {job_id} was resumed or finished again while this ran: nothing recorded; run it again"
    )
}

/// The scope's aftercare of a finished job (`keys`: with its key material).
async fn aftercare(
    config: &Config,
    client: &Client,
    job_id: i64,
    keys: bool,
) -> anyhow::Result<Box<dyn Aftercare>> {
    let spec = jobs::job_spec(client, job_id, Purpose::Aftercare)
        .await?
        .ok_or_else(|| UsageError(format!("no job with id {job_id}")))?
        .map_err(|e| UsageError(format!("job {job_id}: {e}")))?;
    if keys && config.keyring.is_none() && spec.scope.verify_needs_keyring() {
        return Err(UsageError(format!(
            "job {job_id}: verify of a {} job needs the keyring (keys.keyring or PQMIG_KEYRING)",
            spec.scope.as_str()
        ))
        .into());
    }
    let ctx = ScopeContext::of(config);
    spec.scope
        .aftercare(client, &spec, &ctx, keys)
        .await
        .map_err(|e| anyhow::anyhow!("job {job_id} cannot be checked: {e}"))
}

/// `pqmig verify JOB`.
pub async fn verify(config: &Config, job_id: i64) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let seen = finish_state(&client, job_id).await?;
    let j = job(&client, job_id).await?;
    if matches!(j.status.as_str(), "pending" | "running") {
        return Err(UsageError(format!(
            "job {job_id} is {}; verify it once it has finished",
            j.status
        ))
        .into());
    }
    // Rolled back (and not resumed since): what it wrote is undone, so
    // there is nothing to check; its backups now match the rows, and
    // purging them loses nothing, so the mark is recorded with 0 items.
    if let Some(r) = j.result.as_ref().and_then(|r| r.get("rolled_back")) {
        if !jobs::job_mark_verified(&client, job_id, 0, &seen).await? {
            return Err(changed_meanwhile(job_id));
        }
        println!(
            "job {job_id} was rolled back ({} items at {}): nothing it wrote is left to verify",
            r["items"], r["at"]
        );
        return Ok(());
    }
    let report = aftercare(config, &client, job_id, true)
        .await?
        .verify(&client, job_id)
        .await
        .map_err(|e| anyhow::anyhow!("job {job_id}: {e}"))?;
    if report.changed > 0 {
        println!(
            "job {job_id}: {} {}; not checked",
            report.changed, report.changed_note
        );
    }
    for (item, why) in report.mismatches.iter().take(20) {
        eprintln!("  item {item}: {why}");
    }
    if !report.mismatches.is_empty() {
        return Err(anyhow::anyhow!(
            "job {job_id}: {} of {} items failed verification (first ones listed above)",
            report.mismatches.len(),
            report.checked
        ));
    }
    // Backups and nothing checked: every item changed since (or the
    // checks looked in the wrong place). That is no verification.
    if report.checked == 0 && backups::exist(&client, job_id).await? {
        let backups = backups::count(&client, job_id).await?;
        return Err(anyhow::anyhow!(
            "job {job_id}: it has {backups} backups but none of its items could be checked (all changed since the job?): not verified"
        ));
    }
    if !jobs::job_mark_verified(&client, job_id, report.checked, &seen).await? {
        return Err(changed_meanwhile(job_id));
    }
    println!(
        "job {job_id}: {} items verified, all open to the same key material",
        report.checked
    );
    if let (Some(dir), "done") = (config.attest_dir.as_deref(), j.status.as_str()) {
        let keys = ScopeContext::of(config);
        match super::attest::attest_into(&client, &keys, dir, job_id).await {
            Ok(path) => println!("job {job_id}: attestation written to {}", path.display()),
            Err(e) => eprintln!("pqmig: job {job_id}: attestation not written: {e}"),
        }
    }
    Ok(())
}

/// `pqmig rollback JOB`.
pub async fn rollback(config: &Config, job_id: i64) -> anyhow::Result<()> {
    let mut client = super::connect(config).await?;
    let state = finish_state(&client, job_id).await?;
    let j = job(&client, job_id).await?;
    if matches!(j.status.as_str(), "pending" | "running") {
        return Err(UsageError(format!(
            "job {job_id} is {}: cancel it first (pqmig cancel {job_id}), then roll back",
            j.status
        ))
        .into());
    }
    let scope = aftercare(config, &client, job_id, false).await?;
    let (mut restored, mut seen, mut at) = (0i64, 0i64, Some(backups::Cursor::START));
    while let Some(here) = at {
        let tx = client.transaction().await?;
        let page = scope
            .rollback_page(&tx, job_id, here, PAGE)
            .await
            .map_err(|e| anyhow::anyhow!("job {job_id}: {e}"))?;
        tx.commit().await?;
        at = page.next;
        restored += page.restored;
        seen += page.seen;
    }
    if seen == 0 {
        println!("job {job_id} has no backups: nothing to roll back");
        return Ok(());
    }
    if restored > 0 {
        if !jobs::job_mark_rolled_back(&client, job_id, restored, &state).await? {
            return Err(changed_meanwhile(job_id));
        }
    } else if j
        .result
        .as_ref()
        .is_some_and(|r| r.get("rolled_back").is_some())
    {
        println!("job {job_id} was rolled back already: nothing left to restore");
        return Ok(());
    } else {
        return Err(anyhow::anyhow!(
            "job {job_id}: none of its {seen} backed-up items is as the job left it (changed since): nothing restored"
        ));
    }
    println!(
        "job {job_id}: restored {restored} of {seen} backed-up items to their previous values"
    );
    if restored < seen {
        println!(
            "  {} were left as they are: changed since the job (another job or the application rewrote them) or already rolled back",
            seen - restored
        );
    }
    Ok(())
}

/// `pqmig purge-backups JOB`: only for a `done` job verified since it last
/// finished; in statements of [`PURGE_CHUNK`] rows, with progress.
pub async fn purge_backups(config: &Config, job_id: i64) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let j = job(&client, job_id).await?;
    if j.status != "done" {
        return Err(UsageError(format!(
            "job {job_id} is {}: only the backups of a done, verified job are purged; they are the only way back",
            j.status
        ))
        .into());
    }
    if !jobs::job_verified_since_finish(&client, job_id).await? {
        return Err(UsageError(format!(
            "job {job_id} has not been verified since it last finished: run `pqmig verify {job_id}` first; its backups are the only way back"
        ))
        .into());
    }
    // Backups from before V7, one row each: deleted in chunks.
    let (mut deleted, mut shown) = (0i64, std::time::Instant::now());
    loop {
        let n = backups::legacy_purge_chunk(&client, job_id, PURGE_CHUNK).await? as i64;
        deleted += n;
        if n < PURGE_CHUNK {
            break;
        }
        if shown.elapsed() >= std::time::Duration::from_secs(1) {
            println!("job {job_id}: deleted {deleted} old-format backups so far");
            shown = std::time::Instant::now();
        }
    }
    // The job's partition: dropped whole whatever its size.
    let started = std::time::Instant::now();
    let mut dropped = None;
    for scope in crate::job::ScopeKind::ALL {
        let rows = backups::purge_partition(&client, scope, job_id)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "job {job_id}: dropping {}: {e} (run purge-backups again to finish)",
                    backups::partition(scope, job_id)
                )
            })?;
        if let Some(rows) = rows {
            dropped = Some((backups::partition(scope, job_id), rows));
        }
    }
    match dropped {
        None => println!("job {job_id}: deleted {deleted} backups"),
        Some((name, d)) => println!(
            "job {job_id}: deleted {}{} backups ({} by dropping {name}, in {:.2} s)",
            if d.exact { "" } else { "about " },
            deleted + d.backups,
            d.backups,
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(())
}
