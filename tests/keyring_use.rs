//! The keyring in use (SPEC §4): `pqmig keys list` / `keys check` against
//! `kms_keys`, and a keyring that changes under a running daemon — read
//! again without a restart, a bad new file refused with the old keys kept,
//! a missing file a transient error, SIGHUP a reload.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use pqmig::keys::{KeyProvider, Keyring, LocalKeyring};
use serde_json::{Value, json};

use crate::support::hashes::{Fixture, PEPPER, assert_absent, signal, terminate};
use crate::support::{TestDb, b64, run, stderr, stdout, wait_until};

/// Replace the file at `path` as `pqmig keys generate` and kubelet do: a
/// new file renamed over the old one.
fn replace(path: &Path, text: &str, mode: u32) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write keyring");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename keyring");
}

fn pepper_doc(key_ref: &str) -> String {
    json!({"version": 1, "keys": [
        {"ref": key_ref, "algorithm": "HMAC-SHA3-256", "secret": b64(&PEPPER)}
    ]})
    .to_string()
}

fn keys(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut a = vec!["keys"];
    a.extend_from_slice(args);
    run(&a, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_keys_list_and_check_name_what_cannot_be_used() {
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyring.json");
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PQMIG_KEYRING", path.to_str().expect("utf-8")),
    ];
    for (alg, key_ref) in [
        ("AES-256-GCM", "local:kek"),
        ("X25519", "local:ecies"),
        ("ML-KEM-768", "local:pq-a"),
        ("X-Wing", "local:hyb"),
    ] {
        let out = keys(
            &[
                "generate",
                "--algorithm",
                alg,
                "--ref",
                key_ref,
                "--register",
            ],
            &env,
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = keys(
        &[
            "generate",
            "--algorithm",
            "HMAC-SHA3-256",
            "--ref",
            "local:pep",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Registered but not in the keyring; a pepper row; a retired key of a
    // provider this build lacks.
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO kms_keys (provider_id, external_key_ref, purpose, algorithm) \
           SELECT id, 'local:gone', 'wrap', 'AES-256-GCM' FROM kms_providers WHERE provider = 'local'; \
         INSERT INTO kms_keys (provider_id, external_key_ref, purpose, algorithm) \
           SELECT id, 'local:pep', 'encrypt', 'HMAC-SHA3-256' FROM kms_providers WHERE provider = 'local'; \
         INSERT INTO kms_providers (name, provider, location) VALUES ('prod kms', 'gcp', 'europe-west1'); \
         INSERT INTO kms_keys (provider_id, external_key_ref, purpose, algorithm, status) \
           SELECT id, 'projects/p/locations/eu/keyRings/r/cryptoKeys/x', 'wrap', 'AES-256-GCM', 'retired' \
           FROM kms_providers WHERE provider = 'gcp';",
    )
    .await
    .expect("rows");
    let gone: i64 = c
        .query_one(
            "SELECT id FROM kms_keys WHERE external_key_ref = 'local:gone'",
            &[],
        )
        .await
        .expect("id")
        .get(0);
    let secrets = || -> Vec<Vec<u8>> {
        let ring = LocalKeyring::load(&path).expect("keyring");
        ring.entries().map(|(_, s)| s.bytes.to_vec()).collect()
    };

    let out = keys(&["list"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "local:kek",
        "usable: open/unseal",
        "usable: decapsulate",
        "usable: hmac",
        "local (local keyring)",
        "not usable: key \"local:gone\" is not in the keyring",
        "gcp (prod kms)",
        "retired",
        "not usable: provider gcp is not supported yet",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    assert_eq!(
        text.lines().count(),
        1 + 7,
        "a header and one line per row:\n{text}"
    );
    let out = keys(&["list", "--json"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rows = doc["keys"].as_array().expect("keys");
    assert_eq!(rows.len(), 7);
    let row = |r: &str| {
        rows.iter()
            .find(|k| k["external_key_ref"] == r)
            .unwrap_or_else(|| panic!("{r} in {doc}"))
    };
    assert_eq!(row("local:pq-a")["usable"], true);
    assert_eq!(row("local:pq-a")["detail"], "usable: decapsulate");
    assert_eq!(row("local:gone")["usable"], false);
    assert_eq!(row("local:gone")["id"], gone);
    assert_eq!(
        row("projects/p/locations/eu/keyRings/r/cryptoKeys/x")["provider"],
        "gcp"
    );
    assert_eq!(
        row("projects/p/locations/eu/keyRings/r/cryptoKeys/x")["provider_enabled"],
        true
    );
    let listed = format!("{text}{}{}", stdout(&out), stderr(&out));
    assert_absent(&listed, &secrets());

    let out = keys(&["check"], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("kms_keys {gone} \"local:gone\""))
            && err.contains("not in the keyring"),
        "{err}"
    );
    let text = stdout(&out);
    assert!(
        text.contains("encapsulated to its public key and decapsulated"),
        "{text}"
    );
    assert_absent(&format!("{text}{err}"), &secrets());

    // The fix: the key put in the keyring.
    let out = keys(
        &[
            "generate",
            "--algorithm",
            "AES-256-GCM",
            "--ref",
            "local:gone",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = keys(&["check"], &env);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    // One line per active row (the retired gcp key is not checked).
    assert_eq!(text.lines().count(), 6, "{text}");
    assert!(text.lines().all(|l| l.starts_with("ok ")), "{text}");
    for want in [
        "sealed and opened a test string",
        "sealed to its public key and opened",
        "computed an HMAC",
        "public key 1184 bytes, SHA-256 ",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    assert_absent(&format!("{text}{}", stderr(&out)), &secrets());

    // An active key of an unsupported provider fails the check.
    c.batch_execute(
        "UPDATE kms_keys SET status = 'active' WHERE external_key_ref LIKE 'projects/%'",
    )
    .await
    .expect("activate");
    let out = keys(&["check"], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("provider gcp is not supported yet"),
        "{}",
        stderr(&out)
    );

    // A keyring that does not load: said once, with the fix.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = keys(&["check"], &env);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("run chmod 600"), "{err}");
    assert!(
        stdout(&out).contains("the keyring does not load"),
        "{}",
        stdout(&out)
    );
    let out = keys(&["list"], &env);
    assert!(out.status.success());
    assert!(stderr(&out).contains("run chmod 600"), "{}", stderr(&out));
}

/// The keyring a daemon holds, driven directly: a changed file is read
/// again, a bad or missing one leaves the keys loaded before, and with
/// none loaded a missing file is transient.
#[test]
fn keyring_reload_keeps_old_keys_on_a_bad_or_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyring.json");
    let ring = Keyring::new(path.clone());
    let err = ring.current().expect_err("no file yet");
    assert!(err.is_transient(), "{err}");
    assert!(ring.missing());

    replace(&path, &pepper_doc("local:a"), 0o600);
    let a = ring.current().expect("loads");
    assert!(a.secret("local:a").is_ok());
    assert!(!ring.missing());
    assert!(
        std::sync::Arc::ptr_eq(&a, &ring.current().expect("same")),
        "unchanged: not read again"
    );

    // Bad JSON, then a world-readable file: refused, the old keys stay.
    for (text, mode) in [
        ("{\"version\": 1, \"keys\": [", 0o600),
        (&*pepper_doc("local:b"), 0o644),
    ] {
        replace(&path, text, mode);
        let kept = ring.current().expect("old keys");
        assert!(kept.secret("local:a").is_ok());
        let err = ring.reload().expect_err("refused").to_string();
        assert!(!err.contains('\n'), "{err}");
        assert_absent(&err, &[PEPPER.to_vec()]);
    }
    // Missing for a moment: the old keys still.
    std::fs::remove_file(&path).expect("rm");
    assert!(ring.current().expect("old keys").secret("local:a").is_ok());
    assert!(!ring.missing(), "keys are loaded");

    replace(&path, &pepper_doc("local:b"), 0o600);
    let b = ring.current().expect("new keys");
    assert!(b.secret("local:b").is_ok());
    assert!(
        b.secret("local:a").is_err(),
        "the new file replaces the keys"
    );
    assert_eq!(ring.reload().expect("reload"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_rewritten_between_jobs_is_used_without_restart() {
    let fx = Fixture::new(30).await;
    // The daemon starts with a keyring that lacks the profile's pepper.
    replace(&fx.keyring, &pepper_doc("local:other"), 0o600);
    let daemon = crate::support::daemon::InProcess::start(&fx, &[]).await;
    let first = fx.enqueue(json!({})).await;
    let j = fx
        .wait_job(first, 30, crate::support::hashes::terminal)
        .await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert!(
        j.error
            .as_deref()
            .is_some_and(|e| e.contains("local:pepper-v2")),
        "{j:?}"
    );
    // Rotated in place: the next job uses the new file, same process.
    replace(&fx.keyring, &pepper_doc("local:pepper-v2"), 0o600);
    let second = fx.enqueue(json!({})).await;
    let j = fx
        .wait_job(second, 30, crate::support::hashes::terminal)
        .await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.processed, 30);
    fx.assert_all_migrated_once().await;
    daemon.stop().await;
}

/// With no keys loaded yet, a job whose keyring is missing is retried (a
/// transient error) and goes through once the file is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_missing_then_restored_does_not_fail_the_job() {
    let fx = Fixture::new(30).await;
    let away = fx.dir.path().join("keyring.away");
    std::fs::rename(&fx.keyring, &away).expect("move keyring away");
    let mut config = crate::support::daemon::config(&fx, &[]);
    config.worker.retry_backoff = Duration::from_millis(300);
    config.worker.retry_backoff_max = Duration::from_secs(1);
    let daemon = crate::support::daemon::InProcess::start_with(config).await;
    let id = fx.enqueue(json!({})).await;
    // Past the grace (pqmig::scope::KEYRING_GRACE): retried as transient.
    let transient = "pqmig_batch_retries_total{reason=\"transient\"} ";
    wait_until(30, "a transient retry of the job", || async {
        let (_, text) = crate::observe::http_get(daemon.addr, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(transient))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v > 0.0)
    })
    .await;
    let j = fx.job(id).await;
    assert_ne!(j.status, "failed", "{j:?}");
    std::fs::rename(&away, &fx.keyring).expect("restore keyring");
    let j = fx.wait_job(id, 60, crate::support::hashes::terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.processed, 30);
    daemon.stop().await;
}

/// `pqmig run` re-reads the keyring on SIGHUP (and is not killed by it),
/// refuses a bad file with a warning that carries no secret, and notices
/// a changed file by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_sighup_reloads_a_running_daemon() {
    let fx = Fixture::new(0).await;
    let mut child = fx.spawn_daemon("hup", &[]);
    let log = |want: &'static str, n: usize| {
        let fx = &fx;
        move || async move { fx.log("hup").matches(want).count() >= n }
    };
    wait_until(30, "keyring loaded at start", log("keyring loaded", 1)).await;
    signal(&child, libc::SIGHUP);
    wait_until(10, "keyring reloaded on SIGHUP", log("keyring reloaded", 1)).await;
    // A bad file, noticed by the watch: refused, named, no secret.
    let bad = format!(
        "{{\"version\": 1, \"keys\": [{{\"ref\": \"x\", \"secret\": \"{}\"",
        b64(&PEPPER)
    );
    replace(&fx.keyring, &bad, 0o600);
    wait_until(20, "the bad file refused", log("keyring not reloaded", 1)).await;
    replace(&fx.keyring, &pepper_doc("local:pepper-v3"), 0o600);
    wait_until(20, "the new file read", log("keyring reloaded", 2)).await;
    terminate(&mut child);
    assert_absent(&fx.log("hup"), &[PEPPER.to_vec()]);
}
