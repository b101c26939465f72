//! `pqmig status`: the table, one job, `--json` shapes and exit codes.

use crate::support::{TestDb, run, stderr, stdout};

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

/// `status --watch` in a pseudo-terminal (util-linux `script`): a progress
/// bar that reaches 100%, and the command ends with the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_draws_a_progress_bar_to_100_percent_on_a_terminal() {
    let fx = crate::support::hashes::Fixture::new(1000).await;
    let daemon = crate::support::InProcess::start(&fx, &[]).await;
    let id = fx
        .enqueue(serde_json::json!({"max_rate": 800, "batch_size": 100}))
        .await;
    let bin = env!("CARGO_BIN_EXE_pqmig");
    let out = tokio::task::spawn_blocking({
        let url = fx.db.url.clone();
        move || {
            std::process::Command::new("script")
                .args([
                    "-qfec",
                    &format!("{bin} status {id} --watch --interval 100ms"),
                    "/dev/null",
                ])
                .env_clear()
                .env("DATABASE_URL", url)
                .env("TERM", "xterm")
                .env("SHELL", "/bin/sh")
                .env("PATH", "/usr/bin:/bin")
                .output()
                .expect("script (util-linux)")
        }
    })
    .await
    .unwrap();
    daemon.stop().await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("\u{1b}["),
        "drawn with terminal escapes: {text}"
    );
    assert!(
        text.contains("1000/1000") && text.contains("100%"),
        "{text}"
    );
    assert!(
        text.contains("[========================================]"),
        "a full bar: {text}"
    );
    assert!(text.contains(&format!("job {id} hashes")), "{text}");
}

/// Not a terminal: plain lines, no escapes, until the job is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_plain_lines_when_piped_and_fails_with_the_job() {
    let fx = crate::support::hashes::Fixture::new(300).await;
    let daemon = crate::support::InProcess::start(&fx, &[]).await;
    let id = fx
        .enqueue(serde_json::json!({"max_rate": 400, "batch_size": 50}))
        .await;
    let (url, job) = (fx.db.url.clone(), id.to_string());
    let out = tokio::task::spawn_blocking(move || {
        crate::support::run(
            &["status", &job, "--watch", "--interval", "100ms"],
            &[("DATABASE_URL", url.as_str())],
        )
    })
    .await
    .unwrap();
    let text = crate::support::stdout(&out);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(!text.contains('\u{1b}'), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "refreshed while it ran: {text}");
    assert!(lines.iter().any(|l| l.contains("running")), "{text}");
    assert_eq!(
        *lines.last().unwrap(),
        format!("job {id} hashes done 300/300 (100%)")
    );
    // A job that fails: exit 1 naming why.
    let bad = fx
        .enqueue_raw(
            Some(fx.algo_id),
            serde_json::json!({"table": "nope", "column": "x"}),
        )
        .await;
    let env = [("DATABASE_URL", fx.db.url.as_str())];
    let out = crate::support::run(
        &[
            "status",
            &bad.to_string(),
            "--watch",
            "--interval",
            "100ms",
            "--json",
        ],
        &env,
    );
    daemon.stop().await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        crate::support::stderr(&out)
    );
    assert!(
        crate::support::stderr(&out).contains(&format!("job {bad} ended failed: selection.table")),
        "{}",
        crate::support::stderr(&out)
    );
    let last: serde_json::Value =
        serde_json::from_str(crate::support::stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(last["jobs"][0]["status"], "failed");
}

/// Ctrl-C ends a watch with exit 1 (so `status JOB --watch && next` does
/// not go on), and the watched job is left exactly as it was.
#[tokio::test]
async fn watch_stops_on_ctrl_c_and_leaves_the_job_alone() {
    use std::io::BufRead;
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, status, started_at, processed_count, total_count) \
         VALUES ('hashes', 'running', now(), 5, 50)",
    )
    .await
    .expect("job");
    let before: String = c
        .query_one("SELECT row_to_json(j)::text FROM pq_migration_jobs j", &[])
        .await
        .unwrap()
        .get(0);
    let mut child = crate::support::pqmig(
        &["status", "1", "--watch", "--interval", "100ms"],
        &[("DATABASE_URL", db.url.as_str())],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("spawn");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first line").expect("read");
    assert_eq!(first, "job 1 hashes running 5/50 (10%)");
    crate::support::hashes::signal(&child, libc::SIGINT);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the watch ends on Ctrl-C")
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "pqmig: interrupted; the watched jobs carry on"
    );
    let after: String = c
        .query_one("SELECT row_to_json(j)::text FROM pq_migration_jobs j", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after, "the job row is untouched");
}

/// `--interval` is checked: at least 100ms, and only with --watch.
#[tokio::test]
async fn watch_interval_is_checked() {
    let db = TestDb::migrated().await;
    let env = [("DATABASE_URL", db.url.as_str())];
    let out = run(&["status", "--watch", "--interval", "10ms"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("10ms is shorter than 100ms"),
        "{}",
        stderr(&out)
    );
    let out = run(&["status", "--interval", "2s"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--watch"), "{}", stderr(&out));
    let out = run(&["status", "--watch", "--interval", "soon"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--interval"), "{}", stderr(&out));
}

/// A split job: its counts come from its ranges (not the job row, which
/// has them as of the last heartbeat), its total is shown as an estimate,
/// `status JOB` lists the ranges not done with why one waits, and `--json`
/// has every range.
#[tokio::test]
async fn a_split_job_shows_its_ranges_and_an_estimated_total() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, status, started_at, processed_count, total_count, \
                                        ranges, result, selection) \
         VALUES ('hashes', 'running', now() - interval '10 seconds', 5, 3000, 3, \
                 '{\"total_estimated\": true}', '{\"table\":\"users\",\"column\":\"email_hash\"}'); \
         INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, processed_count, \
                                          failed_count, estimated_count, locked_by, lease_token, \
                                          heartbeat_at, throttled) VALUES \
           (1, 0, 0, 1000, 'done', 998, 2, 1000, 'host-a-1', NULL, NULL, NULL), \
           (1, 1, 1000, 2000, 'running', 400, 0, 1000, 'host-b-2', gen_random_uuid(), now(), 'replication_lag'), \
           (1, 2, 2000, 3000, 'pending', 0, 0, 1000, NULL, NULL, NULL, NULL);",
    )
    .await
    .expect("a split job");
    let env = [("DATABASE_URL", db.url.as_str())];

    let out = run(&["status"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("1400/~3000 (47%)"), "{table}");
    assert!(
        table.contains("host-b-2"),
        "the worker walking a range: {table}"
    );

    let out = run(&["status", "1"], &env);
    let text = stdout(&out);
    assert!(
        text.contains("ranges     3 (1 done, 1 being walked)"),
        "{text}"
    );
    assert!(text.contains("throttled  replication_lag"), "{text}");
    assert!(text.contains("ranges not done (2 of 3)"), "{text}");
    assert!(
        text.contains("ids 1001..=2000  running") && text.contains("throttled: replication_lag"),
        "{text}"
    );

    let out = run(&["status", "1", "--json"], &env);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let job = &doc["job"];
    assert_eq!(
        (&job["processed"], &job["failed"], &job["total"]),
        (
            &serde_json::json!(1398),
            &serde_json::json!(2),
            &serde_json::json!(3000)
        ),
        "{job}"
    );
    assert_eq!(job["total_estimated"], true);
    assert_eq!(
        (&job["ranges"], &job["ranges_done"], &job["ranges_running"]),
        (
            &serde_json::json!(3),
            &serde_json::json!(1),
            &serde_json::json!(1)
        )
    );
    assert_eq!(job["throttled"], "replication_lag");
    let ranges = doc["ranges"].as_array().expect("ranges");
    assert_eq!(ranges.len(), 3);
    assert_eq!(ranges[1]["worker"], "host-b-2");
    assert_eq!(ranges[2]["status"], "pending");

    // Once finished, the job row is the truth and the total is no estimate.
    c.batch_execute(
        "UPDATE pq_migration_jobs SET status = 'cancelled', processed_count = 1398, \
           failed_count = 2, total_count = 1400 WHERE id = 1",
    )
    .await
    .expect("cancel");
    let out = run(&["status", "1", "--json"], &env);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(doc["job"]["total_estimated"], false);
    assert_eq!(doc["job"]["total"], 1400);
}
