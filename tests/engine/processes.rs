//! Real daemons: cancel and resume, drain, several replicas, SIGKILL,
//! SIGSTOP (fencing), a second signal, lost connections.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::hashes::{Fixture, signal, terminal, terminate};
use crate::support::{InProcess, run, wait_until};

/// A job slow enough to interrupt: `max_rate` items/s.
async fn slow_job(fx: &Fixture, rate: i64) -> i64 {
    fx.enqueue(json!({"batch_size": 50, "max_rate": rate}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_worker_and_resume_finishes() {
    let fx = Fixture::new(2000).await;
    let mut daemon = fx.spawn_daemon("d", &[]);
    let id = slow_job(&fx, 400).await;
    fx.wait_job(id, 30, |j| j.processed >= 100).await;
    let env = [("DATABASE_URL", fx.db.url.as_str())];
    let out = run(&["cancel", &id.to_string()], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    let at_cancel = fx.job(id).await;
    assert_eq!(at_cancel.status, "cancelled");
    // The batch in flight, if any, fails its fenced commit and rolls back;
    // the worker drops the job at its next heartbeat or write.
    wait_until(10, "the worker dropping the cancelled job", || async {
        fx.log("d").contains("lease lost")
    })
    .await;
    let later = fx.job(id).await;
    assert_eq!(
        later.processed, at_cancel.processed,
        "no batch after cancel"
    );
    let migrated = fx
        .users()
        .await
        .iter()
        .filter(|(_, _, v)| v != "v1")
        .count() as i64;
    assert_eq!(
        migrated, later.processed,
        "processed_count matches the rows written"
    );

    // Cancelling again is refused with exit code 2; an unknown job too.
    let out = run(&["cancel", &id.to_string()], &env);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["cancel", "999999"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job with id 999999"));

    let out = run(&["resume", &id.to_string()], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Resume at full speed is not possible (max_rate is in the selection),
    // so lift it for the rest of the run.
    fx.db
        .client()
        .await
        .execute(
            "UPDATE pq_migration_jobs SET selection = selection - 'max_rate' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("lift rate");
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 2000, 0),
        "{j:?}"
    );
    fx.assert_all_migrated_once().await;
    terminate(&mut daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_releases_without_using_an_attempt() {
    let fx = Fixture::new(3000).await;
    let mut daemon = fx.spawn_daemon("d", &[]);
    let id = slow_job(&fx, 500).await;
    fx.wait_job(id, 30, |j| j.processed >= 100).await;
    signal(&daemon, libc::SIGTERM);
    let status = daemon.wait().expect("wait");
    assert!(
        status.success(),
        "exit 0 after drain: {status:?}\n{}",
        fx.log("d")
    );
    // The job stays started; its range goes back to the queue.
    let j = fx.job(id).await;
    assert_eq!(j.status, "running", "{j:?}");
    let range = fx
        .db
        .client()
        .await
        .query_one(
            "SELECT status, attempts, lease_token IS NULL, processed_count \
             FROM pq_migration_ranges WHERE job_id = $1",
            &[&id],
        )
        .await
        .expect("the job's one range");
    assert_eq!(range.get::<_, String>(0), "pending");
    assert_eq!(
        range.get::<_, i32>(1),
        0,
        "a release on shutdown gives the attempt back"
    );
    assert!(range.get::<_, bool>(2), "no lease left");
    assert_eq!(
        range.get::<_, i64>(3),
        j.processed,
        "the job row has the range's count"
    );
    let migrated = fx
        .users()
        .await
        .iter()
        .filter(|(_, _, v)| v != "v1")
        .count() as i64;
    assert_eq!(migrated, j.processed, "no half batch");
    assert_eq!(j.processed % 50, 0, "whole batches only");
    // Exactly one release for the shutdown. A load-induced transient
    // error earlier may add a release of its own (and a later claim whose
    // progress committed resets the attempts), so the others are not
    // counted here; the whole log is printed when the count is wrong.
    let shutdown_releases: i64 = fx
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pq_migration_job_events \
             WHERE job_id = $1 AND event = 'released' AND detail->>'reason' = 'shutdown'",
            &[&id],
        )
        .await
        .expect("release events")
        .get(0);
    assert_eq!(
        shutdown_releases,
        1,
        "one release for the shutdown:\n{}\ndaemon log:\n{}",
        fx.event_log(id).await,
        fx.log("d")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_forty_jobs_each_done_once() {
    let fx = Fixture::new(2000).await;
    let mut ids = Vec::new();
    for k in 0..40 {
        ids.push(
            fx.enqueue(json!({"id_from": k * 50 + 1, "id_to": k * 50 + 50, "batch_size": 10}))
                .await,
        );
    }
    let mut daemons: Vec<_> = (0..3)
        .map(|i| fx.spawn_daemon(&format!("d{i}"), &[]))
        .collect();
    for &id in &ids {
        let j = fx.wait_job(id, 60, terminal).await;
        assert_eq!(
            (j.status.as_str(), j.processed, j.failed),
            ("done", 50, 0),
            "job {id}: {j:?}"
        );
    }
    fx.assert_all_migrated_once().await;
    let c = fx.db.client().await;
    let claims: Vec<i64> = c
        .query(
            "SELECT count(*) FROM pq_migration_job_events WHERE event = 'claimed' GROUP BY job_id",
            &[],
        )
        .await
        .expect("claims")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(claims.len(), 40);
    assert!(
        claims.iter().all(|&n| n == 1),
        "each job claimed once: {claims:?}"
    );
    let workers: i64 = c
        .query_one(
            "SELECT count(DISTINCT worker) FROM pq_migration_job_events WHERE event = 'done'",
            &[],
        )
        .await
        .expect("workers")
        .get(0);
    assert!(workers >= 2, "work spread over the daemons ({workers})");
    for d in &daemons {
        signal(d, libc::SIGTERM);
    }
    for d in &mut daemons {
        assert!(d.wait().expect("wait").success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_then_another_daemon_finishes_it() {
    let fx = Fixture::new(3000).await;
    let mut a = fx.spawn_daemon("a", &[]);
    let id = slow_job(&fx, 1000).await;
    fx.wait_job(id, 30, |j| j.processed >= 200).await;
    signal(&a, libc::SIGKILL);
    let _ = a.wait();
    let mut b = fx.spawn_daemon("b", &[]);
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 3000, 0),
        "{j:?}"
    );
    assert_eq!(
        j.attempts,
        0,
        "claims that made progress used no attempt:\n{}",
        fx.event_log(id).await
    );
    fx.assert_all_migrated_once().await;
    // The killed daemon's range was reclaimed once; the job was started once.
    assert_eq!(fx.events(id, "reclaimed").await, 1);
    assert_eq!(fx.events(id, "claimed").await, 1);
    terminate(&mut b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_daemon_is_fenced_out() {
    let fx = Fixture::new(3000).await;
    let mut a = fx.spawn_daemon("a", &[]);
    let id = slow_job(&fx, 1000).await;
    fx.wait_job(id, 30, |j| j.processed >= 200).await;
    signal(&a, libc::SIGSTOP);
    let mut b = fx.spawn_daemon("b", &[]);
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 3000), "{j:?}");
    let snapshot = (fx.users().await, fx.job(id).await.processed);
    terminate(&mut b);

    signal(&a, libc::SIGCONT);
    // The resumed process finds its lease gone and drops the job.
    wait_until(30, "the resumed daemon dropping the job", || async {
        fx.log("a").contains("lease lost")
    })
    .await;
    assert_eq!(
        (fx.users().await, fx.job(id).await.processed),
        snapshot,
        "the paused daemon wrote after resuming"
    );
    fx.assert_all_migrated_once().await;
    signal(&a, libc::SIGTERM);
    assert!(a.wait().expect("wait").success(), "{}", fx.log("a"));
    assert!(fx.log("a").contains("lease lost"), "{}", fx.log("a"));
    crate::support::hashes::assert_no_secret(&(fx.log("a") + &fx.log("b")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let fx = Fixture::new(3000).await;
    let mut daemon = fx.spawn_daemon("d", &[("PQMIG_SHUTDOWN_TIMEOUT", "60s")]);
    let id = slow_job(&fx, 200).await;
    fx.wait_job(id, 30, |j| j.processed >= 50).await;
    // Block the next batch's writes so the drain has something to wait for.
    let mut locker = fx.db.client().await;
    let lock = locker.transaction().await.expect("tx");
    lock.batch_execute("LOCK TABLE users IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let watcher = fx.db.client().await;
    wait_until(10, "a batch waiting on the lock", || async {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'pqmig %' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get::<_, i64>(0)
            > 0
    })
    .await;
    signal(&daemon, libc::SIGTERM);
    wait_until(10, "the drain starting", || async {
        fx.log("d").contains("draining in-flight jobs")
    })
    .await;
    assert!(
        daemon.try_wait().expect("try_wait").is_none(),
        "still draining"
    );
    let t0 = Instant::now();
    signal(&daemon, libc::SIGTERM);
    let status = daemon.wait().expect("wait");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(1), "{}", fx.log("d"));
    lock.rollback().await.expect("unlock");
    // Whatever was in flight rolled back: the counts match the rows. The
    // counts committed with the batches are the ranges'; the job row's
    // are rolled up from them later (every rescue interval), so they may
    // lag.
    let committed: i64 = fx
        .db
        .client()
        .await
        .query_one(
            "SELECT COALESCE(sum(processed_count), 0)::bigint FROM pq_migration_ranges WHERE job_id = $1",
            &[&id],
        )
        .await
        .expect("the ranges' counts")
        .get(0);
    let migrated = fx
        .users()
        .await
        .iter()
        .filter(|(_, _, v)| v != "v1")
        .count() as i64;
    assert_eq!(migrated, committed);
    assert!(fx.job(id).await.processed <= committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_are_retried_and_the_job_finishes() {
    let fx = Fixture::new(3000).await;
    let config = fx.dir.path().join("pqmig.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"100ms\"\nretry_backoff_max = \"1s\"\n",
    )
    .expect("config");
    let mut daemon = fx.spawn_daemon("d", &[("PQMIG_CONFIG", config.to_str().expect("utf-8"))]);
    let id = slow_job(&fx, 1500).await;
    let admin = crate::support::connect(&crate::support::admin_url()).await;
    for step in 1..=3 {
        fx.wait_job(id, 30, |j| j.processed >= step * 500).await;
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name LIKE 'pqmig %'",
                &[&fx.db.name],
            )
            .await
            .expect("terminate");
    }
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 3000, 0),
        "{j:?}\n{}",
        fx.log("d")
    );
    fx.assert_all_migrated_once().await;
    assert!(
        fx.log("d").contains("LISTEN connection lost"),
        "the connections were terminated"
    );
    crate::support::hashes::assert_no_secret(&fx.log("d"));
    // Wake-ups still work after the LISTEN connection was killed.
    let t0 = Instant::now();
    let next = fx.enqueue(json!({})).await;
    fx.wait_job(next, 10, terminal).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    terminate(&mut daemon);
}

/// A database error that retrying cannot fix fails the job with the
/// server's own message, and the batch leaves no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_database_error_fails_the_job_with_its_message() {
    let fx = Fixture::new(50).await;
    fx.db
        .client()
        .await
        .batch_execute(
            "CREATE FUNCTION no_updates() RETURNS trigger LANGUAGE plpgsql AS \
               $$BEGIN RAISE EXCEPTION 'users are frozen for the audit'; END$$; \
             CREATE TRIGGER frozen BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION no_updates();",
        )
        .await
        .expect("trigger");
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed");
    let err = j.error.unwrap_or_default();
    assert!(err.contains("users are frozen for the audit"), "{err}");
    assert_eq!(j.processed, 0);
    assert!(fx.users().await.iter().all(|(_, _, v)| v == "v1"));
    let backups: i64 = fx
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM pq_migration_backups_all", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(backups, 0, "the failed batch rolled back whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_hold_while_batches_hold_every_pooled_connection() {
    let fx = Fixture::new(3000).await;
    let config = fx.dir.path().join("pqmig.toml");
    // Two walks and two pooled connections: a walk blocked on the table
    // holds its connection, so both are gone until the lock goes.
    std::fs::write(
        &config,
        "[worker]\nconcurrency = 2\nrange_items = 500\n\
         [database]\npool_size = 2\nstatement_timeout = \"60s\"\n",
    )
    .expect("config");
    let c = fx.db.client().await;
    c.batch_execute("ANALYZE users").await.expect("analyze");
    let mut daemon = fx.spawn_daemon("d", &[("PQMIG_CONFIG", config.to_str().expect("utf-8"))]);
    let id = slow_job(&fx, 1000).await;
    wait_until(30, "two ranges walking", || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pq_migration_ranges WHERE job_id = $1 AND status = 'running'",
                &[&id],
            )
            .await
            .expect("ranges")
            .get(0);
        n == 2
    })
    .await;
    let mut blocker = fx.db.client().await;
    let tx = blocker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock users");
    // Three leases (1.5 s each, renewed every 250 ms) with the pool held:
    // every running range's heartbeat stays younger than a lease.
    for _ in 0..18 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stale: Vec<(i32, f64)> = c
            .query(
                "SELECT range_no, extract(epoch FROM now() - heartbeat_at)::float8 \
                 FROM pq_migration_ranges WHERE job_id = $1 AND status = 'running' \
                   AND heartbeat_at < now() - interval '1200 ms'",
                &[&id],
            )
            .await
            .expect("heartbeats")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert!(
            stale.is_empty(),
            "leases near expiry while the pool is busy (range, age s): {stale:?}\n{}",
            fx.log("d")
        );
    }
    let waiting: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
               AND application_name LIKE 'pqmig %' AND wait_event_type = 'Lock'",
            &[&fx.db.name],
        )
        .await
        .expect("activity")
        .get(0);
    assert!(waiting >= 1, "the walks were blocked on the table");
    tx.rollback().await.expect("unlock");
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 3000, 0),
        "{j:?}\n{}",
        fx.log("d")
    );
    fx.assert_all_migrated_once().await;
    assert_eq!(
        fx.events(id, "reclaimed").await,
        0,
        "no lease was lost:\n{}\n{}",
        fx.event_log(id).await,
        fx.log("d")
    );
    terminate(&mut daemon);
}
