//! Test harness: a fresh database per test (dropped afterwards, so tests
//! run in parallel) and helpers to run the real `pqmig` binary.

#![allow(dead_code)]

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::{Client, NoTls};

pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server the suite runs against: `DATABASE_URL`, else the local one.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// `url` with its database name replaced.
pub fn url_for(url: &str, dbname: &str) -> String {
    let (head, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_start = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[authority_start..].find('/') {
        Some(slash) => &head[..authority_start + slash],
        None => head,
    };
    format!("{base}/{dbname}{query}")
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to test database: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own for one test; dropped (with its connections) when
/// the value goes out of scope, even if the test panics.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// The server's admin URL, which creates and drops the database.
    admin: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::new_on(&admin_url()).await
    }

    /// A fresh database on the server of `admin` (a superuser's URL).
    pub async fn new_on(admin: &str) -> TestDb {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .subsec_nanos();
        let name = format!(
            "pqmig_test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        connect(admin)
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        let url = url_for(admin, &name);
        TestDb {
            name,
            url,
            admin: admin.to_owned(),
        }
    }

    /// A fresh database with pqmig's schema applied.
    pub async fn migrated() -> TestDb {
        TestDb::migrated_on(&admin_url()).await
    }

    /// A fresh database with pqmig's schema applied, on the server of `admin`.
    pub async fn migrated_on(admin: &str) -> TestDb {
        let db = TestDb::new_on(admin).await;
        let mut client = db.client().await;
        pqmig::db::migrate::apply(&mut client)
            .await
            .expect("migrate");
        db
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on;
        // a thread with its own runtime does the async work.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                // The server may be gone already (a test's own cluster).
                let Ok((admin, conn)) = tokio_postgres::connect(&admin_url, NoTls).await else {
                    return;
                };
                tokio::spawn(conn);
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

/// The `pqmig` binary with an empty environment (so the developer's own
/// DATABASE_URL or config cannot leak in) plus `envs`.
pub fn pqmig(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pqmig"));
    cmd.env_clear().args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

pub fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    pqmig(args, envs).output().expect("spawn pqmig")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
