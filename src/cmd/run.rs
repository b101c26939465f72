//! `pqmig run` (the daemon) and `pqmig migrate`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;

/// The daemon: wait for the database (a schema to migrate exits 1), then claim
/// and work jobs until SIGTERM/SIGINT (drain); a second signal exits at
/// once. SIGHUP reads the keyring again.
pub async fn run(config: &Config) -> anyhow::Result<()> {
    let services = crate::daemon::Services::from_config(config).await?;
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone(), services.scope.keyring.clone())?;
    let Some(services) = wait_for_database(config, services, &shutdown).await? else {
        return Ok(());
    };
    crate::daemon::run(config, services, shutdown).await
}

/// The schema is missing or older than this build: not a wait.
fn schema_error(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<db::migrate::MigrateError>(),
        Some(db::migrate::MigrateError::Missing | db::migrate::MigrateError::Outdated { .. })
    )
}

/// First wait between attempts to reach the database; doubles (jittered)
/// up to [`WAIT_MAX`].
const WAIT_FIRST: Duration = Duration::from_secs(1);
const WAIT_MAX: Duration = Duration::from_secs(30);

/// Until the database answers: serve `/livez` (200), `/healthz` (200) and
/// `/readyz` (503 naming `database`) on
/// the metrics listener, tell systemd the service is up and keep its
/// watchdog fed (a database outage is no reason to restart pqmig), and try
/// again with backoff, one log line per attempt. `None`: shut down
/// meanwhile.
async fn wait_for_database(
    config: &Config,
    mut services: crate::daemon::Services,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<crate::daemon::Services>> {
    let why = match super::connect(config).await {
        Ok(_) => return Ok(Some(services)),
        // A schema to migrate needs an operator (`pqmig migrate`): say so
        // and exit, as before. Only an unreachable database is waited for.
        Err(e) if schema_error(&e) => return Err(e),
        Err(e) => e,
    };
    let health = Arc::clone(&services.health);
    health.database_ok.store(false, Ordering::Relaxed);
    // The same socket, served by a second handle while waiting; the daemon
    // serves the first once the database is there.
    let std = services.http.into_std()?;
    let waiting = tokio::net::TcpListener::from_std(std.try_clone()?)?;
    services.http = tokio::net::TcpListener::from_std(std)?;
    let addr = waiting.local_addr()?;
    let stop = CancellationToken::new();
    let app = crate::http::router(Arc::clone(&services.metrics), Arc::clone(&health));
    let server = tokio::spawn(crate::http::serve(waiting, app, stop.clone()));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled();
    let mut wait = WAIT_FIRST;
    let mut why = why;
    let ready = loop {
        tracing::warn!(error = %why, retry_in = ?wait, %addr, "waiting for the database; /livez answers, /readyz says why not ready");
        let until = tokio::time::Instant::now() + crate::daemon::jitter(wait, 0.2);
        // Liveness and the watchdog do not depend on the database.
        while tokio::time::Instant::now() < until {
            health.tick();
            if watchdog.is_some() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if shutdown.is_cancelled() {
            break false;
        }
        match super::connect(config).await {
            Ok(_) => break true,
            Err(e) if schema_error(&e) => {
                stop.cancel();
                let _ = server.await;
                return Err(e);
            }
            Err(e) => why = e,
        }
        wait = (wait * 2).min(WAIT_MAX);
    };
    stop.cancel();
    let _ = server.await;
    health.database_ok.store(true, Ordering::Relaxed);
    if !ready {
        return Ok(None);
    }
    tracing::info!("the database is there: starting");
    Ok(Some(services))
}

/// First SIGTERM/SIGINT: drain. Second: exit now (open transactions roll
/// back when the connections drop). SIGHUP: read the keyring now (the
/// keyring logs `keyring reloaded`, or why the file was refused).
fn watch_signals(
    shutdown: CancellationToken,
    keyring: Option<Arc<crate::keys::Keyring>>,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("pqmig-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                if sig == SIGHUP {
                    match &keyring {
                        Some(k) => {
                            let _ = k.reload();
                        }
                        None => tracing::info!("SIGHUP: no keyring configured, nothing to reload"),
                    }
                    continue;
                }
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

/// Tries of `pqmig migrate` when a statement waits too long for a table
/// lock (each waits `database.lock_timeout`, 10 s by default).
const MIGRATE_TRIES: u32 = 6;

/// `pqmig migrate`: apply what is missing, say what was applied. Every
/// statement waits at most `database.lock_timeout` (default 10 s) for a
/// table lock, so a busy host table never queues the application's
/// queries behind a migration; one that times out is rolled back whole and
/// tried again after 2 s, 4 s, … up to [`MIGRATE_TRIES`] times.
/// Unique indexes a migration would add to an existing host table are
/// built `CONCURRENTLY` first (see [`db::migrate::unique_builds`]).
/// `print_ddl`: print the pending SQL instead, those builds first.
pub async fn migrate(config: &Config, print_ddl: bool) -> anyhow::Result<()> {
    let mut client = db::connect(&config.database).await?;
    if print_ddl {
        let builds = db::migrate::unique_builds(&client).await?;
        if !builds.is_empty() {
            println!("-- Unique indexes on existing host tables, built first, each statement");
            println!("-- on its own outside a transaction (CONCURRENTLY: writes go on); the");
            println!("-- migrations below then find them and add no constraint.");
            for b in &builds {
                for sql in b.statements() {
                    println!("{sql};");
                }
            }
            println!();
        }
        let pending = db::migrate::pending(&client).await?;
        if pending.is_empty() {
            println!("-- the schema is up to date: nothing to apply");
        }
        for (version, name, sql) in pending {
            println!("-- V{version}__{name} (refinery runs each file in one transaction,");
            println!("-- then records it in {})", db::migrate::HISTORY_TABLE);
            println!("{}", sql.trim_end());
            println!();
        }
        return Ok(());
    }
    let wait = config
        .database
        .lock_timeout
        .unwrap_or(Duration::from_secs(10));
    let mut applied = Vec::new();
    let mut attempt = 1;
    loop {
        match db::migrate::apply_bounded(&mut client, Some(wait)).await {
            Ok(a) => {
                applied.extend(a);
                break;
            }
            Err(db::migrate::MigrateError::Busy(why)) if attempt < MIGRATE_TRIES => {
                let retry = Duration::from_secs(1 << attempt);
                eprintln!(
                    "pqmig: a migration waited {} for a table lock and was rolled back; trying again in {} ({attempt} of {MIGRATE_TRIES}): {why}",
                    humantime::format_duration(wait),
                    humantime::format_duration(retry)
                );
                tokio::time::sleep(retry).await;
                attempt += 1;
            }
            Err(db::migrate::MigrateError::Busy(why)) => {
                return Err(anyhow::anyhow!(
                    "migration gave up after {MIGRATE_TRIES} tries, each waiting {} for a table lock: a long transaction holds it (see pg_stat_activity); run again when it has ended ({why})",
                    humantime::format_duration(wait)
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
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
