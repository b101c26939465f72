//! Wrappers opened only when bound to their row, and never moved to a
//! weaker KEM without consent.

use serde_json::json;

use pqmig::crypto::kem::Kem;

use crate::support::InProcess;
use crate::support::hashes::terminal;
use crate::support::wrappers::WrapFx;

/// After a policy-to-policy re-wrap, three wrappers are altered and a third
/// job over them finds each an `integrity` failure instead of re-wrapping
/// or skipping it: R gets its older v1 wrap back from the first job (a
/// replay: its AAD names wrap_version 2, the row is at 3), S's
/// crypto_suite claims the target state over a wrong commitment, T's layer
/// names another KEM than its crypto_suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_or_forged_v1_wrap_is_an_integrity_failure() {
    let mut w = WrapFx::new(12, Kem::MlKem768, 1).await;
    let second = w
        .add_policy("second", Kem::MlKem768, 1, "defined", 1, 1, None)
        .await;
    let c = w.fx.db.client().await;
    let ids: Vec<i64> = w.seed.deks.iter().map(|(id, _)| *id).collect();
    let daemon = InProcess::start(&w.fx, &[]).await;
    let first = w.enqueue(w.seed.policy_id, json!({})).await;
    assert_eq!(w.fx.wait_job(first, 60, terminal).await.status, "done");
    // R's state after the first job, as a backup would hold it
    let (old_wrap, old_suite): (Vec<u8>, serde_json::Value) = {
        let r = c
            .query_one(
                "SELECT dek_wrap1, crypto_suite FROM key_wrappers WHERE id = $1",
                &[&ids[0]],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    c.execute(
        "CREATE TABLE old_layers AS SELECT * FROM key_wrapper_layers WHERE key_wrapper_id = $1",
        &[&ids[0]],
    )
    .await
    .unwrap();
    let job2 = w.enqueue(second, json!({})).await;
    assert_eq!(w.fx.wait_job(job2, 60, terminal).await.status, "done");

    // R: replay the older wrap (and its layers), keeping wrap_version 3
    c.execute(
        "UPDATE key_wrappers SET dek_wrap1 = $2, crypto_suite = $3 WHERE id = $1",
        &[&ids[0], &old_wrap, &old_suite],
    )
    .await
    .unwrap();
    c.batch_execute(&format!(
        "DELETE FROM key_wrapper_layers WHERE key_wrapper_id = {0}; \
         INSERT INTO key_wrapper_layers SELECT * FROM old_layers;",
        ids[0]
    ))
    .await
    .unwrap();
    // S: a commitment that is not the wrap's (crypto_suite is unauthenticated)
    c.execute(
        "UPDATE key_wrappers SET crypto_suite = jsonb_set(crypto_suite, '{kc}', to_jsonb(encode(sha256('x'), 'base64'))) WHERE id = $1",
        &[&ids[1]],
    )
    .await
    .unwrap();
    // T: its layer claims ML-KEM-1024
    c.execute(
        "UPDATE key_wrapper_layers SET kem_algo_id = (SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'ML-KEM-1024') \
         WHERE key_wrapper_id = $1",
        &[&ids[2]],
    )
    .await
    .unwrap();
    let before = w.snapshot().await;
    let job3 = w.enqueue(second, json!({})).await;
    let j = w.fx.wait_job(job3, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert_eq!((j.processed, j.failed), (9, 3), "{j:?}");
    let errors: Vec<(String, String, String)> = c
        .query(
            "SELECT item_id, error_code, message FROM pq_migration_item_errors WHERE job_id = $1 ORDER BY item_id::bigint",
            &[&job3],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let codes: Vec<(String, &str)> = errors
        .iter()
        .map(|(i, c, _)| (i.clone(), c.as_str()))
        .collect();
    assert_eq!(
        codes,
        ids[..3]
            .iter()
            .map(|i| (i.to_string(), "integrity"))
            .collect::<Vec<_>>(),
        "{errors:?}"
    );
    assert!(errors[0].2.contains("older version"), "{errors:?}");
    assert!(errors[1].2.contains("commitment"), "{errors:?}");
    assert!(errors[2].2.contains("kem_algo_id"), "{errors:?}");
    // nothing was written for them (nor for the nine already in place)
    assert_eq!(w.snapshot().await, before);
}

/// Wrappers under X-Wing (a hybrid) are not moved to plain ML-KEM-768
/// unless the selection says `allow_downgrade`: the job fails before any
/// item, naming the KEM and a wrapper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_fails_before_any_item_unless_allowed() {
    let mut w = WrapFx::new(8, Kem::XWing, 1).await;
    let plain = w
        .add_policy("plain", Kem::MlKem768, 1, "defined", 1, 1, None)
        .await;
    let daemon = InProcess::start(&w.fx, &[]).await;
    let first = w.enqueue(w.seed.policy_id, json!({})).await;
    assert_eq!(w.fx.wait_job(first, 60, terminal).await.status, "done");
    let before = w.snapshot().await;
    let down = w.enqueue(plain, json!({})).await;
    let j = w.fx.wait_job(down, 60, terminal).await;
    assert_eq!(j.status, "failed", "{j:?}");
    let err = j.error.unwrap_or_default();
    assert!(
        err.contains("wrappers under X-Wing") && err.contains("allow_downgrade"),
        "{err}"
    );
    assert_eq!(j.processed + j.failed, 0);
    assert_eq!(w.snapshot().await, before);
    // legacy formats only: nothing to weaken, the job runs (and finds none)
    let legacy = w
        .enqueue(plain, json!({"formats": ["legacy-aes-gcm"]}))
        .await;
    assert_eq!(w.fx.wait_job(legacy, 60, terminal).await.status, "done");
    let allowed = w.enqueue(plain, json!({"allow_downgrade": true})).await;
    let j = w.fx.wait_job(allowed, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.result.as_ref().unwrap()["migrated"], 8);
    w.assert_every_dek_intact().await;
    // the strength order behind it
    assert!(Kem::MlKem768.is_downgrade_from(Kem::MlKem1024));
    assert!(Kem::XWing.is_downgrade_from(Kem::MlKem1024));
    assert!(Kem::MlKem1024.is_downgrade_from(Kem::XWing));
    assert!(!Kem::XWing.is_downgrade_from(Kem::MlKem768));
}

/// The check before the first item reads bounded slices only (the first
/// 2M ids of the selection's window); a stronger wrap beyond them is
/// caught item by item: the job fails with each such item a `downgrade`
/// error, and no wrapper changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_beyond_the_bounded_check_fails_item_by_item() {
    let mut w = WrapFx::new(8, Kem::XWing, 1).await;
    let plain = w
        .add_policy("plain", Kem::MlKem768, 1, "defined", 1, 1, None)
        .await;
    let daemon = InProcess::start(&w.fx, &[]).await;
    let first = w.enqueue(w.seed.policy_id, json!({})).await;
    assert_eq!(w.fx.wait_job(first, 60, terminal).await.status, "done");
    // A row 3M ids below the others, outside the v1-only selection: the
    // selection's id window starts there, the look ahead ends 1M ids short.
    w.fx.db
        .client()
        .await
        .execute(
            "INSERT INTO key_wrappers (id, wrapper_uuid, status) \
             VALUES ((SELECT min(id) FROM key_wrappers) - 3000000, gen_random_uuid()::text, 'retired')",
            &[],
        )
        .await
        .expect("a far row");
    let before = w.snapshot().await;
    let down = w
        .enqueue(plain, json!({"formats": ["pqmig-wrap-v1"]}))
        .await;
    let j = w.fx.wait_job(down, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert_eq!((j.processed, j.failed), (0, 8), "{j:?}");
    let kinds = w
        .scalar(&format!(
            "SELECT count(*) FROM pq_migration_item_errors WHERE job_id = {down} AND error_code = 'downgrade'"
        ))
        .await;
    assert_eq!(kinds, 8);
    assert_eq!(w.snapshot().await, before);
}

/// A wrapper_uuid stored in upper case is the same uuid: the v1 wrap uses
/// its lowercase text (pyca opens it with that); a policy named like a
/// placeholder is substituted once, literally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuids_are_canonical_and_placeholders_substituted_once() {
    let mut w = WrapFx::new(0, Kem::MlKem768, 1).await;
    let p = w
        .add_policy(
            "{wrapper_uuid}",
            Kem::MlKem768,
            1,
            "defined",
            1,
            1,
            Some(json!({"name": "{policy_name}", "u": "{wrapper_uuid}", "v": "{wrap_version}"})),
        )
        .await;
    let c = w.fx.db.client().await;
    let kek: [u8; 32] = w
        .keys
        .0
        .iter()
        .find(|k| k.key_ref == "local:kek-a")
        .unwrap()
        .secret[..]
        .try_into()
        .unwrap();
    let upper = uuid::Uuid::new_v4().to_string().to_uppercase();
    let dek = [5u8; 32];
    let wid: i64 = c
        .query_one(
            "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1) VALUES ($1, $2, $3) RETURNING id",
            &[&upper, &w.seed.legacy_key_ids[0], &pqmig::crypto::wrap::seal_legacy_aes(&kek, &upper, &dek)],
        )
        .await
        .unwrap()
        .get(0);
    // and one whose uuid is not a uuid at all: refused, never guessed
    let odd: i64 = c
        .query_one(
            "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1) VALUES ('not-a-uuid', $1, $2) RETURNING id",
            &[&w.seed.legacy_key_ids[0], &pqmig::crypto::wrap::seal_legacy_aes(&kek, "not-a-uuid", &dek)],
        )
        .await
        .unwrap()
        .get(0);
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w.enqueue(p, json!({})).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    daemon.stop().await;
    assert_eq!((j.processed, j.failed), (1, 1), "{j:?}");
    let (code, msg): (String, String) = {
        let r = c
            .query_one("SELECT error_code, message FROM pq_migration_item_errors WHERE job_id = $1 AND item_id = $2", &[&id, &odd.to_string()])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(code, "data");
    assert!(msg.contains("not a 36-character hyphenated uuid"), "{msg}");
    let aad: serde_json::Value = c
        .query_one(
            "SELECT aad FROM key_wrapper_layers WHERE key_wrapper_id = $1",
            &[&wid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        aad,
        json!({"name": "{wrapper_uuid}", "u": upper.to_lowercase(), "v": "2"})
    );
    w.assert_pyca_opens(&[(wid, dek)]).await;
}

/// A job's wraps are checked against the template it pinned when it
/// started: renaming the policy or editing its template afterwards does
/// not make them fail. A job resumed after such an edit stops instead of
/// writing under two templates. An earlier job whose wrappers a later job
/// re-wrapped still verifies (same DEKs), so its backups can be purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edit_after_the_job_and_a_later_rewrap_leave_verify_working() {
    let mut w = WrapFx::new(10, Kem::MlKem768, 1).await;
    let template = json!({"u": "{wrapper_uuid}", "v": "{wrap_version}", "p": "{policy_name}"});
    let second = w
        .add_policy("second", Kem::MlKem768, 1, "defined", 1, 1, Some(template))
        .await;
    let c = w.fx.db.client().await;
    let daemon = InProcess::start(&w.fx, &[]).await;
    let first = w.enqueue(w.seed.policy_id, json!({})).await;
    assert_eq!(w.fx.wait_job(first, 60, terminal).await.status, "done");
    let job2 = w.enqueue(second, json!({})).await;
    let j = w.fx.wait_job(job2, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.result.as_ref().unwrap()["policy"]["name"], "second");

    // the operator renames the policy and edits its template
    c.execute(
        "UPDATE encryption_policies SET policy_name = 'renamed', \
         aad_template = '{\"u\": \"{wrapper_uuid}\", \"v\": \"{wrap_version}\"}' WHERE id = $1",
        &[&second],
    )
    .await
    .unwrap();
    let out = w.cli(&["verify", &job2.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(crate::support::stdout(&out).contains("10 items verified"));
    w.assert_every_dek_intact().await;

    // job 1's wrappers were all re-wrapped by job 2: still the same DEKs
    let out = w.cli(&["verify", &first.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    assert!(
        crate::support::stdout(&out).contains("10 items verified"),
        "{}",
        crate::support::stdout(&out)
    );
    let out = w.cli(&["purge-backups", &first.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));

    // a job under the edited policy, cancelled, then the template edited
    // again and the job resumed: it stops before writing anything more
    c.execute(
        "UPDATE key_wrappers SET status = 'rotated' WHERE id = $1",
        &[&w.seed.deks[0].0],
    )
    .await
    .unwrap();
    let job3 = w
        .enqueue(second, json!({"status": ["rotated"], "batch_size": 1}))
        .await;
    assert_eq!(w.fx.wait_job(job3, 60, terminal).await.status, "done");
    c.execute(
        "UPDATE pq_migration_jobs SET status = 'cancelled' WHERE id = $1",
        &[&job3],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE encryption_policies SET aad_template = '{\"u\": \"{wrapper_uuid}\", \"v\": \"{wrap_version}\", \"x\": \"y\"}' WHERE id = $1",
        &[&second],
    )
    .await
    .unwrap();
    let out = w.cli(&["resume", &job3.to_string()]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let j = w.fx.wait_job(job3, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert!(
        j.error
            .as_deref()
            .unwrap_or("")
            .contains("aad_template changed since the job started"),
        "{j:?}"
    );
}

/// SPEC §5: a legacy wrap's AAD is the uuid's lowercase text, also when
/// the column holds it in upper case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_wrap_of_an_upper_case_uuid_opens_with_its_lowercase_text() {
    let w = WrapFx::new(0, Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let kek: [u8; 32] = w
        .keys
        .0
        .iter()
        .find(|k| k.key_ref == "local:kek-a")
        .unwrap()
        .secret[..]
        .try_into()
        .unwrap();
    let upper = uuid::Uuid::new_v4().to_string().to_uppercase();
    let dek = [6u8; 32];
    let sealed = pqmig::crypto::wrap::seal_legacy_aes(&kek, &upper.to_lowercase(), &dek);
    let wid: i64 = c
        .query_one(
            "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1) VALUES ($1, $2, $3) RETURNING id",
            &[&upper, &w.seed.legacy_key_ids[0], &sealed],
        )
        .await
        .unwrap()
        .get(0);
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "done", "{j:?}");
    w.assert_pyca_opens(&[(wid, dek)]).await;
}
