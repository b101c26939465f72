//! systemd's watchdog: WATCHDOG=1 every half watchdog period, but only
//! while the claim loop makes progress, so a wedged loop gets the process
//! restarted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use super::Shared;

pub struct Watchdog {
    pub shared: Arc<Shared>,
    /// `WatchdogSec` (from `WATCHDOG_USEC`); no pings without it.
    pub period: Option<Duration>,
}

impl Watchdog {
    /// Whether a ping is due now: the claim loop ticks, or the process is
    /// draining (a drain stops the loop on purpose). Sends it if so.
    pub fn run_once(&self) -> bool {
        let h = &self.shared.health;
        let healthy = h.loop_alive() || h.draining.load(Ordering::Relaxed);
        if healthy {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        } else {
            tracing::warn!("claim loop stalled; withholding the watchdog ping");
        }
        healthy
    }

    pub async fn run(self, token: CancellationToken) {
        let Some(period) = self.period else {
            return;
        };
        loop {
            self.run_once();
            tokio::select! {
                _ = tokio::time::sleep(period / 2) => {}
                _ = token.cancelled() => return,
            }
        }
    }
}
