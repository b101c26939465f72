//! `pqmig verify`, `rollback` and `purge-backups` on a hashes job (the
//! wrappers ones are in tests/wrappers.rs).

use serde_json::json;

use crate::support::InProcess;
use crate::support::hashes::{Fixture, PROFILE, legacy_hash, terminal};
use crate::support::{run, stderr, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_job_verify_rollback_and_purge() {
    let fx = Fixture::new(50).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
    daemon.stop().await;
    let keyring = fx.keyring.display().to_string();
    let env = [
        ("DATABASE_URL", fx.db.url.as_str()),
        ("PQMIG_KEYRING", keyring.as_str()),
    ];
    let job = id.to_string();

    let out = run(&["purge-backups", &job], &env);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // without the keyring, verify of a hashes job is a usage error (one line)
    let out = run(&["verify", &job], &[("DATABASE_URL", fx.db.url.as_str())]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("needs the keyring") && stderr(&out).trim().lines().count() == 1,
        "{}",
        stderr(&out)
    );
    let out = run(&["verify", &job], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("50 items verified"),
        "{}",
        stdout(&out)
    );

    // a hash altered after the job: verify fails and names it
    let c = fx.db.client().await;
    c.execute(
        "UPDATE users SET email_hash = sha256(email_hash) WHERE id = 7",
        &[],
    )
    .await
    .unwrap();
    let out = run(&["verify", &job], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("item 7:"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 of 50 items failed verification"),
        "{}",
        stderr(&out)
    );

    // the application moved user 9 on since: rollback leaves it alone
    c.execute(
        "UPDATE users SET email_hash_key_version = 'app-v9' WHERE id = 9",
        &[],
    )
    .await
    .unwrap();
    let out = run(&["rollback", &job], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restored 49 of 50"),
        "{}",
        stdout(&out)
    );
    for (uid, hash, version) in fx.users().await {
        match uid {
            9 => assert_eq!(version, "app-v9"),
            // restored exactly, whatever the hash had become
            _ => assert_eq!(
                (hash, version),
                (legacy_hash(uid), "v1".to_string()),
                "user {uid}"
            ),
        }
    }
    assert!(
        !fx.users()
            .await
            .iter()
            .any(|u| u.2.starts_with(&format!("{PROFILE}/")))
    );

    // verify again: the job's writing is undone, nothing is left to check
    let out = run(&["verify", &job], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("job {id} was rolled back (49 items")),
        "{}",
        stdout(&out)
    );
    let out = run(&["purge-backups", &job], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("deleted 50 backups"));
}
