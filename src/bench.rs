//! `pqmig bench`: seed a scratch database on the configured server, run
//! one job through the real daemon path (claim, batches, verify, backup)
//! in-process, and report its throughput and peak memory.

use std::os::unix::fs::DirBuilderExt;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cli::{BenchArgs, UsageError};
use crate::config::{Config, DatabaseUrl};
use crate::crypto::kem::Kem;
use crate::db::{self, demo as dbd};
use crate::demo::RemoveOnDrop;
use crate::sample::SampleKeys;

/// Peak resident set size of this process so far (VmHWM), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub async fn run(config: &Config, a: &BenchArgs) -> anyhow::Result<()> {
    if !(1..=10_000_000).contains(&a.items) {
        return Err(UsageError(format!("--items {} is out of range 1..=10000000", a.items)).into());
    }
    let layers = a.layers.unwrap_or(1);
    if !(1..=8).contains(&layers) {
        return Err(UsageError(format!("--layers {layers} is out of range 1..=8")).into());
    }
    let kem = match a.algo.as_deref() {
        None => Kem::MlKem768,
        Some(alias) => Kem::from_alias(alias).ok_or_else(|| {
            UsageError(format!(
                "--algo {alias:?}: the wrappers bench takes ML-KEM-768, ML-KEM-1024 or X-Wing"
            ))
        })?,
    };
    if !matches!(a.scope.as_str(), "wrappers" | "hashes") {
        return Err(UsageError(format!(
            "--scope {:?}: this build benchmarks wrappers or hashes",
            a.scope
        ))
        .into());
    }

    let admin_url = config
        .database
        .url
        .clone()
        .unwrap_or_else(|| DatabaseUrl::new(crate::config::LOCAL_DATABASE_URL));
    let mut admin_cfg = config.database.clone();
    admin_cfg.url = Some(admin_url.clone());
    let admin = db::connect(&admin_cfg).await?;
    let name = format!("pqmig_bench_{}", std::process::id());
    dbd::database_create(&admin, &name).await?;
    let result = run_in(config, &admin_url, &name, a, kem, layers as usize).await;
    if let Err(e) = dbd::database_drop(&admin, &name).await {
        eprintln!("pqmig: could not drop {name}: {}", db::error_chain(&e));
    }
    result
}

async fn run_in(
    config: &Config,
    admin_url: &DatabaseUrl,
    name: &str,
    a: &BenchArgs,
    kem: Kem,
    layers: usize,
) -> anyhow::Result<()> {
    let mut cfg = config.clone();
    cfg.database.url = Some(admin_url.with_database(name)?);
    cfg.metrics_listen = "127.0.0.1:0".parse()?;
    cfg.worker.poll_interval = Duration::from_millis(100);
    let mut client = db::connect(&cfg.database).await?;
    db::migrate::apply(&mut client).await?;

    let dir = std::env::temp_dir().join(format!("pqmig-bench-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let keyring = dir.join("keyring.json");
    let mut keys = SampleKeys::default();
    let n = a.items as usize;
    let t = Instant::now();
    let job = match a.scope.as_str() {
        "wrappers" => {
            let seed =
                crate::sample::seed_wrappers(&client, &mut keys, "", n, kem, layers, "bench")
                    .await?;
            // `defined` takes min(max_layers, keys): exactly `layers`.
            db::jobs::NewJob {
                scope: "wrappers".into(),
                target_policy_id: Some(seed.policy_id),
                ..Default::default()
            }
        }
        _ => {
            keys.generate("local:pepper-v2", "HMAC-SHA3-256", 32);
            dbd::hashes_seed(&client, n as i64, "local:pepper-v2").await?;
            let algo = db::algorithms::algorithm_by_alias(&client, "HMAC-SHA3-256")
                .await?
                .ok_or_else(|| anyhow::anyhow!("alias HMAC-SHA3-256 missing"))?;
            db::jobs::NewJob {
                scope: "hashes".into(),
                target_algo_id: Some(algo),
                selection: Some(serde_json::json!({"table": "users", "column": "email_hash"})),
                ..Default::default()
            }
        }
    };
    keys.write(&keyring)?;
    cfg.keyring = Some(keyring);
    client.batch_execute("ANALYZE").await?;
    eprintln!(
        "seeded {n} {} items in {:.1} s",
        a.scope,
        t.elapsed().as_secs_f64()
    );

    let services = crate::daemon::Services::from_config(&cfg).await?;
    let token = CancellationToken::new();
    let rss_before = peak_rss_kib();
    let started = Instant::now();
    let id = db::jobs::job_insert(&client, &job).await?;
    let daemon = {
        let (cfg, token) = (cfg.clone(), token.clone());
        tokio::spawn(async move { crate::daemon::run(&cfg, services, token).await })
    };
    let (status, processed) = loop {
        let j = dbd::jobs_summary(&client).await?;
        let j = j.iter().find(|j| j.0 == id).expect("the bench job");
        if !matches!(j.2.as_str(), "pending" | "running") {
            break (j.2.clone(), j.3);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    token.cancel();
    daemon.await??;
    let what = match a.scope.as_str() {
        "wrappers" => format!("wrappers, {layers} {} layer(s)", kem.alias()),
        _ => "hashes, HMAC-SHA3-256".into(),
    };
    println!(
        "{what}: {processed} items in {secs:.2} s = {:.0} items/s ({status}); peak RSS {} MiB (before the job {} MiB)",
        processed as f64 / secs,
        peak_rss_kib().unwrap_or(0) / 1024,
        rss_before.unwrap_or(0) / 1024
    );
    if status != "done" {
        anyhow::bail!("the bench job ended {status}");
    }
    Ok(())
}
