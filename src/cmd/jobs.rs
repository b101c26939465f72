//! `pqmig cancel JOB`, `pqmig resume JOB [--retry-failed]` and `pqmig set JOB`, confirming
//! what they did.

use super::UsageError;
use crate::config::Config;
use crate::db::jobs::{self, JobAction, JobChange, RetryOutcome};

/// What an operator does to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Cancel,
    Resume,
}

pub async fn run(config: &Config, job: i64, action: Action) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let who = super::who();
    let outcome = match action {
        Action::Cancel => jobs::job_cancel(&client, job, &who).await?,
        Action::Resume => jobs::job_resume(&client, job, &who).await?,
    };
    let (verb, allowed) = match action {
        Action::Cancel => ("cancel", "pending or running"),
        Action::Resume => ("resume", "failed or cancelled"),
    };
    match outcome {
        JobAction::Done => {
            match action {
                Action::Cancel => println!(
                    "job {job} cancelled; a running worker stops at its next heartbeat, progress is kept"
                ),
                Action::Resume => println!("job {job} re-queued; it continues from its cursor"),
            }
            Ok(())
        }
        JobAction::NotFound => Err(UsageError(format!("no job with id {job}")).into()),
        JobAction::WrongStatus(status) => Err(UsageError(format!(
            "job {job} is {status}; only {allowed} jobs can be {verb}ed"
        ))
        .into()),
    }
}

/// `pqmig resume JOB --retry-failed`.
pub async fn retry_failed(config: &Config, job: i64) -> anyhow::Result<()> {
    let mut client = super::connect(config).await?;
    let who = super::who();
    match jobs::job_retry_failed(&mut client, job, &who).await? {
        RetryOutcome::Retried(r) => {
            println!(
                "job {job} re-queued; it continues from its cursors and walks its {} failed item{} again",
                r.items,
                if r.items == 1 { "" } else { "s" }
            );
            if r.left > 0 {
                println!(
                    "{} more failed items stay failed; run resume --retry-failed again after this run",
                    r.left
                );
            }
            Ok(())
        }
        RetryOutcome::NotFound => Err(UsageError(format!("no job with id {job}")).into()),
        RetryOutcome::WrongStatus(status) => Err(UsageError(format!(
            "job {job} is {status}; only failed or cancelled jobs can be resumed"
        ))
        .into()),
        RetryOutcome::LimitUnfinished => Err(UsageError(format!(
            "job {job} has a selection limit and was stopped before it reached it; its failed items count toward the limit, so they can be retried only once the job has walked to its end (resume it without --retry-failed)"
        ))
        .into()),
        RetryOutcome::NothingFailed => Err(UsageError(format!(
            "job {job} has no failed items to retry; resume it without --retry-failed"
        ))
        .into()),
    }
}

/// `pqmig set JOB [--max-rate N|none] [--priority N]`.
pub async fn set(
    config: &Config,
    job: i64,
    max_rate: Option<&str>,
    priority: Option<i16>,
) -> anyhow::Result<()> {
    let max_rate = match max_rate {
        None => None,
        Some("none") => Some(None),
        Some(v) => match v.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Some(Some(r)),
            _ => {
                return Err(UsageError(format!(
                    "--max-rate: {v:?} is not a positive number of items/s or none"
                ))
                .into());
            }
        },
    };
    if max_rate.is_none() && priority.is_none() {
        return Err(UsageError("nothing to change: give --max-rate or --priority".into()).into());
    }
    let client = super::connect(config).await?;
    let who = super::who();
    let change = JobChange { max_rate, priority };
    match jobs::job_set(&client, job, &who, &change).await? {
        JobAction::Done => {
            let mut what = Vec::new();
            match max_rate {
                Some(Some(r)) => what.push(format!("max_rate {r} items/s")),
                Some(None) => what.push("no max_rate".to_owned()),
                None => {}
            }
            if let Some(p) = priority {
                what.push(format!("priority {p}"));
            }
            println!(
                "job {job}: {}; its walks apply it within a second",
                what.join(", ")
            );
            Ok(())
        }
        JobAction::NotFound => Err(UsageError(format!("no job with id {job}")).into()),
        JobAction::WrongStatus(status) => Err(UsageError(format!(
            "job {job} is {status}; only pending or running jobs can be changed"
        ))
        .into()),
    }
}
