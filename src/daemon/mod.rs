//! The worker daemon (SPEC §7): a producer claims due jobs and ranges of
//! running jobs into a bounded pool of executors, a rescuer returns expired
//! leases to the queue, a governor holds batches back while the database
//! is unhealthy, and a listener turns NOTIFYs into prompt wake-ups.
//!
//! - [`producer`]: claim loop (permit first, then claim at most the free
//!   slots: pending jobs to start, then pending ranges to walk).
//! - [`executor`]: one piece of work under its lease: starting a job
//!   (split into id ranges) or walking one range.
//! - [`leases`]: every lease of the process renewed in one statement.
//! - [`rescuer`]: expired leases back to `pending`, or `failed` at max_attempts.
//! - [`governor`]: database health and the items budget, for every walk.
//! - [`listener`]: LISTEN pqmig_jobs with reconnect; a hint, the poll is the truth.
//! - [`sampler`]: queue depth, pool and exposure gauges at a bounded rate;
//!   one replica at a time counts the exposure inventory for all.
//! - [`janitor`]: one replica at a time deletes finished jobs past the retention.
//! - [`keywatch`]: the keyring file read again when it changes.
//! - [`watchdog`]: systemd's WATCHDOG=1 while the claim loop ticks.
//!
//! Each long-running service is a struct with `run(self, token)` around
//! `run_once(&self)`, which tests call directly.
//!
//! Job states: `pending` → (claim) → `running` → `done` | `failed`;
//! `running` → (release, lease expiry) → `pending`; `pending`/`running` →
//! (operator) → `cancelled`; `failed`/`cancelled` → (resume) → `pending`.
//! A started job stays `running` without a lease of its own while its
//! ranges (`pending` → `running` → `done`, released and reclaimed like
//! jobs) are walked; the range that finishes last ends it.

pub mod executor;
pub mod governor;
pub mod janitor;
pub mod keywatch;
pub mod leases;
pub mod listener;
pub mod producer;
pub mod rescuer;
pub mod sampler;
pub mod watchdog;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConsoleListen, MaintenanceConfig, ThrottleConfig, WorkerConfig};
use crate::db::jobs::{self, Lease};
use crate::db::ranges::RangeLease;
use crate::http::Health;
use crate::metrics::Metrics;
use crate::scope::ScopeContext;

/// What this process's worker slots hold, by (job id, range; -1 for a job
/// being started).
pub type Registry = HashMap<(i64, i32), (Held, Signals)>;

/// What the lease keeper tells a holder.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// Cancelled when the lease is found gone.
    pub lost: CancellationToken,
    /// Cancelled when a pause covers the range's job.
    pub paused: CancellationToken,
}

/// A dedicated connection outside the pool (one for the claims, one for
/// the lease renewals): a pool held by slow batches cannot hold them up.
/// Opened on first use and again after it was lost or left a use
/// unanswered; one use at a time, each bounded in time.
pub struct Control {
    db: crate::config::DatabaseConfig,
    application_name: String,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Control {
    /// `purpose` ends its `application_name`: `pqmig <worker id> <purpose>`.
    pub fn new(db: &crate::config::DatabaseConfig, worker_id: &str, purpose: &str) -> Control {
        Control {
            db: db.clone(),
            application_name: format!("{} {worker_id} {purpose}", crate::db::APPLICATION_NAME),
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// Run `f` on the connection, (re)opened if there is none or it was
    /// closed. Opening and `f` together get `limit`: past it the
    /// connection is dropped (a peer gone silent, a proxy that never
    /// answers) and the next use opens a new one.
    pub async fn run<T>(
        &self,
        limit: Duration,
        f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, ServiceError> {
        let used = tokio::time::timeout(limit, async {
            let mut slot = self.client.lock().await;
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                *slot = None;
                let (client, connection) = crate::db::connect_raw(&self.db, &self.application_name)
                    .await
                    .map_err(|e| ServiceError::Connect(format!("{e:#}")))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
                *slot = Some(client);
            }
            let client = slot.as_ref().expect("opened above");
            Ok::<_, ServiceError>(f(client).await?)
        })
        .await;
        match used {
            Ok(r) => r,
            Err(_) => {
                *self.client.lock().await = None;
                Err(ServiceError::Connect(format!(
                    "no answer on the {} connection within {}; it is opened again",
                    self.application_name,
                    humantime::format_duration(limit)
                )))
            }
        }
    }
}

/// What every task of the daemon shares. Passed in, never global.
pub struct Shared {
    pub pool: Pool,
    pub worker: WorkerConfig,
    pub maintenance: MaintenanceConfig,
    pub worker_id: String,
    pub scope: ScopeContext,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// What this process's worker slots hold, by (job id, range; -1 for a
    /// job being started): its lease and what the lease keeper tells it.
    pub running: Mutex<Registry>,
    /// Makes the lease keeper renew now (a NOTIFY for a job we run means it
    /// may have been cancelled or reclaimed).
    pub renew_now: Notify,
    /// The claims' own connection.
    pub claims: Control,
    /// The lease renewals' own connection.
    pub renewals: Control,
    /// Stop claiming; in-flight batches commit, then jobs are released.
    pub shutdown: CancellationToken,
    pub throttle: ThrottleConfig,
    /// The sessions' `statement_timeout` (a read's time budget is a tenth).
    pub statement_timeout: Option<Duration>,
    /// The governor's word to every walk (see [`governor`]).
    pub brake: tokio::sync::watch::Sender<governor::Brake>,
    /// When a service of this process last failed to reach the database:
    /// the rescuer reclaims nothing for one lease after it (a holder cut
    /// off as long as we were gets to heartbeat first).
    pub db_trouble: Mutex<Option<Instant>>,
    /// `evidence.attest_dir`: attest each job this process ends `done`.
    pub attest_dir: Option<std::path::PathBuf>,
    /// The attestations being written (off the worker slots): a stop
    /// waits for them within `shutdown_timeout`.
    pub attestations: TaskTracker,
    /// The jobs whose attestation is being written, to name those a stop
    /// past its deadline leaves unwritten.
    pub attesting: Mutex<std::collections::BTreeSet<i64>>,
}

impl Shared {
    /// What the services of a daemon run on, outside [`run`]: tests drive
    /// one service's `run_once` with it.
    pub fn new(config: &Config, services: &Services, shutdown: CancellationToken) -> Shared {
        Shared {
            pool: services.pool.clone(),
            worker: config.worker.clone(),
            maintenance: config.maintenance.clone(),
            worker_id: services.worker_id.clone(),
            scope: services.scope.clone(),
            metrics: Arc::clone(&services.metrics),
            health: Arc::clone(&services.health),
            running: Mutex::new(HashMap::new()),
            renew_now: Notify::new(),
            claims: Control::new(&config.database, &services.worker_id, "claims"),
            renewals: Control::new(&config.database, &services.worker_id, "leases"),
            shutdown,
            throttle: config.throttle.clone(),
            statement_timeout: config.database.statement_timeout,
            brake: tokio::sync::watch::Sender::new(governor::Brake::default()),
            db_trouble: Mutex::new(None),
            attest_dir: config.attest_dir.clone(),
            attestations: TaskTracker::new(),
            attesting: Mutex::new(Default::default()),
        }
    }

    /// Note that the database could not be reached just now (`e` tells;
    /// a statement that merely failed is no trouble of ours).
    pub fn db_trouble(&self, e: &ServiceError) {
        if e.is_connection() {
            *self.db_trouble.lock().expect("db_trouble") = Some(Instant::now());
        }
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, ServiceError> {
        self.pool
            .get()
            .await
            .map_err(|e| ServiceError::Pool(crate::db::pool_error(&self.pool, &e)))
    }
}

/// What one worker slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A job being started (split into ranges), under its own lease.
    Job(Lease),
    /// One range of a split job.
    Range(RangeLease),
}

impl Held {
    pub fn job_id(&self) -> i64 {
        match self {
            Held::Job(l) => l.job_id,
            Held::Range(r) => r.job_id,
        }
    }

    /// Its key in [`Shared::running`].
    pub fn key(&self) -> (i64, i32) {
        match self {
            Held::Job(l) => (l.job_id, -1),
            Held::Range(r) => (r.job_id, r.range_no),
        }
    }

    fn token(&self) -> uuid::Uuid {
        match self {
            Held::Job(l) => l.token,
            Held::Range(r) => r.token,
        }
    }

    /// The lease as the keeper renews it.
    fn lease(&self) -> crate::db::leases::Held {
        let (job_id, range_no) = self.key();
        crate::db::leases::Held {
            job_id,
            range_no,
            token: self.token(),
        }
    }

    /// Hand it back without using an attempt (a drain past its deadline).
    async fn release(
        &self,
        c: &impl tokio_postgres::GenericClient,
        worker: &str,
        reason: &str,
    ) -> Result<bool, tokio_postgres::Error> {
        match *self {
            Held::Job(l) => jobs::job_release(c, l, worker, true, None, reason).await,
            Held::Range(r) => {
                crate::db::ranges::range_release(c, r, worker, true, None, reason).await
            }
        }
    }
}

/// Why a round of a service did not go through: logged, and retried at the
/// service's own pace.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No pooled connection (described with the pool's settings).
    #[error("{0}")]
    Pool(String),
    /// A dedicated connection could not be made or was lost.
    #[error("{0}")]
    Connect(String),
    #[error("{}", crate::db::error_chain(.0))]
    Database(#[from] tokio_postgres::Error),
}

impl ServiceError {
    /// The database could not be reached (no connection, a lost one, a
    /// server shutting down), as opposed to a statement that failed.
    pub fn is_connection(&self) -> bool {
        match self {
            ServiceError::Pool(_) | ServiceError::Connect(_) => true,
            ServiceError::Database(e) => {
                e.is_closed()
                    || e.code()
                        .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P"))
                    || e.code().is_none()
            }
        }
    }
}

/// The resources a daemon runs on, built by the caller (tests build their
/// own and bind port 0).
pub struct Services {
    pub pool: Pool,
    pub scope: ScopeContext,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Where /metrics, /healthz and /readyz are served (and the console,
    /// unless it has a listener of its own or is off).
    pub http: TcpListener,
    /// The console's own listener (`console.listen` set to an address).
    pub console: Option<TcpListener>,
    /// `locked_by` of the jobs this process claims; its connections show
    /// `pqmig <worker_id>` as application_name.
    pub worker_id: String,
}

impl Services {
    /// Pool, keyring path, fresh metrics, and the HTTP listener bound to
    /// `metrics.listen`.
    pub async fn from_config(config: &Config) -> anyhow::Result<Services> {
        let http = TcpListener::bind(config.metrics_listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "metrics.listen: cannot listen on {}: {e}",
                    config.metrics_listen
                )
            })?;
        let console =
            match config.console_listen {
                ConsoleListen::Own(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                    anyhow::anyhow!("console.listen: cannot listen on {addr}: {e}")
                })?),
                ConsoleListen::Metrics | ConsoleListen::Off => None,
            };
        let worker_id = worker_id();
        let application_name = format!("{} {worker_id}", crate::db::APPLICATION_NAME);
        Ok(Services {
            pool: crate::db::pool(&config.database, &application_name)?,
            scope: ScopeContext::of(config),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new(config.worker.poll_interval)),
            http,
            console,
            worker_id,
        })
    }
}

/// `host-pid-random`: unique per process, readable in `locked_by`.
pub fn worker_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let suffix: u32 = rand::random();
    format!("{host}-{}-{:06x}", std::process::id(), suffix & 0xff_ffff)
}

/// `d` scaled by a random factor in [1 - frac, 1 + frac].
pub fn jitter(d: Duration, frac: f64) -> Duration {
    let f = 1.0 + frac * (2.0 * rand::random::<f64>() - 1.0);
    d.mul_f64(f.max(0.0))
}

/// Run the daemon until `shutdown` is cancelled, then drain: in-flight
/// batches get `shutdown_timeout` to commit, their jobs go back to
/// `pending` without using up an attempt. The caller has checked the schema.
/// The effective configuration, one field per key (JSON logs keep them
/// apart). The URL is redacted (its password as ***), a password from a
/// file shows as ***, the keyring by path.
fn log_config(c: &Config) {
    let d = &c.database;
    let w = &c.worker;
    let t = &c.throttle;
    let m = &c.maintenance;
    let secs = |x: Option<Duration>| x.map(|x| humantime::format_duration(x).to_string());
    let dur = |x: Duration| humantime::format_duration(x).to_string();
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    tracing::info!(
        config_file = path(&c.file),
        database.url = d.url.as_ref().map(|u| u.to_string()),
        database.password = d.password.as_ref().map(|_| "***"),
        database.sslmode = %d.sslmode,
        database.sslrootcert = d.sslrootcert.is_some(),
        database.pool_size = d.pool_size.get(),
        database.connect_timeout = %dur(d.connect_timeout),
        database.statement_timeout = secs(d.statement_timeout),
        database.lock_timeout = secs(d.lock_timeout),
        database.idle_in_transaction_timeout = secs(d.idle_in_transaction_timeout),
        worker.concurrency = w.concurrency.get(),
        worker.poll_interval = %dur(w.poll_interval),
        worker.heartbeat_interval = %dur(w.heartbeat_interval),
        worker.lease = %dur(w.lease),
        worker.max_attempts = w.max_attempts.get(),
        worker.retry_backoff = %dur(w.retry_backoff),
        worker.retry_backoff_max = %dur(w.retry_backoff_max),
        worker.shutdown_timeout = %dur(w.shutdown_timeout),
        worker.batch_target = %dur(w.batch_target),
        worker.stall_timeout = %dur(w.stall_timeout),
        worker.range_items = w.range_items,
        throttle.max_replication_lag_bytes = t.max_replication_lag_bytes,
        throttle.max_transaction_age = secs(t.max_transaction_age),
        throttle.max_wal_bytes_per_second = t.max_wal_bytes_per_second,
        throttle.max_items_per_second = t.max_items_per_second,
        throttle.check_interval = %dur(t.check_interval),
        inventory.interval = %dur(m.inventory_interval),
        maintenance.retention = %dur(m.retention),
        maintenance.interval = %dur(m.interval),
        metrics.listen = %c.metrics_listen,
        console.listen = %c.console_listen,
        keys.keyring = path(&c.keyring),
        keys.pkcs11_module = c.pkcs11.as_ref().map(|p| p.module.display().to_string()),
        keys.pkcs11_pin_file = c.pkcs11.as_ref().map(|p| p.pin_file.display().to_string()),
        evidence.attest_dir = path(&c.attest_dir),
        "effective configuration"
    );
}

/// Let the attestations of jobs this process ended (some maybe during the
/// drain) be written before it stops, until `deadline`; those still being
/// written then are named in a warning and counted as failed (`pqmig
/// attest JOB` writes them later).
async fn finish_attestations(shared: &Shared, deadline: tokio::time::Instant) {
    shared.attestations.close();
    if shared.attestations.is_empty() {
        return;
    }
    let jobs: Vec<i64> = shared
        .attesting
        .lock()
        .expect("attesting")
        .iter()
        .copied()
        .collect();
    tracing::info!(
        ?jobs,
        "writing the attestations of jobs just done before stopping"
    );
    if tokio::time::timeout_at(deadline, shared.attestations.wait())
        .await
        .is_ok()
    {
        return;
    }
    // Taken off the set: one that ends after all is not counted again.
    let left: Vec<i64> = std::mem::take(&mut *shared.attesting.lock().expect("attesting"))
        .into_iter()
        .collect();
    tracing::warn!(
        jobs = ?left,
        "shutdown timeout reached; attestations not written (pqmig attest JOB writes one)"
    );
    shared
        .metrics
        .attestations
        .with_label_values(&["failed"])
        .inc_by(left.len() as u64);
}

pub async fn run(
    config: &Config,
    services: Services,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new(config, &services, shutdown.clone()));
    let http = services.http;
    let addr = http.local_addr()?;
    log_config(config);
    if let Some(host) = crate::db::unverified_remote_host(&config.database) {
        tracing::warn!(%host, sslmode = %config.database.sslmode, "the database server's certificate is not verified; use sslmode=verify-full with sslrootcert");
    }
    tracing::info!(worker = %shared.worker_id, concurrency = shared.worker.concurrency.get(), %addr, "pqmig daemon started");
    if let Some(console) = &services.console {
        tracing::info!(addr = %console.local_addr()?, "web console listening");
    }

    let wake = Arc::new(Notify::new());
    let background = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let mut app = crate::http::router(Arc::clone(&shared.metrics), Arc::clone(&shared.health));
    if config.console_listen == ConsoleListen::Metrics {
        app = app.merge(crate::console::router(Arc::clone(&shared)));
    }
    let server = tokio::spawn(crate::http::serve(http, app, http_stop.clone()));
    let console = services.console.map(|listener| {
        let app = crate::console::router(Arc::clone(&shared));
        tokio::spawn(crate::http::serve(listener, app, http_stop.clone()))
    });
    let listener = listener::Listener {
        db: config.database.clone(),
        shared: Arc::clone(&shared),
        wake: Arc::clone(&wake),
    };
    let listener = tokio::spawn(listener.run(background.clone()));
    let keeper = leases::Keeper {
        shared: Arc::clone(&shared),
    };
    let keeper = tokio::spawn(keeper.run(background.clone()));
    let rescuer = rescuer::Rescuer {
        shared: Arc::clone(&shared),
    };
    let rescuer = tokio::spawn(rescuer.run(background.clone()));
    let sampler = sampler::Sampler::new(Arc::clone(&shared), config.maintenance.inventory_interval);
    let sampler = tokio::spawn(sampler.run(background.clone()));
    let governor = governor::Governor::new(Arc::clone(&shared));
    let governor = tokio::spawn(governor.run(background.clone()));
    let janitor = janitor::Janitor {
        shared: Arc::clone(&shared),
    };
    let janitor = tokio::spawn(janitor.run(background.clone()));
    let keywatch = shared.scope.keyring.clone().map(|keyring| {
        let watch = keywatch::KeyWatch {
            keyring,
            every: keywatch::EVERY,
        };
        tokio::spawn(watch.run(background.clone()))
    });

    shared.health.tick();
    executor::slot_gauges(&shared, 0);
    let _ = sd_notify::notify(&[NotifyState::Ready]);
    // After READY=1: systemd expects no WATCHDOG=1 before it.
    let watchdog = watchdog::Watchdog {
        shared: Arc::clone(&shared),
        period: sd_notify::watchdog_enabled(),
    };
    let watchdog = tokio::spawn(watchdog.run(background.clone()));

    let tracker = TaskTracker::new();
    let producer = producer::Producer {
        shared: Arc::clone(&shared),
        slots: Arc::new(Semaphore::new(shared.worker.concurrency.get())),
        wake,
        tracker: tracker.clone(),
    };
    producer.run(shutdown.clone()).await;

    // Phase two: drain with a deadline.
    shared.health.draining.store(true, Ordering::Relaxed);
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    tracker.close();
    let deadline = tokio::time::Instant::now() + shared.worker.shutdown_timeout;
    let held = shared.running.lock().expect("registry").len();
    if held > 0 {
        tracing::info!(jobs = held, timeout = ?shared.worker.shutdown_timeout, "draining in-flight jobs");
    }
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout reached; releasing the jobs still held");
        let held: Vec<Held> = shared
            .running
            .lock()
            .expect("registry")
            .values()
            .map(|(h, _)| *h)
            .collect();
        // On the claims' connection: the pool may be held by the batches
        // that overran.
        let _ = shared
            .claims
            .run(shared.worker.lease, async |c| {
                for h in held {
                    // Each on its own: one that fails leaves the others to go.
                    let _ = h.release(c, &shared.worker_id, "shutdown timeout").await;
                }
                Ok(())
            })
            .await;
    }
    finish_attestations(&shared, deadline).await;
    background.cancel();
    let _ = tokio::join!(
        listener, keeper, rescuer, sampler, governor, janitor, watchdog
    );
    if let Some(keywatch) = keywatch {
        let _ = keywatch.await;
    }
    http_stop.cancel();
    let _ = server.await;
    if let Some(console) = console {
        let _ = console.await;
    }
    tracing::info!("pqmig daemon stopped");
    Ok(())
}
