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
    /// The pepper as a key of the local keyring (`params.key_ref`)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ref: Option<String>,
    /// …or as a `kms_keys` row of any provider (`params.kms_key_id`)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<i64>,
    /// …which names this key, as the job first found it: a row edited
    /// since (another key, version, server) would change the pepper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<KeyIdentity>,
    pub output_len: Option<i16>,
    /// Already in the job's `result` (not to be recorded again).
    #[serde(skip)]
    pub recorded: bool,
}

/// What a `kms_keys` row names: its provider, where, which key, for what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyIdentity {
    pub provider: String,
    pub location: Option<String>,
    pub external_key_ref: String,
    pub algorithm: Option<String>,
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
            row.params.get("kms_key_id").and_then(|v| v.as_i64()),
            row.output_len,
        );
        if !spec.aftercare()
            && current
                != (
                    pin.name.as_str(),
                    pin.key_ref.as_deref(),
                    pin.kms_key_id,
                    pin.output_len,
                )
        {
            return Err(fatal(format!(
                "hash profile {:?} (id {}) was changed in place since the job started (name, params.key_ref, params.kms_key_id or output_len): the job stops here; restore the profile, or queue a new job",
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
    let (key_ref, kms_key_id) = pepper_of(&profile.name, &profile.params)?;
    Ok(ProfilePin {
        id: profile.id,
        key_ref,
        kms_key_id,
        kms_key: None,
        output_len: profile.output_len,
        name: profile.name,
        recorded: false,
    })
}

/// The pepper a profile's `params` name: `key_ref` (a key of the local
/// keyring) or `kms_key_id` (a `kms_keys` row, of any provider), exactly
/// one of them.
fn pepper_of(
    name: &str,
    params: &serde_json::Value,
) -> Result<(Option<String>, Option<i64>), JobError> {
    let key_ref = params.get("key_ref");
    let kms_key_id = params.get("kms_key_id");
    match (key_ref, kms_key_id) {
        (Some(r), None) => match r.as_str() {
            Some(r) if !r.is_empty() => Ok((Some(r.to_owned()), None)),
            _ => Err(fatal(format!(
                "hash profile {name:?}: params.key_ref must be a non-empty string"
            ))),
        },
        (None, Some(id)) => match id.as_i64() {
            Some(id) => Ok((None, Some(id))),
            None => Err(fatal(format!(
                "hash profile {name:?}: params.kms_key_id must be the id of a kms_keys row"
            ))),
        },
        (Some(_), Some(_)) => Err(fatal(format!(
            "hash profile {name:?} names two peppers (params.key_ref and params.kms_key_id); keep one"
        ))),
        (None, None) => Err(fatal(format!(
            "hash profile {name:?} names no pepper: set params.key_ref (a keyring key) or params.kms_key_id (a kms_keys row)"
        ))),
    }
}
