//! `pqmig inventory --format cyclonedx`: the inventory as a CycloneDX 1.6
//! cryptography bill of materials. Each algorithm the inventory counts (or
//! a key uses) is a `cryptographic-asset` component with its primitive,
//! parameter set, NIST quantum security level, OID and IR 8547 deadline;
//! each key (`kms_keys`, `signing_keys`) is one by reference (never a
//! secret); each scope's data is a `data` component whose properties count
//! the items per algorithm. Output is deterministic: components sorted,
//! the serial number derived from the content unless one is passed in.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::db::evidence::KeyMaterial;
use crate::db::inventory::Inventory;
use crate::deadlines;

/// What CycloneDX says of an algorithm pqmig knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgorithmInfo {
    pub primitive: &'static str,
    pub parameter_set: Option<&'static str>,
    pub curve: Option<&'static str>,
    pub mode: Option<&'static str>,
    pub functions: &'static [&'static str],
    pub classical_bits: Option<u32>,
    /// NIST PQC security category (0: none, broken by a quantum computer).
    pub nist_level: u8,
    pub oid: Option<&'static str>,
}

const KEM: &[&str] = &["keygen", "encapsulate", "decapsulate"];
const SIG: &[&str] = &["keygen", "sign", "verify"];
const AE: &[&str] = &["encrypt", "decrypt"];
const MAC: &[&str] = &["tag"];
const HASH: &[&str] = &["digest"];

/// The algorithms of `crypto_standard_aliases` pqmig seeds, by label
/// (case-insensitive). OIDs: NIST CSOR (2.16.840.1.101.3.4), RFC 8410
/// (curve25519), RFC 5758/8017 (ECDSA, RSA, HMAC); X-Wing's is its draft's
/// (draft-connolly-cfrg-xwing-kem).
pub fn algorithm_info(label: &str) -> Option<AlgorithmInfo> {
    let a = |primitive, parameter_set, functions, classical_bits, nist_level, oid: &'static str| {
        AlgorithmInfo {
            primitive,
            parameter_set,
            curve: None,
            mode: None,
            functions,
            classical_bits,
            nist_level,
            oid: Some(oid),
        }
    };
    let info = match label.to_ascii_uppercase().as_str() {
        "ML-KEM-512" => a(
            "kem",
            Some("512"),
            KEM,
            Some(128),
            1,
            "2.16.840.1.101.3.4.4.1",
        ),
        "ML-KEM-768" => a(
            "kem",
            Some("768"),
            KEM,
            Some(192),
            3,
            "2.16.840.1.101.3.4.4.2",
        ),
        "ML-KEM-1024" => a(
            "kem",
            Some("1024"),
            KEM,
            Some(256),
            5,
            "2.16.840.1.101.3.4.4.3",
        ),
        "X-WING" => a("kem", None, KEM, Some(128), 3, "1.3.6.1.4.1.62253.25722"),
        "ML-DSA-44" => a(
            "signature",
            Some("44"),
            SIG,
            Some(128),
            2,
            "2.16.840.1.101.3.4.3.17",
        ),
        "ML-DSA-65" => a(
            "signature",
            Some("65"),
            SIG,
            Some(192),
            3,
            "2.16.840.1.101.3.4.3.18",
        ),
        "ML-DSA-87" => a(
            "signature",
            Some("87"),
            SIG,
            Some(256),
            5,
            "2.16.840.1.101.3.4.3.19",
        ),
        "SLH-DSA-SHA2-128S" => a(
            "signature",
            Some("SHA2-128s"),
            SIG,
            Some(128),
            1,
            "2.16.840.1.101.3.4.3.20",
        ),
        "SLH-DSA-SHA2-128F" => a(
            "signature",
            Some("SHA2-128f"),
            SIG,
            Some(128),
            1,
            "2.16.840.1.101.3.4.3.21",
        ),
        "ED25519" => AlgorithmInfo {
            curve: Some("Ed25519"),
            ..a("signature", None, SIG, Some(128), 0, "1.3.101.112")
        },
        "X25519" => AlgorithmInfo {
            curve: Some("Curve25519"),
            ..a(
                "key-agree",
                None,
                &["keygen", "keyderive"],
                Some(128),
                0,
                "1.3.101.110",
            )
        },
        "ECDSA-P256" => AlgorithmInfo {
            curve: Some("P-256"),
            ..a("signature", None, SIG, Some(128), 0, "1.2.840.10045.4.3.2")
        },
        "AES-256-GCM" => AlgorithmInfo {
            mode: Some("gcm"),
            ..a(
                "ae",
                Some("256"),
                AE,
                Some(256),
                5,
                "2.16.840.1.101.3.4.1.46",
            )
        },
        "AES-128-GCM" => AlgorithmInfo {
            mode: Some("gcm"),
            ..a(
                "ae",
                Some("128"),
                AE,
                Some(128),
                1,
                "2.16.840.1.101.3.4.1.6",
            )
        },
        "SHA-256" => a(
            "hash",
            Some("256"),
            HASH,
            Some(128),
            2,
            "2.16.840.1.101.3.4.2.1",
        ),
        "SHA-384" => a(
            "hash",
            Some("384"),
            HASH,
            Some(192),
            4,
            "2.16.840.1.101.3.4.2.2",
        ),
        // Collision search on a 512-bit hash is at least as hard as AES-256
        // key search (category 5); on SHA-256 / SHA-384 it is category 2 / 4.
        "SHA-512" => a(
            "hash",
            Some("512"),
            HASH,
            Some(256),
            5,
            "2.16.840.1.101.3.4.2.3",
        ),
        "SHA3-256" => a(
            "hash",
            Some("256"),
            HASH,
            Some(128),
            2,
            "2.16.840.1.101.3.4.2.8",
        ),
        "SHA3-512" => a(
            "hash",
            Some("512"),
            HASH,
            Some(256),
            5,
            "2.16.840.1.101.3.4.2.10",
        ),
        // Keyed with 256-bit peppers: key search is the attack (category 5).
        "HMAC-SHA-256" => a(
            "mac",
            Some("SHA-256"),
            MAC,
            Some(256),
            5,
            "1.2.840.113549.2.9",
        ),
        "HMAC-SHA-512" => a(
            "mac",
            Some("SHA-512"),
            MAC,
            Some(256),
            5,
            "1.2.840.113549.2.11",
        ),
        "HMAC-SHA3-256" => a(
            "mac",
            Some("SHA3-256"),
            MAC,
            Some(256),
            5,
            "2.16.840.1.101.3.4.2.14",
        ),
        "HMAC-SHA3-512" => a(
            "mac",
            Some("SHA3-512"),
            MAC,
            Some(256),
            5,
            "2.16.840.1.101.3.4.2.16",
        ),
        _ => return None,
    };
    Some(info)
}

/// The labels [`algorithm_info`] knows, in their seeded spelling.
const KNOWN: &[&str] = &[
    "ML-KEM-512",
    "ML-KEM-768",
    "ML-KEM-1024",
    "X-Wing",
    "ML-DSA-44",
    "ML-DSA-65",
    "ML-DSA-87",
    "SLH-DSA-SHA2-128s",
    "SLH-DSA-SHA2-128f",
    "Ed25519",
    "X25519",
    "ECDSA-P256",
    "AES-256-GCM",
    "AES-128-GCM",
    "SHA-256",
    "SHA-384",
    "SHA-512",
    "SHA3-256",
    "SHA3-512",
    "HMAC-SHA-256",
    "HMAC-SHA-512",
    "HMAC-SHA3-256",
    "HMAC-SHA3-512",
];

/// A label in its seeded spelling when pqmig knows it (`kms_keys.algorithm`
/// is free text: `aes-256-gcm` and `AES-256-GCM` are one algorithm).
pub fn canonical(label: &str) -> String {
    KNOWN
        .iter()
        .find(|k| k.eq_ignore_ascii_case(label))
        .map_or_else(|| label.to_owned(), |k| (*k).to_owned())
}

/// What the CBOM is made of.
pub struct Input<'a> {
    pub database: &'a str,
    pub inventory: &'a Inventory,
    /// When the counts were taken (RFC 3339).
    pub sampled_at: &'a str,
    pub exact: bool,
    pub keys: &'a [KeyMaterial],
    /// (scope, table.column) of the items each scope counts.
    pub data: &'a [(String, String)],
    pub as_of: Option<time::Date>,
    /// `urn:uuid:…`; derived from the content when `None`.
    pub serial: Option<&'a str>,
}

fn prop(name: impl Into<String>, value: impl ToString) -> Value {
    json!({"name": name.into(), "value": value.to_string()})
}

fn algorithm_ref(label: &str) -> String {
    format!("crypto/algorithm/{label}")
}

/// The CycloneDX document.
pub fn document(input: &Input<'_>) -> Value {
    // The lines in a fixed order (whatever order the caller has them in),
    // each algorithm under its canonical label.
    let mut all: Vec<(&str, crate::db::inventory::Exposed)> = input
        .inventory
        .vulnerable
        .iter()
        .map(|l| ("vulnerable", l))
        .chain(input.inventory.protected.iter().map(|l| ("protected", l)))
        .map(|(kind, l)| {
            let mut l = l.clone();
            l.algorithm = canonical(&l.algorithm);
            (kind, l)
        })
        .collect();
    all.sort_by(|a, b| (a.0, &a.1.scope, &a.1.algorithm).cmp(&(b.0, &b.1.scope, &b.1.algorithm)));
    let lines = || all.iter().map(|(kind, l)| (*kind, l));
    // Every algorithm a line counts or a key uses, earliest deadline
    // first; "backup" is a kind of copy, not an algorithm (it shows on the
    // data components).
    let mut labels: Vec<String> = lines()
        .filter(|(_, l)| l.algorithm != "backup")
        .map(|(_, l)| l.algorithm.clone())
        .chain(
            input
                .keys
                .iter()
                .filter_map(|k| k.algorithm.as_deref().map(canonical)),
        )
        .collect::<BTreeSet<String>>()
        .into_iter()
        .collect();
    labels.sort_by_key(|l| (deadlines::transition(l).order(), l.clone()));

    let mut components = Vec::new();
    for label in &labels {
        components.push(algorithm_component(label, input, &mut lines()));
    }
    let mut dependencies = Vec::new();
    for k in input.keys {
        let (component, uses) = key_component(k);
        if let Some(alg) = uses {
            dependencies.push(json!({
                "ref": component["bom-ref"],
                "dependsOn": [algorithm_ref(&alg)],
            }));
        }
        components.push(component);
    }
    for scope in crate::metrics::SCOPES {
        let (component, uses) = data_component(scope, input, &mut lines());
        components.push(component);
        dependencies.push(json!({
            "ref": format!("data/{scope}"),
            "dependsOn": uses.iter().map(|l| algorithm_ref(l)).collect::<Vec<_>>(),
        }));
    }

    let mut metadata_props = vec![
        prop("pqmig:database", input.database),
        prop("pqmig:inventory:exact", input.exact),
        prop("pqmig:nist-ir-8547:source", deadlines::SOURCE),
    ];
    if let Some(d) = input.as_of {
        metadata_props.push(prop("pqmig:nist-ir-8547:as-of", d));
    }
    let mut doc = json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "version": 1,
        "metadata": {
            "timestamp": input.sampled_at,
            "tools": {"components": [{
                "type": "application",
                "name": "pqmig",
                "version": env!("CARGO_PKG_VERSION"),
            }]},
            "component": {
                "type": "data",
                "bom-ref": "database",
                "name": input.database,
                "description": "PostgreSQL database whose stored cryptography pqmig inventories",
            },
            "properties": metadata_props,
        },
        "components": components,
        "dependencies": dependencies,
    });
    let serial = match input.serial {
        Some(s) => s.to_owned(),
        None => {
            // Of the content, not of when it was counted: the same
            // database state gives the same serial however often counted.
            let mut content = doc.clone();
            content["metadata"]["timestamp"] = Value::Null;
            derived_serial(&content)
        }
    };
    doc["serialNumber"] = json!(serial);
    doc
}

/// `urn:uuid:` of a UUID (version 8, RFC 9562) made of the first 16 bytes
/// of SHA-256 over the canonical document without its serial and
/// timestamp: the same database state always gives the same serial.
fn derived_serial(doc: &Value) -> String {
    let digest = Sha256::digest(crate::crypto::wrap::canonical_json(doc));
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    format!("urn:uuid:{}", uuid::Uuid::from_bytes(b).hyphenated())
}

fn algorithm_component<'a>(
    label: &str,
    input: &Input<'_>,
    lines: &mut dyn Iterator<Item = (&'a str, &'a crate::db::inventory::Exposed)>,
) -> Value {
    let info = algorithm_info(label);
    let mut alg = serde_json::Map::new();
    match info {
        Some(i) => {
            alg.insert("primitive".into(), json!(i.primitive));
            if let Some(p) = i.parameter_set {
                alg.insert("parameterSetIdentifier".into(), json!(p));
            }
            if let Some(c) = i.curve {
                alg.insert("curve".into(), json!(c));
            }
            if let Some(m) = i.mode {
                alg.insert("mode".into(), json!(m));
            }
            alg.insert("cryptoFunctions".into(), json!(i.functions));
            if let Some(b) = i.classical_bits {
                alg.insert("classicalSecurityLevel".into(), json!(b));
            }
            alg.insert("nistQuantumSecurityLevel".into(), json!(i.nist_level));
        }
        None => {
            alg.insert("primitive".into(), json!("unknown"));
        }
    }
    let mut crypto = json!({"assetType": "algorithm", "algorithmProperties": alg});
    if let Some(oid) = info.and_then(|i| i.oid) {
        crypto["oid"] = json!(oid);
    }
    let t = deadlines::transition(label);
    let mut props = vec![prop("pqmig:nist-ir-8547:deadline", t.describe())];
    match t {
        deadlines::Transition::Deadline {
            deprecated_after,
            disallowed_after,
        } => {
            if let Some(y) = deprecated_after {
                props.push(prop("pqmig:nist-ir-8547:deprecated-after", y));
            }
            props.push(prop(
                "pqmig:nist-ir-8547:disallowed-after",
                disallowed_after,
            ));
        }
        deadlines::Transition::None => {}
        deadlines::Transition::Unknown => {}
    }
    if let Some(d) = input.as_of {
        props.push(prop(
            "pqmig:nist-ir-8547:standing-as-of",
            serde_json::to_value(t.standing(d))
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        ));
    }
    for (kind, l) in lines.filter(|(_, l)| l.algorithm == label) {
        props.push(prop(format!("pqmig:items:{}:{kind}", l.scope), l.items));
    }
    json!({
        "type": "cryptographic-asset",
        "bom-ref": algorithm_ref(label),
        "name": label,
        "cryptoProperties": crypto,
        "properties": props,
    })
}

/// A key's component, and the (canonical) algorithm it uses.
fn key_component(k: &KeyMaterial) -> (Value, Option<String>) {
    let algorithm = k.algorithm.as_deref().map(canonical);
    let info = algorithm.as_deref().and_then(algorithm_info);
    let material = match info.map(|i| i.primitive) {
        Some("ae" | "mac" | "block-cipher") => "secret-key",
        Some(_) => "private-key",
        None => "key",
    };
    let state = match k.status.as_str() {
        "active" => "active",
        "retired" => "deactivated",
        "disabled" => "suspended",
        "compromised" => "compromised",
        _ => "unknown-state",
    };
    let mut rel = json!({"type": material, "id": k.name});
    if state != "unknown-state" {
        rel["state"] = json!(state);
    }
    if let Some(a) = &algorithm {
        rel["algorithmRef"] = json!(algorithm_ref(a));
    }
    if let Some(c) = &k.created_at {
        rel["creationDate"] = json!(c);
    }
    let mut props = vec![
        prop("pqmig:table", k.table),
        prop("pqmig:id", k.id),
        prop("pqmig:status", &k.status),
    ];
    if let Some(p) = &k.provider {
        let name = match k.table {
            "signing_keys" => "pqmig:origin",
            _ => "pqmig:provider",
        };
        props.push(prop(name, p));
    }
    if let Some(p) = &k.purpose {
        props.push(prop("pqmig:purpose", p));
    }
    if let Some(s) = &k.scope {
        props.push(prop("pqmig:scope", s));
    }
    let component = json!({
        "type": "cryptographic-asset",
        "bom-ref": format!("crypto/key/{}/{}", k.table, k.id),
        "name": k.name,
        "cryptoProperties": {
            "assetType": "related-crypto-material",
            "relatedCryptoMaterialProperties": rel,
        },
        "properties": props,
    });
    (component, algorithm)
}

/// A scope's data, and the algorithms its items use now.
fn data_component<'a>(
    scope: &str,
    input: &Input<'_>,
    lines: &mut dyn Iterator<Item = (&'a str, &'a crate::db::inventory::Exposed)>,
) -> (Value, Vec<String>) {
    let (mut vulnerable, mut protected, mut backup) = (0i64, 0i64, 0i64);
    let mut props = Vec::new();
    let mut uses = BTreeSet::new();
    for (kind, l) in lines.filter(|(_, l)| l.scope == scope) {
        if l.algorithm == "backup" {
            backup += l.items;
            continue;
        }
        match kind {
            "vulnerable" => vulnerable += l.items,
            _ => protected += l.items,
        }
        if l.items > 0 {
            uses.insert(l.algorithm.clone());
        }
        props.push(prop(format!("pqmig:items:{kind}:{}", l.algorithm), l.items));
    }
    props.push(prop("pqmig:items:vulnerable", vulnerable));
    props.push(prop("pqmig:items:protected", protected));
    props.push(prop("pqmig:items:behind-backups", backup));
    let data: Vec<Value> = input
        .data
        .iter()
        .filter(|(s, _)| s == scope)
        .map(|(_, column)| json!({"type": "dataset", "name": column}))
        .collect();
    let mut component = json!({
        "type": "data",
        "bom-ref": format!("data/{scope}"),
        "name": scope,
        "properties": props,
    });
    if !data.is_empty() {
        component["data"] = json!(data);
    }
    (component, uses.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seeded_alias_is_known_with_its_fips_level() {
        for (label, level) in [
            ("ML-KEM-512", 1),
            ("ML-KEM-768", 3),
            ("ML-KEM-1024", 5),
            ("ML-DSA-44", 2),
            ("ML-DSA-65", 3),
            ("ML-DSA-87", 5),
            ("SLH-DSA-SHA2-128s", 1),
            ("X-Wing", 3),
            ("X25519", 0),
            ("Ed25519", 0),
            ("ECDSA-P256", 0),
            ("AES-256-GCM", 5),
        ] {
            let info = algorithm_info(label).unwrap_or_else(|| panic!("{label}"));
            assert_eq!(info.nist_level, level, "{label}");
        }
        assert_eq!(
            algorithm_info("ml-kem-768").and_then(|i| i.oid),
            Some("2.16.840.1.101.3.4.4.2")
        );
        assert!(algorithm_info("backup").is_none());
    }
}
