//! `pqmig inventory`: items per scope and algorithm, quantum-vulnerable
//! (the numbers of the `pqmig_exposed_items` gauge) and PQ-protected.

use serde::Serialize;

use crate::db::inventory::{self, Exposed};

#[derive(Debug, Serialize)]
struct Line {
    scope: &'static str,
    algorithm: String,
    items: i64,
}

fn lines(rows: Vec<Exposed>) -> Vec<Line> {
    rows.into_iter()
        .map(|e| Line {
            scope: e.scope,
            algorithm: e.algorithm,
            items: e.items,
        })
        .collect()
}

pub async fn run(config: &crate::config::Config, json: bool) -> anyhow::Result<()> {
    let client = &super::connect(config).await?;
    let vulnerable = lines(inventory::exposed_items(client).await?);
    let protected = lines(inventory::protected_items(client).await?);
    if json {
        let doc = serde_json::json!({"vulnerable": vulnerable, "protected": protected});
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    for scope in crate::metrics::SCOPES {
        let v: i64 = vulnerable
            .iter()
            .filter(|l| l.scope == *scope)
            .map(|l| l.items)
            .sum();
        let p: i64 = protected
            .iter()
            .filter(|l| l.scope == *scope)
            .map(|l| l.items)
            .sum();
        let mark = if v == 0 { "ok" } else { "EXPOSED" };
        println!("{scope:<10} {v:>10} quantum-vulnerable {p:>10} PQ-protected   {mark}");
        for (kind, rows) in [("vulnerable", &vulnerable), ("protected", &protected)] {
            for l in rows.iter().filter(|l| l.scope == *scope) {
                println!("    {kind:<10} {:<18} {:>10}", l.algorithm, l.items);
            }
        }
    }
    println!(
        "(\"backup\" rows are classical copies kept for rollback until `pqmig purge-backups`)"
    );
    Ok(())
}
