//! The look a job's start takes for a selected wrapper that needs a key
//! this process cannot use (`db::wrappers::first_needing`): it names the
//! wrapper and the key, finds none outside the selection, says when it ran
//! out of its time, and leaves the connection as it found it.

use std::time::Duration;

use pqmig::db::wrappers::{Probe, WrapperFilter, first_needing};
use serde_json::{Value, json};

use crate::support::db::TestDb;

fn filter(selection: Value) -> WrapperFilter {
    WrapperFilter::new(&pqmig::selection::parse_wrappers(Some(&selection)).expect("selection"))
}

#[tokio::test]
async fn first_needing_names_a_wrapper_and_its_key_or_says_it_ran_out_of_time() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let key = |r: &str| {
        format!(
            "INSERT INTO kms_keys (provider_id, external_key_ref, purpose) \
             SELECT id, '{r}', 'wrap' FROM kms_providers WHERE name = 'p' RETURNING id"
        )
    };
    c.batch_execute("INSERT INTO kms_providers (name, provider) VALUES ('p', 'local')")
        .await
        .unwrap();
    let a: i64 = c.query_one(&key("a"), &[]).await.unwrap().get(0);
    let b: i64 = c.query_one(&key("b"), &[]).await.unwrap().get(0);
    // 300,000 wrappers under `a`; one, far in, with `b` as its second key.
    c.execute(
        "INSERT INTO key_wrappers (wrapper_uuid, kms1_key_id, dek_wrap1, status) \
         SELECT gen_random_uuid()::text, $1, '\\x00', 'active' FROM generate_series(1, 300000)",
        &[&a],
    )
    .await
    .unwrap();
    let needing: i64 = c
        .query_one(
            "UPDATE key_wrappers SET kms2_key_id = $1 WHERE id = (SELECT min(id) + 250000 FROM key_wrappers) RETURNING id",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    // A wrapper rewritten to pqmig-wrap-v1 keeps its old kms1, which it no
    // longer needs (its layers open it): not one to find.
    c.execute(
        "UPDATE key_wrappers SET kms1_key_id = $1, crypto_suite = '{\"format\": \"pqmig-wrap-v1\"}' \
         WHERE id = (SELECT min(id) + 10 FROM key_wrappers)",
        &[&b],
    )
    .await
    .unwrap();
    async fn timeout(c: &tokio_postgres::Client) -> String {
        let r = c.query_one("SHOW statement_timeout", &[]).await.unwrap();
        r.get(0)
    }
    let before = timeout(&c).await;

    let ten = Duration::from_secs(10);
    assert_eq!(
        first_needing(&mut c, &filter(json!({})), &[b], ten)
            .await
            .unwrap(),
        Probe::Found {
            wrapper: needing,
            key: b
        }
    );
    let below = json!({"id_to": needing - 1});
    assert_eq!(
        first_needing(&mut c, &filter(below), &[b], ten)
            .await
            .unwrap(),
        Probe::None
    );
    // No wrapper needs key `a + b`: the whole table is read, far beyond a
    // millisecond.
    assert_eq!(
        first_needing(
            &mut c,
            &filter(json!({})),
            &[a + b],
            Duration::from_millis(1)
        )
        .await
        .unwrap(),
        Probe::TooSlow
    );
    // The connection is as it was: no transaction open, its own timeout.
    assert_eq!(timeout(&c).await, before);
    assert_outside_a_transaction(&c).await;

    // A caller that stops waiting mid-query (a job start dropped when its
    // lease is lost) leaves no transaction behind on the connection.
    let dropped = tokio::time::timeout(
        Duration::from_millis(5),
        first_needing(&mut c, &filter(json!({})), &[a + b], ten),
    )
    .await;
    assert!(dropped.is_err(), "still running after 5 ms");
    assert_eq!(timeout(&c).await, before);
    assert_outside_a_transaction(&c).await;
}

/// In a transaction, now() would stand still between statements.
async fn assert_outside_a_transaction(c: &tokio_postgres::Client) {
    let now = || async {
        let r = c.query_one("SELECT now()::text", &[]).await.unwrap();
        r.get::<_, String>(0)
    };
    let first = now().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_ne!(now().await, first, "no transaction left open");
}
