//! `pqmig plan`: matched items, growth and a time estimate from a sampled
//! dry run, and nothing written.

use serde_json::Value;

use crate::support::hashes::Fixture;
use crate::support::wrappers::WrapFx;
use crate::support::{run, stderr, stdout};

fn plan(url: &str, keyring: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut a = vec!["plan"];
    a.extend_from_slice(args);
    let mut env = vec![("DATABASE_URL", url)];
    if let Some(k) = keyring {
        env.push(("PQMIG_KEYRING", k));
    }
    run(&a, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_a_wrappers_job_measures_growth_and_writes_nothing() {
    let w = WrapFx::new(120, pqmig::crypto::kem::Kem::MlKem768, 2).await;
    let before = w.snapshot().await;
    let keyring = w.fx.keyring.display().to_string();
    let url = w.fx.db.url.clone();
    let out = plan(
        &url,
        Some(&keyring),
        &[
            "--scope",
            "wrappers",
            "--policy",
            "pq-policy",
            "--selection",
            r#"{"limit": 100}"#,
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["scope"], "wrappers");
    assert_eq!(doc["matched"], 100);
    assert_eq!(
        (doc["sampled"].as_i64(), doc["sample_migrate"].as_i64()),
        (Some(50), Some(50))
    );
    // two ML-KEM-768 layers: ciphertext 1088 + public key 1184 each, the
    // legacy wraps (about 60 bytes each) replaced by one of 60
    let per = doc["bytes_per_item"].as_f64().unwrap();
    assert!(
        (2.0 * (1088.0 + 1184.0)..2.0 * (1088.0 + 1184.0) + 1200.0).contains(&per),
        "{per}"
    );
    assert!(doc["crypto_items_per_second"].as_f64().unwrap() > 0.0);
    assert!(doc["estimated_crypto_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(w.snapshot().await, before, "plan wrote nothing");
    assert_eq!(w.scalar("SELECT count(*) FROM pq_migration_jobs").await, 0);
    assert_eq!(
        w.scalar("SELECT count(*) FROM pq_migration_backups_all")
            .await,
        0
    );
    // the human form says the same
    let out = plan(
        &url,
        Some(&keyring),
        &["--scope", "wrappers", "--policy", "pq-policy"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("matched items      120"),
        "{}",
        stdout(&out)
    );
    // bad input: one line, exit 2, nothing queued
    for (args, want) in [
        (
            vec!["--scope", "wrappers", "--policy", "nope"],
            "--policy: no encryption policy named or numbered \"nope\"",
        ),
        (
            vec![
                "--scope",
                "wrappers",
                "--policy",
                "pq-policy",
                "--selection",
                r#"{"limit": -1}"#,
            ],
            "the job would fail: selection.limit",
        ),
    ] {
        let out = plan(&url, Some(&keyring), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            stderr(&out).trim_end().lines().count(),
            1,
            "{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
    }
    let out = plan(
        &url,
        None,
        &["--scope", "wrappers", "--policy", "pq-policy"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("needs the keyring"),
        "{}",
        stderr(&out)
    );
    assert_eq!(w.scalar("SELECT count(*) FROM pq_migration_jobs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_a_hashes_job() {
    let fx = Fixture::new(30).await;
    let keyring = fx.keyring.display().to_string();
    let out = plan(
        &fx.db.url,
        Some(&keyring),
        &[
            "--scope",
            "hashes",
            "--algo",
            "HMAC-SHA3-256",
            "--selection",
            r#"{"table":"users","column":"email_hash"}"#,
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (doc["matched"].as_i64(), doc["sampled"].as_i64()),
        (Some(30), Some(30))
    );
    assert_eq!(doc["matched_estimated"], false, "counted exactly");
    // SHA-256 → HMAC-SHA3-256: same length; the version grows by "pepper-v2/"
    assert_eq!(
        doc["bytes_per_item"].as_f64(),
        Some("pepper-v2/".len() as f64)
    );
    assert!(
        fx.users().await.iter().all(|u| u.2 == "v1"),
        "nothing written"
    );
}

/// Re-wrapping from a two-layer policy to a one-layer one shrinks the
/// data: the layer rows a rewrite replaces count against the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_a_policy_to_policy_rewrap_counts_the_replaced_layers() {
    use pqmig::crypto::kem::Kem;
    let mut w = WrapFx::new(30, Kem::MlKem768, 2).await;
    let daemon = crate::support::InProcess::start(&w.fx, &[]).await;
    let first = w.enqueue(w.seed.policy_id, serde_json::json!({})).await;
    let j =
        w.fx.wait_job(first, 60, crate::support::hashes::terminal)
            .await;
    daemon.stop().await;
    assert_eq!(j.status, "done", "{j:?}");
    w.add_policy("single", Kem::MlKem768, 1, "defined", 1, 1, None)
        .await;
    let keyring = w.fx.keyring.display().to_string();
    let out = plan(
        &w.fx.db.url,
        Some(&keyring),
        &["--scope", "wrappers", "--policy", "single", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["sample_migrate"], 30, "{doc}");
    // one layer (ciphertext 1088 + public key 1184) fewer per wrapper
    let per = doc["bytes_per_item"].as_f64().unwrap();
    let layer = 1088.0 + 1184.0;
    assert!((-layer - 500.0..-layer + 300.0).contains(&per), "{per}");
    assert!(doc["estimated_growth_bytes"].as_f64().unwrap() < 0.0);
}
