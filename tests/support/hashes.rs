//! A database with users whose email hashes are on a legacy profile, a
//! keyring holding the new pepper, and helpers to queue hashes jobs and run
//! daemons (in-process or as real `pqmig run` processes).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{KeyInit, Mac, SimpleHmac as Hmac};
use serde_json::{Value, json};
use sha3::Sha3_256;

use crate::support::{TestDb, pqmig};

pub const PEPPER: [u8; 32] = [0x5a; 32];
pub const PROFILE: &str = "pepper-v2";

pub struct Fixture {
    pub db: TestDb,
    pub dir: tempfile::TempDir,
    pub keyring: PathBuf,
    pub algo_id: i64,
}

/// The expected onion of one stored hash, computed independently of pqmig.
pub fn expected_hash(old: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha3_256>::new_from_slice(&PEPPER).expect("key");
    mac.update(old);
    mac.finalize().into_bytes().to_vec()
}

pub fn legacy_hash(i: i64) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(format!("user{i}@example.org").as_bytes()).to_vec()
}

impl Fixture {
    /// `users` rows 1..=n with legacy hashes at version "v1".
    pub async fn new(n: i64) -> Fixture {
        Fixture::seed(TestDb::migrated().await, n).await
    }

    /// The same rows in `db`, whose schema is already migrated.
    pub async fn seed(db: TestDb, n: i64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let keyring = dir.path().join("keyring.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode(PEPPER);
        let doc = json!({"version": 1, "keys": [
            {"ref": "local:pepper-v2", "algorithm": "HMAC-SHA3-256", "secret": b64}
        ]});
        std::fs::write(&keyring, doc.to_string()).expect("write keyring");
        std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).expect("chmod");

        let c = db.client().await;
        c.batch_execute(
            "INSERT INTO hash_profiles (name, algo_id, output_len, params) \
               SELECT 'sha256-v1', algo_id, NULL, '{}' FROM crypto_standard_aliases WHERE alias = 'SHA-256'; \
             INSERT INTO hash_profiles (name, algo_id, output_len, params) \
               SELECT 'pepper-v2', algo_id, NULL, '{\"key_ref\": \"local:pepper-v2\"}' \
               FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256'; \
             INSERT INTO field_hash_policies (entity_table, field_name, profile_id, effective_from) \
               SELECT 'users', 'email_hash', id, now() - interval '1 year' FROM hash_profiles WHERE name = 'sha256-v1';",
        )
        .await
        .expect("profiles");
        let ids: Vec<i64> = (1..=n).collect();
        let hashes: Vec<Vec<u8>> = ids.iter().map(|&i| legacy_hash(i)).collect();
        c.execute(
            "INSERT INTO users (id, email_hash, email_hash_key_version) \
             SELECT i, h, 'v1' FROM unnest($1::bigint[], $2::bytea[]) AS x(i, h)",
            &[&ids, &hashes],
        )
        .await
        .expect("users");
        let algo_id: i64 = c
            .query_one(
                "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256'",
                &[],
            )
            .await
            .expect("algo")
            .get(0);
        Fixture {
            db,
            dir,
            keyring,
            algo_id,
        }
    }

    /// `users` rows 1..=n written by the server itself (millions in
    /// seconds), the same legacy hashes as [`Fixture::new`], at version
    /// `old_version` (an SQL expression of `i`), analyzed so the planner
    /// knows the table's size.
    pub async fn bulk(n: i64, old_version: &str) -> Fixture {
        let fx = Fixture::new(0).await;
        let c = fx.db.client().await;
        c.batch_execute(&format!(
            "INSERT INTO users (id, email_hash, email_hash_key_version) \
             SELECT i, sha256(convert_to('user' || i || '@example.org', 'UTF8')), {old_version} \
             FROM generate_series(1, {n}) AS g(i); \
             ANALYZE users;"
        ))
        .await
        .expect("bulk users");
        fx
    }

    /// How many of the users rows hold exactly the onion of their legacy
    /// hash with the version chain over `old_version` (as given to
    /// [`Fixture::bulk`]), checked by the server's pgcrypto (OpenSSL), and
    /// how many rows there are.
    pub async fn exact_rows(&self, old_version: &str) -> (i64, i64) {
        let c = self.db.client().await;
        c.batch_execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
            .await
            .expect("pgcrypto");
        let r = c
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE email_hash = hmac(sha256(convert_to('user' || id || '@example.org', 'UTF8')), $1, 'sha3-256') \
                                               AND email_hash_key_version = $2 || '/' || (SELECT {old_version} FROM (SELECT id AS i) x)), \
                            count(*) FROM users"
                ),
                &[&PEPPER.as_slice(), &PROFILE],
            )
            .await
            .expect("exact rows");
        (r.get(0), r.get(1))
    }

    /// A new active profile `name` of the HMAC `alias` whose pepper is
    /// named by `params`, cut to `output_len`: the algorithm's id.
    pub async fn profile(
        &self,
        name: &str,
        alias: &str,
        params: Value,
        output_len: Option<i16>,
    ) -> i64 {
        self.db
            .client()
            .await
            .query_one(
                "INSERT INTO hash_profiles (name, algo_id, output_len, params) \
                 SELECT $1, algo_id, $3, $4 FROM crypto_standard_aliases WHERE alias = $2 \
                 RETURNING algo_id",
                &[&name, &alias, &output_len, &params],
            )
            .await
            .expect("hash profile")
            .get(0)
    }

    /// Queue a hashes job over users.email_hash with extra selection keys.
    pub async fn enqueue(&self, extra: Value) -> i64 {
        let mut sel = json!({"table": "users", "column": "email_hash"});
        if let (Some(s), Some(e)) = (sel.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        self.enqueue_raw(Some(self.algo_id), sel).await
    }

    pub async fn enqueue_raw(&self, algo_id: Option<i64>, selection: Value) -> i64 {
        self.db
            .client()
            .await
            .query_one(
                "INSERT INTO pq_migration_jobs (scope, target_algo_id, selection) VALUES ('hashes', $1, $2) RETURNING id",
                &[&algo_id, &selection],
            )
            .await
            .expect("enqueue")
            .get(0)
    }

    /// The daemon's environment: short intervals so leases expire quickly,
    /// and a server-side limit on idle transactions so a stopped process
    /// cannot hold row locks for ever.
    pub fn daemon_env(&self) -> Vec<(String, String)> {
        let sep = if self.db.url.contains('?') { '&' } else { '?' };
        let url = format!(
            "{}{sep}options=-c%20idle_in_transaction_session_timeout%3D1000",
            self.db.url
        );
        vec![
            ("DATABASE_URL".into(), url),
            ("PQMIG_KEYRING".into(), self.keyring.display().to_string()),
            ("PQMIG_POLL_INTERVAL".into(), "200ms".into()),
            ("PQMIG_HEARTBEAT_INTERVAL".into(), "250ms".into()),
            ("PQMIG_LEASE".into(), "1500ms".into()),
            ("PQMIG_RESCUE_INTERVAL".into(), "300ms".into()),
            ("PQMIG_SHUTDOWN_TIMEOUT".into(), "10s".into()),
            ("PQMIG_LOG_FORMAT".into(), "json".into()),
            ("PQMIG_LOG".into(), "info".into()),
            ("PQMIG_METRICS_ADDR".into(), "127.0.0.1:0".into()),
        ]
    }

    /// A real `pqmig run` process; its stderr goes to `<dir>/<name>.log`.
    pub fn spawn_daemon(&self, name: &str, extra: &[(&str, &str)]) -> Child {
        let log =
            std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log file");
        let env = self.daemon_env();
        let mut envs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        envs.extend_from_slice(extra);
        pqmig(&["run"], &envs)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pqmig run")
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A job's item errors, (item id, code, message) in item order.
    pub async fn item_errors(&self, job: i64) -> Vec<(i64, String, String)> {
        self.db
            .client()
            .await
            .query(
                "SELECT item_id::bigint, error_code, message FROM pq_migration_item_errors \
                 WHERE job_id = $1 ORDER BY item_id::bigint",
                &[&job],
            )
            .await
            .expect("item errors")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    pub async fn job(&self, id: i64) -> JobRow {
        let r = self
            .db
            .client()
            .await
            .query_one(
                "SELECT status, processed_count, failed_count, error, attempts, total_count, result \
                 FROM pq_migration_jobs WHERE id = $1",
                &[&id],
            )
            .await
            .expect("job row");
        JobRow {
            status: r.get(0),
            processed: r.get(1),
            failed: r.get(2),
            error: r.get(3),
            attempts: r.get(4),
            total: r.get(5),
            result: r.get(6),
        }
    }

    /// Poll until the job satisfies `pred`, or panic after `secs`.
    pub async fn wait_job(&self, id: i64, secs: u64, pred: impl Fn(&JobRow) -> bool) -> JobRow {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let j = self.job(id).await;
            if pred(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not reach the expected state in {secs}s: {j:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many `event` rows the job has in its event log.
    pub async fn events(&self, id: i64, event: &str) -> i64 {
        self.db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM pq_migration_job_events WHERE job_id = $1 AND event = $2",
                &[&id, &event],
            )
            .await
            .expect("events")
            .get(0)
    }

    /// The job's event log, one line per event (for assertion messages).
    pub async fn event_log(&self, id: i64) -> String {
        self.db
            .client()
            .await
            .query(
                "SELECT format('%s %s %s %s', created_at::time, event, worker, detail) \
                 FROM pq_migration_job_events WHERE job_id = $1 ORDER BY id",
                &[&id],
            )
            .await
            .expect("events")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every user row: (id, hash, version).
    pub async fn users(&self) -> Vec<(i64, Vec<u8>, String)> {
        self.db
            .client()
            .await
            .query(
                "SELECT id, email_hash, email_hash_key_version FROM users ORDER BY id",
                &[],
            )
            .await
            .expect("users")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// Each row migrated exactly once: one new link, hash = onion(legacy).
    pub async fn assert_all_migrated_once(&self) {
        for (id, hash, version) in self.users().await {
            assert_eq!(version, format!("{PROFILE}/v1"), "user {id}: version chain");
            assert_eq!(hash, expected_hash(&legacy_hash(id)), "user {id}: hash");
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub status: String,
    pub processed: i64,
    pub failed: i64,
    pub error: Option<String>,
    pub attempts: i32,
    pub total: Option<i64>,
    pub result: Option<Value>,
}

pub fn terminal(j: &JobRow) -> bool {
    matches!(j.status.as_str(), "done" | "failed" | "cancelled")
}

/// SIGTERM, then the drained daemon must exit 0.
pub fn terminate(child: &mut Child) {
    signal(child, libc::SIGTERM);
    let status = child.wait().expect("wait");
    assert!(status.success(), "daemon exit after SIGTERM: {status:?}");
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and still own.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

/// The pepper must never reach a log line, in any encoding.
pub fn assert_no_secret(log: &str) {
    assert!(!log.is_empty(), "the log was captured");
    assert_absent(log, &[PEPPER.to_vec()]);
}

/// None of `secrets` appears in `log` in hex or base64, whole or by its
/// first 16 characters.
pub fn assert_absent(log: &str, secrets: &[Vec<u8>]) {
    use base64::Engine;
    for s in secrets {
        let b64 = base64::engine::general_purpose::STANDARD.encode(s);
        let hex: String = s.iter().map(|b| format!("{b:02x}")).collect();
        for needle in [b64.as_str(), &b64[..16], hex.as_str(), &hex[..16]] {
            assert!(!log.contains(needle), "secret material in the log");
        }
    }
}
