//! The HTTP listener (`metrics.listen`): `/metrics` (Prometheus text),
//! `/healthz` (process and main loop alive; stays 200 while draining) and
//! `/readyz` (database reachable, schema current, claim loop ticking, not
//! draining; a JSON body names the failing checks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What the probes report, updated by the daemon's loops (never by a
/// probe: a probe only reads).
pub struct Health {
    started: Instant,
    last_tick_ms: AtomicU64,
    pub database_ok: AtomicBool,
    pub schema_ok: AtomicBool,
    pub draining: AtomicBool,
    /// The claim loop counts as stalled after this long without a tick.
    stall_after: Duration,
}

impl Health {
    pub fn new(poll_interval: Duration) -> Health {
        Health {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            // Unknown until the sampler's first round, which runs at start.
            database_ok: AtomicBool::new(false),
            schema_ok: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            stall_after: poll_interval * 3 + Duration::from_secs(10),
        }
    }

    /// The claim loop went round once.
    pub fn tick(&self) {
        self.last_tick_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the claim loop ticked within its stall limit.
    pub fn loop_alive(&self) -> bool {
        let last = Duration::from_millis(self.last_tick_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) <= self.stall_after
    }

    /// Names of the readiness checks that fail (empty: ready).
    pub fn failing(&self) -> Vec<&'static str> {
        let mut failing = Vec::new();
        if !self.database_ok.load(Ordering::Relaxed) {
            failing.push("database");
        }
        if !self.schema_ok.load(Ordering::Relaxed) {
            failing.push("schema");
        }
        if !self.loop_alive() {
            failing.push("claim_loop");
        }
        if self.draining.load(Ordering::Relaxed) {
            failing.push("draining");
        }
        failing
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(livez))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        s.metrics.render(),
    )
}

/// The process answers: nothing else (no database, no claim loop), so a
/// liveness probe on it never restarts pqmig for an outage elsewhere.
async fn livez() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let h = &s.health;
    if h.draining.load(Ordering::Relaxed) || h.loop_alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "claim loop stalled\n")
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let failing = s.health.failing();
    let (code, status) = if failing.is_empty() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    let body = serde_json::json!({"status": status, "failing": failing});
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

/// Serve until `stop` is cancelled (after the daemon drained, so probes
/// answer during the drain).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}
