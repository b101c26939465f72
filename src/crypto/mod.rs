//! The SPEC §5 formats, composed from maintained crates implementing the
//! final standards (libcrux for ML-KEM and ML-DSA, RustCrypto and dalek for
//! AES-GCM, HKDF, SHA-2/3, HMAC, SLH-DSA, X25519, Ed25519 and P-256);
//! nothing here is a hand-rolled primitive.
//!
//! - [`aead`]: AES-256-GCM with the nonce prefixed (SPEC §5).
//! - [`kem`]: ML-KEM-768/1024 and X-Wing with keys in seed form (§5.2).
//! - [`wrap`]: the legacy wrapper formats (§5.1) and `pqmig-wrap-v1` (§5.2),
//!   canonical JSON and the canonical uuid.
//! - [`suite`]: what `crypto_suite` says of a wrapper (format, KEM, `kc`, …).
//! - [`sig`]: Ed25519 / ECDSA-P256 sources, ML-DSA / SLH-DSA signatures (§5.3).
//! - [`onion`]: the keyed hash onion (§5.4).

pub mod aead;
pub mod kem;
pub mod onion;
pub mod sig;
pub mod suite;
pub mod wrap;
