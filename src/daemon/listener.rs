//! LISTEN pqmig_jobs on a dedicated connection. A notification wakes the
//! producer, and makes the lease keeper renew now when it names a job this
//! process runs (it may have been cancelled or reclaimed). It is only a hint: the jittered poll is the
//! truth, so a lost connection costs latency, never correctness.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::{ServiceError, Shared, jitter};
use crate::config::DatabaseConfig;

pub struct Listener {
    pub db: DatabaseConfig,
    pub shared: Arc<Shared>,
    /// Notified for every NOTIFY (and after a reconnect).
    pub wake: Arc<Notify>,
}

impl Listener {
    /// Reconnect with backoff until `token` is cancelled.
    pub async fn run(self, token: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = self.run_once(&token).await;
            self.shared.metrics.listener_connected.set(0);
            match result {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "LISTEN connection lost"),
            }
            // Jobs may have been queued while we were deaf.
            self.wake.notify_one();
            tokio::select! {
                _ = tokio::time::sleep(jitter(backoff, 0.2)) => {}
                _ = token.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// One connection's life: Ok when `token` is cancelled; Err when the
    /// connection failed or ended.
    pub async fn run_once(&self, token: &CancellationToken) -> Result<(), ServiceError> {
        let shared = &self.shared;
        let name = format!(
            "{} {} listen",
            crate::db::APPLICATION_NAME,
            shared.worker_id
        );
        let (client, mut connection) = crate::db::connect_raw(&self.db, &name)
            .await
            .map_err(|e| ServiceError::Connect(format!("{e:#}")))?;
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let listen = crate::db::jobs::jobs_listen(&client);
        tokio::pin!(listen);
        let mut listening = false;
        loop {
            tokio::select! {
                r = &mut listen, if !listening => {
                    r?;
                    listening = true;
                    shared.metrics.listener_connected.set(1);
                    tracing::debug!("listening on pqmig_jobs");
                    self.wake.notify_one();
                }
                msg = messages.next() => match msg {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if let Ok(id) = n.payload().parse::<i64>() {
                            let running = shared.running.lock().expect("registry");
                            if running.values().any(|(h, _)| h.job_id() == id) {
                                shared.renew_now.notify_one();
                            }
                        }
                        self.wake.notify_one();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(ServiceError::Connect("connection closed".into())),
                },
                _ = token.cancelled() => return Ok(()),
            }
        }
    }
}
