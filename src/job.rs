//! A job's definition as the scopes see it: what it targets and selects,
//! and what it pinned when it first ran. The daemon builds one from a
//! claimed row, `enqueue` and `plan` from flags (no row yet), `verify` and
//! `rollback` from a finished row.

use serde_json::Value;

/// A job's scope (`pq_migration_jobs.scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    Hashes,
    Wrappers,
    Signatures,
}

/// What the scopes do with a job of each kind (`prepare`, `validate`,
/// `aftercare`) is implemented with the scopes.
impl ScopeKind {
    pub const ALL: [ScopeKind; 3] = [
        ScopeKind::Wrappers,
        ScopeKind::Signatures,
        ScopeKind::Hashes,
    ];

    pub fn parse(s: &str) -> Option<ScopeKind> {
        ScopeKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Hashes => "hashes",
            ScopeKind::Wrappers => "wrappers",
            ScopeKind::Signatures => "signatures",
        }
    }
}

impl std::fmt::Display for ScopeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the job is prepared for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Worked by the daemon: everything it targets must be usable now.
    Run,
    /// Checked before it is queued (`enqueue`, `plan`).
    Check,
    /// A finished job re-checked or rolled back: checked with what it ran
    /// with, not refused because something was deprecated since.
    Aftercare,
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    /// `pq_migration_jobs.id`; 0 for a job not queued yet.
    pub id: i64,
    pub scope: ScopeKind,
    pub target_policy_id: Option<i64>,
    pub target_algo_id: Option<i64>,
    pub selection: Option<Value>,
    /// The job's `result` as stored: what it pinned when it first started
    /// (`profile` of a hashes job, `policy` of a wrappers job).
    pub result: Option<Value>,
    pub purpose: Purpose,
}

impl JobSpec {
    /// What the job pinned under `key` of its `result`.
    pub fn pin(&self, key: &str) -> Option<&Value> {
        self.result.as_ref().and_then(|r| r.get(key))
    }

    pub fn aftercare(&self) -> bool {
        self.purpose == Purpose::Aftercare
    }
}

/// A job's definition from its row: the scope parsed (an unknown one is
/// the job's error), the selection and result as read (one too deeply
/// nested to read is the job's error: a result's pins are never dropped).
pub fn spec_from_row(
    id: i64,
    scope: &str,
    target_policy_id: Option<i64>,
    target_algo_id: Option<i64>,
    selection: Result<Option<Value>, String>,
    result: Result<Option<Value>, String>,
    purpose: Purpose,
) -> Result<JobSpec, String> {
    let scope = ScopeKind::parse(scope).ok_or_else(|| {
        format!(
            "scope {:?} is not supported by this pqmig build",
            scope.chars().take(64).collect::<String>()
        )
    })?;
    Ok(JobSpec {
        id,
        scope,
        target_policy_id,
        target_algo_id,
        selection: selection?,
        result: result?,
        purpose,
    })
}
