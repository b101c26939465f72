//! A second PostgreSQL cluster for the TLS tests: its own free port on
//! 127.0.0.1 and 127.0.0.2, `ssl = on` with a server certificate from a CA
//! made here (SANs `localhost` and `127.0.0.1` only), SCRAM passwords, and
//! no plaintext TCP at all. Started once, lazily, and shared by the tests
//! of the binary (they run in parallel); stopped and removed when the test
//! process exits, pass or fail. A run killed outright leaves its cluster
//! behind; the next run stops and removes it before starting its own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio_postgres::{Client, NoTls};

pub const APP_USER: &str = "pqmig_app";
const DIR_PREFIX: &str = "pqmig-tls-cluster-";

pub struct Cluster {
    pub port: u16,
    /// The temporary directory: data/, socket, log, certificates.
    pub root: PathBuf,
    /// PEM of the CA that signed the server certificate.
    pub ca: PathBuf,
    /// PEM of a CA that signed nothing this server presents.
    pub other_ca: PathBuf,
    /// `APP_USER`'s password (SCRAM), as a file would hold it.
    pub app_password: String,
    bin: PathBuf,
    /// The server user when the tests run as root (initdb refuses root).
    run_as: Option<&'static str>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
/// Tests share the cluster; a test that restarts it takes it alone.
static USE: RwLock<()> = RwLock::const_new(());
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The cluster, for a test that leaves it running.
pub async fn shared() -> (&'static Cluster, RwLockReadGuard<'static, ()>) {
    let guard = USE.read().await;
    (cluster(), guard)
}

/// The cluster, for a test that restarts it (waits for the others).
pub async fn exclusive() -> (&'static Cluster, RwLockWriteGuard<'static, ()>) {
    let guard = USE.write().await;
    (cluster(), guard)
}

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let c = Cluster::start().unwrap_or_else(|e| panic!("TLS test cluster: {e}"));
        // SAFETY: registering a plain extern "C" function with no captures.
        unsafe { libc::atexit(stop_at_exit) };
        c
    })
}

extern "C" fn stop_at_exit() {
    if let Some(c) = CLUSTER.get() {
        c.stop_and_remove();
    }
}

/// The newest installed server binaries (Debian layout), or `PG_BINDIR`.
pub(crate) fn bindir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("no /usr/lib/postgresql ({e}); set PG_BINDIR"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    let v = versions
        .last()
        .ok_or("no server version in /usr/lib/postgresql")?;
    Ok(PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
}

/// A port free on both loopback addresses the cluster listens on.
pub(crate) fn free_port() -> Result<u16, String> {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = a.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port on 127.0.0.1 and 127.0.0.2".into())
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

pub(crate) fn chown_to(path: &Path, user: Option<(u32, u32)>) -> Result<(), String> {
    match user {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", path.display())),
        None => Ok(()),
    }
}

/// The user to run the server tools as (`None`: the tests' own), and its
/// uid and gid to own the files they use.
pub(crate) type ServerUser = (Option<&'static str>, Option<(u32, u32)>);

/// Who runs the server: the `postgres` user when the tests run as root,
/// since initdb refuses root; else the tests' own user.
pub(crate) fn server_user() -> Result<ServerUser, String> {
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let run_as = root_user.then_some("postgres");
    let ids = match run_as {
        Some(user) => {
            let out = Command::new("id")
                .args(["-u", user])
                .output()
                .map_err(|e| e.to_string())?;
            let uid: u32 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|_| format!("running as root needs a {user:?} user"))?;
            let out = Command::new("id")
                .args(["-g", user])
                .output()
                .map_err(|e| e.to_string())?;
            let gid: u32 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|_| format!("no group of {user:?}"))?;
            Some((uid, gid))
        }
        None => None,
    };
    Ok((run_as, ids))
}

/// Stop and remove clusters of earlier test runs whose process is gone:
/// temporary directories named `{prefix}{pid}-…`, with a cluster in each
/// of `data_dirs`.
pub(crate) fn remove_stale(
    bin: &Path,
    run_as: Option<&'static str>,
    prefix: &str,
    data_dirs: &[&str],
) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            for data in data_dirs {
                let _ = pg_command(bin, run_as, "pg_ctl")
                    .args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
                    .arg(e.path().join(data))
                    .output();
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub(crate) fn pg_command(bin: &Path, run_as: Option<&'static str>, tool: &str) -> Command {
    let mut cmd = match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(bin.join(tool));
            c
        }
        None => Command::new(bin.join(tool)),
    };
    cmd.env_clear()
        .env("LC_ALL", "C")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd
}

impl Cluster {
    fn start() -> Result<Cluster, String> {
        let bin = bindir()?;
        let (run_as, ids) = server_user()?;
        remove_stale(&bin, run_as, DIR_PREFIX, &["data"]);

        let root = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            rand_hex(4)
        ));
        std::fs::create_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        chown_to(&root, ids)?;
        let data = root.join("data");
        let port = free_port()?;

        run(
            pg_command(&bin, run_as, "initdb")
                .current_dir(&root)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
                .args(["--no-sync", "--no-instructions", "-D"])
                .arg(&data),
            "initdb",
        )?;

        // Certificates: a CA, the server's (signed by it), and a stranger.
        let (ca_pem, server_pem, server_key) = certificates("pqmig test CA");
        let (other_ca_pem, _, _) = certificates("pqmig other CA");
        let ca = root.join("ca.pem");
        let other_ca = root.join("other-ca.pem");
        std::fs::write(&ca, ca_pem).map_err(|e| e.to_string())?;
        std::fs::write(&other_ca, other_ca_pem).map_err(|e| e.to_string())?;
        for (name, content, mode) in [
            ("server.crt", server_pem, 0o644),
            ("server.key", server_key, 0o600),
        ] {
            let path = data.join(name);
            std::fs::write(&path, content).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
            chown_to(&path, ids)?;
        }
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1,127.0.0.2'\n\
             unix_socket_directories = '{}'\nssl = on\nssl_cert_file = 'server.crt'\n\
             ssl_key_file = 'server.key'\npassword_encryption = 'scram-sha-256'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 100\nshared_buffers = 32MB\n",
            root.display()
        );
        append(&data.join("postgresql.conf"), &conf)?;
        // TLS over TCP or nothing; the Unix socket is for the test's admin.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.2/32 scram-sha-256\n",
        )
        .map_err(|e| e.to_string())?;

        let cluster = Cluster {
            port,
            root,
            ca,
            other_ca,
            app_password: format!("app-pw-{}", rand_hex(12)),
            bin,
            run_as,
        };
        if let Err(e) = cluster.pg_ctl(&["start"]) {
            let log = std::fs::read_to_string(cluster.root.join("server.log")).unwrap_or_default();
            cluster.stop_and_remove();
            return Err(format!("{e}\n{log}"));
        }
        // The role, through the Unix socket with a runtime of our own (we
        // may be inside a test's runtime, which must not be blocked on).
        let url = cluster.admin_config();
        let password = cluster.app_password.clone();
        let setup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (client, conn) = url.connect(NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!(
                        "CREATE ROLE {APP_USER} LOGIN CREATEDB PASSWORD '{password}'"
                    ))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join()
        .map_err(|_| "role setup panicked".to_string())?;
        if let Err(e) = setup {
            cluster.stop_and_remove();
            return Err(format!("create role: {e}"));
        }
        Ok(cluster)
    }

    fn pg_ctl(&self, action: &[&str]) -> Result<(), String> {
        run(
            pg_command(&self.bin, self.run_as, "pg_ctl")
                .current_dir(&self.root)
                .args(action)
                .args(["-m", "fast", "-w", "-t", "30", "-D"])
                .arg(self.root.join("data"))
                .arg("-l")
                .arg(self.root.join("server.log")),
            &format!("pg_ctl {}", action.join(" ")),
        )
    }

    /// `pg_ctl restart`: every connection is cut, the server comes back.
    pub fn restart(&self) {
        self.pg_ctl(&["restart"]).expect("restart the TLS cluster");
    }

    /// Down for `outage` (`pg_ctl stop`, then `start`): every connection
    /// is cut and new ones are refused meanwhile.
    pub fn stop_for(&self, outage: std::time::Duration) {
        self.pg_ctl(&["stop"]).expect("stop the TLS cluster");
        std::thread::sleep(outage);
        self.pg_ctl(&["start"]).expect("start the TLS cluster");
    }

    /// `pg_ctl stop`: down until [`Cluster::start_again`].
    pub fn stop(&self) {
        self.pg_ctl(&["stop"]).expect("stop the TLS cluster");
    }

    /// `pg_ctl start` after [`Cluster::stop`].
    pub fn start_again(&self) {
        self.pg_ctl(&["start"]).expect("start the TLS cluster");
    }

    /// A superuser connection to `db` over the Unix socket.
    pub async fn admin_to(&self, db: &str) -> Client {
        let (client, conn) = self
            .admin_config()
            .dbname(db)
            .connect(NoTls)
            .await
            .expect("admin connection to a TLS cluster database");
        tokio::spawn(conn);
        client
    }

    fn stop_and_remove(&self) {
        let _ = pg_command(&self.bin, self.run_as, "pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
            .arg(self.root.join("data"))
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }

    fn admin_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.root)
            .port(self.port)
            .user("postgres")
            .dbname("postgres");
        c
    }

    /// A superuser connection over the Unix socket.
    pub async fn admin(&self) -> Client {
        let (client, conn) = self
            .admin_config()
            .connect(NoTls)
            .await
            .expect("admin connection to the TLS cluster");
        tokio::spawn(conn);
        client
    }

    /// A fresh database owned by `APP_USER`.
    pub async fn database(&self) -> String {
        let name = format!(
            "tls_{}_{}",
            std::process::id(),
            DB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        self.admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {APP_USER}"))
            .await
            .expect("create database");
        name
    }

    /// `postgres://pqmig_app@HOST:PORT/DB?PARAMS` (no password in it).
    pub fn url(&self, host: &str, db: &str, params: &str) -> String {
        format!("postgres://{APP_USER}@{host}:{}/{db}?{params}", self.port)
    }

    /// The password in a private file, with the newline `echo` would add.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("db-password");
        std::fs::write(&path, format!("{}\n", self.app_password)).expect("password file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }
}

pub(crate) fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

pub(crate) fn rand_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .expect("urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// (CA PEM, server certificate PEM for localhost and 127.0.0.1, its key).
fn certificates(ca_name: &str) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key).expect("CA cert").pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().expect("server key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let server_pem = leaf.signed_by(&key, &issuer).expect("server cert").pem();
    (ca_pem, server_pem, key.serialize_pem())
}
