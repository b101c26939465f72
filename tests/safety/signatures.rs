//! Countersignatures as exact evidence: one per subject whatever the
//! batches, PQ sources checked with their context, no silent downgrade.

use serde_json::{Value, json};

use pqmig::crypto::sig::SigAlg;

use crate::support::InProcess;
use crate::support::hashes::terminal;
use crate::support::signatures::{SigFx, sig_check};
use crate::support::stderr;
use crate::support::{b64, unb64};

/// The source ids a job countersigned (its backups), with their extras.
async fn countersigned_sources(w: &SigFx, job: i64) -> Vec<(i64, Value)> {
    let c = w.fx.db.client().await;
    c.query(
        "SELECT item_id::bigint, data FROM pq_migration_backups_all WHERE job_id = $1 ORDER BY item_id::bigint",
        &[&job],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Two subjects with two sources each: "dup-a" Ed25519 then ECDSA (both
/// valid: the Ed25519 one, lower id, is countersigned); "dup-b" a forged
/// Ed25519 then a valid ECDSA (the ECDSA one is). Whether both sources of
/// a subject are in one batch or in two, the same source is countersigned,
/// once, and the counts agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_countersignature_per_subject_whatever_the_batches() {
    let w = SigFx::new(6).await;
    let c = w.fx.db.client().await;
    let [ed, ec] = &w.seed.source_signers;
    let payload = [9u8; 32];
    let insert = async |pk: &str, i: usize, signature: Vec<u8>| -> i64 {
        c.query_one(
            "INSERT INTO signatures (subject_table, subject_pk, context, algo_id, signing_key_id, signature, payload_hash) \
             SELECT 'documents', $1, 'doc-v1', k.algo_id, k.id, $3, $4 FROM signing_keys k WHERE k.id = $2 RETURNING id",
            &[&pk, &w.seed.source_key_ids[i], &signature, &&payload[..]],
        )
        .await
        .unwrap()
        .get(0)
    };
    let a_ed = insert("dup-a", 0, ed.sign(&payload, &[]).unwrap()).await;
    let a_ec = insert("dup-a", 1, ec.sign(&payload, &[]).unwrap()).await;
    let b_ed = insert("dup-b", 0, vec![0u8; 64]).await;
    let b_ec = insert("dup-b", 1, ec.sign(&payload, &[]).unwrap()).await;

    let daemon = InProcess::start(&w.fx, &[]).await;
    let mut winners = Vec::new();
    for selection in [json!({}), json!({"batch_size": 1})] {
        let id = w.enqueue(w.seed.target_algo_id, selection.clone()).await;
        let j = w.fx.wait_job(id, 60, terminal).await;
        // the forged source is an integrity failure, never countersigned
        assert_eq!(j.status, "failed", "{j:?}");
        assert_eq!(j.error.as_deref(), Some("1 items failed"));
        let r = j.result.clone().unwrap();
        assert_eq!(
            (r["migrated"].as_i64(), r["skipped"].as_i64()),
            (Some(8), Some(1)),
            "{selection}: {r}"
        );
        let sources = countersigned_sources(&w, id).await;
        assert_eq!(sources.len(), 8, "{selection}: {sources:?}");
        let ids: Vec<i64> = sources.iter().map(|(s, _)| *s).collect();
        assert!(ids.contains(&a_ed) && ids.contains(&b_ec), "{ids:?}");
        assert!(!ids.contains(&a_ec) && !ids.contains(&b_ed), "{ids:?}");
        if selection == json!({}) {
            // one batch: the duplicate is counted and named in the backup
            assert_eq!(r["duplicates"], 1, "{r}");
            let extra = &sources.iter().find(|(s, _)| *s == a_ed).unwrap().1;
            assert_eq!(extra["duplicate_sources"], json!([a_ec]), "{extra}");
        }
        assert_eq!(
            w.scalar(&format!(
                "SELECT count(*) FROM (SELECT 1 FROM signatures WHERE algo_id = {} \
                 GROUP BY subject_table, subject_pk, context HAVING count(*) > 1) d",
                w.seed.target_algo_id
            ))
            .await,
            0
        );
        winners.push(ids);
        let out = w.cli(&["rollback", &id.to_string()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(winners[0], winners[1]);
    daemon.stop().await;
}

/// A move from ML-DSA-44 to ML-DSA-87: the sources, made by pyca with
/// their context, verify in pqmig (with the row's context), and pyca
/// verifies every countersignature. Going back down to ML-DSA-65 is
/// refused before any item unless the selection allows a downgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pq_sources_verify_with_their_context_and_no_downgrade_without_consent() {
    let w = SigFx::new(0).await;
    let c = w.fx.db.client().await;
    let alias = async |a: &str| {
        pqmig::db::algorithms::algorithm_by_alias(&c, a)
            .await
            .unwrap()
            .unwrap()
    };
    let (ml44, ml87) = (alias("ML-DSA-44").await, alias("ML-DSA-87").await);
    let items: Vec<Value> = (0..6u8)
        .map(|i| json!({"msg": b64(&[i; 32]), "ctx": format!("ctx-{i}")}))
        .collect();
    let made: Value = serde_json::from_str(&sig_check(
        &["make-mldsa-sources"],
        &json!({"alg": "ML-DSA-44", "items": items}).to_string(),
    ))
    .unwrap();
    let key = pqmig::db::signatures::signing_key_import(&c, ml44, "pyca-44", &unb64(&made["pk"]))
        .await
        .unwrap();
    for (i, it) in items.iter().enumerate() {
        c.execute(
            "INSERT INTO signatures (subject_table, subject_pk, context, algo_id, signing_key_id, signature, payload_hash) \
             VALUES ('documents', $1, $2, $3, $4, $5, $6)",
            &[&i.to_string(), &it["ctx"].as_str().unwrap(), &ml44, &key, &unb64(&made["sigs"][i]), &unb64(&it["msg"])],
        )
        .await
        .unwrap();
    }
    // the source signer is retired (its signatures still verify): only
    // pqmig's own keys are active
    c.execute(
        "UPDATE signing_keys SET status = 'retired' WHERE id = $1",
        &[&key],
    )
    .await
    .unwrap();
    for (alg, name) in [("ML-DSA-87", "pq-87"), ("ML-DSA-44", "pq-44")] {
        let out = w.cli(&[
            "keys",
            "signing",
            "--algorithm",
            alg,
            "--name",
            name,
            "--kek",
            "local:kek-signing",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w.enqueue(ml87, json!({"from_algos": ["ML-DSA-44"]})).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.processed, j.failed), (6, 0));
    let made87: Vec<Value> = c
        .query(
            "SELECT k.public_key, s.payload_hash, s.context::text, s.signature FROM signatures s \
             JOIN signing_keys k ON k.id = s.signing_key_id WHERE s.algo_id = $1 ORDER BY s.id",
            &[&ml87],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            json!({"alg": "ML-DSA-87", "pk": b64(&r.get::<_, Vec<u8>>(0)), "msg": b64(&r.get::<_, Vec<u8>>(1)),
                   "ctx": r.get::<_, String>(2), "sig": b64(&r.get::<_, Vec<u8>>(3))})
        })
        .collect();
    assert_eq!(
        sig_check(&["verify-mldsa"], &json!(made87).to_string()).trim(),
        "ok 6 signatures"
    );

    // ML-DSA-87 (level 5) countersigned with ML-DSA-44 (level 2): refused
    let before = w.scalar("SELECT count(*) FROM signatures").await;
    let down = w.enqueue(ml44, json!({"from_algos": ["ML-DSA-87"]})).await;
    let j = w.fx.wait_job(down, 60, terminal).await;
    assert_eq!(j.status, "failed");
    let err = j.error.unwrap_or_default();
    assert!(
        err.contains("would weaken them") && err.contains("allow_downgrade"),
        "{err}"
    );
    assert_eq!(j.processed + j.failed, 0);
    assert_eq!(w.scalar("SELECT count(*) FROM signatures").await, before);
    // ... unless the selection says so (the subjects have their ML-DSA-44
    // sources already, so each is walked and found in the target state)
    let down = w
        .enqueue(
            ml44,
            json!({"from_algos": ["ML-DSA-87"], "allow_downgrade": true}),
        )
        .await;
    let j = w.fx.wait_job(down, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.processed, j.failed), (6, 0));
    // upward is no downgrade; SLH-DSA (level 1) under ML-DSA-44 (2) is
    assert!(!SigAlg::MlDsa65.is_downgrade_from(SigAlg::MlDsa44));
    assert!(SigAlg::SlhDsaSha2_128f.is_downgrade_from(SigAlg::MlDsa44));
    daemon.stop().await;
}
