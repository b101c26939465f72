//! `pqmig inventory`: items per scope and algorithm, quantum-vulnerable
//! (the numbers of the `pqmig_exposed_items` gauge) and PQ-protected.

use crate::db::inventory;

pub async fn run(config: &crate::config::Config, json: bool) -> anyhow::Result<()> {
    let client = &super::connect(config).await?;
    let counted = inventory::inventory_count(client, inventory::SLICE_IDS).await?;
    let (vulnerable, protected) = (counted.inventory.vulnerable, counted.inventory.protected);
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
