//! A primary and a streaming standby of their own for one test, to make
//! replication lag on purpose: the installed server's initdb starts the
//! primary on a free loopback port (trust for loopback and the Unix
//! socket, a physical replication slot), `pg_basebackup -R` copies it into
//! a standby on another free port, and the test pauses the standby's replay
//! (`pg_wal_replay_pause()`) while it writes on the primary. Both run as
//! the `postgres` user when the tests run as root, like the TLS cluster
//! (`crate::pgcluster`, whose helpers these are). Stopped and removed when
//! the value is dropped, pass or fail; a run killed outright leaves its
//! pair behind, and the next pair started stops and removes it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::db::{TestDb, connect, url_for};
use crate::pgcluster::{
    append, bindir, chown_to, free_port, pg_command, rand_hex, remove_stale, run, server_user,
};

const DIR_PREFIX: &str = "pqmig-standby-";
/// The data directories under the pair's temporary directory.
const PRIMARY: &str = "primary";
const STANDBY: &str = "standby";
/// The physical replication slot the standby streams from.
const SLOT: &str = "pqmig_standby";

pub struct Replicated {
    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the primary, as a
    /// superuser (trust).
    pub primary_url: String,
    /// The standby, read-only, the same way.
    pub standby_url: String,
    /// The temporary directory: both data directories, sockets, logs.
    root: PathBuf,
    bin: PathBuf,
    /// The server user when the tests run as root (initdb refuses root).
    run_as: Option<&'static str>,
}

impl Replicated {
    /// A primary on a free loopback port and a streaming standby of it
    /// (`pg_basebackup -R`) on another, both started; returns once
    /// `pg_stat_replication` on the primary shows the standby streaming.
    pub async fn start() -> Replicated {
        let pair = tokio::task::spawn_blocking(Replicated::create)
            .await
            .expect("standby pair setup thread")
            .unwrap_or_else(|e| panic!("standby pair: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let streaming = pair
                .primary()
                .await
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication \
                     WHERE state = 'streaming' AND replay_lsn IS NOT NULL",
                    &[],
                )
                .await
                .expect("read pg_stat_replication")
                .is_some();
            if streaming {
                return pair;
            }
            assert!(
                Instant::now() < deadline,
                "the standby is not streaming within 30s\n{}",
                pair.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The blocking part of `start`: both clusters made and started.
    fn create() -> Result<Replicated, String> {
        let bin = bindir()?;
        let (run_as, ids) = server_user()?;
        remove_stale(&bin, run_as, DIR_PREFIX, &[STANDBY, PRIMARY]);

        let root = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            rand_hex(4)
        ));
        std::fs::create_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        // From here on, dropping `pair` (an error returned) removes it all.
        let primary_port = free_port()?;
        let standby_port = loop {
            let port = free_port()?;
            if port != primary_port {
                break port;
            }
        };
        let pair = Replicated {
            primary_url: format!("postgres://postgres@127.0.0.1:{primary_port}/postgres"),
            standby_url: format!("postgres://postgres@127.0.0.1:{standby_port}/postgres"),
            root,
            bin,
            run_as,
        };
        std::fs::set_permissions(&pair.root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        chown_to(&pair.root, ids)?;
        pair.init(primary_port, standby_port)
            .map_err(|e| format!("{e}\n{}", pair.logs()))?;
        Ok(pair)
    }

    fn init(&self, primary_port: u16, standby_port: u16) -> Result<(), String> {
        let primary = self.root.join(PRIMARY);
        let standby = self.root.join(STANDBY);
        run(
            self.pg("initdb")
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
                .args(["--no-sync", "--no-instructions", "-D"])
                .arg(&primary),
            "initdb",
        )?;
        // Small and unsafe on purpose (a throwaway pair); the standby gets
        // the same file from pg_basebackup, so its settings are here too.
        let conf = format!(
            "\nport = {primary_port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 50\nshared_buffers = 32MB\n\
             wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\n\
             hot_standby = on\nwal_receiver_status_interval = 1s\n",
            self.root.display()
        );
        append(&primary.join("postgresql.conf"), &conf)?;
        std::fs::write(
            primary.join("pg_hba.conf"),
            "local all all trust\n\
             host all all 127.0.0.1/32 trust\n\
             local replication all trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )
        .map_err(|e| e.to_string())?;
        self.pg_ctl_start(PRIMARY)?;

        // -R writes primary_conninfo (this socket) and primary_slot_name;
        // -C -S makes the slot, so the primary keeps the WAL a paused
        // standby has not had yet.
        run(
            self.pg("pg_basebackup")
                .arg("-h")
                .arg(&self.root)
                .args(["-p", &primary_port.to_string(), "-U", "postgres"])
                .args(["-R", "-C", "-S", SLOT, "-X", "stream", "-c", "fast"])
                .args(["--no-sync", "-w", "-D"])
                .arg(&standby),
            "pg_basebackup",
        )?;
        append(
            &standby.join("postgresql.conf"),
            &format!("\nport = {standby_port}\n"),
        )?;
        self.pg_ctl_start(STANDBY)
    }

    /// One of the pair's server tools, as the server user, in `root`.
    fn pg(&self, tool: &str) -> std::process::Command {
        let mut cmd = pg_command(&self.bin, self.run_as, tool);
        cmd.current_dir(&self.root);
        cmd
    }

    fn pg_ctl_start(&self, data: &str) -> Result<(), String> {
        run(
            self.pg("pg_ctl")
                .args(["start", "-w", "-t", "30", "-D"])
                .arg(self.root.join(data))
                .arg("-l")
                .arg(self.log(data)),
            &format!("pg_ctl start ({data})"),
        )
    }

    fn log(&self, data: &str) -> PathBuf {
        self.root.join(format!("{data}.log"))
    }

    /// Both server logs, for a failure's message.
    fn logs(&self) -> String {
        [PRIMARY, STANDBY]
            .iter()
            .map(|data| {
                let text = std::fs::read_to_string(self.log(data)).unwrap_or_default();
                format!("--- {data}.log\n{text}")
            })
            .collect()
    }

    /// A superuser connection to the primary's `postgres` database.
    pub async fn primary(&self) -> Client {
        connect(&self.primary_url).await
    }

    /// A superuser connection to the standby's `postgres` database.
    pub async fn standby(&self) -> Client {
        connect(&self.standby_url).await
    }

    /// A fresh database on the primary with pqmig's schema applied (so
    /// also on the standby once replayed); `url` is the primary's.
    pub async fn fresh_db(&self) -> TestDb {
        TestDb::migrated_on(&self.primary_url).await
    }

    /// The standby's URL for database `name` (read-only).
    pub fn standby_url_for(&self, name: &str) -> String {
        url_for(&self.standby_url, name)
    }

    /// `pg_wal_replay_pause()` on the standby; returns once replay is
    /// paused. It keeps receiving WAL, so the lag grows with every write.
    pub async fn pause_replay(&self) {
        let standby = self.standby().await;
        standby
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .expect("pg_wal_replay_pause");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state: String = standby
                .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
                .await
                .expect("pg_get_wal_replay_pause_state")
                .get(0);
            if state == "paused" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "standby replay not paused within 10s (state {state:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `pg_wal_replay_resume()` on the standby.
    pub async fn resume_replay(&self) {
        self.standby()
            .await
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .expect("pg_wal_replay_resume");
    }

    /// Bytes of WAL the standby has yet to replay, as the primary sees it:
    /// `pg_current_wal_lsn() - replay_lsn` from `pg_stat_replication`,
    /// the largest over standbys. The standby reports its replay position
    /// every second (`wal_receiver_status_interval`) and whenever WAL
    /// arrives. Panics when no standby is connected.
    pub async fn lag_bytes(&self) -> i64 {
        let lag: Option<i64> = self
            .primary()
            .await
            .query_one(
                "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint \
                 FROM pg_stat_replication",
                &[],
            )
            .await
            .expect("read pg_stat_replication")
            .get(0);
        lag.unwrap_or_else(|| panic!("no standby in pg_stat_replication\n{}", self.logs()))
    }

    /// Poll [`lag_bytes`](Self::lag_bytes) until it is below `bytes`;
    /// panic with the last value after `secs`.
    pub async fn wait_lag_below(&self, bytes: i64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let lag = self.lag_bytes().await;
            if lag < bytes {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replication lag still {lag} bytes (want < {bytes}) after {secs}s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `pg_ctl stop -m immediate`, and SIGKILL to its postmaster if that
    /// does not finish in 10 s.
    fn stop(&self, data: &str) {
        let dir = self.root.join(data);
        let pid_file = dir.join("postmaster.pid");
        let pid: Option<i32> = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
            .filter(|&pid| pid > 1);
        let Some(pid) = pid else { return };
        let stopped = self
            .pg("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
            .arg(&dir)
            .output()
            .is_ok_and(|out| out.status.success());
        if !stopped && pid_file.exists() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Replicated {
    fn drop(&mut self) {
        self.stop(STANDBY);
        self.stop(PRIMARY);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
