//! The signatures scope: classical sources made by pyca verify in pqmig,
//! ML-DSA countersignatures made by pqmig verify in pyca, SLH-DSA pinned by
//! the FIPS 205 (ACVP) key-generation vectors, bad sources never
//! countersigned, and jobs end to end against the real database.

use serde_json::{Value, json};

use pqmig::crypto::sig::{self, SigAlg, Signer};

use crate::support::hashes::{terminal, terminate};
use crate::support::signatures::{SigFx, sig_check};
use crate::support::{InProcess, b64, unb64, unhex};
use crate::support::{stderr, stdout};

const SLH_VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/slh_dsa_keygen.json"
);

#[test]
fn ml_dsa_keys_and_signatures_agree_with_pyca() {
    let mut items = Vec::new();
    let mut seeds = Vec::new();
    for alg in [SigAlg::MlDsa44, SigAlg::MlDsa65, SigAlg::MlDsa87] {
        let seed = sig::generate_seed(alg);
        let s = Signer::from_seed(alg, &seed).unwrap();
        seeds.push(json!({"alg": alg.alias(), "seed": b64(&seed)}));
        for ctx in ["", "users", "doc-v1"] {
            let msg = format!("payload for {ctx}");
            let signature = s.sign(msg.as_bytes(), ctx.as_bytes()).unwrap();
            items.push(
                json!({"alg": alg.alias(), "pk": b64(s.public_key()), "msg": b64(msg.as_bytes()),
                              "ctx": ctx, "sig": b64(&signature)}),
            );
        }
        // and the public key from ξ is FIPS 204's, as pyca derives it
    }
    let publics: Vec<String> =
        serde_json::from_str(&sig_check(&["mldsa-public"], &json!(seeds).to_string())).unwrap();
    for (seed, public) in seeds.iter().zip(&publics) {
        let alg = SigAlg::from_alias(seed["alg"].as_str().unwrap()).unwrap();
        let ours = Signer::from_seed(alg, &unb64(&seed["seed"])).unwrap();
        assert_eq!(b64(ours.public_key()), *public, "{alg:?}");
    }
    assert_eq!(
        sig_check(&["verify-mldsa"], &json!(items).to_string()).trim(),
        "ok 9 signatures"
    );
    // a wrong context fails in pyca too
    let mut bad = items[1].clone();
    bad["ctx"] = json!("other");
    assert!(!crate::support::python::succeeds(
        "sig_check.py",
        &["verify-mldsa"],
        &json!([bad]).to_string()
    ));
}

#[test]
fn slh_dsa_matches_the_fips_205_keygen_vectors_and_round_trips() {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(SLH_VECTORS).unwrap()).unwrap();
    let tests = doc["tests"].as_array().unwrap();
    assert_eq!(tests.len(), 6);
    for t in tests {
        let alg = SigAlg::from_alias(t["parameterSet"].as_str().unwrap()).unwrap();
        let h = |k: &str| unhex(t[k].as_str().unwrap());
        let sk = sig::slh_keygen(alg, &h("skSeed"), &h("skPrf"), &h("pkSeed"));
        assert_eq!(sk, h("sk"));
        let s = Signer::from_seed(alg, &sk).unwrap();
        assert_eq!(s.public_key(), &h("pk")[..]);
    }
    // 128f signs in milliseconds; 128s takes seconds and is left to the
    // vectors above.
    let s = Signer::from_seed(
        SigAlg::SlhDsaSha2_128f,
        &sig::generate_seed(SigAlg::SlhDsaSha2_128f),
    )
    .unwrap();
    let signature = s.sign(b"payload", b"ctx").unwrap();
    assert_eq!(signature.len(), 17_088);
    assert!(sig::verify(
        SigAlg::SlhDsaSha2_128f,
        s.public_key(),
        b"payload",
        b"ctx",
        &signature
    ));
    assert!(!sig::verify(
        SigAlg::SlhDsaSha2_128f,
        s.public_key(),
        b"payload",
        b"ctY",
        &signature
    ));
    assert!(!sig::verify(
        SigAlg::SlhDsaSha2_128f,
        s.public_key(),
        b"payloae",
        b"ctx",
        &signature
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_made_by_pyca_are_countersigned_and_pyca_verifies_every_countersignature() {
    let w = SigFx::new(40).await;
    let c = w.fx.db.client().await;
    // 10 more records signed by pyca (Ed25519 and ECDSA P-256), context ''
    let hashes: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 32]).collect();
    let req = json!({"hashes": hashes.iter().map(|h| b64(h)).collect::<Vec<_>>()});
    let made: Value =
        serde_json::from_str(&sig_check(&["make-sources"], &req.to_string())).unwrap();
    let algo = |a: &str| {
        let c = &c;
        let a = a.to_owned();
        async move {
            pqmig::db::algorithms::algorithm_by_alias(c, &a)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let (ed, ec) = (algo("Ed25519").await, algo("ECDSA-P256").await);
    let ed_key =
        pqmig::db::signatures::signing_key_import(&c, ed, "pyca-ed", &unb64(&made["ed25519_pk"]))
            .await
            .unwrap();
    let ec_key =
        pqmig::db::signatures::signing_key_import(&c, ec, "pyca-p256", &unb64(&made["p256_pk"]))
            .await
            .unwrap();
    for (i, h) in hashes.iter().enumerate() {
        for (alg, key, sigs, table) in [
            (ed, ed_key, "ed25519", "mail"),
            (ec, ec_key, "p256", "invoices"),
        ] {
            c.execute(
                "INSERT INTO signatures (subject_table, subject_pk, context, algo_id, signing_key_id, signature, payload_hash) VALUES ($1, $2, '', $3, $4, $5, $6)",
                &[&table, &i.to_string(), &alg, &key, &unb64(&made[sigs][i]), h],
            )
            .await
            .unwrap();
        }
    }
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w
        .enqueue(w.seed.target_algo_id, json!({"batch_size": 16}))
        .await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.processed, j.failed, j.total), (60, 0, Some(60)));
    let counter = w.countersignatures().await;
    assert_eq!(counter.len(), 60);
    assert_eq!(
        sig_check(&["verify-mldsa"], &json!(counter).to_string()).trim(),
        "ok 60 signatures"
    );
    assert_eq!(counter.iter().filter(|c| c["ctx"] == "doc-v1").count(), 40);

    // A second run countersigns nothing twice.
    let again = w.enqueue(w.seed.target_algo_id, json!({})).await;
    let j = w.fx.wait_job(again, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.result.as_ref().unwrap()["skipped"], 60);
    assert_eq!(w.countersignatures().await.len(), 60);
    daemon.stop().await;

    // verify re-checks every countersignature the first job wrote
    let out = w.cli(&["verify", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("60 items verified"),
        "{}",
        stdout(&out)
    );
    c.execute(
        "UPDATE signatures SET signature = set_byte(signature, 100, get_byte(signature, 100) # 1) \
         WHERE id = (SELECT min(id) FROM signatures WHERE algo_id = $1)",
        &[&w.seed.target_algo_id],
    )
    .await
    .unwrap();
    let out = w.cli(&["verify", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("1 of 60 items failed verification"),
        "{}",
        stderr(&out)
    );
    // rollback removes exactly the job's countersignatures
    let out = w.cli(&["rollback", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.countersignatures().await.len(), 0);
    assert_eq!(w.scalar("SELECT count(*) FROM signatures").await, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sources_are_integrity_failures_and_never_countersigned() {
    let w = SigFx::new(20).await;
    let c = w.fx.db.client().await;
    let ids: Vec<i64> = c
        .query("SELECT id FROM signatures ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // rows alternate Ed25519 (even index) and ECDSA (odd index)
    c.execute("UPDATE signatures SET payload_hash = set_byte(payload_hash, 0, get_byte(payload_hash, 0) # 1) WHERE id = $1", &[&ids[0]]).await.unwrap();
    c.execute(
        "UPDATE signatures SET signature = substring(signature FROM 1 FOR 63) WHERE id = $1",
        &[&ids[2]],
    )
    .await
    .unwrap();
    let ed_algo: i64 = c
        .query_one(
            "SELECT algo_id FROM signing_keys WHERE id = $1",
            &[&w.seed.source_key_ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    let other = Signer::from_seed(SigAlg::Ed25519, &sig::generate_seed(SigAlg::Ed25519)).unwrap();
    let wrong =
        pqmig::db::signatures::signing_key_import(&c, ed_algo, "someone-else", other.public_key())
            .await
            .unwrap();
    c.execute(
        "UPDATE signatures SET signing_key_id = $2 WHERE id = $1",
        &[&ids[4], &wrong],
    )
    .await
    .unwrap();
    // the ECDSA signer turns out compromised: none of its rows is countersigned
    c.execute(
        "UPDATE signing_keys SET status = 'compromised' WHERE id = $1",
        &[&w.seed.source_key_ids[1]],
    )
    .await
    .unwrap();
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w.enqueue(w.seed.target_algo_id, json!({})).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert_eq!((j.processed, j.failed), (7, 13));
    assert_eq!(j.error.as_deref(), Some("13 items failed"));
    let codes: Vec<(String, String)> = c
        .query(
            "SELECT item_id, error_code FROM pq_migration_item_errors WHERE job_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(codes.len(), 13);
    assert!(
        codes.iter().all(|(_, code)| code == "integrity"),
        "{codes:?}"
    );
    for i in [0, 2, 4, 1, 3] {
        assert!(
            codes.iter().any(|(item, _)| *item == ids[i].to_string()),
            "row {i}"
        );
    }
    // only the 7 good Ed25519 rows got a countersignature
    let signed: Vec<String> = c
        .query(
            "SELECT subject_pk::text FROM signatures WHERE algo_id = $1 ORDER BY subject_pk::int",
            &[&w.seed.target_algo_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(signed, vec!["7", "9", "11", "13", "15", "17", "19"]);
    let metrics_failures = w
        .scalar(&format!(
            "SELECT failed_count FROM pq_migration_jobs WHERE id = {id}"
        ))
        .await;
    assert_eq!(metrics_failures, 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_signature_jobs_fail_before_any_item() {
    let w = SigFx::new(5).await;
    let c = w.fx.db.client().await;
    let alias = |a: &'static str| {
        let c = &c;
        async move {
            pqmig::db::algorithms::algorithm_by_alias(c, a)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let ed = alias("Ed25519").await;
    let ml44 = alias("ML-DSA-44").await;
    let t = w.seed.target_algo_id;
    let mut jobs = vec![
        (w.enqueue(ed, json!({})).await, "is not post-quantum"),
        (
            w.enqueue(ml44, json!({})).await,
            "no active signing key for the target algorithm ML-DSA 44",
        ),
        (
            w.enqueue(t, json!({"from_algos": ["RSA-2048"]})).await,
            "selection.from_algos[0]: unknown algorithm alias \"RSA-2048\"",
        ),
        (
            w.enqueue(t, json!({"subject_table": 7})).await,
            "selection.subject_table: expected a string",
        ),
    ];
    let daemon = InProcess::start(&w.fx, &[]).await;
    for (id, want) in jobs.drain(..) {
        let j = w.fx.wait_job(id, 30, terminal).await;
        assert_eq!(j.status, "failed", "{id}: {j:?}");
        assert!(
            j.error.as_deref().unwrap_or("").contains(want),
            "{:?} should say {want:?}",
            j.error
        );
        assert_eq!(j.processed + j.failed, 0);
    }
    // a second active ML-DSA-65 key for the same (any-table) scope
    let out = w.cli(&[
        "keys",
        "signing",
        "--algorithm",
        "ML-DSA-65",
        "--name",
        "pq-sign-2",
        "--kek",
        "local:kek-signing",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = w.enqueue(t, json!({})).await;
    let j = w.fx.wait_job(id, 30, terminal).await;
    assert_eq!(j.status, "failed");
    assert!(
        j.error.as_deref().unwrap().contains(
            "2 active ML-DSA 65 (sig) signing keys for scope (any table): pq-sign, pq-sign-2"
        ),
        "{:?}",
        j.error
    );
    daemon.stop().await;
    assert_eq!(
        w.scalar(&format!(
            "SELECT count(*) FROM signatures WHERE algo_id = {t}"
        ))
        .await,
        0
    );
}

/// One batch of countersignatures larger than `db::STATEMENT_BYTES` goes
/// in as several statements: every signature once, aligned with its
/// subject (pyca verifies each against its payload), each recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_wider_than_one_statement_countersigns_every_item_once() {
    const N: usize = 240;
    // ML-DSA-65 signatures are 3,309 bytes.
    const { assert!(N * 3309 > 2 * pqmig::db::STATEMENT_BYTES) };
    let w = SigFx::new(N).await;
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w
        .enqueue(w.seed.target_algo_id, json!({"batch_size": N}))
        .await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.processed, j.failed), (N as i64, 0));
    assert_eq!(j.result.expect("result")["batch_sizes"], json!([N]));
    let counter = w.countersignatures().await;
    assert_eq!(counter.len(), N);
    assert_eq!(
        sig_check(&["verify-mldsa"], &json!(counter).to_string()).trim(),
        format!("ok {N} signatures")
    );
    let recorded = w
        .scalar(&format!(
            "SELECT count(DISTINCT item_id) FROM pq_migration_backups_all WHERE job_id = {id}"
        ))
        .await;
    assert_eq!(recorded, N as i64);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_two_jobs_over_one_table_never_duplicate() {
    let w = SigFx::new(200).await;
    let mut a = w.fx.spawn_daemon("a", &[]);
    let mut b = w.fx.spawn_daemon("b", &[]);
    let j1 = w
        .enqueue(w.seed.target_algo_id, json!({"batch_size": 20}))
        .await;
    let j2 = w
        .enqueue(w.seed.target_algo_id, json!({"batch_size": 20}))
        .await;
    let mut migrated = 0;
    for id in [j1, j2] {
        let j = w.fx.wait_job(id, 60, terminal).await;
        assert_eq!(j.status, "done", "{j:?}");
        assert_eq!(j.processed, 200);
        migrated += j.result.unwrap()["migrated"].as_i64().unwrap();
    }
    terminate(&mut a);
    terminate(&mut b);
    assert_eq!(
        migrated, 200,
        "each subject countersigned by exactly one of the jobs"
    );
    assert_eq!(
        w.scalar(&format!(
            "SELECT count(*) FROM signatures WHERE algo_id = {}",
            w.seed.target_algo_id
        ))
        .await,
        200
    );
    for name in ["a", "b"] {
        let log = w.fx.log(name);
        for k in &w.keys.0 {
            assert!(
                !log.contains(&b64(&k.secret)),
                "{name}: a secret in the log"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_signing_seals_the_seed_under_the_kek_bound_to_its_name() {
    let w = SigFx::new(0).await;
    let out = w.cli(&[
        "keys",
        "signing",
        "--algorithm",
        "ML-DSA-87",
        "--name",
        "archive-2027",
        "--kek",
        "local:kek-signing",
        "--scope",
        "archive",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("ML-DSA-87): public key 2592 bytes"),
        "{}",
        stdout(&out)
    );
    let c = w.fx.db.client().await;
    let r = c
        .query_one("SELECT public_key, private_key_enc, scope::text, status, origin FROM signing_keys WHERE name = 'archive-2027'", &[])
        .await
        .unwrap();
    let (pk, sealed): (Vec<u8>, Vec<u8>) = (r.get(0), r.get(1));
    assert_eq!(
        (
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4)
        ),
        ("archive".into(), "active".into(), "local".into())
    );
    let kek: [u8; 32] = w
        .keys
        .0
        .iter()
        .find(|k| k.key_ref == "local:kek-signing")
        .unwrap()
        .secret[..]
        .try_into()
        .unwrap();
    // nonce(12) || AES-256-GCM(KEK, nonce, ξ, aad = "pqmig-signing-key:" || name)
    assert_eq!(sealed.len(), 12 + 32 + 16);
    let seed = pqmig::crypto::aead::open(&kek, &sealed, b"pqmig-signing-key:archive-2027")
        .expect("opens with its name");
    assert!(pqmig::crypto::aead::open(&kek, &sealed, b"pqmig-signing-key:archive-2028").is_err());
    assert_eq!(
        Signer::from_seed(SigAlg::MlDsa87, &seed)
            .unwrap()
            .public_key(),
        &pk[..]
    );
    assert!(!stdout(&out).contains(&b64(&seed)));
    for (args, want) in [
        (
            vec![
                "--algorithm",
                "ML-DSA-87",
                "--name",
                "archive-2027",
                "--kek",
                "local:kek-signing",
            ],
            "exists already",
        ),
        (
            vec![
                "--algorithm",
                "ML-DSA-65",
                "--name",
                "x",
                "--kek",
                "local:nope",
            ],
            "--kek \"local:nope\"",
        ),
        (
            vec![
                "--algorithm",
                "RSA",
                "--name",
                "x",
                "--kek",
                "local:kek-signing",
            ],
            "--algorithm \"RSA\"",
        ),
    ] {
        let mut a = vec!["keys", "signing"];
        a.extend(args);
        let out = w.cli(&a);
        assert_eq!(out.status.code(), Some(2), "{a:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
    }
}
