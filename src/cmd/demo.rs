//! `pqmig demo`: a scratch database with legacy data, one job per scope
//! this build supports, the daemon run in-process until they finish, and
//! the exposure inventory before and after.

use std::os::unix::fs::DirBuilderExt;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DatabaseUrl};
use crate::crypto::kem::Kem;
use crate::db::{self, inventory, sample as dbd};

/// Rows of legacy data per scope.
pub const DEMO_ITEMS: i64 = 5_000;

pub struct DemoOptions {
    /// Keep the scratch database afterwards (its name is printed).
    pub keep: bool,
}

/// A scratch database on the configured server (or the local default),
/// for `demo` and `bench`.
pub(crate) struct Scratch {
    admin: tokio_postgres::Client,
    pub admin_url: DatabaseUrl,
    pub name: String,
}

impl Scratch {
    pub async fn create(config: &Config, prefix: &str) -> anyhow::Result<Scratch> {
        let admin_url = config
            .database
            .url
            .clone()
            .unwrap_or_else(|| DatabaseUrl::new(crate::config::LOCAL_DATABASE_URL));
        let mut admin_cfg = config.database.clone();
        admin_cfg.url = Some(admin_url.clone());
        let admin = db::connect(&admin_cfg).await?;
        let name = format!(
            "{prefix}_{}_{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
            std::process::id()
        );
        dbd::database_create(&admin, &name).await?;
        Ok(Scratch {
            admin,
            admin_url,
            name,
        })
    }

    /// `config` pointed at the scratch database (metrics on a free loopback
    /// port, so it cannot collide with a daemon), and a client on it with
    /// the schema applied.
    pub async fn open(
        &self,
        config: &Config,
        poll: Duration,
    ) -> anyhow::Result<(Config, tokio_postgres::Client)> {
        let mut cfg = config.clone();
        cfg.database.url = Some(self.admin_url.with_database(&self.name)?);
        cfg.metrics_listen = "127.0.0.1:0".parse()?;
        cfg.worker.poll_interval = poll;
        let mut client = db::connect(&cfg.database).await?;
        db::migrate::apply(&mut client).await?;
        Ok((cfg, client))
    }

    pub async fn drop_database(&self) {
        if let Err(e) = dbd::database_drop(&self.admin, &self.name).await {
            eprintln!(
                "pqmig: could not drop the scratch database {}: {}",
                self.name,
                db::error_chain(&e)
            );
        }
    }
}

/// A private (0700) temporary directory, removed when the guard drops.
pub(crate) fn private_dir(prefix: &str) -> std::io::Result<RemoveOnDrop> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(RemoveOnDrop(dir))
}

/// Run the demo against the configured server (or the local default).
pub async fn run(config: &Config, opts: &DemoOptions) -> anyhow::Result<()> {
    let scratch = Scratch::create(config, "pqmig_demo").await?;
    let name = &scratch.name;
    println!("demo database: {name} on {}", scratch.admin_url);
    let result = run_in(config, &scratch).await;
    if opts.keep {
        println!("kept database {name} (drop it with: DROP DATABASE \"{name}\")");
    } else {
        scratch.drop_database().await;
    }
    result
}

async fn run_in(config: &Config, scratch: &Scratch) -> anyhow::Result<()> {
    let (mut cfg, client) = scratch.open(config, Duration::from_millis(200)).await?;

    // A keyring in a private temporary directory, removed afterwards.
    let dir = private_dir("pqmig-demo")?;
    let keyring = dir.0.join("keyring.json");
    let mut keys = crate::sample::SampleKeys::default();
    keys.generate("local:pepper-v2", "HMAC-SHA3-256", 32);

    let t = Instant::now();
    dbd::hashes_seed(&client, DEMO_ITEMS, "local:pepper-v2").await?;
    println!(
        "seeded {DEMO_ITEMS} users with unkeyed SHA-256 email hashes in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let wrappers = crate::sample::seed_wrappers(
        &client,
        &mut keys,
        "demo-",
        DEMO_ITEMS as usize,
        Kem::MlKem768,
        2,
        "pq-demo",
    )
    .await?;
    println!(
        "seeded {DEMO_ITEMS} DEK wrappers (half legacy AES-GCM under two KEKs, half legacy X25519) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let signatures = crate::sample::seed_signatures(
        &client,
        &mut keys,
        "demo-",
        DEMO_ITEMS as usize,
        true,
        crate::crypto::sig::SigAlg::MlDsa65,
        "pq-sign-demo",
    )
    .await?;
    println!(
        "seeded {DEMO_ITEMS} signed records (half Ed25519, half ECDSA P-256) and an ML-DSA-65 signing key in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    keys.write(&keyring)?;
    // An attestation key (ML-DSA-65, sealed under the signing key's KEK):
    // the daemon attests each job that ends done into `evidence`.
    let kek: i64 = client
        .query_one(
            "SELECT kms_key_id FROM signing_keys WHERE name = 'pq-sign-demo'",
            &[],
        )
        .await?
        .get(0);
    crate::keys::signing::create_signing_key(
        &client,
        &crate::keys::LocalKeyring::load(&keyring)?,
        None,
        "ML-DSA-65",
        "demo-attestation",
        &kek.to_string(),
        Some("attestation"),
    )
    .await?;
    let evidence = evidence_dir()?;
    cfg.attest_dir = Some(evidence.clone());
    cfg.keyring = Some(keyring);

    println!("\nexposure inventory before:");
    print_inventory(&client).await?;

    let selection = json!({"table": "users", "column": "email_hash"});
    let algo = db::algorithms::algorithm_by_alias(&client, "HMAC-SHA3-256")
        .await?
        .ok_or_else(|| anyhow::anyhow!("the seeded alias HMAC-SHA3-256 is missing"))?;
    let new_job = db::jobs::NewJob {
        scope: "hashes".into(),
        target_algo_id: Some(algo),
        selection: Some(selection),
        ..Default::default()
    };
    let job = db::jobs::job_insert(&client, &new_job).await?;
    println!("\nqueued job {job}: hashes users.email_hash -> HMAC-SHA3-256 (profile pepper-v2)");
    let new_job = db::jobs::NewJob {
        scope: "wrappers".into(),
        target_policy_id: Some(wrappers.policy_id),
        ..Default::default()
    };
    let job = db::jobs::job_insert(&client, &new_job).await?;
    println!(
        "queued job {job}: wrappers -> pqmig-wrap-v1 under policy pq-demo (2 ML-KEM-768 layers)"
    );
    let new_job = db::jobs::NewJob {
        scope: "signatures".into(),
        target_algo_id: Some(signatures.target_algo_id),
        ..Default::default()
    };
    let job = db::jobs::job_insert(&client, &new_job).await?;
    println!("queued job {job}: signatures -> ML-DSA-65 countersignatures (key pq-sign-demo)");

    let services = crate::daemon::Services::from_config(&cfg).await?;
    println!(
        "daemon metrics on http://{}/metrics",
        services.http.local_addr()?
    );
    let token = CancellationToken::new();
    let daemon = {
        let (cfg, token) = (cfg.clone(), token.clone());
        tokio::spawn(async move { crate::daemon::run(&cfg, services, token).await })
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let jobs = loop {
        let jobs = dbd::jobs_summary(&client).await?;
        if jobs
            .iter()
            .all(|j| !matches!(j.2.as_str(), "pending" | "running"))
        {
            break jobs;
        }
        if Instant::now() > deadline {
            token.cancel();
            anyhow::bail!("demo jobs did not finish within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    token.cancel();
    daemon.await??;
    let secs = started.elapsed().as_secs_f64();

    println!("\njobs:");
    println!(
        "  {:>4}  {:<10} {:<9} {:>9} {:>6}  result",
        "id", "scope", "status", "processed", "failed"
    );
    for (id, scope, status, processed, failed, error, result) in &jobs {
        let detail = match (error, result) {
            (Some(e), _) => e.clone(),
            (None, Some(r)) => r.to_string(),
            _ => String::new(),
        };
        println!("  {id:>4}  {scope:<10} {status:<9} {processed:>9} {failed:>6}  {detail}");
    }
    let total: i64 = jobs.iter().map(|j| j.3).sum();
    println!(
        "  {total} items in {secs:.2} s ({:.0} items/s)",
        total as f64 / secs
    );

    println!(
        "\nexposure inventory after (backups keep classical copies until `pqmig purge-backups`):"
    );
    print_inventory(&client).await?;
    if jobs.iter().any(|j| j.2 != "done") {
        anyhow::bail!("not every demo job ended done");
    }
    write_evidence(&client, &evidence, &jobs).await
}

/// The attestation the daemon wrote for `job` in `dir`, if it is there.
fn attestation_of(dir: &std::path::Path, job: i64) -> std::io::Result<Option<std::path::PathBuf>> {
    let prefix = format!("pqmig-job-{job}-");
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".dsse.json") {
            return Ok(Some(dir.join(&*name)));
        }
    }
    Ok(None)
}

/// A new directory for the demo's evidence, kept after it:
/// `$TMPDIR/pqmig-demo-evidence-<pid>`.
fn evidence_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("pqmig-demo-evidence-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o755).create(&dir)?;
    Ok(dir)
}

/// The CBOM of the database after the jobs, and the attestations the
/// daemon wrote for them (waited for: it writes them off the job's slot).
async fn write_evidence(
    client: &tokio_postgres::Client,
    dir: &std::path::Path,
    jobs: &[dbd::JobSummary],
) -> anyhow::Result<()> {
    let counted = inventory::inventory_count(client, inventory::SLICE_IDS).await?;
    let now = db::evidence::now(client).await?;
    let counts = super::inventory::Counts {
        inventory: &counted.inventory,
        sampled_at: &now,
        exact: true,
    };
    let cbom = super::inventory::cbom(client, &counts, None, None).await?;
    let cbom_path = dir.join("cbom.cdx.json");
    std::fs::write(&cbom_path, serde_json::to_string_pretty(&cbom)? + "\n")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let files = loop {
        let files: Vec<Option<std::path::PathBuf>> = jobs
            .iter()
            .map(|j| attestation_of(dir, j.0))
            .collect::<std::io::Result<_>>()?;
        if files.iter().all(Option::is_some) {
            break files.into_iter().flatten().collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the daemon did not write every job's attestation to {} within a minute (see its log)",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("\nevidence for auditors in {}:", dir.display());
    println!(
        "  {}  CycloneDX 1.6 CBOM of the database after the jobs",
        cbom_path.display()
    );
    for (j, f) in jobs.iter().zip(&files) {
        println!(
            "  {}  job {} ({}): signed attestation (ML-DSA-65), leaves beside it",
            f.display(),
            j.0,
            j.1
        );
    }
    println!(
        "  check one with `pqmig attest verify FILE` against the demo database (run the demo with --keep)"
    );
    Ok(())
}

/// The vulnerable lines, counted exactly (a scratch database: the
/// daemon's snapshot may predate the jobs).
async fn print_inventory(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let counted = inventory::inventory_count(client, inventory::SLICE_IDS).await?;
    let rows: Vec<_> = counted
        .inventory
        .vulnerable
        .iter()
        .filter(|e| e.items > 0)
        .collect();
    if rows.is_empty() {
        println!("  nothing exposed");
    }
    for e in rows {
        println!("  {:<10} {:<14} {:>8} items", e.scope, e.algorithm, e.items);
    }
    Ok(())
}

/// Removes a scratch directory (and the keyring in it) when dropped.
pub(crate) struct RemoveOnDrop(pub(crate) std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
