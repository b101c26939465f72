//! The command line of SPEC §8.1: argument definitions and dispatch. Each
//! command loads the configuration, then calls into the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, FlagOverrides, Sources};
use crate::{db, telemetry};

/// An error that is the caller's to fix (bad flag, bad config, missing
/// input): exit code 2 rather than 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit codes of SPEC §8.1: 2 for usage or configuration errors, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let usage = err.chain().any(|e| {
        e.downcast_ref::<UsageError>().is_some()
            || e.downcast_ref::<crate::config::ConfigError>().is_some()
    });
    if usage { 2 } else { 1 }
}

#[derive(Debug, Parser)]
#[command(
    name = "pqmig",
    version,
    about = "Moves data stored in PostgreSQL onto post-quantum cryptography."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Config file (TOML) [env: PQMIG_CONFIG; default: /etc/pqmig/pqmig.toml when present]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL; prefer DATABASE_URL, a flag is visible in `ps`
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Keyring file of the local key provider [env: PQMIG_KEYRING]
    #[arg(long, global = true, value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// Log filter, e.g. `info` or `pqmig=debug` [env: PQMIG_LOG]
    #[arg(long = "log", global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: text, json or auto (text on a terminal) [env: PQMIG_LOG_FORMAT]
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker daemon: claim jobs from pq_migration_jobs and migrate their items.
    Run(RunArgs),
    /// Apply pending schema migrations (safe to run from several replicas at once).
    Migrate,
    /// Queue a migration job and print its id.
    Enqueue(JobSpecArgs),
    /// Show jobs, their progress, rate and ETA.
    Status(StatusArgs),
    /// Cancel a pending or running job (progress is kept).
    Cancel(JobArg),
    /// Re-queue a failed or cancelled job from where it stopped.
    Resume(JobArg),
    /// Show what a job would do (matched items, estimated time) without queueing it.
    Plan(PlanArgs),
    /// Re-check every item a job migrated; exits non-zero on any mismatch.
    Verify(JobArg),
    /// Restore the previous values of every item a job migrated, from its backups.
    Rollback(JobArg),
    /// Delete a job's backups (after `pqmig verify`).
    PurgeBackups(JobArg),
    /// Count items still on quantum-vulnerable crypto, by scope and algorithm.
    Inventory(JsonArg),
    /// Manage keys of the local key provider.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Create a scratch database with sample data, migrate it end to end and show the result.
    Demo(DemoArgs),
    /// Measure items/s of a scope on a seeded scratch database.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Jobs worked at once by this process [env: PQMIG_CONCURRENCY]
    #[arg(long)]
    pub concurrency: Option<i64>,
    /// Address of the HTTP listener for /metrics, /healthz, /readyz [env: PQMIG_METRICS_ADDR]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Args)]
pub struct JobSpecArgs {
    /// wrappers, signatures or hashes
    #[arg(long)]
    pub scope: String,
    /// Target encryption policy, by name or id
    #[arg(long)]
    pub policy: Option<String>,
    /// Target algorithm, by alias (e.g. ML-KEM-768) or id
    #[arg(long)]
    pub algo: Option<String>,
    /// Selection as JSON, or @FILE to read it from a file
    #[arg(long)]
    pub selection: Option<String>,
    /// Start no earlier than this RFC 3339 time
    #[arg(long, conflicts_with = "in_")]
    pub at: Option<String>,
    /// Start after this duration (e.g. 10m)
    #[arg(long = "in", id = "in_")]
    pub in_: Option<String>,
    /// Higher runs first
    #[arg(long, default_value_t = 0)]
    pub priority: i16,
    /// users.id of whoever asked for the job
    #[arg(long)]
    pub created_by: Option<i64>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub spec: JobSpecArgs,
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One job's details instead of the list
    pub job: Option<i64>,
    /// Refresh until the job(s) finish: progress bars on a terminal, one
    /// line per job and refresh otherwise (JSON lines with --json)
    #[arg(long)]
    pub watch: bool,
    /// How often --watch refreshes (at least 100ms)
    #[arg(long, default_value = "1s", requires = "watch", value_parser = watch_interval)]
    pub interval: std::time::Duration,
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
}

/// `--interval`: a humantime duration, at least 100ms so a watch cannot
/// turn into a busy loop of queries.
fn watch_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(100) {
        return Err(format!("{s} is shorter than 100ms"));
    }
    Ok(d)
}

#[derive(Debug, Args)]
pub struct JobArg {
    /// Job id
    pub job: i64,
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create keys in the keyring file (mode 0600).
    Generate(KeysGenerateArgs),
    /// Create a signing key (a signing_keys row, private key sealed under a KEK).
    Signing(KeysSigningArgs),
}

#[derive(Debug, Args)]
pub struct KeysGenerateArgs {
    /// AES-256-GCM, X25519, ML-KEM-768, ML-KEM-1024, X-Wing, HMAC-SHA-256, ...
    #[arg(long)]
    pub algorithm: String,
    /// Reference of the new key, e.g. local:pq-a
    #[arg(long = "ref")]
    pub key_ref: String,
    /// Also register kms_providers / kms_keys rows
    #[arg(long)]
    pub register: bool,
}

#[derive(Debug, Args)]
pub struct KeysSigningArgs {
    /// ML-DSA-65, ML-DSA-44, ML-DSA-87, SLH-DSA-SHA2-128s, SLH-DSA-SHA2-128f, Ed25519, ECDSA-P256
    #[arg(long)]
    pub algorithm: String,
    /// Unique name of the key
    #[arg(long)]
    pub name: String,
    /// The AES-256-GCM key that seals the private key: a kms_keys id or
    /// its external_key_ref (e.g. local:kek-signing)
    #[arg(long)]
    pub kek: String,
    /// Only countersign rows of this subject_table (signing_keys.scope)
    #[arg(long)]
    pub scope: Option<String>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo database afterwards instead of dropping it
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// wrappers, signatures or hashes
    #[arg(long)]
    pub scope: String,
    /// Items to seed
    #[arg(long, default_value_t = 10_000)]
    pub items: u64,
    /// PQ layers per wrapper
    #[arg(long)]
    pub layers: Option<u32>,
    /// Target algorithm alias
    #[arg(long)]
    pub algo: Option<String>,
}

impl Cli {
    fn overrides(&self) -> FlagOverrides {
        let g = &self.global;
        let (concurrency, metrics_addr) = match &self.command {
            Command::Run(r) => (r.concurrency, r.metrics_addr.clone()),
            _ => (None, None),
        };
        FlagOverrides {
            config: g.config.clone(),
            database_url: g.database_url.clone(),
            concurrency,
            metrics_addr,
            keyring: g.keyring.clone(),
            log_format: g.log_format.clone(),
            log_level: g.log_level.clone(),
        }
    }
}

/// Load the configuration from the process's environment and the flags.
pub fn load_config(cli: &Cli) -> Result<Config, crate::config::ConfigError> {
    let env = |name: &str| std::env::var(name).ok();
    Config::load(&Sources {
        flags: cli.overrides(),
        env: &env,
    })
}

/// Run one command to completion.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(&cli)?;
    telemetry::init(&config);
    match cli.command {
        Command::Migrate => migrate(&config).await,
        Command::Run(_) => run(&config).await,
        Command::Enqueue(a) => {
            let client = db::connect(&config.database).await?;
            db::migrate::check_current(&client).await?;
            crate::enqueue::run(&config, &client, &a).await
        }
        Command::Status(a) if a.watch => {
            let client = db::connect(&config.database).await?;
            db::migrate::check_current(&client).await?;
            crate::status::watch(&client, a.job, a.json, a.interval).await
        }
        Command::Status(a) => {
            let client = db::connect(&config.database).await?;
            db::migrate::check_current(&client).await?;
            crate::status::run(&client, a.job, a.json).await
        }
        Command::Cancel(a) => job_action(&config, a.job, "cancel").await,
        Command::Resume(a) => job_action(&config, a.job, "resume").await,
        Command::Plan(a) => {
            let client = db::connect(&config.database).await?;
            db::migrate::check_current(&client).await?;
            crate::plan::run(&config, &client, &a.spec, a.json).await
        }
        Command::Verify(a) => crate::aftercare::verify(&config, a.job).await,
        Command::Rollback(a) => crate::aftercare::rollback(&config, a.job).await,
        Command::PurgeBackups(a) => crate::aftercare::purge_backups(&config, a.job).await,
        Command::Inventory(a) => {
            let client = db::connect(&config.database).await?;
            db::migrate::check_current(&client).await?;
            crate::inventory::run(&client, a.json).await
        }
        Command::Keys(KeysCommand::Generate(a)) => keys_generate(&config, &a).await,
        Command::Keys(KeysCommand::Signing(a)) => keys_signing(&config, &a).await,
        Command::Demo(a) => {
            crate::demo::run(&config, &crate::demo::DemoOptions { keep: a.keep }).await
        }
        Command::Bench(a) => crate::bench::run(&config, &a).await,
    }
}

/// The daemon: schema check, then claim and work jobs until SIGTERM/SIGINT
/// (drain); a second signal exits at once.
async fn run(config: &Config) -> anyhow::Result<()> {
    let client = db::connect(&config.database).await?;
    db::migrate::check_current(&client).await?;
    drop(client);
    let services = crate::daemon::Services::from_config(config).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    watch_signals(shutdown.clone())?;
    crate::daemon::run(config, services, shutdown).await
}

/// First SIGTERM/SIGINT: drain. Second: exit now (open transactions roll
/// back when the connections drop).
fn watch_signals(shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("pqmig-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal = sig, "shutting down: finishing in-flight batches");
                    shutdown.cancel();
                } else {
                    eprintln!("pqmig: second signal, exiting now");
                    std::process::exit(1);
                }
            }
        })?;
    Ok(())
}

/// `cancel` and `resume`, with a confirmation of what happened.
async fn job_action(config: &Config, job: i64, action: &str) -> anyhow::Result<()> {
    use crate::db::jobs::{self, JobAction};
    let client = db::connect(&config.database).await?;
    db::migrate::check_current(&client).await?;
    let who = format!("cli:{}", whoami());
    let outcome = match action {
        "cancel" => jobs::job_cancel(&client, job, &who).await?,
        _ => jobs::job_resume(&client, job, &who).await?,
    };
    match outcome {
        JobAction::Done if action == "cancel" => {
            println!(
                "job {job} cancelled; a running worker stops at its next heartbeat, progress is kept"
            );
            Ok(())
        }
        JobAction::Done => {
            println!("job {job} re-queued; it continues from its cursor");
            Ok(())
        }
        JobAction::NotFound => Err(UsageError(format!("no job with id {job}")).into()),
        JobAction::WrongStatus(status) => {
            let allowed = if action == "cancel" {
                "pending or running"
            } else {
                "failed or cancelled"
            };
            Err(UsageError(format!(
                "job {job} is {status}; only {allowed} jobs can be {action}ed"
            ))
            .into())
        }
    }
}

/// `pqmig keys generate`: a new key in the keyring, optionally registered
/// as a `kms_keys` row of the local provider.
async fn keys_generate(config: &Config, a: &KeysGenerateArgs) -> anyhow::Result<()> {
    let path = config.keyring.as_ref().ok_or_else(|| {
        UsageError("no keyring path: set keys.keyring, PQMIG_KEYRING or --keyring".into())
    })?;
    let wraps = [
        "AES-256-GCM",
        "X25519",
        "ML-KEM-768",
        "ML-KEM-1024",
        "X-Wing",
    ];
    let canonical = wraps.iter().find(|w| w.eq_ignore_ascii_case(&a.algorithm));
    if a.register && canonical.is_none() {
        return Err(UsageError(format!(
            "--register is for wrapping keys ({}); {} keys are named elsewhere (hash_profiles.params.key_ref, signing_keys)",
            wraps.join(", "),
            a.algorithm
        ))
        .into());
    }
    // Connect before creating the key, so a bad database leaves no orphan key.
    let client = match a.register {
        true => {
            let c = db::connect(&config.database).await?;
            db::migrate::check_current(&c).await?;
            Some(c)
        }
        false => None,
    };
    let made = crate::keys::add_key(path, &a.key_ref, &a.algorithm).map_err(UsageError)?;
    println!("created {}", made.describe());
    if let (Some(c), Some(algorithm)) = (client, canonical) {
        let id = db::kms::kms_key_register(&c, &made.key_ref, "wrap", algorithm).await?;
        println!("registered as kms_keys id {id} (provider local, purpose wrap)");
    }
    Ok(())
}

/// `pqmig keys signing`: a signing_keys row, its private key sealed under
/// the KEK (SPEC §4).
async fn keys_signing(config: &Config, a: &KeysSigningArgs) -> anyhow::Result<()> {
    use crate::keys::signing::{SigningKeyError, create_signing_key};
    let path = config.keyring.as_ref().ok_or_else(|| {
        UsageError(
            "no keyring path: set keys.keyring, PQMIG_KEYRING or --keyring (it holds the KEK)"
                .into(),
        )
    })?;
    let keyring = crate::keys::LocalKeyring::load(path)?;
    let client = db::connect(&config.database).await?;
    db::migrate::check_current(&client).await?;
    let made = create_signing_key(
        &client,
        &keyring,
        &a.algorithm,
        &a.name,
        &a.kek,
        a.scope.as_deref(),
    )
    .await
    .map_err(|e| match e {
        SigningKeyError::Usage(m) => anyhow::Error::from(UsageError(m)),
        SigningKeyError::Db(e) => anyhow::anyhow!("database: {}", db::error_chain(&e)),
    })?;
    use sha2::Digest;
    let fp: String = sha2::Sha256::digest(&made.public_key)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!(
        "created signing key {} ({:?}, {}): public key {} bytes, SHA-256 {fp}; private key sealed under kms_keys id {}",
        made.id,
        a.name,
        made.alg.alias(),
        made.public_key.len(),
        made.kms_key_id
    );
    Ok(())
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let mut client = db::connect(&config.database).await?;
    let applied = db::migrate::apply(&mut client).await?;
    let version = db::migrate::current_version(&client).await?.unwrap_or(0);
    if applied.is_empty() {
        println!("schema is up to date (version {version})");
    } else {
        for m in &applied {
            println!("applied V{}__{}", m.version, m.name);
        }
        println!("schema is now at version {version}");
    }
    Ok(())
}
