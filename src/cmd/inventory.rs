//! `pqmig inventory`: items per scope and algorithm, quantum-vulnerable
//! (the numbers of the `pqmig_exposed_items` gauge) and PQ-protected, from
//! the daemon's newest snapshot, or counted now (`--exact`, or when no
//! daemon has counted yet).

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::db::inventory::{self, Inventory};
use crate::deadlines;

/// How `pqmig inventory` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    /// A CycloneDX 1.6 CBOM ([`crate::evidence::cbom`]).
    CycloneDx,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "cyclonedx" => Ok(Format::CycloneDx),
            _ => Err(format!("--format {s:?}: expected text, json or cyclonedx")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    pub exact: bool,
    pub as_of: Option<String>,
    pub serial: Option<String>,
}

pub async fn run(config: &crate::config::Config, opts: &Options) -> anyhow::Result<()> {
    let as_of = opts
        .as_of
        .as_deref()
        .map(deadlines::parse_date)
        .transpose()
        .map_err(super::UsageError)?;
    if let Some(s) = &opts.serial {
        let ok = s
            .strip_prefix("urn:uuid:")
            .is_some_and(|u| uuid::Uuid::try_parse(u).is_ok() && u.len() == 36);
        if opts.format != Format::CycloneDx || !ok {
            return Err(super::usage(format!(
                "--serial {s:?}: expected urn:uuid:<uuid> with --format cyclonedx"
            )));
        }
    }
    let exact = opts.exact;
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
    let mut inv = inv;
    for lines in [&mut inv.vulnerable, &mut inv.protected] {
        lines.sort_by_key(|l| {
            (
                deadlines::transition(&l.algorithm).order(),
                l.scope.clone(),
                l.algorithm.clone(),
            )
        });
    }
    if opts.format == Format::CycloneDx {
        let counts = Counts {
            inventory: &inv,
            sampled_at: &sampled_at,
            exact: counted_now,
        };
        let doc = cbom(client, &counts, as_of, opts.serial.as_deref()).await?;
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let json = opts.format == Format::Json;
    if json {
        let rows = |lines: &[inventory::Exposed]| -> Vec<serde_json::Value> {
            lines
                .iter()
                .map(|l| {
                    let t = deadlines::transition(&l.algorithm);
                    let mut row = serde_json::json!({
                        "scope": l.scope,
                        "algorithm": l.algorithm,
                        "items": l.items,
                        "deadline": t,
                    });
                    if let Some(d) = as_of {
                        row["standing_as_of"] = serde_json::json!(t.standing(d));
                    }
                    row
                })
                .collect()
        };
        let mut doc = serde_json::json!({
            "exact": counted_now,
            "sampled_at": sampled_at,
            "age_seconds": age.round(),
            "deadline_source": deadlines::SOURCE,
            "vulnerable": rows(&inv.vulnerable),
            "protected": rows(&inv.protected),
        });
        if let Some(d) = as_of {
            doc["as_of"] = serde_json::json!(d.to_string());
        }
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
    if let Some(d) = as_of {
        print_as_of(&inv, d);
    }
    Ok(())
}

/// An inventory and when it was counted.
pub struct Counts<'a> {
    pub inventory: &'a Inventory,
    /// RFC 3339.
    pub sampled_at: &'a str,
    /// Counted now rather than read from the daemon's snapshot.
    pub exact: bool,
}

/// The CycloneDX CBOM of these counts, with the database's keys and the
/// tables each scope covers.
pub async fn cbom(
    client: &tokio_postgres::Client,
    counts: &Counts<'_>,
    as_of: Option<time::Date>,
    serial: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    let keys = crate::db::evidence::key_material(client).await?;
    let data = crate::db::evidence::protected_data(client).await?;
    Ok(crate::evidence::cbom::document(
        &crate::evidence::cbom::Input {
            database: &database,
            inventory: counts.inventory,
            sampled_at: counts.sampled_at,
            exact: counts.exact,
            keys: &keys,
            data: &data,
            as_of,
            serial,
        },
    ))
}

/// What is deprecated or disallowed on `date`, worst first.
fn print_as_of(inv: &Inventory, date: time::Date) {
    let mut late: Vec<(deadlines::Standing, &inventory::Exposed)> = inv
        .vulnerable
        .iter()
        .chain(&inv.protected)
        .filter(|l| l.items > 0)
        .map(|l| (deadlines::transition(&l.algorithm).standing(date), l))
        .filter(|(s, _)| {
            matches!(
                s,
                deadlines::Standing::Deprecated | deadlines::Standing::Disallowed
            )
        })
        .collect();
    late.sort_by_key(|(s, l)| (*s != deadlines::Standing::Disallowed, l.scope.clone()));
    if late.is_empty() {
        println!(
            "as of {date}: nothing counted is deprecated or disallowed ({})",
            deadlines::SOURCE
        );
        return;
    }
    println!("as of {date}, non-compliant ({}):", deadlines::SOURCE);
    for (standing, l) in late {
        let word = match standing {
            deadlines::Standing::Disallowed => "disallowed",
            _ => "deprecated",
        };
        println!(
            "    {word:<10} {:<10} {:<18} {:>10}",
            l.scope, l.algorithm, l.items
        );
    }
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
                let deadline = deadlines::transition(&l.algorithm).describe();
                println!(
                    "    {kind:<10} {:<18} {:>10}   {deadline}",
                    l.algorithm, l.items
                );
            }
        }
    }
    println!(
        "(\"backup\" rows are classical copies kept for rollback until `pqmig purge-backups`)"
    );
}
