//! `pqmig run` (the daemon) and `pqmig migrate`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;

/// The daemon: wait for the database (a schema to migrate exits 1), then claim
/// and work jobs until SIGTERM/SIGINT (drain); a second signal exits at
/// once.
pub async fn run(config: &Config) -> anyhow::Result<()> {
    let services = crate::daemon::Services::from_config(config).await?;
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone())?;
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
/// back when the connections drop).
fn watch_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
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

/// `pqmig migrate`: apply what is missing, say what was applied.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
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
