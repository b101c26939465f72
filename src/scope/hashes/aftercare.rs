//! `pqmig verify` and `pqmig rollback` of a hashes job, with the profile
//! it pinned: verify recomputes the onion of every backed-up hash with the
//! job's pepper; rollback needs no key at all.

use std::sync::Arc;

use tokio_postgres::{Client, GenericClient, Transaction};

use super::{HashesJob, Pepper};
use crate::db::backups::Cursor;
use crate::db::hashes::HashStatements;
use crate::job::JobSpec;
use crate::scope::{BoxFuture, JobError, RollbackPage, ScopeContext, VerifyReport, fatal};

/// A finished hashes job: its statements, its profile's name and, for
/// verify, its pepper.
pub struct HashesAftercare {
    stmts: HashStatements,
    profile: String,
    backup: bool,
    pepper: Option<Arc<Pepper>>,
}

/// A finished job, checked as it ran (see [`super::profile`]); `keys`:
/// load its pepper (verify).
pub async fn aftercare(
    c: &Client,
    spec: &JobSpec,
    ctx: &ScopeContext,
    keys: bool,
) -> Result<HashesAftercare, JobError> {
    let mut checked = HashesJob::check(c, spec).await?;
    let pepper = match keys {
        true => Some(Arc::new(checked.pepper(c, ctx, false).await?)),
        false => None,
    };
    Ok(HashesAftercare {
        profile: checked.pin.name,
        backup: checked.sel.common.backup,
        stmts: checked.stmts,
        pepper,
    })
}

impl HashesAftercare {
    /// Every backed-up row that still carries the version the job gave it
    /// must hold the onion of its backed-up hash.
    async fn verify_job(
        &self,
        c: &impl GenericClient,
        job_id: i64,
    ) -> Result<VerifyReport, JobError> {
        let pepper = self
            .pepper
            .as_ref()
            .ok_or_else(|| fatal("verify needs the job's pepper"))?;
        let layer = pepper.layer();
        let mut report = VerifyReport {
            changed_note: "rows changed since the job (another version now)",
            ..VerifyReport::default()
        };
        let mut at = Some(Cursor::START);
        while let Some(here) = at {
            let (backups, now, next) = self
                .stmts
                .hashes_backups_and_rows(c, job_id, here, 1000)
                .await?;
            at = next;
            // Each backup's row, where it still carries the version the
            // job gave it.
            let ours: Vec<_> = backups
                .iter()
                .map(|b| {
                    let version = layer.new_version(&b.old_version);
                    now.get(&b.item_id)
                        .filter(|r| r.version.as_deref() == Some(version.as_str()))
                })
                .collect();
            // A pepper in a KMS, HSM or Vault: the onions of those rows,
            // asked for at once.
            let mut remote = match &**pepper {
                Pepper::Local(_) => std::collections::HashMap::new(),
                Pepper::Remote { .. } => {
                    let olds = backups
                        .iter()
                        .zip(&ours)
                        .filter(|(_, row)| row.is_some())
                        .map(|(b, _)| (b.item_id, b.old_hash.clone()))
                        .collect();
                    pepper.remote(olds, false).await?
                }
            };
            for (b, row) in backups.iter().zip(ours) {
                let Some(row) = row else {
                    report.changed += 1;
                    continue;
                };
                report.checked += 1;
                let want = match &**pepper {
                    Pepper::Local(onion) => onion.rehash(&b.old_hash),
                    _ => match remote.remove(&b.item_id) {
                        Some(Ok(h)) => h,
                        Some(Err((_, why))) => {
                            report.mismatches.push((b.item_id, why));
                            continue;
                        }
                        None => Vec::new(),
                    },
                };
                let same = row
                    .hash
                    .as_deref()
                    .is_some_and(|h| bool::from(subtle::ConstantTimeEq::ct_eq(h, &want[..])));
                if !same {
                    report.mismatches.push((
                        b.item_id,
                        "the hash is not the onion of the backed-up value".into(),
                    ));
                }
            }
        }
        if report.checked + report.changed == 0 && !self.backup {
            return Err(fatal(
                "it ran with backup off: there is nothing to verify the hashes against",
            ));
        }
        Ok(report)
    }

    /// Restore about `n` backups from `at` on where the row still carries
    /// the version the job gave it.
    async fn rollback(
        &self,
        c: &impl GenericClient,
        job_id: i64,
        at: Cursor,
        n: i64,
    ) -> Result<RollbackPage, JobError> {
        let (backups, next) = self.stmts.hashes_backups(c, job_id, at, n).await?;
        let restored = self
            .stmts
            .hashes_rollback(c, &backups, &self.profile)
            .await?;
        Ok(RollbackPage {
            restored: restored.len() as i64,
            seen: backups.len() as i64,
            next,
        })
    }
}

impl crate::scope::Aftercare for HashesAftercare {
    fn verify<'a>(
        &'a self,
        c: &'a Client,
        job_id: i64,
    ) -> BoxFuture<'a, Result<VerifyReport, JobError>> {
        Box::pin(self.verify_job(c, job_id))
    }

    fn rollback_page<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        job_id: i64,
        at: Cursor,
        n: i64,
    ) -> BoxFuture<'a, Result<RollbackPage, JobError>> {
        Box::pin(self.rollback(tx, job_id, at, n))
    }

    /// The backed-up rows that still carry the version the job gave them:
    /// value = the hash, then the version text.
    fn leaves<'a>(
        &'a self,
        c: &'a Client,
        job_id: i64,
    ) -> BoxFuture<'a, Result<Vec<crate::evidence::Leaf>, JobError>> {
        Box::pin(async move {
            if !self.backup {
                return Err(fatal(
                    "it ran with backup off: no record names the rows it rewrote",
                ));
            }
            let (mut out, mut at) = (Vec::new(), Some(Cursor::START));
            while let Some(here) = at {
                let (backups, now, next) = self
                    .stmts
                    .hashes_backups_and_rows(c, job_id, here, 1000)
                    .await?;
                at = next;
                for b in &backups {
                    let ours = format!("{}/{}", self.profile, b.old_version);
                    let Some(row) = now.get(&b.item_id) else {
                        continue;
                    };
                    if row.version.as_deref() == Some(ours.as_str()) {
                        let hash = row.hash.as_deref().unwrap_or_default();
                        out.push((
                            row.id,
                            crate::evidence::value_hash(&[hash, ours.as_bytes()]),
                        ));
                    }
                }
            }
            Ok(out)
        })
    }
}
