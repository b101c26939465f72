//! `pqmig enqueue`: validated like the daemon validates, nothing queued on
//! bad input, the id printed on success.

use crate::support::hashes::Fixture;
use crate::support::{run, stderr, stdout};

#[tokio::test]
async fn enqueue_validates_then_queues() {
    let fx = Fixture::new(5).await;
    let keyring = fx.keyring.display().to_string();
    let env = [
        ("DATABASE_URL", fx.db.url.as_str()),
        ("PQMIG_KEYRING", keyring.as_str()),
    ];
    let sel = r#"{"table":"users","column":"email_hash","batch_size":10}"#;

    let out = run(
        &[
            "enqueue",
            "--scope",
            "hashes",
            "--algo",
            "hmac-sha3-256",
            "--selection",
            sel,
            "--in",
            "10m",
            "--priority",
            "5",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id: i64 = stdout(&out)
        .trim()
        .parse()
        .expect("the new id alone on stdout");
    let row = fx
        .db
        .client()
        .await
        .query_one(
            "SELECT scope, target_algo_id, selection->>'batch_size', priority, \
                    extract(epoch FROM scheduled_at - now())::float8 FROM pq_migration_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "hashes");
    assert_eq!(row.get::<_, i64>(1), fx.algo_id);
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("10"));
    assert_eq!(row.get::<_, i16>(3), 5);
    let due_in = row.get::<_, f64>(4);
    assert!((590.0..=600.0).contains(&due_in), "{due_in}");

    let file = fx.dir.path().join("sel.json");
    std::fs::write(&file, sel).expect("write");
    let at_file = format!("@{}", file.display());
    let second = |extra: &[&str]| {
        let algo = fx.algo_id.to_string();
        let mut args = vec![
            "enqueue",
            "--scope",
            "hashes",
            "--algo",
            &algo,
            "--selection",
            &at_file,
            "--at",
            "2030-01-01T00:00:00Z",
        ];
        args.extend_from_slice(extra);
        run(&args, &env)
    };
    // The same items as the pending job: refused, naming it, nothing queued.
    let out = second(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "job {id} (pending) already covers some of these hashes items"
        )) && stderr(&out).trim_end().lines().count() == 1,
        "{}",
        stderr(&out)
    );
    let out = second(&["--allow-overlap"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Finished jobs overlap nothing; id windows that do not meet do not
    // overlap; one inside another's does.
    let c = fx.db.client().await;
    c.batch_execute("UPDATE pq_migration_jobs SET status = 'cancelled'")
        .await
        .expect("cancel both");
    let windowed = |sel: &str| {
        run(
            &[
                "enqueue",
                "--scope",
                "hashes",
                "--algo",
                "hmac-sha3-256",
                "--selection",
                sel,
            ],
            &env,
        )
    };
    for sel in [
        r#"{"table":"users","column":"email_hash","id_to":500}"#,
        r#"{"table":"users","column":"email_hash","id_from":501}"#,
    ] {
        let out = windowed(sel);
        assert!(out.status.success(), "{sel}: {}", stderr(&out));
    }
    let out = windowed(r#"{"table":"users","column":"email_hash","id_from":400,"id_to":450}"#);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("already covers"), "{}", stderr(&out));
    let pending: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_jobs WHERE status = 'pending'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(pending, 2, "the two disjoint windows");

    let bad: &[(&[&str], &str)] = &[
        (
            &[
                "--scope",
                "hashes",
                "--algo",
                "HMAC-SHA3-256",
                "--selection",
                r#"{"tabel":"users"}"#,
            ],
            "selection.tabel: unknown key",
        ),
        (
            &["--scope", "hashes", "--algo", "SHA-256", "--selection", sel],
            "not a keyed hash",
        ),
        (
            &[
                "--scope",
                "hashes",
                "--algo",
                "ML-KEM-9000",
                "--selection",
                sel,
            ],
            "--algo: no algorithm",
        ),
        (
            &[
                "--scope",
                "hashes",
                "--algo",
                "HMAC-SHA3-256",
                "--selection",
                "{nope",
            ],
            "--selection: invalid JSON",
        ),
        (
            &["--scope", "everything", "--algo", "HMAC-SHA3-256"],
            "--scope",
        ),
        (
            &[
                "--scope",
                "hashes",
                "--algo",
                "HMAC-SHA3-256",
                "--selection",
                sel,
                "--in",
                "soon",
            ],
            "--in",
        ),
        (
            &["--scope", "hashes", "--policy", "nope", "--selection", sel],
            "--policy: no encryption policy",
        ),
    ];
    for (args, expected) in bad {
        let mut argv = vec!["enqueue"];
        argv.extend_from_slice(args);
        let out = run(&argv, &env);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(expected) && err.trim_end().lines().count() == 1,
            "{argv:?}: {err}"
        );
    }
    let n: i64 = fx
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM pq_migration_jobs", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 4, "nothing queued on bad input");
    c.batch_execute("UPDATE pq_migration_jobs SET status = 'cancelled'")
        .await
        .expect("cancel all");

    // Without a keyring the database checks still run, and a note says the
    // key is checked later.
    let out = run(
        &[
            "enqueue",
            "--scope",
            "hashes",
            "--algo",
            "HMAC-SHA3-256",
            "--selection",
            sel,
        ],
        &[("DATABASE_URL", fx.db.url.as_str())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not checked here"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_keyring_that_is_not_there_is_the_callers_to_fix() {
    let fx = Fixture::new(1).await;
    let missing = fx.dir.path().join("no-such-keyring.json");
    let missing = missing.display().to_string();
    let env = [
        ("DATABASE_URL", fx.db.url.as_str()),
        ("PQMIG_KEYRING", missing.as_str()),
    ];
    let sel = r#"{"table":"users","column":"email_hash"}"#;
    let out = run(
        &[
            "enqueue",
            "--scope",
            "hashes",
            "--algo",
            "hmac-sha3-256",
            "--selection",
            sel,
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "the job would fail: keyring {missing}: no such file"
        )),
        "{}",
        stderr(&out)
    );
    let queued: i64 = fx
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM pq_migration_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 0, "nothing queued");
}
