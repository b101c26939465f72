//! Operator control. `pqmig pause` / `unpause`: kept in the database,
//! obeyed by every replica within a heartbeat; a paused walk commits its
//! batch and gives its range back without using an attempt. `pqmig set`:
//! a running job's max_rate and priority.

use std::time::Duration;

use serde_json::{Value, json};

use crate::scale::range_statuses;
use crate::support::hashes::{Fixture, terminal};
use crate::support::{InProcess, run, stderr, stdout, wait_until};

fn cli(fx: &Fixture, args: &[&str]) -> std::process::Output {
    run(args, &[("DATABASE_URL", fx.db.url.as_str())])
}

async fn pauses(fx: &Fixture) -> i64 {
    fx.db
        .client()
        .await
        .query_one("SELECT count(*) FROM pq_migration_pauses", &[])
        .await
        .expect("pauses")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_of_the_table_stops_every_walk_after_its_batch_and_unpause_finishes_the_job() {
    const ROWS: i64 = 3000;
    let fx = Fixture::new(ROWS).await;
    let c = fx.db.client().await;
    c.batch_execute("ANALYZE users").await.expect("analyze");
    let env = [
        ("PQMIG_RANGE_ITEMS", "500"),
        ("PQMIG_HEARTBEAT_INTERVAL", "100ms"),
    ];
    let a = InProcess::start(&fx, &env).await;
    let b = InProcess::start(&fx, &env).await;
    let id = fx.enqueue(json!({"batch_size": 50, "max_rate": 600})).await;
    fx.wait_job(id, 30, |j| j.processed >= 200).await;

    // A pause of another scope changes nothing for this job.
    let out = cli(&fx, &["pause", "--scope", "wrappers"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = fx.job(id).await.processed;
    wait_until(10, "the hashes job goes on", || async {
        fx.job(id).await.processed > before + 100
    })
    .await;

    let out = cli(&fx, &["pause", "--table", "users"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .contains("paused jobs writing table users until `pqmig unpause --table users`"),
        "{}",
        stdout(&out)
    );
    wait_until(10, "every range given back", || async {
        range_statuses(&fx, id).await.1 == 0
    })
    .await;
    let walked = || async {
        c.query_one(
            "SELECT sum(processed_count)::bigint, sum(attempts)::bigint FROM pq_migration_ranges WHERE job_id = $1",
            &[&id],
        )
        .await
        .expect("ranges")
    };
    let at_pause: i64 = walked().await.get(0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let still = walked().await;
    assert_eq!(still.get::<_, i64>(0), at_pause, "no batch while paused");
    assert_eq!(still.get::<_, i64>(1), 0, "a pause uses no attempt");
    let migrated = fx.users().await.iter().filter(|u| u.2 != "v1").count() as i64;
    assert_eq!(
        migrated, at_pause,
        "every committed batch counted, none half-written"
    );
    assert!(at_pause < ROWS, "paused mid-job");
    assert!(
        fx.events(id, "released").await >= 2,
        "{}",
        fx.event_log(id).await
    );
    assert_eq!(
        fx.job(id).await.status,
        "running",
        "the job itself stays running"
    );

    // status shows the pauses in force, in text and JSON
    let out = cli(&fx, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("PAUSED  jobs writing table users since"),
        "{}",
        stdout(&out)
    );
    let out = cli(&fx, &["status", "--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let tables: Vec<&str> = doc["pauses"]
        .as_array()
        .expect("pauses")
        .iter()
        .filter_map(|p| p["table"].as_str())
        .collect();
    assert_eq!(tables, ["users"], "{doc}");

    // pausing it again is refused, naming the pause in force
    let out = cli(&fx, &["pause", "--table", "users"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already in force"),
        "{}",
        stderr(&out)
    );

    // unpause: the job goes on from where it stopped and finishes exactly
    c.execute(
        "UPDATE pq_migration_jobs SET selection = selection - 'max_rate' WHERE id = $1",
        &[&id],
    )
    .await
    .expect("lift the rate");
    let out = cli(&fx, &["unpause", "--table", "users"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = fx.wait_job(id, 60, terminal).await;
    a.stop().await;
    b.stop().await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", ROWS, 0),
        "{j:?}"
    );
    fx.assert_all_migrated_once().await;
    let out = cli(&fx, &["unpause", "--table", "users"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "no pause of jobs writing table users is in force; in force: --scope wrappers"
        ),
        "{}",
        stderr(&out)
    );
}

/// A pause with `--for` holds pending jobs back and lifts by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_for_a_while_lifts_by_itself() {
    let fx = Fixture::new(100).await;
    let out = cli(&fx, &["pause", "--for", "2s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("paused every job until 20"),
        "{}",
        stdout(&out)
    );
    let d = InProcess::start(&fx, &[("PQMIG_POLL_INTERVAL", "200ms")]).await;
    let id = fx.enqueue(json!({})).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        fx.job(id).await.status,
        "pending",
        "not claimed while paused"
    );
    let j = fx.wait_job(id, 30, terminal).await;
    d.stop().await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 100));
}

/// Bad input: one line, exit 2, nothing recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pause_input_is_one_line_and_changes_nothing() {
    let fx = Fixture::new(0).await;
    for (args, want) in [
        (
            vec!["pause", "--scope", "keys"],
            "--scope: \"keys\" is not wrappers, signatures or hashes",
        ),
        (
            vec!["pause", "--until", "tomorrow"],
            "--until: \"tomorrow\" is not an RFC 3339 time",
        ),
        (
            vec!["pause", "--until", "2020-01-01T00:00:00Z"],
            "--until: 2020-01-01T00:00:00Z is not in the future",
        ),
        (
            vec!["pause", "--for", "a while"],
            "--for: \"a while\" is not a duration",
        ),
        (
            vec!["pause", "--table", ""],
            "--table: \"\" is not a table name",
        ),
        (
            vec!["unpause"],
            "no pause of every job is in force; nothing is",
        ),
    ] {
        let out = cli(&fx, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    let out = cli(
        &fx,
        &["pause", "--until", "2099-01-01T00:00:00Z", "--for", "1h"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(pauses(&fx).await, 0);
}

/// `pqmig set` lifts a running job's max_rate (at 20 items/s its 3000
/// items would take 150 s; lifted, it ends well within the wait) and
/// changes its priority, each recorded as a `changed` event; bad input and
/// finished jobs are refused with one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_changes_a_running_jobs_rate_and_priority() {
    const ROWS: i64 = 3000;
    let fx = Fixture::new(ROWS).await;
    let d = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"batch_size": 10, "max_rate": 20})).await;
    fx.wait_job(id, 30, |j| j.processed >= 20).await;
    let job = id.to_string();
    let out = cli(&fx, &["set", &job, "--priority", "7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("priority 7"), "{}", stdout(&out));
    let c = fx.db.client().await;
    let priority: i16 = c
        .query_one(
            "SELECT priority FROM pq_migration_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .expect("priority")
        .get(0);
    assert_eq!(priority, 7);
    let out = cli(&fx, &["set", &job, "--max-rate", "none"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = fx.wait_job(id, 60, terminal).await;
    d.stop().await;
    assert_eq!((j.status.as_str(), j.processed), ("done", ROWS), "{j:?}");
    let started: f64 = c
        .query_one(
            "SELECT extract(epoch FROM finished_at - started_at)::float8 FROM pq_migration_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .expect("duration")
        .get(0);
    assert!(started < 100.0, "the lifted rate held on: {started} s");
    assert_eq!(
        fx.events(id, "changed").await,
        2,
        "{}",
        fx.event_log(id).await
    );
    fx.assert_all_migrated_once().await;
    for (args, want) in [
        (
            vec!["set", &job, "--priority", "1"],
            "is done; only pending or running jobs can be changed",
        ),
        (
            vec!["set", "987654", "--priority", "1"],
            "no job with id 987654",
        ),
        (
            vec!["set", &job, "--max-rate", "-5"],
            "--max-rate: \"-5\" is not a positive number",
        ),
        (vec!["set", &job], "nothing to change"),
    ] {
        let out = cli(&fx, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).trim_end().lines().count(), 1);
    }
}
