//! The `vault` key provider against a real OpenBao dev server (Vault's
//! open-source fork: the same HTTP API and transit engine) on loopback:
//! `legacy-vault-transit` wraps (DEKs the server's transit encrypted with
//! the wrapper's uuid as associated data) are decrypted by transit, a
//! batch in one request, and re-wrapped; a sealed Vault is waited out with
//! nothing lost; a wrong uuid is an item's `integrity` failure; a pepper
//! held as a transit HMAC key rehashes the hashes scope, and a token
//! without the right fails the job, naming Vault's answer.

use std::process::Child;

use serde_json::json;

use crate::support::hashes::{Fixture, legacy_hash, terminal, terminate};
use crate::support::vault::{ROOT, VaultServer};
use crate::support::wrappers::{WrapFx, attest_with_a_sealed_key, register_kek, register_key};
use crate::support::{stderr, stdout, wait_until};

/// A real `pqmig run` with `token`, retrying quickly; metrics on `port`.
fn daemon(fx: &Fixture, token: &str, port: u16, name: &str) -> Child {
    let config = fx.dir.path().join("pqmig.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"200ms\"\nretry_backoff_max = \"1s\"\nmax_attempts = 50\n",
    )
    .expect("config");
    let config = config.display().to_string();
    let metrics = format!("127.0.0.1:{port}");
    fx.spawn_daemon(
        name,
        &[
            ("VAULT_TOKEN", token),
            ("PQMIG_CONFIG", config.as_str()),
            ("PQMIG_METRICS_ADDR", metrics.as_str()),
        ],
    )
}

/// `pqmig ARGS` with the root token.
fn cli(fx: &Fixture, args: &[&str]) -> std::process::Output {
    let keyring = fx.keyring.display().to_string();
    crate::support::run(
        args,
        &[
            ("DATABASE_URL", fx.db.url.as_str()),
            ("PQMIG_KEYRING", keyring.as_str()),
            ("VAULT_TOKEN", ROOT),
        ],
    )
}

fn requests(operation: &str, outcome: &str) -> String {
    format!(
        "pqmig_key_provider_requests_total{{operation=\"{operation}\",outcome=\"{outcome}\",provider=\"vault\"}} "
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_vault_transit_wraps_are_decrypted_by_transit_through_a_sealed_vault() {
    let w = WrapFx::new(2, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let bao = VaultServer::start();
    bao.key("kek-vault", json!({"type": "aes256-gcm96"}));
    let c = w.fx.db.client().await;
    let key = register_kek(&c, "vault-1", "vault", &bao.location(), "kek-vault").await;
    // Wraps made by transit itself, the uuid as associated data; the last
    // under another uuid (a wrap copied to another row).
    let mut deks = Vec::new();
    for i in 0..7 {
        let uuid = uuid::Uuid::new_v4().to_string();
        let dek: [u8; 32] = rand::random();
        let aad = if i == 6 {
            uuid::Uuid::new_v4().to_string()
        } else {
            uuid.clone()
        };
        let wrap = bao.encrypt("kek-vault", &dek, aad.as_bytes()).into_bytes();
        let id: i64 = c
            .query_one(
                "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1, crypto_suite) \
                 VALUES ($1::text::uuid, $2, $3, '{\"format\": \"legacy-vault-transit\"}') RETURNING id",
                &[&uuid, &key, &wrap],
            )
            .await
            .unwrap()
            .get(0);
        deks.push((id, dek));
    }

    // Sealed when the job starts: every batch is a transient error until
    // the server is unsealed; nothing is lost.
    bao.seal();
    let port = crate::observe::free_port();
    let mut d = daemon(&w.fx, ROOT, port, "d");
    let job = w
        .enqueue(
            w.seed.policy_id,
            json!({"batch_size": 50, "max_failures": 5}),
        )
        .await;
    wait_until(60, "the job met the sealed Vault", || async {
        w.fx.log("d").contains("Vault is sealed")
    })
    .await;
    bao.unseal();
    let j = w.fx.wait_job(job, 90, terminal).await;
    let unavailable = crate::observe::scrape(port, &requests("decrypt", "unavailable")).await;
    let ok = crate::observe::scrape(port, &requests("decrypt", "ok")).await;
    terminate(&mut d);
    let log = w.fx.log("d");
    assert_eq!(j.status, "failed", "{:?}\n{log}", j.error);
    assert_eq!(j.error.as_deref(), Some("1 items failed"));
    assert_eq!(
        (j.processed, j.failed),
        (8, 1),
        "2 local + 7 transit wrappers, 1 failed"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("retrying") && l.contains("Vault unavailable: 503")),
        "the batch was retried, naming Vault's answer:\n{log}"
    );
    assert!(unavailable >= 1.0 && ok >= 1.0, "{unavailable} {ok}");
    let errors = w.fx.item_errors(job).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (deks[6].0, "integrity"),
        "{errors:?}"
    );
    assert!(
        errors[0]
            .2
            .contains("legacy-vault-transit: dek_wrap1 does not open"),
        "{errors:?}"
    );
    // pyca opens the new wraps to the DEKs transit had encrypted.
    w.assert_pyca_opens(&deks[..6]).await;
    let out = cli(&w.fx, &["verify", &job.to_string()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("8 items verified"),
        "{}",
        stdout(&out)
    );

    let out = cli(&w.fx, &["keys", "list"]);
    assert!(
        stdout(&out).contains("usable: open legacy-vault-transit/unseal (in Vault transit"),
        "{}",
        stdout(&out)
    );
    let out = cli(&w.fx, &["keys", "check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("Vault transit encrypted and decrypted a test string"),
        "{}",
        stdout(&out)
    );

    // A signing key sealed by transit signs an attestation of the job
    // (unsealed by transit, the name as associated data); renamed, it no
    // longer opens.
    c.execute("DELETE FROM key_wrappers WHERE id = $1", &[&deks[6].0])
        .await
        .unwrap();
    let job2 = w.enqueue(w.seed.policy_id, json!({})).await;
    let mut d = daemon(&w.fx, ROOT, crate::observe::free_port(), "d2");
    let j2 = w.fx.wait_job(job2, 60, terminal).await;
    terminate(&mut d);
    assert_eq!(j2.status, "done", "{:?}", j2.error);
    let run = |args: &[&str]| cli(&w.fx, args);
    let sealed = attest_with_a_sealed_key(&c, run, key, "vault-attest", job2).await;
    assert!(sealed.starts_with(b"vault:v1:"), "sealed by transit");
}

/// A pepper held as a transit HMAC key (SHA3-256, which neither KMS nor
/// PKCS#11 offers): transit computes each batch's MACs in one request and
/// verifies them in another; the values are the HMACs the test computes
/// with the key exported from the server. A token without the right to
/// use the key fails the job with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transit_hmac_pepper_rehashes_and_a_token_without_the_right_fails_the_job() {
    use hmac::{KeyInit, Mac};
    const N: i64 = 300;
    let fx = Fixture::new(N).await;
    let bao = VaultServer::start();
    // Exportable here only so the test can check the values itself.
    bao.key(
        "pepper",
        json!({"type": "hmac", "key_size": 32, "exportable": true}),
    );
    let pepper = bao.export_hmac_key("pepper");
    // Rotated before the job: the key's newest version is 2, and the
    // profile's `pepper@1` must keep using version 1.
    let (status, body) = bao.call("POST", "transit/keys/pepper/rotate", json!({}));
    assert_eq!(status, 200, "{body}");
    let c = fx.db.client().await;
    let key = register_key(
        &c,
        "vault-p",
        "vault",
        &bao.location(),
        "pepper@1",
        "HMAC-SHA3-256",
    )
    .await;
    let algo = fx
        .profile(
            "vault-v3",
            "HMAC-SHA3-256",
            json!({"kms_key_id": key}),
            Some(20),
        )
        .await;
    c.execute(
        "UPDATE hash_profiles SET status = 'deprecated' WHERE name = 'pepper-v2'",
        &[],
    )
    .await
    .unwrap();
    let selection = json!({"table": "users", "column": "email_hash", "batch_size": 1000});

    // A token allowed to decrypt only: Vault says 403, the job fails
    // naming it, nothing is written.
    let weak = bao.token("path \"transit/decrypt/*\" { capabilities = [\"update\"] }");
    let port = crate::observe::free_port();
    let mut d = daemon(&fx, &weak, port, "weak");
    let job = fx.enqueue_raw(Some(algo), selection.clone()).await;
    let j = fx.wait_job(job, 60, terminal).await;
    let refused = crate::observe::scrape(port, &requests("mac", "refused")).await;
    terminate(&mut d);
    assert_eq!(j.status, "failed", "{:?}", j.error);
    let error = j.error.unwrap_or_default();
    assert!(
        error.contains("Vault 403")
            && error.contains("permission denied")
            && error.contains(&format!("kms_keys {key}")),
        "{error}"
    );
    assert!(refused >= 1.0);
    assert!(
        fx.users()
            .await
            .iter()
            .all(|(id, h, v)| *h == legacy_hash(*id) && v == "v1"),
        "a refused job wrote nothing"
    );

    let port = crate::observe::free_port();
    let mut d = daemon(&fx, ROOT, port, "d");
    let job = fx.enqueue_raw(Some(algo), selection).await;
    let j = fx.wait_job(job, 60, terminal).await;
    let macs = crate::observe::scrape(port, &requests("mac", "ok")).await;
    let verified = crate::observe::scrape(port, &requests("verify_mac", "ok")).await;
    terminate(&mut d);
    assert_eq!(j.status, "done", "{:?}\n{}", j.error, fx.log("d"));
    assert_eq!((j.processed, j.failed), (N, 0));
    // 300 rows in batches of up to 1000: 200 per request, so 2 requests
    // each way, not 300.
    assert!(
        (1.0..=4.0).contains(&macs) && (1.0..=4.0).contains(&verified),
        "{macs} {verified}"
    );
    for (id, hash, version) in fx.users().await {
        let mut mac = hmac::SimpleHmac::<sha3::Sha3_256>::new_from_slice(&pepper).unwrap();
        mac.update(&legacy_hash(id));
        assert_eq!(hash, mac.finalize().into_bytes()[..20].to_vec(), "row {id}");
        assert_eq!(version, "vault-v3/v1", "row {id}");
    }
    let out = cli(&fx, &["verify", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{N} items verified")),
        "{}",
        stdout(&out)
    );
    let out = cli(&fx, &["keys", "check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("Vault transit computed and verified an HMAC-SHA3-256"),
        "{}",
        stdout(&out)
    );

    // The row edited to name another version: the job's pepper would be
    // another, so `verify` refuses, naming what the job started with.
    c.execute(
        "UPDATE kms_keys SET external_key_ref = 'pepper@2' WHERE id = $1",
        &[&key],
    )
    .await
    .unwrap();
    let out = cli(&fx, &["verify", &job.to_string()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("changed since the job started") && stderr(&out).contains("pepper@1"),
        "{}",
        stderr(&out)
    );
}
