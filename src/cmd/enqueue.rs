//! `pqmig enqueue`: resolve the target, validate the job the way the daemon
//! will, then queue it and print its id.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::usage;
use crate::config::Config;
use crate::db::jobs::{self, NewJob};
use crate::job::{JobSpec, Purpose};
use crate::scope::{JobError, ScopeContext, ScopeKind};

/// A job as the flags of `enqueue` and `plan` describe it.
#[derive(Debug, Clone, Default)]
pub struct JobRequest {
    pub scope: String,
    /// Target encryption policy, by name or id.
    pub policy: Option<String>,
    /// Target algorithm, by alias or id.
    pub algo: Option<String>,
    /// JSON, or `@FILE`.
    pub selection: Option<String>,
    /// RFC 3339.
    pub at: Option<String>,
    /// A humantime duration.
    pub in_: Option<String>,
    pub priority: i16,
    pub created_by: Option<i64>,
}

/// Turn the flags into a job, checking everything that needs no database.
pub fn parse(args: &JobRequest) -> anyhow::Result<NewJob> {
    if ScopeKind::parse(&args.scope).is_none() {
        return Err(usage(format!(
            "--scope: {:?} is not one of wrappers, signatures, hashes",
            args.scope
        )));
    }
    let selection = match args.selection.as_deref() {
        None => None,
        Some(text) => {
            let (source, text) = match text.strip_prefix('@') {
                Some(path) => (
                    format!("--selection @{path}"),
                    std::fs::read_to_string(path)
                        .map_err(|e| usage(format!("--selection: cannot read {path}: {e}")))?,
                ),
                None => ("--selection".to_owned(), text.to_owned()),
            };
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| usage(format!("{source}: invalid JSON: {e}")))?,
            )
        }
    };
    let scheduled_at = match args.at.as_deref() {
        None => None,
        Some(at) => Some(
            OffsetDateTime::parse(at, &Rfc3339)
                .map_err(|e| usage(format!("--at: {at:?} is not an RFC 3339 time: {e}")))?,
        ),
    };
    let delay_seconds = match args.in_.as_deref() {
        None => None,
        Some(d) => Some(
            humantime::parse_duration(d)
                .map_err(|e| usage(format!("--in: {d:?} is not a duration (e.g. 10m): {e}")))?
                .as_secs_f64(),
        ),
    };
    Ok(NewJob {
        scope: args.scope.clone(),
        selection,
        scheduled_at,
        delay_seconds,
        priority: args.priority,
        created_by: args.created_by,
        ..Default::default()
    })
}

/// The flags as a job with its names resolved to ids, and its definition
/// for the daemon's own checks.
pub async fn resolve(
    client: &tokio_postgres::Client,
    args: &JobRequest,
) -> anyhow::Result<(NewJob, JobSpec)> {
    let mut job = parse(args)?;
    if let Some(p) = args.policy.as_deref() {
        job.target_policy_id = Some(jobs::policy_resolve(client, p).await?.ok_or_else(|| {
            usage(format!(
                "--policy: no encryption policy named or numbered {p:?}"
            ))
        })?);
    }
    if let Some(a) = args.algo.as_deref() {
        let id = match a.parse::<i64>() {
            Ok(id) => crate::db::algorithms::algorithm_by_id(client, id)
                .await?
                .map(|x| x.id),
            Err(_) => crate::db::algorithms::algorithm_by_alias(client, a).await?,
        };
        job.target_algo_id =
            Some(id.ok_or_else(|| usage(format!("--algo: no algorithm with alias or id {a:?}")))?);
    }
    let spec = JobSpec {
        id: 0,
        scope: ScopeKind::parse(&job.scope).expect("checked by parse"),
        target_policy_id: job.target_policy_id,
        target_algo_id: job.target_algo_id,
        selection: job.selection.clone(),
        result: None,
        purpose: Purpose::Check,
    };
    Ok((job, spec))
}

/// Two jobs over the same items would walk them twice (the second finding
/// them done, or re-wrapping what the first just wrapped): a pending or
/// running job of the same scope, writing the same table (and column, for
/// hashes), whose id window meets this one's, is named and the new job
/// refused unless `--allow-overlap`. Other filters (versions, formats,
/// dates) are not compared: two jobs differing only there are refused too.
async fn refuse_overlap(client: &tokio_postgres::Client, job: &NewJob) -> anyhow::Result<()> {
    use crate::selection;
    // The selection was validated above: these parse.
    let sel = job.selection.as_ref();
    let parsed = |e: selection::SelectionError| usage(e.to_string());
    let (common, table, column) = match job.scope.as_str() {
        "hashes" => {
            let h = selection::parse_hashes(sel).map_err(parsed)?;
            (h.common, Some(h.table), Some(h.column))
        }
        "wrappers" => (
            selection::parse_wrappers(sel).map_err(parsed)?.common,
            None,
            None,
        ),
        _ => (
            selection::parse_signatures(sel).map_err(parsed)?.common,
            None,
            None,
        ),
    };
    let (from, to) = common.id_window();
    if let Some((id, status)) = jobs::jobs_overlapping(
        client,
        &job.scope,
        table.as_deref(),
        column.as_deref(),
        from,
        to,
    )
    .await?
    {
        return Err(usage(format!(
            "job {id} ({status}) already covers some of these {} items; wait for it, cancel it, narrow id_from/id_to, or pass --allow-overlap",
            job.scope
        )));
    }
    Ok(())
}

/// A job the daemon would fail: a usage error naming why.
pub fn would_fail(e: JobError) -> anyhow::Error {
    match e {
        JobError::Fatal(msg) => usage(format!("the job would fail: {msg}")),
        other => anyhow::anyhow!("{other}"),
    }
}

/// Resolve names to ids, validate as the daemon will, insert.
pub async fn run(config: &Config, args: &JobRequest, allow_overlap: bool) -> anyhow::Result<()> {
    let client = &super::connect(config).await?;
    let (job, spec) = resolve(client, args).await?;
    // The daemon's own checks, on a job that is not in the table yet.
    let checked = match &config.keyring {
        // A file not there is the caller's to fix, not something to wait
        // for as a replica would.
        Some(path) if !path.exists() => {
            return Err(usage(format!(
                "the job would fail: keyring {}: no such file (keys.keyring / PQMIG_KEYRING)",
                path.display()
            )));
        }
        Some(_) => {
            let ctx = ScopeContext::of(config);
            spec.scope.prepare(client, &spec, &ctx).await.map(|_| true)
        }
        None => spec.scope.validate(client, &spec).await.map(|_| false),
    };
    let keys_checked = checked.map_err(would_fail)?;
    if !allow_overlap {
        refuse_overlap(client, &job).await?;
    }
    let id = jobs::job_insert(client, &job).await?;
    println!("{id}");
    if !keys_checked {
        eprintln!(
            "note: job {id} queued; its key material was not checked here (no keyring configured), the daemon checks it when it claims the job"
        );
    }
    Ok(())
}
