//! `key_wrappers.crypto_suite` (SPEC §5.1, §5.2): which format a wrapper is
//! in and, for `pqmig-wrap-v1`, its KEM, layer count, key commitment (`kc`),
//! policy and job. Nothing in it is authenticated: a reader checks what it
//! says against the wrap itself (the commitment, the AAD, the layers).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::kem::Kem;
use super::wrap::{FORMAT_LEGACY_AES, FORMAT_V1};

/// The format a suite names; NULL (or no `format`) is `legacy-aes-gcm`.
pub fn format(suite: Option<&Value>) -> Result<&str, String> {
    match suite {
        None | Some(Value::Null) => Ok(FORMAT_LEGACY_AES),
        Some(s) => match s.get("format") {
            None | Some(Value::Null) => Ok(FORMAT_LEGACY_AES),
            Some(Value::String(f)) => Ok(f.as_str()),
            Some(_) => Err("crypto_suite.format is not a string".into()),
        },
    }
}

fn field<'a>(suite: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    suite.and_then(|s| s.get(name))
}

/// `kem`: the KEM of every layer.
pub fn kem(suite: Option<&Value>) -> Option<Kem> {
    field(suite, "kem")
        .and_then(Value::as_str)
        .and_then(Kem::from_alias)
}

/// `policy_id`: the policy the wrap was made under.
pub fn policy_id(suite: Option<&Value>) -> Option<i64> {
    field(suite, "policy_id").and_then(Value::as_i64)
}

/// `job_id`: the job that wrote it.
pub fn job_id(suite: Option<&Value>) -> Option<i64> {
    field(suite, "job_id").and_then(Value::as_i64)
}

/// `layers`: how many layer rows it has.
pub fn layers(suite: Option<&Value>) -> Option<u64> {
    field(suite, "layers").and_then(Value::as_u64)
}

/// `kc`: the key commitment, base64-decoded.
pub fn commitment(suite: Option<&Value>) -> Option<Vec<u8>> {
    field(suite, "kc")
        .and_then(Value::as_str)
        .and_then(|s| STANDARD.decode(s).ok())
}

/// Whether a suite says `pqmig-wrap-v1`.
pub fn is_v1(suite: Option<&Value>) -> bool {
    format(suite) == Ok(FORMAT_V1)
}

/// The suite of a new `pqmig-wrap-v1` wrap (SPEC §5.2).
pub fn v1(kem: Kem, layers: usize, commitment: &[u8], policy_id: i64, job_id: i64) -> Value {
    json!({
        "format": FORMAT_V1,
        "kem": kem.alias(),
        "layers": layers,
        "kdf": "HKDF-SHA-384",
        "aead": "AES-256-GCM",
        "kc": STANDARD.encode(commitment),
        "policy_id": policy_id,
        "job_id": job_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_suite_reads_back() {
        let s = v1(Kem::XWing, 2, &[7u8; 32], 5, 9);
        let s = Some(&s);
        assert!(is_v1(s));
        assert_eq!(kem(s), Some(Kem::XWing));
        assert_eq!(
            (layers(s), policy_id(s), job_id(s)),
            (Some(2), Some(5), Some(9))
        );
        assert_eq!(commitment(s), Some(vec![7u8; 32]));
        assert_eq!(format(None), Ok(FORMAT_LEGACY_AES));
        assert!(format(Some(&json!({"format": 1}))).is_err());
    }
}
