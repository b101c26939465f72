//! AWS KMS as moto serves it (`tests/vectors/kms_server.py`, in the venv
//! `.ci/setup` makes), on a loopback port of its own, stopped on drop; with
//! the faults a test asks for, answered as KMS answers them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use super::python;

/// A DEK and the ciphertext blob KMS made of it.
pub type Wrapped = ([u8; 32], Vec<u8>);

pub struct KmsServer {
    child: Child,
    pub endpoint: String,
}

impl KmsServer {
    pub fn start() -> KmsServer {
        let mut child = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
            .arg(python::script("kms_server.py"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's KMS (bash .ci/setup installs moto)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("its port");
        let port: u16 = line.trim().parse().expect("kms_server.py prints its port");
        KmsServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// What a `pqmig` process needs to reach it: the endpoint and (any)
    /// credentials, through the SDK's standard variables.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL_KMS", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// The next `count` requests of `operation` fail with `status`/`code`.
    pub async fn fault(&self, operation: &str, status: u16, code: &str, count: u32) {
        let body = json!({"operation": operation, "status": status, "code": code, "count": count});
        self.faults_call("POST", &body.to_string()).await;
    }

    /// Drop the faults not served yet.
    pub async fn clear_faults(&self) {
        self.faults_call("DELETE", "").await;
    }

    /// Injected faults not served yet.
    pub async fn faults_left(&self) -> i64 {
        let list: Value = serde_json::from_str(&self.faults_call("GET", "").await).expect("json");
        list.as_array()
            .expect("a list")
            .iter()
            .map(|f| f["count"].as_i64().unwrap_or(0))
            .sum()
    }

    async fn faults_call(&self, method: &str, body: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.endpoint.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "{method} /__faults HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }

    /// `uuids.len()` wrappers' DEKs, each encrypted by KMS under one new key with its
    /// uuid as encryption context (another's for `wrong_context`), by boto3:
    /// (key ARN, [(dek, ciphertext blob)]).
    pub fn wrap(&self, uuids: &[String], wrong_context: &[usize]) -> (String, Vec<Wrapped>) {
        let req =
            json!({"endpoint": self.endpoint, "uuids": uuids, "wrong_context": wrong_context});
        let out: Value =
            serde_json::from_str(&python::run("kms_wrap.py", &[], &req.to_string())).expect("json");
        let wraps = out["wraps"]
            .as_array()
            .expect("wraps")
            .iter()
            .map(|w| {
                let dek = super::unb64(&w["dek"]);
                (dek.try_into().expect("32 bytes"), super::unb64(&w["blob"]))
            })
            .collect();
        (out["key_arn"].as_str().expect("arn").to_owned(), wraps)
    }

    /// A new KMS HMAC key (`HMAC_256`) and the MAC KMS computes of each
    /// message with it (`GenerateMac`, `HMAC_SHA_256`), by boto3: (key ARN,
    /// MACs).
    pub fn macs(&self, messages: &[Vec<u8>]) -> (String, Vec<Vec<u8>>) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let messages: Vec<String> = messages.iter().map(|m| b64.encode(m)).collect();
        let req = json!({"endpoint": self.endpoint, "messages": messages});
        let out: Value =
            serde_json::from_str(&python::run("kms_mac.py", &[], &req.to_string())).expect("json");
        let macs = out["macs"]
            .as_array()
            .expect("macs")
            .iter()
            .map(super::unb64)
            .collect();
        (out["key_arn"].as_str().expect("arn").to_owned(), macs)
    }
}

impl Drop for KmsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
