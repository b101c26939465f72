//! The `signatures` scope (SPEC §5.3, §6.3): verify each source signature
//! over its payload_hash, countersign the payload_hash with the single
//! active signing key of the target PQ algorithm (the row's `context` as
//! the FIPS 204/205 context string), verify the new signature, and insert
//! it with ON CONFLICT DO NOTHING. Source rows are never changed, so there
//! is nothing to compare-and-set: a countersignature another job inserted
//! first simply wins and the item counts as skipped.
//!
//! - [`keys`]: target signing keys (unsealed) and source signers.
//! - [`compute`]: verify and countersign a batch, one per subject.
//! - [`aftercare`]: `verify` and `rollback` of a finished job.

mod aftercare;
mod compute;
pub mod keys;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_postgres::{Client, GenericClient, Transaction};

pub use aftercare::Aftercare;
pub use compute::{Computed, Plan};
pub use keys::load_signing_key;
use keys::{SourceKey, TargetKey, sig_alg_of};

use super::{
    BatchCounts, ItemFailure, JobError, Outcome, Scope, ScopeContext, TargetRule, fatal,
    target_algorithm, total_len,
};
use crate::crypto::sig::SigAlg;
use crate::db::signatures::{self as dbs, SignatureFilter, SignatureRow, SigningKeyRow};
use crate::job::JobSpec;
use crate::selection::{self, Common};

/// A signatures job checked against the database, its keys not loaded.
pub struct Checked {
    sel: selection::Signatures,
    target_algo_id: i64,
    target: SigAlg,
    from_algo_ids: Vec<i64>,
    algos: HashMap<i64, SigAlg>,
    keys: Vec<SigningKeyRow>,
}

pub struct SignaturesJob {
    sel: selection::Signatures,
    filter: SignatureFilter,
    plan: Arc<Plan>,
}

impl SignaturesJob {
    pub async fn prepare(
        c: &impl GenericClient,
        spec: &JobSpec,
        ctx: &ScopeContext,
    ) -> Result<SignaturesJob, JobError> {
        Self::check(c, spec).await?.load_keys(c, ctx).await
    }

    /// Every check that needs only the database.
    pub async fn check(c: &impl GenericClient, spec: &JobSpec) -> Result<Checked, JobError> {
        let sel = selection::parse_signatures(spec.selection.as_ref())
            .map_err(|e| fatal(e.to_string()))?;
        let algo_id = spec.target_algo_id.ok_or_else(|| {
            fatal("target_algo_id is required for the signatures scope (ML-DSA or SLH-DSA)")
        })?;
        let rule = TargetRule {
            class: "sig",
            name: None,
            needs: "a signature algorithm",
            pq: true,
        };
        let algo = target_algorithm(c, spec, algo_id, rule, sel.common.allow_experimental).await?;
        let label = algo.label();
        let target = SigAlg::from_row(&algo.name, algo.variant.as_deref())
            .filter(|a| a.is_pq())
            .ok_or_else(|| {
                fatal(format!(
                    "target algorithm {label} is not supported for signing"
                ))
            })?;

        let from_algo_ids = match &sel.from_algos {
            None => dbs::classical_sig_algorithms(c).await?,
            Some(aliases) => {
                let mut ids = Vec::new();
                for (i, a) in aliases.iter().enumerate() {
                    let id = crate::db::algorithms::algorithm_by_alias(c, a)
                        .await?
                        .ok_or_else(|| {
                            fatal(format!(
                                "selection.from_algos[{i}]: unknown algorithm alias {a:?}"
                            ))
                        })?;
                    if id == algo_id {
                        return Err(fatal(format!(
                            "selection.from_algos[{i}]: {a:?} is the target algorithm itself"
                        )));
                    }
                    ids.push(id);
                }
                ids
            }
        };
        let mut algos = HashMap::new();
        for id in &from_algo_ids {
            if let Some(a) = crate::db::algorithms::algorithm_by_id(c, *id).await?
                && let Some(s) = SigAlg::from_row(&a.name, a.variant.as_deref())
            {
                // SPEC §6.1 "no silent downgrade".
                if target.is_downgrade_from(s) && !sel.allow_downgrade {
                    return Err(fatal(format!(
                        "selection.from_algos: {} sources are NIST level {}, countersigning them with {} (level {}) would weaken them: set selection.allow_downgrade to do it anyway",
                        s.alias(),
                        s.nist_level(),
                        target.alias(),
                        target.nist_level()
                    )));
                }
                algos.insert(*id, s);
            }
        }

        // SPEC §6.3: the single active key of the target algorithm; a key
        // with a scope serves only rows of that subject_table.
        let keys = dbs::signing_keys_active(c, algo_id).await?;
        if keys.is_empty() {
            return Err(fatal(format!(
                "no active signing key for the target algorithm {label}: create one with `pqmig keys signing`"
            )));
        }
        let mut by_scope: HashMap<Option<&str>, Vec<&str>> = HashMap::new();
        for k in &keys {
            by_scope
                .entry(k.scope.as_deref())
                .or_default()
                .push(&k.name);
        }
        if let Some((scope, names)) = by_scope.iter().find(|(_, v)| v.len() > 1) {
            return Err(fatal(format!(
                "{} active {label} signing keys for scope {}: {} (exactly one may be active; retire the others)",
                names.len(),
                scope.map_or("(any table)".to_owned(), |s| format!("{s:?}")),
                names.join(", ")
            )));
        }
        if let Some(t) = &sel.subject_table
            && !keys
                .iter()
                .any(|k| k.scope.is_none() || k.scope.as_deref() == Some(t.as_str()))
        {
            return Err(fatal(format!(
                "no active {label} signing key serves subject_table {t:?} (every active key is scoped to another table)"
            )));
        }
        Ok(Checked {
            sel,
            target_algo_id: algo_id,
            target,
            from_algo_ids,
            algos,
            keys,
        })
    }
}

impl Checked {
    /// Decrypt the target keys once per job (zeroized when the job ends).
    pub async fn load_keys(
        self,
        c: &impl GenericClient,
        ctx: &ScopeContext,
    ) -> Result<SignaturesJob, JobError> {
        let keyring = ctx.keys("unseal the signing key")?;
        let mut keys = Vec::with_capacity(self.keys.len());
        for k in &self.keys {
            let signer = load_signing_key(c, &keyring, ctx.pkcs11.as_ref(), k, self.target).await?;
            keys.push(TargetKey {
                id: k.id,
                name: k.name.clone(),
                scope: k.scope.clone(),
                signer,
            });
        }
        let filter = SignatureFilter::new(&self.sel, &self.from_algo_ids);
        Ok(SignaturesJob {
            filter,
            plan: Arc::new(Plan {
                target_algo_id: self.target_algo_id,
                target: self.target,
                keys,
                verify: self.sel.common.verify,
                algos: self.algos,
                sources: Mutex::new(HashMap::new()),
            }),
            sel: self.sel,
        })
    }
}

impl Scope for SignaturesJob {
    type Row = SignatureRow;
    type Computed = Computed;

    fn common(&self) -> &Common {
        &self.sel.common
    }

    /// A countersignature and its row.
    fn item_bytes(&self) -> i64 {
        match self.plan.target {
            SigAlg::SlhDsaSha2_128f => 17_088 + 300,
            SigAlg::SlhDsaSha2_128s => 7_856 + 300,
            _ => 4_627 + 300,
        }
    }

    fn row_id(row: &SignatureRow) -> i64 {
        row.id
    }

    async fn count(&self, c: &Client, after: i64, cap: i64) -> Result<i64, JobError> {
        Ok(dbs::signatures_count(c, &self.filter, after, cap).await?)
    }

    /// The next batch, with every source signer it needs resolved.
    async fn id_bounds(&self, c: &Client) -> Result<Option<(i64, i64)>, JobError> {
        let (from, to) = self.sel.common.id_window();
        Ok(dbs::signatures_bounds(c, from, to).await?)
    }

    async fn estimate(&self, c: &Client, lo: i64, hi: i64) -> Result<i64, JobError> {
        Ok(dbs::signatures_estimate(c, &self.filter, lo, hi).await?)
    }

    async fn fetch(
        &self,
        c: &Client,
        after: i64,
        upto: i64,
        n: i64,
    ) -> Result<Vec<SignatureRow>, JobError> {
        let target = self.plan.target_algo_id;
        let rows = dbs::signatures_fetch_batch(c, &self.filter, target, after, upto, n).await?;
        let mut wanted: Vec<i64> = {
            let known = self.plan.sources.lock().expect("source keys");
            rows.iter()
                .filter_map(|r| r.signing_key_id)
                .filter(|id| !known.contains_key(id))
                .collect()
        };
        wanted.sort_unstable();
        wanted.dedup();
        if !wanted.is_empty() {
            let found = dbs::signing_keys_by_id(c, &wanted).await?;
            let mut algos: HashMap<i64, Option<SigAlg>> = HashMap::new();
            for k in &found {
                if let std::collections::hash_map::Entry::Vacant(e) = algos.entry(k.algo_id) {
                    e.insert(sig_alg_of(c, k.algo_id).await?);
                }
            }
            let mut known = self.plan.sources.lock().expect("source keys");
            for id in wanted {
                let key = match found.iter().find(|k| k.id == id) {
                    None => SourceKey::Unusable(format!("signing key {id} does not exist")),
                    Some(k) if k.status == "compromised" => SourceKey::Compromised(k.name.clone()),
                    Some(k) => match algos.get(&k.algo_id).copied().flatten() {
                        Some(a) => SourceKey::Usable(a, k.public_key.clone()),
                        None => SourceKey::Unusable(format!(
                            "signing key {:?} uses an algorithm pqmig cannot verify",
                            k.name
                        )),
                    },
                };
                known.insert(id, Arc::new(key));
            }
        }
        Ok(rows)
    }

    /// Verify and sign across the cores on blocking threads.
    async fn compute(&self, rows: Vec<SignatureRow>) -> Result<Computed, JobError> {
        let mut out = super::compute_parallel(
            &self.plan,
            rows,
            4,
            Computed::default(),
            Plan::compute,
            compute::merge,
        )
        .await?;
        out.one_per_subject();
        Ok(out)
    }

    fn outcome(c: &Computed) -> Outcome {
        Outcome {
            write: c.rows.source_ids.len() as i64,
            skip: c.skipped,
            fail: c.failures.len() as i64,
        }
    }

    /// One row per countersignature (with ~60 bytes of row overhead).
    fn growth_bytes(c: &Computed) -> i64 {
        let r = &c.rows;
        total_len(&r.signatures)
            + total_len(&r.payload_hashes)
            + total_len(&r.subject_tables)
            + total_len(&r.subject_pks)
            + total_len(&r.contexts)
            + 60 * r.source_ids.len() as i64
    }

    /// Insert the batch's countersignatures in the caller's transaction.
    async fn write(
        &self,
        tx: &Transaction<'_>,
        job_id: i64,
        c: Computed,
    ) -> Result<(BatchCounts, Vec<ItemFailure>), JobError> {
        let wanted = c.rows.source_ids.len() as i64;
        let inserted = if self.sel.common.dry_run {
            wanted
        } else {
            dbs::signatures_insert_batch(tx, job_id, self.plan.target_algo_id, &c.rows)
                .await?
                .len() as i64
        };
        let counts = BatchCounts {
            migrated: inserted,
            // Countersigned meanwhile by another job: already in the target state.
            skipped: c.skipped + (wanted - inserted),
            duplicates: c.duplicates,
            failed: c.failures.len() as i64,
            integrity: c.failures.iter().filter(|f| f.code == "integrity").count() as i64,
        };
        Ok((counts, c.failures))
    }
}
