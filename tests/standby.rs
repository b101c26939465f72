//! The streaming-standby harness (`support::standby`) itself: a standby
//! whose replay runs keeps up with the primary, one whose replay is paused
//! falls behind by what is written meanwhile, and catches up on resuming.

use std::time::Duration;

use crate::support::{connect, standby::Replicated};

const MB: i64 = 1 << 20;
/// About 45 MB of WAL (300,000 rows of ~130 bytes).
const WRITE: &str = "INSERT INTO filler SELECT g, repeat('x', 100) \
                     FROM generate_series(1, 300000) g";

#[tokio::test]
async fn paused_replay_makes_lag_that_resuming_clears() {
    let pair = Replicated::start().await;
    let db = pair.fresh_db().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE filler (id int NOT NULL, pad text NOT NULL)")
        .await
        .expect("create table");
    let wal_lsn = "SELECT pg_current_wal_lsn()::text";
    let written_since = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint";

    // Replaying: the standby keeps up with a large write.
    let before: String = client.query_one(wal_lsn, &[]).await.unwrap().get(0);
    client.execute(WRITE, &[]).await.expect("first write");
    let written: i64 = client
        .query_one(written_since, &[&before])
        .await
        .unwrap()
        .get(0);
    assert!(
        written > 30 * MB,
        "the write made only {written} bytes of WAL"
    );
    let replaying = std::time::Instant::now();
    pair.wait_lag_below(MB, 10).await;
    let caught_up_in = replaying.elapsed();
    for _ in 0..5 {
        let lag = pair.lag_bytes().await;
        assert!(lag < MB, "lag {lag} bytes while replay runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Paused: the same write leaves the standby that far behind, and it
    // stays behind well past the time a running replay needed to catch up.
    pair.pause_replay().await;
    client.execute(WRITE, &[]).await.expect("second write");
    let lag = pair.lag_bytes().await;
    assert!(lag > 10 * MB, "lag only {lag} bytes with replay paused");
    let hold = caught_up_in * 2 + Duration::from_secs(1);
    tokio::time::sleep(hold).await;
    let lag = pair.lag_bytes().await;
    assert!(
        lag > 10 * MB,
        "lag down to {lag} bytes after {hold:?} with replay paused \
         (running, it caught up in {caught_up_in:?})"
    );

    // Resumed: it catches up, and has every row.
    pair.resume_replay().await;
    pair.wait_lag_below(MB, 15).await;
    let rows: i64 = connect(&pair.standby_url_for(&db.name))
        .await
        .query_one("SELECT count(*) FROM filler", &[])
        .await
        .expect("count on the standby")
        .get(0);
    assert_eq!(rows, 600_000);
}
