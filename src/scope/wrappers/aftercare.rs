//! `pqmig verify` and `pqmig rollback` of a wrappers job.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tokio_postgres::{Client, GenericClient, Transaction};

use super::keys::{SourceKeys, format_of, suite_job};
use crate::crypto::wrap;
use crate::db::backups;
use crate::db::wrappers::{self as dbw, WrapperRow};
use crate::keys::LocalKeyring;
use crate::scope::{BoxFuture, JobError, RollbackPage, ScopeContext, VerifyReport, fatal};

/// A finished wrappers job: the keyring to open its wraps with (verify).
pub struct WrappersAftercare {
    keyring: Option<Arc<LocalKeyring>>,
    pkcs11: Option<crate::keys::pkcs11::Pkcs11Settings>,
}

/// `keys`: load the keyring (verify); rollback needs none.
pub fn aftercare(ctx: &ScopeContext, keys: bool) -> Result<WrappersAftercare, JobError> {
    let keyring = match keys {
        true => Some(ctx.keys("open the wraps with")?),
        false => None,
    };
    Ok(WrappersAftercare {
        keyring,
        pkcs11: ctx.pkcs11.clone(),
    })
}

/// `pqmig verify` of a wrappers job: (checked, changed since, mismatches).
///
/// With backups, each backed-up wrapper is checked against its backup: one
/// the job still holds must open (bound to its row) to the DEK of the wrap
/// it replaced; one rewritten since (a later job re-wrapped it) counts as
/// checked when it still opens to that DEK, and as changed when it does not
/// (the application rotated it) or is gone. Without backups, every wrapper
/// the job wrote must open.
async fn verify_job(
    c: &impl GenericClient,
    keys: SourceKeys,
    job_id: i64,
    page: i64,
) -> Result<(i64, i64, Vec<(i64, String)>), JobError> {
    let keys = Arc::new(keys);
    let (mut checked, mut changed, mut bad) = (0i64, 0i64, Vec::new());
    if !backups::exist(c, job_id).await? {
        let mut after = i64::MIN;
        loop {
            let mut rows = dbw::wrappers_of_job(c, job_id, after, page).await?;
            let Some(last) = rows.last().map(|r| r.id) else {
                break;
            };
            after = last;
            keys.resolve(c, &rows.iter().collect::<Vec<_>>()).await?;
            keys.open_remote(&mut rows).await?;
            for row in &rows {
                checked += 1;
                if let Err((code, why)) = keys.recover(row) {
                    bad.push((row.id, format!("{code}: {why}")));
                }
            }
        }
        return Ok((checked, changed, bad));
    }
    let mut at = Some(backups::Cursor::START);
    while let Some(here) = at {
        let (mut backups, next) = dbw::wrapper_backups(c, job_id, here, page).await?;
        at = next;
        let ids: Vec<i64> = backups.iter().map(|old| old.id).collect();
        let mut now = dbw::wrappers_by_ids(c, &ids).await?;
        let all: Vec<&WrapperRow> = now.iter().chain(backups.iter()).collect();
        keys.resolve(c, &all).await?;
        // Wraps of AWS KMS keys are opened by KMS: the backed-up ones, and
        // current rows still in a legacy format (rolled back, rewritten by
        // the application), so they compare like any legacy row.
        keys.open_remote(&mut backups).await?;
        keys.open_remote(&mut now).await?;
        let k = Arc::clone(&keys);
        let (p_checked, p_changed, p_bad) = tokio::task::spawn_blocking(move || {
            let (mut checked, mut changed, mut bad) = (0i64, 0i64, Vec::new());
            for old in &backups {
                let Some(row) = now.iter().find(|r| r.id == old.id) else {
                    changed += 1;
                    continue;
                };
                let ours = suite_job(row) == Some(job_id) && format_of(row) == Ok(wrap::FORMAT_V1);
                let (current, before) = (k.recover(row), k.recover(old));
                match (ours, current, before) {
                    (_, Ok(a), Ok(b)) if bool::from(a.ct_eq(&b)) => checked += 1,
                    (false, _, _) => changed += 1,
                    (true, Err((code, why)), _) => bad.push((row.id, format!("{code}: {why}"))),
                    (true, Ok(_), Ok(_)) => bad.push((
                        row.id,
                        "opens to a different DEK than the wrap it replaced".into(),
                    )),
                    (true, Ok(_), Err((code, why))) => bad.push((
                        row.id,
                        format!("the backed-up wrap does not open ({code}: {why})"),
                    )),
                }
            }
            (checked, changed, bad)
        })
        .await
        .map_err(|e| fatal(format!("verification panicked: {e}")))?;
        checked += p_checked;
        changed += p_changed;
        bad.extend(p_bad);
    }
    // A key provider that was down proves nothing either way: try again.
    if let Some((id, why)) = bad
        .iter()
        .find(|(_, why)| why.contains(super::keys::UNAVAILABLE))
    {
        return Err(JobError::Transient(format!("wrapper {id}: {why}")));
    }
    Ok((checked + bad.len() as i64, changed, bad))
}

impl crate::scope::Aftercare for WrappersAftercare {
    fn verify<'a>(
        &'a self,
        c: &'a Client,
        job_id: i64,
    ) -> BoxFuture<'a, Result<VerifyReport, JobError>> {
        Box::pin(async move {
            let keyring = self
                .keyring
                .clone()
                .ok_or_else(|| fatal("verify needs the keyring"))?;
            let keys = SourceKeys::new(keyring).with_pkcs11(self.pkcs11.clone());
            let (checked, changed, mismatches) = verify_job(c, keys, job_id, 500).await?;
            Ok(VerifyReport {
                checked,
                changed,
                changed_note: "wrappers were rotated or deleted since the job (their DEK is no longer the backed-up one)",
                mismatches,
            })
        })
    }

    /// Restore backed-up rows and layers byte for byte, for wrappers still
    /// as the job left them.
    fn rollback_page<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        job_id: i64,
        at: backups::Cursor,
        n: i64,
    ) -> BoxFuture<'a, Result<RollbackPage, JobError>> {
        Box::pin(async move {
            let (ids, seen, next) = dbw::wrappers_rollback_batch(tx, job_id, at, n).await?;
            Ok(RollbackPage {
                restored: ids.len() as i64,
                seen,
                next,
            })
        })
    }

    /// The wrappers still as the job wrote them (`crypto_suite.job_id`):
    /// value = dek_wrap1, dek_wrap2, kms1_key_id, kms2_key_id,
    /// wrap_version, the canonical crypto_suite JSON, then per layer (in
    /// layer order) its kms_key_id and KEM ciphertext; numbers in decimal,
    /// NULL as nothing.
    fn leaves<'a>(
        &'a self,
        c: &'a Client,
        job_id: i64,
    ) -> BoxFuture<'a, Result<Vec<crate::evidence::Leaf>, JobError>> {
        Box::pin(async move {
            let (mut out, mut after) = (Vec::new(), i64::MIN);
            loop {
                let rows = dbw::wrappers_of_job(c, job_id, after, 1000).await?;
                let Some(last) = rows.last().map(|r| r.id) else {
                    return Ok(out);
                };
                after = last;
                for row in &rows {
                    out.push((row.id, wrapper_value(row)));
                }
            }
        })
    }
}

fn wrapper_value(row: &WrapperRow) -> crate::evidence::merkle::Hash {
    let num = |n: Option<i64>| n.map(|n| n.to_string()).unwrap_or_default();
    let suite = row.suite.as_ref().map(wrap::canonical_json);
    let mut layers: Vec<_> = row.layers.iter().collect();
    layers.sort_by_key(|l| l.layer_no);
    let text = [num(row.kms1), num(row.kms2), row.wrap_version.to_string()];
    let layer_keys: Vec<String> = layers.iter().map(|l| num(l.kms_key_id)).collect();
    let mut fields: Vec<&[u8]> = vec![
        row.wrap1.as_deref().unwrap_or_default(),
        row.wrap2.as_deref().unwrap_or_default(),
        text[0].as_bytes(),
        text[1].as_bytes(),
        text[2].as_bytes(),
        suite.as_deref().unwrap_or_default(),
    ];
    for (l, key) in layers.iter().zip(&layer_keys) {
        fields.push(key.as_bytes());
        fields.push(l.ciphertext.as_deref().unwrap_or_default());
    }
    crate::evidence::value_hash(&fields)
}
