//! `pqmig_key_provider_requests_total{provider,operation,outcome}` and
//! `pqmig_key_provider_request_seconds{provider,operation}`: every request
//! this process made to a key provider that is not in-process (an HSM, a
//! KMS). The collectors are the process's own, so the code that calls a
//! provider needs no handle; [`crate::metrics::Metrics`] registers them.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Providers whose requests are counted (`local` works in-process).
pub const PROVIDERS: &[&str] = &["aws", "pkcs11", "vault"];
/// What was asked: `decrypt` opens a wrap (pkcs11: an AES-GCM decryption,
/// an X25519 agreement or an ML-KEM decapsulation) or unseals a signing key,
/// `encrypt` seals one (and `keys check`'s probe), `mac` computes a
/// pepper's HMAC (aws: one `GenerateMac`; pkcs11: a batch's share, one
/// session's `C_Sign`s and, with verify, `C_Verify`s; vault: one batch
/// request), `verify_mac` has KMS (or transit, a batch) check them
/// (`VerifyMac`; `integrity`: it did not match). A vault request carries
/// up to [`super::vault::BATCH`] items.
pub const OPERATIONS: &[&str] = &["decrypt", "encrypt", "mac", "verify_mac"];
/// `integrity`: the ciphertext did not open (an item's fault);
/// `refused`: the provider said no (access, a disabled or missing key);
/// `unavailable`: it could not be reached or asked us to slow down.
pub const OUTCOMES: &[&str] = &["ok", "integrity", "refused", "unavailable"];

pub struct ProviderMetrics {
    pub requests: IntCounterVec,
    pub seconds: HistogramVec,
}

/// The process's collectors, every known label set at 0.
pub fn get() -> &'static ProviderMetrics {
    static METRICS: OnceLock<ProviderMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let requests = IntCounterVec::new(
            Opts::new(
                "pqmig_key_provider_requests_total",
                "Requests to a key provider outside the process (pkcs11: the HSM; aws: AWS KMS; vault: Vault/OpenBao transit, one per batch request), by operation and outcome: ok, integrity (the ciphertext did not open), refused (access denied, key disabled or missing), unavailable (unreachable, throttled, 5xx).",
            ),
            &["provider", "operation", "outcome"],
        )
        .expect("valid metric");
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "pqmig_key_provider_request_seconds",
                "Wall time of one request to a key provider outside the process, retries by its client included.",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
            &["provider", "operation"],
        )
        .expect("valid metric");
        for p in PROVIDERS {
            for o in OPERATIONS {
                seconds.with_label_values(&[p, o]);
                for outcome in OUTCOMES {
                    requests.with_label_values(&[p, o, outcome]);
                }
            }
        }
        ProviderMetrics { requests, seconds }
    })
}

/// Count one request.
pub fn observe(provider: &str, operation: &str, outcome: &str, took: Duration) {
    let m = get();
    m.requests
        .with_label_values(&[provider, operation, outcome])
        .inc();
    m.seconds
        .with_label_values(&[provider, operation])
        .observe(took.as_secs_f64());
}
