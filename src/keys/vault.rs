//! The `vault` key provider: keys in the transit engine of HashiCorp Vault
//! or OpenBao (the same HTTP API), which never leave it. pqmig asks
//! transit to decrypt (`legacy-vault-transit` wraps, sealed signing keys)
//! and to compute HMACs (peppers), a batch's items in one request
//! (`batch_input`), [`BATCH`] items per request, [`CONCURRENCY`]
//! requests of a batch at a time.
//!
//! A `kms_providers` row with provider `vault` names the server and the
//! transit mount in `location` (`https://vault.example:8200/transit`; the
//! mount defaults to `transit`); its `kms_keys` rows name a transit key in
//! `external_key_ref`. The token comes from where Vault's own tools look:
//! `VAULT_TOKEN`, else the file `vault-token` in `$CREDENTIALS_DIRECTORY`
//! (a systemd credential), else `~/.vault-token` (what `vault login` and
//! the Vault agent's sink write); it is read when a job starts, so a
//! renewed token file is picked up by the next job. `VAULT_CACERT` names
//! a PEM file of extra trust anchors; `VAULT_NAMESPACE` is sent when set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::crypto::onion::HmacHash;

/// Items in one transit request: a verify item carries four JSON
/// strings, and a Vault or OpenBao listener refuses a request of more
/// than 1,000 (`max_request_json_strings`, "refused JSON input due to high
/// complexity").
pub const BATCH: usize = 200;
/// Requests one batch has in flight at most.
pub const CONCURRENCY: usize = 4;

/// The prefix of a transit ciphertext or HMAC: `vault:v<N>:`.
const PREFIX: &str = "vault:v";

/// How a request failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Vault refused: permission denied (403), no such key or mount, a
    /// request it cannot serve. Trying again soon changes nothing.
    #[error("Vault{}: {message}", status_text(*status))]
    Refused { status: u16, message: String },
    /// Vault could not be reached, is sealed or in standby (503), is
    /// rate-limiting (429) or failed (5xx): the batch is tried again later.
    #[error("Vault unavailable: {0}")]
    Unavailable(String),
}

impl VaultError {
    pub fn outcome(&self) -> &'static str {
        match self {
            VaultError::Refused { .. } => "refused",
            VaultError::Unavailable(_) => "unavailable",
        }
    }
}

/// The transit mount of one server, with a token.
pub struct Vault {
    http: reqwest::Client,
    /// `<address>/v1/<mount>`.
    base: String,
    token: Zeroizing<String>,
    namespace: Option<String>,
}

/// Clients by `location`, made on first use, per piece of work (a job, a
/// command): a client's connections belong to the runtime it was made on.
#[derive(Default)]
pub struct Clients(Mutex<HashMap<String, Arc<Vault>>>);

impl Clients {
    /// The client of a provider's `location`.
    pub fn get(&self, location: &str) -> Result<Arc<Vault>, VaultError> {
        if let Some(v) = self.0.lock().expect("vault clients").get(location) {
            return Ok(Arc::clone(v));
        }
        let vault = Arc::new(Vault::connect(location)?);
        Ok(self
            .0
            .lock()
            .expect("vault clients")
            .entry(location.to_owned())
            .or_insert(vault)
            .clone())
    }
}

/// ` 403` (nothing for a refusal pqmig itself makes: no token, …).
fn status_text(status: u16) -> String {
    match status {
        0 => String::new(),
        s => format!(" {s}"),
    }
}

/// What an item's error in a `decrypt` batch means.
#[derive(Debug, PartialEq, Eq)]
pub enum ItemError {
    /// The ciphertext does not open: a failed tag (another key, another
    /// associated data, altered) or not a transit ciphertext at all.
    Integrity,
    /// The key's policy refuses it (a version below
    /// `min_decryption_version`, or above the newest): set up wrong, not
    /// the data's fault.
    Policy,
    /// Anything else: the server's trouble.
    Other,
}

/// Classify transit's error text for one item.
pub fn item_error(message: &str) -> ItemError {
    let m = message.to_ascii_lowercase();
    if m.contains("disallowed by policy") || m.contains("version is too") {
        ItemError::Policy
    } else if m.contains("message authentication failed") || m.starts_with("invalid ciphertext") {
        ItemError::Integrity
    } else {
        ItemError::Other
    }
}

fn refused(message: impl Into<String>) -> VaultError {
    VaultError::Refused {
        status: 0,
        message: message.into(),
    }
}

/// The token, from where Vault's tools look (see the module's docs).
fn token() -> Result<Zeroizing<String>, VaultError> {
    if let Ok(t) = std::env::var("VAULT_TOKEN").map(Zeroizing::new)
        && !t.trim().is_empty()
    {
        return Ok(Zeroizing::new(t.trim().to_owned()));
    }
    let mut files = Vec::new();
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        files.push(std::path::PathBuf::from(dir).join("vault-token"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        files.push(std::path::PathBuf::from(home).join(".vault-token"));
    }
    for f in &files {
        match std::fs::read_to_string(f).map(Zeroizing::new) {
            Ok(t) if !t.trim().is_empty() => return Ok(Zeroizing::new(t.trim().to_owned())),
            Ok(_) => {
                return Err(refused(format!(
                    "Vault token file {} is empty",
                    f.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(refused(format!("Vault token file {}: {e}", f.display()))),
        }
    }
    Err(refused(
        "no Vault token: set VAULT_TOKEN, or put it in $CREDENTIALS_DIRECTORY/vault-token or ~/.vault-token",
    ))
}

/// rustls on ring (as the rest of pqmig), the system's trust anchors and
/// those of `VAULT_CACERT`.
fn tls() -> Result<rustls::ClientConfig, VaultError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = std::env::var_os("VAULT_CACERT") {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let path = std::path::PathBuf::from(path);
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(&path)
            .and_then(|it| it.collect())
            .map_err(|e| refused(format!("VAULT_CACERT {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(refused(format!(
                "VAULT_CACERT {}: no certificate in it",
                path.display()
            )));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| refused(format!("VAULT_CACERT {}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| refused(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `<address>/v1/<mount>` of a `location` (`http(s)://host[:port][/mount]`).
pub fn base_of(location: &str) -> Result<String, String> {
    let location = location.trim().trim_end_matches('/');
    let rest = location
        .strip_prefix("https://")
        .or_else(|| location.strip_prefix("http://"))
        .ok_or_else(|| {
            format!(
                "its vault kms_providers row's location {location:?} is not an http(s):// address"
            )
        })?;
    let scheme_len = location.len() - rest.len();
    let (host, mount) = match rest.split_once('/') {
        Some((host, mount)) if !mount.is_empty() => (host, mount),
        _ => (rest.trim_end_matches('/'), "transit"),
    };
    if host.is_empty() {
        return Err(format!(
            "its vault kms_providers row's location {location:?} names no host"
        ));
    }
    Ok(format!("{}{host}/v1/{mount}", &location[..scheme_len]))
}

/// `vault:vN:<base64>` → (N, bytes).
fn unprefix(s: &str) -> Option<(u32, Vec<u8>)> {
    let rest = s.strip_prefix(PREFIX)?;
    let (version, body) = rest.split_once(':')?;
    Some((version.parse().ok()?, B64.decode(body).ok()?))
}

/// The transit name of an HMAC.
fn algorithm(hash: HmacHash) -> &'static str {
    match hash {
        HmacHash::Sha256 => "sha2-256",
        HmacHash::Sha512 => "sha2-512",
        HmacHash::Sha3_256 => "sha3-256",
        HmacHash::Sha3_512 => "sha3-512",
    }
}

/// An HMAC key's transit name and version: `name` (version 1) or
/// `name@N`. A pepper must never change under a profile, so pqmig never
/// follows a key's rotation on its own.
pub fn hmac_key(key_ref: &str) -> Result<(&str, u32), String> {
    match key_ref.rsplit_once('@') {
        None => Ok((key_ref, 1)),
        Some((name, v)) => match v.parse::<u32>() {
            Ok(n) if n >= 1 && !name.is_empty() => Ok((name, n)),
            _ => Err(format!(
                "{key_ref:?}: an HMAC key is named `name` or `name@version` (version 1 or more)"
            )),
        },
    }
}

/// One item's answer in a batch: the value, or the provider's reason
/// (transit's, KMS's, the token's) for it.
pub type ItemResult<T> = Result<T, String>;

impl Vault {
    fn connect(location: &str) -> Result<Vault, VaultError> {
        let base = base_of(location).map_err(refused)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls()?)
            // A redirect could carry the token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| refused(format!("HTTP client: {e}")))?;
        Ok(Vault {
            http,
            base,
            token: token()?,
            namespace: std::env::var("VAULT_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty()),
        })
    }

    /// POST `path` under the mount; the response's `data`. A batch that
    /// failed in part (or whole) comes back with a 400 status and its
    /// `batch_results` in `data`: that is an answer, not an error.
    async fn post(&self, operation: &str, path: &str, body: &Value) -> Result<Value, VaultError> {
        let started = Instant::now();
        let out = self.send(path, body).await;
        let outcome = match &out {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        super::meter::observe("vault", operation, outcome, started.elapsed());
        out
    }

    async fn send(&self, path: &str, body: &Value) -> Result<Value, VaultError> {
        let one_line = |e: &dyn std::error::Error| {
            let mut text = e.to_string();
            let mut next = e.source();
            while let Some(c) = next {
                text.push_str(": ");
                text.push_str(&c.to_string());
                next = c.source();
            }
            text.replace(['\n', '\r'], " ")
        };
        let mut token = reqwest::header::HeaderValue::from_str(&self.token)
            .map_err(|_| refused("the Vault token is not a valid HTTP header value"))?;
        token.set_sensitive(true);
        let mut req = self
            .http
            .post(format!("{}/{path}", self.base))
            .header("X-Vault-Token", token)
            .header("X-Vault-Request", "true")
            .json(body);
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| VaultError::Unavailable(one_line(&e)))?;
        let status = resp.status();
        let code = status.as_u16();
        // The body holds plaintexts (base64): wiped once parsed.
        let body = Zeroizing::new(
            resp.bytes()
                .await
                .map_err(|e| VaultError::Unavailable(one_line(&e)))?
                .to_vec(),
        );
        let mut doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let server_fault = code == 429 || code >= 500;
        // A batch answers 200, or 400 when some of its items failed (each
        // item saying why); a 5xx is the server's trouble even with
        // results.
        if matches!(code, 200 | 400)
            && doc
                .get("data")
                .is_some_and(|d| d.get("batch_results").is_some())
        {
            return Ok(doc["data"].take());
        }
        let errors = doc
            .get("errors")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty());
        if status.is_success() && errors.is_none() {
            return Ok(doc.get_mut("data").map(Value::take).unwrap_or(Value::Null));
        }
        let mut message = errors
            .map(|e| {
                e.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if message.is_empty() {
            message = status
                .canonical_reason()
                .unwrap_or("no error text")
                .to_owned();
        }
        if server_fault {
            Err(VaultError::Unavailable(format!("{code}: {message}")))
        } else {
            Err(VaultError::Refused {
                status: code,
                message,
            })
        }
    }

    /// The `batch_results` of a batch answer, one per item sent.
    fn results(data: &Value, sent: usize) -> Result<&Vec<Value>, VaultError> {
        data.get("batch_results")
            .and_then(Value::as_array)
            .filter(|r| r.len() == sent)
            .ok_or_else(|| {
                refused(format!(
                    "transit answered a batch of {sent} without as many batch_results"
                ))
            })
    }

    /// Transit `decrypt` of each `(ciphertext, associated_data)` under
    /// `key`, [`BATCH`] per request. An item transit cannot open (a failed
    /// tag, a malformed ciphertext) is that item's `Err`.
    pub async fn decrypt(
        &self,
        key: &str,
        items: &[(&[u8], &[u8])],
    ) -> Result<Vec<ItemResult<Zeroizing<Vec<u8>>>>, VaultError> {
        use futures_util::StreamExt;
        // By index: a closure over borrowed chunks trips rustc's
        // higher-ranked lifetime check where the future must be Send.
        let parts: Vec<_> = futures_util::stream::iter((0..items.len()).step_by(BATCH))
            .map(|at| self.decrypt_chunk(key, &items[at..(at + BATCH).min(items.len())]))
            .buffered(CONCURRENCY)
            .collect()
            .await;
        let mut out = Vec::with_capacity(items.len());
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }

    async fn decrypt_chunk(
        &self,
        key: &str,
        chunk: &[(&[u8], &[u8])],
    ) -> Result<Vec<ItemResult<Zeroizing<Vec<u8>>>>, VaultError> {
        let input: Vec<Value> = chunk
            .iter()
            .map(|(ct, aad)| {
                json!({"ciphertext": String::from_utf8_lossy(ct), "associated_data": B64.encode(aad)})
            })
            .collect();
        let data = self
            .post(
                "decrypt",
                &format!("decrypt/{key}"),
                &json!({"batch_input": input}),
            )
            .await?;
        Ok(Self::results(&data, chunk.len())?
            .iter()
            .map(|r| match r.get("error").and_then(Value::as_str) {
                Some(e) if !e.is_empty() => Err(e.to_owned()),
                _ => r
                    .get("plaintext")
                    .and_then(Value::as_str)
                    .and_then(|p| B64.decode(p).ok())
                    .map(Zeroizing::new)
                    .ok_or_else(|| "transit returned no plaintext".to_owned()),
            })
            .collect())
    }

    /// A new `aes256-gcm96` transit key `name`. For the bench's scratch
    /// data; pqmig never creates keys in production.
    pub async fn create_key(&self, name: &str) -> Result<(), VaultError> {
        self.post(
            "create",
            &format!("keys/{name}"),
            &json!({"type": "aes256-gcm96"}),
        )
        .await
        .map(drop)
    }

    /// Transit `encrypt` of `plain` under `key` with `associated_data`:
    /// the ciphertext text (`vault:vN:…`) as bytes.
    pub async fn encrypt(
        &self,
        key: &str,
        plain: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        let body = json!({"plaintext": B64.encode(plain), "associated_data": B64.encode(aad)});
        let data = self
            .post("encrypt", &format!("encrypt/{key}"), &body)
            .await?;
        data.get("ciphertext")
            .and_then(Value::as_str)
            .filter(|c| c.starts_with(PREFIX))
            .map(|c| c.as_bytes().to_vec())
            .ok_or_else(|| refused("transit encrypt returned no ciphertext"))
    }

    /// HMAC-`hash` of each message under the HMAC key `key_ref` (`name` or
    /// `name@version`, see [`hmac_key`]), full length, [`BATCH`] per
    /// request; with `verify` each is then checked by transit (`verify`),
    /// `None` standing for one that does not verify.
    pub async fn hmac(
        &self,
        key_ref: &str,
        hash: HmacHash,
        messages: &[&[u8]],
        verify: bool,
    ) -> Result<Vec<ItemResult<Option<Vec<u8>>>>, VaultError> {
        use futures_util::StreamExt;
        let key = hmac_key(key_ref).map_err(refused)?;
        let n = messages.len();
        let parts: Vec<_> = futures_util::stream::iter((0..n).step_by(BATCH))
            .map(|at| {
                let chunk = &messages[at..(at + BATCH).min(n)];
                self.hmac_chunk(key, algorithm(hash), chunk, verify)
            })
            .buffered(CONCURRENCY)
            .collect()
            .await;
        let mut out = Vec::with_capacity(messages.len());
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }

    async fn hmac_chunk(
        &self,
        (name, version): (&str, u32),
        alg: &str,
        chunk: &[&[u8]],
        verify: bool,
    ) -> Result<Vec<ItemResult<Option<Vec<u8>>>>, VaultError> {
        let input: Vec<Value> = chunk
            .iter()
            .map(|m| json!({"input": B64.encode(m)}))
            .collect();
        let body = json!({"key_version": version, "batch_input": input});
        let data = self
            .post("mac", &format!("hmac/{name}/{alg}"), &body)
            .await?;
        let macs: Vec<ItemResult<String>> = Self::results(&data, chunk.len())?
            .iter()
            .map(|r| match r.get("error").and_then(Value::as_str) {
                Some(e) if !e.is_empty() => Err(e.to_owned()),
                _ => r
                    .get("hmac")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| "transit returned no hmac".to_owned()),
            })
            .collect();
        let valid: Vec<ItemResult<bool>> = if verify {
            let input: Vec<Value> = chunk
                .iter()
                .zip(&macs)
                .map(|(m, mac)| {
                    json!({"input": B64.encode(m), "hmac": mac.as_deref().unwrap_or("vault:v1:")})
                })
                .collect();
            let path = format!("verify/{name}/{alg}");
            let data = self
                .post("verify_mac", &path, &json!({"batch_input": input}))
                .await?;
            // An invalid MAC's item has no `valid` at all.
            Self::results(&data, chunk.len())?
                .iter()
                .map(|r| match r.get("error").and_then(Value::as_str) {
                    Some(e) if !e.is_empty() => Err(format!("verify: {e}")),
                    _ => Ok(r.get("valid").and_then(Value::as_bool).unwrap_or(false)),
                })
                .collect()
        } else {
            vec![Ok(true); chunk.len()]
        };
        Ok(macs
            .into_iter()
            .zip(valid)
            .map(|(mac, valid)| {
                let (mac, valid) = (mac?, valid?);
                match unprefix(&mac) {
                    Some((v, bytes)) if v == version => Ok(valid.then_some(bytes)),
                    Some((v, _)) => Err(format!(
                        "transit answered with key version {v}, not the {version} asked for"
                    )),
                    None => Err("transit returned an HMAC that is not vault:vN:<base64>".into()),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_gives_the_mount_address() {
        assert_eq!(
            base_of("https://vault.example:8200").unwrap(),
            "https://vault.example:8200/v1/transit"
        );
        assert_eq!(
            base_of("http://127.0.0.1:8200/kms/transit/").unwrap(),
            "http://127.0.0.1:8200/v1/kms/transit"
        );
        assert!(base_of("vault.example:8200").is_err());
        assert!(base_of("https:///transit").is_err());
    }

    #[test]
    fn transit_item_errors_are_told_apart() {
        assert_eq!(
            item_error("cipher: message authentication failed"),
            ItemError::Integrity
        );
        assert_eq!(
            item_error("invalid ciphertext: no prefix"),
            ItemError::Integrity
        );
        assert_eq!(
            item_error("ciphertext or signature version is disallowed by policy (too old)"),
            ItemError::Policy
        );
        assert_eq!(item_error("internal error"), ItemError::Other);
    }

    #[test]
    fn an_hmac_key_names_its_version() {
        assert_eq!(hmac_key("pepper").unwrap(), ("pepper", 1));
        assert_eq!(hmac_key("pepper@3").unwrap(), ("pepper", 3));
        assert!(hmac_key("pepper@0").is_err());
        assert!(hmac_key("pepper@x").is_err());
        assert_eq!(unprefix("vault:v2:AAE="), Some((2, vec![0, 1])));
        assert_eq!(unprefix("vault:2:AAE="), None);
    }
}
