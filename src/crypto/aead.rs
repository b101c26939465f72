//! AES-256-GCM as SPEC §5 stores it: `nonce(12) || ciphertext || tag(16)`,
//! with a fresh random nonce per seal.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use zeroize::Zeroizing;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const KEY_LEN: usize = 32;

/// The sealed value did not authenticate: wrong key, wrong AAD, or the
/// bytes were altered or truncated. Deliberately says nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("AES-256-GCM authentication failed")]
pub struct OpenError;

fn cipher(key: &[u8; KEY_LEN]) -> Aes256Gcm {
    // The cipher wipes its key schedule on drop (aes-gcm's `zeroize`); the
    // key copy it is built from is wiped here.
    let key = Zeroizing::new(Key::<Aes256Gcm>::from(*key));
    Aes256Gcm::new(&key)
}

/// `nonce || AES-256-GCM(key, nonce, plaintext, aad)` with the given nonce
/// (tests pin it; everything else calls [`seal`]).
pub fn seal_with_nonce(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    plaintext: &[u8],
    aad: &[u8],
) -> Vec<u8> {
    let ct = cipher(key)
        .encrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of a short message cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&ct);
    out
}

/// Seal under a fresh random nonce.
pub fn seal(key: &[u8; KEY_LEN], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    seal_with_nonce(key, &nonce, plaintext, aad)
}

/// Open `nonce || ciphertext || tag`; the plaintext is wiped on drop.
pub fn open(
    key: &[u8; KEY_LEN],
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(OpenError);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
    cipher(key)
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| OpenError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_tamper_fails() {
        let key = [7u8; 32];
        let sealed = seal(&key, b"dek bytes", b"aad");
        assert_eq!(sealed.len(), NONCE_LEN + 9 + TAG_LEN);
        assert_eq!(&open(&key, &sealed, b"aad").unwrap()[..], b"dek bytes");
        assert_eq!(open(&key, &sealed, b"aae"), Err(OpenError));
        assert_eq!(open(&[8u8; 32], &sealed, b"aad"), Err(OpenError));
        assert_eq!(
            open(&key, &sealed[..sealed.len() - 1], b"aad"),
            Err(OpenError)
        );
        assert_eq!(open(&key, &sealed[..20], b"aad"), Err(OpenError));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(open(&key, &bad, b"aad"), Err(OpenError), "flip at {i}");
        }
    }
}
