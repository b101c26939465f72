//! ML-KEM decapsulation in an HSM (the `pkcs11` provider against kryoptic,
//! a PKCS#11 3.2 token with `CKM_ML_KEM`): the layers of `pqmig-wrap-v1`
//! wraps whose ML-KEM key lives in the token, and cannot be read out, are
//! decapsulated there when a job re-wraps them to another policy.

use serde_json::json;

use pqmig::crypto::kem::Kem;

use crate::support::hashes::{terminal, terminate};
use crate::support::kryoptic::Token;
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
    let label = format!(
        "k{}",
        &w.fx.db.name[w.fx.db.name.len().saturating_sub(20)..]
    );
    let token = Token::new(w.fx.dir.path(), &label, &[("pq-in-token", &seed[..])]);
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
    let env = token.env();
    let port = crate::observe::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    extra.push(("PQMIG_METRICS_ADDR", metrics.as_str()));
    let mut d = w.fx.spawn_daemon("b", &extra);
    let job = w.enqueue(second, json!({"batch_size": 4})).await;
    let j = w.fx.wait_job(job, 60, terminal).await;
    let decapsulated = crate::observe::scrape(
        port,
        "pqmig_key_provider_requests_total{operation=\"decrypt\",outcome=\"ok\",provider=\"pkcs11\"} ",
    )
    .await;
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
    let cli = |args: &[&str]| {
        let keyring = w.fx.keyring.display().to_string();
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.push(("DATABASE_URL", w.fx.db.url.as_str()));
        env.push(("PQMIG_KEYRING", keyring.as_str()));
        crate::support::run(args, &env)
    };
    let out = cli(&["keys", "list"]);
    assert!(
        stdout(&out).contains("usable: decapsulate pqmig-wrap-v1 layers (in its token)"),
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
