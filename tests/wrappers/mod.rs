//! The wrappers scope: formats pinned by committed vectors and checked
//! against independent implementations (pyca/cryptography on OpenSSL, the
//! X-Wing draft's vectors and RustCrypto's x-wing), tampering, layer
//! selection, and jobs end to end against the real database and daemons.

mod formats;
mod jobs;
mod preflight;
