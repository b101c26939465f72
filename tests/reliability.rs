//! Reliability under faults (issue #9): a mixed queue of all three scopes
//! worked by real `pqmig run` processes while replicas are killed, paused
//! or cut off from the database, and while another session holds row locks.
//! Every test ends with the same invariants: each item migrated exactly
//! once (or untouched and accounted for), processed_count exact and
//! re-verified by `pqmig verify`, every DEK recoverable and equal to the
//! original, every job terminal, and no secret in any daemon log.

use std::process::Child;
use std::time::{Duration, Instant};

use pqmig::crypto::kem::Kem;
use pqmig::crypto::sig::SigAlg;
use pqmig::sample::{SampleKeys, SignatureSeed};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::hashes_fixture::{Fixture, PEPPER, signal, terminal};
use crate::wrappers::WrapFx;

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
            "SELECT count(*) FROM pq_migration_backups",
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
                    "SELECT count(DISTINCT item_id) FROM pq_migration_backups WHERE job_id = $1",
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
                crate::common::stderr(&out)
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
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
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
    for s in &secrets {
        for needle in [b64(s), hex(s)] {
            assert!(
                !logs.contains(&needle) && !logs.contains(&needle[..16]),
                "secret material in a daemon log"
            );
        }
    }
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

/// Fault 1: three replicas work the mixed queue while a random one is
/// SIGKILLed at random moments (and replaced), six times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_random_replicas_of_a_mixed_queue_loses_nothing() {
    let mut m = Mixed::new().await;
    let mut rng = Rng::new();
    let mut r = Replicas(Vec::new());
    for i in 0..3 {
        let d = m.spawn(&format!("r{i}"), &[]);
        r.0.push(d);
    }
    let mut next = 3;
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while kills < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(900))).await;
        let victim = rng.below(3) as usize;
        signal(&r.0[victim], libc::SIGKILL);
        let _ = r.0[victim].wait();
        kills += 1;
        r.0[victim] = m.spawn(&format!("r{next}"), &[]);
        next += 1;
    }
    m.wait_all(90).await;
    // The kills landed mid-job: some leases had to be taken over.
    let c = m.client().await;
    let reclaimed: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_job_events WHERE event = 'reclaimed'",
            &[],
        )
        .await
        .expect("events")
        .get(0);
    assert!(reclaimed >= 1, "no kill hit a running job");
    m.assert_invariants().await;
    r.stop();
}

/// Fault 2: every connection of both replicas (pool and LISTEN) is
/// terminated by the server, repeatedly, mid-batch. They reconnect, finish,
/// and a job queued afterwards is picked up by a NOTIFY wake-up (polling is
/// set to a minute, so only LISTEN can be what wakes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_of_a_mixed_queue_reconnect_and_wake_ups_work() {
    let mut m = Mixed::new().await;
    let slow_poll = [("PQMIG_POLL_INTERVAL", "60s")];
    let mut r = Replicas(vec![m.spawn("a", &slow_poll), m.spawn("b", &slow_poll)]);
    let admin = crate::common::connect(&crate::common::admin_url()).await;
    let name = m.w.fx.db.name.clone();
    let kill = "SELECT pid, query FROM pg_stat_activity \
                WHERE datname = $1 AND application_name LIKE 'pqmig%' \
                  AND pg_terminate_backend(pid)";
    let mut listen_killed = false;
    let mut rng = Rng::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400 + rng.below(600))).await;
        let rows = admin.query(kill, &[&name]).await.expect("terminate");
        listen_killed |= rows
            .iter()
            .any(|row| row.get::<_, String>(1).starts_with("LISTEN"));
    }
    assert!(
        listen_killed,
        "a LISTEN connection was among the terminated"
    );
    m.wait_all(90).await;
    m.assert_invariants().await;

    // Idle now; the next job is found only through NOTIFY.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = m.w.fx.enqueue(json!({"id_from": 1, "id_to": 10})).await;
    let start = Instant::now();
    let j = m.w.fx.wait_job(id, 10, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "woken by NOTIFY, not the 60s poll"
    );
    r.stop();
}

/// Fault 4: a replica paused past its lease (SIGSTOP) while it holds jobs
/// of every scope is fenced out: another replica finishes them, and once
/// resumed the paused one writes nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_holding_every_scope_is_fenced_out() {
    let mut m = Mixed::new().await;
    let mut r = Replicas(vec![m.spawn("a", &[("PQMIG_CONCURRENCY", "8")])]);
    // Wait until it holds all seven jobs and has written to each.
    let all_running = m.jobs.iter().map(|q| q.id).collect::<Vec<_>>();
    for id in &all_running {
        m.w.fx.wait_job(*id, 30, |j| j.processed > 0).await;
    }
    signal(&r.0[0], libc::SIGSTOP);
    r.0.push(m.spawn("b", &[("PQMIG_CONCURRENCY", "8")]));
    m.wait_all(90).await;
    let before = m.snapshot().await;
    signal(&r.0[0], libc::SIGCONT);
    // Several heartbeats and batch attempts of the resumed process.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        m.snapshot().await == before,
        "the paused replica wrote after it resumed"
    );
    m.assert_invariants().await;
    r.stop();
    assert!(
        m.w.fx.log("a").contains("lease lost"),
        "{}",
        m.w.fx.log("a")
    );
}

/// Fault 6: another session holds row locks (idle in transaction) on rows
/// of the hashes and wrappers jobs for a few seconds. Batches that meet
/// them time out on lock_timeout, shrink and retry; nothing fails, and
/// once the transaction ends the batches grow back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_held_transaction_elsewhere_only_slows_the_jobs() {
    let mut m = Mixed::new().await;
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(
        config.path(),
        "[worker]\nbatch_target = \"200ms\"\nretry_backoff = \"300ms\"\n\
         [database]\nlock_timeout = \"200ms\"\n",
    )
    .expect("write config");
    let path = config.path().display().to_string();
    let mut holder = m.client().await;
    let tx = holder.transaction().await.expect("begin");
    tx.batch_execute(
        "SELECT 1 FROM users WHERE id BETWEEN 61 AND 70 FOR UPDATE; \
         SELECT 1 FROM key_wrappers WHERE id BETWEEN 31 AND 40 FOR UPDATE",
    )
    .await
    .expect("lock rows");
    let mut r = Replicas(vec![m.spawn("a", &[("PQMIG_CONFIG", path.as_str())])]);
    // The jobs reach the locked rows and wait there while the lock is held.
    let (h, w) = (m.jobs[0].id, m.jobs[3].id);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (jh, jw) = (m.w.fx.job(h).await, m.w.fx.job(w).await);
    assert!(
        jh.status == "running" && jh.processed < 70 && jw.status == "running" && jw.processed < 40,
        "held back by the lock: {jh:?} {jw:?}"
    );
    tx.rollback().await.expect("end the transaction");
    m.wait_all(90).await;
    m.assert_invariants().await;
    r.stop();
    // The job met lock timeouts, and its batches grew again afterwards.
    let log = m.w.fx.log("a");
    assert!(
        log.contains("lock timeout"),
        "a lock timeout was logged: {log}"
    );
    let sizes: Vec<i64> = m.w.fx.job(h).await.result.expect("result")["batch_sizes"]
        .as_array()
        .expect("batch_sizes")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    let smallest = sizes
        .iter()
        .position(|&s| s == *sizes.iter().min().unwrap())
        .unwrap();
    assert!(
        sizes[smallest] < 20 && sizes[smallest..].iter().any(|&s| s >= 20),
        "shrank at the lock and grew back: {sizes:?}"
    );
}

/// Hostile values for any key of a selection: wrong types, extremes, SQL
/// fragments, control and bidi characters, huge arrays, deep nesting.
fn hostile_value() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let text = prop::sample::select(vec![
        "users; DROP TABLE users; --".to_owned(),
        "' OR '1'='1".to_owned(),
        "email_hash\u{1}".to_owned(), // jsonb refuses \u0000 itself
        "\u{202e}hsah_liame".to_owned(),
        "users\"--".to_owned(),
        "pg_catalog.pg_authid".to_owned(),
        "users WHERE true".to_owned(),
        "$1".to_owned(),
        "line\nbreak".to_owned(),
        "\u{fffd}\u{feff}\u{7f}".to_owned(),
        String::new(),
        "x".repeat(5000),
    ]);
    let nest = (129usize..400, any::<bool>()).prop_map(|(depth, arrays)| {
        let mut v = json!(1);
        for _ in 0..depth {
            v = if arrays {
                json!([v])
            } else {
                json!({ "a": v })
            };
        }
        v
    });
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            json!(-1),
            json!(0),
            json!(i64::MIN),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(1e300),
            json!(0.5),
            json!("9223372036854775808"),
        ]),
        text.prop_map(Value::from),
        prop::collection::vec(any::<i64>(), 0..4).prop_map(Value::from),
        Just(Value::from((0..20_000).collect::<Vec<i64>>())),
        Just(json!([null, "1", 2.5, {"id": 1}])),
        nest,
    ]
}

/// A selection for `scope` with one to three hostile entries. `id_to` is
/// always a number up to 100, so whatever else the selection says, a
/// correct run touches no item with an id above 100.
fn hostile_selection(scope: &'static str) -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let keys = prop::sample::select(vec![
        "ids",
        "id_from",
        "limit",
        "batch_size",
        "max_rate",
        "dry_run",
        "max_failures",
        "table",
        "column",
        "version_column",
        "id_column",
        "from_algos",
        "subject_table",
        "context",
        "signing_key_ids",
        "kms_key_ids",
        "verify",
        "backup",
        "; DROP TABLE users",
        "__proto__",
        "\u{202e}ids",
        "",
    ]);
    let entries = prop::collection::vec((keys, hostile_value()), 1..4);
    (entries, -5i64..=100, any::<u8>()).prop_map(move |(entries, id_to, shape)| {
        if shape < 12 {
            // Not an object at all (a JSON null is "no selection", all
            // items, so it is not generated).
            return match entries.into_iter().next().map(|e| e.1) {
                Some(Value::Null) | None => json!([null]),
                Some(v) => v,
            };
        }
        let mut sel = match scope {
            "hashes" => json!({"table": "users", "column": "email_hash"}),
            _ => json!({}),
        };
        for (k, v) in entries {
            sel[k] = v;
        }
        sel["id_to"] = json!(id_to);
        sel
    })
}

/// Fault 7: generated hostile selections for every scope, run by a real
/// replica. Each job ends `failed` with one clean line naming the problem,
/// or `done`; the replica never panics and keeps claiming; no item with an
/// id above the selection's bound is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_selections_fail_cleanly_and_touch_nothing_outside_them() {
    use proptest::strategy::{Strategy, ValueTree};
    let mut m = Mixed::seeded().await;
    let c = m.client().await;
    let outside = format!(
        "SELECT concat( \
        (SELECT jsonb_agg(to_jsonb(u) ORDER BY id) FROM users u WHERE id > 100), \
        (SELECT jsonb_agg(to_jsonb(w) ORDER BY id) FROM key_wrappers w WHERE id > 100), \
        (SELECT jsonb_agg(to_jsonb(l) ORDER BY id) FROM key_wrapper_layers l WHERE key_wrapper_id > 100), \
        (SELECT jsonb_agg(to_jsonb(s) ORDER BY id) FROM signatures s WHERE id > 100 AND id <= {SIGNED}))"
    );
    let outside = outside.as_str();
    let before: String = c.query_one(outside, &[]).await.expect("snapshot").get(0);
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut jobs: Vec<(i64, &str, Value)> = Vec::new();
    for scope in ["hashes", "wrappers", "signatures"] {
        let strategy = hostile_selection(scope);
        for _ in 0..40 {
            let sel = strategy.new_tree(&mut runner).expect("generate").current();
            let (policy, algo) = match scope {
                "hashes" => (None, Some(m.w.fx.algo_id)),
                "wrappers" => (Some(m.w.seed.policy_id), None),
                _ => (None, Some(m.sig.target_algo_id)),
            };
            let id = enqueue(&c, scope, policy, algo, &sel).await;
            jobs.push((id, scope, sel));
        }
    }
    let mut r = Replicas(vec![m.spawn("h", &[])]);
    let bidi = |ch: char| matches!(ch, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    let (mut failed, mut too_deep) = (0, 0);
    for (id, scope, sel) in &jobs {
        let j = m.w.fx.wait_job(*id, 60, terminal).await;
        let shown: String = sel.to_string().chars().take(300).collect();
        match j.status.as_str() {
            "failed" => {
                failed += 1;
                let e = j.error.as_deref().unwrap_or("");
                too_deep +=
                    usize::from(e.starts_with("selection: unreadable JSON (recursion limit"));
                assert!(
                    !e.is_empty()
                        && e.len() <= 400
                        && !e.chars().any(|ch| ch.is_control() || bidi(ch)),
                    "{scope} job {id}: unclear error {e:?} for {shown}"
                );
            }
            "done" => assert!(
                j.processed + j.failed <= 100,
                "{scope} job {id} walked past its bound: {j:?} for {shown}"
            ),
            other => panic!("{scope} job {id} ended {other}: {j:?} for {shown}"),
        }
    }
    assert!(
        failed >= 60,
        "the generator produced mostly invalid jobs ({failed})"
    );
    assert!(
        too_deep >= 1,
        "deeply nested selections were generated and failed cleanly"
    );
    let after: String = c.query_one(outside, &[]).await.expect("snapshot").get(0);
    assert!(before == after, "a row outside every selection changed");
    let stray: i64 = c
        .query_one(
            "SELECT count(*) FROM signatures s JOIN signatures src \
               ON (src.subject_table, src.subject_pk, src.context) = (s.subject_table, s.subject_pk, s.context) \
             WHERE s.algo_id = $1 AND src.id > 100 AND src.id <= $2",
            &[&m.sig.target_algo_id, &SIGNED],
        )
        .await
        .expect("countersignatures")
        .get(0);
    assert_eq!(
        stray, 0,
        "a source outside the selections was countersigned"
    );
    assert!(
        r.0[0].try_wait().expect("wait").is_none(),
        "the replica is alive"
    );
    let log = m.w.fx.log("h");
    assert!(!log.contains("panicked"), "{log}");
    m.assert_no_secret_logged();
    r.stop();
}

/// Fault 3: the PostgreSQL server goes down for seven seconds mid-run (the
/// suite's own TLS cluster, taken exclusively, never the shared server).
/// Both replicas stay up, /readyz answers 503 naming the database during
/// the outage and 200 after it, and every job of every scope finishes with
/// each item migrated once, as `pqmig verify` confirms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_outage_mid_run_is_ridden_out() {
    use crate::pgcluster;
    let (cluster, _guard) = pgcluster::exclusive().await;
    let db = cluster.database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = cluster.password_file(dir.path());
    let ca = cluster.ca.display().to_string();
    let url = cluster.url(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let keyring = dir.path().join("keyring.json");
    let config = dir.path().join("pqmig.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"300ms\"\nretry_backoff_max = \"2s\"\n",
    )
    .expect("config");
    let pw_path = pw.display().to_string();
    let keyring_path = keyring.display().to_string();
    let config_path = config.display().to_string();
    let env: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", url.as_str()),
        ("PQMIG_DATABASE_PASSWORD_FILE", pw_path.as_str()),
        ("PQMIG_KEYRING", keyring_path.as_str()),
        ("PQMIG_CONFIG", config_path.as_str()),
        ("PQMIG_POLL_INTERVAL", "200ms"),
        ("PQMIG_HEARTBEAT_INTERVAL", "500ms"),
        ("PQMIG_LEASE", "20s"),
        ("PQMIG_RESCUE_INTERVAL", "1s"),
        ("PQMIG_LOG_FORMAT", "json"),
        ("PQMIG_METRICS_ADDR", "127.0.0.1:0"),
    ];
    let out = crate::common::run(&["migrate"], &env);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));

    // Legacy data of all three scopes, and a throttled job for each.
    let c = cluster.admin_to(&db).await;
    let mut keys = SampleKeys::default();
    keys.generate("local:pepper-v2", "HMAC-SHA3-256", 32);
    pqmig::db::demo::hashes_seed(&c, 300, "local:pepper-v2")
        .await
        .expect("users");
    let wrap = pqmig::sample::seed_wrappers(&c, &mut keys, "", 200, Kem::MlKem768, 1, "pq")
        .await
        .expect("wrappers");
    let sig = pqmig::sample::seed_signatures(&c, &mut keys, "", 120, true, SigAlg::MlDsa65, "s")
        .await
        .expect("signatures");
    keys.write(&keyring).expect("keyring");
    let hmac: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'HMAC-SHA3-256'",
            &[],
        )
        .await
        .expect("alias")
        .get(0);
    let mut jobs = Vec::new();
    for (scope, policy, algo, sel, items) in [
        (
            "hashes",
            None,
            Some(hmac),
            json!({"table": "users", "column": "email_hash", "batch_size": 20, "max_rate": 30}),
            300i64,
        ),
        (
            "wrappers",
            Some(wrap.policy_id),
            None,
            json!({"batch_size": 10, "max_rate": 20}),
            200,
        ),
        (
            "signatures",
            None,
            Some(sig.target_algo_id),
            json!({"batch_size": 10, "max_rate": 12}),
            120,
        ),
    ] {
        let id = enqueue(&c, scope, policy, algo, &sel).await;
        jobs.push((id, scope, items));
    }
    drop(c);

    let logs: Vec<std::path::PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("r{i}.log")))
        .collect();
    let mut r = Replicas(
        logs.iter()
            .map(|log| {
                crate::common::pqmig(&["run"], &env)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(log).expect("log"))
                    .spawn()
                    .expect("spawn pqmig run")
            })
            .collect(),
    );
    let addrs: Vec<std::net::SocketAddr> = logs.iter().map(|l| metrics_addr(l)).collect();
    let job_state = |id: i64| {
        let db = db.clone();
        async move {
            let c = cluster.admin_to(&db).await;
            let r = c
                .query_one(
                    "SELECT status, processed_count, failed_count FROM pq_migration_jobs WHERE id = $1",
                    &[&id],
                )
                .await
                .expect("job");
            (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
            )
        }
    };
    // Mid-run: every job has made progress, none has finished.
    let deadline = Instant::now() + Duration::from_secs(30);
    for &(id, _, _) in &jobs {
        while job_state(id).await.1 == 0 {
            assert!(Instant::now() < deadline, "job {id} never started");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Watch /readyz through the outage.
    let watch = tokio::spawn({
        let addrs = addrs.clone();
        async move {
            let mut seen = vec![Vec::new(); addrs.len()];
            for _ in 0..200 {
                for (i, a) in addrs.iter().enumerate() {
                    let (code, body) = crate::observe::http_get(*a, "/readyz").await;
                    if seen[i].last().map(|(c, _)| *c) != Some(code) {
                        seen[i].push((code, body));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        }
    });
    tokio::task::spawn_blocking(move || cluster.stop_for(Duration::from_secs(7)))
        .await
        .expect("outage");
    for (i, d) in r.0.iter_mut().enumerate() {
        assert!(
            d.try_wait().expect("wait").is_none(),
            "replica {i} died in the outage"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for &(id, scope, items) in &jobs {
        loop {
            let (status, processed, failed) = job_state(id).await;
            if status != "pending" && status != "running" {
                assert_eq!(
                    (status.as_str(), processed, failed),
                    ("done", items, 0),
                    "{scope} job {id}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{scope} job {id} stuck: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let out = crate::common::run(&["verify", &id.to_string()], &env);
        assert!(
            out.status.success(),
            "verify {scope} job {id}: {}",
            crate::common::stderr(&out)
        );
    }
    let seen = watch.await.expect("readyz watch");
    for (i, codes) in seen.iter().enumerate() {
        let codes: Vec<u16> = codes.iter().map(|(c, _)| *c).collect();
        assert!(
            codes.windows(3).any(|w| w == [200, 503, 200]),
            "replica {i} /readyz did not follow the outage: {seen:?}"
        );
        assert!(
            seen[i]
                .iter()
                .any(|(c, b)| *c == 503 && b.contains("database")),
            "{seen:?}"
        );
    }
    let c = cluster.admin_to(&db).await;
    let once: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM key_wrappers WHERE wrap_version = 2) \
                  + (SELECT count(*) FROM pq_migration_backups)",
            &[],
        )
        .await
        .expect("counts")
        .get(0);
    assert_eq!(
        once,
        200 + (300 + 200 + 120),
        "each item migrated and backed up once"
    );
    r.stop();
    let text: String = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .collect();
    assert!(
        !text.contains(&cluster.app_password),
        "the password was logged"
    );
    assert!(!text.contains("panicked"), "{text}");
}

/// Fault 8: another client takes every connection the replica's role may
/// open (its CONNECTION LIMIT) right after the replica's own connections
/// are cut. The replica stays up, says why in its log, /readyz turns 503;
/// once the other client lets go, every job finishes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_exhausted_by_another_client_only_pause_the_work() {
    let mut m = Mixed::new().await;
    let admin = crate::common::connect(&crate::common::admin_url()).await;
    let role = format!("pqmig_lim_{}", m.w.fx.db.name);
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN NOSUPERUSER CONNECTION LIMIT 14; \
             GRANT pg_read_all_data, pg_write_all_data TO \"{role}\""
        ))
        .await
        .expect("role");
    let url = m.w.fx.db.url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(url, m.w.fx.db.url);
    let config = m.w.fx.dir.path().join("backoff.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"300ms\"\nretry_backoff_max = \"2s\"\n",
    )
    .expect("config");
    let config = config.display().to_string();
    let mut r = Replicas(vec![m.spawn(
        "a",
        &[
            ("DATABASE_URL", url.as_str()),
            ("PQMIG_CONFIG", config.as_str()),
        ],
    )]);
    let addr = metrics_addr(&m.w.fx.dir.path().join("a.log"));
    for q in &m.jobs {
        m.w.fx.wait_job(q.id, 30, |j| j.processed > 0).await;
    }
    // Cut the replica's connections and take every slot they free, a few
    // times over, so its reconnections find none.
    let mut hog = Vec::new();
    for _ in 0..5 {
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE usename = $1 AND application_name LIKE 'pqmig%'",
                &[&role],
            )
            .await
            .expect("terminate");
        loop {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    hog.push(c);
                }
                Err(e) => {
                    let e = format!("{e:?}");
                    assert!(e.contains("too many connections for role"), "{e}");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        hog.len() >= 8,
        "the other client holds the role's connections"
    );
    let stalled = m.snapshot().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = crate::observe::http_get(addr, "/readyz").await;
        if code == 503 {
            assert!(body.contains("database"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {code}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(m.snapshot().await == stalled, "no connection, no writes");
    assert!(
        r.0[0].try_wait().expect("wait").is_none(),
        "the replica is up"
    );
    drop(hog);
    m.wait_all(90).await;
    m.assert_invariants().await;
    r.stop();
    let log = m.w.fx.log("a");
    assert!(log.contains("too many connections for role"), "{log}");
    admin
        .batch_execute(&format!("DROP ROLE \"{role}\""))
        .await
        .expect("drop role");
}

/// Fault 5: while two replicas work the mixed queue, an application writer
/// (its own session) keeps changing users' email hashes and rotating
/// wrappers to fresh DEKs. No write is lost and nothing ends half-done:
/// each changed row is either the writer's last value or exactly that
/// value migrated; each rotated wrapper opens to the writer's last DEK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_writes_during_the_jobs_are_never_lost() {
    use crate::hashes_fixture::{PROFILE, expected_hash, legacy_hash};
    let mut m = Mixed::new().await;
    let mut r = Replicas(vec![m.spawn("a", &[]), m.spawn("b", &[])]);
    let kek: [u8; 32] =
        m.w.keys
            .0
            .iter()
            .find(|k| k.key_ref == "local:kek-a")
            .expect("legacy AES KEK")
            .secret[..]
            .try_into()
            .expect("32 bytes");
    let writer = m.client().await;
    let mut rng = Rng::new();
    let mut hashed: std::collections::HashMap<i64, Vec<u8>> = Default::default();
    let mut rotated: std::collections::HashMap<i64, [u8; 32]> = Default::default();
    let stop = Instant::now() + Duration::from_secs(4);
    let mut n = 0u64;
    while Instant::now() < stop {
        n += 1;
        let user = 1 + rng.below(USERS as u64) as i64;
        let new = legacy_hash(1_000_000 + n as i64);
        writer
            .execute(
                "UPDATE users SET email_hash = $2, email_hash_key_version = 'v1' WHERE id = $1",
                &[&user, &new],
            )
            .await
            .expect("application hash write");
        hashed.insert(user, new);
        let wid = m.w.seed.deks[rng.below(WRAPPERS as u64) as usize].0;
        let uuid: String = writer
            .query_one(
                "SELECT wrapper_uuid::text FROM key_wrappers WHERE id = $1",
                &[&wid],
            )
            .await
            .expect("uuid")
            .get(0);
        let mut dek = [0u8; 32];
        dek[..8].copy_from_slice(&n.to_be_bytes());
        dek[8] = 0xd5;
        let wrap = pqmig::crypto::wrap::seal_legacy_aes(&kek, uuid.trim_end(), &dek);
        writer
            .execute(
                "UPDATE key_wrappers SET dek_wrap1 = $2, dek_wrap2 = NULL, kms1_key_id = $3, \
                        kms2_key_id = NULL, crypto_suite = NULL, wrap_version = wrap_version + 1 \
                 WHERE id = $1",
                &[&wid, &wrap, &m.w.seed.legacy_key_ids[0]],
            )
            .await
            .expect("application rotation");
        // The layers of a PQ wrap the application replaced are its own to drop.
        writer
            .execute(
                "DELETE FROM key_wrapper_layers WHERE key_wrapper_id = $1",
                &[&wid],
            )
            .await
            .expect("drop old layers");
        rotated.insert(wid, dek);
        tokio::time::sleep(Duration::from_millis(5 + rng.below(30))).await;
    }
    assert!(
        hashed.len() > 20 && rotated.len() > 20,
        "the writer kept writing"
    );
    m.wait_all(90).await;
    for q in &m.jobs {
        let j = m.w.fx.job(q.id).await;
        assert_eq!(
            (j.status.as_str(), j.processed, j.failed),
            ("done", q.items, 0),
            "{} job {}: {j:?}",
            q.scope,
            q.id
        );
    }
    let (mut writer_last, mut migrated_after) = (0, 0);
    for (id, hash, version) in m.w.fx.users().await {
        match hashed.get(&id) {
            None => {
                assert_eq!(version, format!("{PROFILE}/v1"), "user {id}");
                assert_eq!(hash, expected_hash(&legacy_hash(id)), "user {id}");
            }
            Some(new) if version == "v1" => {
                assert_eq!(&hash, new, "user {id}: the application's hash");
                writer_last += 1;
            }
            Some(new) => {
                assert_eq!(version, format!("{PROFILE}/v1"), "user {id}");
                assert_eq!(hash, expected_hash(new), "user {id}: lost write");
                migrated_after += 1;
            }
        }
    }
    eprintln!("writes: {writer_last} kept as written, {migrated_after} migrated after the write");
    assert!(writer_last + migrated_after == hashed.len());
    assert!(
        migrated_after > 0,
        "some writes landed before the job reached them"
    );
    let open = m.w.open_all().await;
    for (wid, dek) in &m.w.seed.deks {
        let want = rotated.get(wid).unwrap_or(dek);
        assert_eq!(open[wid].as_deref(), Ok(&want[..]), "wrapper {wid}");
    }
    let c = m.client().await;
    let broken: i64 = c
        .query_one(
            "SELECT count(*) FROM key_wrappers w WHERE (w.crypto_suite->>'format' = 'pqmig-wrap-v1') \
               <> EXISTS (SELECT 1 FROM key_wrapper_layers l WHERE l.key_wrapper_id = w.id)",
            &[],
        )
        .await
        .expect("mixed state")
        .get(0);
    assert_eq!(
        broken, 0,
        "a wrapper with layers but no PQ suite, or the reverse"
    );
    r.stop();
    m.assert_no_secret_logged();
}
