//! `pqmig audit verify [JOB]`: recompute the job events' hash chains
//! (migration V9) and name the first broken link.

use super::UsageError;
use crate::config::Config;
use crate::db::audit;

pub async fn verify(config: &Config, job: Option<i64>) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    if let Some(id) = job {
        let exists = client
            .query_opt("SELECT 1 FROM pq_migration_jobs WHERE id = $1", &[&id])
            .await?
            .is_some();
        if !exists {
            return Err(UsageError(format!("no job with id {id}")).into());
        }
    }
    let events = audit::events_chain(&client, job).await?;
    let reports = audit::verify_chains(&events);
    let mut broken = Vec::new();
    for r in &reports {
        match &r.broken {
            Some((event, why)) => {
                println!("job {}: BROKEN at event {event}: {why}", r.job_id);
                broken.push(format!("job {} at event {event}", r.job_id));
            }
            None => {
                let head = r.head.as_deref().map_or("-".to_owned(), crate::hex);
                let mut line = format!(
                    "job {}: {} event{} chained, head {head}",
                    r.job_id,
                    r.chained,
                    if r.chained == 1 { "" } else { "s" }
                );
                if r.unchained > 0 {
                    line.push_str(&format!(
                        "; {} unchained (written before migration V9)",
                        r.unchained
                    ));
                }
                println!("{line}");
            }
        }
    }
    if broken.is_empty() {
        println!(
            "{} job{} checked: every chain holds",
            reports.len(),
            if reports.len() == 1 { "" } else { "s" }
        );
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "audit trail broken: {} of {} jobs ({})",
            broken.len(),
            reports.len(),
            broken.join(", ")
        ))
    }
}
