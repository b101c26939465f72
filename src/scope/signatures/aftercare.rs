//! `pqmig verify` and `pqmig rollback` of a signatures job: no private key
//! is needed for either.

use std::collections::HashMap;

use tokio_postgres::{Client, GenericClient, Transaction};

use super::keys::sig_alg_of;
use crate::crypto::sig::{self, SigAlg};
use crate::db::backups::Cursor;
use crate::db::signatures as dbs;
use crate::scope::{BoxFuture, JobError, RollbackPage, VerifyReport};

/// A finished signatures job.
pub struct Aftercare;

/// `pqmig verify`: every countersignature the job recorded must verify
/// under its signer's public key with its context (no private key needed).
/// Returns (checked, deleted since, mismatches).
async fn verify_job(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<(i64, i64, Vec<(i64, String)>), JobError> {
    let (mut at, mut checked, mut gone, mut bad) = (Some(Cursor::START), 0i64, 0i64, Vec::new());
    let mut algos: HashMap<i64, Option<SigAlg>> = HashMap::new();
    while let Some(here) = at {
        let (rows, next, seen) = dbs::countersignatures_of_job(c, job_id, here, 500).await?;
        at = next;
        gone += seen - rows.len() as i64;
        for r in rows {
            if let std::collections::hash_map::Entry::Vacant(e) = algos.entry(r.algo_id) {
                e.insert(sig_alg_of(c, r.algo_id).await?);
            }
            checked += 1;
            let ok = match (algos[&r.algo_id], r.public_key.as_deref()) {
                (Some(alg), Some(pk)) => {
                    sig::verify(alg, pk, &r.payload_hash, r.context.as_bytes(), &r.signature)
                }
                _ => false,
            };
            if !ok {
                bad.push((r.id, "the countersignature does not verify".into()));
            }
        }
    }
    Ok((checked, gone, bad))
}

impl crate::scope::Aftercare for Aftercare {
    fn verify<'a>(
        &'a self,
        c: &'a Client,
        job_id: i64,
    ) -> BoxFuture<'a, Result<VerifyReport, JobError>> {
        Box::pin(async move {
            let (checked, changed, mismatches) = verify_job(c, job_id).await?;
            Ok(VerifyReport {
                checked,
                changed,
                changed_note: "countersignatures were deleted since the job",
                mismatches,
            })
        })
    }

    /// Delete the countersignatures the job inserted.
    fn rollback_page<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        job_id: i64,
        at: Cursor,
        n: i64,
    ) -> BoxFuture<'a, Result<RollbackPage, JobError>> {
        Box::pin(async move {
            let (restored, seen, next) = dbs::countersignatures_delete(tx, job_id, at, n).await?;
            Ok(RollbackPage {
                restored,
                seen,
                next,
            })
        })
    }

    /// The countersignature rows the job recorded and that still exist:
    /// value = the `signature` column.
    fn leaves<'a>(
        &'a self,
        c: &'a Client,
        job_id: i64,
    ) -> BoxFuture<'a, Result<Vec<crate::evidence::Leaf>, JobError>> {
        Box::pin(async move {
            let (mut out, mut at) = (Vec::new(), Some(Cursor::START));
            while let Some(here) = at {
                let (rows, next, _) = dbs::countersignatures_of_job(c, job_id, here, 1000).await?;
                at = next;
                out.extend(
                    rows.iter()
                        .map(|r| (r.id, crate::evidence::value_hash(&[&r.signature]))),
                );
            }
            Ok(out)
        })
    }
}
