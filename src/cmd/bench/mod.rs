//! `pqmig bench`: seed a scratch database on the configured server, run
//! one job through the real daemon path (claim, batches, verify, backup)
//! in-process, and report its throughput and peak memory. `--large`
//! measures a table of many millions of rows instead ([`large`]).

mod kms;
mod large;

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::UsageError;
use super::demo::{Scratch, private_dir};
use crate::config::Config;
use crate::crypto::kem::Kem;
use crate::db::{self, sample as dbd};
use crate::sample::SampleKeys;

/// Peak resident set size of this process so far (VmHWM), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// What `pqmig bench` measures.
pub struct BenchOptions {
    /// wrappers, signatures or hashes.
    pub scope: String,
    pub items: u64,
    /// PQ layers per wrapper.
    pub layers: Option<u32>,
    /// Target algorithm alias.
    pub algo: Option<String>,
    /// The large-table mode (hashes only).
    pub large: bool,
    /// Replicas of the large-table mode.
    pub replicas: usize,
    /// The wrappers job against AWS KMS of this region (`kms.rs`).
    pub kms_region: Option<String>,
    pub vault_location: Option<String>,
}

pub async fn run(config: &Config, a: &BenchOptions) -> anyhow::Result<()> {
    if a.large {
        return run_large(config, a).await;
    }
    if !(1..=10_000_000).contains(&a.items) {
        return Err(UsageError(format!("--items {} is out of range 1..=10000000", a.items)).into());
    }
    let layers = a.layers.unwrap_or(1);
    if !(1..=8).contains(&layers) {
        return Err(UsageError(format!("--layers {layers} is out of range 1..=8")).into());
    }
    let kem = match a.algo.as_deref().filter(|_| a.scope == "wrappers") {
        None => Kem::MlKem768,
        Some(alias) => Kem::from_alias(alias).ok_or_else(|| {
            UsageError(format!(
                "--algo {alias:?}: the wrappers bench takes ML-KEM-768, ML-KEM-1024 or X-Wing"
            ))
        })?,
    };
    if !matches!(a.scope.as_str(), "wrappers" | "hashes" | "signatures") {
        return Err(UsageError(format!(
            "--scope {:?}: expected wrappers, signatures or hashes",
            a.scope
        ))
        .into());
    }
    let sig_alg = match (a.scope.as_str(), a.algo.as_deref()) {
        ("signatures", None) => crate::crypto::sig::SigAlg::MlDsa65,
        ("signatures", Some(alias)) => crate::crypto::sig::SigAlg::from_alias(alias)
            .filter(|s| s.is_pq())
            .ok_or_else(|| {
                UsageError(format!(
                    "--algo {alias:?}: the signatures bench takes ML-DSA-44/65/87 or SLH-DSA-SHA2-128s/f"
                ))
            })?,
        _ => crate::crypto::sig::SigAlg::MlDsa65,
    };

    let remote = match (&a.kms_region, &a.vault_location) {
        (Some(_), Some(_)) => {
            return Err(UsageError(
                "--kms-region and --vault-location: one provider at a time".into(),
            )
            .into());
        }
        (Some(region), None) => Some(kms::Remote::Aws(region)),
        (None, Some(location)) => Some(kms::Remote::Vault(location)),
        (None, None) => None,
    };
    if let Some(remote) = remote {
        if a.scope != "wrappers" || a.layers.is_some() || a.algo.is_some() {
            return Err(UsageError(
                "--kms-region/--vault-location measure the wrappers scope with one ML-KEM-768 layer: drop --layers/--algo, use --scope wrappers".into(),
            )
            .into());
        }
        return kms::run(config, a, remote).await;
    }
    let scratch = Scratch::create(config, "pqmig_bench").await?;
    let result = run_in(config, &scratch, a, kem, layers as usize, sig_alg).await;
    scratch.drop_database().await;
    result
}

/// One job of the bench, run by the real daemon to its end.
struct JobRun {
    processed: i64,
    secs: f64,
    status: String,
    /// WAL the server wrote while it ran (`pg_current_wal_lsn()` before
    /// and after), per item.
    wal_per_item: f64,
    id: i64,
}

impl JobRun {
    fn rate(&self) -> f64 {
        self.processed as f64 / self.secs
    }
}

/// Run `job` through a daemon of its own until it ends.
async fn run_job(
    cfg: &Config,
    client: &tokio_postgres::Client,
    job: &db::jobs::NewJob,
) -> anyhow::Result<JobRun> {
    let services = crate::daemon::Services::from_config(cfg).await?;
    let token = CancellationToken::new();
    let wal0 = dbd::wal_position(client).await?;
    let started = Instant::now();
    let id = db::jobs::job_insert(client, job).await?;
    let daemon = {
        let (cfg, token) = (cfg.clone(), token.clone());
        tokio::spawn(async move { crate::daemon::run(&cfg, services, token).await })
    };
    let (status, processed) = loop {
        let j = dbd::jobs_summary(client).await?;
        let j = j.iter().find(|j| j.0 == id).expect("the bench job");
        if !matches!(j.2.as_str(), "pending" | "running") {
            break (j.2.clone(), j.3);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let wal = (dbd::wal_position(client).await? - wal0) as f64;
    token.cancel();
    daemon.await??;
    Ok(JobRun {
        processed,
        secs,
        status,
        wal_per_item: wal / processed.max(1) as f64,
        id,
    })
}

/// The in-database alternative a DBA would write instead of pqmig (#23's
/// reference): a PL/pgSQL procedure re-hashing ids `from..=to` with
/// pgcrypto's HMAC-SHA3-256 in 10k-row `UPDATE`s with a `COMMIT` each, no
/// backups, no verify, the pepper passed in SQL. The same values pqmig
/// writes (HMAC over the old hash, version `pepper-v2/<old>`).
async fn pgcrypto_reference(
    client: &tokio_postgres::Client,
    pepper: &[u8],
    from: i64,
    to: i64,
) -> anyhow::Result<JobRun> {
    client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pgcrypto; \
             CREATE OR REPLACE PROCEDURE pqmig_bench_rehash(pepper bytea, lo bigint, hi bigint) \
             LANGUAGE plpgsql AS $$ \
             DECLARE a bigint := lo; \
             BEGIN \
               WHILE a <= hi LOOP \
                 UPDATE users SET email_hash = hmac(email_hash, pepper, 'sha3-256'), \
                                  email_hash_key_version = 'pepper-v2/' || email_hash_key_version \
                  WHERE id >= a AND id < LEAST(a + 10000, hi + 1) \
                    AND email_hash_key_version NOT LIKE 'pepper-v2/%'; \
                 COMMIT; \
                 a := a + 10000; \
               END LOOP; \
             END $$",
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!("the pgcrypto reference needs CREATE EXTENSION pgcrypto: {e}")
        })?;
    let wal0 = dbd::wal_position(client).await?;
    let started = Instant::now();
    client
        .execute(
            "CALL pqmig_bench_rehash($1, $2, $3)",
            &[&pepper, &from, &to],
        )
        .await?;
    let secs = started.elapsed().as_secs_f64();
    let wal = (dbd::wal_position(client).await? - wal0) as f64;
    let processed: i64 = client
        .query_one(
            "SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2 \
               AND email_hash_key_version LIKE 'pepper-v2/%'",
            &[&from, &to],
        )
        .await?
        .get(0);
    if processed != to - from + 1 {
        anyhow::bail!(
            "the pgcrypto reference re-hashed {processed} of {} rows",
            to - from + 1
        );
    }
    Ok(JobRun {
        processed,
        secs,
        status: "done".into(),
        wal_per_item: wal / processed.max(1) as f64,
        id: 0,
    })
}

/// The same job restricted to the ids `from..=to`, with or without backups.
fn job_over(job: &db::jobs::NewJob, from: i64, to: i64, backup: bool) -> db::jobs::NewJob {
    let mut sel = job
        .selection
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    sel["id_from"] = serde_json::json!(from);
    sel["id_to"] = serde_json::json!(to);
    if !backup {
        sel["backup"] = serde_json::json!(false);
    }
    db::jobs::NewJob {
        scope: job.scope.clone(),
        target_policy_id: job.target_policy_id,
        target_algo_id: job.target_algo_id,
        selection: Some(sel),
        ..Default::default()
    }
}

async fn run_in(
    config: &Config,
    scratch: &Scratch,
    a: &BenchOptions,
    kem: Kem,
    layers: usize,
    sig_alg: crate::crypto::sig::SigAlg,
) -> anyhow::Result<()> {
    let (mut cfg, mut client) = scratch.open(config, Duration::from_millis(100)).await?;
    let dir = private_dir("pqmig-bench")?;
    let keyring = dir.0.join("keyring.json");
    let mut keys = SampleKeys::default();
    let n = a.items as usize;
    let t = Instant::now();
    // Equal segments of the same data: the baselines, the job with
    // backups, the job without, and (hashes) the in-database reference.
    let parts = if a.scope == "hashes" { 4 } else { 3 };
    let mut pepper = None;
    // (the job, the last id of each segment)
    let (job, ends) = match a.scope.as_str() {
        "wrappers" => {
            let seed = crate::sample::seed_wrappers(
                &client,
                &mut keys,
                "",
                parts * n,
                kem,
                layers,
                "bench",
            )
            .await?;
            // `defined` takes min(max_layers, keys): exactly `layers`.
            let job = db::jobs::NewJob {
                scope: "wrappers".into(),
                target_policy_id: Some(seed.policy_id),
                ..Default::default()
            };
            let ends: Vec<i64> = (1..=parts).map(|k| seed.deks[k * n - 1].0).collect();
            (job, ends)
        }
        "signatures" => {
            let seed = crate::sample::seed_signatures(
                &client,
                &mut keys,
                "",
                parts * n,
                false,
                sig_alg,
                "bench",
            )
            .await?;
            let job = db::jobs::NewJob {
                scope: "signatures".into(),
                target_algo_id: Some(seed.target_algo_id),
                ..Default::default()
            };
            let mut ends = Vec::new();
            for k in 1..=parts {
                ends.push(dbd::signatures_nth_id(&client, (k * n) as i64 - 1).await?);
            }
            (job, ends)
        }
        _ => {
            pepper = Some(keys.generate("local:pepper-v2", "HMAC-SHA3-256", 32));
            dbd::hashes_seed(&client, (parts * n) as i64, "local:pepper-v2").await?;
            let algo = db::algorithms::algorithm_by_alias(&client, "HMAC-SHA3-256")
                .await?
                .ok_or_else(|| anyhow::anyhow!("alias HMAC-SHA3-256 missing"))?;
            let job = db::jobs::NewJob {
                scope: "hashes".into(),
                target_algo_id: Some(algo),
                selection: Some(serde_json::json!({"table": "users", "column": "email_hash"})),
                ..Default::default()
            };
            let ends = (1..=parts).map(|k| (k * n) as i64).collect();
            (job, ends)
        }
    };
    keys.write(&keyring)?;
    cfg.keyring = Some(keyring);
    settle(&client).await?;
    eprintln!(
        "seeded {} {} items in {:.1} s",
        parts * n,
        a.scope,
        t.elapsed().as_secs_f64()
    );

    // Start the peak-RSS count afresh: the job's, not seeding's (Linux
    // resets VmHWM when 5 is written to clear_refs).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = peak_rss_kib();
    let with = run_job(&cfg, &client, &job_over(&job, ends[0] + 1, ends[1], true)).await?;
    let rss_job = peak_rss_kib();
    settle(&client).await?;
    let without = run_job(&cfg, &client, &job_over(&job, ends[1] + 1, ends[2], false)).await?;
    settle(&client).await?;
    let reference = match (ends.get(3), &pepper) {
        (Some(&last), Some(pepper)) => {
            let r = pgcrypto_reference(&client, pepper, ends[2] + 1, last).await?;
            settle(&client).await?;
            Some(r)
        }
        _ => None,
    };
    // The baselines after the jobs, so their peak RSS is their own.
    let base = baselines(&cfg, &mut client, &job, ends[0]).await?;
    let what = match a.scope.as_str() {
        "wrappers" => format!("wrappers, {layers} {} layer(s)", kem.alias()),
        "signatures" => format!("signatures, Ed25519/ECDSA -> {}", sig_alg.alias()),
        _ => "hashes, HMAC-SHA3-256".into(),
    };
    let rate = with.rate();
    let ceiling = 1.0 / (1.0 / base.crypto + 1.0 / base.db);
    let sizes = dbd::job_batch_sizes(&client, with.id).await?;
    println!("{what}, {} items per job:", with.processed);
    println!(
        "  pqmig job          {rate:>9.0} items/s  ({:.2} s, {}; with backups; WAL {:.0} B/item)",
        with.secs, with.status, with.wal_per_item
    );
    println!(
        "  without backups    {:>9.0} items/s  ({:.2} s, {}; WAL {:.0} B/item)",
        without.rate(),
        without.secs,
        without.status,
        without.wal_per_item
    );
    println!(
        "  backups cost       {:>8.1} %  of items/s; WAL {:.2}x without{}",
        100.0 * (1.0 - rate / without.rate()),
        with.wal_per_item / without.wal_per_item,
        if a.scope == "signatures" {
            " (a signatures job records its countersignatures either way: noise)"
        } else {
            ""
        }
    );
    if let Some(r) = &reference {
        println!(
            "  pgcrypto procedure {:>9.0} items/s  ({:.2} s; PL/pgSQL, 10k-row UPDATE + COMMIT, no backups; WAL {:.0} B/item)",
            r.rate(),
            r.secs,
            r.wal_per_item
        );
        println!(
            "  vs the procedure   {:>9.2}  with backups; {:.2} without",
            rate / r.rate(),
            without.rate() / r.rate()
        );
    }
    println!(
        "  crypto only        {:>9.0} items/s  (same computation, no database)",
        base.crypto
    );
    println!(
        "  database only      {:>9.0} items/s  (same reads and writes, precomputed, batches of {BASELINE_BATCH})",
        base.db
    );
    println!(
        "  combined ceiling   {ceiling:>9.0} items/s  (1 / (1/crypto + 1/database), both on the same cores)"
    );
    println!(
        "  ratio              {:>9.2}  of the combined ceiling; {:.2} of database only",
        rate / ceiling,
        rate / base.db
    );
    println!("  batch sizes        {sizes:?}");
    println!(
        "  peak RSS           {:>9} MiB  (before the job {} MiB)",
        rss_job.unwrap_or(0) / 1024,
        rss_before.unwrap_or(0) / 1024
    );
    for r in [&with, &without] {
        if r.status != "done" {
            anyhow::bail!("a bench job ended {}", r.status);
        }
    }
    Ok(())
}

async fn run_large(config: &Config, a: &BenchOptions) -> anyhow::Result<()> {
    if a.scope != "hashes" {
        return Err(UsageError(format!(
            "--large measures the hashes scope (the cheapest items to seed by the million), not {:?}",
            a.scope
        ))
        .into());
    }
    if !(1000..=200_000_000).contains(&a.items) {
        return Err(UsageError(format!(
            "--items {} is out of range 1000..=200000000 for --large",
            a.items
        ))
        .into());
    }
    if !(1..=16).contains(&a.replicas) {
        return Err(UsageError(format!("--replicas {} is out of range 1..=16", a.replicas)).into());
    }
    let scratch = Scratch::create(config, "pqmig_bench").await?;
    let result = large::run(config, &scratch, a.items as i64, a.replicas).await;
    scratch.drop_database().await;
    result
}

/// Batch size of the baselines.
const BASELINE_BATCH: i64 = 1000;
/// Items the baselines measure at most: a few seconds of database work
/// each (hashes are about ten times cheaper to write than the others), so
/// one checkpoint or autovacuum pass does not swing the rate.
fn baseline_items(scope: &str) -> i64 {
    match scope {
        "hashes" => 100_000,
        _ => 20_000,
    }
}

/// Start a measurement without the previous phase's debt (see
/// [`dbd::settle`]); a checkpoint the role may not run is skipped with a note.
async fn settle(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    if let Err(e) = dbd::settle(client).await? {
        eprintln!("no CHECKPOINT before measuring: {e}");
    }
    Ok(())
}

struct Baselines {
    /// Items/s of the computation alone, on all cores.
    crypto: f64,
    /// Items/s of the reads and writes alone, with precomputed values.
    db: f64,
}

/// Measure the two halves of a job separately on the items up to `last`:
/// the computation with no database, then the same fetches and writes
/// (one transaction per batch, with a progress update) with the values
/// computed beforehand.
async fn baselines(
    cfg: &Config,
    client: &mut tokio_postgres::Client,
    job: &db::jobs::NewJob,
    last: i64,
) -> anyhow::Result<Baselines> {
    let mut probe_job = db::jobs::NewJob {
        scope: job.scope.clone(),
        target_policy_id: job.target_policy_id,
        target_algo_id: job.target_algo_id,
        selection: job.selection.clone(),
        ..Default::default()
    };
    let mut sel = probe_job
        .selection
        .take()
        .unwrap_or_else(|| serde_json::json!({}));
    sel["id_to"] = serde_json::json!(last);
    // Rates need no more than this, and memory stays bounded.
    let cap = baseline_items(&job.scope);
    sel["limit"] = serde_json::json!(cap);
    probe_job.selection = Some(sel);
    let id = db::jobs::job_insert(&*client, &probe_job).await?;
    let claimed = db::jobs::job_claim(&*client, 1, "bench-baseline")
        .await?
        .into_iter()
        .find(|j| j.lease.job_id == id)
        .ok_or_else(|| anyhow::anyhow!("could not claim the baseline job"))?;
    let ctx = crate::scope::ScopeContext::of(cfg);
    let spec = claimed
        .spec
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the baseline job: {e}"))?;
    let prepared = spec
        .scope
        .prepare(&*client, spec, &ctx)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    if db::backups::needed(spec.scope, prepared.common()) {
        db::backups::ensure_partition(&*client, spec.scope, id).await?;
    }

    // Crypto: fetch everything first (untimed), then compute (timed).
    let mut batches = Vec::new();
    let mut after = i64::MIN;
    let mut fetched = 0;
    let mut sizes = Vec::new();
    while fetched < cap {
        let rows = prepared
            .fetch(&*client, after, i64::MAX, BASELINE_BATCH.min(cap - fetched))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (n, Some(last)) = (rows.len, rows.last) else {
            break;
        };
        fetched += n;
        after = last;
        batches.push((n, rows));
        sizes.push(n);
    }
    let items: i64 = batches.iter().map(|b| b.0).sum();
    let t = Instant::now();
    let mut computed = Vec::with_capacity(batches.len());
    for (_, rows) in batches {
        computed.push(
            prepared
                .compute(rows)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    let crypto = items as f64 / t.elapsed().as_secs_f64();

    // Database: the same fetch per batch, then the writes and the fenced
    // progress update in one transaction per batch, as the executor does.
    let t = Instant::now();
    let mut after = i64::MIN;
    let mut cursor: Option<serde_json::Value> = None;
    for (c, size) in computed.into_iter().zip(sizes) {
        let rows = prepared
            .fetch(&*client, after, i64::MAX, size)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (n, Some(last)) = (rows.len, rows.last) else {
            break;
        };
        after = last;
        let tx = client.transaction().await?;
        prepared
            .write(&tx, id, c)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let next = serde_json::json!({"after_id": last});
        db::jobs::job_progress(&tx, claimed.lease, n, 0, &next, cursor.as_ref())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the baseline job's lease was lost"))?;
        cursor = Some(next);
        tx.commit().await?;
    }
    let db_rate = items as f64 / t.elapsed().as_secs_f64();
    db::jobs::job_finish(
        &*client,
        claimed.lease,
        "done",
        None,
        &serde_json::json!({}),
        "bench",
    )
    .await?;
    Ok(Baselines {
        crypto,
        db: db_rate,
    })
}
