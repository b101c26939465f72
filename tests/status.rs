//! `pqmig status`: the table, one job, `--json` shapes and exit codes.

use crate::common::{TestDb, run, stderr, stdout};

#[tokio::test]
async fn status_shows_progress_rate_and_eta() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, target_algo_id, status, started_at, processed_count, failed_count, \
                                        total_count, locked_by, selection) \
         SELECT 'hashes', algo_id, 'running', now() - interval '20 seconds', 190, 10, 600, 'host-1-abc', \
                '{\"table\":\"users\",\"column\":\"email_hash\"}' \
         FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256'; \
         INSERT INTO pq_migration_jobs (scope, status, error) VALUES ('hashes', 'failed', '3 items failed'); \
         INSERT INTO pq_migration_item_errors (job_id, item_id, error_code, message) \
           VALUES (2, '17', 'data', 'version column is NULL');",
    )
    .await
    .expect("jobs");
    let env = [("DATABASE_URL", db.url.as_str())];

    let out = run(&["status"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("200/600 (33%)"), "{table}");
    assert!(
        table.contains("HMAC-SHA3-256") && table.contains("host-1-abc"),
        "{table}"
    );

    let out = run(&["status", "--json"], &env);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let jobs = doc["jobs"].as_array().expect("jobs array");
    assert_eq!(jobs.len(), 2);
    let running = &jobs[0];
    assert_eq!(running["status"], "running");
    let rate = running["rate_per_second"].as_f64().expect("rate");
    assert!((9.0..=10.1).contains(&rate), "200 items in ~20 s: {rate}");
    let eta = running["eta_seconds"].as_f64().expect("eta");
    assert!((38.0..=45.0).contains(&eta), "400 left at ~10/s: {eta}");
    assert!(jobs[1]["rate_per_second"].is_null() && jobs[1]["eta_seconds"].is_null());

    let out = run(&["status", "2", "--json"], &env);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(doc["job"]["error"], "3 items failed");
    assert_eq!(doc["item_errors_total"], 1);
    assert_eq!(doc["item_errors"][0]["error_code"], "data");

    let out = run(&["status", "2"], &env);
    assert!(
        stdout(&out).contains("version column is NULL"),
        "{}",
        stdout(&out)
    );

    let out = run(&["status", "42"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).trim(), "pqmig: no job with id 42");
}
