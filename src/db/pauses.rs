//! Operator pauses (`pq_migration_pauses`, migration V6): by scope, by the
//! table a job writes, or everything, optionally until a time.

use tokio_postgres::GenericClient;

/// Whether a pause in force covers the job `j` (an alias of
/// `pq_migration_jobs` in the statement). The table a job writes: a hashes
/// job's `selection.table`, `key_wrappers` for wrappers, `signatures` for
/// signatures. (A macro, so constant statements can `concat!` it.)
macro_rules! paused_sql {
    () => {
        "EXISTS (SELECT 1 FROM pq_migration_pauses p \
         WHERE (p.until IS NULL OR p.until > now()) \
           AND (p.scope IS NULL OR p.scope = j.scope) \
           AND (p.table_name IS NULL OR p.table_name = CASE j.scope \
                 WHEN 'hashes' THEN j.selection->>'table' \
                 WHEN 'wrappers' THEN 'key_wrappers' \
                 WHEN 'signatures' THEN 'signatures' END))"
    };
}
pub(crate) use paused_sql;

/// [`paused_sql`] as a value.
pub const PAUSED: &str = paused_sql!();

/// One pause as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pause {
    pub scope: Option<String>,
    pub table: Option<String>,
    pub paused_at: String,
    pub until: Option<String>,
    pub paused_by: Option<String>,
}

/// What a pause covers, in words: `every job`, `hashes jobs writing table users`.
pub fn describe(scope: Option<&str>, table: Option<&str>) -> String {
    match (scope, table) {
        (None, None) => "every job".to_owned(),
        (Some(s), None) => format!("{s} jobs"),
        (None, Some(t)) => format!("jobs writing table {t}"),
        (Some(s), Some(t)) => format!("{s} jobs writing table {t}"),
    }
}

/// Which of the jobs `ids` a pause in force covers.
pub async fn jobs_paused(
    c: &impl GenericClient,
    ids: &[i64],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = c
        .query(
            concat!(
                "SELECT j.id FROM pq_migration_jobs j WHERE j.id = ANY($1) AND ",
                paused_sql!()
            ),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Pause the target; `Err` with the existing pause when one in force
/// already covers exactly that target. A lapsed one is replaced.
pub async fn pause_add(
    c: &impl GenericClient,
    scope: Option<&str>,
    table: Option<&str>,
    until: Option<&str>,
    who: &str,
) -> Result<Result<(), Pause>, tokio_postgres::Error> {
    c.execute(
        "DELETE FROM pq_migration_pauses WHERE COALESCE(scope, '') = COALESCE($1, '') \
           AND COALESCE(table_name, '') = COALESCE($2, '') AND until <= now()",
        &[&scope, &table],
    )
    .await?;
    let inserted = c
        .execute(
            "INSERT INTO pq_migration_pauses (scope, table_name, until, paused_by) \
             VALUES ($1, $2, $3::text::timestamptz, $4) ON CONFLICT DO NOTHING",
            &[&scope, &table, &until, &who],
        )
        .await?;
    if inserted == 1 {
        return Ok(Ok(()));
    }
    let existing = pauses_active(c)
        .await?
        .into_iter()
        .find(|p| p.scope.as_deref() == scope && p.table.as_deref() == table);
    Ok(existing.map_or(Ok(()), Err))
}

/// Lift the pause of exactly this target; `false`: none was in force.
pub async fn pause_remove(
    c: &impl GenericClient,
    scope: Option<&str>,
    table: Option<&str>,
) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "DELETE FROM pq_migration_pauses WHERE COALESCE(scope, '') = COALESCE($1, '') \
               AND COALESCE(table_name, '') = COALESCE($2, '') \
             RETURNING until IS NULL OR until > now()",
            &[&scope, &table],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// The pauses in force, oldest first.
pub async fn pauses_active(c: &impl GenericClient) -> Result<Vec<Pause>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT scope, table_name, \
                    to_char(paused_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    to_char(until AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), paused_by \
             FROM pq_migration_pauses WHERE until IS NULL OR until > now() ORDER BY paused_at, id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Pause {
            scope: r.get(0),
            table: r.get(1),
            paused_at: r.get(2),
            until: r.get(3),
            paused_by: r.get(4),
        })
        .collect())
}
