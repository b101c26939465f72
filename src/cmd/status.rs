//! `pqmig status`: the job table, or one job with its events and item
//! errors; `--json` prints the same data as a stable JSON document.

use super::UsageError;
use crate::db::status::{self, JobView};

/// Finished jobs shown after the unfinished ones.
const FINISHED_SHOWN: i64 = 20;

/// `pqmig status [JOB] [--json] [--watch --interval D]`.
pub async fn run(
    config: &crate::config::Config,
    job: Option<i64>,
    json: bool,
    watch_every: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let client = &super::connect(config).await?;
    match watch_every {
        Some(every) => watch(client, job, json, every).await,
        None => show(client, job, json).await,
    }
}

async fn show(client: &tokio_postgres::Client, job: Option<i64>, json: bool) -> anyhow::Result<()> {
    match job {
        None => {
            let jobs = status::jobs_list(client, FINISHED_SHOWN).await?;
            let paused = crate::db::pauses::pauses_active(client).await?;
            if json {
                let doc = serde_json::json!({ "jobs": jobs, "pauses": paused });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_pauses(&paused);
                print_table(&jobs);
            }
        }
        Some(id) => {
            let job = status::job_get(client, id)
                .await?
                .ok_or_else(|| UsageError(format!("no job with id {id}")))?;
            let events = status::job_events(client, id, 20).await?;
            let (errors, error_total) = status::job_item_errors(client, id, 20).await?;
            let ranges = crate::db::ranges::ranges_of_job(client, id).await?;
            if json {
                let doc = serde_json::json!({
                    "job": job,
                    "ranges": ranges,
                    "events": events,
                    "item_errors": errors,
                    "item_errors_total": error_total,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_job(&job);
                print_ranges(&ranges);
                println!("\nevents:");
                for e in &events {
                    let detail = e.detail.as_ref().map(|d| d.to_string()).unwrap_or_default();
                    println!(
                        "  {}  {:<9} {:<28} {detail}",
                        e.at,
                        e.event,
                        e.worker.as_deref().unwrap_or("-")
                    );
                }
                if error_total > 0 {
                    println!(
                        "\nitem errors ({error_total} in all, first {}):",
                        errors.len()
                    );
                    for e in &errors {
                        println!("  {:<12} {:<18} {}", e.item_id, e.error_code, e.message);
                    }
                }
            }
        }
    }
    Ok(())
}

/// `300/1000 (30%)`; `300/~1000 (30%)` while the total is an estimate.
fn progress(j: &JobView) -> String {
    let about = if j.total_estimated { "~" } else { "" };
    match j.total {
        Some(t) if t > 0 => format!(
            "{}/{about}{} ({:.0}%)",
            j.processed + j.failed,
            t,
            100.0 * (j.processed + j.failed) as f64 / t as f64
        ),
        Some(t) => format!("{}/{about}{t}", j.processed + j.failed),
        None => format!("{}/?", j.processed + j.failed),
    }
}

pub use crate::short_duration;

/// Operator pauses in force, one line each, above the job table.
fn print_pauses(paused: &[crate::db::pauses::Pause]) {
    for p in paused {
        let what = super::pause::describe(p.scope.as_deref(), p.table.as_deref());
        let until = p
            .until
            .as_deref()
            .map_or_else(|| " until unpaused".to_owned(), |u| format!(" until {u}"));
        let by = p
            .paused_by
            .as_deref()
            .map_or_else(String::new, |b| format!(" by {b}"));
        println!("PAUSED  {what} since {}{by}{until}", p.paused_at);
    }
}

fn print_table(jobs: &[JobView]) {
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    println!(
        "{:>6}  {:<10} {:<14} {:<9} {:>22} {:>7} {:>9} {:>8} {:>7}  worker",
        "id", "scope", "target", "status", "progress", "failed", "rate/s", "eta", "age"
    );
    for j in jobs {
        println!(
            "{:>6}  {:<10} {:<14} {:<9} {:>22} {:>7} {:>9} {:>8} {:>7}  {}",
            j.id,
            j.scope,
            j.target_algo
                .as_deref()
                .or(j.target_policy.as_deref())
                .unwrap_or("-"),
            j.status,
            progress(j),
            j.failed,
            j.rate_per_second
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
            j.eta_seconds
                .map(short_duration)
                .unwrap_or_else(|| "-".into()),
            short_duration(j.age_seconds),
            j.worker.as_deref().unwrap_or("-"),
        );
    }
}

fn print_job(j: &JobView) {
    println!(
        "job {} ({} -> {})",
        j.id,
        j.scope,
        j.target_algo
            .as_deref()
            .or(j.target_policy.as_deref())
            .unwrap_or("-")
    );
    println!(
        "  status     {} (attempt {}, priority {})",
        j.status, j.attempts, j.priority
    );
    println!("  progress   {}, {} failed", progress(j), j.failed);
    if let (Some(n), Some(done), Some(running)) = (j.ranges, j.ranges_done, j.ranges_running) {
        println!("  ranges     {n} ({done} done, {running} being walked)");
    }
    if let Some(t) = &j.throttled {
        println!("  throttled  {t} (batches wait for the database)");
    }
    if let Some(r) = j.rate_per_second {
        println!("  rate       {r:.0} items/s");
    }
    if let Some(e) = j.eta_seconds {
        println!("  eta        {}", short_duration(e));
    }
    println!("  age        {}", short_duration(j.age_seconds));
    for (label, v) in [
        ("scheduled", &j.scheduled_at),
        ("started", &j.started_at),
        ("finished", &j.finished_at),
    ] {
        if let Some(v) = v {
            println!("  {label:<10} {v}");
        }
    }
    if let Some(w) = &j.worker {
        println!("  worker     {w}");
    }
    if let Some(s) = &j.selection {
        println!("  selection  {s}");
    }
    if let Some(e) = &j.error {
        println!("  error      {e}");
    }
    if let Some(r) = &j.result {
        println!("  result     {r}");
    }
}

/// Ranges shown by `status JOB` (all of them in `--json`).
const RANGES_SHOWN: usize = 20;

/// The ranges not done (the first [`RANGES_SHOWN`]), one line each.
fn print_ranges(ranges: &[crate::db::ranges::RangeView]) {
    let open: Vec<_> = ranges.iter().filter(|r| r.status != "done").collect();
    if open.is_empty() {
        return;
    }
    println!(
        "\nranges not done ({} of {}{}):",
        open.len(),
        ranges.len(),
        if open.len() > RANGES_SHOWN {
            format!(", first {RANGES_SHOWN}")
        } else {
            String::new()
        }
    );
    for r in open.iter().take(RANGES_SHOWN) {
        let est = r.estimated.map(|e| format!("/~{e}")).unwrap_or_default();
        println!(
            "  {:>5}  ids {}..={}  {:<8} {:>10}{est} {:>6} failed  attempt {}  {}{}",
            r.range_no,
            r.lo.saturating_add(1),
            r.hi,
            r.status,
            r.processed + r.failed,
            r.failed,
            r.attempts,
            r.worker.as_deref().unwrap_or("-"),
            r.throttled
                .as_deref()
                .map(|t| format!("  throttled: {t}"))
                .unwrap_or_default(),
        );
    }
}

/// `pqmig status [JOB] --watch`: refresh until the job (or, without JOB,
/// every pending and running job) has finished. On a terminal: a progress
/// bar per job with rate and ETA; otherwise one plain line per job and
/// refresh (JSON lines with `json`). Exit status: 1 when the watched job
/// ended failed or cancelled or the watch was interrupted (Ctrl-C), else 0:
/// `status JOB --watch && next-step` only goes on after a finished job.
async fn watch(
    client: &tokio_postgres::Client,
    job: Option<i64>,
    json: bool,
    every: std::time::Duration,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let tty = !json && std::io::stdout().is_terminal();
    // Bars on stdout: that is the stream checked for a terminal above.
    let bars = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stdout());
    let mut shown: std::collections::HashMap<i64, indicatif::ProgressBar> = Default::default();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:<28} [{bar:40}] {pos:>9}/{len:<9} {percent:>3}%  {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    let mut seen: Vec<i64> = Vec::new();
    // Installed before the first line is printed and kept for the whole
    // watch, so no Ctrl-C is missed (or kills the process) in between.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let jobs: Vec<JobView> = match job {
            Some(id) => vec![
                status::job_get(client, id)
                    .await?
                    .ok_or_else(|| UsageError(format!("no job with id {id}")))?,
            ],
            None => {
                let mut list: Vec<JobView> = status::jobs_list(client, 0).await?;
                // Keep showing jobs that finished while watched.
                for id in &seen {
                    if !list.iter().any(|j| j.id == *id)
                        && let Some(j) = status::job_get(client, *id).await?
                    {
                        list.push(j);
                    }
                }
                list.sort_by_key(|j| j.id);
                list
            }
        };
        for j in &jobs {
            if !seen.contains(&j.id) {
                seen.push(j.id);
            }
        }
        let finished = |j: &JobView| !matches!(j.status.as_str(), "pending" | "running");
        if json {
            println!("{}", serde_json::json!({ "jobs": jobs }));
        } else if tty {
            for j in &jobs {
                let bar = shown.entry(j.id).or_insert_with(|| {
                    let b = bars.add(indicatif::ProgressBar::new(0));
                    b.set_style(style.clone());
                    b.set_prefix(format!(
                        "job {} {} -> {}",
                        j.id,
                        j.scope,
                        j.target_algo
                            .as_deref()
                            .or(j.target_policy.as_deref())
                            .unwrap_or("-")
                    ));
                    b
                });
                bar.set_length(j.total.unwrap_or(0).max(0) as u64);
                bar.set_position((j.processed + j.failed).max(0) as u64);
                bar.set_message(watch_detail(j));
                if finished(j) && !bar.is_finished() {
                    bar.finish_with_message(watch_detail(j));
                }
            }
        } else {
            // `job 3 hashes running 300/1000 (30%), 410 items/s, ETA 2s`
            for j in &jobs {
                let mut line = format!("job {} {} {} {}", j.id, j.scope, j.status, progress(j));
                for part in watch_extras(j) {
                    line.push_str(", ");
                    line.push_str(&part);
                }
                println!("{line}");
            }
        }
        if jobs.iter().all(finished) {
            let bad = job.is_some() && jobs.iter().any(|j| j.status != "done");
            if !tty && !json && jobs.is_empty() {
                println!("no pending or running jobs");
            }
            if bad {
                let j = &jobs[0];
                return Err(anyhow::anyhow!(
                    "job {} ended {}{}",
                    j.id,
                    j.status,
                    j.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = interrupt.recv() => {
                let _ = bars.clear();
                return Err(anyhow::anyhow!("interrupted; the watched jobs carry on"));
            }
        }
    }
}

/// Status, failures, rate and ETA (once meaningful) of a watched job.
fn watch_detail(j: &JobView) -> String {
    let mut parts = vec![j.status.clone()];
    parts.extend(watch_extras(j));
    parts.join(", ")
}

/// Failures, rate, ETA (once meaningful) and error of a watched job.
fn watch_extras(j: &JobView) -> Vec<String> {
    let mut parts = Vec::new();
    if j.failed > 0 {
        parts.push(format!("{} failed", j.failed));
    }
    if let Some(r) = j.rate_per_second {
        parts.push(format!("{r:.0} items/s"));
    }
    if let Some(e) = j.eta_seconds {
        parts.push(format!("ETA {}", short_duration(e)));
    }
    if let Some(t) = &j.throttled {
        parts.push(format!("throttled: {t}"));
    }
    if let Some(e) = &j.error {
        parts.push(e.clone());
    }
    parts
}
