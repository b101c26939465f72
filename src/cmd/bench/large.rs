//! `pqmig bench --large`: the questions of a table of many millions of
//! rows, on one table of `--items` hashed rows (the cheapest items to
//! seed: ten million in about a minute) cut into four quarters:
//!
//! - how soon a job's first batch commits (a whole-table dry-run job:
//!   start, split, first batch; then cancelled);
//! - items/s of one job on one replica (quarter 1), of one job on
//!   `--replicas` replicas (quarter 2, with each replica's share), and of
//!   as many separate jobs on disjoint id ranges (quarter 3), the
//!   reference one shared job should reach;
//! - WAL written per item with backups (quarter 1) and without (quarter
//!   4), for projecting a larger table;
//! - the longest statement any replica ran meanwhile (pg_stat_activity
//!   sampled every 10 ms), against `statement_timeout`;
//! - the process's peak RSS.
//!
//! The replicas run in this process (one daemon each, with its own pool
//! and metrics), so they share its cores like replicas on one host.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{peak_rss_kib, settle};
use crate::cmd::demo::{Scratch, private_dir};
use crate::config::Config;
use crate::db::{self, backups, sample as dbd};
use crate::job::ScopeKind;
use crate::metrics::Metrics;
use crate::sample::SampleKeys;

/// Sampling period of the statement watcher.
const WATCH_EVERY: Duration = Duration::from_millis(10);

pub async fn run(
    config: &Config,
    scratch: &Scratch,
    items: i64,
    replicas: usize,
) -> anyhow::Result<()> {
    let (mut cfg, client) = scratch.open(config, Duration::from_millis(100)).await?;
    let dir = private_dir("pqmig-bench")?;
    let keyring = dir.0.join("keyring.json");
    let mut keys = SampleKeys::default();
    keys.generate("local:pepper-v2", "HMAC-SHA3-256", 32);
    keys.write(&keyring)?;
    cfg.keyring = Some(keyring);

    let t = Instant::now();
    dbd::hashes_seed(&client, items, "local:pepper-v2").await?;
    settle(&client).await?;
    eprintln!(
        "seeded {items} hashes items in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let algo = db::algorithms::algorithm_by_alias(&client, "HMAC-SHA3-256")
        .await?
        .ok_or_else(|| anyhow::anyhow!("alias HMAC-SHA3-256 missing"))?;
    let bench = Bench {
        cfg,
        client,
        algo,
        db: scratch.name.clone(),
    };

    let watch = StatementWatch::start(&bench.cfg, &bench.db).await?;
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = peak_rss_kib();
    let quarter = items / 4;
    let q = |k: i64| {
        (
            k * quarter + 1,
            if k == 3 { items } else { (k + 1) * quarter },
        )
    };

    let first = bench.first_batch().await?;
    let one = bench.jobs(1, &[q(0)], true).await?;
    settle(&bench.client).await?;
    let shared = bench.jobs(replicas, &[q(1)], true).await?;
    settle(&bench.client).await?;
    let (lo, hi) = q(2);
    let step = (hi - lo + 1) / replicas as i64;
    let parts: Vec<(i64, i64)> = (0..replicas as i64)
        .map(|k| {
            let from = lo + k * step;
            let to = if k == replicas as i64 - 1 {
                hi
            } else {
                from + step - 1
            };
            (from, to)
        })
        .collect();
    let separate = bench.jobs(replicas, &parts, true).await?;
    settle(&bench.client).await?;
    let no_backup = bench.jobs(1, &[q(3)], false).await?;
    let rss = peak_rss_kib();
    let longest = watch.stop().await;
    // purge-backups: the first job's partition, then one of `items` rows.
    let purge_one = bench.purge(one.ids[0]).await?;
    let purge_all = bench.purge(bench.backed_up_job(items).await?).await?;

    let slots = bench.cfg.worker.concurrency.get();
    println!("large table: hashes, HMAC-SHA3-256, {items} rows, {slots} worker slots per replica");
    println!(
        "  first committed batch  {:>9.3} s  (whole-table job: claimed, split into {} ranges, first batch)",
        first.0, first.1
    );
    one.print("1 replica, one job");
    shared.print(&format!("{replicas} replicas, one job"));
    let shares: Vec<String> = shared
        .shares
        .iter()
        .map(|s| format!("{:.0}%", 100.0 * s / shared.items.max(1) as f64))
        .collect();
    println!("  {:<22} {}", "  shares", shares.join(" "));
    separate.print(&format!("{replicas} replicas, {replicas} jobs"));
    println!(
        "  {:<22} {:>9.2}  (one shared job / separate jobs on disjoint ranges; target >= 0.9)",
        "shared vs separate",
        shared.rate() / separate.rate()
    );
    let st = bench.cfg.database.statement_timeout;
    match (&longest, st) {
        (Some((secs, query)), Some(st)) => println!(
            "  {:<22} {:>9.3} s  ({:.2}% of statement_timeout {}; target <= 10%): {}",
            "longest statement",
            secs,
            100.0 * secs / st.as_secs_f64(),
            humantime::format_duration(st),
            one_line(query)
        ),
        (Some((secs, query)), None) => println!(
            "  {:<22} {:>9.3} s  (no statement_timeout set): {}",
            "longest statement",
            secs,
            one_line(query)
        ),
        (None, _) => println!("  {:<22} none seen", "longest statement"),
    }
    println!(
        "  {:<22} {:>9.0} B with backups, {:.0} B without",
        "WAL per item",
        one.wal_per_item(),
        no_backup.wal_per_item()
    );
    for (secs, d) in [purge_one, purge_all] {
        println!(
            "  {:<22} {:>9.3} s  (a done job's {}{} backups: its partition dropped)",
            "purge-backups",
            secs,
            if d.exact { "" } else { "about " },
            d.backups
        );
    }
    println!(
        "  {:<22} {:>9} MiB  (before the runs {} MiB)",
        "peak RSS",
        rss.unwrap_or(0) / 1024,
        rss_before.unwrap_or(0) / 1024
    );
    for run in [&one, &shared, &separate, &no_backup] {
        if let Some(bad) = &run.not_done {
            anyhow::bail!("a bench job ended {bad}");
        }
    }
    Ok(())
}

/// The first 80 characters of a statement, on one line.
fn one_line(query: &str) -> String {
    let q: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
    q.chars().take(80).collect()
}

struct Bench {
    cfg: Config,
    client: tokio_postgres::Client,
    algo: i64,
    db: String,
}

/// What one run of jobs came to.
struct Run {
    items: i64,
    secs: f64,
    wal_bytes: i64,
    /// Items each replica walked (its `pqmig_items_processed_total`).
    shares: Vec<f64>,
    /// The status of a job that did not end `done`.
    not_done: Option<String>,
    ids: Vec<i64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.items as f64 / self.secs
    }

    fn wal_per_item(&self) -> f64 {
        self.wal_bytes as f64 / self.items.max(1) as f64
    }

    fn print(&self, what: &str) {
        println!(
            "  {what:<22} {:>9.0} items/s  ({} items, {:.1} s)",
            self.rate(),
            self.items,
            self.secs
        );
    }
}

impl Bench {
    fn job(&self, window: Option<(i64, i64)>, backup: bool, dry_run: bool) -> db::jobs::NewJob {
        let mut sel = serde_json::json!({"table": "users", "column": "email_hash"});
        if let Some((from, to)) = window {
            sel["id_from"] = serde_json::json!(from);
            sel["id_to"] = serde_json::json!(to);
        }
        if !backup {
            sel["backup"] = serde_json::json!(false);
        }
        if dry_run {
            sel["dry_run"] = serde_json::json!(true);
        }
        db::jobs::NewJob {
            scope: "hashes".into(),
            target_algo_id: Some(self.algo),
            selection: Some(sel),
            ..Default::default()
        }
    }

    /// Seconds from queueing a whole-table (dry-run) job to its first
    /// committed batch, and the ranges it was split into.
    async fn first_batch(&self) -> anyhow::Result<(f64, i64)> {
        let replicas = Replicas::start(&self.cfg, 1).await?;
        let started = Instant::now();
        let id = db::jobs::job_insert(&self.client, &self.job(None, true, true)).await?;
        let secs = loop {
            if dbd::job_walked(&self.client, id).await? > 0 {
                break started.elapsed().as_secs_f64();
            }
            if started.elapsed() > Duration::from_secs(600) {
                anyhow::bail!("no batch of the whole-table job committed within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        db::jobs::job_cancel(&self.client, id, "bench").await?;
        replicas.stop().await?;
        let n = crate::db::ranges::ranges_of_job(&self.client, id)
            .await?
            .len() as i64;
        Ok((secs, n))
    }

    /// Seconds `purge-backups` takes to drop the done job's partition,
    /// and what it dropped.
    async fn purge(&self, job_id: i64) -> anyhow::Result<(f64, backups::Dropped)> {
        let started = Instant::now();
        let dropped = backups::purge_partition(&self.client, ScopeKind::Hashes, job_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("job {job_id} has no backup partition"))?;
        Ok((started.elapsed().as_secs_f64(), dropped))
    }

    /// A done hashes job whose partition holds `n` backups, written by the
    /// server (a job that large would take the bench an hour to run).
    async fn backed_up_job(&self, n: i64) -> anyhow::Result<i64> {
        let id = db::jobs::job_insert(&self.client, &self.job(None, true, false)).await?;
        self.client
            .execute(
                "UPDATE pq_migration_jobs SET status = 'done', finished_at = now() WHERE id = $1",
                &[&id],
            )
            .await?;
        backups::ensure_partition(&self.client, ScopeKind::Hashes, id).await?;
        self.client
            .execute(
                &format!(
                    "INSERT INTO {} (job_id, item_id, hash, version) \
                     SELECT $1, i, sha256(int8send(i)), 'sha256-v1' FROM generate_series(1, $2::bigint) i",
                    backups::partition(ScopeKind::Hashes, id)
                ),
                &[&id, &n],
            )
            .await?;
        settle(&self.client).await?;
        Ok(id)
    }

    /// Run one job per id window on `replicas` replicas until every job
    /// has ended.
    async fn jobs(
        &self,
        replicas: usize,
        windows: &[(i64, i64)],
        backup: bool,
    ) -> anyhow::Result<Run> {
        let daemons = Replicas::start(&self.cfg, replicas).await?;
        let wal0 = dbd::wal_position(&self.client).await?;
        let started = Instant::now();
        let mut ids = Vec::new();
        for w in windows {
            ids.push(db::jobs::job_insert(&self.client, &self.job(Some(*w), backup, false)).await?);
        }
        let (items, not_done) = loop {
            let jobs = dbd::jobs_summary(&self.client).await?;
            let ours: Vec<_> = jobs.iter().filter(|j| ids.contains(&j.0)).collect();
            if ours
                .iter()
                .all(|j| !matches!(j.2.as_str(), "pending" | "running"))
            {
                let items = ours.iter().map(|j| j.3 + j.4).sum::<i64>();
                let bad = ours.iter().find(|j| j.2 != "done").map(|j| j.2.clone());
                break (items, bad);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let secs = started.elapsed().as_secs_f64();
        let wal_bytes = dbd::wal_position(&self.client).await? - wal0;
        let shares = daemons.items();
        daemons.stop().await?;
        Ok(Run {
            items,
            secs,
            wal_bytes,
            shares,
            not_done,
            ids,
        })
    }
}

/// Daemons in this process, each with its own pool and metrics.
struct Replicas {
    token: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    metrics: Vec<Arc<Metrics>>,
}

impl Replicas {
    async fn start(cfg: &Config, n: usize) -> anyhow::Result<Replicas> {
        let token = CancellationToken::new();
        let mut handles = Vec::new();
        let mut metrics = Vec::new();
        for _ in 0..n {
            let services = crate::daemon::Services::from_config(cfg).await?;
            metrics.push(Arc::clone(&services.metrics));
            let (cfg, token) = (cfg.clone(), token.clone());
            handles.push(tokio::spawn(async move {
                crate::daemon::run(&cfg, services, token).await
            }));
        }
        Ok(Replicas {
            token,
            handles,
            metrics,
        })
    }

    /// Items each replica walked so far.
    fn items(&self) -> Vec<f64> {
        self.metrics
            .iter()
            .map(|m| m.items_processed.with_label_values(&["hashes"]).get() as f64)
            .collect()
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        for h in self.handles {
            h.await??;
        }
        Ok(())
    }
}

/// The longest active statement of any pqmig session on the database,
/// sampled from pg_stat_activity on a connection of its own.
struct StatementWatch {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<Option<(f64, String)>>,
}

impl StatementWatch {
    async fn start(cfg: &Config, db: &str) -> anyhow::Result<StatementWatch> {
        let client = db::connect(&cfg.database).await?;
        let token = CancellationToken::new();
        let (t, db) = (token.clone(), db.to_owned());
        let handle = tokio::spawn(async move {
            let mut longest: Option<(f64, String)> = None;
            while !t.is_cancelled() {
                if let Ok(Some((secs, query))) = dbd::longest_statement(&client, &db).await
                    && longest.as_ref().is_none_or(|(s, _)| secs > *s)
                {
                    longest = Some((secs, query));
                }
                tokio::time::sleep(WATCH_EVERY).await;
            }
            longest
        });
        Ok(StatementWatch { token, handle })
    }

    async fn stop(self) -> Option<(f64, String)> {
        self.token.cancel();
        self.handle.await.ok().flatten()
    }
}
