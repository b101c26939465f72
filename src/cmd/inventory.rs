//! `pqmig inventory`: items per scope and algorithm, quantum-vulnerable
//! (the numbers of the `pqmig_exposed_items` gauge) and PQ-protected, from
//! the daemon's newest snapshot, or counted now (`--exact`, or when no
//! daemon has counted yet).

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::db::inventory::{self, Inventory};

pub async fn run(config: &crate::config::Config, json: bool, exact: bool) -> anyhow::Result<()> {
    let client = &super::connect(config).await?;
    let snapshot = if exact {
        None
    } else {
        inventory::inventory_latest(client).await?
    };
    let (inv, sampled_at, age, counted_now) = match snapshot {
        Some(s) => (s.inventory, s.sampled_at, s.age_seconds, false),
        None => {
            let counted = inventory::inventory_count(client, inventory::SLICE_IDS).await?;
            if !counted.not_counted.is_empty() {
                eprintln!(
                    "pqmig: not counted (no integer id column with a unique index): {}",
                    counted.not_counted.join(", ")
                );
            }
            let now = OffsetDateTime::now_utc()
                .replace_nanosecond(0)?
                .format(&Rfc3339)?;
            (counted.inventory, now, 0.0, true)
        }
    };
    if json {
        let doc = serde_json::json!({
            "exact": counted_now,
            "sampled_at": sampled_at,
            "age_seconds": age.round(),
            "vulnerable": inv.vulnerable,
            "protected": inv.protected,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    if counted_now {
        if exact {
            println!("counted now ({sampled_at})");
        } else {
            println!("no snapshot yet (no daemon has counted): counted now ({sampled_at})");
        }
    } else {
        println!(
            "as the daemon counted it at {sampled_at}, {} ago (one replica counts every inventory.interval; --exact counts now)",
            super::status::short_duration(age)
        );
    }
    print_lines(&inv);
    Ok(())
}

fn print_lines(inv: &Inventory) {
    for scope in crate::metrics::SCOPES {
        let sum = |lines: &[inventory::Exposed]| -> i64 {
            lines
                .iter()
                .filter(|l| l.scope == *scope)
                .map(|l| l.items)
                .sum()
        };
        let (v, p) = (sum(&inv.vulnerable), sum(&inv.protected));
        let mark = if v == 0 { "ok" } else { "EXPOSED" };
        println!("{scope:<10} {v:>10} quantum-vulnerable {p:>10} PQ-protected   {mark}");
        for (kind, lines) in [
            ("vulnerable", &inv.vulnerable),
            ("protected", &inv.protected),
        ] {
            for l in lines.iter().filter(|l| l.scope == *scope) {
                println!("    {kind:<10} {:<18} {:>10}", l.algorithm, l.items);
            }
        }
    }
    println!(
        "(\"backup\" rows are classical copies kept for rollback until `pqmig purge-backups`)"
    );
}
