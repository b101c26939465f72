//! What the governor reads to decide whether batches wait: the primary's
//! replication lag, its oldest open transaction and its WAL position, in
//! one statement over the statistics views (no table is read). Lag needs a
//! role that sees `pg_stat_replication` in full (superuser or
//! `pg_monitor`); without it the lag reads as unknown.

use tokio_postgres::GenericClient;

/// One reading of the database's health.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// The server is a standby: nothing below is measured.
    pub in_recovery: bool,
    /// Bytes of WAL the slowest connected standby has yet to replay.
    pub replication_lag_bytes: Option<i64>,
    /// Standbys are connected but this role cannot see their positions.
    pub replication_hidden: bool,
    /// Age of the oldest open transaction of a client of this database
    /// other than this session, in seconds (transactions in other
    /// databases do not hold back this one's vacuum).
    pub oldest_transaction_seconds: Option<f64>,
    /// The current WAL position, in bytes from the start.
    pub wal_bytes: Option<i64>,
}

pub async fn health_read(c: &impl GenericClient) -> Result<Reading, tokio_postgres::Error> {
    let r = c
        .query_one(
            "SELECT pg_is_in_recovery(), \
               CASE WHEN pg_is_in_recovery() THEN NULL ELSE \
                 (SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint \
                  FROM pg_stat_replication) END, \
               (SELECT extract(epoch FROM max(now() - xact_start))::float8 FROM pg_stat_activity \
                WHERE backend_type = 'client backend' AND xact_start IS NOT NULL \
                  AND datname = current_database() AND pid <> pg_backend_pid()), \
               CASE WHEN pg_is_in_recovery() THEN NULL ELSE \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint END, \
               (SELECT count(*) > 0 AND count(replay_lsn) = 0 FROM pg_stat_replication)",
            &[],
        )
        .await?;
    Ok(Reading {
        in_recovery: r.get(0),
        replication_lag_bytes: r.get(1),
        oldest_transaction_seconds: r.get(2),
        wal_bytes: r.get(3),
        replication_hidden: r.get(4),
    })
}
