//! The command line: help for every subcommand, exit codes of SPEC §8.1 and
//! one-line errors.

use crate::support::{TestDb, run, stderr, stdout};

const SUBCOMMANDS: &[&str] = &[
    "run",
    "migrate",
    "enqueue",
    "status",
    "cancel",
    "resume",
    "audit",
    "attest",
    "set",
    "pause",
    "unpause",
    "plan",
    "verify",
    "rollback",
    "purge-backups",
    "inventory",
    "keys",
    "demo",
    "bench",
];

fn assert_one_line(text: &str) {
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "expected one line on stderr, got:\n{text}"
    );
}

#[test]
fn help_lists_and_describes_every_subcommand() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let text = stdout(&out);
    for sub in SUBCOMMANDS {
        assert!(text.contains(sub), "`pqmig --help` lacks {sub}:\n{text}");
        let out = run(&[sub, "--help"], &[]);
        assert_eq!(out.status.code(), Some(0), "pqmig {sub} --help");
        assert!(
            stdout(&out).contains("Usage: pqmig"),
            "pqmig {sub} --help:\n{}",
            stdout(&out)
        );
    }
}

#[test]
fn usage_error_exits_2() {
    let out = run(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["cancel", "not-a-number"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_database_url_exits_2_with_one_line() {
    let out = run(&["migrate"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert_one_line(&err);
    assert!(
        err.contains("database.url") && err.contains("DATABASE_URL"),
        "{err}"
    );
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let env = [
        ("DATABASE_URL", "postgres://postgres@127.0.0.1/postgres"),
        ("PQMIG_LEASE", "forever"),
    ];
    let out = run(&["migrate"], &env);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_one_line(&err);
    assert!(
        err.contains("worker.lease") && err.contains("PQMIG_LEASE"),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pqmig.toml");
    std::fs::write(&file, "[worker]\nlaese = \"30s\"\n").expect("write");
    let out = run(&["--config", file.to_str().expect("utf-8"), "migrate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_one_line(&err);
    assert!(err.contains("laese"), "{err}");
}

#[test]
fn unreachable_database_exits_1_with_one_line() {
    // Port 1 on loopback: nothing listens there.
    let env = [(
        "DATABASE_URL",
        "postgres://postgres:hunter2-secret@127.0.0.1:1/x?connect_timeout=2",
    )];
    let out = run(&["migrate"], &env);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_one_line(&err);
    assert!(
        err.contains("cannot connect") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("hunter2-secret"), "password leaked: {err}");
}

#[tokio::test]
async fn migrate_command_applies_then_reports_up_to_date() {
    let db = TestDb::new().await;
    let env = [("DATABASE_URL", db.url.as_str())];
    let out = run(&["migrate"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("applied V1__"), "{text}");
    let latest = pqmig::db::migrate::latest_version();
    assert!(text.contains(&format!("version {latest}")), "{text}");

    let out = run(&["migrate"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("up to date"), "{}", stdout(&out));
}

#[tokio::test]
async fn run_refuses_a_schema_that_was_never_migrated() {
    let db = TestDb::new().await;
    let out = run(&["run"], &[("DATABASE_URL", db.url.as_str())]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_one_line(&err);
    assert!(err.contains("pqmig migrate"), "{err}");
}

#[tokio::test]
async fn run_refuses_an_outdated_schema() {
    let db = TestDb::migrated().await;
    let latest = pqmig::db::migrate::latest_version();
    db.client()
        .await
        .execute(
            "DELETE FROM pqmig_schema_history WHERE version = $1",
            &[&latest],
        )
        .await
        .expect("forget the last migration");
    let out = run(&["run"], &[("DATABASE_URL", db.url.as_str())]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_one_line(&err);
    assert!(err.contains("pqmig migrate"), "{err}");
    assert!(err.contains(&format!("version {}", latest - 1)), "{err}");
}
