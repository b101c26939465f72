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
    assert!(
        after.contains(&format!("wrappers   backup         {n:>8} items")),
        "{text}"
    );
    assert!(!after.contains("signatures"), "{text}");
}
