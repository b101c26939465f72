//! Verify each source and countersign it, on the blocking pool; one
//! countersignature per subject.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::keys::{SourceKey, TargetKey};
use crate::crypto::sig::{self, SigAlg};
use crate::db::signatures::{NewSignatures, SignatureRow};
use crate::scope::ItemFailure;

type ItemResult<T> = Result<T, (&'static str, String)>;

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

/// The new countersignatures of one batch.
#[derive(Default)]
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
    pub(super) fn one_per_subject(&mut self) {
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

pub(super) fn merge(a: &mut Computed, b: Computed) {
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
