//! What the image holds, checked file by file against what the binary
//! links and what the image may contain.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use super::UID;
use super::buildah::text;

/// The libraries `ldd` lists for `binary` (the loader included), as paths.
fn ldd(binary: &Path) -> BTreeSet<String> {
    let out = Command::new("ldd")
        .arg(binary)
        .env("LC_ALL", "C")
        .output()
        .expect("run ldd");
    assert!(out.status.success(), "ldd: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=> ") {
                Some((_, rest)) => rest,
                None => line,
            };
            let path = path.split(" (").next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .to_vec()
}

/// The base64 body of each PEM certificate in `pem`, whitespace removed.
fn pem_bodies(pem: &str) -> Vec<String> {
    pem.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .filter_map(|c| c.split("-----END CERTIFICATE-----").next())
        .map(|b| b.split_whitespace().collect())
        .collect()
}

/// Every entry under `root` (relative path → metadata), symlinks not followed.
fn tree(root: &Path) -> BTreeMap<String, std::fs::Metadata> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let meta = entry.metadata().expect("lstat");
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                dirs.push(entry.path());
            }
            out.insert(rel, meta);
        }
    }
    out
}

/// Only what pqmig needs, owned by root and read-only to its user: the
/// binary as built, exactly the libraries ldd lists, the user entry, the
/// NSS config, the CA bundle without any of this machine's own CAs, and
/// the Debian copyright files of the packages those came from. No shell, no
/// package manager.
pub fn check_rootfs(root: &Path, binary: &Path) -> u64 {
    let entries = tree(root);
    let libs = ldd(binary);
    let mut expected: BTreeSet<String> = [
        "usr/local/bin/pqmig",
        "etc/passwd",
        "etc/group",
        "etc/nsswitch.conf",
        "etc/ssl/certs/ca-certificates.crt",
    ]
    .map(String::from)
    .into();
    expected.extend(libs.iter().map(|l| l.trim_start_matches('/').to_owned()));

    let files: BTreeSet<String> = entries
        .iter()
        .filter(|(_, m)| !m.is_dir())
        .map(|(p, _)| p.clone())
        .collect();
    let missing: Vec<&String> = expected.difference(&files).collect();
    assert!(missing.is_empty(), "missing from the image: {missing:?}");
    let copyright = |p: &str| {
        p.strip_prefix("usr/share/doc/")
            .and_then(|p| p.strip_suffix("/copyright"))
            .is_some_and(|pkg| !pkg.contains('/'))
    };
    let extra: Vec<&String> = files
        .difference(&expected)
        .filter(|p| !copyright(p))
        .collect();
    assert!(extra.is_empty(), "unexpected files in the image: {extra:?}");
    for shell_or_packages in [
        "bin/sh",
        "usr/bin/sh",
        "bin/bash",
        "bin/busybox",
        "usr/bin/apt",
        "usr/bin/apt-get",
        "usr/bin/dpkg",
        "var/lib/dpkg",
    ] {
        assert!(
            !entries.contains_key(shell_or_packages),
            "{shell_or_packages} is in the image"
        );
    }
    for (path, meta) in &entries {
        assert!(
            meta.is_dir() || meta.is_file(),
            "{path}: neither file nor directory"
        );
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path}: owner");
        assert_eq!(
            meta.permissions().mode() & 0o022,
            0,
            "{path}: writable by group or others"
        );
    }

    assert_eq!(
        sha256(&root.join("usr/local/bin/pqmig")),
        sha256(binary),
        "the image's pqmig is not the binary given"
    );
    let read = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
    assert_eq!(
        read("etc/passwd"),
        format!("pqmig:x:{UID}:{UID}:pqmig:/nonexistent:/sbin/nologin\n")
    );
    assert_eq!(read("etc/group"), format!("pqmig:x:{UID}:\n"));

    let bundle = pem_bodies(&read("etc/ssl/certs/ca-certificates.crt"));
    assert!(bundle.len() > 100, "only {} CA certificates", bundle.len());
    // Local CAs (update-ca-certificates appends them to the host's bundle)
    // are this machine's business, not the image's.
    for entry in std::fs::read_dir("/usr/local/share/ca-certificates")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(pem) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for body in pem_bodies(&pem) {
            assert!(
                !bundle.contains(&body),
                "the image trusts the local CA {}",
                entry.path().display()
            );
        }
    }
    entries
        .values()
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
