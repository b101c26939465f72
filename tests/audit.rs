//! The tamper-evident audit trail (migration V9): every job event is
//! chained to the one before it by a hash the database computes when it is
//! written; `pqmig audit verify` recomputes the chains outside it.

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::support::InProcess;
use crate::support::hashes::{Fixture, terminal};
use crate::support::{hex, run, stderr, stdout};

/// Insert an event as a pre-V9 row: no chain.
async fn unchained_event(c: &tokio_postgres::Client, job: i64) {
    c.batch_execute(&format!(
        "ALTER TABLE pq_migration_job_events DISABLE TRIGGER trg_pq_mig_job_events_chain; \
         INSERT INTO pq_migration_job_events (job_id, event, worker) VALUES ({job}, 'resumed', 'old'); \
         ALTER TABLE pq_migration_job_events ENABLE TRIGGER trg_pq_mig_job_events_chain;"
    ))
    .await
    .expect("an event from before V9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_chains_verify_and_name_the_first_broken_link() {
    let fx = Fixture::new(300).await;
    let c = fx.db.client().await;
    let daemon = InProcess::start(&fx, &[]).await;
    let id = fx.enqueue(json!({"batch_size": 50})).await;
    unchained_event(&c, id).await;
    let j = fx.wait_job(id, 30, terminal).await;
    assert_eq!(j.status, "done");
    let other = fx.enqueue(json!({"id_to": 10})).await;
    assert_eq!(fx.wait_job(other, 30, terminal).await.status, "done");
    daemon.stop().await;

    let env = [("DATABASE_URL", fx.db.url.as_str())];
    let out = run(&["audit", "verify"], &env);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("2 jobs checked: every chain holds"), "{said}");
    let chained: i64 = c
        .query_one(
            "SELECT count(*) FROM pq_migration_job_events WHERE job_id = $1 AND hash IS NOT NULL",
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert!(chained >= 2, "claimed and done at least");
    assert!(
        said.contains(&format!("job {id}: {chained} events chained, head "))
            && said.contains("1 unchained (written before migration V9)"),
        "{said}"
    );

    // The stored hash is SHA-256 over the documented canonical bytes,
    // rebuilt here from the row without pqmig's code.
    let r = c
        .query_one(
            "SELECT chain_no, job_id, event, worker, detail::text, \
               to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
               prev_hash, hash FROM pq_migration_job_events \
             WHERE job_id = $1 AND chain_no = 2",
            &[&id],
        )
        .await
        .expect("the second link");
    let field = |t: Option<String>| match t {
        None => "-,".to_owned(),
        Some(t) => format!("{}:{t},", t.len()),
    };
    let canonical = [
        Some("pqmig-event-v1".to_owned()),
        Some(r.get::<_, i64>(0).to_string()),
        Some(r.get::<_, i64>(1).to_string()),
        Some(r.get(2)),
        r.get(3),
        r.get(4),
        Some(r.get(5)),
        r.get::<_, Option<Vec<u8>>>(6).map(|h| hex(&h)),
    ]
    .into_iter()
    .map(field)
    .collect::<String>();
    assert_eq!(
        Sha256::digest(canonical.as_bytes()).to_vec(),
        r.get::<_, Vec<u8>>(7)
    );

    // One changed detail: exit 1, naming that event.
    let victim: i64 = c
        .query_one(
            "SELECT id FROM pq_migration_job_events WHERE job_id = $1 AND chain_no = 1",
            &[&id],
        )
        .await
        .expect("victim")
        .get(0);
    c.execute(
        "UPDATE pq_migration_job_events SET detail = '{\"forged\": true}' WHERE id = $1",
        &[&victim],
    )
    .await
    .expect("tamper");
    let out = run(&["audit", "verify", &id.to_string()], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!(
            "job {id}: BROKEN at event {victim}: its content does not match its hash"
        )),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains(&format!("job {id} at event {victim}")));
    // The other job's chain is not affected.
    let out = run(&["audit", "verify", &other.to_string()], &env);
    assert!(out.status.success(), "{}", stdout(&out));

    // A deleted event: the next one no longer links.
    c.execute(
        "DELETE FROM pq_migration_job_events WHERE id = $1",
        &[&victim],
    )
    .await
    .expect("delete");
    let next: i64 = c
        .query_one(
            "SELECT id FROM pq_migration_job_events WHERE job_id = $1 AND chain_no = 2",
            &[&id],
        )
        .await
        .expect("next")
        .get(0);
    let out = run(&["audit", "verify", &id.to_string()], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!(
            "BROKEN at event {next}: it is link 2 where link 1 should be"
        )),
        "{}",
        stdout(&out)
    );

    let out = run(&["audit", "verify", "999999"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no job with id 999999"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_of_one_job_form_one_chain() {
    let fx = Fixture::new(0).await;
    let id = fx.enqueue(json!({})).await;
    let mut tasks = Vec::new();
    for w in 0..6 {
        let c = fx.db.client().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                c.execute(
                    "INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
                     VALUES ($1, 'released', $2, '{\"reason\": \"test\"}')",
                    &[&id, &format!("w{w}")],
                )
                .await
                .expect("event");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let c = fx.db.client().await;
    let (n, distinct, top): (i64, i64, Option<i64>) = {
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT chain_no), max(chain_no) \
                 FROM pq_migration_job_events WHERE job_id = $1",
                &[&id],
            )
            .await
            .expect("chain");
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(
        (n, distinct, top),
        (120, 120, Some(120)),
        "one link each, no fork"
    );
    let env = [("DATABASE_URL", fx.db.url.as_str())];
    let out = run(&["audit", "verify", &id.to_string()], &env);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("120 events chained"),
        "{}",
        stdout(&out)
    );
}
