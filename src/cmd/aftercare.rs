//! After a job: `pqmig verify JOB` re-checks every item the job migrated
//! with the key material, `pqmig rollback JOB` restores the backed-up
//! previous values, `pqmig purge-backups JOB` deletes the backups once the
//! job has been verified.

use std::sync::Arc;

use tokio_postgres::Client;

use super::UsageError;
use crate::config::Config;
use crate::db::{self, jobs, status as dbs, wrappers as dbw};
use crate::keys::LocalKeyring;

/// Rows per page of verify and rollback.
const PAGE: i64 = 500;

async fn job(client: &Client, id: i64) -> anyhow::Result<dbs::JobView> {
    dbs::job_get(client, id)
        .await?
        .ok_or_else(|| UsageError(format!("no job with id {id}")).into())
}

fn keyring(config: &Config) -> anyhow::Result<Arc<LocalKeyring>> {
    let path = config.keyring.as_ref().ok_or_else(|| {
        UsageError(
            "no keyring configured (keys.keyring or PQMIG_KEYRING): verify needs the keys".into(),
        )
    })?;
    Ok(Arc::new(LocalKeyring::load(path)?))
}

/// One item that did not verify.
struct Mismatch {
    item: i64,
    why: String,
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

/// `pqmig verify JOB`.
pub async fn verify(config: &Config, job_id: i64) -> anyhow::Result<()> {
    let client = db::connect(&config.database).await?;
    db::migrate::check_current(&client).await?;
    let seen = finish_state(&client, job_id).await?;
    let j = job(&client, job_id).await?;
    if matches!(j.status.as_str(), "pending" | "running") {
        return Err(UsageError(format!(
            "job {job_id} is {}; verify it once it has finished",
            j.status
        ))
        .into());
    }
    let (checked, bad) = match j.scope.as_str() {
        "wrappers" => {
            let (checked, changed, bad) =
                crate::scope::wrappers::verify_job(&client, keyring(config)?, job_id, PAGE)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            if changed > 0 {
                println!(
                    "job {job_id}: {changed} wrappers were rotated or deleted since the job (their DEK is no longer the backed-up one); not checked"
                );
            }
            let bad: Vec<Mismatch> = bad
                .into_iter()
                .map(|(item, why)| Mismatch { item, why })
                .collect();
            (checked, bad)
        }
        "hashes" => {
            let h = hashes_job(config, &client, job_id).await?;
            let (checked, changed, bad) = h.verify_job(&client, job_id).await?;
            if checked + changed == 0 && !h.common().backup {
                return Err(anyhow::anyhow!(
                    "job {job_id} ran with backup off: there is nothing to verify the hashes against"
                ));
            }
            if changed > 0 {
                println!(
                    "job {job_id}: {changed} rows changed since the job (another version now); not checked"
                );
            }
            let bad = bad
                .into_iter()
                .map(|(item, why)| Mismatch { item, why })
                .collect();
            (checked, bad)
        }
        "signatures" => {
            let (checked, gone, bad) =
                crate::scope::signatures::verify_job(&client, job_id).await?;
            if gone > 0 {
                println!("job {job_id}: {gone} countersignatures were deleted since the job");
            }
            let bad = bad
                .into_iter()
                .map(|(item, why)| Mismatch { item, why })
                .collect();
            (checked, bad)
        }
        other => {
            return Err(UsageError(format!(
                "verify is not available for {other} jobs in this build"
            ))
            .into());
        }
    };
    for m in bad.iter().take(20) {
        eprintln!("  item {}: {}", m.item, m.why);
    }
    if !bad.is_empty() {
        return Err(anyhow::anyhow!(
            "job {job_id}: {} of {checked} items failed verification (first ones listed above)",
            bad.len()
        ));
    }
    // Backups and nothing checked: every item changed since (or the
    // checks looked in the wrong place). That is no verification.
    let backups = dbw::backups_count(&client, job_id).await?;
    if checked == 0 && backups > 0 {
        let rolled_back = j.result.as_ref().and_then(|r| r.get("rolled_back"));
        if let Some(r) = rolled_back {
            // Its backups now hold what the rows hold again: purging them
            // loses nothing, so the mark is recorded.
            println!(
                "job {job_id} was rolled back ({} items at {}): nothing it wrote is left to verify",
                r["items"], r["at"]
            );
            if !jobs::job_mark_verified(&client, job_id, 0, &seen).await? {
                return Err(changed_meanwhile(job_id));
            }
            return Ok(());
        }
        return Err(anyhow::anyhow!(
            "job {job_id}: it has {backups} backups but none of its items could be checked (all changed since the job?): not verified"
        ));
    }
    if !jobs::job_mark_verified(&client, job_id, checked, &seen).await? {
        return Err(changed_meanwhile(job_id));
    }
    println!("job {job_id}: {checked} items verified, all open to the same key material");
    Ok(())
}

/// A hashes job prepared as the daemon would (its pepper loaded).
async fn hashes_job(
    config: &Config,
    client: &Client,
    job_id: i64,
) -> anyhow::Result<crate::scope::hashes::HashesJob> {
    let probe = jobs::job_probe(client, job_id)
        .await?
        .ok_or_else(|| UsageError(format!("no job with id {job_id}")))?;
    let ctx = crate::scope::ScopeContext {
        keyring: Some(config.keyring.clone().ok_or_else(|| {
            UsageError("no keyring configured (keys.keyring or PQMIG_KEYRING)".into())
        })?),
    };
    match crate::scope::Prepared::prepare(client, &probe, &ctx).await {
        Ok(crate::scope::Prepared::Hashes(h)) => Ok(h),
        Ok(_) => unreachable!("a hashes job prepares as hashes"),
        Err(e) => Err(anyhow::anyhow!("job {job_id} cannot be checked: {e}")),
    }
}

/// `pqmig rollback JOB`.
pub async fn rollback(config: &Config, job_id: i64) -> anyhow::Result<()> {
    let mut client = db::connect(&config.database).await?;
    db::migrate::check_current(&client).await?;
    let state = finish_state(&client, job_id).await?;
    let j = job(&client, job_id).await?;
    if matches!(j.status.as_str(), "pending" | "running") {
        return Err(UsageError(format!(
            "job {job_id} is {}: cancel it first (pqmig cancel {job_id}), then roll back",
            j.status
        ))
        .into());
    }
    let hashes = match j.scope.as_str() {
        "wrappers" | "signatures" => None,
        "hashes" => Some(hashes_job(config, &client, job_id).await?),
        other => {
            return Err(UsageError(format!(
                "rollback is not available for {other} jobs in this build"
            ))
            .into());
        }
    };
    let (mut restored, mut seen, mut after) = (0i64, 0i64, i64::MIN);
    loop {
        let tx = client.transaction().await?;
        let (done, n, last) = match &hashes {
            Some(h) => h.rollback_batch(&tx, job_id, after, PAGE).await?,
            None if j.scope == "signatures" => {
                crate::db::signatures::countersignatures_delete(&tx, job_id, after, PAGE).await?
            }
            None => {
                let (ids, n, last) = dbw::wrappers_rollback_batch(&tx, job_id, after, PAGE).await?;
                (ids.len() as i64, n, last)
            }
        };
        tx.commit().await?;
        let Some(last) = last else { break };
        after = last;
        restored += done;
        seen += n;
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

/// Backups deleted per statement by `purge-backups`.
const PURGE_CHUNK: i64 = 10_000;

/// `pqmig purge-backups JOB`: only for a `done` job verified since it last
/// finished; in statements of [`PURGE_CHUNK`] rows, with progress.
pub async fn purge_backups(config: &Config, job_id: i64) -> anyhow::Result<()> {
    let client = db::connect(&config.database).await?;
    db::migrate::check_current(&client).await?;
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
    let total = dbw::backups_count(&client, job_id).await?;
    let (mut deleted, mut shown) = (0i64, std::time::Instant::now());
    loop {
        let n = dbw::backups_purge_chunk(&client, job_id, PURGE_CHUNK).await? as i64;
        deleted += n;
        if n < PURGE_CHUNK {
            break;
        }
        if shown.elapsed() >= std::time::Duration::from_secs(1) {
            println!("job {job_id}: deleted {deleted} of {total} backups so far");
            shown = std::time::Instant::now();
        }
    }
    println!("job {job_id}: deleted {deleted} backups");
    Ok(())
}
