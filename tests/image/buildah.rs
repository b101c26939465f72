//! buildah for the image tests: a private storage, the image built by the
//! script, working containers, and the daemon run in one; each removed or
//! killed on drop, every command bounded in time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const SETUP_HINT: &str = "run `.ci/setup-deploy` to install buildah";

/// Each buildah or script invocation ends within this, or is killed.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn script() -> PathBuf {
    repo().join("deploy/image/build")
}

pub fn test_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pqmig"))
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A name no other test or run uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A containers-storage of its own (vfs) in a temporary directory. Every
/// command made here (buildah, the build script) uses it, never the
/// machine's.
pub struct Storage {
    pub dir: tempfile::TempDir,
}

impl Storage {
    pub fn new() -> Storage {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = format!(
            "[storage]\ndriver = \"vfs\"\nrunroot = \"{0}/run\"\ngraphroot = \"{0}/graph\"\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("storage.conf"), conf).expect("storage.conf");
        Storage { dir }
    }

    /// `program args` bounded by STEP_TIMEOUT (coreutils `timeout`, which
    /// kills it 5 s after the TERM if need be), in this storage.
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=5")
            .arg(STEP_TIMEOUT.as_secs().to_string())
            .arg(program)
            .args(args)
            .current_dir(repo())
            .env(
                "CONTAINERS_STORAGE_CONF",
                self.dir.path().join("storage.conf"),
            )
            .env("STORAGE_DRIVER", "vfs")
            .env_remove("BUILDAH_ISOLATION")
            .env_remove("PQMIG_IMAGE_BUILDER")
            .env_remove("PQMIG_IMAGE_CONTEXT")
            .env_remove("PQMIG_IMAGE_SOURCE");
        cmd
    }

    pub fn buildah_output(&self, args: &[&str]) -> Output {
        let out = self
            .command(Path::new("buildah"), args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run buildah: {e}; {SETUP_HINT}"));
        assert_ne!(
            out.status.code(),
            Some(124),
            "buildah {args:?} did not end within {STEP_TIMEOUT:?}"
        );
        out
    }

    pub fn buildah(&self, args: &[&str]) -> String {
        let out = self.buildah_output(args);
        assert!(
            out.status.success(),
            "buildah {args:?} failed ({}):\n{}",
            out.status,
            text(&out)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }
}

/// An image built by the script; removed (by name) on drop.
pub struct Image<'a> {
    storage: &'a Storage,
    pub name: String,
}

impl<'a> Image<'a> {
    pub fn build(storage: &'a Storage, binary: &Path, source: &str) -> Image<'a> {
        let name = format!(
            "{}:{}",
            unique("pqmig-image-test"),
            env!("CARGO_PKG_VERSION")
        );
        let image = Image { storage, name };
        let binary = binary.to_str().expect("utf-8 path");
        let started = Instant::now();
        let out = storage
            .command(&script(), &[binary, &image.name])
            .env("PQMIG_IMAGE_SOURCE", source)
            .output()
            .expect("run deploy/image/build");
        assert!(
            out.status.success(),
            "deploy/image/build failed ({}):\n{}",
            out.status,
            text(&out)
        );
        eprintln!("image: built {} in {:?}", image.name, started.elapsed());
        image
    }

    /// The image's OCI config (`config` of the OCI image configuration).
    pub fn config(&self) -> Value {
        let out = self
            .storage
            .buildah(&["inspect", "--type", "image", &self.name]);
        let doc: Value = serde_json::from_str(&out).expect("buildah inspect prints JSON");
        doc["OCIv1"]["config"].clone()
    }

    pub fn container(&self, role: &str) -> Container<'a> {
        let name = unique(&format!("pqmig-image-test-{role}"));
        self.storage
            .buildah(&["from", "--pull-never", "--name", &name, &self.name]);
        Container {
            storage: self.storage,
            name,
        }
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        let _ = self.storage.buildah_output(&["rmi", &self.name]);
    }
}

/// A working container of the image; removed (by name) on drop.
pub struct Container<'a> {
    storage: &'a Storage,
    pub name: String,
}

impl Container<'_> {
    /// `buildah run` arguments for `command` with `env`, in the host's
    /// network (the suite's PostgreSQL is on 127.0.0.1) and with `volumes`
    /// bind-mounted. The process runs as the image's USER.
    pub fn run_args(
        &self,
        env: &[(&str, &str)],
        volumes: &[String],
        command: &[&str],
    ) -> Vec<String> {
        let mut args: Vec<String> = ["run", "--isolation", "chroot", "--network", "host"]
            .map(String::from)
            .to_vec();
        for (k, v) in env {
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        for v in volumes {
            args.extend(["--volume".into(), v.clone()]);
        }
        args.push(self.name.clone());
        args.push("--".into());
        args.extend(command.iter().map(|s| s.to_string()));
        args
    }

    pub fn run(&self, env: &[(&str, &str)], volumes: &[String], command: &[&str]) -> Output {
        let args = self.run_args(env, volumes, command);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.storage.buildah_output(&args)
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.storage.buildah_output(&["rm", &self.name]);
    }
}

/// `buildah run` of the daemon; on drop (a failed test) every process of
/// it is killed.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    /// The pqmig process: a descendant of the `timeout` → `buildah` chain.
    /// Chroot isolation adds no PID namespace, so it is a host PID.
    pub fn pqmig_pid(&self) -> Option<i32> {
        descendants(self.child.id())
            .into_iter()
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim_end() == "pqmig")
            })
            .map(|pid| pid as i32)
    }

    /// SIGTERM to pqmig (buildah would SIGKILL it on a TERM of its own):
    /// the drain, then exit 0, which buildah passes on.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.pqmig_pid().expect("pqmig runs in the container");
        // SAFETY: kill(2) on a process of our own child's tree.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill {pid}");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            for pid in descendants(self.child.id()) {
                // SAFETY: as above; the tree is ours.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every process below `root`, from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child);
        }
    }
    found
}
