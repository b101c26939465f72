//! Production connectivity: TLS by sslmode against a cluster of our own
//! (pgcluster), secrets from files that never reach a log, the session
//! settings of every connection, and the pool's bounded wait and recovery.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pqmig::config::{Config, FlagOverrides, Sources};

use crate::pgcluster::{self, Cluster};
use crate::support::{TestDb, admin_url, pqmig, stderr, stdout};

/// A validated config from these environment variables alone.
fn config(env: &[(&str, &str)]) -> Config {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |name: &str| env.get(name).cloned();
    Config::load(&Sources {
        flags: FlagOverrides::default(),
        env: &lookup,
    })
    .unwrap_or_else(|e| panic!("config: {e}"))
}

/// Connect as the CLI does; the error as the binary would print it.
async fn try_connect(cluster: &Cluster, url: &str) -> Result<tokio_postgres::Client, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = cluster.password_file(dir.path());
    let cfg = config(&[
        ("DATABASE_URL", url),
        ("PQMIG_DATABASE_PASSWORD_FILE", pw.to_str().expect("utf-8")),
    ]);
    pqmig::db::connect(&cfg.database)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// Whether this connection is encrypted, by the server's own account.
async fn ssl_in_use(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test]
async fn verify_full_with_the_ca_connects_over_tls() {
    let (cluster, _guard) = pgcluster::shared().await;
    let db = cluster.database().await;
    let ca = cluster.ca.to_str().expect("utf-8");
    for host in ["127.0.0.1", "localhost"] {
        let url = cluster.url(host, &db, &format!("sslmode=verify-full&sslrootcert={ca}"));
        let client = try_connect(cluster, &url)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(ssl_in_use(&client).await, "{host}: encrypted");
        // SCRAM over TLS binds the channel (tls-server-end-point).
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .expect("query")
            .get(0);
        assert_eq!(user, pgcluster::APP_USER);
    }
}

#[tokio::test]
async fn wrong_ca_and_wrong_host_name_are_refused_clearly() {
    let (cluster, _guard) = pgcluster::shared().await;
    let db = cluster.database().await;
    let other = cluster.other_ca.to_str().expect("utf-8");
    let ca = cluster.ca.to_str().expect("utf-8");

    let url = cluster.url(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-full&sslrootcert={other}"),
    );
    let e = try_connect(cluster, &url)
        .await
        .expect_err("a CA that signed nothing");
    assert!(
        e.contains("database TLS: server certificate not issued by a CA in")
            && e.contains(other)
            && e.contains("sslmode=verify-full"),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");

    // The certificate names localhost and 127.0.0.1, not 127.0.0.2.
    let url = cluster.url(
        "127.0.0.2",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let e = try_connect(cluster, &url)
        .await
        .expect_err("wrong host name");
    assert!(
        e.contains("database TLS: server certificate not valid for host name 127.0.0.2"),
        "{e}"
    );
    assert!(!e.contains(&cluster.app_password), "{e}");
    // verify-ca checks the chain only, so the same host is accepted.
    let url = cluster.url(
        "127.0.0.2",
        &db,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    let client = try_connect(cluster, &url).await.expect("verify-ca");
    assert!(ssl_in_use(&client).await);

    // The binary says the same on one line of stderr, exit code 1.
    let url = cluster.url(
        "127.0.0.2",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = cluster.password_file(dir.path());
    let out = crate::support::run(
        &["migrate"],
        &[
            ("DATABASE_URL", &url),
            ("PQMIG_DATABASE_PASSWORD_FILE", pw.to_str().expect("utf-8")),
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("server certificate not valid for host name 127.0.0.2"),
        "{err}"
    );
}

#[tokio::test]
async fn require_encrypts_without_a_ca_and_disable_is_refused_by_the_server() {
    let (cluster, _guard) = pgcluster::shared().await;
    let db = cluster.database().await;
    for params in ["sslmode=require", "sslmode=prefer"] {
        let client = try_connect(cluster, &cluster.url("127.0.0.2", &db, params))
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}"));
        assert!(ssl_in_use(&client).await, "{params}: encrypted");
    }
    // libpq's rule: with sslrootcert, require checks the chain too.
    let other = cluster.other_ca.to_str().expect("utf-8");
    let url = cluster.url(
        "127.0.0.1",
        &db,
        &format!("sslmode=require&sslrootcert={other}"),
    );
    let e = try_connect(cluster, &url)
        .await
        .expect_err("untrusted chain");
    assert!(e.contains("not issued by a CA in"), "{e}");
    // This server takes no plaintext TCP at all.
    let e = try_connect(cluster, &cluster.url("127.0.0.1", &db, "sslmode=disable"))
        .await
        .expect_err("plaintext");
    assert!(e.contains("no encryption"), "{e}");
}

#[tokio::test]
async fn daemon_over_tls_with_a_password_file_never_prints_it() {
    let (cluster, _guard) = pgcluster::shared().await;
    let db = cluster.database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = cluster.password_file(dir.path());
    let ca = cluster.ca.to_str().expect("utf-8");
    let url = cluster.url(
        "localhost",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("PQMIG_DATABASE_PASSWORD_FILE", pw.to_str().expect("utf-8")),
        ("PQMIG_LOG_FORMAT", "json"),
        ("PQMIG_LOG", "debug"),
        ("PQMIG_METRICS_ADDR", "127.0.0.1:0"),
        ("PQMIG_POLL_INTERVAL", "200ms"),
    ];
    let out = crate::support::run(&["migrate"], &env);
    let mut captured = stdout(&out) + &stderr(&out);
    assert!(out.status.success(), "{captured}");

    let log_path = dir.path().join("daemon.log");
    let mut daemon = pqmig(&["run"], &env)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn pqmig run");
    // Its pool and its LISTEN connection, each over TLS, named by worker.
    let admin = cluster.admin().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let names = loop {
        let rows = admin
            .query(
                "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND a.application_name LIKE 'pqmig %'",
                &[&db],
            )
            .await
            .expect("pg_stat_activity");
        let names: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if names.iter().any(|(n, _)| n.ends_with(" listen"))
            && names.iter().any(|(n, _)| !n.ends_with(" listen"))
        {
            break names;
        }
        assert!(
            Instant::now() < deadline,
            "daemon connections never showed up: {names:?}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        names.iter().all(|(_, ssl)| *ssl),
        "all encrypted: {names:?}"
    );
    crate::support::hashes::terminate(&mut daemon);
    captured += &std::fs::read_to_string(&log_path).expect("daemon log");
    assert!(
        captured.contains("effective configuration") && captured.contains("***"),
        "the redacted configuration is logged at start-up:\n{captured}"
    );
    assert!(
        captured.contains("\"worker.lease\":\"")
            && captured.contains("\"database.sslmode\":\"verify-full\""),
        "one field per key, not a Debug dump:\n{captured}"
    );
    assert!(
        !captured.contains(&cluster.app_password),
        "the password reached a log line"
    );

    // A wrong password: the server's refusal, and still no secret printed.
    std::fs::write(&pw, "not-the-password-42\n").expect("rewrite");
    let out = crate::support::run(&["migrate"], &env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password-42"), "{err}");
}

#[tokio::test]
async fn pool_recovers_after_the_server_restarts() {
    let (cluster, _guard) = pgcluster::exclusive().await;
    let db = cluster.database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = cluster.password_file(dir.path());
    let ca = cluster.ca.to_str().expect("utf-8");
    let url = cluster.url(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let cfg = config(&[
        ("DATABASE_URL", &url),
        ("PQMIG_DATABASE_PASSWORD_FILE", pw.to_str().expect("utf-8")),
    ]);
    let pool = pqmig::db::pool(&cfg.database, "pqmig restart-test").expect("pool");
    let before: String = {
        let c = pool.get().await.expect("first connection");
        c.query_one("SELECT pg_postmaster_start_time()::text", &[])
            .await
            .expect("query")
            .get(0)
    };
    cluster.restart();
    // The pooled connection died with the server; the next checkout
    // notices, drops it and connects anew.
    let c = pool
        .get()
        .await
        .map_err(|e| pqmig::db::pool_error(&pool, &e))
        .expect("a fresh connection after the restart");
    let after: String = c
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .expect("query after restart")
        .get(0);
    assert_ne!(before, after, "the server did restart");
    assert!(ssl_in_use(&c).await);
}

/// A pool on the suite's server, named so its connections can be found.
fn local_pool(name: &str, db: &TestDb, env: &[(&str, &str)]) -> deadpool_postgres::Pool {
    let mut all = vec![("DATABASE_URL", db.url.as_str())];
    all.extend_from_slice(env);
    let cfg = config(&all);
    pqmig::db::pool(&cfg.database, name).expect("pool")
}

async fn show(c: &tokio_postgres::Client, name: &str) -> String {
    c.query_one(format!("SHOW {name}").as_str(), &[])
        .await
        .expect("show")
        .get(0)
}

async fn pids(conns: &[deadpool_postgres::Object]) -> Vec<Result<i32, tokio_postgres::Error>> {
    let futs = conns.iter().map(|c| async move {
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    futures_util::future::join_all(futs).await
}

#[tokio::test]
async fn session_settings_on_every_connection() {
    let db = TestDb::new().await;
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(
        file.path(),
        "[worker]\nbatch_target = \"200ms\"\n[database]\nstatement_timeout = \"700ms\"\n\
         lock_timeout = \"250ms\"\nidle_in_transaction_timeout = \"3s\"\n",
    )
    .expect("config");
    let pool = local_pool(
        "pqmig settings-test",
        &db,
        &[("PQMIG_CONFIG", file.path().to_str().expect("utf-8"))],
    );
    let c = pool.get().await.expect("connection");
    assert_eq!(show(&c, "statement_timeout").await, "700ms");
    assert_eq!(show(&c, "lock_timeout").await, "250ms");
    assert_eq!(show(&c, "idle_in_transaction_session_timeout").await, "3s");
    assert_eq!(show(&c, "application_name").await, "pqmig settings-test");
    // A statement past the timeout is cancelled by the server (57014),
    // which the executor answers by shrinking the batch.
    let e = c
        .batch_execute("SELECT pg_sleep(5)")
        .await
        .expect_err("statement_timeout");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{e:?}"
    );
    // A RESET ALL (or DISCARD ALL) goes back to these, not the server's.
    c.batch_execute("SET statement_timeout = '9s'; RESET ALL")
        .await
        .expect("reset");
    assert_eq!(show(&c, "statement_timeout").await, "700ms");

    // The URL's own options come last and win; CLI connections say pqmig.
    let url = format!(
        "{}?options=-c%20lock_timeout%3D2s&application_name=custom",
        db.url
    );
    let cfg = config(&[("DATABASE_URL", &url)]);
    let client = pqmig::db::connect(&cfg.database).await.expect("connect");
    let row = client
        .query_one(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), \
             current_setting('application_name')",
            &[],
        )
        .await
        .expect("settings");
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(got, ("2s".into(), "1min".into(), "custom".into()));
    let client = pqmig::db::connect(&config(&[("DATABASE_URL", &db.url)]).database)
        .await
        .expect("connect");
    let name: String = client
        .query_one("SHOW application_name", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(name, "pqmig");
}

#[tokio::test]
async fn pool_recovers_after_its_connections_are_terminated() {
    let db = TestDb::new().await;
    let name = format!("pqmig terminate-{}", std::process::id());
    let pool = local_pool(&name, &db, &[]);
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(pool.get().await.expect("connection"));
    }
    let before: Vec<i32> = pids(&conns)
        .await
        .into_iter()
        .map(|r| r.expect("pid"))
        .collect();
    drop(conns);
    let admin = crate::support::connect(&admin_url()).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, 4, "all of the pool's connections");
    // Every checkout now hands out a live connection.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(
            pool.get()
                .await
                .map_err(|e| pqmig::db::pool_error(&pool, &e))
                .expect("a live connection"),
        );
    }
    for (i, r) in pids(&conns).await.into_iter().enumerate() {
        let pid = r.unwrap_or_else(|e| panic!("connection {i} is dead: {e}"));
        assert!(!before.contains(&pid), "a new backend, not a dead one");
    }
}

#[tokio::test]
async fn waiting_for_a_pooled_connection_is_bounded() {
    let db = TestDb::new().await;
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(
        file.path(),
        "[database]\npool_size = 1\npool_wait_timeout = \"300ms\"\n",
    )
    .expect("config");
    let pool = local_pool(
        "pqmig wait-test",
        &db,
        &[("PQMIG_CONFIG", file.path().to_str().expect("utf-8"))],
    );
    let held = pool.get().await.expect("the only connection");
    let t0 = Instant::now();
    let e = pool.get().await.expect_err("none free");
    let msg = pqmig::db::pool_error(&pool, &e);
    assert!(t0.elapsed() < Duration::from_secs(5), "bounded wait");
    assert!(
        msg.contains("no free connection within 300ms") && msg.contains("database.pool_size"),
        "{msg}"
    );
    drop(held);
    let _again = pool.get().await.expect("free again");
}

/// `database.statement_timeout` reaches the daemon's connections: a batch
/// made slow on purpose (a trigger sleeping per updated row) is cancelled
/// by the server, halved and retried until it fits, and the job finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_statement_timeout_shrinks_and_succeeds() {
    use crate::support::hashes::{Fixture, terminal};
    let fx = Fixture::new(300).await;
    fx.db
        .client()
        .await
        .batch_execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$; \
             CREATE TRIGGER slow_users BEFORE UPDATE ON users \
               FOR EACH ROW EXECUTE FUNCTION slow_row();",
        )
        .await
        .expect("slow trigger");
    let config = fx.dir.path().join("pqmig.toml");
    std::fs::write(
        &config,
        "[database]\nstatement_timeout = \"1s\"\n[worker]\nbatch_target = \"200ms\"\n",
    )
    .expect("config");
    // 200 rows take 2 s to update: over the timeout until halved to 50.
    let id = fx.enqueue(serde_json::json!({"batch_size": 200})).await;
    let mut daemon = fx.spawn_daemon("d", &[("PQMIG_CONFIG", config.to_str().expect("utf-8"))]);
    let j = fx.wait_job(id, 90, terminal).await;
    crate::support::hashes::terminate(&mut daemon);
    let log = fx.log("d");
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", 300, 0),
        "{j:?}\n{log}"
    );
    fx.assert_all_migrated_once().await;
    assert!(
        log.contains("hit a server timeout; retrying smaller")
            && log.contains("canceling statement due to statement timeout"),
        "the first batch was cancelled by the server and shrunk:\n{log}"
    );
    assert_eq!(fx.events(id, "failed").await, 0);
}
