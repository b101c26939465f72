//! Evidence for auditors: the CycloneDX 1.6 CBOM of `pqmig inventory
//! --format cyclonedx`, checked by cyclonedx-python-lib's strict validator,
//! and the signed job attestations of `pqmig attest`, whose DSSE
//! signatures pyca/cryptography verifies from the PAE bytes and whose
//! Merkle root Python rebuilds from the rows (tests/vectors/evidence_check.py).

use std::path::Path;

use serde_json::{Value, json};

use crate::support::hashes::terminal;
use crate::support::python;
use crate::support::signatures::SigFx;
use crate::support::{InProcess, b64, stderr, stdout};

fn evidence_check(mode: &str, stdin: &str) -> String {
    python::run("evidence_check.py", &[mode], stdin)
}

/// An attestation key of `algorithm` (scope `attestation`) sealed under the
/// KEK of the fixture's signing key.
async fn attestation_key(w: &SigFx, algorithm: &str, name: &str) {
    let kek: i64 = w
        .scalar(&format!(
            "SELECT kms_key_id FROM signing_keys WHERE id = {}",
            w.seed.signing_key_id
        ))
        .await;
    let kek = kek.to_string();
    let out = w.cli(&[
        "keys",
        "signing",
        "--algorithm",
        algorithm,
        "--name",
        name,
        "--kek",
        &kek,
        "--scope",
        "attestation",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The countersignatures a job wrote, as the Python check rebuilds leaves
/// from them: id and the one field of their value (the signature).
async fn countersignature_leaves(w: &SigFx) -> Vec<Value> {
    let c = w.fx.db.client().await;
    c.query(
        "SELECT id, signature FROM signatures WHERE algo_id = $1 ORDER BY id",
        &[&w.seed.target_algo_id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| json!({"id": r.get::<_, i64>(0), "fields": [b64(&r.get::<_, Vec<u8>>(1))]}))
    .collect()
}

/// The attestation keys' public keys by key id, for the Python check.
pub(crate) async fn public_keys(c: &tokio_postgres::Client) -> Value {
    let rows = c
        .query(
            "SELECT k.public_key, a.alias::text FROM signing_keys k \
             JOIN crypto_standard_aliases a ON a.algo_id = k.algo_id \
             WHERE k.scope = 'attestation'",
            &[],
        )
        .await
        .unwrap();
    let mut keys = serde_json::Map::new();
    for r in rows {
        let pk: Vec<u8> = r.get(0);
        use sha2::Digest;
        let id = format!("sha256:{}", crate::support::hex(&sha2::Sha256::digest(&pk)));
        keys.insert(id, json!({"alg": r.get::<_, String>(1), "pk": b64(&pk)}));
    }
    Value::Object(keys)
}

/// The attestation the hook wrote for `job` in `dir` (`pqmig-job-N-<time>.dsse.json`).
fn hook_file(dir: &Path, job: i64) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(&format!("pqmig-job-{job}-")) && name.ends_with(".dsse.json")
        })
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestations_are_signed_provable_and_catch_any_change() {
    let w = SigFx::new(24).await;
    let c = w.fx.db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let id = w
        .enqueue(w.seed.target_algo_id, json!({"batch_size": 10}))
        .await;

    // Refused while not done, and without an attestation key.
    let out = w.cli(&["attest", &id.to_string()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("job {id} is pending: only a done job is attested")),
        "{}",
        stderr(&out)
    );
    attestation_key(&w, "ML-DSA-65", "attest-pq").await;
    attestation_key(&w, "Ed25519", "attest-ed").await;

    // The completion hook writes it when the job ends done.
    let attest_dir = dir.path().display().to_string();
    let daemon = InProcess::start(&w.fx, &[("PQMIG_ATTEST_DIR", attest_dir.as_str())]).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed),
        ("done", 24),
        "{:?}",
        j.error
    );
    let path = dir.path().to_owned();
    crate::support::wait_until(30, "the attestation file", || {
        let path = path.clone();
        async move { hook_file(&path, id).is_some() }
    })
    .await;
    let written = "pqmig_attestations_total{result=\"written\"}";
    crate::support::wait_until(10, "the attestation counted", || {
        let d = &daemon;
        async move { d.metric(written).await == 1.0 }
    })
    .await;
    assert_eq!(
        daemon
            .metric("pqmig_attestations_total{result=\"failed\"}")
            .await,
        0.0
    );
    daemon.stop().await;
    let file = hook_file(dir.path(), id).unwrap();
    let file_arg = file.display().to_string();

    // pyca verifies both signatures from the PAE bytes, and Python
    // rebuilds the Merkle root from the rows.
    let envelope = read_json(&file);
    assert_eq!(envelope["payloadType"], "application/vnd.in-toto+json");
    assert_eq!(
        envelope["signatures"].as_array().map(Vec::len),
        Some(2),
        "{envelope}"
    );
    let leaves = countersignature_leaves(&w).await;
    assert_eq!(leaves.len(), 24);
    let leaves_file = std::fs::read(format!("{}.leaves", file.display())).unwrap();
    let check = json!({"envelope": envelope, "keys": public_keys(&c).await, "leaves": leaves,
                       "leaves_file": b64(&leaves_file)});
    let said: Value = serde_json::from_str(&evidence_check("dsse", &check.to_string())).unwrap();
    assert_eq!(said["signed_by"], json!(["ML-DSA-65", "Ed25519"]), "{said}");

    let statement: Value =
        serde_json::from_slice(&crate::support::unb64(&envelope["payload"])).unwrap();
    let p = &statement["predicate"];
    assert_eq!(
        statement["predicateType"],
        "https://pqmig.dev/attestation/migration-job/v1"
    );
    assert_eq!(p["job"]["id"], id);
    assert_eq!(p["job"]["scope"], "signatures");
    assert_eq!(p["job"]["counts"]["migrated"], 24, "{p}");
    assert_eq!(p["items"]["count"], 24);
    assert_eq!(p["items"]["root"], said["root"]);
    assert_eq!(p["items"]["missing"], 0);
    assert_eq!(
        statement["subject"][0]["name"],
        format!("pqmig-job-{id}.leaves")
    );
    assert_eq!(p["verify"]["before_write"], true);
    let head: (i64, Vec<u8>) = c
        .query_one(
            "SELECT chain_no, hash FROM pq_migration_job_events WHERE job_id = $1 ORDER BY chain_no DESC LIMIT 1",
            &[&id],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(p["audit_chain"]["chain_no"], head.0);
    assert_eq!(p["audit_chain"]["head"], crate::support::hex(&head.1));

    // A tampered payload fails pyca and pqmig alike.
    let mut forged = envelope.clone();
    let mut st = statement.clone();
    st["predicate"]["job"]["counts"]["failed"] = json!(0);
    st["predicate"]["items"]["count"] = json!(23);
    forged["payload"] = json!(b64(&serde_json::to_vec(&st).unwrap()));
    let check = json!({"envelope": forged, "keys": public_keys(&c).await, "leaves": leaves});
    assert!(!python::succeeds(
        "evidence_check.py",
        &["dsse"],
        &check.to_string()
    ));
    let forged_path = dir.path().join("forged.dsse.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let out = w.cli(&["attest", "verify", &forged_path.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("signature by key \"attest-pq\" does not verify"),
        "{}",
        stderr(&out)
    );

    // As attested: exit 0.
    let out = w.cli(&["attest", "verify", &file_arg]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("24 items (Merkle root"),
        "{}",
        stdout(&out)
    );

    // An item's inclusion proof, checked by Python; one not in is refused.
    let item = leaves[5]["id"].as_i64().unwrap();
    let out = w.cli(&["attest", "prove", &file_arg, &item.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(evidence_check("proof", &stdout(&out)).trim(), "included");
    let proof: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        proof["root"], said["root"],
        "the proof leads to the signed root"
    );

    // Only pinned keys, when pinned; a leaves file that is not the subject
    // is refused.
    let keys = public_keys(&c).await;
    let pq_key = keys
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, k)| k["alg"] == "ML-DSA-65")
        .map(|(id, _)| id.clone())
        .unwrap();
    let out = w.cli(&["attest", "verify", &file_arg, "--trusted-key", &pq_key]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the Ed25519 signature is not by a pinned key"
    );
    assert!(
        stderr(&out).contains("not one of the trusted keys given"),
        "{}",
        stderr(&out)
    );
    let ed_key = keys
        .as_object()
        .unwrap()
        .keys()
        .find(|k| **k != pq_key)
        .unwrap()
        .clone();
    let out = w.cli(&[
        "attest",
        "verify",
        &file_arg,
        "--trusted-key",
        &pq_key,
        "--trusted-key",
        &ed_key,
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("(trusted keys)"), "{}", stdout(&out));
    let leaves_path = format!("{file_arg}.leaves");
    let mut altered = leaves_file.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    std::fs::write(&leaves_path, &altered).unwrap();
    let out = w.cli(&["attest", "verify", &file_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the leaves file was altered"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&leaves_path, &leaves_file).unwrap();
    let source: i64 = w.scalar("SELECT min(id) FROM signatures").await;
    let out = w.cli(&["attest", "prove", &file_arg, &source.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not in the attestation"),
        "{}",
        stderr(&out)
    );

    // One item changed: named.
    c.execute(
        "UPDATE signatures SET signature = set_byte(signature, 0, get_byte(signature, 0) # 1) WHERE id = $1",
        &[&item],
    )
    .await
    .unwrap();
    let out = w.cli(&["attest", "verify", &file_arg]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!(
            "first difference at item {item}: its stored value differs from the attested one"
        )),
        "{}",
        stdout(&out)
    );
    c.execute(
        "UPDATE signatures SET signature = set_byte(signature, 0, get_byte(signature, 0) # 1) WHERE id = $1",
        &[&item],
    )
    .await
    .unwrap();

    // One count changed: named.
    c.execute(
        "UPDATE pq_migration_jobs SET result = jsonb_set(result, '{migrated}', '23') WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let out = w.cli(&["attest", "verify", &file_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("job.counts.migrated: attested 24, now 23"),
        "{}",
        stdout(&out)
    );
    c.execute(
        "UPDATE pq_migration_jobs SET result = jsonb_set(result, '{migrated}', '24') WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let out = w.cli(&["attest", "verify", &file_arg]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    // One event changed: the chain no longer holds.
    c.execute(
        "UPDATE pq_migration_job_events SET worker = 'someone else' WHERE job_id = $1 AND chain_no = 1",
        &[&id],
    )
    .await
    .unwrap();
    let out = w.cli(&["attest", "verify", &file_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("audit chain: broken at event"),
        "{}",
        stdout(&out)
    );

    // A signing key marked compromised proves nothing.
    c.execute(
        "UPDATE signing_keys SET status = 'compromised' WHERE name = 'attest-ed'",
        &[],
    )
    .await
    .unwrap();
    let out = w.cli(&["attest", "verify", &file_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("signing key \"attest-ed\" is marked compromised"),
        "{}",
        stderr(&out)
    );
}

/// An ML-DSA-65 attestation key sealed under a new keyring KEK, made by
/// the CLI with `env` (a hashes fixture has no signing key).
fn hashes_attestation_key(env: &[(&str, &str)]) {
    let out = crate::support::run(
        &[
            "keys",
            "generate",
            "--algorithm",
            "AES-256-GCM",
            "--ref",
            "local:attest-kek",
            "--register",
        ],
        env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = crate::support::run(
        &[
            "keys",
            "signing",
            "--algorithm",
            "ML-DSA-65",
            "--name",
            "attest",
            "--kek",
            "local:attest-kek",
            "--scope",
            "attestation",
        ],
        env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A daemon told to stop just after it ended a job `done` writes that
/// job's attestation before it exits, within `shutdown_timeout`; past the
/// deadline it exits anyway, naming the job whose attestation it did not
/// write. The test holds the attestation back by locking `signing_keys`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_daemon_writes_the_attestations_of_the_jobs_it_just_ended() {
    use crate::support::hashes::signal;
    let fx = crate::support::hashes::Fixture::new(20).await;
    let c = fx.db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let attest_dir = dir.path().display().to_string();
    let keyring = fx.keyring.display().to_string();
    hashes_attestation_key(&[
        ("DATABASE_URL", fx.db.url.as_str()),
        ("PQMIG_KEYRING", keyring.as_str()),
    ]);
    for (name, timeout, in_time) in [("waits", "60s", true), ("late", "1s", false)] {
        let mut holder = fx.db.client().await;
        let tx = holder.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE signing_keys IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock signing_keys");
        let mut d = fx.spawn_daemon(
            name,
            &[
                ("PQMIG_ATTEST_DIR", attest_dir.as_str()),
                ("PQMIG_SHUTDOWN_TIMEOUT", timeout),
            ],
        );
        let id = fx.enqueue(json!({"batch_size": 10})).await;
        assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
        crate::support::wait_until(10, "the attestation waiting on the lock", || async {
            crate::support::lock_waiters(&c).await == 1
        })
        .await;
        signal(&d, libc::SIGTERM);
        crate::support::wait_until(10, "the stopping daemon waiting for it", || async {
            fx.log(name)
                .contains("writing the attestations of jobs just done before stopping")
        })
        .await;
        if in_time {
            tx.commit().await.expect("unlock");
        }
        let status = d.wait().expect("wait");
        assert!(status.success(), "{status:?}");
        let log = fx.log(name);
        if in_time {
            assert!(hook_file(dir.path(), id).is_some(), "{log}");
            let written = log.find("attestation written").expect("written");
            assert!(written < log.find("pqmig daemon stopped").expect("stopped"));
        } else {
            assert!(hook_file(dir.path(), id).is_none(), "{log}");
            assert!(
                log.lines().any(|l| l.contains("attestations not written")
                    && l.contains(&format!("\"jobs\":\"[{id}]\""))),
                "{log}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_attests_and_a_hashes_job_is_attested_from_its_backups() {
    let fx = crate::support::hashes::Fixture::new(30).await;
    let c = fx.db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let attest_dir = dir.path().display().to_string();
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"batch_size": 10})).await;
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
    daemon.stop().await;
    let keyring = fx.keyring.display().to_string();
    let env = [
        ("DATABASE_URL", fx.db.url.as_str()),
        ("PQMIG_KEYRING", keyring.as_str()),
        ("PQMIG_ATTEST_DIR", attest_dir.as_str()),
    ];
    // No attestation key: verify passes and says why there is no file.
    let out = crate::support::run(&["verify", &id.to_string()], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "attestation not written: no active ML-DSA-65 signing key with scope 'attestation'"
        ),
        "{}",
        stderr(&out)
    );
    hashes_attestation_key(&env);
    let out = crate::support::run(&["verify", &id.to_string()], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let file = hook_file(dir.path(), id).expect("verify wrote the attestation");
    assert!(
        stdout(&out).contains(&format!("attestation written to {}", file.display())),
        "{}",
        stdout(&out)
    );
    let statement: Value =
        serde_json::from_slice(&crate::support::unb64(&read_json(&file)["payload"])).unwrap();
    let p = &statement["predicate"];
    assert_eq!(p["items"]["count"], 30, "{p}");
    assert_eq!(p["verify"]["pqmig_verify"]["items"], 30, "{p}");

    // The leaves are (id, SHA-256 of hash || version) of the rows now.
    let rows = c
        .query(
            "SELECT id, email_hash, email_hash_key_version::text FROM users ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let leaves: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"id": r.get::<_, i64>(0), "fields": [
                b64(&r.get::<_, Vec<u8>>(1)), b64(r.get::<_, String>(2).as_bytes())]})
        })
        .collect();
    let keys = public_keys(&c).await;
    let leaves_file = std::fs::read(format!("{}.leaves", file.display())).unwrap();
    let check = json!({"envelope": read_json(&file), "keys": keys, "leaves": leaves,
                       "leaves_file": b64(&leaves_file)});
    evidence_check("dsse", &check.to_string());

    // Purged backups: the items can no longer be listed, so no new
    // attestation; the file on hand still verifies its items from the
    // leaves beside it.
    let out = crate::support::run(&["purge-backups", &id.to_string()], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = crate::support::run(
        &[
            "attest",
            &id.to_string(),
            "--out",
            &dir.path().join("again.json").display().to_string(),
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("attest before `pqmig purge-backups`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_exports_a_valid_deterministic_cyclonedx_cbom() {
    let w = SigFx::new(12).await;
    let c = w.fx.db.client().await;
    let url = w.fx.db.url.as_str();
    let env = [("DATABASE_URL", url)];
    // A snapshot, so two exports see the same counts at the same time.
    let config = crate::support::daemon::config(&w.fx, &[]);
    let services = pqmig::daemon::Services::from_config(&config).await.unwrap();
    let shared = std::sync::Arc::new(pqmig::daemon::Shared::new(
        &config,
        &services,
        tokio_util::sync::CancellationToken::new(),
    ));
    pqmig::daemon::sampler::Sampler::new(shared, config.maintenance.inventory_interval)
        .count_once()
        .await
        .expect("count");

    let out = crate::support::run(&["inventory", "--format", "cyclonedx"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(evidence_check("cbom", &text).trim(), "valid");
    let again = stdout(&crate::support::run(
        &["inventory", "--format", "cyclonedx"],
        &env,
    ));
    assert_eq!(text, again, "the same database gives the same document");
    // Counted now: another timestamp, the same content and serial.
    let serial_of = |args: &[&str]| -> Value {
        let doc: Value = serde_json::from_str(&stdout(&crate::support::run(args, &env))).unwrap();
        doc["serialNumber"].clone()
    };
    let exact = ["inventory", "--format", "cyclonedx", "--exact"];
    assert_eq!(serial_of(&exact), serial_of(&exact));
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(
        doc["serialNumber"]
            .as_str()
            .is_some_and(|s| s.starts_with("urn:uuid:"))
    );

    let component = |r: &str| {
        doc["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["bom-ref"] == r)
            .unwrap_or_else(|| panic!("no {r} in {doc}"))
            .clone()
    };
    let prop = |c: &Value, name: &str| {
        c["properties"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["value"].as_str().unwrap().to_owned())
    };
    // Ed25519 sources: quantum-vulnerable, disallowed after 2035, counted.
    let ed = component("crypto/algorithm/Ed25519");
    assert_eq!(
        ed["cryptoProperties"]["algorithmProperties"]["nistQuantumSecurityLevel"],
        0
    );
    assert_eq!(ed["cryptoProperties"]["oid"], "1.3.101.112");
    assert_eq!(
        prop(&ed, "pqmig:nist-ir-8547:disallowed-after").as_deref(),
        Some("2035")
    );
    let inv: Value = serde_json::from_str(&stdout(&crate::support::run(
        &["inventory", "--json"],
        &env,
    )))
    .unwrap();
    let counted = inv["vulnerable"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["scope"] == "signatures" && l["algorithm"] == "Ed25519")
        .map(|l| l["items"].to_string());
    assert_eq!(
        prop(&ed, "pqmig:items:signatures:vulnerable"),
        counted,
        "{inv}"
    );
    // The target: ML-DSA-65, level 3, with its OID, as the signing key's algorithm.
    let ml = component("crypto/algorithm/ML-DSA-65");
    assert_eq!(
        ml["cryptoProperties"]["algorithmProperties"]["primitive"],
        "signature"
    );
    assert_eq!(
        ml["cryptoProperties"]["algorithmProperties"]["parameterSetIdentifier"],
        "65"
    );
    assert_eq!(
        ml["cryptoProperties"]["algorithmProperties"]["nistQuantumSecurityLevel"],
        3
    );
    assert_eq!(ml["cryptoProperties"]["oid"], "2.16.840.1.101.3.4.3.18");
    // Keys by reference, never their secrets.
    let key = component(&format!(
        "crypto/key/signing_keys/{}",
        w.seed.signing_key_id
    ));
    let rel = &key["cryptoProperties"]["relatedCryptoMaterialProperties"];
    assert_eq!(rel["type"], "private-key");
    assert_eq!(rel["state"], "active");
    assert_eq!(rel["algorithmRef"], "crypto/algorithm/ML-DSA-65");
    let sealed: Vec<u8> = c
        .query_one(
            "SELECT private_key_enc FROM signing_keys WHERE id = $1",
            &[&w.seed.signing_key_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!text.contains(&b64(&sealed)) && !text.contains(&crate::support::hex(&sealed)));
    let keyring = std::fs::read_to_string(&w.fx.keyring).unwrap();
    for secret in serde_json::from_str::<Value>(&keyring).unwrap()["keys"]
        .as_array()
        .unwrap()
    {
        assert!(
            !text.contains(secret["secret"].as_str().unwrap()),
            "a keyring secret in the CBOM"
        );
    }
    // The data: signatures' items, with the table and column.
    let data = component("data/signatures");
    assert_eq!(data["data"][0]["name"], "signatures.signature");
    assert_eq!(prop(&data, "pqmig:items:vulnerable").as_deref(), Some("12"));

    // --serial is passed in; --as-of adds the standing; bad input is exit 2.
    let serial = "urn:uuid:3e671687-395b-41f5-a30f-a58921a69b79";
    let out = crate::support::run(
        &[
            "inventory",
            "--format",
            "cyclonedx",
            "--serial",
            serial,
            "--as-of",
            "2036-01-01",
        ],
        &env,
    );
    let doc: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["serialNumber"], serial);
    evidence_check("cbom", &stdout(&out));
    assert!(stdout(&out).contains("\"value\": \"disallowed\""));
    for (args, said) in [
        (
            vec!["inventory", "--format", "spdx"],
            "expected text, json or cyclonedx",
        ),
        (
            vec!["inventory", "--format", "cyclonedx", "--serial", "42"],
            "--serial \"42\"",
        ),
    ] {
        let out = crate::support::run(&args, &env);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(said), "{}", stderr(&out));
    }
}
