//! Replicas killed, cut off and paused, and row locks held elsewhere.

use super::*;

/// Fault 1: three replicas work the mixed queue while a random one is
/// SIGKILLed at random moments (and replaced), six times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_random_replicas_of_a_mixed_queue_loses_nothing() {
    let mut m = Mixed::new().await;
    let mut rng = Rng::new();
    let mut r = Replicas(Vec::new());
    for i in 0..3 {
        let d = m.spawn(&format!("r{i}"), &[]);
        r.0.push(d);
    }
    let mut next = 3;
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let c = m.client().await;
    while kills < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(900))).await;
        // The victim: a random one of the replicas holding a job being
        // started or a range being walked (worker ids carry the pid), so
        // every kill lands mid-job.
        let holders: Vec<String> = c
            .query(
                "SELECT locked_by FROM pq_migration_jobs WHERE status = 'running' \
                 UNION ALL SELECT locked_by FROM pq_migration_ranges WHERE status = 'running'",
                &[],
            )
            .await
            .expect("running jobs")
            .iter()
            .filter_map(|row| row.get(0))
            .collect();
        let busy: Vec<usize> = (0..r.0.len())
            .filter(|&i| {
                let pid = format!("-{}-", r.0[i].id());
                holders.iter().any(|w| w.contains(&pid))
            })
            .collect();
        if busy.is_empty() {
            continue;
        }
        let victim = busy[rng.below(busy.len() as u64) as usize];
        signal(&r.0[victim], libc::SIGKILL);
        let _ = r.0[victim].wait();
        kills += 1;
        r.0[victim] = m.spawn(&format!("r{next}"), &[]);
        next += 1;
    }
    assert!(kills >= 3, "only {kills} kills landed mid-job");
    m.wait_all(90).await;
    // The kills landed mid-job: their leases had to be taken over.
    let reclaimed: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_job_events WHERE event = 'reclaimed'",
            &[],
        )
        .await
        .expect("events")
        .get(0);
    assert!(reclaimed >= 1, "no kill hit a running job");
    m.assert_invariants().await;
    r.stop();
}

/// Fault 2: every connection of both replicas (pool and LISTEN) is
/// terminated by the server, repeatedly, mid-batch. They reconnect, finish,
/// and a job queued afterwards is picked up by a NOTIFY wake-up (polling is
/// set to a minute, so only LISTEN can be what wakes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_of_a_mixed_queue_reconnect_and_wake_ups_work() {
    let mut m = Mixed::new().await;
    let slow_poll = [("PQMIG_POLL_INTERVAL", "60s")];
    let mut r = Replicas(vec![m.spawn("a", &slow_poll), m.spawn("b", &slow_poll)]);
    let admin = crate::support::connect(&crate::support::admin_url()).await;
    let name = m.w.fx.db.name.clone();
    // In the select list, not the WHERE clause: there the planner may push
    // it down to every backend of the server, other tests' included.
    let kill = "SELECT pid, query, pg_terminate_backend(pid) FROM pg_stat_activity \
                WHERE datname = $1 AND application_name LIKE 'pqmig%'";
    let mut listen_killed = false;
    let mut rng = Rng::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400 + rng.below(600))).await;
        let rows = admin.query(kill, &[&name]).await.expect("terminate");
        listen_killed |= rows
            .iter()
            .any(|row| row.get::<_, String>(1).starts_with("LISTEN"));
    }
    assert!(
        listen_killed,
        "a LISTEN connection was among the terminated"
    );
    m.wait_all(90).await;
    m.assert_invariants().await;

    // Idle now; the next job is found only through NOTIFY.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = m.w.fx.enqueue(json!({"id_from": 1, "id_to": 10})).await;
    let start = Instant::now();
    let j = m.w.fx.wait_job(id, 10, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "woken by NOTIFY, not the 60s poll"
    );
    r.stop();
}

/// Fault 4: a replica paused past its lease (SIGSTOP) while it holds jobs
/// of every scope is fenced out: another replica finishes them, and once
/// resumed the paused one writes nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_holding_every_scope_is_fenced_out() {
    let mut m = Mixed::new().await;
    let mut r = Replicas(vec![m.spawn("a", &[("PQMIG_CONCURRENCY", "8")])]);
    // Wait until it holds all seven jobs and has written to each.
    let all_running = m.jobs.iter().map(|q| q.id).collect::<Vec<_>>();
    for id in &all_running {
        m.w.fx.wait_job(*id, 30, |j| j.processed > 0).await;
    }
    signal(&r.0[0], libc::SIGSTOP);
    r.0.push(m.spawn("b", &[("PQMIG_CONCURRENCY", "8")]));
    m.wait_all(90).await;
    let before = m.snapshot().await;
    signal(&r.0[0], libc::SIGCONT);
    // Several heartbeats and batch attempts of the resumed process.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        m.snapshot().await == before,
        "the paused replica wrote after it resumed"
    );
    m.assert_invariants().await;
    r.stop();
    assert!(
        m.w.fx.log("a").contains("lease lost"),
        "{}",
        m.w.fx.log("a")
    );
}

/// Fault 6: another session holds row locks (idle in transaction) on rows
/// of the hashes and wrappers jobs for a few seconds. Batches that meet
/// them time out on lock_timeout, shrink and retry; nothing fails, and
/// once the transaction ends the batches grow back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_held_transaction_elsewhere_only_slows_the_jobs() {
    let mut m = Mixed::new().await;
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(
        config.path(),
        "[worker]\nbatch_target = \"200ms\"\nretry_backoff = \"300ms\"\n\
         [database]\nlock_timeout = \"200ms\"\n",
    )
    .expect("write config");
    let path = config.path().display().to_string();
    let mut holder = m.client().await;
    let tx = holder.transaction().await.expect("begin");
    tx.batch_execute(
        "SELECT 1 FROM users WHERE id BETWEEN 61 AND 70 FOR UPDATE; \
         SELECT 1 FROM key_wrappers WHERE id BETWEEN 31 AND 40 FOR UPDATE",
    )
    .await
    .expect("lock rows");
    let mut r = Replicas(vec![m.spawn("a", &[("PQMIG_CONFIG", path.as_str())])]);
    // The jobs reach the locked rows and wait there while the lock is held.
    let (h, w) = (m.jobs[0].id, m.jobs[3].id);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (jh, jw) = (m.w.fx.job(h).await, m.w.fx.job(w).await);
    assert!(
        jh.status == "running" && jh.processed < 70 && jw.status == "running" && jw.processed < 40,
        "held back by the lock: {jh:?} {jw:?}"
    );
    tx.rollback().await.expect("end the transaction");
    m.wait_all(90).await;
    m.assert_invariants().await;
    r.stop();
    // The job met lock timeouts, and its batches grew again afterwards.
    let log = m.w.fx.log("a");
    assert!(
        log.contains("lock timeout"),
        "a lock timeout was logged: {log}"
    );
    let sizes: Vec<i64> = m.w.fx.job(h).await.result.expect("result")["batch_sizes"]
        .as_array()
        .expect("batch_sizes")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    let smallest = sizes
        .iter()
        .position(|&s| s == *sizes.iter().min().unwrap())
        .unwrap();
    assert!(
        sizes[smallest] < 20 && sizes[smallest..].iter().any(|&s| s >= 20),
        "shrank at the lock and grew back: {sizes:?}"
    );
}
