//! The local keyring (SPEC §4): strict parsing, permission checks with the
//! fix in the message, and secrets that never reach an error or `Debug`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use pqmig::keys::{KeyError, KeyProvider, LocalKeyring, check_private};
use serde_json::{Value, json};

const AES: [u8; 32] = [0x11; 32];
const PEPPER: [u8; 32] = [0x22; 32];
const MLKEM_SEED: [u8; 64] = [0x33; 64];

fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn valid_doc() -> Value {
    json!({"version": 1, "keys": [
        {"ref": "local:kek-legacy-1", "algorithm": "AES-256-GCM", "secret": b64(&AES)},
        {"ref": "local:pq-a", "algorithm": "ML-KEM-768", "secret": b64(&MLKEM_SEED)},
        {"ref": "local:pepper-v2", "algorithm": "HMAC-SHA3-256", "secret": b64(&PEPPER)},
    ]})
}

fn write_mode(dir: &Path, text: &str, mode: u32) -> PathBuf {
    let path = dir.join("keyring.json");
    std::fs::write(&path, text).expect("write keyring");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

fn load_text(text: &str) -> Result<LocalKeyring, KeyError> {
    let dir = tempfile::tempdir().expect("tempdir");
    LocalKeyring::load(&write_mode(dir.path(), text, 0o600))
}

/// The error of loading `text`, checked to be one line and free of every
/// secret the test documents use, in base64 and in hex.
fn load_err(text: &str) -> String {
    let err = load_text(text)
        .expect_err("keyring must be refused")
        .to_string();
    assert!(!err.contains('\n'), "one line: {err}");
    assert_no_secret(&err);
    err
}

fn assert_no_secret(s: &str) {
    for secret in [
        &AES[..],
        &PEPPER[..],
        &MLKEM_SEED[..],
        &[0x44; 31][..],
        &[0x55; 16][..],
    ] {
        assert!(!s.contains(&b64(secret)), "base64 secret leaked: {s}");
        assert!(
            !s.contains(&b64(secret)[..16]),
            "part of a base64 secret leaked: {s}"
        );
        assert!(
            !s.to_lowercase().contains(&hex(&secret[..8])),
            "hex secret leaked: {s}"
        );
    }
}

fn with_key(entry: Value) -> String {
    let mut doc = valid_doc();
    doc["keys"].as_array_mut().expect("keys").push(entry);
    doc.to_string()
}

#[test]
fn valid_keyring_loads_and_returns_secrets() {
    let ring = load_text(&valid_doc().to_string()).expect("valid keyring");
    let kek = ring.secret("local:kek-legacy-1").expect("kek");
    assert_eq!(kek.algorithm, "AES-256-GCM");
    assert_eq!(&kek.bytes[..], &AES);
    let pepper = ring.secret("local:pepper-v2").expect("pepper");
    assert_eq!(pepper.algorithm, "HMAC-SHA3-256");
    assert_eq!(&pepper.bytes[..], &PEPPER);
    assert_eq!(
        &ring.secret("local:pq-a").expect("seed").bytes[..],
        &MLKEM_SEED
    );

    let missing = ring.secret("local:nope").expect_err("unknown ref");
    assert!(matches!(missing, KeyError::NotFound { .. }), "{missing:?}");
    assert!(missing.to_string().contains("local:nope"), "{missing}");

    let wrong = ring
        .secret_for("local:pepper-v2", "AES-256-GCM")
        .expect_err("not a KEK");
    assert!(
        matches!(wrong, KeyError::WrongAlgorithm { .. }),
        "{wrong:?}"
    );
    assert!(ring.secret_for("local:kek-legacy-1", "AES-256-GCM").is_ok());

    for dbg in [
        format!("{ring:?}"),
        format!("{kek:?}"),
        format!("{pepper:?}"),
        format!("{wrong:?}"),
    ] {
        assert_no_secret(&dbg);
    }
    assert!(format!("{ring:?}").contains("local:pepper-v2"));
    assert!(
        format!("{kek:?}").contains("<redacted 32 bytes>"),
        "{kek:?}"
    );
}

#[test]
fn algorithm_names_are_case_insensitive_and_canonicalised() {
    let doc = json!({"version": 1, "keys": [
        {"ref": "k", "algorithm": "hmac-sha-512", "secret": b64(&[7; 48])},
        {"ref": "x", "algorithm": "x-wing", "secret": b64(&[8; 32])},
    ]});
    let ring = load_text(&doc.to_string()).expect("valid keyring");
    assert_eq!(ring.secret("k").expect("k").algorithm, "HMAC-SHA-512");
    assert_eq!(ring.secret("x").expect("x").algorithm, "X-Wing");
}

#[test]
fn keyring_readable_by_group_or_others_is_refused() {
    for mode in [0o644, 0o640, 0o604, 0o620] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_mode(dir.path(), &valid_doc().to_string(), mode);
        let err = LocalKeyring::load(&path)
            .expect_err("mode refused")
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains(&format!("{mode:04o}")), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert_no_secret(&err);
    }
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.json");
    let err = LocalKeyring::load(&path).expect_err("missing").to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn malformed_keyrings_get_clear_errors() {
    let aes = b64(&AES);
    let cases: Vec<(String, &[&str])> = vec![
        ("{\"version\": 1, \"keys\": [".into(), &["invalid JSON"]),
        (
            json!({"version": 1, "keys": [], "extra": 1}).to_string(),
            &["unknown field", "extra"],
        ),
        (
            with_key(json!({"ref": "k", "algorithm": "AES-256-GCM", "secret": aes, "note": "x"})),
            &["unknown field", "note"],
        ),
        (
            json!({"version": 2, "keys": []}).to_string(),
            &["version 2"],
        ),
        (
            with_key(
                json!({"ref": "local:pepper-v2", "algorithm": "HMAC-SHA3-256", "secret": b64(&PEPPER)}),
            ),
            &["local:pepper-v2", "more than once"],
        ),
        (
            with_key(json!({"ref": "bad64", "algorithm": "AES-256-GCM", "secret": "not*base64!"})),
            &["bad64", "base64"],
        ),
        (
            with_key(
                json!({"ref": "unpadded", "algorithm": "AES-256-GCM", "secret": aes.trim_end_matches('=')}),
            ),
            &["unpadded", "base64"],
        ),
        (
            with_key(
                json!({"ref": "short-aes", "algorithm": "AES-256-GCM", "secret": b64(&[0x44; 31])}),
            ),
            &["short-aes", "31 bytes", "expected 32"],
        ),
        (
            with_key(
                json!({"ref": "weak", "algorithm": "HMAC-SHA-256", "secret": b64(&[0x55; 16])}),
            ),
            &["weak", "too short for a 256-bit pepper"],
        ),
        (
            with_key(json!({"ref": "odd", "algorithm": "RSA-2048", "secret": aes})),
            &[
                "odd",
                "RSA-2048",
                "AES-256-GCM",
                "ML-KEM-1024",
                "HMAC-SHA3-512",
            ],
        ),
        (
            // A secret pasted into the algorithm field must not be echoed.
            with_key(json!({"ref": "swapped", "algorithm": b64(&AES), "secret": "AES-256-GCM"})),
            &["swapped", "unknown algorithm"],
        ),
        (
            // Nor a secret where a key object belongs (serde quotes values).
            json!({"version": 1, "keys": [b64(&PEPPER)]}).to_string(),
            &["invalid JSON"],
        ),
        (
            json!({"version": 1, "keys": [{"ref": "k", "algorithm": "X25519"}]}).to_string(),
            &["missing field", "secret"],
        ),
    ];
    for (text, wanted) in cases {
        let err = load_err(&text);
        for w in wanted {
            assert!(err.contains(w), "{err:?} should mention {w:?}");
        }
    }
}

#[test]
fn keyring_owned_by_another_user_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_mode(dir.path(), &valid_doc().to_string(), 0o600);
    let other = rustix::process::geteuid().as_raw().wrapping_add(4242);
    // Only root can give a file away; elsewhere this branch goes untested.
    if std::os::unix::fs::chown(&path, Some(other), None).is_err() {
        eprintln!("skipped: cannot chown the keyring to another uid");
        return;
    }
    let err = LocalKeyring::load(&path)
        .expect_err("foreign owner refused")
        .to_string();
    assert!(err.contains(&format!("owned by uid {other}")), "{err}");
    assert!(err.contains("chown"), "{err}");
}

/// PostgreSQL's `ssl_key_file` rule, on (mode, owner, euid) directly so
/// every case runs whatever user the tests run as.
#[test]
fn permission_rule_is_postgresqls() {
    let path = Path::new("/etc/pqmig/keys/keyring.json");
    let (me, other) = (10001, 10002);
    let check = |mode: u32, owner: u32, euid: u32| check_private(path, mode, owner, euid);
    // Owned by pqmig's user: 0600 or stricter.
    for mode in [0o600, 0o400, 0o700, 0o100600] {
        assert_eq!(check(mode, me, me), Ok(()), "{mode:o} own");
    }
    for mode in [0o640, 0o660, 0o604, 0o644, 0o610, 0o601] {
        let err = check(mode, me, me).expect_err("own file with group/other bits");
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains(&format!("{:04o}", mode & 0o7777)), "{err}");
    }
    // Owned by root: group read allowed (a Kubernetes Secret volume).
    for mode in [0o640, 0o440, 0o600, 0o400, 0o100440] {
        assert_eq!(check(mode, 0, me), Ok(()), "{mode:o} root");
    }
    for mode in [0o660, 0o604, 0o644, 0o650, 0o641, 0o620] {
        let err = check(mode, 0, me).expect_err("root file with group write or other bits");
        assert!(err.contains("chmod 640"), "{err}");
        assert!(err.contains("owned by root"), "{err}");
    }
    // pqmig running as root owns a root-owned file: 0600, as PostgreSQL.
    assert!(check(0o640, 0, 0).is_err());
    assert_eq!(check(0o600, 0, 0), Ok(()));
    // Anyone else's file, however strict its mode.
    for mode in [0o600, 0o400, 0o640] {
        let err = check(mode, other, me).expect_err("foreign owner");
        assert!(err.contains(&format!("owned by uid {other}")), "{err}");
        assert!(err.contains(&format!("chown {me}")), "{err}");
    }
    for err in [
        check(0o660, 0, me),
        check(0o644, me, me),
        check(0o600, other, me),
    ] {
        let err = err.expect_err("refused");
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
