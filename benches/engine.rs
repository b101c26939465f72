//! Engine benchmark (not a test): claim latency with many pending jobs and
//! the throughput of one large hashes job, on the local PostgreSQL.
//!
//!     cargo bench --bench engine                 # 100k pending + 100k done, 100k rows
//!     PQMIG_BENCH_JOBS=10000 PQMIG_BENCH_DONE=1000000 cargo bench --bench engine
//!     PQMIG_BENCH_JOBS=10000 PQMIG_BENCH_ROWS=20000 cargo bench --bench engine
//!
//! Uses DATABASE_URL (default: local server) to create and drop a scratch
//! database.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

fn env_num(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn url_for(admin: &str, db: &str) -> String {
    let head = admin.split('?').next().unwrap_or(admin);
    let base = head.rsplit_once('/').map(|(b, _)| b).unwrap_or(head);
    format!("{base}/{db}")
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let admin =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| pqmig::config::LOCAL_DATABASE_URL.into());
    let jobs = env_num("PQMIG_BENCH_JOBS", 100_000);
    let done = env_num("PQMIG_BENCH_DONE", jobs);
    let rows = env_num("PQMIG_BENCH_ROWS", 100_000);
    let name = format!("pqmig_bench_{}", std::process::id());
    let a = connect(&admin).await;
    a.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create db");
    let url = url_for(&admin, &name);
    let result = std::panic::AssertUnwindSafe(run(&url, jobs, done, rows));
    let out = futures_util::FutureExt::catch_unwind(result).await;
    let _ = a
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    if out.is_err() {
        std::process::exit(1);
    }
}

async fn run(url: &str, jobs: i64, done: i64, rows: i64) {
    let mut c = connect(url).await;
    pqmig::db::migrate::apply(&mut c).await.expect("migrate");

    // Claim latency: `jobs` pending and `done` finished, claim one at a
    // time as a worker would, each claim its own transaction.
    c.execute(
        "INSERT INTO pq_migration_jobs (scope, status, priority, finished_at) \
         SELECT 'hashes', 'done', (i % 3)::smallint, now() FROM generate_series(1, $1::bigint) i",
        &[&done],
    )
    .await
    .expect("seed finished jobs");
    c.execute(
        "INSERT INTO pq_migration_jobs (scope, status, priority) \
         SELECT 'hashes', 'pending', (i % 3)::smallint FROM generate_series(1, $1::bigint) i",
        &[&jobs],
    )
    .await
    .expect("seed jobs");
    c.batch_execute("ANALYZE pq_migration_jobs")
        .await
        .expect("analyze");
    let mut lat = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        let got = pqmig::db::jobs::job_claim(&c, 1, "bench")
            .await
            .expect("claim");
        lat.push(t.elapsed());
        assert_eq!(got.len(), 1);
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "claim latency with {jobs} pending and {done} finished: p50 {:?}  p99 {:?}  max {:?}  ({:.0} claims/s serial)",
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1],
        1000.0 / lat.iter().sum::<Duration>().as_secs_f64()
    );
    c.batch_execute("DELETE FROM pq_migration_jobs; DELETE FROM pq_migration_job_events")
        .await
        .expect("clear");

    // A hashes job over `rows` users, run by the real daemon path.
    let dir = std::env::temp_dir().join(format!("pqmig-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let keyring = dir.join("keyring.json");
    std::fs::write(
        &keyring,
        r#"{"version":1,"keys":[{"ref":"local:pepper","algorithm":"HMAC-SHA3-256","secret":"WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo="}]}"#,
    )
    .expect("keyring");
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    c.batch_execute(
        "INSERT INTO hash_profiles (name, algo_id, params) SELECT 'pepper-v2', algo_id, '{\"key_ref\":\"local:pepper\"}' \
           FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256'; \
         INSERT INTO field_hash_policies (entity_table, field_name, profile_id) \
           SELECT 'users', 'email_hash', id FROM hash_profiles WHERE name = 'pepper-v2';",
    )
    .await
    .expect("profile");
    c.execute(
        "INSERT INTO users (email_hash, email_hash_key_version) \
         SELECT sha256(i::text::bytea), 'v1' FROM generate_series(1, $1::bigint) i",
        &[&rows],
    )
    .await
    .expect("users");
    c.batch_execute("ANALYZE users").await.expect("analyze");
    let id: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_algo_id, selection) \
             SELECT 'hashes', algo_id, '{\"table\":\"users\",\"column\":\"email_hash\"}' \
             FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256' RETURNING id",
            &[],
        )
        .await
        .expect("job")
        .get(0);

    let env = |k: &str| match k {
        "DATABASE_URL" => Some(url.to_owned()),
        "PQMIG_KEYRING" => Some(keyring.display().to_string()),
        "PQMIG_POLL_INTERVAL" => Some("100ms".into()),
        "PQMIG_LOG" => Some("warn".into()),
        "PQMIG_METRICS_ADDR" => Some("127.0.0.1:0".into()),
        _ => None,
    };
    let config = pqmig::config::Config::load(&pqmig::config::Sources {
        flags: Default::default(),
        env: &env,
    })
    .expect("config");
    let services = pqmig::daemon::Services::from_config(&config)
        .await
        .expect("services");
    let token = tokio_util::sync::CancellationToken::new();
    let t0 = Instant::now();
    let daemon = {
        let (config, token) = (config.clone(), token.clone());
        tokio::spawn(async move { pqmig::daemon::run(&config, services, token).await })
    };
    loop {
        let r = c
            .query_one(
                "SELECT status, processed_count FROM pq_migration_jobs WHERE id = $1",
                &[&id],
            )
            .await
            .expect("status");
        let status: String = r.get(0);
        if status != "pending" && status != "running" {
            let n: i64 = r.get(1);
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "hashes job: {n} rows in {secs:.2} s = {:.0} items/s ({status})",
                n as f64 / secs
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel();
    let _ = daemon.await;
    let _ = std::fs::remove_dir_all(&dir);
}
