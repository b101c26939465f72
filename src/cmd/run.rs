//! `pqmig run` (the daemon) and `pqmig migrate`.

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;

/// The daemon: schema check, then claim and work jobs until SIGTERM/SIGINT
/// (drain); a second signal exits at once.
pub async fn run(config: &Config) -> anyhow::Result<()> {
    drop(super::connect(config).await?);
    let services = crate::daemon::Services::from_config(config).await?;
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone())?;
    crate::daemon::run(config, services, shutdown).await
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
