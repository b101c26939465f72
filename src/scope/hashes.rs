//! The `hashes` scope: wrap each stored lookup hash in an HMAC with the
//! target profile's pepper (the "onion", SPEC §5.4) and extend its version
//! chain. Identifiers come only from `field_hash_policies` and
//! information_schema; concurrent application writes are protected by
//! compare-and-set on the old hash and version (see `db::hashes`).

use std::sync::Arc;

use tokio_postgres::GenericClient;

use super::{BatchCounts, ItemFailure, JobError, ScopeContext};
use crate::crypto::onion::{HmacHash, Onion};
use crate::db::hashes::{self as dbh, HashRow, HashStatements, HashUpdates};
use crate::db::jobs::ClaimedJob;
use crate::keys::{KeyProvider, LocalKeyring};
use crate::selection::{self, Common};

pub struct HashesJob {
    sel: selection::Hashes,
    stmts: HashStatements,
    onion: Arc<Onion>,
    version_max_len: Option<usize>,
    pin: ProfilePin,
}

/// The profile a job runs with, pinned when it first starts (kept in
/// `result.profile`), so a pepper rotation during or after the job changes
/// nothing for it: a resumed job goes on with it, and `verify` and
/// `rollback` check and restore exactly what it wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProfilePin {
    pub id: i64,
    pub name: String,
    pub key_ref: String,
    pub output_len: Option<i16>,
    /// Already in the job's `result` (not to be recorded again).
    #[serde(skip)]
    pub recorded: bool,
}

/// The job's profile: the pinned one if it has one (which must still exist
/// and, for a running job, be active), else the newest active profile of
/// the target algorithm. A finished job from before pins falls back to the
/// profile it registered in `field_hash_policies`.
async fn job_profile(
    c: &impl GenericClient,
    job: &ClaimedJob,
    algo_id: i64,
    label: &str,
) -> Result<ProfilePin, JobError> {
    if let Some(v) = job.pinned.as_ref().and_then(|r| r.get("profile")) {
        let mut pin: ProfilePin = serde_json::from_value(v.clone())
            .map_err(|e| fatal(format!("result.profile of the job is unreadable: {e}")))?;
        pin.recorded = true;
        let row = dbh::hash_profile_by_id(c, pin.id).await?.ok_or_else(|| {
            fatal(format!(
                "hash profile {:?} (id {}) the job started with no longer exists",
                pin.name, pin.id
            ))
        })?;
        if row.algo_id != algo_id {
            return Err(fatal(format!(
                "hash profile {:?} (id {}) the job started with is no longer a profile of {label}",
                pin.name, pin.id
            )));
        }
        let current = (
            row.name.as_str(),
            row.params.get("key_ref").and_then(|v| v.as_str()),
            row.output_len,
        );
        if !job.aftercare
            && current
                != (
                    pin.name.as_str(),
                    Some(pin.key_ref.as_str()),
                    pin.output_len,
                )
        {
            return Err(fatal(format!(
                "hash profile {:?} (id {}) was changed in place since the job started (name, params.key_ref or output_len): the job stops here; restore the profile, or queue a new job",
                pin.name, pin.id
            )));
        }
        if !job.aftercare && row.status != "active" {
            return Err(fatal(format!(
                "hash profile {:?} the job started with is now {}: the job stops here; queue a new job for the active profile",
                pin.name, row.status
            )));
        }
        return Ok(pin);
    }
    let profile = match job.aftercare {
        true => match dbh::hash_profile_of_job(c, job.lease.job_id).await? {
            Some(p) => Some(p),
            None => dbh::hash_profile_active(c, algo_id).await?,
        },
        false => dbh::hash_profile_active(c, algo_id).await?,
    };
    let profile = profile.ok_or_else(|| {
        fatal(format!(
            "no active hash_profiles row for target algorithm {label} (id {algo_id})"
        ))
    })?;
    let key_ref = profile
        .params
        .get("key_ref")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            fatal(format!(
                "hash profile {:?} has no params.key_ref naming its pepper",
                profile.name
            ))
        })?;
    Ok(ProfilePin {
        id: profile.id,
        key_ref: key_ref.to_owned(),
        output_len: profile.output_len,
        name: profile.name,
        recorded: false,
    })
}

/// The new values of one batch, computed off the async executor.
pub struct Computed {
    pub updates: HashUpdates,
    pub failures: Vec<ItemFailure>,
    pub skipped: i64,
}

fn fatal(msg: impl Into<String>) -> JobError {
    JobError::Fatal(msg.into())
}

/// A hashes job checked against the database, its key not loaded yet.
pub struct Checked {
    sel: selection::Hashes,
    hash: HmacHash,
    pin: ProfilePin,
    version_name: String,
    id_name: String,
    created: Option<String>,
    version_max_len: Option<usize>,
    schema: String,
}

impl HashesJob {
    /// Validate the job and load its pepper; nothing is written.
    pub async fn prepare(
        c: &impl GenericClient,
        job: &ClaimedJob,
        ctx: &ScopeContext,
    ) -> Result<HashesJob, JobError> {
        Self::check(c, job).await?.load_key(ctx)
    }

    /// Every check that needs only the database: selection, target
    /// algorithm, profile, registration and column types.
    pub async fn check(c: &impl GenericClient, job: &ClaimedJob) -> Result<Checked, JobError> {
        let sel =
            selection::parse_hashes(job.selection.as_ref()).map_err(|e| fatal(e.to_string()))?;

        let algo_id = job.target_algo_id.ok_or_else(|| {
            fatal("target_algo_id is required for the hashes scope (an HMAC algorithm)")
        })?;
        let algo = crate::db::algorithms::algorithm_by_id(c, algo_id)
            .await?
            .ok_or_else(|| fatal(format!("target algorithm id {algo_id} does not exist")))?;
        let label = algo.label();
        if algo.class != "hash" || algo.name != "HMAC" {
            return Err(fatal(format!(
                "target algorithm {label} (id {algo_id}) is not a keyed hash: the hashes scope needs an HMAC algorithm"
            )));
        }
        // A finished job is checked with what it ran with, whatever has
        // been deprecated since.
        if !job.aftercare {
            algo.check_usable(sel.common.allow_experimental)
                .map_err(fatal)?;
        }
        let hash = algo
            .variant
            .as_deref()
            .and_then(HmacHash::from_variant)
            .ok_or_else(|| {
                fatal(format!(
                    "target algorithm {label}: unsupported HMAC variant"
                ))
            })?;

        let pin = job_profile(c, job, algo_id, &label).await?;
        // Identifiers: registered for hashing and present in this schema.
        if !dbh::field_hash_policy_exists(c, &sel.table, &sel.column).await? {
            return Err(fatal(format!(
                "selection.table/column: {:.64}.{:.64} is not registered in field_hash_policies",
                sel.table, sel.column
            )));
        }
        let columns = dbh::table_columns(c, &sel.table).await?;
        if columns.is_empty() {
            return Err(fatal(format!(
                "selection.table: no table {:.64} in the current schema",
                sel.table
            )));
        }
        let find = |key: &str, name: &str| {
            columns.iter().find(|col| col.name == name).ok_or_else(|| {
                fatal(format!(
                    "selection.{key}: table {} has no column {name:.64}",
                    sel.table
                ))
            })
        };
        let hash_col = find("column", &sel.column)?;
        if hash_col.data_type != "bytea" {
            return Err(fatal(format!(
                "selection.column: {}.{} is {}, expected bytea",
                sel.table, sel.column, hash_col.data_type
            )));
        }
        let version_name = sel
            .version_column
            .clone()
            .unwrap_or_else(|| format!("{}_key_version", sel.column));
        let ver_col = find("version_column", &version_name)?;
        if !matches!(ver_col.data_type.as_str(), "text" | "character varying") {
            return Err(fatal(format!(
                "selection.version_column: {}.{} is {}, expected text or varchar",
                sel.table, version_name, ver_col.data_type
            )));
        }
        // The version column is rewritten: never the hash or id column, and
        // only a column named as a version, so a typo cannot overwrite data.
        if version_name == sel.column || !version_name.to_ascii_lowercase().ends_with("version") {
            return Err(fatal(format!(
                "selection.version_column: {version_name:.64} is not a version column (its name must end in \"version\" and differ from the hashed column)"
            )));
        }
        let id_name = sel.id_column.clone().unwrap_or_else(|| "id".into());
        if id_name == version_name || id_name == sel.column {
            return Err(fatal(
                "selection.id_column: must differ from the hashed and version columns",
            ));
        }
        let id_col = find("id_column", &id_name)?;
        if !matches!(id_col.data_type.as_str(), "bigint" | "integer" | "smallint") {
            return Err(fatal(format!(
                "selection.id_column: {}.{} is {}, expected an integer type",
                sel.table, id_name, id_col.data_type
            )));
        }
        if !dbh::column_is_unique(c, &sel.table, &id_name).await? {
            return Err(fatal(format!(
                "selection.id_column: {}.{id_name:.64} has no unique index of its own; the keyset walk needs distinct ids",
                sel.table
            )));
        }
        let schema = dbh::current_schema(c).await?;
        let created = if sel.common.created_before.is_some() || sel.common.created_after.is_some() {
            Some(find("created_before", "created_at")?.name.clone())
        } else {
            None
        };

        Ok(Checked {
            version_max_len: ver_col.max_length.map(|n| n as usize),
            sel,
            hash,
            pin,
            version_name,
            id_name,
            created,
            schema,
        })
    }
}

impl Checked {
    /// The pepper, last: a keyring problem is reported only for a job that
    /// is otherwise valid.
    pub fn load_key(self, ctx: &ScopeContext) -> Result<HashesJob, JobError> {
        let Checked {
            sel,
            hash,
            pin,
            version_name,
            id_name,
            created,
            version_max_len,
            schema,
        } = self;
        let path = ctx.keyring.as_ref().ok_or_else(|| {
            fatal("no keyring configured (keys.keyring or PQMIG_KEYRING) to read the pepper from")
        })?;
        let keyring = LocalKeyring::load(path).map_err(|e| fatal(e.to_string()))?;
        let key_ref = &pin.key_ref;
        let secret = keyring.secret(key_ref).map_err(|e| fatal(e.to_string()))?;
        // Exactly the target's HMAC: a pepper declared for another hash
        // would be used under a name it was not made for.
        if !secret.algorithm.eq_ignore_ascii_case(&hash.alias()) {
            return Err(fatal(format!(
                "key {key_ref:?} is declared {}, the profile {:?} of target {} needs an {} pepper",
                secret.algorithm,
                pin.name,
                hash.alias(),
                hash.alias()
            )));
        }
        let output_len = pin.output_len.map(|n| n as usize);
        let onion = Onion::new(hash, secret.bytes.clone(), output_len, &pin.name)
            .map_err(|e| fatal(format!("hash profile {:?}: {e}", pin.name)))?;

        let target = dbh::HashTarget {
            schema: &schema,
            table: &sel.table,
            id_column: &id_name,
            column: &sel.column,
            version_column: &version_name,
            created_column: created.as_deref(),
        };
        let stmts = HashStatements::new(&target, &sel.common, sel.from_version.as_deref());
        Ok(HashesJob {
            version_max_len,
            sel,
            stmts,
            onion: Arc::new(onion),
            pin,
        })
    }
}

impl HashesJob {
    pub fn common(&self) -> &Common {
        &self.sel.common
    }

    pub async fn count(
        &self,
        c: &impl GenericClient,
        after: i64,
        cap: i64,
    ) -> Result<i64, JobError> {
        Ok(self.stmts.hashes_count(c, after, cap).await?)
    }

    pub async fn fetch(
        &self,
        c: &impl GenericClient,
        after: i64,
        n: i64,
    ) -> Result<Vec<HashRow>, JobError> {
        Ok(self.stmts.hashes_fetch_batch(c, after, n).await?)
    }

    /// What the job's `result` must record before its first batch (the
    /// profile it runs with), unless it is there already.
    pub fn pin_to_record(&self) -> Option<serde_json::Value> {
        (!self.pin.recorded).then(|| serde_json::json!({ "profile": self.pin }))
    }

    /// CPU part of a batch; run it on a blocking thread. With `verify`
    /// each new hash is computed again through a freshly keyed HMAC and
    /// compared in constant time before it may be written (SPEC §6.1).
    pub fn compute(
        onion: &Onion,
        version_max_len: Option<usize>,
        verify: bool,
        rows: &[HashRow],
    ) -> Computed {
        let mut out = Computed {
            updates: HashUpdates::default(),
            failures: Vec::new(),
            skipped: 0,
        };
        for row in rows {
            let (Some(hash), Some(version)) = (&row.hash, &row.version) else {
                if row.hash.is_none() {
                    // Nothing stored, nothing exposed.
                    out.skipped += 1;
                } else {
                    out.failures.push(ItemFailure {
                        item_id: row.id,
                        code: "data",
                        message: "version column is NULL: the hash chain is unknown".into(),
                    });
                }
                continue;
            };
            if onion.is_migrated(version) {
                out.skipped += 1;
                continue;
            }
            let new_version = onion.new_version(version);
            if let Some(max) = version_max_len
                && new_version.chars().count() > max
            {
                out.failures.push(ItemFailure {
                    item_id: row.id,
                    code: "version_too_long",
                    message: format!(
                        "new version is {} characters, the column holds {max}",
                        new_version.chars().count()
                    ),
                });
                continue;
            }
            let new_hash = onion.rehash(hash);
            if verify
                && !bool::from(subtle::ConstantTimeEq::ct_eq(
                    &new_hash[..],
                    &onion.rehash_fresh(hash)[..],
                ))
            {
                out.failures.push(ItemFailure {
                    item_id: row.id,
                    code: "verify",
                    message: "the new hash did not recompute to the same value; nothing written"
                        .into(),
                });
                continue;
            }
            let u = &mut out.updates;
            u.ids.push(row.id);
            u.new_hashes.push(new_hash);
            u.old_hashes.push(hash.clone());
            u.old_versions.push(version.clone());
            u.new_versions.push(new_version);
        }
        out
    }

    pub async fn compute_off_thread(&self, rows: Vec<HashRow>) -> Result<Computed, JobError> {
        let onion = Arc::clone(&self.onion);
        let (max, verify) = (self.version_max_len, self.sel.common.verify);
        tokio::task::spawn_blocking(move || Self::compute(&onion, max, verify, &rows))
            .await
            .map_err(|e| JobError::Fatal(format!("hash computation panicked: {e}")))
    }

    /// Write a computed batch inside the caller's transaction (compare-
    /// and-set, see [`super::write_cas`]).
    pub async fn write(
        &self,
        tx: &impl GenericClient,
        job_id: i64,
        c: Computed,
    ) -> Result<(BatchCounts, Vec<ItemFailure>), JobError> {
        let parts = (c.updates, c.failures, c.skipped);
        super::write_cas(self, tx, job_id, self.sel.common.dry_run, parts).await
    }

    /// `pqmig verify`: every backed-up row that still carries the version
    /// the job gave it must hold the onion of its backed-up hash. Returns
    /// (rows checked, rows changed since, mismatches).
    pub async fn verify_job(
        &self,
        c: &impl GenericClient,
        job_id: i64,
    ) -> Result<(i64, i64, Vec<(i64, String)>), JobError> {
        let (mut after, mut checked, mut changed, mut bad) = (i64::MIN, 0i64, 0i64, Vec::new());
        loop {
            let backups = self.stmts.hashes_backups(c, job_id, after, 1000).await?;
            let Some(last) = backups.last() else { break };
            after = last.backup_id;
            let ids: Vec<i64> = backups.iter().map(|b| b.item_id).collect();
            let now = self.stmts.hashes_current(c, &ids).await?;
            for b in &backups {
                let Some(row) = now.iter().find(|r| r.id == b.item_id) else {
                    changed += 1;
                    continue;
                };
                if row.version.as_deref() != Some(&self.onion.new_version(&b.old_version)) {
                    changed += 1;
                    continue;
                }
                checked += 1;
                let want = self.onion.rehash(&b.old_hash);
                let same = row
                    .hash
                    .as_deref()
                    .is_some_and(|h| bool::from(subtle::ConstantTimeEq::ct_eq(h, &want[..])));
                if !same {
                    bad.push((
                        b.item_id,
                        "the hash is not the onion of the backed-up value".into(),
                    ));
                }
            }
        }
        Ok((checked, changed, bad))
    }

    /// `pqmig rollback`: restore up to `n` backups after backup id `after`.
    /// Returns (restored, backups seen, last backup id).
    pub async fn rollback_batch(
        &self,
        c: &impl GenericClient,
        job_id: i64,
        after: i64,
        n: i64,
    ) -> Result<(i64, i64, Option<i64>), JobError> {
        let backups = self.stmts.hashes_backups(c, job_id, after, n).await?;
        let Some(last) = backups.last().map(|b| b.backup_id) else {
            return Ok((0, 0, None));
        };
        let ids: Vec<i64> = backups.iter().map(|b| b.backup_id).collect();
        let restored = self.stmts.hashes_rollback(c, &ids, &self.pin.name).await?;
        Ok((restored.len() as i64, backups.len() as i64, Some(last)))
    }

    /// On success: record that the column now uses the profile.
    pub async fn on_done(&self, tx: &impl GenericClient, job_id: i64) -> Result<(), JobError> {
        if !self.sel.common.dry_run {
            dbh::field_hash_policy_insert(
                tx,
                &self.sel.table,
                &self.sel.column,
                self.pin.id,
                job_id,
            )
            .await?;
        }
        Ok(())
    }
}

impl super::CasWrite for HashesJob {
    type Updates = HashUpdates;

    fn ids(u: &HashUpdates) -> &[i64] {
        &u.ids
    }

    async fn cas_update(
        &self,
        tx: &impl GenericClient,
        job_id: i64,
        u: &HashUpdates,
    ) -> Result<Vec<i64>, JobError> {
        Ok(self
            .stmts
            .hashes_update_batch(tx, job_id, u, self.sel.common.backup)
            .await?)
    }

    async fn relock_and_compute(
        &self,
        tx: &impl GenericClient,
        ids: &[i64],
    ) -> Result<(usize, HashUpdates, Vec<ItemFailure>, i64), JobError> {
        let rows = self.stmts.hashes_lock_rows(tx, ids).await?;
        let again = Self::compute(
            &self.onion,
            self.version_max_len,
            self.sel.common.verify,
            &rows,
        );
        Ok((rows.len(), again.updates, again.failures, again.skipped))
    }
}

#[cfg(test)]
mod tests {
    use zeroize::Zeroizing;

    use super::*;

    /// Verify-before-write compares against a freshly keyed HMAC: a hot
    /// path whose cached state went wrong writes nothing.
    #[test]
    fn a_wrong_cached_hmac_state_is_caught_before_the_write() {
        let onion = Onion::new(
            HmacHash::Sha3_256,
            Zeroizing::new(vec![7u8; 32]),
            None,
            "pepper-v2",
        )
        .unwrap()
        .with_corrupted_cache(&[8u8; 32]);
        let rows = vec![HashRow {
            id: 1,
            hash: Some(vec![1u8; 32]),
            version: Some("v1".into()),
        }];
        let checked = HashesJob::compute(&onion, None, true, &rows);
        assert_eq!(checked.updates.ids, Vec::<i64>::new());
        assert_eq!(checked.failures.len(), 1);
        assert_eq!(checked.failures[0].code, "verify");
        // without the check the wrong value would have been written
        let unchecked = HashesJob::compute(&onion, None, false, &rows);
        assert_eq!(unchecked.updates.ids, vec![1]);
    }
}
