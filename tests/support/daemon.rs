//! The daemon in this test process (`pqmig::daemon::run` on its own
//! runtime task), configured like a real replica, stopped on drop.

use tokio_util::sync::CancellationToken;

use super::hashes::Fixture;

/// An in-process daemon on the fixture's database; stops when dropped.
pub struct InProcess {
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
    /// Where its /metrics, /healthz and /readyz answer.
    pub addr: std::net::SocketAddr,
    /// The web console's own listener, when `console.listen` names one.
    pub console: Option<std::net::SocketAddr>,
}

/// A replica's configuration for `fx` (its daemon environment plus `extra`).
pub fn config(fx: &Fixture, extra: &[(&str, &str)]) -> pqmig::config::Config {
    let mut env: std::collections::HashMap<String, String> = fx.daemon_env().into_iter().collect();
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    let lookup = move |k: &str| env.get(k).cloned();
    pqmig::config::Config::load(&pqmig::config::Sources {
        flags: Default::default(),
        env: &lookup,
    })
    .expect("config")
}

impl InProcess {
    pub async fn start(fx: &Fixture, extra: &[(&str, &str)]) -> InProcess {
        InProcess::start_with(config(fx, extra)).await
    }

    /// A daemon with a configuration the test built (e.g. a
    /// `statement_timeout`, which has no environment variable).
    pub async fn start_with(config: pqmig::config::Config) -> InProcess {
        let services = pqmig::daemon::Services::from_config(&config)
            .await
            .expect("services");
        let addr = services.http.local_addr().expect("bound");
        let console = services
            .console
            .as_ref()
            .map(|l| l.local_addr().expect("bound"));
        let token = CancellationToken::new();
        let t = token.clone();
        let handle = tokio::spawn(async move {
            pqmig::daemon::run(&config, services, t)
                .await
                .expect("daemon");
        });
        InProcess {
            token,
            handle: Some(handle),
            addr,
            console,
        }
    }

    /// `pqmig_items_processed_total{scope}` as its /metrics says.
    pub async fn items_processed(&self, scope: &str) -> f64 {
        let (_, text) = crate::observe::http_get(self.addr, "/metrics").await;
        let series = format!("pqmig_items_processed_total{{scope=\"{scope}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }

    /// The value of one unlabelled counter or gauge its /metrics says.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = crate::observe::http_get(self.addr, "/metrics").await;
        let series = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("daemon task");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
