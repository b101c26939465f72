//! `pqmig demo` end to end: its summary matches what it left in the database.

use crate::support::{admin_url, connect, run, stderr, stdout, url_for};

#[tokio::test]
async fn demo_runs_end_to_end_and_its_summary_matches_the_database() {
    let admin = admin_url();
    let out = run(
        &["demo", "--keep"],
        &[("DATABASE_URL", admin.as_str()), ("PQMIG_LOG", "warn")],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("demo database: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("demo names its database")
        .to_owned();
    let c = connect(&url_for(&admin, &name)).await;
    let (status, processed): (String, i64) = {
        let r = c
            .query_one(
                "SELECT status, processed_count FROM pq_migration_jobs WHERE scope = 'hashes'",
                &[],
            )
            .await
            .expect("job");
        (r.get(0), r.get(1))
    };
    let migrated: i64 = c
        .query_one(
            "SELECT count(*) FROM users WHERE email_hash_key_version = 'pepper-v2/sha256-v1'",
            &[],
        )
        .await
        .expect("users")
        .get(0);
    let wrappers: i64 = c
        .query_one(
            "SELECT count(*) FROM key_wrappers WHERE crypto_suite->>'format' = 'pqmig-wrap-v1' \
             AND (SELECT count(*) FROM key_wrapper_layers l WHERE l.key_wrapper_id = key_wrappers.id) = 2",
            &[],
        )
        .await
        .expect("wrappers")
        .get(0);
    let countersigned: i64 = c
        .query_one(
            "SELECT count(*) FROM signatures s JOIN crypto_standard_aliases a ON a.algo_id = s.algo_id \
             WHERE a.alias = 'ML-DSA-65'",
            &[],
        )
        .await
        .expect("signatures")
        .get(0);
    let jobs: Vec<(String, String, i64)> = c
        .query(
            "SELECT scope, status, processed_count FROM pq_migration_jobs ORDER BY id",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let evidence = evidence_checked(&c, &text, &url_for(&admin, &name)).await;
    drop(c);
    let _ = connect(&admin)
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await;
    assert_eq!(status, "done");
    assert_eq!(processed, pqmig::cmd::demo::DEMO_ITEMS);
    assert_eq!(migrated, processed, "every user migrated");
    let line = format!("hashes     done      {:>9}      0", processed);
    assert!(text.contains(&line), "summary line {line:?} in:\n{text}");
    assert!(
        text.contains(&format!("hashes     SHA-256        {:>8} items", processed)),
        "{text}"
    );
    assert!(
        text.contains(&format!("hashes     backup         {:>8} items", processed)),
        "{text}"
    );
    let n = pqmig::cmd::demo::DEMO_ITEMS;
    assert_eq!(
        jobs,
        vec![
            ("hashes".to_string(), "done".to_string(), n),
            ("wrappers".to_string(), "done".to_string(), n),
            ("signatures".to_string(), "done".to_string(), n),
        ]
    );
    assert_eq!((wrappers, countersigned), (n, n));
    for scope in ["wrappers", "signatures"] {
        let line = format!("{scope:<10} done      {n:>9}      0");
        assert!(text.contains(&line), "summary line {line:?} in:\n{text}");
    }
    // before: every wrapper and signed record exposed; after: only the
    // wrappers' backups (signatures keep no classical copy)
    let before = text.split("exposure inventory after").next().unwrap();
    assert!(
        before.contains(&format!("signatures Ed25519        {:>8} items", n / 2)),
        "{text}"
    );
    let after = text.split("exposure inventory after").nth(1).unwrap();
    let after = after.split("evidence for auditors").next().unwrap();
    assert!(
        after.contains(&format!("wrappers   backup         {n:>8} items")),
        "{text}"
    );
    assert!(!after.contains("signatures"), "{text}");
    let _ = std::fs::remove_dir_all(evidence);
}

/// The evidence the demo printed: a valid CBOM, an attestation per job
/// that `pqmig attest verify` accepts, and the wrappers job's Merkle root
/// rebuilt by Python from the rows (dek_wrap1, canonical crypto_suite
/// JSON, the layers' ciphertexts).
async fn evidence_checked(c: &tokio_postgres::Client, text: &str, url: &str) -> std::path::PathBuf {
    use crate::support::{b64, python};
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("evidence for auditors in "))
        .and_then(|l| l.strip_suffix(':'))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("the demo names its evidence directory:\n{text}"));
    let cbom = std::fs::read_to_string(dir.join("cbom.cdx.json")).expect("the CBOM");
    assert_eq!(
        python::run("evidence_check.py", &["cbom"], &cbom).trim(),
        "valid"
    );
    let ids: Vec<i64> = c
        .query("SELECT id FROM pq_migration_jobs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let attestation = |id: i64| {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(&format!("pqmig-job-{id}-")) && name.ends_with(".dsse.json")
            })
            .unwrap_or_else(|| panic!("no attestation of job {id} in {}", dir.display()))
    };
    for id in &ids {
        let file = attestation(*id);
        let out = run(
            &["attest", "verify", &file.display().to_string()],
            &[("DATABASE_URL", url)],
        );
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
    let wrappers_job: i64 = c
        .query_one(
            "SELECT id FROM pq_migration_jobs WHERE scope = 'wrappers'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let rows = c
        .query(
            "SELECT w.id, w.dek_wrap1, w.dek_wrap2, w.kms1_key_id, w.kms2_key_id, w.wrap_version, \
                    w.crypto_suite::text, \
                    (SELECT array_agg(l.kms_key_id::text ORDER BY l.layer_no) FROM key_wrapper_layers l WHERE l.key_wrapper_id = w.id), \
                    (SELECT array_agg(l.kem_ciphertext ORDER BY l.layer_no) FROM key_wrapper_layers l WHERE l.key_wrapper_id = w.id) \
             FROM key_wrappers w ORDER BY w.id",
            &[],
        )
        .await
        .unwrap();
    let num = |n: Option<i64>| format!("text:{}", n.map(|n| n.to_string()).unwrap_or_default());
    let leaves: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let suite: serde_json::Value = serde_json::from_str(&r.get::<_, String>(6)).unwrap();
            let mut fields = vec![
                b64(&r.get::<_, Vec<u8>>(1)),
                b64(&r.get::<_, Option<Vec<u8>>>(2).unwrap_or_default()),
                num(r.get(3)),
                num(r.get(4)),
                format!("text:{}", r.get::<_, i32>(5)),
                format!("json:{suite}"),
            ];
            let keys: Vec<String> = r.get(7);
            let cts: Vec<Vec<u8>> = r.get(8);
            for (k, ct) in keys.iter().zip(&cts) {
                fields.push(format!("text:{k}"));
                fields.push(b64(ct));
            }
            serde_json::json!({"id": r.get::<_, i64>(0), "fields": fields})
        })
        .collect();
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(attestation(wrappers_job)).unwrap()).unwrap();
    let check = serde_json::json!({
        "envelope": envelope,
        "keys": crate::evidence::public_keys(c).await,
        "leaves": leaves,
    });
    python::run("evidence_check.py", &["dsse"], &check.to_string());
    dir
}
