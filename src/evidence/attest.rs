//! Signed job attestations (README "Evidence for auditors"): an in-toto
//! Statement v1 whose predicate records a `done` job — its definition,
//! counts, times, verify result and audit-chain head — and whose subject
//! is the RFC 9162 Merkle root over (item id, SHA-256 of the value the job
//! stored) of every item still as the job left it. The Statement travels
//! in a DSSE envelope signed with ML-DSA-65 (and Ed25519 when such a key
//! exists) by `signing_keys` rows of scope `attestation`.
//!
//! The Statement's subject is the `.leaves` file written beside the
//! envelope (its SHA-256): the leaves themselves, so an item can be proven
//! in or out, and a changed database compared item by item, after the rows
//! moved on. The predicate carries the Merkle root over the same leaves.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::Leaf;
use super::dsse::{self, Envelope};
use super::merkle::{self, Hash};
use crate::crypto::sig::{self, SigAlg};
use crate::db::evidence::{self as dbe, AttestedJob};
use crate::job::Purpose;
use crate::scope::ScopeContext;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://pqmig.dev/attestation/migration-job/v1";
/// The first line of a `.leaves` file; 40-byte leaves follow, in id order.
const LEAVES_MAGIC: &[u8] = b"pqmig-leaves-v1\n";

/// Why no attestation was made or checked.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// Refused for a reason the operator can fix (exit 2).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

fn refused(msg: impl Into<String>) -> AttestError {
    AttestError::Refused(msg.into())
}

/// An envelope and the leaves file it names as its subject.
pub struct Attestation {
    pub envelope: Envelope,
    /// The `.leaves` file's bytes.
    pub leaves_file: Vec<u8>,
    pub count: usize,
    pub root: Hash,
    /// The database clock when it was made, `YYYYMMDDTHHMMSSZ` (file names).
    pub stamp: String,
}

/// What the leaves of a job make: the `.leaves` file and the Merkle root,
/// in one pass (the root in O(log n) memory).
pub fn leaves_file(leaves: &[Leaf]) -> (Vec<u8>, Hash) {
    let mut raw = Vec::with_capacity(LEAVES_MAGIC.len() + 40 * leaves.len());
    raw.extend_from_slice(LEAVES_MAGIC);
    let mut tree = merkle::Builder::default();
    for (id, v) in leaves {
        let leaf = merkle::leaf(*id, v);
        raw.extend_from_slice(&leaf);
        tree.push(merkle::leaf_hash(&leaf));
    }
    (raw, tree.root())
}

/// The subject name of job `id`'s leaves file.
fn subject_name(job_id: i64) -> String {
    format!("pqmig-job-{job_id}.leaves")
}

/// The job as the predicate records it (and as verify compares it).
pub fn job_facts(job: &AttestedJob) -> Value {
    let count = |k: &str| {
        job.result
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    json!({
        "id": job.id,
        "scope": job.scope,
        "status": job.status,
        "selection": job.selection,
        "target_algorithm": job.target_algorithm,
        "target_policy": job.target_policy.as_ref().map(|(id, name)| json!({"id": id, "name": name})),
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "counts": {
            "processed": job.processed,
            "migrated": count("migrated"),
            "skipped": count("skipped"),
            "failed": count("failed"),
        },
    })
}

/// The verify result: items verified before each write (the selection's
/// `verify`, on unless turned off) and the last passed `pqmig verify`.
fn verify_facts(job: &AttestedJob) -> Value {
    let before_write = job
        .selection
        .as_ref()
        .and_then(|s| s.get("verify"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let verified = job
        .result
        .as_ref()
        .and_then(|r| r.get("verified"))
        .cloned()
        .unwrap_or(Value::Null);
    json!({"before_write": before_write, "pqmig_verify": verified})
}

fn key_id(public_key: &[u8]) -> String {
    format!("sha256:{}", crate::hex(&Sha256::digest(public_key)))
}

/// Leaf hashes of (id, value hash) pairs, in their order.
pub fn leaf_hashes(leaves: &[Leaf]) -> Vec<Hash> {
    leaves
        .iter()
        .map(|(id, v)| merkle::leaf_hash(&merkle::leaf(*id, v)))
        .collect()
}

/// The job's leaves as the database holds them now.
pub async fn current_leaves(c: &Client, job: &AttestedJob) -> Result<Vec<Leaf>, AttestError> {
    let spec = crate::db::jobs::job_spec(c, job.id, Purpose::Aftercare)
        .await?
        .ok_or_else(|| refused(format!("no job with id {}", job.id)))?
        .map_err(|e| refused(format!("job {}: {e}", job.id)))?;
    let ctx = ScopeContext::default();
    let aftercare = spec
        .scope
        .aftercare(c, &spec, &ctx, false)
        .await
        .map_err(|e| AttestError::Failed(format!("job {}: {e}", job.id)))?;
    let mut leaves = aftercare
        .leaves(c, job.id)
        .await
        .map_err(|e| refused(format!("job {}: its items cannot be listed: {e}", job.id)))?;
    leaves.sort_unstable_by_key(|l| l.0);
    leaves.dedup_by_key(|l| l.0);
    Ok(leaves)
}

/// Make the attestation of a `done` job, signed by the active attestation
/// keys (an ML-DSA-65 one is required). Everything it records is read in
/// one `REPEATABLE READ` snapshot, so it describes one state of the
/// database.
pub async fn attest(
    c: &Client,
    keys: &ScopeContext,
    job_id: i64,
) -> Result<Attestation, AttestError> {
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let made = attest_in_snapshot(c, keys, job_id).await;
    c.batch_execute(if made.is_ok() { "COMMIT" } else { "ROLLBACK" })
        .await?;
    made
}

async fn attest_in_snapshot(
    c: &Client,
    keys: &ScopeContext,
    job_id: i64,
) -> Result<Attestation, AttestError> {
    let job = dbe::attested_job(c, job_id)
        .await?
        .ok_or_else(|| refused(format!("no job with id {job_id}")))?;
    if job.status != "done" {
        return Err(refused(format!(
            "job {job_id} is {}: only a done job is attested (its counts and items are final only then)",
            job.status
        )));
    }
    if job
        .result
        .as_ref()
        .is_some_and(|r| r.get("rolled_back").is_some())
    {
        return Err(refused(format!(
            "job {job_id} was rolled back: what it wrote is undone, there is nothing to attest"
        )));
    }
    let signers = signers(c, keys).await?;
    let leaves = current_leaves(c, &job).await?;
    let migrated = job_facts(&job)["counts"]["migrated"].as_i64().unwrap_or(0);
    if leaves.is_empty() && migrated > 0 {
        return Err(refused(format!(
            "job {job_id} migrated {migrated} items but none can be listed now (its backups were purged, or every item changed since): attest before `pqmig purge-backups` (evidence.attest_dir does it when the job ends)"
        )));
    }
    let count = leaves.len();
    let (file, root) = tokio::task::spawn_blocking(move || leaves_file(&leaves))
        .await
        .map_err(|e| AttestError::Failed(format!("hashing the leaves: {e}")))?;
    let head = dbe::chain_head(c, job_id).await?;
    let attested_at = dbe::now(c).await?;
    let keys: Vec<Value> = signers
        .iter()
        .map(|(name, s)| {
            json!({
                "keyid": key_id(s.public_key()),
                "name": name,
                "algorithm": s.alg().alias(),
                "public_key": dsse::encode_sig(s.public_key()),
            })
        })
        .collect();
    let statement = json!({
        "_type": STATEMENT_TYPE,
        "subject": [{
            "name": subject_name(job_id),
            "digest": {"sha256": crate::hex(&Sha256::digest(&file))},
        }],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "job": job_facts(&job),
            "verify": verify_facts(&job),
            "audit_chain": head.as_ref().map(|(n, h)| json!({"chain_no": n, "head": crate::hex(h)})),
            "items": {
                "tree": "RFC 9162 SHA-256",
                "leaf": "item id (8 bytes, big-endian two's complement) || SHA-256(stored value)",
                "order": "ascending item id (signed 64-bit), each id once",
                "count": count,
                // Migrated items no longer as the job left them (changed
                // or re-migrated since): not covered.
                "missing": (migrated - count as i64).max(0),
                "root": crate::hex(&root),
            },
            "attested_at": attested_at,
            "attester": {"name": "pqmig", "version": env!("CARGO_PKG_VERSION")},
            "keys": keys,
        },
    });
    let body = serde_json::to_vec(&statement).map_err(|e| AttestError::Failed(e.to_string()))?;
    let mut envelope = Envelope::new(dsse::IN_TOTO, &body);
    let signed = dsse::pae(dsse::IN_TOTO, &body);
    for (_, s) in &signers {
        let sig = s
            .sign(&signed, b"")
            .map_err(|e| AttestError::Failed(format!("signing: {e}")))?;
        envelope.signatures.push(dsse::Signature {
            keyid: key_id(s.public_key()),
            sig: dsse::encode_sig(&sig),
        });
    }
    let stamp: String = attested_at
        .chars()
        .take(19)
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect::<String>()
        + "Z";
    Ok(Attestation {
        envelope,
        leaves_file: file,
        count,
        root,
        stamp,
    })
}

/// The active attestation keys, unsealed: the newest ML-DSA-65 one, then
/// the newest Ed25519 one if any.
async fn signers(
    c: &Client,
    ctx: &ScopeContext,
) -> Result<Vec<(String, sig::Signer)>, AttestError> {
    let keys = dbe::attestation_keys(c).await?;
    let pick = |alg: SigAlg| {
        keys.iter()
            .find(|k| k.row.status == "active" && k.algorithm.as_deref() == Some(alg.alias()))
    };
    let Some(pq) = pick(SigAlg::MlDsa65) else {
        return Err(refused(
            "no active ML-DSA-65 signing key with scope 'attestation': create one with `pqmig keys signing --algorithm ML-DSA-65 --name NAME --kek KEK --scope attestation`",
        ));
    };
    let keyring = ctx
        .keys("unseal the attestation key")
        .map_err(|e| refused(e.to_string()))?;
    let mut out = Vec::new();
    for (k, alg) in [
        (Some(pq), SigAlg::MlDsa65),
        (pick(SigAlg::Ed25519), SigAlg::Ed25519),
    ] {
        let Some(k) = k else { continue };
        let signer = crate::scope::signatures::keys::load_signing_key(
            c,
            &keyring,
            ctx.pkcs11.as_ref(),
            &k.row,
            alg,
        )
        .await
        .map_err(|e| refused(e.to_string()))?;
        out.push((k.row.name.clone(), signer));
    }
    Ok(out)
}

/// Write the envelope to `path` and its leaves beside it (`path.leaves`),
/// each through a temporary file of its own, synced, then renamed into
/// place: a reader sees a whole file or none.
pub fn write(att: &Attestation, path: &Path) -> std::io::Result<PathBuf> {
    let leaves_path = leaves_path(path);
    let mut json = serde_json::to_vec_pretty(&att.envelope).map_err(std::io::Error::other)?;
    json.push(b'\n');
    replace(&leaves_path, &att.leaves_file)?;
    replace(path, &json)?;
    Ok(leaves_path)
}

fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::File::create_new(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

pub fn leaves_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".leaves");
    PathBuf::from(p)
}

/// Read a `.leaves` file: its leaves, and the SHA-256 of its bytes.
pub fn read_leaves(path: &Path) -> Result<(Vec<Leaf>, Hash), String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let digest: Hash = Sha256::digest(&raw).into();
    let body = raw
        .strip_prefix(LEAVES_MAGIC)
        .ok_or_else(|| format!("{}: not a pqmig leaves file", path.display()))?;
    if body.len() % 40 != 0 {
        return Err(format!(
            "{}: truncated (not whole 40-byte leaves)",
            path.display()
        ));
    }
    let leaves = body
        .chunks_exact(40)
        .map(|c| {
            let id = i64::from_be_bytes(c[..8].try_into().expect("8 bytes"));
            let v: Hash = c[8..].try_into().expect("32 bytes");
            (id, v)
        })
        .collect();
    Ok((leaves, digest))
}

/// An envelope read back: its statement, and which signatures verify.
pub struct Opened {
    pub statement: Value,
    /// (key name, algorithm) of each signature that verified.
    pub signed_by: Vec<(String, String)>,
}

/// Check the envelope's signatures. The keys are this database's
/// `signing_keys` of scope `attestation`, matched by key id (`sha256:` and
/// the hex SHA-256 of the public key); with `trusted` key ids (pinned by
/// whoever checks, from outside the database) every signature must be by
/// one of them. Every signature must verify, one with ML-DSA-65, and no
/// row holding a signing public key may be `compromised`.
pub async fn open(
    c: &Client,
    envelope: &Envelope,
    trusted: &[String],
) -> Result<Opened, AttestError> {
    let failed = |m: String| AttestError::Failed(m);
    if envelope.payload_type != dsse::IN_TOTO {
        return Err(failed(format!(
            "payloadType is {:?}, not {:?}",
            envelope.payload_type,
            dsse::IN_TOTO
        )));
    }
    let body = envelope.body().map_err(AttestError::Failed)?;
    let signed = dsse::pae(&envelope.payload_type, &body);
    let keys = dbe::attestation_keys(c).await?;
    let mut signed_by = Vec::new();
    for s in &envelope.signatures {
        if !trusted.is_empty() && !trusted.contains(&s.keyid) {
            return Err(failed(format!(
                "signature by {}: not one of the trusted keys given",
                s.keyid
            )));
        }
        let rows: Vec<_> = keys
            .iter()
            .filter(|k| key_id(&k.row.public_key) == s.keyid)
            .collect();
        if let Some(bad) = rows.iter().find(|k| k.row.status == "compromised") {
            return Err(failed(format!(
                "signing key {:?} is marked compromised: its signatures prove nothing",
                bad.row.name
            )));
        }
        let key = rows.first().ok_or_else(|| {
            failed(format!(
                "signature by {}: no signing key of scope 'attestation' in this database has that key id",
                s.keyid
            ))
        })?;
        let alg = key
            .algorithm
            .as_deref()
            .and_then(SigAlg::from_alias)
            .ok_or_else(|| failed(format!("signing key {:?}: unknown algorithm", key.row.name)))?;
        let raw = dsse::decode_sig(&s.sig).map_err(AttestError::Failed)?;
        if !sig::verify(alg, &key.row.public_key, &signed, b"", &raw) {
            return Err(failed(format!(
                "the {} signature by key {:?} does not verify: the envelope was altered or signed by another key",
                alg.alias(),
                key.row.name
            )));
        }
        signed_by.push((key.row.name.clone(), alg.alias().to_owned()));
    }
    if !signed_by.iter().any(|(_, a)| a == SigAlg::MlDsa65.alias()) {
        return Err(failed(
            "no ML-DSA-65 signature: an attestation must carry one".into(),
        ));
    }
    let statement: Value =
        serde_json::from_slice(&body).map_err(|e| failed(format!("payload is not JSON: {e}")))?;
    if statement["_type"] != STATEMENT_TYPE || statement["predicateType"] != PREDICATE_TYPE {
        return Err(failed(format!(
            "not a pqmig job attestation (_type {}, predicateType {})",
            statement["_type"], statement["predicateType"]
        )));
    }
    Ok(Opened {
        statement,
        signed_by,
    })
}

/// Where two JSON values differ, as `path: attested A, now B` lines.
pub fn differences(path: &str, attested: &Value, now: &Value, out: &mut Vec<String>) {
    match (attested, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let null = Value::Null;
                differences(
                    &format!("{path}.{k}"),
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(format!("{path}: attested {a}, now {b}")),
        _ => {}
    }
}

/// The first item where two id-ordered leaf lists differ, described.
pub fn first_difference(attested: &[Leaf], now: &[Leaf]) -> Option<String> {
    let (mut i, mut j) = (0, 0);
    loop {
        match (attested.get(i), now.get(j)) {
            (None, None) => return None,
            (Some(a), None) => {
                return Some(format!(
                    "item {}: attested, now not as the job left it (changed or gone)",
                    a.0
                ));
            }
            (None, Some(b)) => {
                return Some(format!(
                    "item {}: not attested, now counted as the job's",
                    b.0
                ));
            }
            (Some(a), Some(b)) if a.0 < b.0 => {
                return Some(format!(
                    "item {}: attested, now not as the job left it (changed or gone)",
                    a.0
                ));
            }
            (Some(a), Some(b)) if a.0 > b.0 => {
                return Some(format!(
                    "item {}: not attested, now counted as the job's",
                    b.0
                ));
            }
            (Some(a), Some(b)) if a.1 != b.1 => {
                return Some(format!(
                    "item {}: its stored value differs from the attested one",
                    a.0
                ));
            }
            _ => {
                i += 1;
                j += 1;
            }
        }
    }
}

/// The inclusion proof of `item` in `leaves`, or why there is none (with
/// the proofs of the leaves on either side, which show it is absent).
pub fn prove(leaves: &[Leaf], item: i64) -> Result<Value, Value> {
    let hashes = leaf_hashes(leaves);
    let root = merkle::root(&hashes);
    let proof_of = |m: usize| {
        let path = merkle::proof(&hashes, m);
        json!({
            "item": leaves[m].0,
            "leaf_index": m,
            "tree_size": leaves.len(),
            "leaf": crate::hex(&merkle::leaf(leaves[m].0, &leaves[m].1)),
            "value_sha256": crate::hex(&leaves[m].1),
            "path": path.iter().map(|h| crate::hex(h)).collect::<Vec<_>>(),
            "root": crate::hex(&root),
        })
    };
    match leaves.binary_search_by_key(&item, |l| l.0) {
        Ok(m) => Ok(proof_of(m)),
        Err(at) => {
            let mut neighbours = Vec::new();
            if at > 0 {
                neighbours.push(proof_of(at - 1));
            }
            if at < leaves.len() {
                neighbours.push(proof_of(at));
            }
            Err(json!({
                "item": item,
                "included": false,
                "root": crate::hex(&root),
                "neighbours": neighbours,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_difference_names_the_item() {
        let v = |b: u8| [b; 32];
        let a = vec![(1, v(1)), (2, v(2)), (5, v(5))];
        assert_eq!(first_difference(&a, &a), None);
        let changed = vec![(1, v(1)), (2, v(9)), (5, v(5))];
        assert!(
            first_difference(&a, &changed)
                .unwrap()
                .starts_with("item 2: its stored value differs")
        );
        let gone = vec![(1, v(1)), (5, v(5))];
        assert!(
            first_difference(&a, &gone)
                .unwrap()
                .starts_with("item 2: attested, now not")
        );
        let extra = vec![(1, v(1)), (2, v(2)), (3, v(3)), (5, v(5))];
        assert!(
            first_difference(&a, &extra)
                .unwrap()
                .starts_with("item 3: not attested")
        );
    }

    #[test]
    fn proofs_of_present_and_absent_items_check_out() {
        let leaves: Vec<Leaf> = [2i64, 4, 6, 8, 10]
            .iter()
            .map(|&i| (i, [i as u8; 32]))
            .collect();
        let hashes = leaf_hashes(&leaves);
        let root = merkle::root(&hashes);
        let p = prove(&leaves, 6).expect("present");
        let path: Vec<Hash> = p["path"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| hex_hash(h.as_str().unwrap()))
            .collect();
        assert!(merkle::verify(2, 5, &hashes[2], &path, &root));
        let absent = prove(&leaves, 7).expect_err("absent");
        let n = absent["neighbours"].as_array().unwrap();
        assert_eq!(
            (n[0]["item"].as_i64(), n[1]["item"].as_i64()),
            (Some(6), Some(8))
        );
    }

    fn hex_hash(s: &str) -> Hash {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
