//! Statements on `crypto_algorithms` and `crypto_standard_aliases`.

use tokio_postgres::GenericClient;

#[derive(Debug, Clone)]
pub struct Algorithm {
    pub id: i64,
    pub class: String,
    pub name: String,
    pub variant: Option<String>,
    pub status: String,
    pub params: serde_json::Value,
}

impl Algorithm {
    /// `HMAC SHA3-256 (hash)`: how operators recognise it in messages.
    pub fn label(&self) -> String {
        match &self.variant {
            Some(v) => format!("{} {v} ({})", self.name, self.class),
            None => format!("{} ({})", self.name, self.class),
        }
    }

    /// SPEC §6.1: `active`, or `experimental` when the job allows it.
    pub fn check_usable(&self, allow_experimental: bool) -> Result<(), String> {
        match self.status.as_str() {
            "active" => Ok(()),
            "experimental" if allow_experimental => Ok(()),
            "experimental" => Err(format!(
                "target algorithm {} is experimental: set selection.allow_experimental to use it",
                self.label()
            )),
            other => Err(format!(
                "target algorithm {} is {other}, not active",
                self.label()
            )),
        }
    }
}

const COLUMNS: &str = "id, class, name::text, variant::text, status, params";

fn algorithm_from(r: &tokio_postgres::Row) -> Algorithm {
    Algorithm {
        id: r.get(0),
        class: r.get(1),
        name: r.get(2),
        variant: r.get(3),
        status: r.get(4),
        params: r
            .get::<_, Option<serde_json::Value>>(5)
            .unwrap_or(serde_json::Value::Null),
    }
}

pub async fn algorithm_by_id(
    c: &impl GenericClient,
    id: i64,
) -> Result<Option<Algorithm>, tokio_postgres::Error> {
    let sql = format!("SELECT {COLUMNS} FROM crypto_algorithms WHERE id = $1");
    Ok(c.query_opt(&sql, &[&id])
        .await?
        .as_ref()
        .map(algorithm_from))
}

/// Every algorithm of a class (`kem`, `sig`, …), any status.
pub async fn algorithms_of_class(
    c: &impl GenericClient,
    class: &str,
) -> Result<Vec<Algorithm>, tokio_postgres::Error> {
    let sql = format!("SELECT {COLUMNS} FROM crypto_algorithms WHERE class = $1 ORDER BY id");
    Ok(c.query(&sql, &[&class])
        .await?
        .iter()
        .map(algorithm_from)
        .collect())
}

/// Resolve an alias (case-insensitive) to an algorithm id.
pub async fn algorithm_by_alias(
    c: &impl GenericClient,
    alias: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT algo_id FROM crypto_standard_aliases WHERE lower(alias) = lower($1) ORDER BY alias LIMIT 1",
            &[&alias],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}
