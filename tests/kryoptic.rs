//! ML-KEM decapsulation in an HSM (the `pkcs11` provider against kryoptic,
//! a PKCS#11 3.2 token with `CKM_ML_KEM`): the layers of `pqmig-wrap-v1`
//! wraps whose ML-KEM key lives in the token, and cannot be read out, are
//! decapsulated there when a job re-wraps them to another policy.

use serde_json::json;

use pqmig::crypto::kem::Kem;

use crate::support::hashes::{terminal, terminate};
use crate::support::kryoptic::{Token, TokenKey};
use crate::support::wrappers::{WrapFx, register_key};
use crate::support::{stderr, stdout};

/// Wrappers are re-wrapped to policy A (one ML-KEM-768 layer under a
/// keyring key); that key is then moved into a kryoptic token (imported
/// from its seed) and out of the keyring, and a job re-wraps to policy B:
/// every layer is decapsulated in the token. A layer ciphertext altered
/// since is decapsulated too (ML-KEM rejects implicitly) and fails the
/// key commitment: `integrity`. pyca opens the re-wrapped DEKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ml_kem_layers_are_decapsulated_in_the_token_and_rewrapped() {
    const N: usize = 6;
    let mut w = WrapFx::new(N, Kem::MlKem768, 1).await;
    let second = w
        .add_policy("next", Kem::MlKem768, 1, "round_robin", 1, 1, None)
        .await;
    let c = w.fx.db.client().await;

    // Policy A, from the keyring.
    let mut d = w.fx.spawn_daemon("a", &[]);
    let first = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(first, 60, terminal).await;
    terminate(&mut d);
    assert_eq!(
        (j.status.as_str(), j.processed),
        ("done", N as i64),
        "{j:?}"
    );

    // A's key into the token, out of the keyring (its row retired); the
    // layers name it there.
    let local = w.seed.layer_key_ids[0];
    let key_ref: String = c
        .query_one(
            "SELECT external_key_ref FROM kms_keys WHERE id = $1",
            &[&local],
        )
        .await
        .unwrap()
        .get(0);
    let seed = w
        .keys
        .0
        .iter()
        .find(|k| k.key_ref == key_ref)
        .expect("the policy's key in the keyring")
        .secret
        .clone();
    let label = token_label(&w, "k");
    let token = Token::new(
        w.fx.dir.path(),
        &label,
        &[TokenKey::Import {
            label: "pq-in-token",
            seed: &seed,
            public: None,
        }],
    );
    let in_token = register_key(
        &c,
        &format!("hsm-{label}"),
        "pkcs11",
        &label,
        "pq-in-token",
        "ML-KEM-768",
    )
    .await;
    c.batch_execute(&format!(
        "UPDATE key_wrapper_layers SET kms_key_id = {in_token} WHERE kms_key_id = {local}; \
         UPDATE kms_keys SET status = 'retired' WHERE id = {local}"
    ))
    .await
    .unwrap();
    w.keys.0.retain(|k| k.key_ref != key_ref);
    std::fs::remove_file(&w.fx.keyring).unwrap();
    w.keys.write(&w.fx.keyring).unwrap();
    let (tampered, _) = w.seed.deks[N - 1];
    c.execute(
        "UPDATE key_wrapper_layers SET kem_ciphertext = set_byte(kem_ciphertext, 100, \
           get_byte(kem_ciphertext, 100) # 1) WHERE key_wrapper_id = $1",
        &[&tampered],
    )
    .await
    .unwrap();

    // Policy B: every layer of A decapsulated in the token.
    let (mut d, port) = spawn_with_token(&w, &token, "b");
    let job = w.enqueue(second, json!({"batch_size": 4})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    let decapsulated = decapsulations(port).await;
    terminate(&mut d);
    let errors = w.fx.item_errors(job).await;
    assert_eq!(j.status, "failed", "{:?}\n{}", j.error, w.fx.log("b"));
    assert_eq!(
        (j.processed, j.failed),
        (N as i64 - 1, 1),
        "{errors:?}\n{}",
        w.fx.log("b")
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!((errors[0].0, errors[0].1.as_str()), (tampered, "integrity"));
    assert!(
        errors[0].2.contains("key commitment does not match"),
        "{errors:?}"
    );
    assert_eq!(decapsulated, N as f64, "one decapsulation per layer");
    w.assert_pyca_opens(&w.seed.deks[..N - 1]).await;

    // The operator's view: what the key is used for, and a harmless use.
    let cli = |args: &[&str]| cli_with_token(&w, &token, args);
    let out = cli(&["keys", "list"]);
    assert!(
        stdout(&out).contains("usable: decapsulate pqmig-wrap-v1 layers (in its token; no public key object: not a layer key of new wraps)"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = cli(&["keys", "check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "kms_keys {in_token} \"pq-in-token\": decapsulated a test ciphertext in token \"{label}\" (ML-KEM-768)"
        )),
        "{}",
        stdout(&out)
    );
}

/// A target policy's layer key in the token: a key pair generated there
/// (its private key never outside). A job re-wraps to a policy of two
/// layers, the token's first and a keyring key's second: pqmig seals each
/// new layer to the token key's public key object and checks each new
/// wrap before writing it by decapsulating that layer in the token (one
/// decapsulation per item). A later job re-wraps them back to a keyring
/// policy, decapsulating in the token again, and pyca opens every DEK. A
/// public key object that is not its private key's fails a job before any
/// item, and `keys check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_layers_are_sealed_to_a_token_key_and_verified_in_the_token() {
    use pqmig::crypto::kem::KemKeyPair;
    use sha2::{Digest, Sha256};

    const N: usize = 6;
    let mut w = WrapFx::new(N, Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let label = token_label(&w, "t");
    let (own, other): ([u8; 64], [u8; 64]) = (rand::random(), rand::random());
    let other = KemKeyPair::from_seed(Kem::MlKem768, &other).unwrap();
    let token = Token::new(
        w.fx.dir.path(),
        &label,
        &[
            TokenKey::Generate { label: "pq-target" },
            TokenKey::Import {
                label: "pq-mismatch",
                seed: &own,
                public: Some(other.public_key()),
            },
        ],
    );
    let target = register_key(&c, "hsm-a", "pkcs11", &label, "pq-target", "ML-KEM-768").await;
    let mismatch = register_key(&c, "hsm-b", "pkcs11", &label, "pq-mismatch", "ML-KEM-768").await;
    let two = token_first_of_two(&mut w, target).await;
    let wrong =
        pqmig::sample::policy_create(&c, "wrong", "defined", 1, 1, "ML-KEM-768", &[mismatch])
            .await
            .unwrap();

    let (mut d, port) = spawn_with_token(&w, &token, "d");
    let versions = "SELECT sum(wrap_version)::bigint FROM key_wrappers";
    let before: i64 = c.query_one(versions, &[]).await.unwrap().get(0);

    // A public key object of another key: the job fails before any item.
    let job = w.enqueue(wrong, json!({})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    assert_eq!((j.status.as_str(), j.processed), ("failed", 0), "{j:?}");
    let error = j.error.clone().unwrap_or_default();
    assert!(
        error.contains("\"pq-mismatch\"") && error.contains("is not the private key's"),
        "{error}"
    );
    assert_eq!(
        c.query_one(versions, &[]).await.unwrap().get::<_, i64>(0),
        before
    );
    assert_eq!(
        decapsulations(port).await,
        1.0,
        "the start's check of the public key counts as a request"
    );

    // Sealed to the token's key, each new wrap checked in the token.
    let counted = decapsulations(port).await;
    let job = w.enqueue(two, json!({"batch_size": 4})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", N as i64, 0),
        "{j:?}\n{}",
        w.fx.log("d")
    );
    assert_eq!(
        decapsulations(port).await - counted,
        N as f64 + 2.0,
        "one decapsulation in the token per new wrap (verify before write), and the public \
         key's check by the job's start and by its range's walk"
    );
    let layers = c
        .query(
            "SELECT layer_no, kms_key_id, encap_pubkey FROM key_wrapper_layers ORDER BY key_wrapper_id, layer_no",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(layers.len(), 2 * N);
    let publics: std::collections::HashSet<Vec<u8>> = layers
        .iter()
        .filter(|l| l.get::<_, i16>(0) == 1)
        .map(|l| {
            assert_eq!(l.get::<_, i64>(1), target, "layer 1 is the token's");
            l.get(2)
        })
        .collect();
    assert_eq!(publics.len(), 1, "one public key for the token's layers");
    let public = publics.into_iter().next().unwrap();
    assert_eq!(public.len(), Kem::MlKem768.public_key_len());

    // Back to a keyring policy: the token's layers decapsulated there.
    let counted = decapsulations(port).await;
    let job = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", N as i64, 0),
        "{j:?}\n{}",
        w.fx.log("d")
    );
    assert_eq!(decapsulations(port).await - counted, N as f64);
    terminate(&mut d);
    w.assert_pyca_opens(&w.seed.deks).await;

    // The operator's view.
    let cli = |args: &[&str]| cli_with_token(&w, &token, args);
    let out = cli(&["keys", "list"]);
    assert!(
        stdout(&out).contains(
            "usable: decapsulate pqmig-wrap-v1 layers, layer key of new wraps (in its token)"
        ),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains(
            "usable: decapsulate pqmig-wrap-v1 layers (in its token; its public key object cannot be used, keys check says why: not a layer key of new wraps)"
        ),
        "{}",
        stdout(&out)
    );
    let out = cli(&["keys", "check"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("pq-mismatch") && stderr(&out).contains("is not the private key's"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    c.execute(
        "UPDATE kms_keys SET status = 'retired' WHERE id = $1",
        &[&mismatch],
    )
    .await
    .unwrap();
    let out = cli(&["keys", "check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "kms_keys {target} \"pq-target\": encapsulated to its public key and decapsulated in token \"{label}\" (ML-KEM-768); public key 1184 bytes, SHA-256 {}",
            pqmig::hex(&Sha256::digest(&public))
        )),
        "{}",
        stdout(&out)
    );
}

/// The token fails ML-KEM decapsulation in the middle of jobs
/// (`C_DecapsulateKey` answering `CKR_DEVICE_REMOVED`, then
/// `CKR_GENERAL_ERROR`: `tests/support/p11_faulty.c` around kryoptic, in a
/// real daemon): first while new wraps to a token layer key are checked
/// before they are written, then while those layers are opened to re-wrap
/// them back. Each batch that meets it is the job's transient error with
/// nothing of it written; pqmig finds the token again, both jobs end done
/// with no item failed, and pyca opens every DEK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_failing_ml_kem_work_is_waited_out_and_nothing_is_lost() {
    const N: usize = 8;
    let mut w = WrapFx::new(N, Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let label = token_label(&w, "o");
    let token = Token::new(
        w.fx.dir.path(),
        &label,
        &[TokenKey::Generate { label: "pq-out" }],
    );
    let key = register_key(&c, "hsm-o", "pkcs11", &label, "pq-out", "ML-KEM-768").await;
    let two = token_first_of_two(&mut w, key).await;

    let dir = w.fx.dir.path();
    let shim = crate::support::softhsm::faulty_module(dir)
        .display()
        .to_string();
    let faults = dir.join("faults");
    let config = dir.join("pqmig.toml");
    std::fs::write(
        &config,
        "[worker]\nretry_backoff = \"100ms\"\nretry_backoff_max = \"1s\"\nmax_attempts = 50\n",
    )
    .unwrap();
    let (faults_path, config) = (faults.display().to_string(), config.display().to_string());
    let mut env: Vec<(&str, String)> = token
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "PQMIG_PKCS11_MODULE")
        .collect();
    env.extend([
        ("PQMIG_PKCS11_MODULE", shim),
        ("P11FAULTY_MODULE", crate::support::kryoptic::MODULE.into()),
        ("P11FAULTY_COUNT", faults_path),
        ("PQMIG_CONFIG", config),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = w.fx.spawn_daemon("d", &env);
    // Into policy two (verify before write in the token), then back to
    // the keyring policy (the token's layers opened there). The first
    // calls go through (a job's start decapsulates twice to check the
    // key), so the outage meets the batches.
    for (policy, fault) in [
        (two, "C_DecapsulateKey 3 0x32 4"),
        (w.seed.policy_id, "C_DecapsulateKey 3 0x5 2"),
    ] {
        std::fs::write(&faults, format!("{fault}\n")).unwrap();
        let job = w.enqueue(policy, json!({"batch_size": 2})).await;
        let j = w.fx.wait_job(job, 90, terminal).await;
        let log = w.fx.log("d");
        assert_eq!(
            (j.status.as_str(), j.processed, j.failed),
            ("done", N as i64, 0),
            "{fault}: {:?}\n{log}",
            j.error
        );
        crate::support::softhsm::assert_outages_met(
            &faults,
            &log,
            &["pq-out", "ML-KEM decapsulation"],
        );
    }
    terminate(&mut d);
    let layers: i64 = c
        .query_one(
            "SELECT count(*) FROM key_wrapper_layers WHERE kms_key_id = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(layers, 0, "every wrapper is back under the keyring policy");
    w.assert_pyca_opens(&w.seed.deks).await;
}

/// An X-Wing key in the token: its ML-KEM-768 and X25519 halves under one
/// label, imported from a 32-byte X-Wing seed the test keeps (never in
/// the keyring). As a target layer key, new layers are sealed to its
/// public key (the ML-KEM public key object's value, then the X25519 half's
/// public key as the token computes it) and checked in the token; pyca,
/// given the seed, opens them (an independent X-Wing on pyca's ML-KEM and
/// X25519). Re-wrapping them to a keyring X-Wing policy decapsulates
/// both halves in the token: an X25519 ciphertext altered to a low-order
/// point (the token is not asked) or to a non-canonical form fails
/// `integrity`, the rest are opened by pyca again. `keys check` prints the public key of the seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_wing_keys_in_the_token_are_layer_keys_and_open_their_layers() {
    use pqmig::crypto::kem::KemKeyPair;
    use sha2::{Digest, Sha256};

    const N: usize = 6;
    let mut w = WrapFx::new(N, Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let label = token_label(&w, "x");
    let seed: [u8; 32] = rand::random();
    let token = Token::new(
        w.fx.dir.path(),
        &label,
        &[TokenKey::XWing {
            label: "xw",
            seed: &seed,
        }],
    );
    let in_token = register_key(&c, "hsm-x", "pkcs11", &label, "xw", "X-Wing").await;
    let to_token = pqmig::sample::policy_create(&c, "xtok", "defined", 1, 1, "X-Wing", &[in_token])
        .await
        .unwrap();
    let to_keyring = w
        .add_policy("xkey", Kem::XWing, 1, "defined", 1, 1, None)
        .await;
    // The seed, for pyca only (the keyring file was written above).
    w.keys
        .add("xw", "X-Wing", zeroize::Zeroizing::new(seed.to_vec()));

    let (mut d, port) = spawn_with_token(&w, &token, "d");

    let job = w.enqueue(to_token, json!({"batch_size": 4})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    assert_eq!(
        (j.status.as_str(), j.processed, j.failed),
        ("done", N as i64, 0),
        "{j:?}\n{}",
        w.fx.log("d")
    );
    assert_eq!(
        decapsulations(port).await,
        N as f64 + 2.0,
        "verify before write, and the public key's check by the job's start and its walk"
    );
    w.assert_pyca_opens(&w.seed.deks).await;

    // One X25519 ciphertext made the low-order point 0.
    let (tampered, _) = w.seed.deks[N - 1];
    c.execute(
        "UPDATE key_wrapper_layers SET kem_ciphertext = substr(kem_ciphertext, 1, 1088) || \
           '\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea \
         WHERE key_wrapper_id = $1",
        &[&tampered],
    )
    .await
    .unwrap();
    // Another's made non-canonical (bit 255 set: the same agreement, but
    // not the ciphertext sealed).
    let (high, _) = w.seed.deks[N - 2];
    c.execute(
        "UPDATE key_wrapper_layers SET kem_ciphertext = set_byte(kem_ciphertext, 1119, \
           get_byte(kem_ciphertext, 1119) | 128) WHERE key_wrapper_id = $1",
        &[&high],
    )
    .await
    .unwrap();
    let job = w.enqueue(to_keyring, json!({"batch_size": 4})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    terminate(&mut d);
    let errors = w.fx.item_errors(job).await;
    assert_eq!(
        (j.processed, j.failed),
        (N as i64 - 2, 2),
        "{errors:?}\n{}",
        w.fx.log("d")
    );
    let failed: Vec<(i64, &str)> = errors.iter().map(|e| (e.0, e.1.as_str())).collect();
    assert_eq!(failed, [(high, "integrity"), (tampered, "integrity")]);
    w.assert_pyca_opens(&w.seed.deks[..N - 2]).await;
    let layers: i64 = c
        .query_one(
            "SELECT count(*) FROM key_wrapper_layers WHERE kms_key_id = $1",
            &[&in_token],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        layers, 2,
        "only the altered wrappers are left under the token key"
    );

    let cli = |args: &[&str]| cli_with_token(&w, &token, args);
    let public = KemKeyPair::from_seed(Kem::XWing, &seed).unwrap();
    let out = cli(&["keys", "check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "kms_keys {in_token} \"xw\": encapsulated to its public key and decapsulated in token \"{label}\" (X-Wing); public key 1216 bytes, SHA-256 {}",
            pqmig::hex(&Sha256::digest(public.public_key()))
        )),
        "{}",
        stdout(&out)
    );
}

/// A token label of the test's own (its database's name, unique).
fn token_label(w: &WrapFx, prefix: &str) -> String {
    let name = &w.fx.db.name;
    format!("{prefix}{}", &name[name.len().saturating_sub(20)..])
}

/// A daemon that uses `token`, its metrics on a port of its own.
fn spawn_with_token(w: &WrapFx, token: &Token, name: &str) -> (std::process::Child, u16) {
    let port = crate::observe::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let env = token.env();
    let mut extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    extra.push(("PQMIG_METRICS_ADDR", metrics.as_str()));
    (w.fx.spawn_daemon(name, &extra), port)
}

/// ML-KEM / X-Wing decapsulations the daemon had the token do (counted
/// as `decrypt`).
async fn decapsulations(port: u16) -> f64 {
    crate::observe::scrape(
        port,
        "pqmig_key_provider_requests_total{operation=\"decrypt\",outcome=\"ok\",provider=\"pkcs11\"} ",
    )
    .await
}

/// A `pqmig` command with the token, the database and the keyring.
fn cli_with_token(w: &WrapFx, token: &Token, args: &[&str]) -> std::process::Output {
    let keyring = w.fx.keyring.display().to_string();
    let env = token.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("DATABASE_URL", w.fx.db.url.as_str()));
    env.push(("PQMIG_KEYRING", keyring.as_str()));
    crate::support::run(args, &env)
}

/// A policy "two" of two ML-KEM-768 layers: the token's key `key` first
/// (higher priority), then a fresh keyring key.
async fn token_first_of_two(w: &mut WrapFx, key: i64) -> i64 {
    let two = w
        .add_policy("two", Kem::MlKem768, 1, "defined", 2, 2, None)
        .await;
    w.fx.db
        .client()
        .await
        .execute(
            "INSERT INTO policy_kms_keys (policy_id, kms_key_id, weight, priority) VALUES ($1, $2, 1, 10)",
            &[&two, &key],
        )
        .await
        .unwrap();
    two
}
