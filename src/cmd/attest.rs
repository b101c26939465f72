//! `pqmig attest JOB`, `attest verify FILE`, `attest prove FILE ITEM`:
//! signed job attestations (see [`crate::evidence::attest`]).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::UsageError;
use crate::config::Config;
use crate::db::evidence as dbe;
use crate::evidence::Leaf;
use crate::evidence::attest::{self, AttestError, Attestation};
use crate::evidence::dsse::Envelope;

fn from_attest(e: AttestError) -> anyhow::Error {
    match e {
        AttestError::Refused(m) => UsageError(m).into(),
        AttestError::Failed(m) => anyhow::anyhow!(m),
        AttestError::Db(e) => e.into(),
    }
}

/// Write an attestation (off the async threads: it may be large).
async fn write(att: Attestation, path: PathBuf) -> Result<(Attestation, PathBuf), String> {
    tokio::task::spawn_blocking(move || {
        attest::write(&att, &path)
            .map(|leaves| (att, leaves))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    })
    .await
    .map_err(|e| format!("writing the attestation: {e}"))?
}

/// `pqmig attest JOB [--out FILE]`: the envelope goes to FILE (default
/// `pqmig-job-JOB.dsse.json`), its leaves beside it.
pub async fn attest(config: &Config, job_id: i64, out: Option<PathBuf>) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let att = attest::attest(&client, &crate::scope::ScopeContext::of(config), job_id)
        .await
        .map_err(from_attest)?;
    let path = out.unwrap_or_else(|| PathBuf::from(format!("pqmig-job-{job_id}.dsse.json")));
    let (att, leaves) = write(att, path.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let signers: Vec<&str> = att
        .envelope
        .signatures
        .iter()
        .map(|s| s.keyid.as_str())
        .collect();
    println!(
        "job {job_id}: attestation written to {} ({} items, Merkle root {}), leaves to {}; signed by {}",
        path.display(),
        att.count,
        crate::hex(&att.root),
        leaves.display(),
        signers.join(", ")
    );
    Ok(())
}

/// The attestation hook: attest a job into `dir`, under a name of its own
/// (`pqmig-job-N-<time>.dsse.json`: a later attestation never replaces an
/// earlier one); a failure is the caller's to log, never the job's.
pub async fn attest_into(
    client: &tokio_postgres::Client,
    keys: &crate::scope::ScopeContext,
    dir: &Path,
    job_id: i64,
) -> Result<PathBuf, String> {
    let att = attest::attest(client, keys, job_id)
        .await
        .map_err(|e| e.to_string())?;
    let path = dir.join(format!("pqmig-job-{job_id}-{}.dsse.json", att.stamp));
    write(att, path.clone()).await?;
    Ok(path)
}

fn read_envelope(file: &Path) -> anyhow::Result<Envelope> {
    let raw = std::fs::read(file).map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
    serde_json::from_slice(&raw)
        .map_err(|e| UsageError(format!("{}: not a DSSE envelope: {e}", file.display())).into())
}

/// The leaves file beside `file`, if there is one; it must be the signed
/// subject (its SHA-256) and make the signed root.
fn attested_leaves(file: &Path, statement: &Value) -> anyhow::Result<Option<Vec<Leaf>>> {
    let path = attest::leaves_path(file);
    if !path.exists() {
        return Ok(None);
    }
    let (leaves, digest) = attest::read_leaves(&path).map_err(|e| anyhow::anyhow!(e))?;
    let subject = statement["subject"][0]["digest"]["sha256"].as_str();
    if subject != Some(crate::hex(&digest).as_str()) {
        return Err(anyhow::anyhow!(
            "{}: its SHA-256 is not the attested subject's: the leaves file was altered or belongs to another attestation",
            path.display()
        ));
    }
    let root = attest::leaves_file(&leaves).1;
    if Some(crate::hex(&root).as_str()) != statement["predicate"]["items"]["root"].as_str() {
        return Err(anyhow::anyhow!(
            "{}: its leaves do not make the attested Merkle root",
            path.display()
        ));
    }
    Ok(Some(leaves))
}

/// A connection, and the envelope in `file` with its signatures checked.
async fn open(
    config: &Config,
    file: &Path,
    trusted: &[String],
) -> anyhow::Result<(tokio_postgres::Client, attest::Opened)> {
    let client = super::connect(config).await?;
    let envelope = read_envelope(file)?;
    let opened = attest::open(&client, &envelope, trusted)
        .await
        .map_err(from_attest)?;
    Ok((client, opened))
}

/// The attested job as the database holds it now.
async fn job_now(client: &tokio_postgres::Client, job_id: i64) -> anyhow::Result<dbe::AttestedJob> {
    dbe::attested_job(client, job_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("job {job_id} is not in this database"))
}

/// `pqmig attest verify FILE [--trusted-key KEYID]...`: the signatures,
/// then the database against what was attested; exit 1 naming every
/// difference.
pub async fn verify(config: &Config, file: &Path, trusted: &[String]) -> anyhow::Result<()> {
    let (client, opened) = open(config, file, trusted).await?;
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
    let pinned = if trusted.is_empty() {
        " (keys read from this database's signing_keys; pass --trusted-key KEYID to check against keys you hold)"
    } else {
        " (trusted keys)"
    };
    println!("signatures verify: {}{pinned}", signers.join(", "));

    let mut diffs = Vec::new();
    let job = job_now(&client, job_id).await?;
    attest::differences("job", &p["job"], &attest::job_facts(&job), &mut diffs);

    // The chain must still hold, through the attested head.
    if let Some(head) = p["audit_chain"].as_object() {
        let events = crate::db::audit::events_chain(&client, Some(job_id)).await?;
        let report = crate::db::audit::verify_chains(&events);
        if let Some((event, why)) = report.iter().find_map(|r| r.broken.clone()) {
            diffs.push(format!("audit chain: broken at event {event}: {why}"));
        }
        let no = head.get("chain_no").and_then(Value::as_i64);
        let want = head.get("head").and_then(Value::as_str);
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
    let count = p["items"]["count"].as_u64().unwrap_or(0) as usize;
    let attested = attested_leaves(file, st)?;
    let now = attest::current_leaves(&client, &job)
        .await
        .map_err(from_attest)?;
    let now_root = crate::hex(&attest::leaves_file(&now).1);
    if now_root != root {
        diffs.push(format!(
            "items: {count} attested (root {root}), {} now (root {now_root})",
            now.len()
        ));
        match attested {
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
        let missing = p["items"]["missing"].as_i64().unwrap_or(0);
        println!(
            "job {job_id}: as attested at {}: the job's facts, the audit chain through event #{}, and {count} items (Merkle root {root}){}",
            p["attested_at"].as_str().unwrap_or("-"),
            p["audit_chain"]["chain_no"],
            if missing > 0 {
                format!(
                    "; {missing} migrated items were already not as the job left them when it was attested, and are not covered"
                )
            } else {
                String::new()
            }
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
pub async fn prove(
    config: &Config,
    file: &Path,
    item: i64,
    trusted: &[String],
) -> anyhow::Result<()> {
    let (client, opened) = open(config, file, trusted).await?;
    let st = &opened.statement;
    let root = st["predicate"]["items"]["root"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let leaves = match attested_leaves(file, st)? {
        Some(l) => l,
        None => {
            let job_id = st["predicate"]["job"]["id"].as_i64().unwrap_or(0);
            let job = job_now(&client, job_id).await?;
            let now = attest::current_leaves(&client, &job)
                .await
                .map_err(from_attest)?;
            if crate::hex(&attest::leaves_file(&now).1) != root {
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
