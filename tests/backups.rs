//! Compact backups (V7): one partition per job, typed columns and no
//! index, dropped whole by `purge-backups`; backups an earlier pqmig wrote
//! (one JSONB row each in `pq_migration_backups`) keep working after the
//! upgrade, also for a job that ran across it.

use pqmig::crypto::kem::Kem;
use serde_json::json;
use tokio_postgres::Client;

use crate::support::InProcess;
use crate::support::hashes::{Fixture, PROFILE, legacy_hash, terminal};
use crate::support::wrappers::WrapFx;
use crate::support::{run, stderr, stdout};

async fn scalar(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Move job `id`'s compact hashes backups of items `<= upto` into
/// `pq_migration_backups` as the documents pqmig wrote before V7.
async fn hashes_to_old_format(c: &Client, id: i64, upto: i64) {
    let part = format!("pq_migration_backups_hashes_{id}");
    c.batch_execute(&format!(
        "INSERT INTO pq_migration_backups (job_id, item_table, item_id, data) \
           SELECT job_id, 'users', item_id::text, jsonb_build_object('column', 'email_hash', \
                  'value_hex', encode(hash, 'hex'), 'version_column', 'email_hash_key_version', \
                  'version', version) \
           FROM {part} WHERE item_id <= {upto} ORDER BY item_id; \
         DELETE FROM {part} WHERE item_id <= {upto};"
    ))
    .await
    .expect("old-format backups");
}

/// The same for a wrappers job: the whole previous row and its layers.
async fn wrappers_to_old_format(c: &Client, id: i64, upto: i64) {
    let part = format!("pq_migration_backups_wrappers_{id}");
    c.batch_execute(&format!(
        "INSERT INTO pq_migration_backups (job_id, item_table, item_id, data) \
           SELECT b.job_id, 'key_wrappers', b.item_id::text, jsonb_build_object( \
                  'row', to_jsonb(w) || jsonb_build_object('dek_wrap1', b.dek_wrap1, 'dek_wrap2', b.dek_wrap2, \
                         'crypto_suite', b.crypto_suite, 'wrap_version', b.wrap_version, 'rotated_at', b.rotated_at), \
                  'layers', COALESCE(b.layers, '[]'::jsonb)) \
           FROM {part} b JOIN key_wrappers w ON w.id = b.item_id WHERE b.item_id <= {upto} ORDER BY b.item_id; \
         DELETE FROM {part} WHERE item_id <= {upto};"
    ))
    .await
    .expect("old-format backups");
}

/// A hashes job finished by a pqmig from before V7, then the upgrade: the
/// database is taken back to exactly what V6 left (the job's backups as
/// JSONB documents, no compact tables, no V7 in the history), `pqmig
/// migrate` upgrades it, and verify, rollback and purge of the old job
/// behave as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_finished_before_the_upgrade_verifies_rolls_back_and_purges() {
    let fx = Fixture::new(40).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
    daemon.stop().await;
    let c = fx.db.client().await;
    hashes_to_old_format(&c, id, i64::MAX).await;
    c.batch_execute(
        "DROP VIEW pq_migration_backups_all; \
         DROP TABLE pq_migration_backups_hashes, pq_migration_backups_wrappers, \
                    pq_migration_backups_signatures; \
         DELETE FROM pqmig_schema_history WHERE version >= 7",
    )
    .await
    .expect("back to V6");
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM pq_migration_backups").await,
        40
    );

    let keyring = fx.keyring.display().to_string();
    let env = [
        ("DATABASE_URL", fx.db.url.as_str()),
        ("PQMIG_KEYRING", keyring.as_str()),
    ];
    let out = run(&["migrate"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("V7"), "{}", stdout(&out));
    let job = id.to_string();
    let out = run(&["verify", &job], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("40 items verified"),
        "{}",
        stdout(&out)
    );
    let out = run(&["rollback", &job], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restored 40 of 40"),
        "{}",
        stdout(&out)
    );
    for (uid, hash, version) in fx.users().await {
        assert_eq!(
            (hash, version),
            (legacy_hash(uid), "v1".into()),
            "user {uid}"
        );
    }
    let out = run(&["verify", &job], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["purge-backups", &job], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deleted 40 backups"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM pq_migration_backups").await,
        0
    );
}

/// A wrappers job that ran across the upgrade: its first items backed up
/// in the old format, the rest in its partition. Verify checks both,
/// rollback restores every wrapper and its layers byte for byte, purge
/// deletes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_ran_across_the_upgrade_reads_both_formats() {
    let mut w = WrapFx::new(30, Kem::MlKem768, 1).await;
    let original = w.snapshot().await;
    // a second policy: the job re-wraps wrappers that already have layers,
    // so the layers' backups are exercised in both formats
    let second = w
        .add_policy("hybrid", Kem::XWing, 2, "round_robin", 2, 2, None)
        .await;
    let daemon = InProcess::start(&w.fx, &[]).await;
    let first = w.enqueue(w.seed.policy_id, json!({})).await;
    assert_eq!(w.fx.wait_job(first, 60, terminal).await.status, "done");
    let after_first = w.snapshot().await;
    let job = w.enqueue(second, json!({})).await;
    assert_eq!(w.fx.wait_job(job, 60, terminal).await.status, "done");
    daemon.stop().await;
    let c = w.fx.db.client().await;
    let mid = w.seed.deks[14].0;
    for id in [first, job] {
        wrappers_to_old_format(&c, id, mid).await;
    }
    let old = |id: i64| format!("SELECT count(*) FROM pq_migration_backups WHERE job_id = {id}");
    let compact = |id: i64| format!("SELECT count(*) FROM pq_migration_backups_wrappers_{id}");
    assert_eq!(scalar(&c, &old(job)).await, 15);
    assert_eq!(scalar(&c, &compact(job)).await, 15);

    let out = w.cli(&["verify", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("30 items verified"),
        "{}",
        stdout(&out)
    );
    let out = w.cli(&["rollback", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restored 30 of 30"),
        "{}",
        stdout(&out)
    );
    assert_eq!(w.snapshot().await, after_first);
    let out = w.cli(&["rollback", &first.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.snapshot().await, original);
    w.assert_every_dek_intact().await;

    let out = w.cli(&["verify", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = w.cli(&["purge-backups", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deleted 30 backups"),
        "{}",
        stdout(&out)
    );
    assert_eq!(scalar(&c, &old(job)).await, 0);
    assert_eq!(
        scalar(
            &c,
            &format!("SELECT count(*) FROM pq_migration_backups_all WHERE job_id = {job}")
        )
        .await,
        0
    );
    assert_eq!(scalar(&c, &old(first)).await, 15, "the other job's stay");
}

/// A job's backups are one partition of its scope's table: typed rows, no
/// index; a job without backups has none; purge detaches and drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_backups_are_one_partition_that_purge_drops() {
    let fx = Fixture::new(30).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"id_to": 20})).await;
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
    let unbacked = fx.enqueue(json!({"id_from": 21, "backup": false})).await;
    assert_eq!(fx.wait_job(unbacked, 30, terminal).await.status, "done");
    daemon.stop().await;
    let c = fx.db.client().await;
    let part = format!("pq_migration_backups_hashes_{id}");
    let r = c
        .query_one(
            "SELECT i.inhparent::regclass::text, \
                    (SELECT count(*) FROM pg_index x WHERE x.indrelid = c.oid), \
                    to_regclass($2) IS NULL \
             FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid WHERE c.oid = to_regclass($1)",
            &[&part, &format!("pq_migration_backups_hashes_{unbacked}")],
        )
        .await
        .expect("the job's partition");
    assert_eq!(r.get::<_, String>(0), "pq_migration_backups_hashes");
    assert_eq!(r.get::<_, i64>(1), 0, "no index on the backups");
    assert!(
        r.get::<_, bool>(2),
        "a job without backups has no partition"
    );
    let rows = c
        .query(
            &format!("SELECT item_id, hash, version FROM {part} ORDER BY item_id"),
            &[],
        )
        .await
        .expect("rows");
    let got: Vec<(i64, Vec<u8>, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want: Vec<(i64, Vec<u8>, String)> =
        (1..=20).map(|i| (i, legacy_hash(i), "v1".into())).collect();
    assert_eq!(got, want);
    // the rows the job wrote name the profile it pinned
    assert_eq!(
        scalar(
            &c,
            &format!("SELECT count(*) FROM users WHERE email_hash_key_version = '{PROFILE}/v1'")
        )
        .await,
        30
    );

    let keyring = fx.keyring.display().to_string();
    let env = [
        ("DATABASE_URL", fx.db.url.as_str()),
        ("PQMIG_KEYRING", keyring.as_str()),
    ];
    let out = run(&["verify", &id.to_string()], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["purge-backups", &id.to_string()], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("deleted 20 backups (20 by dropping {part}")),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        scalar(
            &c,
            &format!("SELECT count(*) FROM pg_class WHERE relname = '{part}'")
        )
        .await,
        0
    );
    // purging again finds nothing
    let out = run(&["purge-backups", &id.to_string()], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deleted 0 backups"),
        "{}",
        stdout(&out)
    );
}

/// A pending hashes job whose partition (made by the function the daemon
/// uses) holds one backup.
async fn pending_job_with_a_backup(fx: &Fixture, c: &Client) -> i64 {
    let id = fx.enqueue(json!({})).await;
    c.execute("SELECT pqmig_backup_partition('hashes', $1)", &[&id])
        .await
        .expect("create");
    c.execute(
        "INSERT INTO pq_migration_backups_hashes (job_id, item_id, hash, version) VALUES ($1, 1, '\\x00', 'v1')",
        &[&id],
    )
    .await
    .expect("a backup");
    id
}

/// The two functions the daemon's role creates and drops partitions with
/// take nothing but a known scope and a job id, and never drop the
/// backups of a job that is not done.
#[tokio::test]
async fn the_partition_functions_refuse_bad_input_and_unfinished_jobs() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let id = pending_job_with_a_backup(&fx, &c).await;
    let err = c
        .query(
            "SELECT * FROM pqmig_drop_backup_partition('hashes', $1)",
            &[&id],
        )
        .await
        .expect_err("a pending job's backups stay");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("is pending")),
        "{err:?}"
    );
    for bad in ["users; DROP TABLE users", "HASHES", ""] {
        for f in ["pqmig_backup_partition", "pqmig_drop_backup_partition"] {
            let err = c
                .query(&format!("SELECT * FROM {f}($1, $2)"), &[&bad, &id])
                .await
                .expect_err(bad);
            assert!(
                err.as_db_error()
                    .is_some_and(|e| e.message().contains("no scope")),
                "{f}({bad:?}): {err:?}"
            );
        }
    }
    assert_eq!(
        scalar(
            &c,
            &format!("SELECT count(*) FROM pq_migration_backups_hashes_{id}")
        )
        .await,
        1
    );
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'done' WHERE id = $1",
        &[&id],
    )
    .await
    .expect("done");
    let r = c
        .query_one(
            "SELECT * FROM pqmig_drop_backup_partition('hashes', $1)",
            &[&id],
        )
        .await
        .expect("dropped");
    assert_eq!((r.get::<_, i64>(0), r.get::<_, bool>(1)), (1, true));
    assert!(
        c.query(
            "SELECT * FROM pqmig_drop_backup_partition('hashes', $1)",
            &[&id]
        )
        .await
        .expect("again")
        .is_empty()
    );
}

/// `pqmig bench` runs the same job with and without backups and, for
/// hashes, the pgcrypto procedure a DBA would write, on equal slices of
/// one table; every run must cover its slice (the numbers themselves are
/// the bench's business, not a test's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compares_backups_on_off_and_the_pgcrypto_procedure() {
    let admin = crate::support::admin_url();
    let out = run(
        &["bench", "--scope", "hashes", "--items", "3000"],
        &[("DATABASE_URL", admin.as_str())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let o = stdout(&out);
    for want in [
        "3000 items per job",
        "with backups; WAL",
        "without backups",
        "backups cost",
        "pgcrypto procedure",
        "vs the procedure",
    ] {
        assert!(o.contains(want), "{want:?} missing:\n{o}");
    }
}

/// The drop function runs as the tables' owner: a caller's temporary
/// table named like the jobs table cannot make a pending job look done.
#[tokio::test]
async fn the_drop_function_cannot_be_fooled_by_a_temporary_jobs_table() {
    let fx = Fixture::new(0).await;
    let c = fx.db.client().await;
    let id = pending_job_with_a_backup(&fx, &c).await;
    let role = format!("pqmig_spoof_{}", fx.db.name);
    let admin = crate::support::connect(&crate::support::admin_url()).await;
    admin
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
        .await
        .expect("role");
    c.batch_execute(&format!(
        "GRANT EXECUTE ON FUNCTION pqmig_drop_backup_partition(TEXT, BIGINT) TO \"{role}\""
    ))
    .await
    .expect("grant");
    let url = fx.db.url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(url, fx.db.url);
    let r = crate::support::connect(&url).await;
    r.batch_execute(&format!(
        "CREATE TEMP TABLE pq_migration_jobs (id BIGINT, status TEXT); \
         INSERT INTO pq_migration_jobs VALUES ({id}, 'done')"
    ))
    .await
    .expect("temp table");
    let err = r
        .query(
            "SELECT * FROM pqmig_drop_backup_partition('hashes', $1)",
            &[&id],
        )
        .await
        .expect_err("still pending");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("is pending")),
        "{err:?}"
    );
    // Its temporary table goes now, not whenever its backend exits.
    r.batch_execute("DISCARD TEMP").await.expect("discard temp");
    drop(r);
    assert_eq!(
        scalar(
            &c,
            &format!("SELECT count(*) FROM pq_migration_backups_hashes_{id}")
        )
        .await,
        1
    );
    c.batch_execute(&format!(
        "REVOKE EXECUTE ON FUNCTION pqmig_drop_backup_partition(TEXT, BIGINT) FROM \"{role}\""
    ))
    .await
    .expect("revoke");
    // The closed session's backend may still be exiting: a few tries.
    let mut tries = 0;
    while let Err(e) = admin.batch_execute(&format!("DROP ROLE \"{role}\"")).await {
        tries += 1;
        assert!(tries < 50, "drop role: {e:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
