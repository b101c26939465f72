//! Millions of rows under a `statement_timeout` in proportion to them: the
//! 200 ms here is to 2M rows what 30 s is to 300M. Nothing counts the
//! table, no read scans more than a bounded id span, so a sparse job (a
//! thousand matches at each end of 2M ids: one unbounded read past the
//! first thousand scans ~2M rows, ~210 ms on an idle machine here) and a
//! whole-table job shared by three replicas both finish, and every row is
//! exactly what it must be (checked by the server's pgcrypto, an
//! implementation independent of pqmig's).

use std::time::Duration;

use serde_json::json;

use crate::support::InProcess;
use crate::support::daemon::config;
use crate::support::hashes::{Fixture, terminal};

const ROWS: i64 = 2_000_000;
/// The version each row starts at: `v0` for the first and the last
/// thousand ids, `v1` for the 1,998,000 between.
const OLD: &str = "CASE WHEN i <= 1000 OR i > 1999000 THEN 'v0' ELSE 'v1' END";

fn short_timeout(fx: &Fixture) -> pqmig::config::Config {
    let mut c = config(fx, &[("PQMIG_RANGE_ITEMS", "50000")]);
    c.database.statement_timeout = Some(Duration::from_millis(200));
    c.worker.batch_target = Duration::from_millis(50);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn millions_of_rows_under_a_short_statement_timeout_sparse_and_whole_table_jobs_finish_exact()
{
    let fx = Fixture::bulk(ROWS, OLD).await;
    let c = fx.db.client().await;
    let sparse_rows: i64 = c
        .query_one(
            "SELECT count(*) FROM users WHERE email_hash_key_version = 'v0'",
            &[],
        )
        .await
        .expect("v0 rows")
        .get(0);
    assert_eq!(sparse_rows, 2000);

    // `plan` on it: the exact count exceeds a 100 ms statement_timeout, so
    // it reports the planner's estimate, marked as such.
    let toml = fx.db.url.clone();
    let cfg = std::env::temp_dir().join(format!("pqmig-plan-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = {toml:?}\nstatement_timeout = \"100ms\"\n\
             [worker]\nbatch_target = \"50ms\"\n"
        ),
    )
    .expect("config");
    let keyring = fx.keyring.display().to_string();
    let out = crate::support::run(
        &[
            "--config",
            cfg.to_str().expect("utf-8"),
            "plan",
            "--scope",
            "hashes",
            "--algo",
            "HMAC-SHA3-256",
            "--selection",
            r#"{"table":"users","column":"email_hash"}"#,
            "--json",
        ],
        &[("PQMIG_KEYRING", keyring.as_str())],
    );
    let _ = std::fs::remove_file(&cfg);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan JSON");
    assert_eq!(doc["matched_estimated"], true, "{doc}");
    let m = doc["matched"].as_i64().expect("matched");
    assert!((ROWS / 2..ROWS * 2).contains(&m), "estimate {m} of {ROWS}");

    // The sparse job: one range over the whole id space, walked in spans.
    let d = InProcess::start_with(short_timeout(&fx)).await;
    let sparse = fx.enqueue(json!({"from_version": "v0"})).await;
    let j = fx.wait_job(sparse, 120, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", sparse_rows, 0),
        "{j:?}"
    );
    d.stop().await;

    // The whole table, one job on three replicas.
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(InProcess::start_with(short_timeout(&fx)).await);
    }
    let whole = fx.enqueue(json!({})).await;
    let j = fx.wait_job(whole, 900, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", ROWS, 0),
        "{j:?}"
    );
    let result = j.result.expect("result");
    assert_eq!(
        (result["migrated"].as_i64(), result["skipped"].as_i64()),
        (Some(ROWS - sparse_rows), Some(sparse_rows)),
        "{result}"
    );
    let ranges = result["ranges"].as_i64().expect("ranges");
    assert!(ranges >= 20, "split by the estimate: {ranges} ranges");
    let mut shares = Vec::new();
    for r in &replicas {
        shares.push(r.items_processed("hashes").await);
    }
    let total: f64 = shares.iter().sum();
    assert_eq!(total as i64, ROWS, "each item walked once: {shares:?}");
    assert!(
        shares.iter().all(|s| *s >= 0.15 * ROWS as f64),
        "every replica did a substantial part: {shares:?}"
    );
    for r in replicas {
        r.stop().await;
    }

    assert_eq!(fx.exact_rows(OLD).await, (ROWS, ROWS));
}
