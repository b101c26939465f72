//! The container image of `deploy/image/`: built by its script from this
//! test build's `pqmig`, checked as an image (config, labels, every file in
//! it) and run: `pqmig migrate` and a hashes job worked by `pqmig run`
//! inside it, against the suite's PostgreSQL, with the keyring mounted
//! read-only where the Deployment mounts it.
//!
//! buildah comes from `.ci/setup-deploy`; a missing buildah fails the test.
//! The tests run as root (chroot isolation, a keyring owned by UID 10001).
//! Each test keeps its images and containers in a storage of its own,
//! removes them by name and then deletes the storage.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::TestDb;
use crate::support::hashes::{Fixture, assert_no_secret, terminal};

use buildah::{Daemon, Image, Storage, script, test_binary, text};
use rootfs::check_rootfs;

mod buildah;
mod rootfs;

/// The user the image runs as: the Deployment's runAsUser/runAsGroup.
const UID: u32 = 10001;

/// Where the Deployment mounts the keyring directory (read-only) and the
/// file PQMIG_KEYRING names in it.
const KEYRING_DIR: &str = "/etc/pqmig/keys";
const KEYRING: &str = "/etc/pqmig/keys/keyring.json";

const USERS: i64 = 1_000;

/// The test build's binary without its debug info (200 MB of it), which
/// an image would only carry around. Code and symbols stay as built.
fn stripped_test_binary(dir: &Path) -> PathBuf {
    let path = dir.join("pqmig");
    let out = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&path)
        .arg(test_binary())
        .output()
        .expect("run strip (binutils, which cargo's linker needs anyway)");
    assert!(out.status.success(), "strip: {}", text(&out));
    path
}

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the image tests run buildah with chroot isolation and chown a keyring to UID {UID}: run them as root"
    );
}

/// A copy of the keyring in a directory of its own, both owned by the
/// image's user with no group or other access, as the Deployment's init
/// container leaves it. pqmig accepts it only if it runs as that user.
fn keyring_dir(fixture: &Fixture) -> PathBuf {
    let dir = fixture.dir.path().join("keys");
    std::fs::create_dir(&dir).expect("keys dir");
    std::fs::copy(&fixture.keyring, dir.join("keyring.json")).expect("copy keyring");
    for (path, mode) in [(dir.join("keyring.json"), 0o600), (dir.clone(), 0o700)] {
        std::os::unix::fs::chown(&path, Some(UID), Some(UID)).expect("chown");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    dir
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect()
}

#[tokio::test]
async fn image_holds_only_pqmig_and_runs_migrate_and_a_job() {
    require_root();
    let storage = Storage::new();
    let source = "https://example.org/pqmig.git";
    let binary = stripped_test_binary(storage.dir.path());
    let image = Image::build(&storage, &binary, source);

    let config = image.config();
    assert_eq!(config["User"], "10001:10001");
    assert_eq!(config["Entrypoint"], json!(["/usr/local/bin/pqmig"]));
    assert_eq!(config["Cmd"], json!(["run"]));
    let labels = &config["Labels"];
    for (label, value) in [
        (
            "org.opencontainers.image.version",
            env!("CARGO_PKG_VERSION"),
        ),
        ("org.opencontainers.image.source", source),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        ("org.opencontainers.image.title", "pqmig"),
    ] {
        assert_eq!(labels[label], value, "label {label}");
    }

    // Every file of the image, read from the working container's root.
    let files = image.container("files");
    let root = PathBuf::from(storage.buildah(&["mount", &files.name]).trim());
    let bytes = check_rootfs(&root, &binary);
    storage.buildah(&["umount", &files.name]);
    drop(files);
    let size = storage.buildah(&["images", "--format", "{{.Size}}", &image.name]);
    eprintln!(
        "image: {} is {} ({bytes} bytes of files, {} of them pqmig)",
        image.name,
        size.trim(),
        std::fs::metadata(&binary).expect("binary").len()
    );

    // Commands run as `docker run IMAGE ARGS` would: ENTRYPOINT + ARGS.
    let entrypoint = strings(&config["Entrypoint"]);
    let with_args = |args: &[&'static str]| -> Vec<&str> {
        entrypoint
            .iter()
            .copied()
            .chain(args.iter().copied())
            .collect()
    };
    let pqmig = image.container("pqmig");
    let out = pqmig.run(&[], &[], &with_args(&["--version"]));
    assert!(out.status.success(), "pqmig --version: {}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("pqmig {}", env!("CARGO_PKG_VERSION"))
    );

    let db = TestDb::new().await;
    let url = db.url.clone();
    let out = pqmig.run(
        &[("DATABASE_URL", url.as_str())],
        &[],
        &with_args(&["migrate"]),
    );
    assert!(out.status.success(), "pqmig migrate: {}", text(&out));
    let applied: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM pqmig_schema_history", &[])
        .await
        .expect("schema history")
        .get(0);
    assert!(applied > 0, "migrate applied nothing");

    let fixture = Fixture::seed(db, USERS).await;
    let keys = keyring_dir(&fixture);
    let job = fixture.enqueue(json!({})).await;
    let env: Vec<(String, String)> = fixture
        .daemon_env()
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "PQMIG_KEYRING" => (k, KEYRING.to_owned()),
            _ => (k, v),
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let volumes = [format!("{}:{KEYRING_DIR}:ro", keys.display())];
    // The image's own command: ENTRYPOINT + CMD.
    let mut command = entrypoint.clone();
    command.extend(strings(&config["Cmd"]));
    let args = pqmig.run_args(&env, &volumes, &command);
    let log_path = fixture.dir.path().join("image.log");
    let mut daemon = Daemon {
        child: storage
            .command(Path::new("buildah"), &[])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).expect("log"))
            .spawn()
            .expect("spawn buildah run"),
    };
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let row = fixture.job(job).await;
        if terminal(&row) {
            break row;
        }
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            panic!(
                "the daemon exited ({status}) before the job ended:\n{}",
                log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "job {job} not finished within 60 s: {row:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(row.status, "done", "{row:?}\n{}", log());
    assert_eq!((row.processed, row.failed), (USERS, 0));
    fixture.assert_all_migrated_once().await;

    let status = daemon.terminate(Duration::from_secs(20));
    assert!(
        status.success(),
        "daemon exit after SIGTERM: {status}\n{}",
        log()
    );
    let log = log();
    assert!(log.contains("shutting down"), "{log}");
    assert_no_secret(&log);
}

/// The script refuses bad input before building, in one line naming what
/// is missing: no binary, or a binary needing a library nobody has.
#[test]
fn image_build_names_a_missing_binary_or_library_in_one_line() {
    let storage = Storage::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let one_line = |binary: &Path, needle: &str| {
        let out = storage
            .command(
                &script(),
                &[binary.to_str().expect("utf-8"), "pqmig-never:built"],
            )
            .output()
            .expect("run deploy/image/build");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "built from {}", binary.display());
        assert_eq!(out.stdout, b"", "stdout: {}", text(&out));
        assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
        assert!(stderr.contains(needle), "{needle:?} not named in: {stderr}");
    };

    let absent = dir.path().join("pqmig");
    one_line(&absent, &absent.display().to_string());

    // The test binary with its libgcc_s.so.1 renamed in the dynamic
    // string table (the first occurrence; same length, so still valid).
    let mut elf = std::fs::read(test_binary()).expect("read binary");
    let (from, to) = (b"libgcc_s.so.1\0", b"libmissing.so\0");
    let at = elf
        .windows(from.len())
        .position(|w| w == from)
        .expect("the binary needs libgcc_s.so.1");
    elf[at..at + to.len()].copy_from_slice(to);
    let patched = dir.path().join("pqmig-patched");
    std::fs::write(&patched, elf).expect("write patched binary");
    std::fs::set_permissions(&patched, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    one_line(&patched, "libmissing.so");
}
