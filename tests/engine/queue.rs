//! The queue: the claim plan, NOTIFY wake-ups and scheduling, the rescuer,
//! fenced writes.

use std::time::{Duration, Instant};

use serde_json::json;

use pqmig::db::leases::{self, Renewal};

use crate::support::hashes::{Fixture, terminal};
use crate::support::{InProcess, lock_waiters, wait_until};

/// Renew one job lease alone.
async fn renew(c: &tokio_postgres::Client, lease: pqmig::db::jobs::Lease) -> Renewal {
    let held = leases::Held {
        job_id: lease.job_id,
        range_no: -1,
        token: lease.token,
    };
    leases::leases_renew(c, &[held]).await.expect("renew")[0]
}

/// A transaction holding the row lock of range `no` of `job`, as a batch
/// committing its progress does.
async fn lock_range(
    c: &mut tokio_postgres::Client,
    job: i64,
    no: i32,
) -> tokio_postgres::Transaction<'_> {
    let tx = c.transaction().await.expect("begin");
    tx.execute(
        "SELECT 1 FROM pq_migration_ranges WHERE job_id = $1 AND range_no = $2 FOR UPDATE",
        &[&job, &no],
    )
    .await
    .expect("lock the range");
    tx
}

/// A batch of range `no` of `job` committing: its range row locked and 50
/// more items counted, until the caller commits.
async fn batch_in_flight(
    c: &mut tokio_postgres::Client,
    job: i64,
    no: i32,
) -> tokio_postgres::Transaction<'_> {
    let tx = c.transaction().await.expect("begin");
    tx.execute(
        "UPDATE pq_migration_ranges SET processed_count = processed_count + 50 \
         WHERE job_id = $1 AND range_no = $2",
        &[&job, &no],
    )
    .await
    .expect("the batch's count");
    tx
}

#[tokio::test]
async fn one_statement_renews_every_lease_and_never_waits_on_a_locked_row() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let id = fx.enqueue(json!({})).await;
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'running', ranges = 4 WHERE id = $1",
        &[&id],
    )
    .await
    .expect("job running");
    let token = |n: i32| uuid::Uuid::from_u128(0x1000 + n as u128);
    for (n, status) in [(0, "running"), (1, "running"), (2, "done"), (3, "running")] {
        c.execute(
            "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, lease_token, heartbeat_at) \
             VALUES ($1, $2, $2 * 10, $2 * 10 + 10, $3, $4, now() - interval '1 hour')",
            &[&id, &n, &status, &token(n)],
        )
        .await
        .expect("range");
    }
    let mut held: Vec<leases::Held> = (0..4)
        .map(|n| leases::Held {
            job_id: id,
            range_no: n,
            token: token(n),
        })
        .collect();
    // Range 3 was reclaimed by someone else meanwhile.
    held[3].token = uuid::Uuid::from_u128(0xdead);
    // Range 1's row is locked by a transaction (a batch committing): the
    // renewal must not wait for it (a wait would hit this lock_timeout).
    let mut other = fx.db.client().await;
    let tx = lock_range(&mut other, id, 1).await;
    c.batch_execute("SET lock_timeout = '2s'")
        .await
        .expect("lock_timeout");
    let got = leases::leases_renew(&c, &held).await.expect("renew");
    assert_eq!(
        got,
        [
            Renewal::Held,
            Renewal::Held,
            Renewal::Finished,
            Renewal::Lost
        ]
    );
    tx.rollback().await.expect("rollback");
    let fresh: Vec<bool> = c
        .query(
            "SELECT heartbeat_at > now() - interval '1 minute' FROM pq_migration_ranges \
             WHERE job_id = $1 ORDER BY range_no",
            &[&id],
        )
        .await
        .expect("heartbeats")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        fresh,
        [true, false, false, false],
        "only the free, held row is written"
    );
    // A pause over the job's scope reaches its walkers through the renewal,
    // renewed or not.
    c.execute(
        "INSERT INTO pq_migration_pauses (scope, paused_by) VALUES ('hashes', 'test')",
        &[],
    )
    .await
    .expect("pause");
    let tx = lock_range(&mut other, id, 1).await;
    let got = leases::leases_renew(&c, &held[..2]).await.expect("renew");
    assert_eq!(got, [Renewal::Paused, Renewal::Paused]);
    tx.rollback().await.expect("rollback");
    assert!(
        leases::leases_renew(&c, &[])
            .await
            .expect("renew none")
            .is_empty()
    );
}

/// A split job claimed again to be started (a resume, a restart) keeps
/// its pending ranges from walkers until its start hands them on (a walk
/// begun before would run on what the start has not checked, and lose its
/// lease when the start resets the ranges); handing them on wakes the
/// replicas.
#[tokio::test]
async fn a_job_being_started_has_no_range_claimed_until_it_hands_them_on() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let id = fx.enqueue(json!({})).await;
    let token = uuid::Uuid::from_u128(0x5747);
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'running', ranges = 2, \
           lease_token = $2, locked_by = 'starter', heartbeat_at = now() \
         WHERE id = $1",
        &[&id, &token],
    )
    .await
    .expect("job being started");
    c.execute(
        "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi) \
         VALUES ($1, 0, 0, 10), ($1, 1, 10, 20)",
        &[&id],
    )
    .await
    .expect("ranges");
    let claim = async || {
        pqmig::db::ranges::ranges_claim(&c, 8, "walker")
            .await
            .expect("claim")
            .iter()
            .map(|r| (r.lease.job_id, r.lease.range_no))
            .collect::<Vec<_>>()
    };
    assert_eq!(claim().await, [], "the start holds the job");
    // Replicas woken by the ranges' NOTIFY claimed nothing: handing the
    // ranges on wakes them again.
    let (listener, mut connection) = tokio_postgres::connect(&fx.db.url, tokio_postgres::NoTls)
        .await
        .expect("listener");
    let (tx, mut woken) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    listener
        .batch_execute("LISTEN pqmig_jobs")
        .await
        .expect("listen");
    let lease = pqmig::db::jobs::Lease { job_id: id, token };
    assert!(
        pqmig::db::jobs::job_unlease(&c, lease)
            .await
            .expect("unlease"),
        "the start's lease"
    );
    let payload = tokio::time::timeout(Duration::from_secs(10), woken.recv())
        .await
        .expect("a NOTIFY when the start hands the ranges on");
    assert_eq!(payload, Some(id.to_string()));
    assert_eq!(claim().await, [(id, 0), (id, 1)]);
    drop(listener);
}

#[tokio::test]
async fn claim_query_uses_the_partial_index() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, status, priority, scheduled_at) \
         SELECT 'hashes', CASE WHEN i % 3 = 0 THEN 'done' ELSE 'pending' END, (i % 4)::smallint, \
                CASE WHEN i % 5 = 0 THEN now() + interval '1 hour' WHEN i % 7 = 0 THEN NULL ELSE now() - interval '1 minute' END \
         FROM generate_series(1, 30000) i; ANALYZE pq_migration_jobs;",
    )
    .await
    .expect("seed jobs");
    let sql = format!(
        "EXPLAIN (FORMAT JSON) {}",
        pqmig::db::jobs::CLAIM_SELECT.replace("$1", "8")
    );
    let plan: serde_json::Value = c.query_one(&sql, &[]).await.expect("explain").get(0);
    let text = plan.to_string();
    assert!(
        text.contains("idx_pq_mig_claim"),
        "claim must use the partial index: {text}"
    );
    assert!(!text.contains("\"Sort\""), "claim must not sort: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_daemon_and_scheduled_jobs_wait() {
    let fx = Fixture::new(10).await;
    // Polling every minute: only the NOTIFY can start the job promptly.
    let daemon = InProcess::start(&fx, &[("PQMIG_POLL_INTERVAL", "60s")]).await;
    let c = fx.db.client().await;
    wait_until(10, "the daemon's LISTEN connection", || async {
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'pqmig % listen' AND query = 'LISTEN pqmig_jobs'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get::<_, i64>(0)
            == 1
    })
    .await;
    let t0 = Instant::now();
    let id = fx.enqueue(json!({})).await;
    fx.wait_job(id, 10, terminal).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    daemon.stop().await;

    let daemon = InProcess::start(&fx, &[]).await;
    let later: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_algo_id, selection, scheduled_at) \
             VALUES ('hashes', $1, '{\"table\":\"users\",\"column\":\"email_hash\"}', now() + interval '2 seconds') \
             RETURNING id",
            &[&fx.algo_id],
        )
        .await
        .expect("scheduled")
        .get(0);
    let j = fx.wait_job(later, 10, terminal).await;
    assert_eq!(j.status, "done");
    // claimed only once due, by the database clock
    let claimed_when_due: bool = c
        .query_one(
            "SELECT started_at >= scheduled_at FROM pq_migration_jobs WHERE id = $1",
            &[&later],
        )
        .await
        .expect("times")
        .get(0);
    assert!(
        claimed_when_due,
        "a scheduled job started before it was due"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescuer_requeues_expired_leases_and_fails_at_max_attempts() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let stale = |attempts: i32| {
        let c = &c;
        async move {
            c.query_one(
                "INSERT INTO pq_migration_jobs (scope, status, attempts, lease_token, locked_by, heartbeat_at, cursor) \
                 VALUES ('hashes', 'running', $1, gen_random_uuid(), 'gone-1', now() - interval '1 hour', \
                         '{\"after_id\": 42}') RETURNING id",
                &[&attempts],
            )
            .await
            .expect("stale job")
            .get::<_, i64>(0)
        }
    };
    let retry = stale(1).await;
    let give_up = stale(5).await;
    let fresh: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, status, attempts, lease_token, heartbeat_at) \
             VALUES ('hashes', 'running', 1, gen_random_uuid(), now()) RETURNING id",
            &[],
        )
        .await
        .expect("fresh job")
        .get(0);
    let rescued = pqmig::db::jobs::job_rescue(&c, Duration::from_secs(60), 5, "test")
        .await
        .expect("rescue");
    assert_eq!(
        rescued,
        vec![
            (retry, "pending".to_owned()),
            (give_up, "failed".to_owned())
        ]
    );
    let row = c
        .query_one("SELECT status, cursor->>'after_id', lease_token IS NULL FROM pq_migration_jobs WHERE id = $1", &[&retry])
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("42"),
        "cursor kept"
    );
    assert!(row.get::<_, bool>(2));
    let err: Option<String> = c
        .query_one(
            "SELECT error FROM pq_migration_jobs WHERE id = $1",
            &[&give_up],
        )
        .await
        .expect("row")
        .get(0);
    assert!(err.unwrap_or_default().contains("max_attempts"));
    assert_eq!(
        fx.job(fresh).await.status,
        "running",
        "a live lease is left alone"
    );
    let events: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_job_events WHERE (job_id, event) IN (($1, 'reclaimed'), ($2, 'failed'))",
            &[&retry, &give_up],
        )
        .await
        .expect("events")
        .get(0);
    assert_eq!(events, 2);
}

#[tokio::test]
async fn fenced_writes_with_a_stale_lease_change_nothing() {
    use pqmig::db::jobs;
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let id = fx.enqueue(json!({})).await;
    let claimed = jobs::job_claim(&c, 5, "w1").await.expect("claim");
    assert_eq!(claimed.len(), 1);
    let stale = claimed[0].lease;
    assert_eq!(renew(&c, stale).await, Renewal::Held);

    // Reclaimed elsewhere: the lease expires and another worker claims it.
    c.execute(
        "UPDATE pq_migration_jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = $1",
        &[&id],
    )
    .await
    .expect("age");
    jobs::job_rescue(&c, Duration::from_secs(60), 5, "rescuer")
        .await
        .expect("rescue");
    let fresh = jobs::job_claim(&c, 5, "w2").await.expect("claim again");
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh[0].lease.token, stale.token);

    let cursor = json!({"after_id": 10});
    assert_eq!(renew(&c, stale).await, Renewal::Lost);
    assert_eq!(
        jobs::job_progress(&c, stale, 10, 1, &cursor, None)
            .await
            .expect("progress"),
        None
    );
    assert!(!jobs::job_set_total(&c, stale, 99).await.expect("total"));
    assert!(
        !jobs::job_finish(&c, stale, "done", None, &json!({}), "w1")
            .await
            .expect("finish")
    );
    assert!(
        !jobs::job_release(&c, stale, "w1", true, None, "x")
            .await
            .expect("release")
    );
    let j = fx.job(id).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed, j.attempts),
        ("running", 0, 0, 2)
    );

    // The current holder's writes go through.
    let lease = fresh[0].lease;
    assert_eq!(
        jobs::job_progress(&c, lease, 10, 1, &cursor, None)
            .await
            .expect("progress"),
        Some((10, 1))
    );
    // The same batch again (its first commit's reply lost): the cursor has
    // moved, so it is not counted twice, and the stored progress is there
    // to resume from.
    let again = jobs::job_progress(&c, lease, 10, 1, &cursor, None).await;
    assert_eq!(again.expect("progress"), None);
    let stored = jobs::job_reload(&c, lease).await.expect("reload");
    assert_eq!(stored, Some((Some(cursor.clone()), 10, 1)));
    assert_eq!(jobs::job_reload(&c, stale).await.expect("reload"), None);
    // A cancel fences out even the current holder.
    assert_eq!(
        jobs::job_cancel(&c, id, "test").await.expect("cancel"),
        jobs::JobAction::Done
    );
    assert_eq!(renew(&c, lease).await, Renewal::Lost);
    assert_eq!(
        jobs::job_progress(&c, lease, 1, 0, &cursor, Some(&cursor))
            .await
            .expect("progress"),
        None
    );
}

/// Each daemon service's `run_once`, driven directly: the rescuer returns
/// an expired lease, the producer claims it into a free slot (and its
/// executor finishes it), the sampler counts the inventory and fills the
/// gauges and readiness, the watchdog pings while the claim loop is alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_does_one_round_in_run_once() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use pqmig::daemon::{Services, Shared, producer, rescuer, sampler, watchdog};
    use tokio_util::sync::CancellationToken;

    let fx = Fixture::new(20).await;
    let id = fx.enqueue(json!({})).await;
    let c = fx.db.client().await;
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'running', attempts = 1, lease_token = gen_random_uuid(), \
         heartbeat_at = now() - interval '1 hour' WHERE id = $1",
        &[&id],
    )
    .await
    .expect("stale lease");
    let config = crate::support::daemon::config(&fx, &[]);
    let services = Services::from_config(&config).await.expect("services");
    let shared = Arc::new(Shared::new(&config, &services, CancellationToken::new()));

    let rescuer = rescuer::Rescuer {
        shared: Arc::clone(&shared),
    };
    assert_eq!(
        rescuer.run_once().await.expect("rescue"),
        vec![(id, -1, "pending".to_owned())]
    );
    assert_eq!(shared.metrics.leases_reclaimed.get(), 1);
    assert!(rescuer.run_once().await.expect("rescue").is_empty());

    let tracker = tokio_util::task::TaskTracker::new();
    let producer = producer::Producer {
        shared: Arc::clone(&shared),
        slots: Arc::new(tokio::sync::Semaphore::new(2)),
        wake: Arc::new(tokio::sync::Notify::new()),
        tracker: tracker.clone(),
    };
    // The job is claimed and started (split into one range: 20 items) ...
    assert_eq!(producer.run_once().await.expect("claim"), 1);
    wait_until(10, "the job is split", || async {
        let n: Option<i32> = c
            .query_one("SELECT ranges FROM pq_migration_jobs WHERE id = $1", &[&id])
            .await
            .expect("ranges")
            .get(0);
        n == Some(1)
    })
    .await;
    // ... then its range is claimed and walked.
    assert_eq!(producer.run_once().await.expect("claim"), 1);
    assert_eq!(producer.run_once().await.expect("claim"), 0);
    tracker.close();
    tracker.wait().await;
    assert_eq!(fx.job(id).await.status, "done");

    let sampler = sampler::Sampler::new(Arc::clone(&shared), config.maintenance.inventory_interval);
    assert!(matches!(
        sampler.count_once().await.expect("count"),
        sampler::CountOutcome::Counted { .. }
    ));
    sampler.run_once().await;
    assert!(shared.health.database_ok.load(Ordering::Relaxed));
    assert_eq!(
        shared.metrics.queue_jobs.with_label_values(&["done"]).get(),
        1
    );
    assert!(shared.metrics.inventory_last_success.get() > 0.0);
    let dog = watchdog::Watchdog {
        shared: Arc::clone(&shared),
        period: None,
    };
    shared.health.tick();
    assert!(dog.run_once());
}

/// A cancel that meets a batch committing its range counts that batch:
/// the job's total is summed after the batch's commit, not from before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_counts_the_batch_committing_at_that_moment() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let id = fx.enqueue(json!({})).await;
    c.batch_execute(&format!(
        "UPDATE pq_migration_jobs SET status = 'running', ranges = 1 WHERE id = {id}; \
         INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, lease_token, heartbeat_at, processed_count) \
           VALUES ({id}, 0, 0, 1000, 'running', gen_random_uuid(), now(), 100)"
    ))
    .await
    .expect("a job walking its range");
    // A batch's commit in flight: its range row locked, 50 more counted.
    let mut batch = fx.db.client().await;
    let tx = batch_in_flight(&mut batch, id, 0).await;
    let canceller = fx.db.client().await;
    let cancel =
        tokio::spawn(async move { pqmig::db::jobs::job_cancel(&canceller, id, "test").await });
    one_waits_on_a_lock(&c, "the cancel waiting for the batch").await;
    tx.commit().await.expect("the batch commits");
    let done = cancel.await.expect("join").expect("cancel");
    assert_eq!(done, pqmig::db::jobs::JobAction::Done);
    let j = fx.job(id).await;
    assert_eq!(
        (j.status.as_str(), j.processed),
        ("cancelled", 150),
        "the committed batch is counted"
    );
}

/// A range fails its job only while it still holds its lease (one given
/// to another replica meanwhile no longer speaks for the job), and the
/// job's counts include a batch of another range committing at that
/// moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_fails_its_job_only_under_its_lease_counting_every_committed_batch() {
    use pqmig::db::ranges::RangeLease;
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let id = fx.enqueue(json!({})).await;
    let (ours, theirs) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'running', ranges = 2 WHERE id = $1",
        &[&id],
    )
    .await
    .expect("a split job");
    c.execute(
        "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, lease_token, heartbeat_at, processed_count) \
         VALUES ($1, 0, 0, 1000, 'running', $2, now(), 100), ($1, 1, 1000, 2000, 'running', $3, now(), 10)",
        &[&id, &ours, &theirs],
    )
    .await
    .expect("its ranges, walking");
    let result = json!({});
    // A stale lease of range 0 (reclaimed since): nothing happens.
    let stale = RangeLease {
        job_id: id,
        range_no: 0,
        token: uuid::Uuid::new_v4(),
    };
    let failed = pqmig::db::jobs::job_fail(&c, &stale, "stale", &result, "test")
        .await
        .expect("job_fail");
    assert!(!failed, "a range no longer held does not fail the job");
    assert_eq!(fx.job(id).await.status, "running");
    // Range 1's batch commits while range 0 fails the job.
    let mut batch = fx.db.client().await;
    let tx = batch_in_flight(&mut batch, id, 1).await;
    let failer = fx.db.client().await;
    let lease = RangeLease {
        job_id: id,
        range_no: 0,
        token: ours,
    };
    let fail = tokio::spawn(async move {
        pqmig::db::jobs::job_fail(&failer, &lease, "fatal", &json!({}), "test").await
    });
    one_waits_on_a_lock(&c, "the failure waiting for the batch").await;
    tx.commit().await.expect("the batch commits");
    assert!(fail.await.expect("join").expect("job_fail"));
    failed_counting_the_batch(&fx, id, "fatal").await;
}

/// Job `id` is `failed` with `error`, its counts include the batch that
/// committed meanwhile (100 + 10 + 50), and none of its ranges runs.
async fn failed_counting_the_batch(fx: &Fixture, id: i64, error: &str) {
    let j = fx.job(id).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.error.as_deref()),
        ("failed", 160, Some(error)),
        "the committed batch is counted"
    );
    let running: i64 = fx
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pq_migration_ranges WHERE job_id = $1 AND status = 'running'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, 0, "its ranges are given back");
}

/// The rescuer fails a job whose range ran out of attempts in the lock
/// order a cancel takes (the job row, then its ranges): a cancel holding
/// the job row meanwhile wins instead of deadlocking with it. And the
/// failed job's counts include a batch of another range committing at
/// that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rescuer_fails_a_job_in_a_cancel_s_lock_order_counting_every_committed_batch() {
    use pqmig::db::ranges::ranges_rescue;
    let fx = Fixture::new(0).await;
    let mut c = fx.db.client().await;
    let id = fx.enqueue(json!({})).await;
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'running', ranges = 2 WHERE id = $1",
        &[&id],
    )
    .await
    .expect("a split job");
    c.execute(
        "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, attempts, lease_token, \
                                          heartbeat_at, processed_count) \
         VALUES ($1, 0, 0, 1000, 'running', 5, gen_random_uuid(), now() - interval '1 hour', 100), \
                ($1, 1, 1000, 2000, 'running', 1, gen_random_uuid(), now(), 10)",
        &[&id],
    )
    .await
    .expect("range 0 stale and out of attempts, range 1 walking");
    let lease = Duration::from_secs(30);
    let rescue = |c: tokio_postgres::Client| async move {
        let r = ranges_rescue(&c, lease, 5, "rescuer").await;
        (c, r)
    };
    // A cancel holds the job row and is about to lock the ranges.
    let mut cancel = fx.db.client().await;
    let tx = cancel.transaction().await.expect("begin");
    tx.execute(
        "SELECT 1 FROM pq_migration_jobs WHERE id = $1 FOR NO KEY UPDATE",
        &[&id],
    )
    .await
    .expect("the cancel's job row");
    let first = tokio::spawn(rescue(fx.db.client().await));
    wait_until(10, "the rescue ends or waits", || async {
        first.is_finished() || lock_waiters(&c).await == 1
    })
    .await;
    tx.execute(
        "SELECT 1 FROM pq_migration_ranges WHERE job_id = $1 FOR UPDATE",
        &[&id],
    )
    .await
    .expect("the cancel locks the ranges (no deadlock)");
    tx.commit().await.expect("the cancel commits");
    let (rescuer, rescued) = first.await.expect("join");
    assert_eq!(
        rescued.expect("the rescue (no deadlock)"),
        vec![],
        "a job row held by a cancel is left to the next round"
    );
    assert_eq!(fx.job(id).await.status, "running");
    // Range 2, stale with attempts left, is locked when the rescue
    // reclaims (so it is skipped there) and given back with the job.
    c.execute(
        "INSERT INTO pq_migration_ranges (job_id, range_no, lo, hi, status, attempts, lease_token, \
                                          heartbeat_at) \
         VALUES ($1, 2, 2000, 3000, 'running', 1, gen_random_uuid(), now() - interval '1 hour')",
        &[&id],
    )
    .await
    .expect("range 2");
    let mut other = fx.db.client().await;
    let held = lock_range(&mut other, id, 2).await;
    // Range 1's batch commits while the rescuer fails the job.
    let batch = batch_in_flight(&mut c, id, 1).await;
    let second = tokio::spawn(rescue(rescuer));
    one_waits_on_a_lock(&fx.db.client().await, "the rescue waiting for the batch").await;
    batch.commit().await.expect("the batch commits");
    held.commit().await.expect("range 2's holder commits");
    let (_, rescued) = second.await.expect("join");
    assert_eq!(
        rescued.expect("the rescue"),
        vec![(id, 0, "failed".to_owned()), (id, 2, "pending".to_owned())]
    );
    assert_eq!(
        (
            fx.events(id, "failed").await,
            fx.events(id, "reclaimed").await
        ),
        (1, 1),
        "one failure of the job, range 2 reclaimed"
    );
    failed_counting_the_batch(
        &fx,
        id,
        "range 0 lease expired 5 times without progress (max_attempts 5)",
    )
    .await;
    // A range out of attempts left running under a job that no longer
    // runs is given back, not kept.
    let leftover = async |no: i32| {
        c.execute(
            "UPDATE pq_migration_ranges SET status = 'running', attempts = 5, \
                 heartbeat_at = now() - interval '1 hour' WHERE job_id = $1 AND range_no = $2",
            &[&id, &no],
        )
        .await
        .expect("a leftover range");
        ranges_rescue(&c, lease, 5, "rescuer")
            .await
            .expect("the rescue")
    };
    assert_eq!(leftover(1).await, vec![(id, 1, "pending".to_owned())]);
    assert_eq!(fx.job(id).await.status, "failed");
    assert_eq!(fx.events(id, "reclaimed").await, 2);
    // Resumed and being started again (the job's own lease): a range left
    // running from before is given back, not made to fail the new start.
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'running', lease_token = gen_random_uuid(), \
             heartbeat_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .expect("being started");
    assert_eq!(leftover(0).await, vec![(id, 0, "pending".to_owned())]);
    assert_eq!(fx.job(id).await.status, "running");
}

/// Wait until one session of the test's database waits on a lock (the
/// statement the test just started, behind the transaction it holds).
async fn one_waits_on_a_lock(c: &tokio_postgres::Client, what: &str) {
    wait_until(10, what, || async { lock_waiters(c).await == 1 }).await;
}
