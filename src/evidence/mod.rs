//! Evidence for auditors (README "Evidence for auditors"): the CycloneDX
//! CBOM of `pqmig inventory --format cyclonedx`, and the signed job
//! attestations of `pqmig attest` (an in-toto Statement in a DSSE
//! envelope with a Merkle root over the job's items).

pub mod attest;
pub mod cbom;
pub mod dsse;
pub mod merkle;

use sha2::{Digest, Sha256};

/// An item of a job's Merkle tree: its id and the SHA-256 of the value
/// the job stored for it ([`value_hash`]).
pub type Leaf = (i64, merkle::Hash);

/// SHA-256 over the fields of a stored value, each preceded by its length
/// as 4 bytes big-endian, so no two field lists hash alike.
pub fn value_hash(fields: &[&[u8]]) -> merkle::Hash {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u32).to_be_bytes());
        h.update(f);
    }
    h.finalize().into()
}
