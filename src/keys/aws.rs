//! The `aws` key provider: AWS KMS keys, which never leave KMS. pqmig asks
//! KMS to decrypt: `legacy-aws-kms` wraps (SPEC §5.1) are opened by
//! `Decrypt` with the wrapper's uuid as encryption context, a batch's
//! wraps at most [`CONCURRENCY`] requests at a time; a pepper held as a
//! KMS HMAC key computes the hashes scope's HMAC with `GenerateMac`
//! (and verifies it with `VerifyMac`), likewise concurrently.
//!
//! A `kms_providers` row with provider `aws` names the region in
//! `location`; its `kms_keys` rows name a KMS key in `external_key_ref` (a
//! key ARN, key id, alias name or alias ARN). Credentials come from the
//! SDK's standard chain: the environment, the shared files, web identity
//! (EKS IRSA / pod identity), the ECS task role, the instance profile. The
//! endpoint is the region's, unless the standard `AWS_ENDPOINT_URL_KMS` or
//! `AWS_ENDPOINT_URL` (or `endpoint_url` in the shared config file) names
//! another: a VPC endpoint, FIPS endpoint or a test server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::Client;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::MacAlgorithmSpec;
use aws_smithy_http_client::tls;
use zeroize::Zeroizing;

use crate::crypto::onion::HmacHash;

/// `Decrypt` requests one batch has in flight at most. A job reads its
/// next batch while it writes one (and a write that meets a concurrent
/// change reads those rows again), so a process has at most
/// 2 × `worker.concurrency` × this many; measured in README "Key
/// providers".
pub const CONCURRENCY: usize = 32;

/// How one request failed.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// The ciphertext does not open under this key and context
    /// (`InvalidCiphertextException`, `IncorrectKeyException`): the item's
    /// fault.
    #[error("KMS {code}: the ciphertext does not open under this key and encryption context")]
    Integrity { code: String },
    /// KMS refused (access denied, key disabled, missing or pending
    /// deletion): nothing will change by trying again soon. The job fails,
    /// naming the code.
    #[error("KMS {code}: {message}")]
    Refused { code: String, message: String },
    /// KMS could not be reached, timed out, throttled or failed (5xx),
    /// after the client's own retries: the batch is tried again later.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
}

impl KmsError {
    pub fn outcome(&self) -> &'static str {
        match self {
            KmsError::Integrity { .. } => "integrity",
            KmsError::Refused { .. } => "refused",
            KmsError::Unavailable(_) => "unavailable",
        }
    }
}

/// The encryption-context key a signing key sealed by KMS is bound to its
/// name with (the `aws` form of SPEC §4's `private_key_enc`).
pub const SIGNING_KEY_CONTEXT_KEY: &str = "pqmig:signing_key";

/// The region of an `aws` row (its provider's `location`).
pub fn region_of(key: &crate::db::kms::KmsKey) -> Result<&str, String> {
    key.location
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| "its aws kms_providers row names no region (location)".into())
}

/// Codes KMS answers that are worth trying again.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "KMSInternalException",
    "KMSInternalFailure",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalFailure",
    "ExpiredTokenException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// The code that says the ciphertext does not open under this key and
/// context: altered, another row's, another context's. (An intact blob of
/// another key is `IncorrectKeyException`: a key set up wrong, such as an
/// alias moved to a new key, which fails the job once rather than every
/// item as tampering.)
const INTEGRITY_CODES: &[&str] = &["InvalidCiphertextException"];

/// Why `e` happened, its causes joined: one line, without the SDK's debug
/// dump of the whole error.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string().replace(['\n', '\r'], " ");
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Credentials that cannot be had however often asked (none configured,
/// a broken profile): the operator's to fix, not the network's.
fn credentials_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(c) = err.downcast_ref::<CredentialsError>() {
            return matches!(
                c,
                CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_)
            );
        }
        next = err.source();
    }
    false
}

fn classify<E>(e: SdkError<E, HttpResponse>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &e {
        SdkError::ServiceError(s) => {
            let code = e.code().unwrap_or("unknown").to_owned();
            let message = e.message().unwrap_or("").replace(['\n', '\r'], " ");
            let status = s.raw().status().as_u16();
            let server_fault = status >= 500 || status == 429;
            if INTEGRITY_CODES.contains(&code.as_str()) {
                KmsError::Integrity { code }
            } else if TRANSIENT_CODES.contains(&code.as_str()) || server_fault {
                KmsError::Unavailable(format!("{code}: {message}"))
            } else {
                KmsError::Refused { code, message }
            }
        }
        SdkError::ConstructionFailure(_) => KmsError::Refused {
            code: "request".into(),
            message: causes(&e),
        },
        _ if credentials_refused(&e) => KmsError::Refused {
            code: "credentials".into(),
            message: causes(&e),
        },
        _ => KmsError::Unavailable(causes(&e)),
    }
}

/// A KMS client of one region.
pub struct Kms {
    client: Client,
}

/// Clients by region, made on first use. A client's connections belong
/// to the tokio runtime it was first used on, so each piece of work (a
/// job, a command) keeps its own set rather than the process one.
#[derive(Default)]
pub struct Clients(Mutex<HashMap<String, Arc<Kms>>>);

impl Clients {
    /// The client of `region`.
    pub async fn get(&self, region: &str) -> Arc<Kms> {
        if let Some(k) = self.0.lock().expect("kms clients").get(region) {
            return Arc::clone(k);
        }
        let kms = Arc::new(connect(region).await);
        self.0
            .lock()
            .expect("kms clients")
            .entry(region.to_owned())
            .or_insert(kms)
            .clone()
    }
}

/// A client of `region`, with the standard credential chain and endpoint.
async fn connect(region: &str) -> Kms {
    // rustls with ring, the TLS stack the rest of pqmig uses; the
    // system's trust store.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .http_client(http)
        // A few quick retries here; pqmig's job backoff does the rest.
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(100)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .load()
        .await;
    Kms {
        client: Client::new(&config),
    }
}

impl Kms {
    /// KMS `Decrypt` of `blob` under `key_id`, with one encryption-context
    /// pair. The plaintext is wiped from pqmig's memory on drop.
    pub async fn decrypt(
        &self,
        key_id: &str,
        blob: &[u8],
        context: (&str, &str),
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let started = Instant::now();
        let out = self
            .client
            .decrypt()
            .key_id(key_id)
            .ciphertext_blob(Blob::new(blob))
            .encryption_context(context.0, context.1)
            .send()
            .await
            .map_err(classify)
            .and_then(|o| {
                o.plaintext
                    .map(|p| Zeroizing::new(p.into_inner()))
                    .ok_or_else(|| KmsError::Unavailable("Decrypt returned no plaintext".into()))
            });
        observe("decrypt", &out, started);
        out
    }

    /// KMS `Encrypt` of `plain` under `key_id`, with one encryption-context
    /// pair: the ciphertext blob.
    pub async fn encrypt(
        &self,
        key_id: &str,
        plain: &[u8],
        context: (&str, &str),
    ) -> Result<Vec<u8>, KmsError> {
        let started = Instant::now();
        let out = self
            .client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(plain))
            .encryption_context(context.0, context.1)
            .send()
            .await
            .map_err(classify)
            .and_then(|o| {
                o.ciphertext_blob
                    .map(Blob::into_inner)
                    .ok_or_else(|| KmsError::Unavailable("Encrypt returned no ciphertext".into()))
            });
        observe("encrypt", &out, started);
        out
    }
}

/// The KMS `MacAlgorithm` of an HMAC target: KMS HMAC keys do SHA-2
/// only (`HMAC_224`…`HMAC_512` key specs).
pub fn mac_algorithm(hash: HmacHash) -> Option<MacAlgorithmSpec> {
    match hash {
        HmacHash::Sha256 => Some(MacAlgorithmSpec::HmacSha256),
        HmacHash::Sha512 => Some(MacAlgorithmSpec::HmacSha512),
        HmacHash::Sha3_256 | HmacHash::Sha3_512 => None,
    }
}

/// The largest message `GenerateMac` takes.
pub const MAX_MAC_MESSAGE: usize = 4096;

/// What `VerifyMac` answers for a MAC that does not match.
const INVALID_MAC_CODE: &str = "KMSInvalidMacException";

impl Kms {
    /// KMS `GenerateMac` of `message` under the HMAC key `key_id`: the full
    /// MAC (not truncated).
    pub async fn generate_mac(
        &self,
        key_id: &str,
        algorithm: MacAlgorithmSpec,
        message: &[u8],
    ) -> Result<Vec<u8>, KmsError> {
        let started = Instant::now();
        let out = self
            .client
            .generate_mac()
            .key_id(key_id)
            .mac_algorithm(algorithm)
            .message(Blob::new(message))
            .send()
            .await
            .map_err(classify)
            .and_then(|o| {
                o.mac
                    .map(Blob::into_inner)
                    .ok_or_else(|| KmsError::Unavailable("GenerateMac returned no MAC".into()))
            });
        observe("mac", &out, started);
        out
    }

    /// KMS `VerifyMac`: whether `mac` is the HMAC of `message` under
    /// `key_id` (KMS says `KMSInvalidMacException` when it is not).
    pub async fn verify_mac(
        &self,
        key_id: &str,
        algorithm: MacAlgorithmSpec,
        message: &[u8],
        mac: &[u8],
    ) -> Result<bool, KmsError> {
        let started = Instant::now();
        let out = match self
            .client
            .verify_mac()
            .key_id(key_id)
            .mac_algorithm(algorithm)
            .message(Blob::new(message))
            .mac(Blob::new(mac))
            .send()
            .await
        {
            Ok(o) => Ok(o.mac_valid),
            Err(e) if e.code() == Some(INVALID_MAC_CODE) => Ok(false),
            Err(e) => Err(classify(e)),
        };
        let outcome = match &out {
            Ok(true) => "ok",
            Ok(false) => "integrity",
            Err(e) => e.outcome(),
        };
        super::meter::observe("aws", "verify_mac", outcome, started.elapsed());
        out
    }
}

impl Kms {
    /// A new symmetric encryption key (`CreateKey`): its ARN. For the
    /// bench's scratch data; pqmig never creates keys in production.
    pub async fn create_key(&self, description: &str) -> Result<String, KmsError> {
        self.client
            .create_key()
            .description(description)
            .send()
            .await
            .map_err(classify)?
            .key_metadata
            .and_then(|m| m.arn)
            .ok_or_else(|| KmsError::Unavailable("CreateKey returned no key ARN".into()))
    }
}

fn observe<T>(operation: &str, out: &Result<T, KmsError>, started: Instant) {
    let outcome = match out {
        Ok(_) => "ok",
        Err(e) => e.outcome(),
    };
    super::meter::observe("aws", operation, outcome, started.elapsed());
}
