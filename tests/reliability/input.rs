//! Hostile selections and concurrent application writes.

use super::*;

/// Hostile values for any key of a selection: wrong types, extremes, SQL
/// fragments, control and bidi characters, huge arrays, deep nesting.
fn hostile_value() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let text = prop::sample::select(vec![
        "users; DROP TABLE users; --".to_owned(),
        "' OR '1'='1".to_owned(),
        "email_hash\u{1}".to_owned(), // jsonb refuses \u0000 itself
        "\u{202e}hsah_liame".to_owned(),
        "users\"--".to_owned(),
        "pg_catalog.pg_authid".to_owned(),
        "users WHERE true".to_owned(),
        "$1".to_owned(),
        "line\nbreak".to_owned(),
        "\u{fffd}\u{feff}\u{7f}".to_owned(),
        String::new(),
        "x".repeat(5000),
    ]);
    let nest = (129usize..400, any::<bool>()).prop_map(|(depth, arrays)| {
        let mut v = json!(1);
        for _ in 0..depth {
            v = if arrays {
                json!([v])
            } else {
                json!({ "a": v })
            };
        }
        v
    });
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            json!(-1),
            json!(0),
            json!(i64::MIN),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(1e300),
            json!(0.5),
            json!("9223372036854775808"),
        ]),
        text.prop_map(Value::from),
        prop::collection::vec(any::<i64>(), 0..4).prop_map(Value::from),
        Just(Value::from((0..20_000).collect::<Vec<i64>>())),
        Just(json!([null, "1", 2.5, {"id": 1}])),
        nest,
    ]
}

/// A selection for `scope` with one to three hostile entries. `id_to` is
/// always a number up to 100, so whatever else the selection says, a
/// correct run touches no item with an id above 100.
fn hostile_selection(scope: &'static str) -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let keys = prop::sample::select(vec![
        "ids",
        "id_from",
        "limit",
        "batch_size",
        "max_rate",
        "dry_run",
        "max_failures",
        "table",
        "column",
        "version_column",
        "id_column",
        "from_algos",
        "subject_table",
        "context",
        "signing_key_ids",
        "kms_key_ids",
        "verify",
        "backup",
        "; DROP TABLE users",
        "__proto__",
        "\u{202e}ids",
        "",
    ]);
    let entries = prop::collection::vec((keys, hostile_value()), 1..4);
    (entries, -5i64..=100, any::<u8>()).prop_map(move |(entries, id_to, shape)| {
        if shape < 12 {
            // Not an object at all (a JSON null is "no selection", all
            // items, so it is not generated).
            return match entries.into_iter().next().map(|e| e.1) {
                Some(Value::Null) | None => json!([null]),
                Some(v) => v,
            };
        }
        let mut sel = match scope {
            "hashes" => json!({"table": "users", "column": "email_hash"}),
            _ => json!({}),
        };
        for (k, v) in entries {
            sel[k] = v;
        }
        sel["id_to"] = json!(id_to);
        sel
    })
}

/// Fault 7: generated hostile selections for every scope, run by a real
/// replica. Each job ends `failed` with one clean line naming the problem,
/// or `done`; the replica never panics and keeps claiming; no item with an
/// id above the selection's bound is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_selections_fail_cleanly_and_touch_nothing_outside_them() {
    use proptest::strategy::{Strategy, ValueTree};
    let mut m = Mixed::seeded().await;
    let c = m.client().await;
    let outside = format!(
        "SELECT concat( \
        (SELECT jsonb_agg(to_jsonb(u) ORDER BY id) FROM users u WHERE id > 100), \
        (SELECT jsonb_agg(to_jsonb(w) ORDER BY id) FROM key_wrappers w WHERE id > 100), \
        (SELECT jsonb_agg(to_jsonb(l) ORDER BY id) FROM key_wrapper_layers l WHERE key_wrapper_id > 100), \
        (SELECT jsonb_agg(to_jsonb(s) ORDER BY id) FROM signatures s WHERE id > 100 AND id <= {SIGNED}))"
    );
    let outside = outside.as_str();
    let before: String = c.query_one(outside, &[]).await.expect("snapshot").get(0);
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut jobs: Vec<(i64, &str, Value)> = Vec::new();
    for scope in ["hashes", "wrappers", "signatures"] {
        let strategy = hostile_selection(scope);
        for _ in 0..40 {
            let sel = strategy.new_tree(&mut runner).expect("generate").current();
            let (policy, algo) = match scope {
                "hashes" => (None, Some(m.w.fx.algo_id)),
                "wrappers" => (Some(m.w.seed.policy_id), None),
                _ => (None, Some(m.sig.target_algo_id)),
            };
            let id = enqueue(&c, scope, policy, algo, &sel).await;
            jobs.push((id, scope, sel));
        }
    }
    let mut r = Replicas(vec![m.spawn("h", &[])]);
    let bidi = |ch: char| matches!(ch, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    let (mut failed, mut too_deep) = (0, 0);
    for (id, scope, sel) in &jobs {
        let j = m.w.fx.wait_job(*id, 60, terminal).await;
        let shown: String = sel.to_string().chars().take(300).collect();
        match j.status.as_str() {
            "failed" => {
                failed += 1;
                let e = j.error.as_deref().unwrap_or("");
                too_deep +=
                    usize::from(e.starts_with("selection: unreadable JSON (recursion limit"));
                assert!(
                    !e.is_empty()
                        && e.len() <= 400
                        && !e.chars().any(|ch| ch.is_control() || bidi(ch)),
                    "{scope} job {id}: unclear error {e:?} for {shown}"
                );
            }
            "done" => assert!(
                j.processed + j.failed <= 100,
                "{scope} job {id} walked past its bound: {j:?} for {shown}"
            ),
            other => panic!("{scope} job {id} ended {other}: {j:?} for {shown}"),
        }
    }
    assert!(
        failed >= 60,
        "the generator produced mostly invalid jobs ({failed})"
    );
    assert!(
        too_deep >= 1,
        "deeply nested selections were generated and failed cleanly"
    );
    let after: String = c.query_one(outside, &[]).await.expect("snapshot").get(0);
    assert!(before == after, "a row outside every selection changed");
    let stray: i64 = c
        .query_one(
            "SELECT count(*) FROM signatures s JOIN signatures src \
               ON (src.subject_table, src.subject_pk, src.context) = (s.subject_table, s.subject_pk, s.context) \
             WHERE s.algo_id = $1 AND src.id > 100 AND src.id <= $2",
            &[&m.sig.target_algo_id, &SIGNED],
        )
        .await
        .expect("countersignatures")
        .get(0);
    assert_eq!(
        stray, 0,
        "a source outside the selections was countersigned"
    );
    assert!(
        r.0[0].try_wait().expect("wait").is_none(),
        "the replica is alive"
    );
    let log = m.w.fx.log("h");
    assert!(!log.contains("panicked"), "{log}");
    m.assert_no_secret_logged();
    r.stop();
}

/// Fault 5: while two replicas work the mixed queue, an application writer
/// (its own session) keeps changing users' email hashes and rotating
/// wrappers to fresh DEKs. No write is lost and nothing ends half-done:
/// each changed row is either the writer's last value or exactly that
/// value migrated; each rotated wrapper opens to the writer's last DEK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_writes_during_the_jobs_are_never_lost() {
    use crate::support::hashes::{PROFILE, expected_hash, legacy_hash};
    let mut m = Mixed::new().await;
    let mut r = Replicas(vec![m.spawn("a", &[]), m.spawn("b", &[])]);
    let kek: [u8; 32] =
        m.w.keys
            .0
            .iter()
            .find(|k| k.key_ref == "local:kek-a")
            .expect("legacy AES KEK")
            .secret[..]
            .try_into()
            .expect("32 bytes");
    let writer = m.client().await;
    let mut rng = Rng::new();
    let mut hashed: std::collections::HashMap<i64, Vec<u8>> = Default::default();
    let mut rotated: std::collections::HashMap<i64, [u8; 32]> = Default::default();
    let stop = Instant::now() + Duration::from_secs(4);
    let mut n = 0u64;
    while Instant::now() < stop {
        n += 1;
        let user = 1 + rng.below(USERS as u64) as i64;
        let new = legacy_hash(1_000_000 + n as i64);
        writer
            .execute(
                "UPDATE users SET email_hash = $2, email_hash_key_version = 'v1' WHERE id = $1",
                &[&user, &new],
            )
            .await
            .expect("application hash write");
        hashed.insert(user, new);
        let wid = m.w.seed.deks[rng.below(WRAPPERS as u64) as usize].0;
        let uuid: String = writer
            .query_one(
                "SELECT wrapper_uuid::text FROM key_wrappers WHERE id = $1",
                &[&wid],
            )
            .await
            .expect("uuid")
            .get(0);
        let mut dek = [0u8; 32];
        dek[..8].copy_from_slice(&n.to_be_bytes());
        dek[8] = 0xd5;
        let wrap = pqmig::crypto::wrap::seal_legacy_aes(&kek, uuid.trim_end(), &dek);
        writer
            .execute(
                "UPDATE key_wrappers SET dek_wrap1 = $2, dek_wrap2 = NULL, kms1_key_id = $3, \
                        kms2_key_id = NULL, crypto_suite = NULL, wrap_version = wrap_version + 1 \
                 WHERE id = $1",
                &[&wid, &wrap, &m.w.seed.legacy_key_ids[0]],
            )
            .await
            .expect("application rotation");
        // The layers of a PQ wrap the application replaced are its own to drop.
        writer
            .execute(
                "DELETE FROM key_wrapper_layers WHERE key_wrapper_id = $1",
                &[&wid],
            )
            .await
            .expect("drop old layers");
        rotated.insert(wid, dek);
        tokio::time::sleep(Duration::from_millis(5 + rng.below(30))).await;
    }
    assert!(
        hashed.len() > 20 && rotated.len() > 20,
        "the writer kept writing"
    );
    m.wait_all(90).await;
    for q in &m.jobs {
        let j = m.w.fx.job(q.id).await;
        assert_eq!(
            (j.status.as_str(), j.processed, j.failed),
            ("done", q.items, 0),
            "{} job {}: {j:?}",
            q.scope,
            q.id
        );
    }
    let (mut writer_last, mut migrated_after) = (0, 0);
    for (id, hash, version) in m.w.fx.users().await {
        match hashed.get(&id) {
            None => {
                assert_eq!(version, format!("{PROFILE}/v1"), "user {id}");
                assert_eq!(hash, expected_hash(&legacy_hash(id)), "user {id}");
            }
            Some(new) if version == "v1" => {
                assert_eq!(&hash, new, "user {id}: the application's hash");
                writer_last += 1;
            }
            Some(new) => {
                assert_eq!(version, format!("{PROFILE}/v1"), "user {id}");
                assert_eq!(hash, expected_hash(new), "user {id}: lost write");
                migrated_after += 1;
            }
        }
    }
    eprintln!("writes: {writer_last} kept as written, {migrated_after} migrated after the write");
    assert!(writer_last + migrated_after == hashed.len());
    assert!(
        migrated_after > 0,
        "some writes landed before the job reached them"
    );
    let open = m.w.open_all().await;
    for (wid, dek) in &m.w.seed.deks {
        let want = rotated.get(wid).unwrap_or(dek);
        assert_eq!(open[wid].as_deref(), Ok(&want[..]), "wrapper {wid}");
    }
    let c = m.client().await;
    let broken: i64 = c
        .query_one(
            "SELECT count(*) FROM key_wrappers w WHERE (w.crypto_suite->>'format' = 'pqmig-wrap-v1') \
               <> EXISTS (SELECT 1 FROM key_wrapper_layers l WHERE l.key_wrapper_id = w.id)",
            &[],
        )
        .await
        .expect("mixed state")
        .get(0);
    assert_eq!(
        broken, 0,
        "a wrapper with layers but no PQ suite, or the reverse"
    );
    r.stop();
    m.assert_no_secret_logged();
}
