//! Schema migrations: empty database, re-run, a host database that already
//! holds the seed tables with rows, concurrent replicas, seeded algorithms,
//! constraints and the NOTIFY trigger.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls, error::SqlState};

use crate::support::{TestDb, pqmig, run, stderr, stdout};
use pqmig::db::migrate;

const HOST_SEED: &str = include_str!("fixtures/host_seed.sql");

const PQMIG_TABLES: &[&str] = &[
    "users",
    "crypto_algorithms",
    "encryption_policies",
    "pq_migration_jobs",
    "crypto_standard_aliases",
    "policy_algorithms",
    "kms_providers",
    "kms_keys",
    "policy_kms_keys",
    "key_wrappers",
    "key_wrapper_layers",
    "signing_keys",
    "signatures",
    "hash_profiles",
    "field_hash_policies",
    "pq_migration_item_errors",
    "pq_migration_job_events",
    "pq_migration_backups",
];

async fn tables(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn migrate_on_empty_database_creates_the_whole_schema() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    assert!(
        migrate::check_current(&client).await.is_err(),
        "empty db is not current"
    );
    let applied = migrate::apply(&mut client).await.expect("migrate");
    assert_eq!(applied.len() as i32, migrate::latest_version());
    let found = tables(&client).await;
    for t in PQMIG_TABLES {
        assert!(
            found.iter().any(|f| f == t),
            "missing table {t}; have {found:?}"
        );
    }
    assert_eq!(
        migrate::check_current(&client).await.expect("current"),
        migrate::latest_version()
    );

    let indexes: Vec<String> = client
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'pq_migration_jobs'",
            &[],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for idx in ["idx_pq_mig_status_sched", "idx_pq_mig_claim"] {
        assert!(
            indexes.iter().any(|i| i == idx),
            "missing index {idx}: {indexes:?}"
        );
    }
    // The seed's named foreign keys, ON DELETE SET NULL.
    for fk in [
        "fk_pq_mig_policy",
        "fk_pq_mig_algo",
        "fk_pq_mig_user",
        "fk_kwl_algo",
    ] {
        let action: String = client
            .query_one(
                "SELECT confdeltype::text FROM pg_constraint WHERE conname = $1",
                &[&fk],
            )
            .await
            .unwrap_or_else(|e| panic!("{fk}: {e}"))
            .get(0);
        if fk.starts_with("fk_pq_mig") {
            assert_eq!(action, "n", "{fk} must be ON DELETE SET NULL");
        }
    }
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_and_the_sql_itself_is_idempotent() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    let again = migrate::apply(&mut client).await.expect("second migrate");
    assert!(again.is_empty(), "nothing left to apply: {again:?}");

    // Even if the history were lost, re-applying every file must succeed
    // without duplicating seeded rows.
    let before = count(&client).await;
    client
        .batch_execute("DROP TABLE pqmig_schema_history")
        .await
        .expect("drop history");
    let reapplied = migrate::apply(&mut client)
        .await
        .expect("re-apply all files");
    assert_eq!(reapplied.len() as i32, migrate::latest_version());
    assert_eq!(count(&client).await, before);
}

async fn count(c: &tokio_postgres::Client) -> (i64, i64) {
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM crypto_algorithms), (SELECT count(*) FROM crypto_standard_aliases)",
            &[],
        )
        .await
        .expect("count");
    (r.get(0), r.get(1))
}

/// Every row of every table, as JSON, restricted to the columns that
/// existed before pqmig migrated.
async fn snapshot(client: &tokio_postgres::Client) -> Vec<(String, Vec<String>, String)> {
    let mut out = Vec::new();
    for table in tables(client).await {
        let cols: Vec<String> = client
            .query(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
                &[&table],
            )
            .await
            .expect("columns")
            .iter()
            .map(|r| r.get(0))
            .collect();
        out.push((table, cols, String::new()));
    }
    for (table, cols, rows) in &mut out {
        *rows = rows_of(client, table, cols).await;
    }
    out
}

async fn rows_of(client: &tokio_postgres::Client, table: &str, cols: &[String]) -> String {
    let list = cols
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY t::text), '[]')::text FROM (SELECT {list} FROM \"{table}\") t"
    );
    client
        .query_one(&sql, &[])
        .await
        .expect("snapshot rows")
        .get(0)
}

#[tokio::test]
async fn migrate_keeps_host_tables_rows_and_columns() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    client
        .batch_execute(HOST_SEED)
        .await
        .expect("load host seed");
    let before = snapshot(&client).await;
    assert!(
        before
            .iter()
            .any(|(t, _, rows)| t == "users" && rows.len() > 2),
        "fixture has users"
    );
    assert!(
        before
            .iter()
            .any(|(t, _, rows)| t == "pq_migration_jobs" && rows.len() > 2),
        "fixture has jobs"
    );

    migrate::apply(&mut client)
        .await
        .expect("migrate over host schema");

    for (table, cols, rows) in &before {
        let after = rows_of(&client, table, cols).await;
        if table == "crypto_algorithms" || table == "crypto_standard_aliases" {
            // Seeding adds rows; the host's own rows stay exactly as they were.
            let host: Vec<serde_json::Value> = serde_json::from_str(rows).expect("json");
            let now: Vec<serde_json::Value> = serde_json::from_str(&after).expect("json");
            for row in host {
                assert!(
                    now.contains(&row),
                    "{table}: host row changed or lost: {row}"
                );
            }
        } else {
            assert_eq!(&after, rows, "{table}: host rows or columns changed");
        }
    }

    // Extension columns arrived with their defaults on the host's rows.
    let rows = client
        .query(
            "SELECT priority, attempts, failed_count, updated_at IS NOT NULL, lease_token IS NULL \
             FROM pq_migration_jobs",
            &[],
        )
        .await
        .expect("extension columns");
    assert!(!rows.is_empty());
    for r in rows {
        assert_eq!(r.get::<_, i16>(0), 0);
        assert_eq!(r.get::<_, i32>(1), 0);
        assert_eq!(r.get::<_, i64>(2), 0);
        assert!(r.get::<_, bool>(3));
        assert!(r.get::<_, bool>(4));
    }
    // The host had already registered ML-KEM-768: seeding must not duplicate it.
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM crypto_algorithms WHERE class = 'kem' AND name = 'ML-KEM' AND variant = '768'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    assert!(migrate::check_current(&client).await.is_ok());
}

#[tokio::test]
async fn concurrent_migrate_processes_serialise() {
    let db = TestDb::new().await;
    let children: Vec<_> = (0..4)
        .map(|_| {
            pqmig(&["migrate"], &[("DATABASE_URL", db.url.as_str())])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "a concurrent migrate failed: {}",
            stderr(&out)
        );
    }
    let client = db.client().await;
    let rows: Vec<i32> = client
        .query(
            "SELECT version FROM pqmig_schema_history ORDER BY version",
            &[],
        )
        .await
        .expect("history")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<i32> = (1..=migrate::latest_version()).collect();
    assert_eq!(rows, expected, "each migration recorded exactly once");
}

/// (alias, class, name, variant, pq)
const SEEDED: &[(&str, &str, &str, Option<&str>, bool)] = &[
    ("ML-KEM-512", "kem", "ML-KEM", Some("512"), true),
    ("ML-KEM-768", "kem", "ML-KEM", Some("768"), true),
    ("ML-KEM-1024", "kem", "ML-KEM", Some("1024"), true),
    ("X-Wing", "kem", "X-Wing", None, true),
    ("X25519", "kem", "X25519", None, false),
    ("ML-DSA-44", "sig", "ML-DSA", Some("44"), true),
    ("ML-DSA-65", "sig", "ML-DSA", Some("65"), true),
    ("ML-DSA-87", "sig", "ML-DSA", Some("87"), true),
    (
        "SLH-DSA-SHA2-128s",
        "sig",
        "SLH-DSA",
        Some("SHA2-128s"),
        true,
    ),
    (
        "SLH-DSA-SHA2-128f",
        "sig",
        "SLH-DSA",
        Some("SHA2-128f"),
        true,
    ),
    ("Ed25519", "sig", "Ed25519", None, false),
    ("ECDSA-P256", "sig", "ECDSA", Some("P-256"), false),
    ("SHA-256", "hash", "SHA-256", None, false),
    ("SHA-384", "hash", "SHA-384", None, false),
    ("SHA-512", "hash", "SHA-512", None, false),
    ("SHA3-256", "hash", "SHA3-256", None, false),
    ("SHA3-512", "hash", "SHA3-512", None, false),
    ("HMAC-SHA-256", "hash", "HMAC", Some("SHA-256"), true),
    ("HMAC-SHA-512", "hash", "HMAC", Some("SHA-512"), true),
    ("HMAC-SHA3-256", "hash", "HMAC", Some("SHA3-256"), true),
    ("HMAC-SHA3-512", "hash", "HMAC", Some("SHA3-512"), true),
    ("AES-256-GCM", "symmetric", "AES-GCM", Some("256"), true),
];

#[tokio::test]
async fn every_seeded_algorithm_has_its_alias() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    for &(alias, class, name, variant, pq) in SEEDED {
        // Aliases match case-insensitively.
        let asked = alias.to_lowercase();
        let row = client
            .query_one(
                "SELECT a.class, a.name::text, a.variant::text, (a.params->>'pq')::boolean, a.status \
                 FROM crypto_standard_aliases s JOIN crypto_algorithms a ON a.id = s.algo_id \
                 WHERE lower(s.alias) = lower($1)",
                &[&asked],
            )
            .await
            .unwrap_or_else(|e| panic!("alias {alias}: {e}"));
        assert_eq!(row.get::<_, String>(0), class, "{alias}");
        assert_eq!(row.get::<_, String>(1), name, "{alias}");
        assert_eq!(
            row.get::<_, Option<String>>(2).as_deref(),
            variant,
            "{alias}"
        );
        assert_eq!(row.get::<_, bool>(3), pq, "{alias}");
        assert_eq!(row.get::<_, String>(4), "active", "{alias}");
    }
    let n: i64 = client
        .query_one("SELECT count(*) FROM crypto_standard_aliases", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        n as usize,
        SEEDED.len(),
        "exactly one alias per seeded algorithm"
    );
}

#[tokio::test]
async fn check_constraints_reject_bad_enumerations() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let bad = [
        "INSERT INTO pq_migration_jobs (scope) VALUES ('everything')",
        "INSERT INTO pq_migration_jobs (scope, status) VALUES ('hashes', 'paused')",
        "INSERT INTO crypto_algorithms (class, name) VALUES ('cipher', 'X')",
        "INSERT INTO crypto_algorithms (class, name, status) VALUES ('kem', 'X', 'beta')",
        "INSERT INTO encryption_policies (policy_name, mode) VALUES ('p', 'cloud')",
        "INSERT INTO encryption_policies (policy_name, mode, layer_selection) VALUES ('p', 'local', 'first')",
    ];
    for sql in bad {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{sql}: {err}");
    }
    for sql in [
        "INSERT INTO pq_migration_jobs (scope) VALUES ('hashes')",
        "INSERT INTO pq_migration_jobs (scope, status) VALUES ('wrappers', 'cancelled')",
    ] {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

#[tokio::test]
async fn a_job_inserted_with_plain_sql_sends_a_notification() {
    let db = TestDb::migrated().await;
    let (listener, mut conn) = tokio_postgres::connect(&db.url, NoTls)
        .await
        .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener
        .batch_execute("LISTEN pqmig_jobs")
        .await
        .expect("listen");

    let client = db.client().await;
    let id: i64 = client
        .query_one(
            "INSERT INTO pq_migration_jobs (scope) VALUES ('hashes') RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification within 5 s")
        .expect("channel open");
    assert_eq!(got, ("pqmig_jobs".to_owned(), id.to_string()));

    // Becoming cancelled notifies too; becoming running does not (the next
    // notification after it is the second insert's).
    client
        .execute(
            "UPDATE pq_migration_jobs SET status = 'running' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("update");
    let id2: i64 = client
        .query_one(
            "INSERT INTO pq_migration_jobs (scope) VALUES ('wrappers') RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    client
        .execute(
            "UPDATE pq_migration_jobs SET status = 'cancelled' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("update");
    for expected in [id2, id] {
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("notification within 5 s")
            .expect("channel open");
        assert_eq!(got.1, expected.to_string());
    }
}

/// `pqmig migrate` on a busy host: `--print-ddl` shows the pending SQL and
/// applies nothing; a migration whose table is locked by a long
/// transaction waits `database.lock_timeout`, is rolled back, says so and
/// tries again, and applies once the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_waits_a_bounded_time_for_a_busy_table_and_tries_again() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let latest = pqmig::db::migrate::latest_version();
    // From V7 on (V7 creates tables and a trigger on pq_migration_jobs,
    // which the application's open transaction below blocks).
    let from = 7;
    c.execute(
        "DELETE FROM pqmig_schema_history WHERE version >= $1",
        &[&from],
    )
    .await
    .expect("forget the last migrations");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("pqmig.toml");
    std::fs::write(&config, "[database]\nlock_timeout = \"500ms\"\n").expect("config");
    let config = config.display().to_string();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PQMIG_CONFIG", config.as_str()),
    ];
    let out = run(&["migrate", "--print-ddl"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let sql = stdout(&out);
    assert!(sql.contains(&format!("-- V{from}__")), "{sql}");
    assert!(sql.contains(&format!("-- V{latest}__")), "{sql}");
    assert!(sql.contains("CREATE TABLE IF NOT EXISTS"), "{sql}");
    assert_eq!(
        pqmig::db::migrate::current_version(&c)
            .await
            .expect("version"),
        Some(from - 1),
        "--print-ddl applies nothing"
    );

    // What an application's UPDATE holds, in a transaction left open.
    let mut app = db.client().await;
    let tx = app.transaction().await.expect("tx");
    tx.batch_execute("LOCK TABLE pq_migration_jobs IN ROW EXCLUSIVE MODE")
        .await
        .expect("lock");
    let child = pqmig(&["migrate"], &env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn migrate");
    // Hold the lock until migrate has been seen waiting for it, and a
    // lock_timeout longer, so its first try surely timed out.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "migrate never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tx.rollback().await.expect("the transaction ends");
    let out = child.wait_with_output().expect("migrate");
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("waited 500ms for a table lock") && err.contains("trying again"),
        "{err}"
    );
    assert!(
        stdout(&out).contains(&format!("applied V{latest}__")),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        pqmig::db::migrate::current_version(&c)
            .await
            .expect("version"),
        Some(latest)
    );
}

/// A host whose `key_wrappers` exists without the unique constraint V2
/// adds: `pqmig migrate` builds the index CONCURRENTLY first, outside the
/// migration's transaction (so the host's writes go on), and V2 then adds
/// no constraint; duplicates fail with one line naming the table and
/// columns, leaving no invalid index and the schema as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_indexes_on_existing_host_tables_are_built_concurrently() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute(
        "ALTER TABLE key_wrappers DROP CONSTRAINT uq_key_wrappers_uuid; \
         INSERT INTO key_wrappers (wrapper_uuid) \
           SELECT gen_random_uuid()::text FROM generate_series(1, 1000); \
         INSERT INTO key_wrappers (wrapper_uuid) VALUES \
           ('00000000-0000-0000-0000-000000000001'), ('00000000-0000-0000-0000-000000000001'); \
         DELETE FROM pqmig_schema_history WHERE version >= 2",
    )
    .await
    .expect("a host table without the constraint, and V2 not applied");
    let env = [("DATABASE_URL", db.url.as_str())];

    let out = run(&["migrate", "--print-ddl"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let ddl = stdout(&out);
    assert!(
        ddl.contains(
            "CREATE UNIQUE INDEX CONCURRENTLY \"uq_key_wrappers_uuid\" ON \"key_wrappers\" (\"wrapper_uuid\");"
        ),
        "{ddl}"
    );
    assert!(
        !ddl.contains("ON \"signatures\""),
        "a table that has its constraint needs no build: {ddl}"
    );

    // Duplicates: one line naming the table and columns; nothing left behind.
    let out = run(&["migrate"], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("pqmig: "))
        .unwrap_or_default();
    assert!(
        line.contains("key_wrappers: cannot add UNIQUE (wrapper_uuid): the table holds duplicates")
            && line.contains("00000000-0000-0000-0000-000000000001"),
        "{err}"
    );
    let invalid: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'key_wrappers'::regclass AND NOT indisvalid",
            &[],
        )
        .await
        .expect("indexes")
        .get(0);
    assert_eq!(invalid, 0, "no invalid index left behind");
    assert_eq!(
        pqmig::db::migrate::current_version(&c)
            .await
            .expect("version"),
        Some(1)
    );

    c.execute(
        "DELETE FROM key_wrappers WHERE id = (SELECT max(id) FROM key_wrappers)",
        &[],
    )
    .await
    .expect("the duplicate removed");
    let out = run(&["migrate"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let (index, constraint): (bool, bool) = {
        let r = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
                   WHERE i.indrelid = 'key_wrappers'::regclass AND ic.relname = 'uq_key_wrappers_uuid' \
                     AND i.indisunique AND i.indisvalid), \
                 EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'uq_key_wrappers_uuid')",
                &[],
            )
            .await
            .expect("catalog");
        (r.get(0), r.get(1))
    };
    assert!(index, "the unique index was built");
    assert!(
        !constraint,
        "built concurrently beforehand: V2 found it and added no constraint in its transaction"
    );
    assert_eq!(
        pqmig::db::migrate::current_version(&c)
            .await
            .expect("version"),
        Some(pqmig::db::migrate::latest_version())
    );
    let dup = c
        .execute(
            "INSERT INTO key_wrappers (wrapper_uuid) VALUES ('00000000-0000-0000-0000-000000000001')",
            &[],
        )
        .await;
    assert!(dup.is_err(), "the index enforces uniqueness");
}

/// V10 widens the provider CHECK for `pkcs11`, also where a host had its
/// own CHECK of V2's five providers under another name (which V2 kept).
#[tokio::test]
async fn v10_lets_kms_providers_name_pkcs11_whatever_the_old_check_was_called() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute(
        "ALTER TABLE kms_providers DROP CONSTRAINT ck_kms_prov_provider; \
         ALTER TABLE kms_providers ADD CONSTRAINT kms_providers_provider_check \
             CHECK (provider IN ('gcp', 'aws', 'azure', 'vault', 'local')); \
         DELETE FROM pqmig_schema_history WHERE version >= 10;",
    )
    .await
    .expect("a host's own CHECK, V10 not applied");
    let insert =
        "INSERT INTO kms_providers (name, provider, location) VALUES ('hsm', 'pkcs11', 't')";
    assert!(
        c.execute(insert, &[]).await.is_err(),
        "the old CHECK refuses pkcs11"
    );
    let out = run(&["migrate"], &[("DATABASE_URL", db.url.as_str())]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.execute(insert, &[])
        .await
        .expect("pkcs11 is a provider now");
    let bad = c
        .execute(
            "INSERT INTO kms_providers (name, provider) VALUES ('x', 'floppy')",
            &[],
        )
        .await;
    assert!(bad.is_err(), "other names are still refused");
    let checks: Vec<String> = c
        .query(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = 'kms_providers'::regclass AND contype = 'c'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(checks, vec!["ck_kms_prov_provider".to_owned()]);
    // Again: a no-op.
    c.execute("DELETE FROM pqmig_schema_history WHERE version >= 10", &[])
        .await
        .unwrap();
    let out = run(&["migrate"], &[("DATABASE_URL", db.url.as_str())]);
    assert!(out.status.success(), "{}", stderr(&out));
}
