//! The `pkcs11` key provider against a real HSM (SoftHSM2): legacy
//! `legacy-aes-gcm` wraps whose KEK was made in the token, and never left
//! it, are opened there and re-wrapped; a signing key sealed under such a
//! KEK is unsealed there; a tampered wrap is an integrity failure, a key
//! the token does not have a data failure naming it, a token this process
//! does not have fails the job before any item that needs it.

use serde_json::json;

use crate::support::hashes::{Fixture, legacy_hash};
use crate::support::hashes::{terminal, terminate};
use crate::support::softhsm::{MODULE, Token};
use crate::support::wrappers::{WrapFx, attest_with_a_sealed_key, register_kek, register_key};
use crate::support::{InProcess, stderr, stdout};

/// A new token for this test, labelled `prefix` and the end of its
/// database's name.
fn token_of(fx: &Fixture, prefix: &str) -> Token {
    let name = &fx.db.name;
    Token::new(&format!(
        "{prefix}{}",
        &name[name.len().saturating_sub(20)..]
    ))
}

/// Another `kms_keys` row (`key_ref`, `algorithm`) of `key`'s provider.
async fn key_beside(c: &tokio_postgres::Client, key: i64, key_ref: &str, algorithm: &str) -> i64 {
    c.query_one(
        "INSERT INTO kms_keys (provider_id, external_key_ref, purpose, algorithm) \
         SELECT provider_id, $2, 'wrap', $3 FROM kms_keys WHERE id = $1 RETURNING id",
        &[&key, &key_ref, &algorithm],
    )
    .await
    .unwrap()
    .get(0)
}

/// `pqmig ARGS` against `fx`'s database and keyring, with SoftHSM and
/// `token`'s PIN file as its HSM.
/// A daemon in this process with `token`'s module and PIN, and `extra`.
async fn start_with(fx: &Fixture, token: &Token, extra: &[(&str, &str)]) -> InProcess {
    let pin = token.pin_file.display().to_string();
    let mut env = vec![
        ("PQMIG_PKCS11_MODULE", MODULE),
        ("PQMIG_PKCS11_PIN_FILE", pin.as_str()),
    ];
    env.extend_from_slice(extra);
    InProcess::start(fx, &env).await
}

fn cli(fx: &Fixture, token: &Token, args: &[&str]) -> std::process::Output {
    let keyring = fx.keyring.display().to_string();
    let pin = token.pin_file.display().to_string();
    let conf = crate::support::softhsm::conf();
    crate::support::run(
        args,
        &[
            ("DATABASE_URL", fx.db.url.as_str()),
            ("PQMIG_KEYRING", keyring.as_str()),
            ("PQMIG_PKCS11_MODULE", MODULE),
            ("PQMIG_PKCS11_PIN_FILE", pin.as_str()),
            ("SOFTHSM2_CONF", conf.as_str()),
        ],
    )
}

/// A `kms_providers` row for the token and a `kms_keys` row for its key.
async fn register(c: &tokio_postgres::Client, token: &str, key: &str) -> i64 {
    register_kek(c, &format!("hsm-{token}"), "pkcs11", token, key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_wraps_under_an_hsm_kek_are_opened_in_the_token_and_rewrapped() {
    let w = WrapFx::new(4, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let token = token_of(&w.fx, "t");
    let kek = token.aes_key("kek-hsm");
    assert_eq!(
        token.readable_value(kek),
        None,
        "the KEK cannot be read out of the token"
    );
    let kek_id = register(&c, &token.label, "kek-hsm").await;
    let missing_id: i64 = key_beside(&c, kek_id, "kek-nowhere", "AES-256-GCM").await;

    // Wrappers sealed in the token (legacy-aes-gcm: aad = uuid); one
    // tampered, one under a key the token does not have.
    let mut deks = Vec::new();
    for i in 0..7 {
        let uuid = uuid::Uuid::new_v4().to_string();
        let dek: [u8; 32] = rand::random();
        let mut wrap = token.seal(kek, rand::random(), uuid.as_bytes(), &dek);
        let key = if i == 6 { missing_id } else { kek_id };
        if i == 5 {
            let last = wrap.len() - 1;
            wrap[last] ^= 1;
        }
        let id: i64 = c
            .query_one(
                "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1) VALUES ($1, $2, $3) RETURNING id",
                &[&uuid, &key, &wrap],
            )
            .await
            .unwrap()
            .get(0);
        deks.push((id, dek));
    }

    token.logout();
    let daemon = start_with(&w.fx, &token, &[]).await;
    let job = w
        .enqueue(
            w.seed.policy_id,
            json!({"batch_size": 5, "max_failures": 5}),
        )
        .await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    daemon.stop().await;
    let errors = w.fx.item_errors(job).await;
    assert_eq!(j.status, "failed", "{:?}", j.error);
    assert_eq!(j.error.as_deref(), Some("2 items failed"), "{errors:?}");
    assert_eq!(
        (j.processed, j.failed),
        (9, 2),
        "4 seeded + 5 from the HSM; 2 failed"
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (deks[5].0, "integrity"),
        "{errors:?}"
    );
    assert_eq!(
        (errors[1].0, errors[1].1.as_str()),
        (deks[6].0, "data"),
        "{errors:?}"
    );
    assert!(
        errors[1].2.contains("no secret key with that label")
            && errors[1].2.contains("kek-nowhere"),
        "{errors:?}"
    );
    // pyca opens the new wraps to the DEKs sealed in the token.
    w.assert_pyca_opens(&deks[..5]).await;

    // A signing key sealed under the token's KEK signs attestations: the
    // token seals it, and unseals it for `attest` (of a done job: the
    // broken wrappers gone, a second job finds every item migrated).
    c.execute(
        "DELETE FROM key_wrappers WHERE id = ANY($1)",
        &[&vec![deks[5].0, deks[6].0]],
    )
    .await
    .unwrap();

    // A wrapper under a token this process does not have: a job whose
    // selection names its key fails before any item; one that meets it
    // in a batch fails there, naming the wrapper; nothing is written.
    let elsewhere = register(&c, &format!("{}x", token.label), "kek-elsewhere").await;
    let stray: i64 = c
        .query_one(
            "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1) VALUES ($1, $2, $3) RETURNING id",
            &[&uuid::Uuid::new_v4().to_string(), &elsewhere, &vec![7u8; 60]],
        )
        .await
        .unwrap()
        .get(0);
    let daemon = start_with(&w.fx, &token, &[]).await;
    let named = w
        .enqueue(w.seed.policy_id, json!({"kms_key_ids": [elsewhere]}))
        .await;
    let j = w.fx.wait_job(named, 60, terminal).await;
    assert_eq!((j.status.as_str(), j.processed, j.failed), ("failed", 0, 0));
    let error = j.error.unwrap_or_default();
    for want in [
        "provider pkcs11",
        "no token labelled",
        "kek-elsewhere",
        "kms_key_ids",
    ] {
        assert!(error.contains(want), "{want:?} not in {error}");
    }
    let met = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(met, 60, terminal).await;
    daemon.stop().await;
    assert_eq!((j.status.as_str(), j.processed, j.failed), ("failed", 0, 0));
    let error = j.error.unwrap_or_default();
    assert!(
        error.contains("no token labelled")
            && error.contains(&format!(
                "wrapper {stray} needs it (found when the job started, before any item)"
            )),
        "{error}"
    );
    assert!(w.fx.item_errors(met).await.is_empty());
    c.execute("DELETE FROM key_wrappers WHERE id = $1", &[&stray])
        .await
        .unwrap();

    let daemon = start_with(&w.fx, &token, &[]).await;
    let job = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "done", "{:?}", j.error);
    let cli_env = |args: &[&str]| cli(&w.fx, &token, args);
    attest_with_a_sealed_key(&c, cli_env, kek_id, "hsm-attest", job).await;

    // The operator's view: the HSM key is used in its token; a key the
    // token lacks, and the key of a token that does not exist, are named.
    let out = cli_env(&["keys", "list"]);
    let listed = stdout(&out);
    let line = |id: i64| {
        listed
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line(kek_id).contains("usable: open/unseal (in its token)"),
        "{listed}"
    );
    assert!(
        line(missing_id).contains("not usable: token")
            && line(missing_id).contains("no secret key with that label"),
        "{listed}"
    );
    assert!(
        line(elsewhere).contains("not usable: no token labelled"),
        "{listed}"
    );
    let out = cli_env(&["keys", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains(&format!(
            "ok      kms_keys {kek_id} \"kek-hsm\": sealed and opened a test string in token"
        )),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains(&format!("kms_keys {missing_id} \"kek-nowhere\": token"))
            && stderr(&out).contains("no secret key with that label"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_never_has_more_operation_sessions_than_the_cap() {
    let w = WrapFx::new(1, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let token = token_of(&w.fx, "s");
    let kek = token.aes_key("kek-cap");
    let kek_id = register(&c, &token.label, "kek-cap").await;
    let (mut uuids, mut wraps) = (Vec::new(), Vec::new());
    for _ in 0..3000 {
        let uuid = uuid::Uuid::new_v4().to_string();
        let dek: [u8; 32] = rand::random();
        wraps.push(token.seal(kek, rand::random(), uuid.as_bytes(), &dek));
        uuids.push(uuid);
    }
    c.execute(
        "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1) \
         SELECT u::uuid, $2, w FROM unnest($1::text[], $3::bytea[]) AS t (u, w)",
        &[&uuids, &kek_id, &wraps],
    )
    .await
    .unwrap();
    token.logout();

    // Two jobs on two worker slots, each batch computed on a thread per
    // core: without the cap (keys.pkcs11_sessions = 1) the token would
    // see several sessions at once.
    let extra = [("PQMIG_CONCURRENCY", "2"), ("PQMIG_PKCS11_SESSIONS", "1")];
    let daemon = start_with(&w.fx, &token, &extra).await;
    let half = uuids.len() as i64 / 2;
    let ids: Vec<i64> = c
        .query("SELECT id FROM key_wrappers ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let split = ids[half as usize];
    let first = w
        .enqueue(
            w.seed.policy_id,
            json!({"batch_size": 200, "id_to": split - 1}),
        )
        .await;
    let second = w
        .enqueue(
            w.seed.policy_id,
            json!({"batch_size": 200, "id_from": split}),
        )
        .await;
    let a = w.fx.wait_job(first, 60, terminal).await;
    let b = w.fx.wait_job(second, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(
        (a.status.as_str(), b.status.as_str()),
        ("done", "done"),
        "{:?} {:?}",
        a.error,
        b.error
    );
    assert_eq!(a.processed + b.processed, 3001);
    // SoftHSM does not count sessions (C_GetTokenInfo), so pqmig's own
    // count of the token's operation sessions says it.
    let settings = pqmig::keys::pkcs11::Pkcs11Settings::new(MODULE.into(), token.pin_file.clone());
    let peak = pqmig::keys::pkcs11::open(&settings)
        .expect("the module the daemon loaded")
        .session_peak(&token.label)
        .expect("the daemon used the token");
    assert_eq!(
        peak, 1,
        "operation sessions at once, keys.pkcs11_sessions = 1"
    );
}

/// A pepper held in the HSM: the hashes scope has the token compute each
/// new hash (`CKM_SHA256_HMAC`, checked by `C_Verify`), and the values are
/// the HMACs the test computes with the value it put in the token; a key
/// that could leave the token fails the job before any item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_hmac_pepper_rehashes_in_the_token() {
    use hmac::{KeyInit, Mac};
    const N: i64 = 150;
    let fx = Fixture::new(N).await;
    let c = fx.db.client().await;
    let token = token_of(&fx, "h");
    let pepper: [u8; 32] = rand::random();
    let key = token.hmac_key("pepper-hsm", &pepper, false);
    assert_eq!(
        token.readable_value(key),
        None,
        "the pepper stays in the token"
    );
    token.hmac_key("pepper-loose", &pepper, true);
    let hsm = format!("hsm-{}", token.label);
    let key_id = register_key(
        &c,
        &hsm,
        "pkcs11",
        &token.label,
        "pepper-hsm",
        "HMAC-SHA-256",
    )
    .await;
    let loose_id: i64 = key_beside(&c, key_id, "pepper-loose", "HMAC-SHA-256").await;
    token.logout();
    let pin = token.pin_file.display().to_string();
    let env = [
        ("PQMIG_PKCS11_MODULE", MODULE),
        ("PQMIG_PKCS11_PIN_FILE", pin.as_str()),
    ];
    let selection = json!({"table": "users", "column": "email_hash", "batch_size": 40});

    // A pepper that could be read out of the token is refused before any
    // item, naming the attribute.
    let loose = fx
        .profile(
            "hsm-loose",
            "HMAC-SHA-256",
            json!({"kms_key_id": loose_id}),
            None,
        )
        .await;
    let daemon = InProcess::start(&fx, &env).await;
    let job = fx.enqueue_raw(Some(loose), selection.clone()).await;
    let j = fx.wait_job(job, 60, terminal).await;
    assert_eq!(j.status, "failed");
    assert!(
        j.error
            .as_deref()
            .unwrap_or_default()
            .contains("extractable"),
        "{:?}",
        j.error
    );
    assert_eq!(j.processed, 0);
    c.execute(
        "UPDATE hash_profiles SET status = 'deprecated' WHERE name = 'hsm-loose'",
        &[],
    )
    .await
    .unwrap();

    let algo = fx
        .profile(
            "hsm-v3",
            "HMAC-SHA-256",
            json!({"kms_key_id": key_id}),
            None,
        )
        .await;
    assert_eq!(algo, loose);
    let job = fx.enqueue_raw(Some(algo), selection).await;
    let j = fx.wait_job(job, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "done", "{:?}", j.error);
    assert_eq!((j.processed, j.failed), (N, 0));
    for (id, hash, version) in fx.users().await {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&pepper).unwrap();
        mac.update(&legacy_hash(id));
        assert_eq!(hash, mac.finalize().into_bytes().to_vec(), "row {id}");
        assert_eq!(version, "hsm-v3/v1", "row {id}");
    }

    let cli_env = |args: &[&str]| cli(&fx, &token, args);
    // `pqmig verify` has the token compute each backed-up hash's HMAC again.
    let out = cli_env(&["verify", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{N} items verified")),
        "{}",
        stdout(&out)
    );
    let out = cli_env(&["keys", "list"]);
    assert!(
        stdout(&out).contains("usable: hmac (in its token)"),
        "{}",
        stdout(&out)
    );
    let out = cli_env(&["keys", "check"]);
    assert!(
        stdout(&out).contains(&format!(
            "ok      kms_keys {key_id} \"pepper-hsm\": computed and verified an HMAC-SHA-256"
        )),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("extractable"), "{}", stderr(&out));
}

/// An X25519 key pair made in the token: `legacy-x25519` wraps sealed to
/// its public key are opened by the token's agreement (`CKM_ECDH1_DERIVE`;
/// the private key never leaves it) and re-wrapped; a wrap whose ephemeral
/// key was changed is an `integrity` failure; the operator's view and
/// `keys check` use the key in its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_x25519_wraps_are_opened_by_an_agreement_in_the_token() {
    use pqmig::crypto::wrap;
    let w = WrapFx::new(2, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let token = token_of(&w.fx, "x");
    let (public, private) = token.x25519_key("ecies-hsm");
    assert_eq!(
        token.readable_value(private),
        None,
        "the private key cannot be read out of the token"
    );
    let key = register_key(
        &c,
        &format!("hsm-{}", token.label),
        "pkcs11",
        &token.label,
        "ecies-hsm",
        "X25519",
    )
    .await;

    // Seven wraps to the token's public key (one with the uuid in upper
    // case, as its writer stored it; one whose ephemeral key was changed;
    // one whose ephemeral key is a low-order point, all zeros).
    let mut deks = Vec::new();
    for i in 0..7 {
        let uuid = uuid::Uuid::new_v4().to_string();
        let stored = if i == 4 { uuid.to_uppercase() } else { uuid };
        let dek: [u8; 32] = rand::random();
        let mut sealed = wrap::seal_legacy_x25519(&public, &stored, &dek);
        if i == 5 {
            sealed[7] ^= 1;
        }
        if i == 6 {
            sealed[..32].fill(0);
        }
        let id: i64 = c
            .query_one(
                "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1, crypto_suite) \
                 VALUES ($1, $2, $3, '{\"format\": \"legacy-x25519\"}') RETURNING id",
                &[&stored, &key, &sealed],
            )
            .await
            .unwrap()
            .get(0);
        deks.push((id, dek));
    }

    token.logout();
    let daemon = start_with(&w.fx, &token, &[]).await;
    let job = w.enqueue(w.seed.policy_id, json!({"batch_size": 4})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    daemon.stop().await;
    let errors = w.fx.item_errors(job).await;
    assert_eq!(j.status, "failed", "{:?}", j.error);
    assert_eq!((j.processed, j.failed), (7, 2), "2 seeded + 5; {errors:?}");
    let failed: Vec<(i64, &str)> = errors.iter().map(|e| (e.0, e.1.as_str())).collect();
    assert_eq!(
        failed,
        [(deks[5].0, "integrity"), (deks[6].0, "integrity")],
        "{errors:?}"
    );
    w.assert_pyca_opens(&deks[..5]).await;

    let out = cli(&w.fx, &token, &["keys", "list"]);
    assert!(
        stdout(&out).contains("usable: open legacy-x25519 (in its token)"),
        "{}",
        stdout(&out)
    );
    let out = cli(&w.fx, &token, &["keys", "check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "kms_keys {key} \"ecies-hsm\": sealed to its public key and opened in token"
        )),
        "{}",
        stdout(&out)
    );
}

/// The token goes away in the middle of a job: `C_Decrypt` answers
/// `CKR_DEVICE_REMOVED`, `C_DeriveKey` `CKR_GENERAL_ERROR` (a module around SoftHSM,
/// `tests/support/p11_faulty.c`, in a real `pqmig run`). Each batch that
/// meets it is the job's transient error with nothing of it written;
/// pqmig forgets the token, finds and logs in to it again, and the job ends
/// done with every wrap opened, none of them taken for a failed tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_outage_is_waited_out_and_nothing_is_lost() {
    use pqmig::crypto::wrap;
    let w = WrapFx::new(1, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let token = token_of(&w.fx, "o");
    let kek = token.aes_key("kek-out");
    let (public, _) = token.x25519_key("ecies-out");
    let aes = register(&c, &token.label, "kek-out").await;
    let x25519: i64 = key_beside(&c, aes, "ecies-out", "X25519").await;
    // Eight wraps of each kind, interleaved.
    let mut deks = Vec::new();
    for i in 0..16 {
        let uuid = uuid::Uuid::new_v4().to_string();
        let dek: [u8; 32] = rand::random();
        let (key, sealed, suite) = if i % 2 == 0 {
            let sealed = token.seal(kek, rand::random(), uuid.as_bytes(), &dek);
            (aes, sealed, json!({"format": "legacy-aes-gcm"}))
        } else {
            let sealed = wrap::seal_legacy_x25519(&public, &uuid, &dek);
            (x25519, sealed, json!({"format": "legacy-x25519"}))
        };
        let id: i64 = c
            .query_one(
                "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1, crypto_suite) \
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[&uuid, &key, &sealed, &suite],
            )
            .await
            .unwrap()
            .get(0);
        deks.push((id, dek));
    }
    token.logout();

    let module = crate::support::softhsm::faulty_module(w.fx.dir.path());
    let faults = w.fx.dir.path().join("faults");
    let config = w.fx.dir.path().join("pqmig.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"100ms\"\nretry_backoff_max = \"1s\"\nmax_attempts = 50\n",
    )
    .unwrap();
    let (module, faults_path) = (module.display().to_string(), faults.display().to_string());
    let (pin, config) = (
        token.pin_file.display().to_string(),
        config.display().to_string(),
    );
    let conf = crate::support::softhsm::conf();
    let mut d = w.fx.spawn_daemon(
        "d",
        &[
            ("PQMIG_CONFIG", config.as_str()),
            ("PQMIG_PKCS11_MODULE", module.as_str()),
            ("PQMIG_PKCS11_PIN_FILE", pin.as_str()),
            ("P11FAULTY_MODULE", MODULE),
            ("P11FAULTY_COUNT", faults_path.as_str()),
            ("SOFTHSM2_CONF", conf.as_str()),
        ],
    );
    // One job per format, the token failing the operation that format
    // needs: AES-GCM decryption, then X25519 agreement.
    // (The seeded wrapper is a legacy-aes-gcm one too.)
    // (0x32 is CKR_DEVICE_REMOVED; 0x5, CKR_GENERAL_ERROR, what a network
    // HSM may say for anything: never a failed tag either.)
    for (format, function, rv, said, items) in [
        (
            "legacy-aes-gcm",
            "C_Decrypt",
            "0x32",
            ["kek-out", "Decrypt"],
            1 + 8,
        ),
        (
            "legacy-x25519",
            "C_DeriveKey",
            "0x5",
            ["ecies-out", "X25519 agreement"],
            8,
        ),
    ] {
        std::fs::write(&faults, format!("{function} 6 {rv}\n")).unwrap();
        let job = w
            .enqueue(
                w.seed.policy_id,
                json!({"batch_size": 4, "formats": [format]}),
            )
            .await;
        let j = w.fx.wait_job(job, 90, terminal).await;
        let log = w.fx.log("d");
        assert_eq!(j.status, "done", "{format}: {:?}\n{log}", j.error);
        assert_eq!((j.processed, j.failed), (items, 0), "{format}\n{log}");
        crate::support::softhsm::assert_outages_met(&faults, &log, &said);
    }
    terminate(&mut d);
    w.assert_pyca_opens(&deks).await;
}

/// A wrapper under a token this process does not have, written while a
/// job runs (so its start could not see it): the batch that meets it
/// fails the job, naming the wrapper, with nothing of that batch written;
/// once the wrapper is gone, `pqmig resume` goes on from there to done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_its_token_met_mid_job_fails_the_job_at_that_batch() {
    let w = WrapFx::new(1, pqmig::crypto::kem::Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let token = token_of(&w.fx, "m");
    let kek = token.aes_key("kek-mid");
    let kek_id = register(&c, &token.label, "kek-mid").await;
    let elsewhere = register(&c, &format!("{}x", token.label), "kek-gone").await;
    // Wrappers 1001..=1008 but 1004, which comes later.
    let mut deks = Vec::new();
    for id in (1001i64..=1008).filter(|id| *id != 1004) {
        let uuid = uuid::Uuid::new_v4().to_string();
        let dek: [u8; 32] = rand::random();
        let sealed = token.seal(kek, rand::random(), uuid.as_bytes(), &dek);
        c.execute(
            "INSERT INTO key_wrappers (id, wrapper_uuid, kms1_key_id, dek_wrap1) VALUES ($1, $2, $3, $4)",
            &[&id, &uuid, &kek_id, &sealed],
        )
        .await
        .unwrap();
        deks.push((id, dek));
    }
    token.logout();
    let daemon = start_with(&w.fx, &token, &[]).await;
    let job = w
        .enqueue(
            w.seed.policy_id,
            json!({"batch_size": 1, "max_rate": 2, "id_from": 1001}),
        )
        .await;
    w.fx.wait_job(job, 60, |j| j.processed >= 1).await;
    c.execute(
        "INSERT INTO key_wrappers (id, wrapper_uuid, kms1_key_id, dek_wrap1) VALUES (1004, $1, $2, $3)",
        &[&uuid::Uuid::new_v4().to_string(), &elsewhere, &vec![7u8; 60]],
    )
    .await
    .unwrap();
    let j = w.fx.wait_job(job, 60, terminal).await;
    let error = j.error.clone().unwrap_or_default();
    assert_eq!(j.status, "failed", "{error}");
    assert!(
        error.contains("no token labelled")
            && error.contains("wrapper 1004 needs it")
            && !error.contains("before any item"),
        "{error}"
    );
    assert_eq!(
        (j.processed, j.failed),
        (3, 0),
        "1001..=1003, then 1004 stops it"
    );
    let migrated: i64 = c
        .query_one(
            "SELECT count(*) FROM key_wrappers WHERE id > 1000 AND crypto_suite->>'format' = 'pqmig-wrap-v1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(migrated, 3, "nothing after 1003 was written");

    c.execute("DELETE FROM key_wrappers WHERE id = 1004", &[])
        .await
        .unwrap();
    let out = cli(&w.fx, &token, &["resume", &job.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = w.fx.wait_job(job, 60, |j| j.status == "done").await;
    daemon.stop().await;
    assert_eq!((j.processed, j.failed), (7, 0));
    w.assert_pyca_opens(&deks).await;
}
