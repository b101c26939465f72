//! The `signatures` scope (SPEC §5.3, §6.3): verify each classical source
//! signature over its payload_hash, countersign the payload_hash with the
//! single active signing key of the target PQ algorithm (the row's
//! `context` as the FIPS 204/205 context string), verify the new
//! signature, and insert it with ON CONFLICT DO NOTHING. Source rows are
//! never changed, so there is nothing to compare-and-set: a countersignature
//! another job inserted first simply wins and the item counts as skipped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio_postgres::GenericClient;

use super::{BatchCounts, ItemFailure, JobError, ScopeContext};
use crate::crypto::sig::{self, SigAlg, Signer};
use crate::db::jobs::ClaimedJob;
use crate::db::signatures::{
    self as dbs, NewSignatures, SignatureFilter, SignatureRow, SigningKeyRow,
};
use crate::keys::LocalKeyring;
use crate::selection::{self, Common};

type ItemResult<T> = Result<T, (&'static str, String)>;

/// The [`SigAlg`] of a `crypto_algorithms` row, if pqmig implements it.
async fn sig_alg_of(c: &impl GenericClient, algo_id: i64) -> Result<Option<SigAlg>, JobError> {
    Ok(crate::db::algorithms::algorithm_by_id(c, algo_id)
        .await?
        .and_then(|a| SigAlg::from_row(&a.name, a.variant.as_deref())))
}

fn fatal(msg: impl Into<String>) -> JobError {
    JobError::Fatal(msg.into())
}

/// The additional data sealing a signing key's private key (SPEC §4).
pub fn signing_key_aad(name: &str) -> Vec<u8> {
    format!("pqmig-signing-key:{name}").into_bytes()
}

/// A signing key of the target algorithm, decrypted.
pub struct TargetKey {
    pub id: i64,
    pub name: String,
    pub scope: Option<String>,
    pub signer: Signer,
}

/// A source signer's key as the computation needs it.
pub enum SourceKey {
    Usable(SigAlg, Vec<u8>),
    /// A `compromised` key: its signatures are integrity failures.
    Compromised(String),
    /// Unknown algorithm or missing row: a data failure.
    Unusable(String),
}

/// What the computation threads share for the whole job.
pub struct Plan {
    pub target_algo_id: i64,
    pub target: SigAlg,
    pub keys: Vec<TargetKey>,
    pub verify: bool,
    /// Source algorithms by `crypto_algorithms.id`.
    pub algos: HashMap<i64, SigAlg>,
    /// Source signers by `signing_keys.id`, resolved once per job.
    pub sources: Mutex<HashMap<i64, Arc<SourceKey>>>,
}

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

/// The new countersignatures of one batch.
pub struct Computed {
    pub rows: NewSignatures,
    pub failures: Vec<ItemFailure>,
    pub skipped: i64,
    /// Of `skipped`: sources whose subject another source of the batch
    /// already countersigns.
    pub duplicates: i64,
}

impl Computed {
    /// One countersignature per (subject_table, subject_pk, context): of
    /// several sources of one subject, the one with the lowest id that
    /// verified is countersigned, the others are skipped and named in its
    /// backup. Sources are walked in id order, so a batch boundary between
    /// two of them gives the same result (the later one finds the subject
    /// countersigned).
    fn one_per_subject(&mut self) {
        let n = &mut self.rows;
        let mut first: HashMap<(&str, &str, &str), usize> = HashMap::new();
        let mut dropped: Vec<(usize, usize)> = Vec::new();
        for i in 0..n.source_ids.len() {
            let key = (
                n.subject_tables[i].as_str(),
                n.subject_pks[i].as_str(),
                n.contexts[i].as_str(),
            );
            match first.get(&key) {
                Some(&winner) => dropped.push((i, winner)),
                None => {
                    first.insert(key, i);
                }
            }
        }
        if dropped.is_empty() {
            return;
        }
        let mut extra: HashMap<usize, Vec<i64>> = HashMap::new();
        for &(i, winner) in &dropped {
            extra.entry(winner).or_default().push(n.source_ids[i]);
        }
        for (winner, ids) in extra {
            n.backup_extras[winner] = serde_json::json!({"duplicate_sources": ids});
        }
        let keep: Vec<bool> = (0..n.source_ids.len())
            .map(|i| !dropped.iter().any(|(d, _)| *d == i))
            .collect();
        fn retain<T>(v: &mut Vec<T>, keep: &[bool]) {
            let mut i = 0;
            v.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        retain(&mut n.source_ids, &keep);
        retain(&mut n.subject_tables, &keep);
        retain(&mut n.subject_pks, &keep);
        retain(&mut n.contexts, &keep);
        retain(&mut n.signing_key_ids, &keep);
        retain(&mut n.signatures, &keep);
        retain(&mut n.payload_hashes, &keep);
        retain(&mut n.hash_algo_ids, &keep);
        retain(&mut n.backup_extras, &keep);
        self.skipped += dropped.len() as i64;
        self.duplicates += dropped.len() as i64;
    }
}

impl SignaturesJob {
    pub async fn prepare(
        c: &impl GenericClient,
        job: &ClaimedJob,
        ctx: &ScopeContext,
    ) -> Result<SignaturesJob, JobError> {
        Self::check(c, job).await?.load_keys(c, ctx).await
    }

    /// Every check that needs only the database.
    pub async fn check(c: &impl GenericClient, job: &ClaimedJob) -> Result<Checked, JobError> {
        let sel = selection::parse_signatures(job.selection.as_ref())
            .map_err(|e| fatal(e.to_string()))?;
        let algo_id = job.target_algo_id.ok_or_else(|| {
            fatal("target_algo_id is required for the signatures scope (ML-DSA or SLH-DSA)")
        })?;
        let algo = crate::db::algorithms::algorithm_by_id(c, algo_id)
            .await?
            .ok_or_else(|| fatal(format!("target algorithm id {algo_id} does not exist")))?;
        let label = algo.label();
        if algo.class != "sig" {
            return Err(fatal(format!(
                "target algorithm {label} (id {algo_id}) is not a signature algorithm"
            )));
        }
        if algo.params.get("pq").and_then(Value::as_bool) != Some(true) {
            return Err(fatal(format!(
                "target algorithm {label} (id {algo_id}) is not post-quantum"
            )));
        }
        algo.check_usable(sel.common.allow_experimental)
            .map_err(fatal)?;
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

/// Decrypt a signing key's private key with its KEK (SPEC §4) and check it
/// against the stored public key.
pub async fn load_signing_key(
    c: &impl GenericClient,
    keyring: &LocalKeyring,
    k: &SigningKeyRow,
    alg: SigAlg,
) -> Result<Signer, String> {
    let (Some(sealed), Some(kek_id)) = (&k.private_key_enc, k.kms_key_id) else {
        return Err(format!(
            "signing key {:?} has no private_key_enc or kms_key_id",
            k.name
        ));
    };
    let kek_row = crate::db::kms::kms_keys_by_id(c, &[kek_id])
        .await
        .map_err(|e| crate::db::error_chain(&e))?
        .pop()
        .ok_or_else(|| {
            format!(
                "signing key {:?}: kms_keys row {kek_id} does not exist",
                k.name
            )
        })?;
    let kek = crate::keys::kms_secret(keyring, &kek_row, "AES-256-GCM")
        .map_err(|e| format!("signing key {:?}: {e}", k.name))?;
    let kek = zeroize::Zeroizing::new(
        <[u8; 32]>::try_from(&kek.bytes[..]).map_err(|_| "KEK size".to_owned())?,
    );
    let seed = crate::crypto::aead::open(&kek, sealed, &signing_key_aad(&k.name))
        .map_err(|_| format!("signing key {:?}: private_key_enc does not open with its KEK (wrong key or tampered)", k.name))?;
    let signer =
        Signer::from_seed(alg, &seed).map_err(|e| format!("signing key {:?}: {e}", k.name))?;
    if signer.public_key() != k.public_key.as_slice() {
        return Err(format!(
            "signing key {:?}: its private key does not match its public_key",
            k.name
        ));
    }
    Ok(signer)
}

impl Checked {
    /// Decrypt the target keys once per job (zeroized when the job ends).
    pub async fn load_keys(
        self,
        c: &impl GenericClient,
        ctx: &ScopeContext,
    ) -> Result<SignaturesJob, JobError> {
        let path = ctx.keyring.as_ref().ok_or_else(|| {
            fatal("no keyring configured (keys.keyring or PQMIG_KEYRING) to unseal the signing key")
        })?;
        let keyring = LocalKeyring::load(path).map_err(|e| fatal(e.to_string()))?;
        let mut keys = Vec::with_capacity(self.keys.len());
        for k in &self.keys {
            let signer = load_signing_key(c, &keyring, k, self.target)
                .await
                .map_err(fatal)?;
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

impl Plan {
    /// The key that countersigns rows of `table`: scoped to it, else the
    /// unscoped one.
    fn key_for(&self, table: &str) -> Option<&TargetKey> {
        self.keys
            .iter()
            .find(|k| k.scope.as_deref() == Some(table))
            .or_else(|| self.keys.iter().find(|k| k.scope.is_none()))
    }

    fn process(&self, row: &SignatureRow) -> ItemResult<Option<(i64, Vec<u8>)>> {
        if row.countersigned {
            return Ok(None);
        }
        let data = |m: String| ("data", m);
        if row.context.len() > 255 {
            return Err(data(format!(
                "the context is {} bytes; ML-DSA and SLH-DSA take at most 255",
                row.context.len()
            )));
        }
        let kid = row
            .signing_key_id
            .ok_or_else(|| data("the source row has no signing_key_id".into()))?;
        let source = self
            .sources
            .lock()
            .expect("source keys")
            .get(&kid)
            .cloned()
            .expect("resolved before compute");
        match &*source {
            SourceKey::Unusable(m) => return Err(data(m.clone())),
            SourceKey::Compromised(name) => {
                return Err((
                    "integrity",
                    format!("signed by compromised key {name:?}: not countersigned"),
                ));
            }
            SourceKey::Usable(alg, pk) => {
                let Some(row_alg) = self.algos.get(&row.algo_id) else {
                    return Err(data(format!(
                        "algorithm {} cannot be verified",
                        row.algo_id
                    )));
                };
                if row_alg != alg {
                    return Err(data(format!(
                        "the row says {} but signing key {kid} is {}",
                        row_alg.alias(),
                        alg.alias()
                    )));
                }
                // A PQ source (a move from ML-DSA-44 to -87, say) was signed
                // with the row's context, as pqmig countersigns.
                let ctx: &[u8] = if alg.is_pq() {
                    row.context.as_bytes()
                } else {
                    &[]
                };
                if !sig::verify(*alg, pk, &row.payload_hash, ctx, &row.signature) {
                    return Err((
                        "integrity",
                        format!(
                            "the {} source signature does not verify: not countersigned",
                            alg.alias()
                        ),
                    ));
                }
            }
        }
        let key = self.key_for(&row.subject_table).ok_or_else(|| {
            data(format!(
                "no active signing key serves subject_table {:?}",
                row.subject_table
            ))
        })?;
        let ctx = row.context.as_bytes();
        let new = key
            .signer
            .sign(&row.payload_hash, ctx)
            .map_err(|e| data(e.to_string()))?;
        if self.verify
            && !sig::verify(
                self.target,
                key.signer.public_key(),
                &row.payload_hash,
                ctx,
                &new,
            )
        {
            return Err((
                "verify",
                "the new signature did not verify; nothing written".into(),
            ));
        }
        Ok(Some((key.id, new)))
    }

    pub fn compute(&self, rows: &[SignatureRow]) -> Computed {
        let mut out = Computed {
            rows: NewSignatures::default(),
            failures: Vec::new(),
            skipped: 0,
            duplicates: 0,
        };
        for row in rows {
            match self.process(row) {
                Ok(None) => out.skipped += 1,
                Err((code, message)) => out.failures.push(ItemFailure {
                    item_id: row.id,
                    code,
                    message,
                }),
                Ok(Some((key, signature))) => {
                    let n = &mut out.rows;
                    n.source_ids.push(row.id);
                    n.subject_tables.push(row.subject_table.clone());
                    n.subject_pks.push(row.subject_pk.clone());
                    n.contexts.push(row.context.clone());
                    n.signing_key_ids.push(key);
                    n.signatures.push(signature);
                    n.payload_hashes.push(row.payload_hash.clone());
                    n.hash_algo_ids.push(row.hash_algo_id);
                    n.backup_extras.push(serde_json::json!({}));
                }
            }
        }
        out
    }
}

fn merge(a: &mut Computed, b: Computed) {
    let (n, m) = (&mut a.rows, b.rows);
    n.source_ids.extend(m.source_ids);
    n.subject_tables.extend(m.subject_tables);
    n.subject_pks.extend(m.subject_pks);
    n.contexts.extend(m.contexts);
    n.signing_key_ids.extend(m.signing_key_ids);
    n.signatures.extend(m.signatures);
    n.payload_hashes.extend(m.payload_hashes);
    n.hash_algo_ids.extend(m.hash_algo_ids);
    n.backup_extras.extend(m.backup_extras);
    a.failures.extend(b.failures);
    a.skipped += b.skipped;
    a.duplicates += b.duplicates;
}

impl SignaturesJob {
    pub fn common(&self) -> &Common {
        &self.sel.common
    }

    /// Bytes one countersignature holds in memory at most.
    pub fn item_bytes(&self) -> i64 {
        match self.plan.target {
            SigAlg::SlhDsaSha2_128f => 17_088 + 300,
            SigAlg::SlhDsaSha2_128s => 7_856 + 300,
            _ => 4_627 + 300,
        }
    }

    pub async fn count(
        &self,
        c: &impl GenericClient,
        after: i64,
        cap: i64,
    ) -> Result<i64, JobError> {
        Ok(dbs::signatures_count(c, &self.filter, after, cap).await?)
    }

    /// The next batch, with every source signer it needs resolved.
    pub async fn fetch(
        &self,
        c: &impl GenericClient,
        after: i64,
        n: i64,
    ) -> Result<Vec<SignatureRow>, JobError> {
        let rows = dbs::signatures_fetch_batch(c, &self.filter, self.plan.target_algo_id, after, n)
            .await?;
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
    pub async fn compute_off_thread(&self, rows: Vec<SignatureRow>) -> Result<Computed, JobError> {
        let empty = Computed {
            rows: NewSignatures::default(),
            failures: Vec::new(),
            skipped: 0,
            duplicates: 0,
        };
        let mut out =
            super::compute_parallel(&self.plan, rows, 4, empty, Plan::compute, merge).await?;
        out.one_per_subject();
        Ok(out)
    }

    /// Insert the batch's countersignatures in the caller's transaction.
    pub async fn write(
        &self,
        tx: &impl GenericClient,
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

/// `pqmig verify`: every countersignature the job recorded must verify
/// under its signer's public key with its context (no private key needed).
/// Returns (checked, deleted since, mismatches).
pub async fn verify_job(
    c: &impl GenericClient,
    job_id: i64,
) -> Result<(i64, i64, Vec<(i64, String)>), JobError> {
    let (mut after, mut checked, mut gone, mut bad) = (i64::MIN, 0i64, 0i64, Vec::new());
    let mut algos: HashMap<i64, Option<SigAlg>> = HashMap::new();
    loop {
        let (rows, last, seen) = dbs::countersignatures_of_job(c, job_id, after, 500).await?;
        let Some(last) = last else { break };
        after = last;
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
