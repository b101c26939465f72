//! A hashes job keeps the profile it started with (a pepper rotation
//! changes nothing for it), and its backups go only after a verify of the
//! job as it finally ended.

use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use serde_json::json;

use crate::support::InProcess;
use crate::support::hashes::{Fixture, PEPPER, PROFILE, expected_hash, legacy_hash, terminal};
use crate::support::{run, stderr, stdout};

/// Rewrite the keyring with the fixture's pepper plus `extra` keys.
fn keyring_with(fx: &Fixture, extra: &[(&str, &str, [u8; 32])]) {
    let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    let mut keys = vec![
        json!({"ref": "local:pepper-v2", "algorithm": "HMAC-SHA3-256", "secret": b64(&PEPPER)}),
    ];
    for (r, alg, secret) in extra {
        keys.push(json!({"ref": r, "algorithm": alg, "secret": b64(secret)}));
    }
    let tmp = fx.keyring.with_extension("new");
    std::fs::write(&tmp, json!({"version": 1, "keys": keys}).to_string()).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, &fx.keyring).unwrap();
}

/// A newer active profile of the same algorithm (a pepper rotation).
async fn rotate(fx: &Fixture, name: &str) {
    keyring_with(fx, &[("local:pepper-v3", "HMAC-SHA3-256", [0x33; 32])]);
    fx.db
        .client()
        .await
        .execute(
            "INSERT INTO hash_profiles (name, algo_id, params, created_at) \
             VALUES ($1, $2, '{\"key_ref\": \"local:pepper-v3\"}', now() + interval '1 second')",
            &[&name, &fx.algo_id],
        )
        .await
        .unwrap();
}

fn env(fx: &Fixture) -> Vec<(&str, String)> {
    vec![
        ("DATABASE_URL", fx.db.url.clone()),
        ("PQMIG_KEYRING", fx.keyring.display().to_string()),
    ]
}

fn cli(fx: &Fixture, args: &[&str]) -> std::process::Output {
    let env = env(fx);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run(args, &env)
}

/// After the job, a newer profile of the same algorithm becomes active,
/// then the job's own profile and the algorithm are deprecated: verify
/// still checks every row with the job's pepper, rollback restores every
/// row, and a verify after the rollback says so instead of vouching for
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_rollback_use_the_jobs_own_profile_after_a_rotation() {
    let fx = Fixture::new(40).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "done");
    let pinned = &j.result.as_ref().unwrap()["profile"];
    assert_eq!(pinned["name"], PROFILE, "{pinned}");
    assert_eq!(pinned["key_ref"], "local:pepper-v2", "{pinned}");

    rotate(&fx, "pepper-v3").await;
    let c = fx.db.client().await;
    c.batch_execute(&format!(
        "UPDATE hash_profiles SET status = 'deprecated' WHERE name = '{PROFILE}'; \
         UPDATE crypto_algorithms SET status = 'deprecated' WHERE id = {}",
        fx.algo_id
    ))
    .await
    .unwrap();
    let job = id.to_string();
    let out = cli(&fx, &["verify", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("40 items verified"),
        "{}",
        stdout(&out)
    );

    // rollback needs no key: the old pepper may be gone from the keyring
    let full = std::fs::read(&fx.keyring).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode([0x33u8; 32]);
    let only_new = json!({"version": 1, "keys": [
        {"ref": "local:pepper-v3", "algorithm": "HMAC-SHA3-256", "secret": b64}]});
    std::fs::write(&fx.keyring, only_new.to_string()).unwrap();
    let out = cli(&fx, &["rollback", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restored 40 of 40"),
        "{}",
        stdout(&out)
    );
    std::fs::write(&fx.keyring, full).unwrap();
    for (uid, hash, version) in fx.users().await {
        assert_eq!((hash, version), (legacy_hash(uid), "v1".to_string()));
    }
    let out = cli(&fx, &["verify", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("was rolled back"), "{}", stdout(&out));
}

/// Backups but nothing a verify could check (every row moved on since):
/// verify fails and records nothing, so purge stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_that_checked_nothing_fails() {
    let fx = Fixture::new(10).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
    daemon.stop().await;
    fx.db
        .client()
        .await
        .execute("UPDATE users SET email_hash_key_version = 'app-v9'", &[])
        .await
        .unwrap();
    let job = id.to_string();
    let out = cli(&fx, &["verify", &job]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("10 backups but none of its items could be checked"),
        "{}",
        stderr(&out)
    );
    let out = cli(&fx, &["purge-backups", &job]);
    assert_eq!(out.status.code(), Some(2));
}

/// A job cancelled mid-way, a pepper rotation, a resume: the job finishes
/// with the profile it started with (no row under two profiles). The
/// verify of the cancelled job is cleared by the resume; purge needs a
/// verify of the done job, then deletes its backups in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_job_keeps_its_profile_and_purge_needs_a_fresh_verify() {
    const N: i64 = 12_000;
    let fx = Fixture::new(N).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx
        .enqueue(json!({"batch_size": 500, "max_rate": 4000}))
        .await;
    fx.wait_job(id, 30, |j| j.processed >= 500).await;
    let job = id.to_string();
    let out = cli(&fx, &["cancel", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(j.status, "cancelled");
    assert!(j.processed < N, "{j:?}");
    // verified as cancelled; purge still refuses a job that is not done
    let out = cli(&fx, &["verify", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&fx, &["purge-backups", &job]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is cancelled"), "{}", stderr(&out));

    rotate(&fx, "pepper-v3").await;
    let out = cli(&fx, &["resume", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = fx.wait_job(id, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.processed, N);
    assert!(
        j.result.as_ref().unwrap().get("verified").is_none(),
        "{j:?}"
    );
    for (uid, hash, version) in fx.users().await {
        assert_eq!(version, format!("{PROFILE}/v1"), "user {uid}");
        assert_eq!(hash, expected_hash(&legacy_hash(uid)), "user {uid}");
    }
    // the verify of the cancelled run does not vouch for the resumed one
    let out = cli(&fx, &["purge-backups", &job]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not been verified since it last finished"),
        "{}",
        stderr(&out)
    );
    let out = cli(&fx, &["verify", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{N} items verified")),
        "{}",
        stdout(&out)
    );
    let out = cli(&fx, &["purge-backups", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("deleted {N} backups")),
        "{}",
        stdout(&out)
    );
}

/// The pepper must be declared for exactly the target HMAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pepper_declared_for_another_hmac_is_refused() {
    let fx = Fixture::new(5).await;
    let c = fx.db.client().await;
    keyring_with(&fx, &[("local:pepper-sha2", "HMAC-SHA-256", [0x44; 32])]);
    c.execute(
        "UPDATE hash_profiles SET params = '{\"key_ref\": \"local:pepper-sha2\"}' WHERE name = $1",
        &[&PROFILE],
    )
    .await
    .unwrap();
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    let j = fx.wait_job(id, 30, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed");
    let err = j.error.unwrap_or_default();
    assert!(err.contains("is declared HMAC-SHA-256"), "{err}");
    assert_eq!(j.processed + j.failed, 0);
}

/// A rolled-back job resumed and run to the end is a new run: its
/// rollback mark goes with the resume, so a verify that finds every row
/// changed since fails instead of trusting the old rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_mark_does_not_outlive_a_resume() {
    let fx = Fixture::new(2_000).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx
        .enqueue(json!({"batch_size": 100, "max_rate": 2000}))
        .await;
    fx.wait_job(id, 30, |j| j.processed >= 100).await;
    let job = id.to_string();
    assert!(cli(&fx, &["cancel", &job]).status.success());
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "cancelled");
    let out = cli(&fx, &["rollback", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&fx, &["resume", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = fx.wait_job(id, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "done", "{j:?}");
    assert!(
        j.result.as_ref().unwrap().get("rolled_back").is_none(),
        "{j:?}"
    );
    fx.db
        .client()
        .await
        .execute("UPDATE users SET email_hash_key_version = 'app-v9'", &[])
        .await
        .unwrap();
    let out = cli(&fx, &["verify", &job]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
}

/// A pinned profile edited in place (its pepper reference) stops the
/// resumed job instead of writing on under the old pepper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_changed_in_place_stops_the_resumed_job() {
    let fx = Fixture::new(2_000).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx
        .enqueue(json!({"batch_size": 100, "max_rate": 2000}))
        .await;
    fx.wait_job(id, 30, |j| j.processed >= 100).await;
    let job = id.to_string();
    assert!(cli(&fx, &["cancel", &job]).status.success());
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "cancelled");
    keyring_with(&fx, &[("local:pepper-v3", "HMAC-SHA3-256", [0x33; 32])]);
    fx.db
        .client()
        .await
        .execute(
            "UPDATE hash_profiles SET params = '{\"key_ref\": \"local:pepper-v3\"}' WHERE name = $1",
            &[&PROFILE],
        )
        .await
        .unwrap();
    let before = fx.job(id).await.processed;
    assert!(cli(&fx, &["resume", &job]).status.success());
    let j = fx.wait_job(id, 30, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert!(
        j.error
            .as_deref()
            .unwrap_or("")
            .contains("changed in place"),
        "{j:?}"
    );
    assert_eq!(j.processed, before);
}

/// A `result` pqmig cannot read (nested deeper than serde_json reads)
/// holds the job's pins: the resumed job fails naming it instead of running
/// without them, and verify refuses it as a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_result_fails_the_job_instead_of_dropping_its_pins() {
    let fx = Fixture::new(2_000).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx
        .enqueue(json!({"batch_size": 100, "max_rate": 2000}))
        .await;
    fx.wait_job(id, 30, |j| j.processed >= 100).await;
    let job = id.to_string();
    assert!(cli(&fx, &["cancel", &job]).status.success());
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(j.status, "cancelled");
    let before = j.processed;
    fx.db
        .client()
        .await
        .execute(
            "UPDATE pq_migration_jobs SET result = result ||                jsonb_build_object('deep', (repeat('[', 300) || repeat(']', 300))::jsonb) WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert!(cli(&fx, &["resume", &job]).status.success());
    // (Fixture::job reads `result`, which serde_json cannot.)
    let c = fx.db.client().await;
    let state = || async {
        let r = c
            .query_one(
                "SELECT status, error, processed_count FROM pq_migration_jobs WHERE id = $1",
                &[&id],
            )
            .await
            .expect("job");
        (
            r.get::<_, String>(0),
            r.get::<_, Option<String>>(1),
            r.get::<_, i64>(2),
        )
    };
    crate::support::wait_until(30, "the resumed job ended", || async {
        !matches!(state().await.0.as_str(), "pending" | "running")
    })
    .await;
    daemon.stop().await;
    let (status, error, processed) = state().await;
    assert_eq!(status, "failed", "{error:?}");
    assert!(
        error
            .as_deref()
            .unwrap_or("")
            .starts_with("result: unreadable JSON"),
        "{error:?}"
    );
    assert_eq!(processed, before, "no item after the pins were lost");
    let out = cli(&fx, &["verify", &job]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("result: unreadable JSON"),
        "{}",
        stderr(&out)
    );
}

/// A verify mark is recorded only for the run of the job it checked: had
/// the job been resumed and finished again meanwhile, nothing is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_mark_applies_to_the_run_it_checked() {
    let fx = Fixture::new(10).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({})).await;
    assert_eq!(fx.wait_job(id, 30, terminal).await.status, "done");
    daemon.stop().await;
    let c = fx.db.client().await;
    let seen = pqmig::db::jobs::job_finish_state(&c, id)
        .await
        .unwrap()
        .unwrap();
    // the job runs again (as a resume and a new finish would leave it)
    c.execute(
        "UPDATE pq_migration_jobs SET finished_at = finished_at + interval '1 second' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    assert!(
        !pqmig::db::jobs::job_mark_verified(&c, id, 10, &seen)
            .await
            .unwrap()
    );
    let now = pqmig::db::jobs::job_finish_state(&c, id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        pqmig::db::jobs::job_mark_verified(&c, id, 10, &now)
            .await
            .unwrap()
    );
}
