//! The job events' hash chain (migration V9): read back for `pqmig audit
//! verify`, which recomputes it outside the database.

use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;

/// One event as the chain covers it, with its fields rendered by the
/// database exactly as the trigger hashed them.
#[derive(Debug, Clone)]
pub struct ChainedEvent {
    pub id: i64,
    pub job_id: i64,
    pub chain_no: Option<i64>,
    pub event: String,
    pub worker: Option<String>,
    /// `detail::text`.
    pub detail: Option<String>,
    /// `created_at` in UTC, microseconds.
    pub created_at: String,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Option<Vec<u8>>,
}

impl ChainedEvent {
    /// The bytes the trigger hashes (V9; README "Audit trail").
    pub fn canonical(&self, chain_no: i64, prev_hash: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut field = |t: Option<&str>| match t {
            None => out.extend_from_slice(b"-,"),
            Some(t) => {
                out.extend_from_slice(format!("{}:", t.len()).as_bytes());
                out.extend_from_slice(t.as_bytes());
                out.push(b',');
            }
        };
        field(Some("pqmig-event-v1"));
        field(Some(&chain_no.to_string()));
        field(Some(&self.job_id.to_string()));
        field(Some(&self.event));
        field(self.worker.as_deref());
        field(self.detail.as_deref());
        field(Some(&self.created_at));
        field(prev_hash.map(crate::hex).as_deref());
        out
    }

    /// SHA-256 of [`Self::canonical`].
    pub fn expected_hash(&self, chain_no: i64, prev_hash: Option<&[u8]>) -> Vec<u8> {
        Sha256::digest(self.canonical(chain_no, prev_hash)).to_vec()
    }
}

/// The events of `job` (every job when `None`), in chain order per job:
/// unchained rows (before V9) first by id, then the chain.
pub async fn events_chain(
    c: &impl GenericClient,
    job: Option<i64>,
) -> Result<Vec<ChainedEvent>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT id, job_id, chain_no, event, worker, detail::text, \
               to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
               prev_hash, hash \
             FROM pq_migration_job_events WHERE $1::bigint IS NULL OR job_id = $1 \
             ORDER BY job_id, chain_no NULLS FIRST, id",
            &[&job],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ChainedEvent {
            id: r.get(0),
            job_id: r.get(1),
            chain_no: r.get(2),
            event: r.get(3),
            worker: r.get(4),
            detail: r.get(5),
            created_at: r.get(6),
            prev_hash: r.get(7),
            hash: r.get(8),
        })
        .collect())
}

/// What one job's chain says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub job_id: i64,
    /// Events from before the chain (V9).
    pub unchained: u64,
    pub chained: u64,
    /// The last event's hash: what an attestation records.
    pub head: Option<Vec<u8>>,
    /// The first broken link: (event id, why).
    pub broken: Option<(i64, String)>,
}

/// Check the chains of `events` (as [`events_chain`] orders them), one
/// report per job.
pub fn verify_chains(events: &[ChainedEvent]) -> Vec<ChainReport> {
    let mut out: Vec<ChainReport> = Vec::new();
    for e in events {
        if out.last().is_none_or(|r| r.job_id != e.job_id) {
            out.push(ChainReport {
                job_id: e.job_id,
                unchained: 0,
                chained: 0,
                head: None,
                broken: None,
            });
        }
        let r = out.last_mut().expect("pushed above");
        if r.broken.is_some() {
            continue;
        }
        let Some(no) = e.chain_no else {
            if e.hash.is_some() || e.prev_hash.is_some() {
                r.broken = Some((e.id, "it has a hash but no place in the chain".into()));
            } else {
                r.unchained += 1;
            }
            continue;
        };
        let want_no = r.chained as i64 + 1;
        if no != want_no {
            r.broken = Some((
                e.id,
                format!(
                    "it is link {no} where link {want_no} should be (an event before it is missing)"
                ),
            ));
            continue;
        }
        if e.prev_hash.as_deref() != r.head.as_deref() {
            r.broken = Some((e.id, "it does not point to the event before it".into()));
            continue;
        }
        let Some(hash) = &e.hash else {
            r.broken = Some((e.id, "its hash was removed".into()));
            continue;
        };
        if *hash != e.expected_hash(no, r.head.as_deref()) {
            r.broken = Some((
                e.id,
                "its content does not match its hash (changed after it was written)".into(),
            ));
            continue;
        }
        r.chained += 1;
        r.head = Some(hash.clone());
    }
    out
}
