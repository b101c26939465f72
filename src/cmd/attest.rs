//! `pqmig attest JOB`, `attest verify FILE`, `attest prove FILE ITEM`:
//! signed job attestations (see [`crate::evidence::attest`]).

use std::path::{Path, PathBuf};

use super::UsageError;
use crate::config::Config;
use crate::db::evidence as dbe;
use crate::evidence::Leaf;
use crate::evidence::attest::{self, AttestError};
use crate::evidence::dsse::Envelope;

fn from_attest(e: AttestError) -> anyhow::Error {
    match e {
        AttestError::Refused(m) => UsageError(m).into(),
        AttestError::Failed(m) => anyhow::anyhow!(m),
        AttestError::Db(e) => e.into(),
    }
}

/// `pqmig attest JOB [--out FILE]`: the envelope goes to FILE (default
/// `pqmig-job-JOB.dsse.json`), its leaves beside it.
pub async fn attest(config: &Config, job_id: i64, out: Option<PathBuf>) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let att = attest::attest(&client, config.keyring.as_deref(), job_id)
        .await
        .map_err(from_attest)?;
    let path = out.unwrap_or_else(|| PathBuf::from(format!("pqmig-job-{job_id}.dsse.json")));
    let leaves = attest::write(&att, &path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    let signers: Vec<&str> = att
        .envelope
        .signatures
        .iter()
        .map(|s| s.keyid.as_str())
        .collect();
    println!(
        "job {job_id}: attestation written to {} ({} items, Merkle root {}), leaves to {}; signed by {}",
        path.display(),
        att.leaves.len(),
        crate::hex(&att.root),
        leaves.display(),
        signers.join(", ")
    );
    Ok(())
}

/// What the attestation hook does: attest a job into `dir` when one is
/// configured; a failure is the caller's to log, never the job's.
pub async fn attest_into(
    client: &tokio_postgres::Client,
    keyring: Option<&Path>,
    dir: &Path,
    job_id: i64,
) -> Result<PathBuf, String> {
    let att = attest::attest(client, keyring, job_id)
        .await
        .map_err(|e| e.to_string())?;
    let path = dir.join(format!("pqmig-job-{job_id}.dsse.json"));
    attest::write(&att, &path).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

fn read_envelope(file: &Path) -> anyhow::Result<Envelope> {
    let raw = std::fs::read(file).map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
    serde_json::from_slice(&raw)
        .map_err(|e| UsageError(format!("{}: not a DSSE envelope: {e}", file.display())).into())
}

/// The leaves file beside `file`, if there is one and it holds the
/// attested root.
fn attested_leaves(file: &Path, root: &str) -> anyhow::Result<Option<Vec<Leaf>>> {
    let path = attest::leaves_path(file);
    if !path.exists() {
        return Ok(None);
    }
    let leaves = attest::read_leaves(&path).map_err(|e| anyhow::anyhow!(e))?;
    let got = crate::hex(&crate::evidence::merkle::root(&attest::leaf_hashes(
        &leaves,
    )));
    if got != root {
        return Err(anyhow::anyhow!(
            "{}: its root {got} is not the attested {root}: the leaves file was altered",
            path.display()
        ));
    }
    Ok(Some(leaves))
}

/// `pqmig attest verify FILE`: the signatures, then the database against
/// what was attested; exit 1 naming every difference.
pub async fn verify(config: &Config, file: &Path) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let envelope = read_envelope(file)?;
    let opened = attest::open(&client, &envelope)
        .await
        .map_err(from_attest)?;
    let st = &opened.statement;
    let p = &st["predicate"];
    let job_id = p["job"]["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("the predicate names no job id"))?;
    let signers: Vec<String> = opened
        .signed_by
        .iter()
        .map(|(name, alg)| format!("{alg} key {name:?}"))
        .collect();
    println!("signatures verify: {}", signers.join(", "));

    let mut diffs = Vec::new();
    let job = dbe::attested_job(&client, job_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("job {job_id} is not in this database"))?;
    attest::differences("job", &p["job"], &attest::job_facts(&job), &mut diffs);

    // The chain must still hold, through the attested head.
    if let Some(head) = p["audit_chain"].as_object() {
        let events = crate::db::audit::events_chain(&client, Some(job_id)).await?;
        let report = crate::db::audit::verify_chains(&events);
        if let Some((event, why)) = report.iter().find_map(|r| r.broken.clone()) {
            diffs.push(format!("audit chain: broken at event {event}: {why}"));
        }
        let no = head.get("chain_no").and_then(serde_json::Value::as_i64);
        let want = head.get("head").and_then(serde_json::Value::as_str);
        let found = events.iter().find(|e| e.chain_no == no);
        match found.and_then(|e| e.hash.as_deref()) {
            Some(h) if Some(crate::hex(h).as_str()) == want => {}
            Some(h) => diffs.push(format!(
                "audit chain: event #{} has hash {}, attested {}",
                no.unwrap_or(0),
                crate::hex(h),
                want.unwrap_or("-")
            )),
            None => diffs.push(format!("audit chain: event #{} is gone", no.unwrap_or(0))),
        }
    }

    let root = p["items"]["root"].as_str().unwrap_or_default().to_owned();
    if st["subject"][0]["digest"]["sha256"].as_str() != Some(root.as_str()) {
        diffs.push("subject digest is not the predicate's Merkle root".into());
    }
    let count = p["items"]["count"].as_u64().unwrap_or(0) as usize;
    let now = attest::current_leaves(&client, &job)
        .await
        .map_err(from_attest)?;
    let now_root = crate::hex(&crate::evidence::merkle::root(&attest::leaf_hashes(&now)));
    if now_root != root {
        diffs.push(format!(
            "items: {count} attested (root {root}), {} now (root {now_root})",
            now.len()
        ));
        match attested_leaves(file, &root)? {
            Some(attested) => {
                if let Some(first) = attest::first_difference(&attested, &now) {
                    diffs.push(format!("items: first difference at {first}"));
                }
            }
            None => diffs.push(format!(
                "items: no {} beside the envelope to name the first differing item",
                attest::leaves_path(file).display()
            )),
        }
    }
    if diffs.is_empty() {
        println!(
            "job {job_id}: as attested at {}: the job's facts, the audit chain through event #{}, and {count} items (Merkle root {root})",
            p["attested_at"].as_str().unwrap_or("-"),
            p["audit_chain"]["chain_no"]
        );
        return Ok(());
    }
    for d in &diffs {
        println!("DIFFERS {d}");
    }
    Err(anyhow::anyhow!(
        "job {job_id}: the database is no longer as attested ({} difference{}; listed above)",
        diffs.len(),
        if diffs.len() == 1 { "" } else { "s" }
    ))
}

/// `pqmig attest prove FILE ITEM`: the inclusion proof of an item (JSON),
/// or, when it is not in the attestation, the proofs of its neighbours and
/// exit 1.
pub async fn prove(config: &Config, file: &Path, item: i64) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let envelope = read_envelope(file)?;
    let opened = attest::open(&client, &envelope)
        .await
        .map_err(from_attest)?;
    let p = &opened.statement["predicate"];
    let root = p["items"]["root"].as_str().unwrap_or_default().to_owned();
    let leaves = match attested_leaves(file, &root)? {
        Some(l) => l,
        None => {
            let job_id = p["job"]["id"].as_i64().unwrap_or(0);
            let job = dbe::attested_job(&client, job_id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("job {job_id} is not in this database"))?;
            let now = attest::current_leaves(&client, &job)
                .await
                .map_err(from_attest)?;
            let got = crate::hex(&crate::evidence::merkle::root(&attest::leaf_hashes(&now)));
            if got != root {
                return Err(anyhow::anyhow!(
                    "no {} and the database's items no longer make the attested root: no proof can be built",
                    attest::leaves_path(file).display()
                ));
            }
            now
        }
    };
    match attest::prove(&leaves, item) {
        Ok(proof) => {
            println!("{}", serde_json::to_string_pretty(&proof)?);
            Ok(())
        }
        Err(absent) => {
            println!("{}", serde_json::to_string_pretty(&absent)?);
            Err(anyhow::anyhow!(
                "item {item} is not in the attestation (its neighbours' proofs are above)"
            ))
        }
    }
}
