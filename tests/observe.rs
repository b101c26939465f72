//! Observability: /metrics through the registry (checked by promtool and
//! scraped by a real Prometheus), /healthz and /readyz, the exposure
//! inventory, and the systemd notify protocol.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::InProcess;
use crate::support::hashes::{Fixture, signal, terminal, terminate};

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample line, e.g. `pqmig_items_processed_total{scope="hashes"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// One sample of the /metrics a daemon serves on a loopback `port`.
pub async fn scrape(port: u16, series: &str) -> f64 {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (_, text) = http_get(addr, "/metrics").await;
    sample(&text, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_work_and_pass_promtool() {
    let fx = Fixture::new(300).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let (_, before) = http_get(daemon.addr, "/metrics").await;
    for series in [
        r#"pqmig_items_processed_total{scope="wrappers"}"#,
        r#"pqmig_jobs_finished_total{scope="signatures",status="failed"}"#,
        r#"pqmig_item_failures_total{kind="integrity",scope="hashes"}"#,
        r#"pqmig_queue_jobs{status="pending"}"#,
        r#"pqmig_leases_reclaimed_total"#,
    ] {
        assert_eq!(
            sample(&before, series),
            Some(0.0),
            "{series} pre-initialised to 0"
        );
    }
    assert!(before.contains("pqmig_build_info{version=\""), "build info");
    assert!(
        before.contains("process_resident_memory_bytes"),
        "process metrics"
    );

    let id = fx.enqueue(json!({"batch_size": 40})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(j.status, "done");
    // The counters are updated after the commit; give the task a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let (code, text) = http_get(daemon.addr, "/metrics").await;
        assert_eq!(code, 200);
        if sample(
            &text,
            r#"pqmig_jobs_finished_total{scope="hashes",status="done"}"#,
        ) == Some(1.0)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "done never counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sample(&text, r#"pqmig_items_processed_total{scope="hashes"}"#),
        Some(300.0)
    );
    assert_eq!(
        sample(&text, r#"pqmig_jobs_claimed_total{scope="hashes"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"pqmig_batch_duration_seconds_count{scope="hashes"}"#
        ),
        Some(8.0)
    );
    assert_eq!(
        sample(&text, r#"pqmig_jobs_running{scope="hashes"}"#),
        Some(0.0)
    );
    for series in [
        r#"pqmig_job_duration_seconds_count{scope="hashes",status="done"}"#,
        r#"pqmig_job_wait_seconds_count{scope="hashes"}"#,
    ] {
        assert_eq!(sample(&text, series), Some(1.0), "{series}");
    }
    assert_eq!(
        sample(
            &text,
            r#"pqmig_job_duration_seconds_count{scope="hashes",status="failed"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"pqmig_job_duration_seconds_bucket{scope="hashes",status="done",le="+Inf"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"pqmig_worker_slots{state="free"}"#),
        Some(4.0)
    );
    assert!(
        !text.contains("job_id") && !text.contains("item_id"),
        "no unbounded labels"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (run .ci/setup-deploy to install it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("pipe");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_database_and_the_drain() {
    let fx = Fixture::new(3000).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let addr = daemon.addr;
    let ready = |want: u16| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, body) = http_get(addr, "/readyz").await;
            if code == want {
                return body;
            }
            assert!(Instant::now() < deadline, "/readyz stayed {code}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let body = ready(200).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["status"],
        "ready"
    );

    // The database goes away: not ready, still healthy.
    let admin = crate::support::connect(&crate::support::admin_url()).await;
    let name = &fx.db.name;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
        ))
        .await
        .expect("cut the database off");
    let body = ready(503).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["failing"], json!(["database"]), "{body}");
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    admin
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .expect("restore");
    ready(200).await;

    // Draining: not ready, still healthy.
    let id = fx.enqueue(json!({"batch_size": 50, "max_rate": 300})).await;
    fx.wait_job(id, 30, |j| j.processed > 0).await;
    let mut locker = fx.db.client().await;
    let lock = locker.transaction().await.expect("tx");
    lock.batch_execute("LOCK TABLE users IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    // Stop only once a batch write waits on the lock, so the drain cannot
    // finish (between two batches) before /readyz is asked.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                &[&fx.db.name],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no batch waited on the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopping = tokio::spawn(daemon.stop());
    let body = ready(503).await;
    assert!(body.contains("draining"), "{body}");
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "healthy while draining"
    );
    lock.rollback().await.expect("unlock");
    stopping.await.expect("stopped");
}

/// The vulnerable hashes counted now: (unknown, backup, every line).
async fn hashes_exposed(
    c: &tokio_postgres::Client,
) -> (i64, i64, Vec<pqmig::db::inventory::Exposed>) {
    let counted = pqmig::db::inventory::inventory_count(c, 50)
        .await
        .expect("inventory");
    let rows = counted.inventory.vulnerable;
    let n = |alg: &str| {
        rows.iter()
            .filter(|e| e.scope == "hashes" && e.algorithm == alg)
            .map(|e| e.items)
            .sum::<i64>()
    };
    (n("unknown"), n("backup"), rows.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposure_inventory_moves_from_legacy_to_backups() {
    let fx = Fixture::new(120).await;
    let c = fx.db.client().await;
    let (unknown, _, before) = hashes_exposed(&c).await;
    assert_eq!(unknown, 120, "{before:?}");
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
    daemon.stop().await;
    let (unknown, backup, after) = hashes_exposed(&c).await;
    assert_eq!(unknown, 0, "{after:?}");
    assert_eq!(backup, 120, "backups still hold the classical hashes");
    c.batch_execute(&format!("DROP TABLE pq_migration_backups_hashes_{id}"))
        .await
        .expect("purge");
    let (_, _, purged) = hashes_exposed(&c).await;
    assert!(
        purged.iter().all(|e| e.scope != "hashes" || e.items == 0),
        "{purged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_ready_watchdog_stopping_in_order() {
    let fx = Fixture::new(10).await;
    let sock_path = fx.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let path = sock_path.to_str().expect("utf-8").to_owned();
    let mut daemon = fx.spawn_daemon(
        "d",
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    );
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    let mut signalled = false;
    while !seen.iter().any(|m| m.contains("STOPPING=1")) {
        let n = sock.recv(&mut buf).expect("a notify message within 10 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        if !signalled && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2 {
            signal(&daemon, libc::SIGTERM);
            signalled = true;
        }
    }
    assert!(daemon.wait().expect("wait").success());
    let pos = |needle: &str| seen.iter().position(|m| m.contains(needle)).expect(needle);
    assert!(pos("READY=1") < pos("WATCHDOG=1"), "{seen:?}");
    assert!(pos("WATCHDOG=1") < pos("STOPPING=1"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_daemon() {
    let fx = Fixture::new(1500).await;
    let (metrics_port, prom_port) = (free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut daemon = fx.spawn_daemon("d", &[("PQMIG_METRICS_ADDR", &metrics_addr)]);
    let config = fx.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: pqmig\n    static_configs:\n      - targets: ['{metrics_addr}']\n"
        ),
    )
    .expect("prometheus config");
    let log = std::fs::File::create(fx.dir.path().join("prometheus.log")).expect("log");
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            fx.dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus (run .ci/setup-deploy to install it)");

    let id = fx
        .enqueue(json!({"batch_size": 100, "max_rate": 1000}))
        .await;
    let j = fx.wait_job(id, 60, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 1500));

    let prom_addr: SocketAddr = format!("127.0.0.1:{prom_port}").parse().expect("addr");
    let query = "/api/v1/query?query=pqmig_items_processed_total%7Bscope%3D%22hashes%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = tokio::net::TcpStream::connect(prom_addr).await.is_ok();
        if got {
            let (code, body) = http_get(prom_addr, query).await;
            if code == 200 {
                let v: serde_json::Value = serde_json::from_str(&body).expect("json");
                let value = v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok());
                if value == Some(j.processed as f64) {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw {} items:\n{}",
            j.processed,
            std::fs::read_to_string(fx.dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, up) = http_get(prom_addr, "/api/v1/query?query=up%7Bjob%3D%22pqmig%22%7D").await;
    assert!(up.contains(r#""1"]"#), "target up: {up}");
    let _ = prom.kill();
    let _ = prom.wait();
    terminate(&mut daemon);
}

/// The README's grants are enough for the daemon: a role with exactly
/// those runs a hashes job, and the samplers (inventory included) succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_role_runs_a_job() {
    let fx = Fixture::new(100).await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let start = readme
        .find("CREATE ROLE pqmig LOGIN;")
        .expect("grants in README");
    let end = start
        + readme[start..]
            .find("```")
            .expect("end of the grants block");
    let role = format!("{}_role", fx.db.name);
    let grants = readme[start..end]
        .replace("pqmig;", &format!("\"{role}\";"))
        .replace("ROLE pqmig ", &format!("ROLE \"{role}\" "));
    let c = fx.db.client().await;
    c.batch_execute(&grants).await.expect("README grants apply");
    // Wrappers too, with their keys next to the pepper.
    let mut keys = pqmig::sample::SampleKeys::default();
    keys.add(
        "local:pepper-v2",
        "HMAC-SHA3-256",
        zeroize::Zeroizing::new(crate::support::hashes::PEPPER.to_vec()),
    );
    let seed = pqmig::sample::seed_wrappers(
        &c,
        &mut keys,
        "",
        20,
        pqmig::crypto::kem::Kem::MlKem768,
        1,
        "pq",
    )
    .await
    .expect("wrappers");
    let signatures = pqmig::sample::seed_signatures(
        &c,
        &mut keys,
        "",
        20,
        true,
        pqmig::crypto::sig::SigAlg::MlDsa44,
        "pq-sign",
    )
    .await
    .expect("signatures");
    std::fs::remove_file(&fx.keyring).expect("keyring");
    keys.write(&fx.keyring).expect("keyring");

    let url = fx.db.url.replacen("postgres@", &format!("{role}@"), 1);
    assert!(url.contains(&role), "the test URL names the role: {url}");
    let daemon = InProcess::start(&fx, &[("DATABASE_URL", url.as_str())]).await;
    let id = fx.enqueue(json!({})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 100), "{j:?}");
    let id: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_policy_id) VALUES ('wrappers', $1) RETURNING id",
            &[&seed.policy_id],
        )
        .await
        .expect("wrappers job")
        .get(0);
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 20), "{j:?}");
    let id: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_algo_id) VALUES ('signatures', $1) RETURNING id",
            &[&signatures.target_algo_id],
        )
        .await
        .expect("signatures job")
        .get(0);
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("done", 20), "{j:?}");
    // The first sample (inventory included) ran as the role: ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = http_get(daemon.addr, "/readyz").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, text) = http_get(daemon.addr, "/metrics").await;
    assert!(
        text.contains("pqmig_exposed_items{"),
        "the inventory was sampled as the role"
    );
    daemon.stop().await;
    drop(c);
    let admin = crate::support::connect(&crate::support::admin_url()).await;
    // Owned nothing; its grants go with the database, then the role goes.
    drop(fx);
    let _ = admin
        .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_command_splits_vulnerable_and_protected() {
    let fx = Fixture::new(40).await;
    let env = [("DATABASE_URL", fx.db.url.as_str())];
    let inventory = || {
        let out = crate::support::run(&["inventory", "--json"], &env);
        assert!(out.status.success(), "{}", crate::support::stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let total = |doc: &serde_json::Value, kind: &str, alg: &str| -> i64 {
        doc[kind]
            .as_array()
            .expect("array")
            .iter()
            .filter(|l| l["scope"] == "hashes" && l["algorithm"] == alg)
            .map(|l| l["items"].as_i64().expect("items"))
            .sum()
    };
    let before = inventory();
    assert_eq!(total(&before, "vulnerable", "unknown"), 40, "{before}");
    assert_eq!(total(&before, "protected", "HMAC-SHA3-256"), 0, "{before}");

    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"id_to": 30})).await;
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
    daemon.stop().await;
    // The daemon's snapshot may predate the job: count now.
    let out = crate::support::run(&["inventory", "--json", "--exact"], &env);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let after: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(total(&after, "vulnerable", "unknown"), 10, "{after}");
    assert_eq!(total(&after, "vulnerable", "backup"), 30, "{after}");
    assert_eq!(total(&after, "protected", "HMAC-SHA3-256"), 30, "{after}");

    let out = crate::support::run(&["inventory"], &env);
    let text = crate::support::stdout(&out);
    assert!(
        text.contains("hashes") && text.contains("EXPOSED"),
        "{text}"
    );
}

/// `pqmig_items_remaining` is sampled from the queue: each pending or
/// running job's total less what it walked (never below 0), by scope;
/// finished jobs and jobs without a total count nothing.
#[tokio::test]
async fn items_remaining_are_sampled_from_the_jobs_totals() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, status, total_count, processed_count, failed_count) VALUES \
           ('hashes', 'pending', 100, 30, 5), ('hashes', 'running', 10, 20, 0), \
           ('hashes', 'done', 1000, 0, 0), ('wrappers', 'running', 50, 8, 2), \
           ('signatures', 'pending', NULL, 0, 0)",
    )
    .await
    .expect("jobs");
    let q = pqmig::db::inventory::queue_sample(&c)
        .await
        .expect("sample");
    let mut remaining = q.remaining.clone();
    remaining.sort();
    assert_eq!(
        remaining,
        [
            ("hashes".to_string(), 65),
            ("signatures".to_string(), 0),
            ("wrappers".to_string(), 40)
        ]
    );
}
