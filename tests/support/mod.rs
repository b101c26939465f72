//! What the test modules share: a fresh database per test and the real
//! `pqmig` binary ([`db`]), the daemon in-process ([`daemon`]), the
//! fixtures of each scope ([`hashes`], [`wrappers`], [`signatures`]; all
//! three and the inventory's full-scan oracle in [`inventory`]), the
//! independent implementation the crypto is checked against ([`python`],
//! [`codec`]), and a primary with a streaming standby of its own
//! ([`standby`]).

#![allow(dead_code)]

pub mod codec;
pub mod daemon;
pub mod db;
pub mod hashes;
pub mod inventory;
pub mod kms;
pub mod kryoptic;
pub mod python;
pub mod signatures;
pub mod softhsm;
pub mod standby;
pub mod vault;
pub mod wrappers;

pub use codec::{b64, hex, unb64, unhex};
pub use daemon::InProcess;
pub use db::{TestDb, admin_url, connect, pqmig, run, stderr, stdout, url_for};

/// How many sessions of `c`'s database wait on a lock now.
pub async fn lock_waiters(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock'",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

/// Poll `cond` every 50 ms until it holds; panic naming `what` after `secs`.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {secs}s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
