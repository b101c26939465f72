//! Wrappers jobs end to end against the real database and daemons, and
//! `keys generate`.

use serde_json::{Value, json};

use pqmig::crypto::kem::Kem;
use pqmig::crypto::wrap::{self};

use crate::support::hashes::{terminal, terminate};
use crate::support::wrappers::WrapFx;
use crate::support::{InProcess, b64};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrappers_job_rewraps_both_formats_once_and_pyca_opens_the_result() {
    let w = WrapFx::new(240, Kem::MlKem768, 2).await;
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w.enqueue(w.seed.policy_id, json!({"batch_size": 50})).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.processed, j.failed, j.total), (240, 0, Some(240)));
    assert_eq!(j.result.as_ref().unwrap()["migrated"], 240);
    w.assert_every_dek_intact().await;
    assert_eq!(w.scalar("SELECT count(*) FROM key_wrappers WHERE crypto_suite->>'format' = 'pqmig-wrap-v1' AND wrap_version = 2 AND dek_wrap2 = ''::bytea AND (crypto_suite->>'layers')::int = 2").await, 240);
    assert_eq!(
        w.scalar("SELECT count(*) FROM key_wrapper_layers").await,
        480
    );
    assert_eq!(
        w.scalar(&format!(
            "SELECT count(*) FROM pq_migration_backups_all WHERE job_id = {id}"
        ))
        .await,
        240
    );

    // pyca opens a sample of what pqmig wrote, from the rows as stored.
    let sample: Vec<(i64, [u8; 32])> = w.seed.deks.iter().step_by(20).copied().collect();
    w.assert_pyca_opens(&sample).await;

    // Re-running: nothing is wrapped twice, no version moves.
    let before = w.snapshot().await;
    let again = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(again, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.result.as_ref().unwrap()["skipped"], 240);
    assert_eq!(j.result.as_ref().unwrap()["migrated"], 0);
    assert_eq!(w.snapshot().await, before);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_jobs_fail_before_touching_any_wrapper() {
    let mut w = WrapFx::new(20, Kem::MlKem768, 1).await;
    let before = w.snapshot().await;
    let c = w.fx.db.client().await;
    let bad_template = w
        .add_policy(
            "bad-aad",
            Kem::MlKem768,
            1,
            "defined",
            1,
            1,
            Some(json!({"t": "{tenant_id}"})),
        )
        .await;
    let too_few = w
        .add_policy("too-few", Kem::MlKem768, 2, "round_robin", 3, 3, None)
        .await;
    let wrong_algo_keys = w
        .add_policy("xwing-keys", Kem::XWing, 2, "defined", 1, 2, None)
        .await;
    // the X-Wing policy's keys do not match an ML-KEM-1024 target
    let mlkem1024: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'ML-KEM-1024'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let x25519: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'X25519'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mlkem512: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'ML-KEM-512'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let p = w.seed.policy_id;
    let jobs: Vec<(i64, &str)> = vec![
        (
            w.enqueue(bad_template, json!({})).await,
            "unknown placeholder {tenant_id}",
        ),
        (
            w.enqueue(too_few, json!({})).await,
            "has 2 usable ML-KEM-768 keys",
        ),
        (
            w.enqueue(p, json!({"formats": ["pgp"]})).await,
            "selection.formats[0]",
        ),
        (
            w.enqueue(p, json!({"status": "active"})).await,
            "selection.status: expected an array",
        ),
    ];
    let mut jobs = jobs;
    let no_policy: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope) VALUES ('wrappers') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    jobs.push((no_policy, "target_policy_id is required"));
    for (algo, want) in [
        (mlkem1024, "has 0 usable ML-KEM-1024 keys"),
        (x25519, "is not post-quantum"),
        (mlkem512, "not supported for wrapping"),
    ] {
        let id: i64 = c
            .query_one(
                "INSERT INTO pq_migration_jobs (scope, target_policy_id, target_algo_id) VALUES ('wrappers', $1, $2) RETURNING id",
                &[&wrong_algo_keys, &algo],
            )
            .await
            .unwrap()
            .get(0);
        jobs.push((id, want));
    }
    let daemon = InProcess::start(&w.fx, &[]).await;
    for (id, want) in jobs {
        let j = w.fx.wait_job(id, 30, terminal).await;
        assert_eq!(j.status, "failed", "job {id}: {j:?}");
        let err = j.error.unwrap_or_default();
        assert!(err.contains(want), "job {id}: {err:?} should say {want:?}");
        assert!(!err.contains('\n'));
        assert_eq!(j.processed + j.failed, 0);
    }
    daemon.stop().await;
    assert_eq!(w.snapshot().await, before);
    assert_eq!(
        w.scalar("SELECT count(*) FROM pq_migration_backups_all")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_wrappers_are_item_failures_and_the_rest_migrate() {
    let w = WrapFx::new(30, Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let ids: Vec<i64> = w.seed.deks.iter().map(|(id, _)| *id).collect();
    // 1: both AES wraps tampered (integrity); 2: x25519 wrap truncated
    // (integrity); 3: its key is not in the keyring (data); 4: no wraps
    // at all (data); 5: kms2 alone still opens it, kms1's wrap is
    // tampered (integrity: both wraps are checked); 6: both open, to
    // different DEKs (integrity).
    c.execute("UPDATE key_wrappers SET dek_wrap1 = set_byte(dek_wrap1, 20, get_byte(dek_wrap1, 20) # 1), dek_wrap2 = set_byte(dek_wrap2, 13, get_byte(dek_wrap2, 13) # 1) WHERE id = $1", &[&ids[0]]).await.unwrap();
    c.execute(
        "UPDATE key_wrappers SET dek_wrap1 = substring(dek_wrap1 FROM 1 FOR 40) WHERE id = $1",
        &[&ids[1]],
    )
    .await
    .unwrap();
    let ghost = pqmig::db::kms::kms_key_register(&c, "local:not-in-keyring", "wrap", "AES-256-GCM")
        .await
        .unwrap();
    c.execute("UPDATE key_wrappers SET kms1_key_id = $2, kms2_key_id = NULL, dek_wrap2 = NULL WHERE id = $1", &[&ids[2], &ghost]).await.unwrap();
    c.execute(
        "UPDATE key_wrappers SET dek_wrap1 = NULL, dek_wrap2 = NULL WHERE id = $1",
        &[&ids[4]],
    )
    .await
    .unwrap();
    c.execute("UPDATE key_wrappers SET dek_wrap1 = set_byte(dek_wrap1, 20, get_byte(dek_wrap1, 20) # 1) WHERE id = $1", &[&ids[6]]).await.unwrap();
    let kek_b: [u8; 32] = w
        .keys
        .0
        .iter()
        .find(|k| k.key_ref == "local:kek-b")
        .expect("kek-b")
        .secret[..]
        .try_into()
        .unwrap();
    let uuid: String = c
        .query_one(
            "SELECT wrapper_uuid::text FROM key_wrappers WHERE id = $1",
            &[&ids[8]],
        )
        .await
        .unwrap()
        .get(0);
    let other = pqmig::crypto::wrap::seal_legacy_aes(&kek_b, &uuid, &[7u8; 32]);
    c.execute(
        "UPDATE key_wrappers SET dek_wrap2 = $2 WHERE id = $1",
        &[&ids[8], &other],
    )
    .await
    .unwrap();
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert_eq!(j.error.as_deref(), Some("6 items failed"));
    assert_eq!((j.processed, j.failed), (24, 6));
    let errors: Vec<(String, String)> = c
        .query("SELECT item_id, error_code FROM pq_migration_item_errors WHERE job_id = $1 ORDER BY item_id::bigint", &[&id])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(String, String)> = [
        (0, "integrity"),
        (1, "integrity"),
        (2, "data"),
        (4, "data"),
        (6, "integrity"),
        (8, "integrity"),
    ]
    .iter()
    .map(|(i, code)| (ids[*i].to_string(), code.to_string()))
    .collect();
    assert_eq!(errors, want);
    // the failed ones are untouched legacy wrappers; every other opens to its DEK
    let now = w.open_all().await;
    for (i, (wid, dek)) in w.seed.deks.iter().enumerate() {
        if [0, 1, 2, 4, 6, 8].contains(&i) {
            assert!(now[wid].is_err(), "{i}");
        } else {
            assert_eq!(now[wid].as_deref(), Ok(&dek[..]), "{i}");
        }
    }
    assert_eq!(
        w.scalar(
            "SELECT count(*) FROM key_wrappers WHERE crypto_suite->>'format' = 'pqmig-wrap-v1'"
        )
        .await,
        24
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_to_policy_rewrap_verify_rollback_and_purge() {
    let mut w = WrapFx::new(60, Kem::MlKem768, 1).await;
    let original = w.snapshot().await;
    let template = json!({"id": "{wrapper_id}", "u": "{wrapper_uuid}", "p": "{policy_name}/{policy_id}", "v": "{wrap_version}", "fixed": ["x", "1"]});
    let second = w
        .add_policy("hybrid", Kem::XWing, 3, "round_robin", 2, 3, Some(template))
        .await;
    let daemon = InProcess::start(&w.fx, &[]).await;

    let first = w.enqueue(w.seed.policy_id, json!({})).await;
    assert_eq!(w.fx.wait_job(first, 60, terminal).await.status, "done");
    let after_first = w.snapshot().await;
    let job2 = w.enqueue(second, json!({"batch_size": 7})).await;
    let j = w.fx.wait_job(job2, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.processed, 60);
    w.assert_every_dek_intact().await;
    daemon.stop().await;
    let c = w.fx.db.client().await;
    // the AAD is the rendered template; round_robin gives 2 X-Wing layers
    let r = c
        .query_one(
            "SELECT w.id, w.wrapper_uuid::text, l.aad, w.wrap_version, (SELECT count(*) FROM key_wrapper_layers x WHERE x.key_wrapper_id = w.id) \
             FROM key_wrappers w JOIN key_wrapper_layers l ON l.key_wrapper_id = w.id AND l.layer_no = 1 ORDER BY w.id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (wid, uuid, aad): (i64, String, Value) = (r.get(0), r.get(1), r.get(2));
    assert_eq!(
        aad,
        json!({"id": wid.to_string(), "u": uuid, "p": format!("hybrid/{second}"), "v": "3", "fixed": ["x", "1"]})
    );
    assert_eq!((r.get::<_, i32>(3), r.get::<_, i64>(4)), (3, 2));

    // purge is refused before verify; verify passes for both jobs
    let out = w.cli(&["purge-backups", &job2.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        crate::support::stderr(&out)
    );
    assert!(crate::support::stderr(&out).contains("run `pqmig verify"));
    let out = w.cli(&["verify", &job2.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(crate::support::stdout(&out).contains("60 items verified"));

    // a wrapper altered after the job fails verification
    c.execute("UPDATE key_wrappers SET dek_wrap1 = set_byte(dek_wrap1, 30, get_byte(dek_wrap1, 30) # 4) WHERE id = $1", &[&wid]).await.unwrap();
    let out = w.cli(&["verify", &job2.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        crate::support::stderr(&out).contains("1 of 60 items failed verification"),
        "{}",
        crate::support::stderr(&out)
    );
    c.execute("UPDATE key_wrappers SET dek_wrap1 = set_byte(dek_wrap1, 30, get_byte(dek_wrap1, 30) # 4) WHERE id = $1", &[&wid]).await.unwrap();

    // rollback of job 2 restores exactly the state job 1 left, then job 1's
    // rollback the original legacy rows, byte for byte
    let out = w.cli(&["rollback", &job2.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(crate::support::stdout(&out).contains("restored 60 of 60"));
    assert_eq!(w.snapshot().await, after_first);
    // rolling back twice changes nothing
    let out = w.cli(&["rollback", &job2.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(
        crate::support::stdout(&out).contains("was rolled back already"),
        "{}",
        crate::support::stdout(&out)
    );
    assert_eq!(w.snapshot().await, after_first);
    let out = w.cli(&["rollback", &first.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert_eq!(w.snapshot().await, original);
    w.assert_every_dek_intact().await;

    // purge deletes only the verified job's backups; verify of the
    // rolled-back job checks (and records) nothing of what it undid
    let out = w.cli(&["verify", &first.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(
        crate::support::stdout(&out).contains(&format!("job {first} was rolled back (60 items")),
        "{}",
        crate::support::stdout(&out)
    );
    assert_eq!(
        w.scalar(&format!(
            "SELECT (result->'verified'->>'items')::bigint FROM pq_migration_jobs WHERE id = {first}"
        ))
        .await,
        0
    );
    let out = w.cli(&["purge-backups", &first.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(crate::support::stdout(&out).contains("deleted 60 backups"));
    assert_eq!(
        w.scalar(&format!(
            "SELECT count(*) FROM pq_migration_backups_all WHERE job_id = {first}"
        ))
        .await,
        0
    );
    assert_eq!(
        w.scalar(&format!(
            "SELECT count(*) FROM pq_migration_backups_all WHERE job_id = {job2}"
        ))
        .await,
        60
    );
    // unknown job: usage error
    let out = w.cli(&["verify", "987654"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(crate::support::stderr(&out).contains("no job with id 987654"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_migrate_ten_thousand_wrappers_with_every_dek_intact() {
    let w = WrapFx::new(10_000, Kem::MlKem768, 1).await;
    let mut a = w.fx.spawn_daemon("a", &[]);
    let mut b = w.fx.spawn_daemon("b", &[]);
    // two jobs over disjoint halves, one per daemon (they may also share)
    let mid = w.seed.deks[5_000].0;
    let j1 = w.enqueue(w.seed.policy_id, json!({"id_to": mid - 1})).await;
    let j2 = w.enqueue(w.seed.policy_id, json!({"id_from": mid})).await;
    for id in [j1, j2] {
        let j = w.fx.wait_job(id, 120, terminal).await;
        assert_eq!(j.status, "done", "{j:?}");
        assert_eq!((j.processed, j.failed), (5_000, 0));
    }
    terminate(&mut a);
    terminate(&mut b);
    w.assert_every_dek_intact().await;
    assert_eq!(w.scalar("SELECT count(*) FROM key_wrappers WHERE wrap_version = 2 AND crypto_suite->>'format' = 'pqmig-wrap-v1'").await, 10_000);
    assert_eq!(
        w.scalar("SELECT count(*) FROM pq_migration_backups_all")
            .await,
        10_000
    );
    for name in ["a", "b"] {
        let log = w.fx.log(name);
        for k in &w.keys.0 {
            assert!(
                !log.contains(&b64(&k.secret)),
                "{name}: a secret in the log"
            );
            let hex: String = k.secret.iter().map(|b| format!("{b:02x}")).collect();
            assert!(!log.contains(&hex), "{name}: a secret in the log");
        }
    }
}

/// The application rotates one wrapper and deletes another between the
/// batch's read and its write: the rotation is not lost (the wrapper is
/// re-read under lock and wrapped from its new DEK), the deleted one is
/// no longer an item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_rotation_by_the_application_is_not_lost() {
    use pqmig::scope::ScopeContext;
    let w = WrapFx::new(10, Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let id = w.enqueue(w.seed.policy_id, json!({})).await;
    let job = pqmig::db::jobs::job_claim(&c, 1, "w")
        .await
        .unwrap()
        .remove(0);
    assert_eq!(job.lease.job_id, id);
    let ctx = ScopeContext::new(Some(w.fx.keyring.clone()));
    let spec = job.spec.as_ref().expect("a readable job");
    let prepared = spec.scope.prepare(&c, spec, &ctx).await.expect("prepare");
    let rows = prepared
        .fetch(&c, i64::MIN, i64::MAX, 10)
        .await
        .expect("fetch");
    let computed = prepared.compute(rows).await.expect("compute");

    // meanwhile: the app re-wraps wrapper 0 (legacy AES) with a new DEK
    // and deletes wrapper 2
    let (w0, w2) = (w.seed.deks[0].0, w.seed.deks[2].0);
    let kek: [u8; 32] = w
        .keys
        .0
        .iter()
        .find(|k| k.key_ref == "local:kek-a")
        .unwrap()
        .secret[..]
        .try_into()
        .unwrap();
    let uuid: String = c
        .query_one(
            "SELECT wrapper_uuid::text FROM key_wrappers WHERE id = $1",
            &[&w0],
        )
        .await
        .unwrap()
        .get(0);
    let new_dek = [0x42u8; 32];
    let rewrapped = wrap::seal_legacy_aes(&kek, &uuid, &new_dek);
    c.execute("UPDATE key_wrappers SET dek_wrap1 = $2, dek_wrap2 = NULL, kms2_key_id = NULL WHERE id = $1", &[&w0, &rewrapped]).await.unwrap();
    c.execute("DELETE FROM key_wrappers WHERE id = $1", &[&w2])
        .await
        .unwrap();

    let mut conn = w.fx.db.client().await;
    pqmig::db::backups::ensure_partition(&conn, pqmig::job::ScopeKind::Wrappers, id)
        .await
        .expect("backup partition");
    let tx = conn.transaction().await.unwrap();
    let (counts, failures) = prepared.write(&tx, id, computed).await.expect("write");
    tx.commit().await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!((counts.migrated, counts.skipped), (9, 1));
    let now = w.open_all().await;
    assert_eq!(now.len(), 9);
    assert_eq!(
        now[&w0].as_deref(),
        Ok(&new_dek[..]),
        "the app's rotation survives"
    );
    for (wid, dek) in &w.seed.deks[1..] {
        if *wid != w2 {
            assert_eq!(now[wid].as_deref(), Ok(&dek[..]));
        }
    }
    // the backup holds the app's version, the one actually replaced
    let backup: Vec<u8> = c
        .query_one(
            "SELECT r.dek_wrap1 FROM pq_migration_backups_all b, jsonb_populate_record(NULL::key_wrappers, b.data->'row') r WHERE b.item_id = $1::bigint::text",
            &[&w0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(backup, rewrapped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_generate_adds_keys_atomically_and_registers_them() {
    use std::os::unix::fs::PermissionsExt;
    let db = crate::support::TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PQMIG_KEYRING", path.to_str().unwrap()),
    ];
    let out = crate::support::run(
        &[
            "keys",
            "generate",
            "--algorithm",
            "ml-kem-768",
            "--ref",
            "local:pq-a",
            "--register",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let text = crate::support::stdout(&out);
    assert!(
        text.contains("local:pq-a (ML-KEM-768): public key 1184 bytes"),
        "{text}"
    );
    assert!(text.contains("registered as kms_keys id"), "{text}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = crate::support::run(
        &[
            "keys",
            "generate",
            "--algorithm",
            "AES-256-GCM",
            "--ref",
            "local:kek",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let before = std::fs::read(&path).unwrap();
    // refused: a duplicate reference, an unknown algorithm, --register of a pepper
    for (args, want) in [
        (
            vec!["--algorithm", "X-Wing", "--ref", "local:pq-a"],
            "already holds \"local:pq-a\"",
        ),
        (
            vec!["--algorithm", "RSA-2048", "--ref", "local:r"],
            "unknown algorithm \"RSA-2048\"",
        ),
        (
            vec![
                "--algorithm",
                "HMAC-SHA3-256",
                "--ref",
                "local:p",
                "--register",
            ],
            "--register is for wrapping keys",
        ),
    ] {
        let mut a = vec!["keys", "generate"];
        a.extend(args);
        let out = crate::support::run(&a, &env);
        assert_eq!(out.status.code(), Some(2), "{a:?}");
        assert!(
            crate::support::stderr(&out).contains(want),
            "{}",
            crate::support::stderr(&out)
        );
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a refused run leaves the keyring as it was"
    );
    let ring = pqmig::keys::LocalKeyring::load(&path).unwrap();
    let refs: Vec<&str> = ring.entries().map(|(r, _)| r).collect();
    assert_eq!(refs, vec!["local:kek", "local:pq-a"]);
    // the secret never reaches stdout or stderr
    for (_, s) in ring.entries() {
        assert!(!text.contains(&b64(&s.bytes)));
    }
    let c = db.client().await;
    let row = c
        .query_one("SELECT k.algorithm, k.purpose, p.provider FROM kms_keys k JOIN kms_providers p ON p.id = k.provider_id WHERE k.external_key_ref = 'local:pq-a'", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2)
        ),
        ("ML-KEM-768".into(), "wrap".into(), "local".into())
    );
}
