//! The SPEC §5.4 hash onion against committed known answers, which an
//! independent implementation (Python's hmac/hashlib) re-derives in CI.

use std::path::PathBuf;
use std::process::Command;

use pqmig::crypto::onion::{HmacHash, Onion, OnionError};
use serde_json::Value;
use zeroize::Zeroizing;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn pepper(len: usize) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(vec![0x5a; len])
}

#[test]
fn onion_reproduces_every_known_answer() {
    let text =
        std::fs::read_to_string(vectors_dir().join("hash_onion.json")).expect("read vectors");
    let doc: Value = serde_json::from_str(&text).expect("vectors are JSON");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(
        cases.len() >= 12,
        "expected a full vector set, got {}",
        cases.len()
    );
    let mut seen = std::collections::HashSet::new();
    for (i, case) in cases.iter().enumerate() {
        let field = |k: &str| case[k].as_str().unwrap_or_else(|| panic!("case {i}: {k}"));
        let hash =
            HmacHash::from_alias(field("hash")).unwrap_or_else(|| panic!("case {i}: unknown hash"));
        seen.insert(hash);
        let output_len = case["output_len"].as_u64().map(|n| n as usize);
        let onion = Onion::new(
            hash,
            Zeroizing::new(unhex(field("pepper_hex"))),
            output_len,
            field("profile_name"),
        )
        .unwrap_or_else(|e| panic!("case {i}: {e}"));
        let old_hash = unhex(field("old_hash_hex"));
        assert_eq!(
            hex(&onion.rehash(&old_hash)),
            field("new_hash_hex"),
            "case {i} ({})",
            field("note")
        );
        assert_eq!(
            onion.new_version(field("old_version")),
            field("new_version"),
            "case {i}"
        );
        assert!(
            onion.is_migrated(field("new_version")),
            "case {i}: result counts as migrated"
        );
        assert!(
            !onion.is_migrated(field("old_version")),
            "case {i}: input is not migrated"
        );
    }
    assert_eq!(seen.len(), 4, "every HMAC variant is covered");
}

#[test]
fn committed_vectors_match_the_independent_generator() {
    let script = vectors_dir().join("gen_hash_onion.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("--stdout")
        .output()
        .expect("python3 runs (needed to re-derive the hash onion vectors)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed =
        std::fs::read_to_string(vectors_dir().join("hash_onion.json")).expect("read vectors");
    assert_eq!(
        String::from_utf8(out.stdout).expect("utf-8"),
        committed,
        "hash_onion.json is stale: run python3 tests/vectors/gen_hash_onion.py"
    );
}

#[test]
fn version_chain_is_prefixed_by_the_profile() {
    let onion = Onion::new(HmacHash::Sha3_256, pepper(32), None, "pepper-v2").expect("onion");
    assert_eq!(onion.new_version("sha256-v1"), "pepper-v2/sha256-v1");
    assert!(onion.is_migrated("pepper-v2/sha256-v1"));
    assert!(onion.is_migrated("pepper-v2/pepper-v1/v1"));
    // Only the outermost layer counts, and only a whole profile name.
    assert!(!onion.is_migrated("pepper-v3/pepper-v2/v1"));
    assert!(!onion.is_migrated("pepper-v2"));
    assert!(!onion.is_migrated("pepper-v2x/v1"));
    assert!(!onion.is_migrated(""));
}

#[test]
fn output_len_must_fit_the_hash() {
    for (hash, max) in [
        (HmacHash::Sha256, 32),
        (HmacHash::Sha512, 64),
        (HmacHash::Sha3_256, 32),
        (HmacHash::Sha3_512, 64),
    ] {
        assert_eq!(hash.output_len(), max);
        for ok in [16, max] {
            let onion = Onion::new(hash, pepper(32), Some(ok), "p").expect("in range");
            assert_eq!(onion.rehash(b"x").len(), ok);
        }
        assert_eq!(
            Onion::new(hash, pepper(32), None, "p")
                .expect("full")
                .rehash(b"")
                .len(),
            max
        );
        for bad in [0, 15, max + 1] {
            let err = Onion::new(hash, pepper(32), Some(bad), "p").expect_err("out of range");
            assert!(matches!(err, OnionError::OutputLen { .. }), "{err:?}");
            assert!(err.to_string().contains(&format!("16..={max}")), "{err}");
        }
    }
}

#[test]
fn short_pepper_and_bad_profile_names_are_refused() {
    let err = Onion::new(HmacHash::Sha256, pepper(31), None, "p").expect_err("short pepper");
    assert!(err.to_string().contains("256-bit"), "{err}");
    for name in ["", "a/b"] {
        let err = Onion::new(HmacHash::Sha256, pepper(32), None, name).expect_err("bad name");
        assert!(matches!(err, OnionError::ProfileName { .. }), "{err:?}");
    }
}

#[test]
fn hash_names_parse_from_variants_and_aliases() {
    assert_eq!(HmacHash::from_variant("SHA-256"), Some(HmacHash::Sha256));
    assert_eq!(HmacHash::from_variant("SHA3-512"), Some(HmacHash::Sha3_512));
    assert_eq!(HmacHash::from_variant("SHA-1"), None);
    assert_eq!(HmacHash::from_alias("HMAC-SHA-512"), Some(HmacHash::Sha512));
    assert_eq!(
        HmacHash::from_alias("hmac-sha3-256"),
        Some(HmacHash::Sha3_256)
    );
    assert_eq!(HmacHash::from_alias("SHA3-256"), None);
    assert_eq!(HmacHash::from_alias("HMAC-"), None);
    assert_eq!(
        HmacHash::from_alias("HMAC-SHA3-256")
            .map(HmacHash::alias)
            .as_deref(),
        Some("HMAC-SHA3-256")
    );
}

#[test]
fn debug_never_shows_the_pepper() {
    let onion = Onion::new(
        HmacHash::Sha256,
        Zeroizing::new(vec![0xab; 32]),
        Some(16),
        "p",
    )
    .expect("onion");
    let dbg = format!("{onion:?}");
    assert!(dbg.contains("redacted 32 bytes"), "{dbg}");
    assert!(!dbg.to_lowercase().contains("abab"), "{dbg}");
    assert!(!dbg.contains("171"), "{dbg}");
}
