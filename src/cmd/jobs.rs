//! `pqmig cancel JOB` and `pqmig resume JOB`, confirming what they did.

use super::UsageError;
use crate::config::Config;
use crate::db::jobs::{self, JobAction};

/// What an operator does to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Cancel,
    Resume,
}

pub async fn run(config: &Config, job: i64, action: Action) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let who = format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    );
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
