//! The server down mid-run, and its connections exhausted.

use super::*;

/// Fault 3: the PostgreSQL server goes down for seven seconds mid-run (the
/// suite's own TLS cluster, taken exclusively, never the shared server).
/// Both replicas stay up, /readyz answers 503 naming the database during
/// the outage and 200 after it, and every job of every scope finishes with
/// each item migrated once, as `pqmig verify` confirms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_outage_mid_run_is_ridden_out() {
    use crate::pgcluster;
    let (cluster, _guard) = pgcluster::exclusive().await;
    let db = cluster.database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = cluster.password_file(dir.path());
    let ca = cluster.ca.display().to_string();
    let url = cluster.url(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let keyring = dir.path().join("keyring.json");
    let config = dir.path().join("pqmig.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"300ms\"\nretry_backoff_max = \"2s\"\n",
    )
    .expect("config");
    let pw_path = pw.display().to_string();
    let keyring_path = keyring.display().to_string();
    let config_path = config.display().to_string();
    let env: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", url.as_str()),
        ("PQMIG_DATABASE_PASSWORD_FILE", pw_path.as_str()),
        ("PQMIG_KEYRING", keyring_path.as_str()),
        ("PQMIG_CONFIG", config_path.as_str()),
        ("PQMIG_POLL_INTERVAL", "200ms"),
        ("PQMIG_HEARTBEAT_INTERVAL", "500ms"),
        ("PQMIG_LEASE", "20s"),
        ("PQMIG_RESCUE_INTERVAL", "1s"),
        ("PQMIG_LOG_FORMAT", "json"),
        ("PQMIG_METRICS_ADDR", "127.0.0.1:0"),
    ];
    let out = crate::support::run(&["migrate"], &env);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));

    // Legacy data of all three scopes, and a throttled job for each.
    let c = cluster.admin_to(&db).await;
    let mut keys = SampleKeys::default();
    keys.generate("local:pepper-v2", "HMAC-SHA3-256", 32);
    pqmig::db::sample::hashes_seed(&c, 300, "local:pepper-v2")
        .await
        .expect("users");
    let wrap = pqmig::sample::seed_wrappers(&c, &mut keys, "", 200, Kem::MlKem768, 1, "pq")
        .await
        .expect("wrappers");
    let sig = pqmig::sample::seed_signatures(&c, &mut keys, "", 120, true, SigAlg::MlDsa65, "s")
        .await
        .expect("signatures");
    keys.write(&keyring).expect("keyring");
    let hmac: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256'",
            &[],
        )
        .await
        .expect("alias")
        .get(0);
    let mut jobs = Vec::new();
    for (scope, policy, algo, sel, items) in [
        (
            "hashes",
            None,
            Some(hmac),
            json!({"table": "users", "column": "email_hash", "batch_size": 20, "max_rate": 30}),
            300i64,
        ),
        (
            "wrappers",
            Some(wrap.policy_id),
            None,
            json!({"batch_size": 10, "max_rate": 20}),
            200,
        ),
        (
            "signatures",
            None,
            Some(sig.target_algo_id),
            json!({"batch_size": 10, "max_rate": 12}),
            120,
        ),
    ] {
        let id = enqueue(&c, scope, policy, algo, &sel).await;
        jobs.push((id, scope, items));
    }
    drop(c);

    let logs: Vec<std::path::PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("r{i}.log")))
        .collect();
    let mut r = Replicas(
        logs.iter()
            .map(|log| {
                crate::support::pqmig(&["run"], &env)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(log).expect("log"))
                    .spawn()
                    .expect("spawn pqmig run")
            })
            .collect(),
    );
    let addrs: Vec<std::net::SocketAddr> = logs.iter().map(|l| metrics_addr(l)).collect();
    let job_state = |id: i64| {
        let db = db.clone();
        async move {
            let c = cluster.admin_to(&db).await;
            let r = c
                .query_one(
                    "SELECT status, processed_count, failed_count FROM pq_migration_jobs WHERE id = $1",
                    &[&id],
                )
                .await
                .expect("job");
            (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
            )
        }
    };
    // Mid-run: every job has made progress, none has finished.
    let deadline = Instant::now() + Duration::from_secs(30);
    for &(id, _, _) in &jobs {
        while job_state(id).await.1 == 0 {
            assert!(Instant::now() < deadline, "job {id} never started");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Watch /readyz through the outage.
    let watch = tokio::spawn({
        let addrs = addrs.clone();
        async move {
            let mut seen = vec![Vec::new(); addrs.len()];
            for _ in 0..200 {
                for (i, a) in addrs.iter().enumerate() {
                    let (code, body) = crate::observe::http_get(*a, "/readyz").await;
                    if seen[i].last().map(|(c, _)| *c) != Some(code) {
                        seen[i].push((code, body));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        }
    });
    tokio::task::spawn_blocking(move || cluster.stop_for(Duration::from_secs(7)))
        .await
        .expect("outage");
    for (i, d) in r.0.iter_mut().enumerate() {
        assert!(
            d.try_wait().expect("wait").is_none(),
            "replica {i} died in the outage"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for &(id, scope, items) in &jobs {
        loop {
            let (status, processed, failed) = job_state(id).await;
            if status != "pending" && status != "running" {
                assert_eq!(
                    (status.as_str(), processed, failed),
                    ("done", items, 0),
                    "{scope} job {id}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{scope} job {id} stuck: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let out = crate::support::run(&["verify", &id.to_string()], &env);
        assert!(
            out.status.success(),
            "verify {scope} job {id}: {}",
            crate::support::stderr(&out)
        );
    }
    let seen = watch.await.expect("readyz watch");
    for (i, codes) in seen.iter().enumerate() {
        let codes: Vec<u16> = codes.iter().map(|(c, _)| *c).collect();
        assert!(
            codes.windows(3).any(|w| w == [200, 503, 200]),
            "replica {i} /readyz did not follow the outage: {seen:?}"
        );
        assert!(
            seen[i]
                .iter()
                .any(|(c, b)| *c == 503 && b.contains("database")),
            "{seen:?}"
        );
    }
    let c = cluster.admin_to(&db).await;
    let once: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM key_wrappers WHERE wrap_version = 2) \
                  + (SELECT count(*) FROM pq_migration_backups_all)",
            &[],
        )
        .await
        .expect("counts")
        .get(0);
    assert_eq!(
        once,
        200 + (300 + 200 + 120),
        "each item migrated and backed up once"
    );
    r.stop();
    let text: String = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .collect();
    assert!(
        !text.contains(&cluster.app_password),
        "the password was logged"
    );
    assert!(!text.contains("panicked"), "{text}");
}

/// Fault 8: another client takes every connection the replica's role may
/// open (its CONNECTION LIMIT) right after the replica's own connections
/// are cut. The replica stays up, says why in its log, /readyz turns 503;
/// once the other client lets go, every job finishes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_exhausted_by_another_client_only_pause_the_work() {
    let mut m = Mixed::new().await;
    let admin = crate::support::connect(&crate::support::admin_url()).await;
    let role = format!("pqmig_lim_{}", m.w.fx.db.name);
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN NOSUPERUSER CONNECTION LIMIT 14; \
             GRANT pg_read_all_data, pg_write_all_data TO \"{role}\""
        ))
        .await
        .expect("role");
    // README's grants for the backup partitions (the predefined roles do
    // not cover functions)
    m.w.fx
        .db
        .client()
        .await
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION pqmig_backup_partition(TEXT, BIGINT) TO \"{role}\""
        ))
        .await
        .expect("grant");
    let url = m.w.fx.db.url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(url, m.w.fx.db.url);
    let config = m.w.fx.dir.path().join("backoff.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"300ms\"\nretry_backoff_max = \"2s\"\n",
    )
    .expect("config");
    let config = config.display().to_string();
    let mut r = Replicas(vec![m.spawn(
        "a",
        &[
            ("DATABASE_URL", url.as_str()),
            ("PQMIG_CONFIG", config.as_str()),
        ],
    )]);
    let addr = metrics_addr(&m.w.fx.dir.path().join("a.log"));
    for q in &m.jobs {
        m.w.fx.wait_job(q.id, 30, |j| j.processed > 0).await;
    }
    // Cut the replica's connections and take every slot they free, a few
    // times over, so its reconnections find none.
    let mut hog = Vec::new();
    for _ in 0..5 {
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE usename = $1 AND application_name LIKE 'pqmig%'",
                &[&role],
            )
            .await
            .expect("terminate");
        loop {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    hog.push(c);
                }
                Err(e) => {
                    let e = format!("{e:?}");
                    assert!(e.contains("too many connections for role"), "{e}");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        hog.len() >= 8,
        "the other client holds the role's connections"
    );
    let stalled = m.snapshot().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = crate::observe::http_get(addr, "/readyz").await;
        if code == 503 {
            assert!(body.contains("database"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {code}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(m.snapshot().await == stalled, "no connection, no writes");
    assert!(
        r.0[0].try_wait().expect("wait").is_none(),
        "the replica is up"
    );
    drop(hog);
    m.wait_all(90).await;
    m.assert_invariants().await;
    r.stop();
    let log = m.w.fx.log("a");
    assert!(log.contains("too many connections for role"), "{log}");
    m.w.fx
        .db
        .client()
        .await
        .batch_execute(&format!(
            "REVOKE EXECUTE ON FUNCTION pqmig_backup_partition(TEXT, BIGINT) FROM \"{role}\""
        ))
        .await
        .expect("revoke");
    admin
        .batch_execute(&format!("DROP ROLE \"{role}\""))
        .await
        .expect("drop role");
}

/// `pqmig run` started while its database is down (the suite's TLS
/// cluster, stopped): it neither exits nor crash-loops; /livez answers 200
/// and /readyz 503 naming the database, one log line per attempt with
/// backoff; once the server is up it starts and finishes the queued job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_without_its_database_waits_then_works() {
    use crate::pgcluster;
    let (cluster, _guard) = pgcluster::exclusive().await;
    let db = cluster.database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = cluster.password_file(dir.path());
    let ca = cluster.ca.display().to_string();
    let url = cluster.url(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let keyring = dir.path().join("keyring.json");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("addr")
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let (pw_path, keyring_path) = (pw.display().to_string(), keyring.display().to_string());
    let env: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", url.as_str()),
        ("PQMIG_DATABASE_PASSWORD_FILE", pw_path.as_str()),
        ("PQMIG_KEYRING", keyring_path.as_str()),
        ("PQMIG_POLL_INTERVAL", "200ms"),
        ("PQMIG_LOG_FORMAT", "json"),
        ("PQMIG_METRICS_ADDR", metrics.as_str()),
    ];
    let out = crate::support::run(&["migrate"], &env);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let c = cluster.admin_to(&db).await;
    let mut keys = SampleKeys::default();
    keys.generate("local:pepper-v2", "HMAC-SHA3-256", 32);
    keys.write(&keyring).expect("keyring");
    pqmig::db::sample::hashes_seed(&c, 50, "local:pepper-v2")
        .await
        .expect("users");
    let hmac: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256'",
            &[],
        )
        .await
        .expect("alias")
        .get(0);
    let id = enqueue(
        &c,
        "hashes",
        None,
        Some(hmac),
        &json!({"table": "users", "column": "email_hash"}),
    )
    .await;
    drop(c);

    // Started again whatever happens, for the tests after this one.
    struct Down(&'static pgcluster::Cluster, bool);
    impl Drop for Down {
        fn drop(&mut self) {
            if self.1 {
                self.0.start_again();
            }
        }
    }
    cluster.stop();
    let mut down = Down(cluster, true);
    let log = dir.path().join("run.log");
    let mut r = Replicas(vec![
        crate::support::pqmig(&["run"], &env)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn pqmig run"),
    ]);
    let addr: std::net::SocketAddr = metrics.parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several attempts with growing waits (1 s, 2 s, ...), the process up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        r.0[0].try_wait().expect("wait").is_none(),
        "pqmig run exited"
    );
    let (code, _) = crate::observe::http_get(addr, "/livez").await;
    assert_eq!(code, 200);
    let (code, body) = crate::observe::http_get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"database\""), "{body}");
    let text = std::fs::read_to_string(&log).expect("log");
    let attempts = text
        .lines()
        .filter(|l| l.contains("waiting for the database"))
        .count();
    assert!((2..=4).contains(&attempts), "{attempts} attempts:\n{text}");

    cluster.start_again();
    down.1 = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = cluster.admin_to(&db).await;
        let status: String = c
            .query_one("SELECT status FROM pq_migration_jobs WHERE id = $1", &[&id])
            .await
            .expect("job")
            .get(0);
        if status == "done" {
            break;
        }
        assert!(Instant::now() < deadline, "job {id} is {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, body) = crate::observe::http_get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    r.stop();
}
