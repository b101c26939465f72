//! `pqmig pause` and `pqmig unpause`: operator pauses kept in the database
//! (`pq_migration_pauses`), so every replica obeys them within a heartbeat.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::usage;
use crate::config::Config;
use crate::db::pauses;
use crate::job::ScopeKind;

/// What a pause covers: every job (both `None`), a scope's, a table's.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub scope: Option<String>,
    pub table: Option<String>,
}

pub use crate::db::pauses::describe;

/// When a pause lifts by itself: at an RFC 3339 time, or after a duration.
#[derive(Debug, Clone, Default)]
pub struct Until {
    pub at: Option<String>,
    pub after: Option<String>,
}

impl Target {
    fn checked(&self) -> anyhow::Result<(Option<&str>, Option<&str>)> {
        if let Some(s) = &self.scope
            && ScopeKind::parse(s).is_none()
        {
            return Err(usage(format!(
                "--scope: {s:?} is not wrappers, signatures or hashes"
            )));
        }
        if let Some(t) = &self.table
            && (t.is_empty() || t.len() > 128 || t.chars().any(char::is_control))
        {
            return Err(usage(format!("--table: {t:?} is not a table name")));
        }
        Ok((self.scope.as_deref(), self.table.as_deref()))
    }

    fn describe(&self) -> String {
        describe(self.scope.as_deref(), self.table.as_deref())
    }

    fn flags(&self) -> String {
        let mut f = String::new();
        if let Some(s) = &self.scope {
            f.push_str(&format!(" --scope {s}"));
        }
        if let Some(t) = &self.table {
            f.push_str(&format!(" --table {t}"));
        }
        f
    }
}

/// The lifting time as RFC 3339 (UTC), checked to be in the future.
fn until_time(u: &Until) -> anyhow::Result<Option<String>> {
    let now = OffsetDateTime::now_utc();
    let at = match (&u.at, &u.after) {
        (None, None) => return Ok(None),
        (Some(at), _) => OffsetDateTime::parse(at, &Rfc3339)
            .map_err(|e| usage(format!("--until: {at:?} is not an RFC 3339 time: {e}")))?,
        (None, Some(d)) => {
            let d = humantime::parse_duration(d)
                .map_err(|e| usage(format!("--for: {d:?} is not a duration (e.g. 2h): {e}")))?;
            now + d
        }
    };
    if at <= now {
        return Err(usage(format!(
            "--until: {} is not in the future",
            at.format(&Rfc3339).unwrap_or_default()
        )));
    }
    Ok(Some(at.format(&Rfc3339)?))
}

/// `pqmig pause [--scope S] [--table T] [--until TIME | --for DURATION]`.
pub async fn pause(config: &Config, target: &Target, until: &Until) -> anyhow::Result<()> {
    let (scope, table) = target.checked()?;
    let until = until_time(until)?;
    let client = super::connect(config).await?;
    match pauses::pause_add(&client, scope, table, until.as_deref(), &super::who()).await? {
        Ok(()) => {
            let lift = until.map_or_else(
                || format!("until `pqmig unpause{}`", target.flags()),
                |u| format!("until {u}"),
            );
            println!(
                "paused {} {lift}: nothing new is claimed; running walks give their ranges back after their batch, within a heartbeat",
                target.describe()
            );
            Ok(())
        }
        Err(p) => Err(usage(format!(
            "a pause of {} is already in force (since {}{}); run `pqmig unpause{}` first to change it",
            target.describe(),
            p.paused_at,
            p.until.map(|u| format!(", until {u}")).unwrap_or_default(),
            target.flags()
        ))),
    }
}

/// `pqmig unpause [--scope S] [--table T]`.
pub async fn unpause(config: &Config, target: &Target) -> anyhow::Result<()> {
    let (scope, table) = target.checked()?;
    let client = super::connect(config).await?;
    if pauses::pause_remove(&client, scope, table).await? {
        println!(
            "unpaused {}: replicas claim their work again at their next poll",
            target.describe()
        );
        return Ok(());
    }
    let active = pauses::pauses_active(&client).await?;
    let list = active
        .iter()
        .map(|p| {
            Target {
                scope: p.scope.clone(),
                table: p.table.clone(),
            }
            .flags()
        })
        .map(|f| {
            if f.is_empty() {
                "(all)".to_owned()
            } else {
                f.trim().to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    Err(usage(format!(
        "no pause of {} is in force{}",
        target.describe(),
        if list.is_empty() {
            "; nothing is".to_owned()
        } else {
            format!("; in force: {list}")
        }
    )))
}
