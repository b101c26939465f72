//! The `hashes` scope: wrap each stored lookup hash in an HMAC with the
//! target profile's pepper (the "onion", SPEC §5.4) and extend its version
//! chain. Identifiers come only from `field_hash_policies` and
//! information_schema; concurrent application writes are protected by
//! compare-and-set on the old hash and version (see `db::hashes`).
//!
//! - [`profile`]: the profile a job runs with, pinned when it starts.
//! - [`pepper`]: where the profile's pepper lives, and the HMAC with it.
//! - [`aftercare`]: `verify` and `rollback` of a finished job.

mod aftercare;
mod pepper;
mod profile;

use std::sync::Arc;

use tokio_postgres::{Client, GenericClient, Transaction};

pub use aftercare::{HashesAftercare, aftercare};
pub use pepper::{NewHash, Pepper};
use profile::job_profile;
pub use profile::{KeyIdentity, ProfilePin};

use super::{
    BatchCounts, ItemFailure, JobError, Outcome, Scope, ScopeContext, TargetRule, fatal,
    target_algorithm, total_len,
};
use crate::crypto::onion::{HmacHash, Layer, Onion};
use crate::db::hashes::{self as dbh, HashRow, HashStatements, HashUpdates};
use crate::job::JobSpec;
use crate::selection::{self, Common};

pub struct HashesJob {
    sel: selection::Hashes,
    stmts: HashStatements,
    pepper: Arc<Pepper>,
    version_max_len: Option<usize>,
    pin: ProfilePin,
}

/// The new values of one batch, computed off the async executor.
pub struct Computed {
    pub updates: HashUpdates,
    pub failures: Vec<ItemFailure>,
    pub skipped: i64,
}

/// A hashes job checked against the database, its key not loaded yet.
pub struct Checked {
    sel: selection::Hashes,
    hash: HmacHash,
    pin: ProfilePin,
    stmts: HashStatements,
    version_max_len: Option<usize>,
}

impl HashesJob {
    /// Validate the job and load its pepper; nothing is written.
    pub async fn prepare(
        c: &impl GenericClient,
        spec: &JobSpec,
        ctx: &ScopeContext,
    ) -> Result<HashesJob, JobError> {
        let mut checked = Self::check(c, spec).await?;
        let pepper = checked.pepper(c, ctx, true).await?;
        let Checked {
            sel,
            pin,
            stmts,
            version_max_len,
            ..
        } = checked;
        Ok(HashesJob {
            sel,
            stmts,
            pepper: Arc::new(pepper),
            version_max_len,
            pin,
        })
    }

    /// Every check that needs only the database: selection, target
    /// algorithm, profile, registration and column types.
    pub async fn check(c: &impl GenericClient, spec: &JobSpec) -> Result<Checked, JobError> {
        let sel =
            selection::parse_hashes(spec.selection.as_ref()).map_err(|e| fatal(e.to_string()))?;

        let algo_id = spec.target_algo_id.ok_or_else(|| {
            fatal("target_algo_id is required for the hashes scope (an HMAC algorithm)")
        })?;
        let rule = TargetRule {
            class: "hash",
            name: Some("HMAC"),
            needs: "a keyed hash: the hashes scope needs an HMAC algorithm",
            pq: false,
        };
        let algo = target_algorithm(c, spec, algo_id, rule, sel.common.allow_experimental).await?;
        let label = algo.label();
        let hash = algo
            .variant
            .as_deref()
            .and_then(HmacHash::from_variant)
            .ok_or_else(|| {
                fatal(format!(
                    "target algorithm {label}: unsupported HMAC variant"
                ))
            })?;

        let pin = job_profile(c, spec, algo_id, &label).await?;
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

        let target = dbh::HashTarget {
            schema: &schema,
            table: &sel.table,
            id_column: &id_name,
            column: &sel.column,
            version_column: &version_name,
            created_column: created.as_deref(),
        };
        let stmts = HashStatements::new(&target, &sel.common, sel.from_version.as_deref());
        Ok(Checked {
            version_max_len: ver_col.max_length.map(|n| n as usize),
            sel,
            hash,
            pin,
            stmts,
        })
    }
}

impl Checked {
    /// The pepper of the pinned profile, loaded last: a key problem is
    /// reported only for a job that is otherwise valid. `new_hashes`: for
    /// a job that will compute new hashes (not `verify`), which a retired
    /// key may not.
    pub async fn pepper(
        &mut self,
        c: &impl GenericClient,
        ctx: &ScopeContext,
        new_hashes: bool,
    ) -> Result<Pepper, JobError> {
        Pepper::load(c, &mut self.pin, self.hash, ctx, new_hashes).await
    }
}

/// The old hashes of the rows that need a new one: stored, with a known
/// chain, not yet under this layer.
fn pending<'a>(layer: &'a Layer, rows: &'a [HashRow]) -> impl Iterator<Item = &'a HashRow> + 'a {
    rows.iter()
        .filter(|r| r.hash.is_some() && r.version.as_deref().is_some_and(|v| !layer.is_migrated(v)))
}

impl HashesJob {
    /// The new values of `rows`, the pepper's HMAC computed where it
    /// lives: in process on a blocking thread, or by its provider first.
    async fn compute_rows(&self, rows: Vec<HashRow>) -> Result<Computed, JobError> {
        let (max, verify) = (self.version_max_len, self.sel.common.verify);
        if let Pepper::Local(onion) = &*self.pepper {
            let onion = Arc::clone(onion);
            return tokio::task::spawn_blocking(move || {
                Self::compute_local(&onion, max, verify, &rows)
            })
            .await
            .map_err(|e| fatal(format!("hash computation panicked: {e}")));
        }
        let layer = self.pepper.layer();
        let olds = pending(layer, &rows)
            .map(|r| (r.id, r.hash.clone().unwrap_or_default()))
            .collect();
        let mut news = self.pepper.remote(olds, verify).await?;
        Ok(Self::compute_batch(layer, max, &rows, |row, _| {
            news.remove(&row.id).unwrap_or_else(|| {
                Err(("data", "the key provider gave no value for this row".into()))
            })
        }))
    }

    /// [`HashesJob::compute_batch`] with a pepper in process. With
    /// `verify` each new hash is computed again through a freshly keyed
    /// HMAC and compared in constant time before it may be written (SPEC
    /// §6.1).
    pub fn compute_local(
        onion: &Onion,
        version_max_len: Option<usize>,
        verify: bool,
        rows: &[HashRow],
    ) -> Computed {
        Self::compute_batch(onion.layer(), version_max_len, rows, |_, hash| {
            let new_hash = onion.rehash(hash);
            if verify
                && !bool::from(subtle::ConstantTimeEq::ct_eq(
                    &new_hash[..],
                    &onion.rehash_fresh(hash)[..],
                ))
            {
                return Err((
                    "verify",
                    "the new hash did not recompute to the same value; nothing written".into(),
                ));
            }
            Ok(new_hash)
        })
    }

    /// The new values of a batch: `rehash` gives each pending row's new
    /// hash from its old one, or why the item fails.
    pub fn compute_batch(
        layer: &Layer,
        version_max_len: Option<usize>,
        rows: &[HashRow],
        mut rehash: impl FnMut(&HashRow, &[u8]) -> NewHash,
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
            if layer.is_migrated(version) {
                out.skipped += 1;
                continue;
            }
            let new_version = layer.new_version(version);
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
            let new_hash = match rehash(row, hash) {
                Ok(h) => h,
                Err((code, message)) => {
                    out.failures.push(ItemFailure {
                        item_id: row.id,
                        code,
                        message,
                    });
                    continue;
                }
            };
            let u = &mut out.updates;
            u.ids.push(row.id);
            u.new_hashes.push(new_hash);
            u.old_hashes.push(hash.clone());
            u.old_versions.push(version.clone());
            u.new_versions.push(new_version);
        }
        out
    }
}

impl Scope for HashesJob {
    type Row = HashRow;
    type Computed = Computed;

    fn common(&self) -> &Common {
        &self.sel.common
    }

    fn item_bytes(&self) -> i64 {
        256
    }

    /// The profile the job runs with, unless recorded already.
    fn pin_to_record(&self) -> Option<serde_json::Value> {
        (!self.pin.recorded).then(|| serde_json::json!({ "profile": self.pin }))
    }

    fn row_id(row: &HashRow) -> i64 {
        row.id
    }

    async fn count(&self, c: &Client, after: i64, cap: i64) -> Result<i64, JobError> {
        Ok(self.stmts.hashes_count(c, after, cap).await?)
    }

    async fn id_bounds(&self, c: &Client) -> Result<Option<(i64, i64)>, JobError> {
        let (from, to) = self.sel.common.id_window();
        Ok(self.stmts.hashes_bounds(c, from, to).await?)
    }

    async fn estimate(&self, c: &Client, lo: i64, hi: i64) -> Result<i64, JobError> {
        Ok(self.stmts.hashes_estimate(c, lo, hi).await?)
    }

    async fn fetch(
        &self,
        c: &Client,
        after: i64,
        upto: i64,
        n: i64,
    ) -> Result<Vec<HashRow>, JobError> {
        Ok(self.stmts.hashes_fetch_batch(c, after, upto, n).await?)
    }

    async fn compute(&self, rows: Vec<HashRow>) -> Result<Computed, JobError> {
        self.compute_rows(rows).await
    }

    fn outcome(c: &Computed) -> Outcome {
        Outcome {
            write: c.updates.ids.len() as i64,
            skip: c.skipped,
            fail: c.failures.len() as i64,
        }
    }

    fn growth_bytes(c: &Computed) -> i64 {
        let u = &c.updates;
        total_len(&u.new_hashes) - total_len(&u.old_hashes) + total_len(&u.new_versions)
            - total_len(&u.old_versions)
    }

    /// Compare-and-set, see [`super::write_cas`].
    async fn write(
        &self,
        tx: &Transaction<'_>,
        job_id: i64,
        c: Computed,
    ) -> Result<(BatchCounts, Vec<ItemFailure>), JobError> {
        let parts = (c.updates, c.failures, c.skipped);
        super::write_cas(self, tx, job_id, self.sel.common.dry_run, parts).await
    }

    /// On success: record that the column now uses the profile.
    async fn on_done(&self, tx: &Transaction<'_>, job_id: i64) -> Result<(), JobError> {
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
        let n = rows.len();
        let again = self.compute_rows(rows).await?;
        Ok((n, again.updates, again.failures, again.skipped))
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
        let checked = HashesJob::compute_local(&onion, None, true, &rows);
        assert_eq!(checked.updates.ids, Vec::<i64>::new());
        assert_eq!(checked.failures.len(), 1);
        assert_eq!(checked.failures[0].code, "verify");
        // without the check the wrong value would have been written
        let unchecked = HashesJob::compute_local(&onion, None, false, &rows);
        assert_eq!(unchecked.updates.ids, vec![1]);
    }
}
