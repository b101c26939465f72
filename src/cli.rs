//! The command line of SPEC §8.1: argument definitions (clap) and the
//! dispatch to [`crate::cmd`]. Nothing here does a command's work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cmd;
use crate::config::{Config, FlagOverrides, Sources};
use crate::telemetry;

pub use crate::cmd::exit_code;

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
    Migrate(MigrateArgs),
    /// Queue a migration job and print its id.
    Enqueue(EnqueueArgs),
    /// Show jobs, their progress, rate and ETA.
    Status(StatusArgs),
    /// Cancel a pending or running job (progress is kept).
    Cancel(JobArg),
    /// Re-queue a failed or cancelled job from where it stopped (--retry-failed: walk its failed items again too).
    Resume(ResumeArgs),
    /// Change a pending or running job: its max_rate (read again within a second) or priority.
    Set(SetArgs),
    /// Pause jobs (all, a scope's, a table's): no new claims, running walks give their ranges back after their batch.
    Pause(PauseArgs),
    /// Lift a pause made with `pqmig pause` (the same --scope/--table).
    Unpause(PauseTarget),
    /// Show what a job would do (matched items, estimated time) without queueing it.
    Plan(PlanArgs),
    /// Re-check every item a job migrated; exits non-zero on any mismatch.
    Verify(JobArg),
    /// Restore the previous values of every item a job migrated, from its backups.
    Rollback(JobArg),
    /// Delete a job's backups (after `pqmig verify`).
    PurgeBackups(JobArg),
    /// Items still on quantum-vulnerable crypto, by scope and algorithm (the daemon's latest count).
    Inventory(InventoryArgs),
    /// Manage keys of the local key provider.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The tamper-evident audit trail: `audit verify [JOB]` checks the events' hash chains.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Signed job attestations: `attest JOB` writes one; `attest verify FILE` and `attest prove FILE ITEM` check them.
    Attest(AttestArgs),
    /// Create a scratch database with sample data, migrate it end to end and show the result.
    Demo(DemoArgs),
    /// Measure items/s of a scope on a seeded scratch database.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Job id
    pub job: i64,
    /// Items/s for the whole job (shared by its walks), or `none` to lift it
    #[arg(long, value_name = "N|none", allow_hyphen_values = true)]
    pub max_rate: Option<String>,
    /// Higher runs first (claims of its ranges too)
    #[arg(long)]
    pub priority: Option<i16>,
}

/// What a pause covers: every job, or those of a scope and/or writing a table.
#[derive(Debug, Args)]
pub struct PauseTarget {
    /// Only jobs of this scope (wrappers, signatures or hashes)
    #[arg(long)]
    pub scope: Option<String>,
    /// Only jobs writing this table (a hashes job's selection.table;
    /// key_wrappers for wrappers, signatures for signatures)
    #[arg(long)]
    pub table: Option<String>,
}

impl From<PauseTarget> for cmd::pause::Target {
    fn from(t: PauseTarget) -> Self {
        cmd::pause::Target {
            scope: t.scope,
            table: t.table,
        }
    }
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub target: PauseTarget,
    /// Lift the pause by itself at this RFC 3339 time
    #[arg(long, conflicts_with = "for_")]
    pub until: Option<String>,
    /// Lift the pause by itself after this duration (e.g. 2h)
    #[arg(long = "for", id = "for_")]
    pub for_: Option<String>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Print the SQL of the pending migrations for a DBA to review or run,
    /// and apply nothing.
    #[arg(long)]
    pub print_ddl: bool,
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
pub struct EnqueueArgs {
    #[command(flatten)]
    pub spec: JobSpecArgs,
    /// Queue it even though a pending or running job of the same scope
    /// covers some of the same items (they would be walked twice)
    #[arg(long)]
    pub allow_overlap: bool,
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
pub struct ResumeArgs {
    /// Job id
    pub job: i64,
    /// Also walk the job's failed items (pq_migration_item_errors) again;
    /// those that now succeed no longer count as failed
    #[arg(long)]
    pub retry_failed: bool,
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InventoryArgs {
    /// Machine-readable output (the same as --format json)
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// text, json, or cyclonedx (a CycloneDX 1.6 CBOM)
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// The CBOM's serialNumber (urn:uuid:...); derived from its content by default
    #[arg(long, value_name = "URN")]
    pub serial: Option<String>,
    /// Count now instead of printing the daemon's latest snapshot
    #[arg(long)]
    pub exact: bool,
    /// Also list what is deprecated or disallowed by NIST IR 8547 on this date (YYYY-MM-DD)
    #[arg(long, value_name = "DATE")]
    pub as_of: Option<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AttestArgs {
    /// Job id (a done job)
    #[arg(required = true)]
    pub job: Option<i64>,
    /// Where the envelope goes (default pqmig-job-JOB.dsse.json); its leaves go to FILE.leaves
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<AttestCommand>,
}

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Check an attestation's signatures and the database against it (exit 1 naming each difference).
    Verify {
        /// The envelope (FILE.leaves beside it is used when present)
        file: PathBuf,
        /// Accept only signatures by this key id (sha256:HEX of the public key, pinned outside the database); repeatable
        #[arg(long = "trusted-key", value_name = "KEYID")]
        trusted: Vec<String>,
    },
    /// Print the Merkle inclusion proof of an item (exit 1, with its neighbours' proofs, when it is not in).
    Prove {
        /// The envelope
        file: PathBuf,
        /// Item id
        item: i64,
        /// Accept only signatures by this key id (sha256:HEX); repeatable
        #[arg(long = "trusted-key", value_name = "KEYID")]
        trusted: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the job events' hash chains and name the first broken link (exit 1).
    Verify(AuditVerifyArgs),
}

#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// Job id (default: every job)
    pub job: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create keys in the keyring file (mode 0600).
    Generate(KeysGenerateArgs),
    /// Create a signing key (a signing_keys row, private key sealed under a KEK).
    Signing(KeysSigningArgs),
    /// Every kms_keys row, its provider, and whether this process can use it (no secrets).
    List(JsonArg),
    /// Use every active kms_keys row's key once, harmlessly; exits 1 naming the first that fails.
    Check,
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
    /// Large-table mode (hashes): time to first batch, one job on 1 and on
    /// N replicas against N separate jobs, longest statement, WAL per item
    #[arg(long)]
    pub large: bool,
    /// Replicas of the large-table mode
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Wrappers: the same job with its legacy wraps in AWS KMS of this
    /// region (standard credentials and endpoint, e.g. AWS_ENDPOINT_URL_KMS)
    #[arg(long, value_name = "REGION")]
    pub kms_region: Option<String>,
    /// Wrappers: the same job with its legacy wraps in Vault / OpenBao
    /// transit at this location (`http(s)://host:port/mount`; token from
    /// VAULT_TOKEN)
    #[arg(long, value_name = "URL")]
    pub vault_location: Option<String>,
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
        Command::Migrate(a) => cmd::run::migrate(&config, a.print_ddl).await,
        Command::Run(_) => cmd::run::run(&config).await,
        Command::Enqueue(a) => cmd::enqueue::run(&config, &a.spec.into(), a.allow_overlap).await,
        Command::Status(a) => {
            let watch = a.watch.then_some(a.interval);
            cmd::status::run(&config, a.job, a.json, watch).await
        }
        Command::Cancel(a) => cmd::jobs::run(&config, a.job, cmd::jobs::Action::Cancel).await,
        Command::Resume(a) if a.retry_failed => cmd::jobs::retry_failed(&config, a.job).await,
        Command::Resume(a) => cmd::jobs::run(&config, a.job, cmd::jobs::Action::Resume).await,
        Command::Set(a) => cmd::jobs::set(&config, a.job, a.max_rate.as_deref(), a.priority).await,
        Command::Pause(a) => {
            let until = cmd::pause::Until {
                at: a.until,
                after: a.for_,
            };
            cmd::pause::pause(&config, &a.target.into(), &until).await
        }
        Command::Unpause(a) => cmd::pause::unpause(&config, &a.into()).await,
        Command::Plan(a) => cmd::plan::run(&config, &a.spec.into(), a.json).await,
        Command::Verify(a) => cmd::aftercare::verify(&config, a.job).await,
        Command::Rollback(a) => cmd::aftercare::rollback(&config, a.job).await,
        Command::PurgeBackups(a) => cmd::aftercare::purge_backups(&config, a.job).await,
        Command::Inventory(a) => {
            let format = match (a.json, a.format.as_deref()) {
                (true, _) => cmd::inventory::Format::Json,
                (false, None) => cmd::inventory::Format::Text,
                (false, Some(f)) => f.parse().map_err(cmd::usage)?,
            };
            let opts = cmd::inventory::Options {
                format,
                exact: a.exact,
                as_of: a.as_of,
                serial: a.serial,
            };
            cmd::inventory::run(&config, &opts).await
        }
        Command::Attest(a) => match a.command {
            Some(AttestCommand::Verify { file, trusted }) => {
                cmd::attest::verify(&config, &file, &trusted).await
            }
            Some(AttestCommand::Prove {
                file,
                item,
                trusted,
            }) => cmd::attest::prove(&config, &file, item, &trusted).await,
            None => {
                let job = a.job.ok_or_else(|| cmd::usage("attest: give a job id"))?;
                cmd::attest::attest(&config, job, a.out).await
            }
        },
        Command::Audit(AuditCommand::Verify(a)) => cmd::audit::verify(&config, a.job).await,
        Command::Keys(KeysCommand::Generate(a)) => {
            let key = cmd::keys::NewKey {
                algorithm: a.algorithm,
                key_ref: a.key_ref,
                register: a.register,
            };
            cmd::keys::generate(&config, &key).await
        }
        Command::Keys(KeysCommand::Signing(a)) => {
            let key = cmd::keys::NewSigningKey {
                algorithm: a.algorithm,
                name: a.name,
                kek: a.kek,
                scope: a.scope,
            };
            cmd::keys::signing(&config, &key).await
        }
        Command::Keys(KeysCommand::List(a)) => cmd::keys::list(&config, a.json).await,
        Command::Keys(KeysCommand::Check) => cmd::keys::check(&config).await,
        Command::Demo(a) => cmd::demo::run(&config, &cmd::demo::DemoOptions { keep: a.keep }).await,
        Command::Bench(a) => {
            let opts = cmd::bench::BenchOptions {
                scope: a.scope,
                items: a.items,
                layers: a.layers,
                algo: a.algo,
                large: a.large,
                replicas: a.replicas,
                kms_region: a.kms_region,
                vault_location: a.vault_location,
            };
            cmd::bench::run(&config, &opts).await
        }
    }
}

impl From<JobSpecArgs> for cmd::enqueue::JobRequest {
    fn from(a: JobSpecArgs) -> Self {
        cmd::enqueue::JobRequest {
            scope: a.scope,
            policy: a.policy,
            algo: a.algo,
            selection: a.selection,
            at: a.at,
            in_: a.in_,
            priority: a.priority,
            created_by: a.created_by,
        }
    }
}
