//! The `aws` key provider against AWS KMS as moto serves it on loopback:
//! `legacy-aws-kms` wraps (DEKs encrypted by KMS, by boto3, with the
//! wrapper's uuid as encryption context) are decrypted by KMS and
//! re-wrapped, and pyca opens the new wraps to the DEKs; throttling and
//! 5xx are waited out with nothing lost; a wrong context is an item's
//! `integrity` failure; KMS refusing fails the job, naming its error code.

use std::process::Child;

use serde_json::json;

use crate::support::hashes::{Fixture, legacy_hash, terminal, terminate};
use crate::support::kms::KmsServer;
use crate::support::wrappers::{WrapFx, attest_with_a_sealed_key, register_kek, register_key};
use crate::support::{stderr, stdout};

/// An `aws` provider of region us-east-1 and a `kms_keys` row for `arn`.
async fn register(c: &tokio_postgres::Client, name: &str, arn: &str) -> i64 {
    register_kek(c, name, "aws", "us-east-1", arn).await
}

/// `n` `legacy-aws-kms` wrappers made by boto3 (those in `wrong_context`
/// under another uuid's context): (key id, [(wrapper id, DEK)]).
async fn seed(
    w: &WrapFx,
    kms: &KmsServer,
    n: usize,
    wrong: &[usize],
) -> (i64, Vec<(i64, [u8; 32])>) {
    let c = w.fx.db.client().await;
    let uuids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let (arn, wraps) = kms.wrap(&uuids, wrong);
    let key = register(&c, "kms-main", &arn).await;
    let mut deks = Vec::new();
    for (uuid, (dek, blob)) in uuids.iter().zip(wraps) {
        let id: i64 = c
            .query_one(
                "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1, crypto_suite) \
                 VALUES ($1::text::uuid, $2, $3, '{\"format\": \"legacy-aws-kms\"}') RETURNING id",
                &[uuid, &key, &blob],
            )
            .await
            .unwrap()
            .get(0);
        deks.push((id, dek));
    }
    (key, deks)
}

/// A real `pqmig run` reaching `kms` through the SDK's standard variables,
/// retrying quickly; its metrics on `port`.
fn daemon(fx: &Fixture, kms: &KmsServer, port: u16) -> Child {
    let config = fx.dir.path().join("pqmig.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"100ms\"\nretry_backoff_max = \"1s\"\nmax_attempts = 50\n",
    )
    .expect("config");
    let mut env: Vec<(&str, String)> = kms.env();
    env.push(("PQMIG_CONFIG", config.display().to_string()));
    env.push(("PQMIG_METRICS_ADDR", format!("127.0.0.1:{port}")));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    fx.spawn_daemon("d", &env)
}

/// `pqmig ARGS` reaching `kms`.
fn cli(fx: &Fixture, kms: &KmsServer, args: &[&str]) -> std::process::Output {
    let keyring = fx.keyring.display().to_string();
    let mut env: Vec<(&str, String)> = kms.env();
    env.push(("DATABASE_URL", fx.db.url.clone()));
    env.push(("PQMIG_KEYRING", keyring));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    crate::support::run(args, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_kms_wraps_are_decrypted_by_kms_and_rewrapped_through_throttling_and_5xx() {
    let w = WrapFx::new(2, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let kms = KmsServer::start();
    let (key, deks) = seed(&w, &kms, 7, &[6]).await;
    // More throttling and 5xx than the client's own three attempts of
    // each of the batch's requests absorb: the batch fails as a whole, is
    // retried after pqmig's backoff, and goes through.
    kms.fault("Decrypt", 400, "ThrottlingException", 14).await;
    kms.fault("Decrypt", 503, "KMSInternalException", 14).await;

    let port = crate::observe::free_port();
    let mut d = daemon(&w.fx, &kms, port);
    let job = w
        .enqueue(
            w.seed.policy_id,
            json!({"batch_size": 50, "max_failures": 5}),
        )
        .await;
    let j = w.fx.wait_job(job, 90, terminal).await;
    let unavailable = crate::observe::scrape(port,
        "pqmig_key_provider_requests_total{operation=\"decrypt\",outcome=\"unavailable\",provider=\"aws\"} ",
    )
    .await;
    let ok = crate::observe::scrape(
        port,
        "pqmig_key_provider_requests_total{operation=\"decrypt\",outcome=\"ok\",provider=\"aws\"} ",
    )
    .await;
    let integrity = crate::observe::scrape(port,
        "pqmig_key_provider_requests_total{operation=\"decrypt\",outcome=\"integrity\",provider=\"aws\"} ",
    )
    .await;
    let timed = crate::observe::scrape(
        port,
        "pqmig_key_provider_request_seconds_count{operation=\"decrypt\",provider=\"aws\"} ",
    )
    .await;
    terminate(&mut d);
    let log = w.fx.log("d");
    assert_eq!(j.status, "failed", "{:?}\n{log}", j.error);
    assert_eq!(j.error.as_deref(), Some("1 items failed"));
    assert_eq!(
        (j.processed, j.failed),
        (8, 1),
        "2 local + 7 KMS wrappers, 1 failed"
    );
    assert_eq!(kms.faults_left().await, 0, "every injected fault was met");
    assert!(
        log.lines().any(|l| l.contains("retrying")
            && (l.contains("KMS unavailable: ThrottlingException")
                || l.contains("KMS unavailable: KMSInternalException"))),
        "the batch was retried, naming KMS's error:\n{log}"
    );
    assert!(
        unavailable >= 1.0 && ok >= 6.0 && integrity >= 1.0,
        "unavailable {unavailable}, ok {ok}, integrity {integrity}"
    );
    assert!(
        timed >= ok + unavailable + integrity,
        "every request timed: {timed}"
    );

    let c = w.fx.db.client().await;
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
            .contains("legacy-aws-kms: dek_wrap1 does not open"),
        "{errors:?}"
    );
    // The wrong-context wrapper is as it was; pyca opens the new wraps to
    // the DEKs boto3 had KMS encrypt.
    let suite: serde_json::Value = c
        .query_one(
            "SELECT crypto_suite FROM key_wrappers WHERE id = $1",
            &[&deks[6].0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(suite, json!({"format": "legacy-aws-kms"}));
    w.assert_pyca_opens(&deks[..6]).await;
    // `pqmig verify`: each backed-up KMS wrap is opened by KMS again and
    // must give the DEK the new wrap opens to.
    let out = cli(&w.fx, &kms, &["verify", &job.to_string()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("8 items verified"),
        "{}",
        stdout(&out)
    );

    // The operator's view: the KMS key is listed as usable in KMS, and
    // `keys check` has KMS encrypt and decrypt a test string with it.
    let out = cli(&w.fx, &kms, &["keys", "list"]);
    let listed = stdout(&out);
    let line = listed
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key} ")))
        .unwrap_or_default();
    assert!(
        line.contains("aws (kms-main)") && line.contains("usable: open legacy-aws-kms (in AWS KMS"),
        "{listed}"
    );
    let out = cli(&w.fx, &kms, &["keys", "check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!("ok      kms_keys {key} \"arn:aws:kms:us-east-1:"))
            && stdout(&out)
                .contains("KMS encrypted and decrypted a test string (region us-east-1)"),
        "{}",
        stdout(&out)
    );

    // A signing key sealed by KMS (its KEK never leaves KMS) signs the
    // attestation of a done job (the broken wrapper gone, a second job
    // finds every item migrated); bound to its name by the context.
    c.execute("DELETE FROM key_wrappers WHERE id = $1", &[&deks[6].0])
        .await
        .unwrap();
    let mut d = daemon(&w.fx, &kms, crate::observe::free_port());
    let job = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    terminate(&mut d);
    assert_eq!(j.status, "done", "{:?}", j.error);
    let run = |args: &[&str]| cli(&w.fx, &kms, args);
    let sealed = attest_with_a_sealed_key(&c, run, key, "kms-attest", job).await;
    assert!(
        sealed.len() > 32 + 40,
        "a KMS ciphertext blob: {} bytes",
        sealed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_refusing_fails_the_job_naming_the_code_and_writes_nothing() {
    let w = WrapFx::new(1, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let kms = KmsServer::start();
    let (key, deks) = seed(&w, &kms, 3, &[]).await;
    let c = w.fx.db.client().await;
    let before = w.snapshot().await;
    let port = crate::observe::free_port();
    let mut d = daemon(&w.fx, &kms, port);

    // Access denied (what an IAM policy without kms:Decrypt, or with a
    // context condition the request does not meet, gets).
    kms.fault("Decrypt", 400, "AccessDeniedException", 1000)
        .await;
    let job = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    assert_eq!(j.status, "failed");
    let error = j.error.unwrap_or_default();
    assert!(
        error.contains("AccessDeniedException")
            && error.contains(&format!("(key {key}, \"arn:aws:kms:us-east-1:")),
        "{error}"
    );
    assert_eq!(w.snapshot().await, before, "nothing written");
    let refused = crate::observe::scrape(port,
        "pqmig_key_provider_requests_total{operation=\"decrypt\",outcome=\"refused\",provider=\"aws\"} ",
    )
    .await;
    assert!(refused >= 1.0, "{refused}");

    // A key KMS does not have (deleted, or a wrong ARN): moto's own answer.
    kms.clear_faults().await;
    c.execute(
        "UPDATE kms_keys SET external_key_ref = 'arn:aws:kms:us-east-1:123456789012:key/00000000-0000-4000-8000-000000000000' WHERE id = $1",
        &[&key],
    )
    .await
    .unwrap();
    let job = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    terminate(&mut d);
    assert_eq!(j.status, "failed");
    let error = j.error.unwrap_or_default();
    assert!(error.contains("KMS NotFoundException"), "{error}");
    assert_eq!(w.snapshot().await, before, "nothing written");
    // No credentials anywhere in the SDK's chain: a refusal naming it,
    // not an outage to wait out.
    let (url, keyring) = (w.fx.db.url.clone(), w.fx.keyring.display().to_string());
    let out = crate::support::run(
        &["keys", "check"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("PQMIG_KEYRING", keyring.as_str()),
            ("AWS_ENDPOINT_URL_KMS", kms.endpoint.as_str()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("HOME", "/nonexistent"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let line = stdout(&out)
        .lines()
        .find(|l| l.contains(&format!("kms_keys {key} ")))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.starts_with("FAILED")
            && line.contains("Encrypt: KMS credentials: ")
            && line.contains("no credentials found"),
        "{}",
        stdout(&out)
    );
    let out = cli(&w.fx, &kms, &["keys", "check"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("kms_keys {key} "))
            && stderr(&out).contains("Encrypt: KMS NotFoundException"),
        "{}",
        stderr(&out)
    );
    assert_eq!(deks.len(), 3);
}

/// A pepper held as a KMS HMAC key: the hashes scope has KMS compute each
/// new hash (`GenerateMac`) and check it (`VerifyMac`) before writing, and
/// the values are those boto3 gets from KMS for the same key. A refusal
/// fails the job with nothing written; a MAC KMS does not verify fails
/// its item (`verify`) and keeps the old hash until `--retry-failed`;
/// throttling and 5xx are waited out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_hmac_pepper_rehashes_through_generate_mac_checked_by_verify_mac() {
    const N: i64 = 23;
    const CUT: usize = 24;
    let fx = Fixture::new(N).await;
    let kms = KmsServer::start();
    let olds: Vec<Vec<u8>> = (1..=N).map(legacy_hash).collect();
    let (arn, macs) = kms.macs(&olds);
    let c = fx.db.client().await;
    let key = register_key(&c, "kms-mac", "aws", "us-east-1", &arn, "HMAC-SHA-256").await;
    let algo = fx
        .profile(
            "kms-v3",
            "HMAC-SHA-256",
            json!({"kms_key_id": key}),
            Some(CUT as i16),
        )
        .await;
    let selection = json!({"table": "users", "column": "email_hash", "batch_size": 5});

    let port = crate::observe::free_port();
    let mut d = daemon(&fx, &kms, port);

    // KMS refuses: the job fails naming KMS's code, nothing is written.
    kms.fault("GenerateMac", 400, "AccessDeniedException", 1)
        .await;
    let refused = fx.enqueue_raw(Some(algo), selection.clone()).await;
    let j = fx.wait_job(refused, 60, terminal).await;
    assert_eq!(j.status, "failed", "{:?}", j.error);
    let error = j.error.unwrap_or_default();
    assert!(
        error.contains("AccessDeniedException") && error.contains(&format!("kms_keys {key}")),
        "{error}"
    );
    let before = fx.users().await;
    assert!(
        before
            .iter()
            .all(|(id, h, v)| *h == legacy_hash(*id) && v == "v1"),
        "a refused job wrote nothing"
    );

    // KMS does not verify two MACs it just computed: those two items fail
    // `verify` and keep their old hash; the others are written.
    kms.fault("VerifyMac", 400, "KMSInvalidMacException", 2)
        .await;
    let job = fx.enqueue_raw(Some(algo), selection).await;
    let j = fx.wait_job(job, 90, terminal).await;
    assert_eq!(j.status, "failed", "{:?}", j.error);
    assert_eq!((j.processed, j.failed), (N - 2, 2), "{:?}", j.error);
    let errors = fx.item_errors(job).await;
    assert_eq!(errors.len(), 2, "{errors:?}");
    for (id, code, message) in &errors {
        assert_eq!(code, "verify", "{message}");
        assert!(message.contains("did not verify"), "{message}");
        let (_, hash, version) = fx.users().await[(*id - 1) as usize].clone();
        assert_eq!(
            (hash, version.as_str()),
            (legacy_hash(*id), "v1"),
            "row {id} kept"
        );
    }
    assert_eq!(kms.faults_left().await, 0);

    // Retried, through more throttling and 5xx than the client's three
    // attempts of each of the two items' requests absorb: the batch is
    // retried after pqmig's backoff and goes through.
    kms.fault("GenerateMac", 400, "ThrottlingException", 7)
        .await;
    kms.fault("VerifyMac", 503, "KMSInternalException", 7).await;
    let logged = fx.log("d").len();
    let out = cli(&fx, &kms, &["resume", &job.to_string(), "--retry-failed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = fx.wait_job(job, 90, terminal).await;
    let metric = |op: &str, outcome: &str| {
        format!(
            "pqmig_key_provider_requests_total{{operation=\"{op}\",outcome=\"{outcome}\",provider=\"aws\"}} "
        )
    };
    let mac_ok = crate::observe::scrape(port, &metric("mac", "ok")).await;
    let mac_unavailable = crate::observe::scrape(port, &metric("mac", "unavailable")).await;
    let mac_refused = crate::observe::scrape(port, &metric("mac", "refused")).await;
    let verified = crate::observe::scrape(port, &metric("verify_mac", "ok")).await;
    let verify_unavailable =
        crate::observe::scrape(port, &metric("verify_mac", "unavailable")).await;
    terminate(&mut d);
    assert_eq!(j.status, "done", "{:?}\n{}", j.error, fx.log("d"));
    assert_eq!((j.processed, j.failed), (N, 0));
    assert_eq!(kms.faults_left().await, 0, "every injected fault was met");
    // The batch that met them was retried, its error logged (which of the
    // two codes depends on which request gave up first).
    let log = fx.log("d");
    assert!(
        log.lines().any(|l| l.contains("batch failed; retrying")
            && (l.contains("ThrottlingException") || l.contains("KMSInternalException"))),
        "the retried batch's error is logged:\n{log}"
    );
    // The resumed job's start held its ranges until it reset them: no
    // walk began early and lost its lease to that reset.
    assert!(!log[logged..].contains("lease lost"), "{log}");
    assert!(
        mac_ok >= N as f64 && verified >= N as f64,
        "{mac_ok} {verified}"
    );
    assert!(mac_unavailable >= 1.0 && verify_unavailable >= 1.0 && mac_refused >= 1.0);

    // Each row holds KMS's MAC of its old hash (as boto3 got it), cut to
    // the profile's length, under the new version.
    for (id, hash, version) in fx.users().await {
        let want = &macs[(id - 1) as usize][..CUT];
        assert_eq!(hash, want, "row {id}");
        assert_eq!(version, "kms-v3/v1", "row {id}");
    }

    // `pqmig verify` has KMS compute each backed-up hash's MAC again.
    let out = cli(&fx, &kms, &["verify", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{N} items verified")),
        "{}",
        stdout(&out)
    );
    let out = cli(&fx, &kms, &["keys", "list"]);
    assert!(
        stdout(&out).contains("hmac (in AWS KMS"),
        "{}",
        stdout(&out)
    );
    let out = cli(&fx, &kms, &["keys", "check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("computed and verified an HMAC-SHA-256"),
        "{}",
        stdout(&out)
    );
}
