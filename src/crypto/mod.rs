//! Cryptographic building blocks of the scopes. Every primitive comes from a
//! maintained RustCrypto crate implementing the final standard; nothing here
//! is hand-rolled, this module only composes them into the SPEC §5 formats.
//!
//! - [`aead`]: AES-256-GCM with the nonce prefixed (SPEC §5).
//! - [`onion`]: the keyed hash onion of SPEC §5.4 (HMAC over the old hash).

pub mod aead;
pub mod kem;
pub mod onion;
pub mod sig;
pub mod wrap;
