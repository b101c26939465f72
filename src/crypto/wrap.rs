//! Data-encryption-key wrappers (SPEC §5.1, §5.2): the two legacy input
//! formats and `pqmig-wrap-v1`, built only from maintained primitives
//! (AES-256-GCM, HKDF, SHA-2, X25519, the KEMs of [`super::kem`]).

use hkdf::Hkdf;
use serde_json::Value;
use sha2::{Digest, Sha256, Sha384};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::aead::{self, KEY_LEN, NONCE_LEN};
use super::kem::{self, Kem, KemKeyPair};

pub const FORMAT_V1: &str = "pqmig-wrap-v1";
pub const FORMAT_LEGACY_AES: &str = "legacy-aes-gcm";
pub const FORMAT_LEGACY_X25519: &str = "legacy-x25519";
/// A DEK AWS KMS encrypted (`Encrypt` or `GenerateDataKey`): the
/// ciphertext blob as KMS returned it, opened by KMS `Decrypt` with the
/// encryption context [`AWS_KMS_CONTEXT_KEY`] = uuid (SPEC §5.1).
pub const FORMAT_LEGACY_AWS_KMS: &str = "legacy-aws-kms";
/// The encryption-context key of a `legacy-aws-kms` wrap.
pub const AWS_KMS_CONTEXT_KEY: &str = "pqmig:wrapper_uuid";
/// A DEK Vault or OpenBao transit encrypted: the ciphertext text
/// (`vault:vN:<base64>`) as UTF-8 bytes, made by transit `encrypt` of the
/// DEK under an `aes256-gcm96` key with `associated_data` = uuid; opened
/// by transit `decrypt` (README "Key providers").
pub const FORMAT_LEGACY_VAULT: &str = "legacy-vault-transit";
pub const DEK_LEN: usize = 32;
const LEGACY_X25519_INFO: &[u8] = b"pqmig-legacy-x25519";

/// Why a wrap did not open. `Auth` and `Commitment` are failed
/// authentication of stored data (an `integrity` item failure); `Format`
/// is malformed input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WrapError {
    #[error("AES-256-GCM authentication failed")]
    Auth,
    #[error("key commitment does not match")]
    Commitment,
    #[error("{0}")]
    Format(String),
}

impl From<aead::OpenError> for WrapError {
    fn from(_: aead::OpenError) -> Self {
        WrapError::Auth
    }
}

impl From<kem::KemError> for WrapError {
    fn from(e: kem::KemError) -> Self {
        WrapError::Format(e.0)
    }
}

/// The wrapper uuid as SPEC §5 uses it: its 36-character hyphenated text
/// in lowercase. Upper-case hex is normalised (the same uuid); anything
/// else (wrong length, no hyphens, braces, blank-padding of a shorter
/// CHAR(36) value) is refused, so the HKDF salt and the AAD are the same
/// bytes in every implementation.
pub fn canonical_uuid(uuid: &str) -> Result<String, String> {
    let b = uuid.as_bytes();
    let ok = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(uuid.to_ascii_lowercase())
    } else {
        Err(format!(
            "wrapper_uuid {:?} is not a 36-character hyphenated uuid",
            uuid.chars().take(40).collect::<String>()
        ))
    }
}

/// Canonical JSON (SPEC §5.2): object keys sorted by their UTF-8 bytes at
/// every depth, no whitespace, strings and numbers as serde_json writes
/// them. Written here rather than relying on `serde_json::Map`'s order,
/// which a `preserve_order` feature anywhere in the tree would change.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    fn write(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(serde_json::to_vec(k).expect("a string serialises"));
                    out.push(b':');
                    write(&map[k], out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out);
                }
                out.push(b']');
            }
            scalar => out.extend(serde_json::to_vec(scalar).expect("a scalar serialises")),
        }
    }
    let mut out = Vec::new();
    write(v, &mut out);
    out
}

/// KEK and key commitment of a v1 wrap:
/// HKDF-SHA-384(salt = uuid, ikm = ss_1 || … || ss_n,
/// info = "pqmig-wrap-v1" || 0x00 || SHA-384(ct_1 || … || ct_n) || aad, L = 64).
pub fn derive_v1<C: AsRef<[u8]>>(
    uuid: &str,
    shared: &[Zeroizing<[u8; 32]>],
    ciphertexts: &[C],
    aad: &[u8],
) -> (Zeroizing<[u8; KEY_LEN]>, [u8; 32]) {
    let mut transcript = Sha384::new();
    for ct in ciphertexts {
        transcript.update(ct.as_ref());
    }
    let transcript = transcript.finalize();
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * shared.len()));
    for ss in shared {
        ikm.extend_from_slice(&ss[..]);
    }
    let mut info = Vec::with_capacity(FORMAT_V1.len() + 1 + transcript.len() + aad.len());
    info.extend_from_slice(FORMAT_V1.as_bytes());
    info.push(0);
    info.extend_from_slice(&transcript);
    info.extend_from_slice(aad);
    let mut okm = Zeroizing::new([0u8; 64]);
    Hkdf::<Sha384>::new(Some(uuid.as_bytes()), &ikm)
        .expand(&info, &mut okm[..])
        .expect("64 bytes is a valid HKDF-SHA-384 length");
    let mut kek = Zeroizing::new([0u8; KEY_LEN]);
    kek.copy_from_slice(&okm[..32]);
    let kc: [u8; 32] = okm[32..].try_into().expect("32 bytes");
    (kek, kc)
}

/// A new v1 wrap: one KEM ciphertext per layer, the commitment for
/// `crypto_suite.kc`, and `dek_wrap1`.
#[derive(Debug, Clone)]
pub struct SealedV1 {
    pub ciphertexts: Vec<Vec<u8>>,
    pub commitment: [u8; 32],
    pub wrap: Vec<u8>,
}

/// Build a v1 wrap of `dek` to the layers' public keys with fresh randomness.
pub fn seal_v1(
    uuid: &str,
    aad: &[u8],
    dek: &[u8],
    layers: &[(Kem, &[u8])],
) -> Result<SealedV1, WrapError> {
    let mut ciphertexts = Vec::with_capacity(layers.len());
    let mut shared = Vec::with_capacity(layers.len());
    for (k, pk) in layers {
        let (ct, ss) = kem::encapsulate(*k, pk)?;
        ciphertexts.push(ct);
        shared.push(ss);
    }
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    Ok(finish_v1(uuid, aad, dek, ciphertexts, &shared, &nonce))
}

/// [`seal_v1`] with each layer's encapsulation done already (the wrappers
/// scope's layer keys: through libcrux's faster unpacked keys, or to a
/// token key's public key): its ciphertext and shared secret, in layer
/// order; a fresh nonce.
pub fn seal_v1_shared(
    uuid: &str,
    aad: &[u8],
    dek: &[u8],
    ciphertexts: Vec<Vec<u8>>,
    shared: &[Zeroizing<[u8; 32]>],
) -> SealedV1 {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    finish_v1(uuid, aad, dek, ciphertexts, shared, &nonce)
}

/// [`seal_v1`] with explicit KEM randomness (one per layer) and nonce: for
/// the committed test vectors only.
pub fn seal_v1_with(
    uuid: &str,
    aad: &[u8],
    dek: &[u8],
    layers: &[(Kem, &[u8])],
    randomness: &[&[u8]],
    nonce: &[u8; NONCE_LEN],
) -> Result<SealedV1, WrapError> {
    if randomness.len() != layers.len() {
        return Err(WrapError::Format("one randomness per layer".into()));
    }
    let mut ciphertexts = Vec::with_capacity(layers.len());
    let mut shared = Vec::with_capacity(layers.len());
    for ((k, pk), r) in layers.iter().zip(randomness) {
        let (ct, ss) = kem::encapsulate_with(*k, pk, r)?;
        ciphertexts.push(ct);
        shared.push(ss);
    }
    Ok(finish_v1(uuid, aad, dek, ciphertexts, &shared, nonce))
}

fn finish_v1(
    uuid: &str,
    aad: &[u8],
    dek: &[u8],
    ciphertexts: Vec<Vec<u8>>,
    shared: &[Zeroizing<[u8; 32]>],
    nonce: &[u8; NONCE_LEN],
) -> SealedV1 {
    let (kek, commitment) = derive_v1(uuid, shared, &ciphertexts, aad);
    let wrap = aead::seal_with_nonce(&kek, nonce, dek, aad);
    SealedV1 {
        ciphertexts,
        commitment,
        wrap,
    }
}

/// Open a v1 wrap with one decapsulation key per layer, in layer order.
/// The commitment is checked (in constant time) before the AEAD is opened.
pub fn open_v1(
    uuid: &str,
    aad: &[u8],
    layers: &[(&KemKeyPair, &[u8])],
    commitment: &[u8],
    wrap: &[u8],
) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    if layers.is_empty() {
        return Err(WrapError::Format(
            "a pqmig-wrap-v1 wrapper has no layers".into(),
        ));
    }
    let mut shared = Vec::with_capacity(layers.len());
    let mut ciphertexts = Vec::with_capacity(layers.len());
    for (key, ct) in layers {
        shared.push(key.decapsulate(ct)?);
        ciphertexts.push(*ct);
    }
    open_v1_shared(uuid, aad, &shared, &ciphertexts, commitment, wrap)
}

/// [`open_v1`] with each layer's shared secret already decapsulated
/// (by a key in a token), in layer order beside its ciphertext.
pub fn open_v1_shared(
    uuid: &str,
    aad: &[u8],
    shared: &[Zeroizing<[u8; 32]>],
    ciphertexts: &[&[u8]],
    commitment: &[u8],
    wrap: &[u8],
) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    if shared.is_empty() || shared.len() != ciphertexts.len() {
        return Err(WrapError::Format(
            "a pqmig-wrap-v1 wrapper needs one secret per layer".into(),
        ));
    }
    let (kek, expected) = derive_v1(uuid, shared, ciphertexts, aad);
    if !bool::from(expected.ct_eq(commitment)) {
        return Err(WrapError::Commitment);
    }
    Ok(aead::open(&kek, wrap, aad)?)
}

/// `legacy-aes-gcm`: nonce || AES-256-GCM(KEK, nonce, DEK, aad = uuid).
pub fn open_legacy_aes(
    kek: &[u8; KEY_LEN],
    uuid: &str,
    wrap: &[u8],
) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    Ok(aead::open(kek, wrap, uuid.as_bytes())?)
}

/// Make a `legacy-aes-gcm` wrap (demo, bench and tests seed data with it).
pub fn seal_legacy_aes(kek: &[u8; KEY_LEN], uuid: &str, dek: &[u8]) -> Vec<u8> {
    aead::seal(kek, dek, uuid.as_bytes())
}

/// [`seal_legacy_aes`] with an explicit nonce (test vectors).
pub fn seal_legacy_aes_with(
    kek: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    uuid: &str,
    dek: &[u8],
) -> Vec<u8> {
    aead::seal_with_nonce(kek, nonce, dek, uuid.as_bytes())
}

fn legacy_x25519_key(
    eph_pub: &[u8; 32],
    recipient_pub: &[u8; 32],
    dh: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph_pub);
    salt[32..].copy_from_slice(recipient_pub);
    let mut k = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(&salt), dh)
        .expand(LEGACY_X25519_INFO, &mut k[..])
        .expect("32 bytes is a valid HKDF-SHA-256 length");
    k
}

/// `legacy-x25519`: eph_pub(32) || nonce || AES-256-GCM(k, nonce, DEK, aad
/// = uuid), k = HKDF-SHA-256(salt = eph_pub || recipient_pub, ikm =
/// X25519(eph, recipient_pub), info = "pqmig-legacy-x25519", 32).
pub fn open_legacy_x25519(
    secret: &[u8; 32],
    uuid: &str,
    wrap: &[u8],
) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    let eph_pub = legacy_x25519_eph(wrap).ok_or(WrapError::Auth)?;
    let sk = x25519_dalek::StaticSecret::from(*secret);
    let recipient_pub = x25519_dalek::PublicKey::from(&sk);
    let dh = sk.diffie_hellman(&x25519_dalek::PublicKey::from(*eph_pub));
    open_legacy_x25519_agreed(dh.as_bytes(), recipient_pub.as_bytes(), uuid, wrap)
}

/// The ephemeral public key of a `legacy-x25519` wrap (`None`: too short
/// to be one).
pub fn legacy_x25519_eph(wrap: &[u8]) -> Option<&[u8; 32]> {
    if wrap.len() < 32 + NONCE_LEN + aead::TAG_LEN {
        return None;
    }
    wrap[..32].try_into().ok()
}

/// Whether an X25519 public key contributes to an agreement: a low-order
/// point gives the all-zero shared secret with every (clamped) scalar, so
/// one fixed scalar tells.
pub fn x25519_contributory(public: &[u8; 32]) -> bool {
    x25519_dalek::StaticSecret::from([1u8; 32])
        .diffie_hellman(&x25519_dalek::PublicKey::from(*public))
        .was_contributory()
}

/// An X25519 public key (u-coordinate) in canonical form: bit 255 cleared
/// and reduced mod p = 2^255 - 19, which RFC 7748 does to any input, so
/// the agreement is the same; a token may refuse the other forms.
pub fn x25519_canonical(public: &[u8; 32]) -> [u8; 32] {
    let mut u = *public;
    u[31] &= 0x7f;
    // u >= p exactly when u is p + k, k in 0..=18: 0xed + k, then
    // 0xff bytes, then 0x7f (little-endian).
    if u[31] == 0x7f && u[1..31].iter().all(|b| *b == 0xff) && u[0] >= 0xed {
        let k = u[0] - 0xed;
        u = [0u8; 32];
        u[0] = k;
    }
    u
}

/// Open a `legacy-x25519` wrap with the X25519 shared secret of its
/// ephemeral key and the recipient's key, computed elsewhere (an HSM).
pub fn open_legacy_x25519_agreed(
    shared: &[u8; 32],
    recipient_pub: &[u8; 32],
    uuid: &str,
    wrap: &[u8],
) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    let eph_pub = legacy_x25519_eph(wrap).ok_or(WrapError::Auth)?;
    let k = legacy_x25519_key(eph_pub, recipient_pub, shared);
    Ok(aead::open(&k, &wrap[32..], uuid.as_bytes())?)
}

/// Make a `legacy-x25519` wrap with explicit ephemeral secret and nonce.
pub fn seal_legacy_x25519_with(
    recipient_pub: &[u8; 32],
    uuid: &str,
    dek: &[u8],
    eph_secret: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let eph = x25519_dalek::StaticSecret::from(*eph_secret);
    let eph_pub = x25519_dalek::PublicKey::from(&eph);
    let dh = eph.diffie_hellman(&x25519_dalek::PublicKey::from(*recipient_pub));
    let k = legacy_x25519_key(eph_pub.as_bytes(), recipient_pub, dh.as_bytes());
    let mut out = eph_pub.as_bytes().to_vec();
    out.extend(aead::seal_with_nonce(&k, nonce, dek, uuid.as_bytes()));
    out
}

/// Make a `legacy-x25519` wrap with fresh randomness.
pub fn seal_legacy_x25519(recipient_pub: &[u8; 32], uuid: &str, dek: &[u8]) -> Vec<u8> {
    let mut eph = Zeroizing::new([0u8; 32]);
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut eph[..]);
    rand::fill(&mut nonce);
    seal_legacy_x25519_with(recipient_pub, uuid, dek, &eph, &nonce)
}

/// The X25519 public key of a 32-byte secret.
pub fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
    *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn x25519_canonical_form_gives_the_same_agreement() {
        let scalar = x25519_dalek::StaticSecret::from([0x42u8; 32]);
        let agree = |u: [u8; 32]| {
            *scalar
                .diffie_hellman(&x25519_dalek::PublicKey::from(u))
                .as_bytes()
        };
        let public = x25519_public(&[7u8; 32]);
        assert_eq!(x25519_canonical(&public), public, "already canonical");
        let mut high = public;
        high[31] |= 0x80;
        assert_eq!(x25519_canonical(&high), public);
        assert_eq!(agree(high), agree(public));
        // p + 9 is the base point, 9.
        let mut p9 = [0xffu8; 32];
        p9[0] = 0xed + 9;
        p9[31] = 0x7f;
        let mut nine = [0u8; 32];
        nine[0] = 9;
        assert_eq!(x25519_canonical(&p9), nine);
        assert_eq!(agree(p9), agree(nine));
    }

    #[test]
    fn canonical_uuid_lowercases_and_refuses_other_shapes() {
        let lower = "0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7e";
        assert_eq!(canonical_uuid(lower).unwrap(), lower);
        assert_eq!(canonical_uuid(&lower.to_uppercase()).unwrap(), lower);
        for bad in [
            "",
            "0b5b1c1e4b8e4c8a9d4e2f1c3a5b6d7e",
            "{0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7}",
            "0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7g",
            "0b5b1c1e-4b8e-4c8a-9d4e_2f1c3a5b6d7e",
            "0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7 ",
        ] {
            assert!(canonical_uuid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v = json!({"b": 1, "a": {"z": "x", "é": [1, {"d": null, "c": true}]}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"z":"x","é":[1,{"c":true,"d":null}]},"b":1}"#
        );
    }

    #[test]
    fn v1_round_trip_and_tampering() {
        let a = KemKeyPair::from_seed(Kem::MlKem768, &[1; 64]).unwrap();
        let b = KemKeyPair::from_seed(Kem::XWing, &[2; 32]).unwrap();
        let uuid = "0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7e";
        let dek = [9u8; 32];
        let s = seal_v1(
            uuid,
            b"{}",
            &dek,
            &[
                (Kem::MlKem768, a.public_key()),
                (Kem::XWing, b.public_key()),
            ],
        )
        .unwrap();
        let layers = [(&a, &s.ciphertexts[0][..]), (&b, &s.ciphertexts[1][..])];
        assert_eq!(
            &open_v1(uuid, b"{}", &layers, &s.commitment, &s.wrap).unwrap()[..],
            &dek
        );
        assert_eq!(
            open_v1(uuid, b"{ }", &layers, &s.commitment, &s.wrap),
            Err(WrapError::Commitment)
        );
        let swapped = [(&a, &s.ciphertexts[0][..])];
        assert_eq!(
            open_v1(uuid, b"{}", &swapped, &s.commitment, &s.wrap),
            Err(WrapError::Commitment)
        );
        let mut kc = s.commitment;
        kc[5] ^= 1;
        assert_eq!(
            open_v1(uuid, b"{}", &layers, &kc, &s.wrap),
            Err(WrapError::Commitment)
        );
        // Sealed from encapsulations made before (a token key's public key,
        // or a key pair here): the same format.
        let (cts, shared): (Vec<_>, Vec<_>) =
            [a.encapsulate(), b.encapsulate()].into_iter().unzip();
        let s = seal_v1_shared(uuid, b"{}", &dek, cts, &shared);
        let layers = [(&a, &s.ciphertexts[0][..]), (&b, &s.ciphertexts[1][..])];
        assert_eq!(
            &open_v1(uuid, b"{}", &layers, &s.commitment, &s.wrap).unwrap()[..],
            &dek
        );
    }
}
