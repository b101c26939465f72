//! The hash profile a job runs with, pinned in its `result` when it first
//! starts.

use tokio_postgres::GenericClient;

use crate::db::hashes as dbh;
use crate::job::JobSpec;
use crate::scope::{JobError, fatal};

/// The profile a job runs with, pinned when it first starts (kept in
/// `result.profile`), so a pepper rotation during or after the job changes
/// nothing for it: a resumed job goes on with it, and `verify` and
/// `rollback` check and restore exactly what it wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProfilePin {
    pub id: i64,
    pub name: String,
    pub key_ref: String,
    pub output_len: Option<i16>,
    /// Already in the job's `result` (not to be recorded again).
    #[serde(skip)]
    pub recorded: bool,
}

/// The job's profile: the pinned one if it has one (which must still exist
/// and, for a running job, be active), else the newest active profile of
/// the target algorithm. A finished job from before pins falls back to the
/// profile it registered in `field_hash_policies`.
pub(super) async fn job_profile(
    c: &impl GenericClient,
    spec: &JobSpec,
    algo_id: i64,
    label: &str,
) -> Result<ProfilePin, JobError> {
    if let Some(v) = spec.pin("profile") {
        let mut pin: ProfilePin = serde_json::from_value(v.clone())
            .map_err(|e| fatal(format!("result.profile of the job is unreadable: {e}")))?;
        pin.recorded = true;
        let row = dbh::hash_profile_by_id(c, pin.id).await?.ok_or_else(|| {
            fatal(format!(
                "hash profile {:?} (id {}) the job started with no longer exists",
                pin.name, pin.id
            ))
        })?;
        if row.algo_id != algo_id {
            return Err(fatal(format!(
                "hash profile {:?} (id {}) the job started with is no longer a profile of {label}",
                pin.name, pin.id
            )));
        }
        let current = (
            row.name.as_str(),
            row.params.get("key_ref").and_then(|v| v.as_str()),
            row.output_len,
        );
        if !spec.aftercare()
            && current
                != (
                    pin.name.as_str(),
                    Some(pin.key_ref.as_str()),
                    pin.output_len,
                )
        {
            return Err(fatal(format!(
                "hash profile {:?} (id {}) was changed in place since the job started (name, params.key_ref or output_len): the job stops here; restore the profile, or queue a new job",
                pin.name, pin.id
            )));
        }
        if !spec.aftercare() && row.status != "active" {
            return Err(fatal(format!(
                "hash profile {:?} the job started with is now {}: the job stops here; queue a new job for the active profile",
                pin.name, row.status
            )));
        }
        return Ok(pin);
    }
    let profile = match spec.aftercare() {
        true => match dbh::hash_profile_of_job(c, spec.id).await? {
            Some(p) => Some(p),
            None => dbh::hash_profile_active(c, algo_id).await?,
        },
        false => dbh::hash_profile_active(c, algo_id).await?,
    };
    let profile = profile.ok_or_else(|| {
        fatal(format!(
            "no active hash_profiles row for target algorithm {label} (id {algo_id})"
        ))
    })?;
    let key_ref = profile
        .params
        .get("key_ref")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            fatal(format!(
                "hash profile {:?} has no params.key_ref naming its pepper",
                profile.name
            ))
        })?;
    Ok(ProfilePin {
        id: profile.id,
        key_ref: key_ref.to_owned(),
        output_len: profile.output_len,
        name: profile.name,
        recorded: false,
    })
}
