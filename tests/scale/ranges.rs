//! A split job as operators and faults meet it: range holders SIGKILLed,
//! cancel and resume across replicas, verify and rollback of the whole
//! job, and the rescuer's grace after its own database trouble.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::range_statuses;
use crate::support::hashes::{Fixture, legacy_hash, signal, terminal, terminate};
use crate::support::{InProcess, run, stdout, wait_until};

/// Three range holders are SIGKILLed mid-walk (and replaced) with
/// `max_attempts` 3. Before ranges every claim used an attempt, so the
/// third kill failed the job; now a claim that commits progress uses none.
/// Nothing is lost or done twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_range_holders_loses_nothing_and_progress_uses_no_attempt() {
    const ROWS: i64 = 200_000;
    let fx = Fixture::bulk(ROWS, "'v1'").await;
    let env = [
        ("PQMIG_RANGE_ITEMS", "20000"),
        ("PQMIG_CONCURRENCY", "2"),
        ("PQMIG_MAX_ATTEMPTS", "3"),
    ];
    let mut daemons = vec![fx.spawn_daemon("d0", &env), fx.spawn_daemon("d1", &env)];
    let mut next = 2;
    // Slow enough to be killed three times mid-walk.
    let id = fx.enqueue(json!({"max_rate": 15000})).await;
    let c = fx.db.client().await;
    let mut kills = 0;
    while kills < 3 {
        let before = fx.job(id).await.processed;
        fx.wait_job(id, 60, |j| j.processed >= before + 5000).await;
        let holders: Vec<String> = c
            .query(
                "SELECT locked_by FROM pq_migration_ranges \
                 WHERE job_id = $1 AND status = 'running' AND processed_count > 0",
                &[&id],
            )
            .await
            .expect("holders")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let Some(victim) = (0..daemons.len()).find(|&i| {
            let pid = format!("-{}-", daemons[i].id());
            holders.iter().any(|w| w.contains(&pid))
        }) else {
            assert!(
                fx.job(id).await.status == "running",
                "the job ended after {kills} kills"
            );
            continue;
        };
        signal(&daemons[victim], libc::SIGKILL);
        let _ = daemons[victim].wait();
        kills += 1;
        daemons[victim] = fx.spawn_daemon(&format!("d{next}"), &env);
        next += 1;
    }
    let j = fx.wait_job(id, 120, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", ROWS, 0),
        "{j:?}"
    );
    assert!(
        fx.events(id, "reclaimed").await >= 3,
        "each kill's ranges were reclaimed"
    );
    assert_eq!(fx.exact_rows("'v1'").await, (ROWS, ROWS));
    let backups: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_backups_all WHERE job_id = $1",
            &[&id],
        )
        .await
        .expect("backups")
        .get(0);
    assert_eq!(backups, ROWS, "one backup per item: nothing written twice");
    for d in &mut daemons {
        terminate(d);
    }
}

/// Cancel stops every range on both replicas within a heartbeat or two;
/// resume walks only what is left; verify and rollback act on the whole
/// job, whichever replica wrote which range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_resume_verify_and_rollback_of_a_job_split_over_two_replicas() {
    const ROWS: i64 = 3000;
    let fx = Fixture::new(ROWS).await;
    let c = fx.db.client().await;
    c.batch_execute("ANALYZE users").await.expect("analyze");
    let env = [("PQMIG_RANGE_ITEMS", "500")];
    let a = InProcess::start(&fx, &env).await;
    let b = InProcess::start(&fx, &env).await;
    let id = fx.enqueue(json!({"batch_size": 50, "max_rate": 600})).await;
    fx.wait_job(id, 30, |j| j.processed >= 300).await;
    let (_, running, _) = range_statuses(&fx, id).await;
    assert!(running >= 2, "several ranges walked at once ({running})");

    let url = [("DATABASE_URL", fx.db.url.as_str())];
    let out = run(&["cancel", &id.to_string()], &url);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    wait_until(10, "every range stopped", || async {
        range_statuses(&fx, id).await.1 == 0
    })
    .await;
    let at_cancel: i64 = c
        .query_one(
            "SELECT sum(processed_count)::bigint FROM pq_migration_ranges WHERE job_id = $1",
            &[&id],
        )
        .await
        .expect("sum")
        .get(0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let migrated = |users: Vec<(i64, Vec<u8>, String)>| {
        users.iter().filter(|(_, _, v)| v != "v1").count() as i64
    };
    assert_eq!(
        migrated(fx.users().await),
        at_cancel,
        "no batch after cancel, none lost"
    );
    assert!(at_cancel < ROWS, "cancelled mid-job");

    // Resume, at full speed.
    c.execute(
        "UPDATE pq_migration_jobs SET selection = selection - 'max_rate' WHERE id = $1",
        &[&id],
    )
    .await
    .expect("lift the rate");
    let out = run(&["resume", &id.to_string()], &url);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", ROWS, 0),
        "{j:?}"
    );
    fx.assert_all_migrated_once().await;
    let ranges = j.result.expect("result")["ranges"]
        .as_i64()
        .expect("ranges");
    assert!(ranges >= 4, "split into ranges of ~500 items: {ranges}");
    a.stop().await;
    b.stop().await;

    let env = [
        ("DATABASE_URL", fx.db.url.as_str()),
        ("PQMIG_KEYRING", fx.keyring.to_str().expect("utf-8")),
    ];
    let out = run(&["verify", &id.to_string()], &env);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{ROWS} items verified")),
        "{}",
        stdout(&out)
    );
    let out = run(&["rollback", &id.to_string()], &env);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    for (uid, hash, version) in fx.users().await {
        assert_eq!(
            (version.as_str(), hash),
            ("v1", legacy_hash(uid)),
            "user {uid} restored"
        );
    }
}

/// After its own database trouble the rescuer reclaims nothing for one
/// lease: a holder cut off as long as this process was gets to heartbeat
/// first. Then an expired range is reclaimed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rescuer_waits_one_lease_after_its_own_database_trouble() {
    use pqmig::daemon::{Services, Shared, rescuer::Rescuer};
    use tokio_util::sync::CancellationToken;

    let fx = Fixture::new(10).await;
    let c = fx.db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, status, ranges, selection) \
           VALUES ('hashes', 'running', 1, '{\"table\":\"users\",\"column\":\"email_hash\"}'); \
         INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, attempts, locked_by, \
                                          lease_token, heartbeat_at) \
           VALUES (1, 0, 0, 10, 'running', 1, 'gone-1', gen_random_uuid(), now() - interval '1 hour');",
    )
    .await
    .expect("a stale range");
    let config = crate::support::daemon::config(&fx, &[("PQMIG_LEASE", "1500ms")]);
    let services = Services::from_config(&config).await.expect("services");
    let shared = Arc::new(Shared::new(&config, &services, CancellationToken::new()));
    let rescuer = Rescuer {
        shared: Arc::clone(&shared),
    };
    // A failed statement is no trouble reaching the database ...
    let timeout = pqmig::daemon::ServiceError::Pool("pool: timed out waiting".into());
    let statement = c
        .batch_execute("SELECT 1/0")
        .await
        .expect_err("division by zero");
    shared.db_trouble(&pqmig::daemon::ServiceError::Database(statement));
    assert!(shared.db_trouble.lock().expect("lock").is_none());
    // ... no connection is.
    shared.db_trouble(&timeout);
    assert!(
        rescuer.run_once().await.expect("round").is_empty(),
        "within the grace nothing is reclaimed"
    );
    assert_eq!(super::range_statuses(&fx, 1).await, (0, 1, 0));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        rescuer.run_once().await.expect("round"),
        vec![(1, 0, "pending".to_owned())]
    );
    assert_eq!(fx.events(1, "reclaimed").await, 1);
}

/// A process that dies between marking its range done and ending the job
/// leaves a running job whose ranges are all done and nobody walking: the
/// rescuer requeues it once a lease has passed, and its next claim ends it
/// (with the scope's last word: the hashes field policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_ranges_are_all_done_is_ended_by_its_next_claim() {
    let fx = Fixture::new(10).await;
    let c = fx.db.client().await;
    c.execute(
        "INSERT INTO pq_migration_jobs (scope, target_algo_id, status, ranges, started_at, \
                                        updated_at, selection) \
         VALUES ('hashes', $1, 'running', 2, now() - interval '1 hour', now() - interval '1 hour', \
                 '{\"table\":\"users\",\"column\":\"email_hash\"}')",
        &[&fx.algo_id],
    )
    .await
    .expect("job");
    c.batch_execute(
        "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, processed_count, cursor) VALUES \
           (1, 0, 0, 5, 'done', 5, '{\"after_id\": 5, \"migrated\": 4, \"skipped\": 1}'), \
           (1, 1, 5, 10, 'done', 5, '{\"after_id\": 10, \"migrated\": 5, \"skipped\": 0}');",
    )
    .await
    .expect("ranges");
    let daemon = InProcess::start(&fx, &[]).await;
    let j = fx.wait_job(1, 30, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 10, 0),
        "{j:?}"
    );
    let result = j.result.expect("result");
    assert_eq!(
        (result["migrated"].as_i64(), result["skipped"].as_i64()),
        (Some(9), Some(1))
    );
    assert_eq!(fx.events(1, "reclaimed").await, 1);
    let policies: i64 = c
        .query_one(
            "SELECT count(*) FROM field_hash_policies f JOIN hash_profiles p ON p.id = f.profile_id \
             WHERE f.entity_table = 'users' AND p.name = 'pepper-v2'",
            &[],
        )
        .await
        .expect("policies")
        .get(0);
    assert_eq!(policies, 1, "the job's last word was said");
    daemon.stop().await;
}

/// A range marked done is not a lost lease: the heartbeat that finds it
/// done (before its walker has ended the job) lets the walker go on. With
/// a heartbeat every 5 ms it would otherwise strike between the two steps:
/// the job was left for the rescuer to requeue and end, and a lost lease
/// was counted for a range that finished fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_done_is_not_a_lost_lease_while_its_walker_ends_the_job() {
    const ROWS: i64 = 3000;
    let fx = Fixture::new(ROWS).await;
    let c = fx.db.client().await;
    c.batch_execute("ANALYZE users").await.expect("analyze");
    let env = [
        ("PQMIG_RANGE_ITEMS", "200"),
        ("PQMIG_HEARTBEAT_INTERVAL", "5ms"),
    ];
    let d = InProcess::start(&fx, &env).await;
    let id = fx.enqueue(json!({"batch_size": 50})).await;
    let j = fx.wait_job(id, 60, terminal).await;
    let lost = d.metric("pqmig_leases_lost_total").await;
    d.stop().await;
    let log = fx.event_log(id).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", ROWS), "{log}");
    assert!(
        j.result.expect("result")["ranges"].as_i64() >= Some(10),
        "{log}"
    );
    assert_eq!(
        fx.events(id, "claimed").await,
        1,
        "ended by its last walker:\n{log}"
    );
    assert_eq!(fx.events(id, "reclaimed").await, 0, "{log}");
    assert_eq!(lost, 0.0, "no lease counted lost");
}

/// A job the rescuer fails (its ranges used `max_attempts` claims without
/// progress) counts in `pqmig_jobs_finished_total{status="failed"}` once,
/// however many of its ranges ran out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_rescuer_fails_is_counted_as_failed_once() {
    use pqmig::daemon::{Services, Shared, rescuer::Rescuer};
    use tokio_util::sync::CancellationToken;

    let fx = Fixture::new(10).await;
    let c = fx.db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, status, ranges, selection) \
           VALUES ('hashes', 'running', 2, '{\"table\":\"users\",\"column\":\"email_hash\"}'); \
         INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, attempts, locked_by, \
                                          lease_token, heartbeat_at) \
           VALUES (1, 0, 0, 5, 'running', 5, 'gone-1', gen_random_uuid(), now() - interval '1 hour'), \
                  (1, 1, 5, 10, 'running', 5, 'gone-2', gen_random_uuid(), now() - interval '1 hour');",
    )
    .await
    .expect("two stale ranges out of attempts");
    let config = crate::support::daemon::config(&fx, &[("PQMIG_MAX_ATTEMPTS", "5")]);
    let services = Services::from_config(&config).await.expect("services");
    let shared = Arc::new(Shared::new(&config, &services, CancellationToken::new()));
    let failed = || {
        shared
            .metrics
            .jobs_finished
            .with_label_values(&["hashes", "failed"])
            .get()
    };
    let before = failed();
    let rescued = Rescuer {
        shared: Arc::clone(&shared),
    }
    .run_once()
    .await
    .expect("round");
    assert_eq!(rescued.len(), 2, "{rescued:?}");
    assert_eq!(fx.job(1).await.status, "failed");
    assert_eq!(failed() - before, 1);
}
