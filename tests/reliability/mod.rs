//! Reliability under faults (issue #9): a mixed queue of all three scopes
//! worked by real `pqmig run` processes while replicas are killed, paused
//! or cut off from the database, and while another session holds row locks.
//! Every test ends with the same invariants: each item migrated exactly
//! once (or untouched and accounted for), processed_count exact and
//! re-verified by `pqmig verify`, every DEK recoverable and equal to the
//! original, every job terminal, and no secret in any daemon log.
//!
//! `replicas`: replicas killed, paused or cut off, and row locks held
//! elsewhere; `server`: the server down, its connections exhausted;
//! `input`: hostile selections and concurrent application writes.

use std::process::Child;
use std::time::{Duration, Instant};

use pqmig::crypto::kem::Kem;
use pqmig::crypto::sig::SigAlg;
use pqmig::sample::{SampleKeys, SignatureSeed};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::support::hashes::{Fixture, PEPPER, signal, terminal};
use crate::support::wrappers::WrapFx;

mod input;
mod replicas;
mod server;

const USERS: i64 = 600;
const WRAPPERS: i64 = 300;
const SIGNED: i64 = 200;

/// One job of the mixed queue and the items it must end with.
#[derive(Debug, Clone, Copy)]
struct Queued {
    id: i64,
    scope: &'static str,
    items: i64,
}

/// A database holding legacy data of all three scopes, one keyring with
/// every key, a queue of slow multi-batch jobs, and the daemons' logs.
struct Mixed {
    w: WrapFx,
    sig: SignatureSeed,
    jobs: Vec<Queued>,
    logs: Vec<String>,
}

impl Mixed {
    /// Seeds the data and queues 3 hashes, 2 wrappers and 2 signatures
    /// jobs over disjoint id ranges, throttled so they span several seconds.
    async fn new() -> Mixed {
        let mut m = Mixed::seeded().await;
        m.queue().await;
        m
    }

    /// The data of all three scopes and the keyring, no jobs.
    async fn seeded() -> Mixed {
        let fx = Fixture::new(USERS).await;
        let c = fx.db.client().await;
        let mut keys = SampleKeys::default();
        keys.add(
            "local:pepper-v2",
            "HMAC-SHA3-256",
            Zeroizing::new(PEPPER.to_vec()),
        );
        let seed = pqmig::sample::seed_wrappers(
            &c,
            &mut keys,
            "",
            WRAPPERS as usize,
            Kem::MlKem768,
            1,
            "pq-policy",
        )
        .await
        .expect("seed wrappers");
        let sig = pqmig::sample::seed_signatures(
            &c,
            &mut keys,
            "",
            SIGNED as usize,
            true,
            SigAlg::MlDsa65,
            "pq-sign",
        )
        .await
        .expect("seed signatures");
        std::fs::remove_file(&fx.keyring).expect("replace keyring");
        keys.write(&fx.keyring).expect("keyring");
        let w = WrapFx { fx, seed, keys };
        Mixed {
            w,
            sig,
            jobs: Vec::new(),
            logs: Vec::new(),
        }
    }

    async fn queue(&mut self) {
        let c = self.client().await;
        // (scope, jobs, items per job, batch_size, max_rate)
        for (scope, jobs, items, batch, rate) in [
            ("hashes", 3, 200, 20, 60),
            ("wrappers", 2, 150, 15, 50),
            ("signatures", 2, 100, 10, 40),
        ] {
            for k in 0..jobs {
                let mut sel = json!({"id_from": k * items + 1, "id_to": (k + 1) * items,
                                     "batch_size": batch, "max_rate": rate});
                let (policy, algo) = match scope {
                    "hashes" => {
                        sel["table"] = json!("users");
                        sel["column"] = json!("email_hash");
                        (None, Some(self.w.fx.algo_id))
                    }
                    "wrappers" => (Some(self.w.seed.policy_id), None),
                    _ => (None, Some(self.sig.target_algo_id)),
                };
                let id = enqueue(&c, scope, policy, algo, &sel).await;
                self.jobs.push(Queued { id, scope, items });
            }
        }
    }

    async fn client(&self) -> tokio_postgres::Client {
        self.w.fx.db.client().await
    }

    /// A `pqmig run` replica logging to `<name>.log`.
    fn spawn(&mut self, name: &str, extra: &[(&str, &str)]) -> Child {
        self.logs.push(name.to_owned());
        self.w.fx.spawn_daemon(name, extra)
    }

    async fn wait_all(&self, secs: u64) {
        for q in &self.jobs {
            self.w.fx.wait_job(q.id, secs, terminal).await;
        }
    }

    async fn count(&self, sql: &str, id: i64) -> i64 {
        self.client()
            .await
            .query_one(sql, &[&id])
            .await
            .expect(sql)
            .get(0)
    }

    /// Everything a replica could write, as stored: users, wrappers with
    /// their layers, signatures, backups and the job counters.
    async fn snapshot(&self) -> (Vec<(i64, Vec<u8>, String)>, Vec<String>, Vec<i64>) {
        let c = self.client().await;
        let mut counts = Vec::new();
        for sql in [
            "SELECT count(*) FROM signatures",
            "SELECT count(*) FROM pq_migration_backups_all",
            "SELECT COALESCE(sum(processed_count + failed_count), 0)::bigint FROM pq_migration_jobs",
        ] {
            counts.push(c.query_one(sql, &[]).await.expect(sql).get(0));
        }
        (self.w.fx.users().await, self.w.snapshot().await, counts)
    }

    /// The invariants of issue #9 over the whole database and every log.
    async fn assert_invariants(&self) {
        for q in &self.jobs {
            let j = self.w.fx.job(q.id).await;
            assert_eq!(
                (j.status.as_str(), j.processed, j.failed, j.error.as_deref()),
                ("done", q.items, 0, None),
                "{} job {}: {j:?}",
                q.scope,
                q.id
            );
            // The counters are the truth of the tables: one backup per
            // migrated item of this job (a countersignature id for
            // signatures), so nothing was counted twice or lost.
            let backups = self
                .count(
                    "SELECT count(DISTINCT item_id) FROM pq_migration_backups_all WHERE job_id = $1",
                    q.id,
                )
                .await;
            assert_eq!(backups, q.items, "{} job {} backups", q.scope, q.id);
            // And pqmig re-checks every item it migrated with the keys.
            let out = self.w.cli(&["verify", &q.id.to_string()]);
            assert!(
                out.status.success(),
                "verify {} job {}: {}",
                q.scope,
                q.id,
                crate::support::stderr(&out)
            );
        }
        self.w.fx.assert_all_migrated_once().await;
        self.w.assert_every_dek_intact().await;
        let c = self.client().await;
        let once: i64 = c
            .query_one(
                "SELECT count(*) FROM key_wrappers w WHERE w.wrap_version = 2 \
                   AND (SELECT count(*) FROM key_wrapper_layers l WHERE l.key_wrapper_id = w.id) = 1",
                &[],
            )
            .await
            .expect("wrappers")
            .get(0);
        assert_eq!(once, WRAPPERS, "every wrapper re-wrapped exactly once");
        let countersigned: i64 = c
            .query_one(
                "SELECT count(DISTINCT (subject_table, subject_pk, context)) FROM signatures \
                 WHERE algo_id = $1",
                &[&self.sig.target_algo_id],
            )
            .await
            .expect("countersignatures")
            .get(0);
        let total: i64 = c
            .query_one("SELECT count(*) FROM signatures", &[])
            .await
            .expect("signatures")
            .get(0);
        assert_eq!(
            (countersigned, total),
            (SIGNED, 2 * SIGNED),
            "one countersignature per source, none twice"
        );
        self.assert_no_secret_logged();
    }

    /// Every key of the keyring and every DEK must be absent from every
    /// daemon log.
    fn assert_no_secret_logged(&self) {
        let deks: Vec<Vec<u8>> = self.w.seed.deks.iter().map(|(_, d)| d.to_vec()).collect();
        let logs: String = self.logs.iter().map(|n| self.w.fx.log(n)).collect();
        assert_no_secret_in(&logs, &self.w.keys, &deks);
    }
}

/// Every key of `keys` and every one of `more`, in hex and base64 (whole
/// and a 16-character prefix), must be absent from `logs`.
fn assert_no_secret_in(logs: &str, keys: &SampleKeys, more: &[Vec<u8>]) {
    use base64::Engine;
    let doc: Value = serde_json::from_str(&keys.to_json()).expect("keyring json");
    let mut secrets: Vec<Vec<u8>> = doc["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k["secret"].as_str().expect("secret"))
                .expect("base64")
        })
        .collect();
    assert!(!secrets.is_empty());
    secrets.extend_from_slice(more);
    assert!(logs.contains("claimed job"), "the logs were captured");
    crate::support::hashes::assert_absent(logs, &secrets);
}

/// A replica's metrics address, from the start-up line of its JSON log.
fn metrics_addr(log: &std::path::Path) -> std::net::SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let addr = text.lines().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["message"] == "pqmig daemon started").then(|| v["addr"].as_str()?.parse().ok())?
        });
        if let Some(a) = addr {
            return a;
        }
        assert!(Instant::now() < deadline, "no start-up line: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Queue a job as a host application would: a plain INSERT.
async fn enqueue(
    c: &tokio_postgres::Client,
    scope: &str,
    policy: Option<i64>,
    algo: Option<i64>,
    selection: &Value,
) -> i64 {
    c.query_one(
        "INSERT INTO pq_migration_jobs (scope, target_policy_id, target_algo_id, selection) \
         VALUES ($1, $2, $3, $4) RETURNING id",
        &[&scope, &policy, &algo, selection],
    )
    .await
    .expect("enqueue")
    .get(0)
}

/// A small xorshift, seeded from the clock and printed, so a failing run
/// can be replayed with `PQMIG_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("PQMIG_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("reliability: PQMIG_TEST_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Kills every child still running when a test ends, passed or not.
struct Replicas(Vec<Child>);

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Replicas {
    /// SIGTERM each; a drained replica exits 0.
    fn stop(&mut self) {
        for c in &self.0 {
            signal(c, libc::SIGTERM);
        }
        for c in &mut self.0 {
            assert!(c.wait().expect("wait").success(), "replica exit");
        }
        self.0.clear();
    }
}
