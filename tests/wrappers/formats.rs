//! The wrapper formats (SPEC §5.1, §5.2): committed vectors re-derived by
//! pyca, X-Wing against its draft and RustCrypto, tampering, layer choice,
//! legacy wraps pyca made.

use serde_json::{Value, json};

use pqmig::crypto::kem::{self, Kem, KemKeyPair};
use pqmig::crypto::wrap::{self, WrapError};
use pqmig::scope::wrappers::policy::{LayerSelection, choose_layers};

use crate::support::wrappers::{WrapFx, wrap_check};
use crate::support::{b64, unb64, unhex};

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/wrap_vectors.json"
);

const XWING_DRAFT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/xwing_draft.json"
);

/// Deterministic bytes for the vectors.
fn fill(tag: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| tag.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

/// The committed vectors, computed from fixed seeds, randomness and nonces.
fn vectors() -> Value {
    let uuid = "3f1c2b9a-7d4e-4c1b-9a8f-0e2d4c6b8a10";
    let dek = fill(1, 32);
    let kek = fill(2, 32);
    let nonce: [u8; 12] = fill(3, 12).try_into().unwrap();
    let aes = wrap::seal_legacy_aes_with(&kek.clone().try_into().unwrap(), &nonce, uuid, &dek);
    let recipient: [u8; 32] = fill(4, 32).try_into().unwrap();
    let eph: [u8; 32] = fill(5, 32).try_into().unwrap();
    let x =
        wrap::seal_legacy_x25519_with(&wrap::x25519_public(&recipient), uuid, &dek, &eph, &nonce);

    let mut v1 = Vec::new();
    for (tag, algs) in [
        (10u8, vec![Kem::MlKem768]),
        (20, vec![Kem::MlKem768, Kem::MlKem1024]),
    ] {
        let seeds: Vec<Vec<u8>> = (0..algs.len()).map(|j| fill(tag + j as u8, 64)).collect();
        let pairs: Vec<KemKeyPair> = algs
            .iter()
            .zip(&seeds)
            .map(|(k, s)| KemKeyPair::from_seed(*k, s).unwrap())
            .collect();
        let randomness: Vec<Vec<u8>> = (0..algs.len())
            .map(|j| fill(tag + 5 + j as u8, 32))
            .collect();
        let aad_obj = json!({"wrapper_uuid": uuid, "wrap_version": "2", "tenant": "ünïcode"});
        let aad = wrap::canonical_json(&aad_obj);
        let layers: Vec<(Kem, &[u8])> = pairs.iter().map(|p| (p.kem(), p.public_key())).collect();
        let r: Vec<&[u8]> = randomness.iter().map(Vec::as_slice).collect();
        let s = wrap::seal_v1_with(uuid, &aad, &dek, &layers, &r, &nonce).unwrap();
        v1.push(json!({
            "uuid": uuid, "dek": b64(&dek), "aad": aad_obj,
            "aad_bytes": String::from_utf8(aad).unwrap(),
            "kc": b64(&s.commitment), "wrap": b64(&s.wrap),
            "layers": algs.iter().zip(&seeds).zip(&pairs).zip(&randomness).zip(&s.ciphertexts)
                .map(|((((k, seed), p), r), ct)| json!({
                    "alg": k.alias(), "seed": b64(seed), "public_key": b64(p.public_key()),
                    "randomness": b64(r), "ct": b64(ct)}))
                .collect::<Vec<_>>(),
        }));
    }
    json!({
        "legacy_aes_gcm": [{"uuid": uuid, "kek": b64(&kek), "nonce": b64(&nonce), "dek": b64(&dek), "wrap": b64(&aes)}],
        "legacy_x25519": [{"uuid": uuid, "recipient_secret": b64(&recipient), "eph_secret": b64(&eph),
                           "nonce": b64(&nonce), "dek": b64(&dek), "wrap": b64(&x)}],
        "pqmig_wrap_v1": v1,
    })
}

#[test]
fn formats_match_the_committed_vectors_and_pyca_rederives_them() {
    let now = vectors();
    if std::env::var_os("PQMIG_WRITE_VECTORS").is_some() {
        std::fs::write(VECTORS, serde_json::to_string_pretty(&now).unwrap() + "\n").unwrap();
    }
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(VECTORS).expect("committed vectors"))
            .unwrap();
    assert_eq!(now, committed, "the formats changed: SPEC §5 pins them");
    let out = wrap_check(&["check-vectors", VECTORS], "");
    assert_eq!(out.trim(), "ok 4 vectors");
    // and pqmig opens every one of them
    let dek = unb64(&committed["legacy_aes_gcm"][0]["dek"]);
    let v = &committed["legacy_aes_gcm"][0];
    let kek: [u8; 32] = unb64(&v["kek"]).try_into().unwrap();
    let uuid = v["uuid"].as_str().unwrap();
    assert_eq!(
        &wrap::open_legacy_aes(&kek, uuid, &unb64(&v["wrap"])).unwrap()[..],
        &dek[..]
    );
    let v = &committed["legacy_x25519"][0];
    let sk: [u8; 32] = unb64(&v["recipient_secret"]).try_into().unwrap();
    assert_eq!(
        &wrap::open_legacy_x25519(&sk, uuid, &unb64(&v["wrap"])).unwrap()[..],
        &dek[..]
    );
}

#[test]
fn unpacked_keys_encapsulate_exactly_as_the_encoded_keys() {
    for (i, kem) in [Kem::MlKem768, Kem::MlKem1024, Kem::XWing]
        .into_iter()
        .enumerate()
    {
        let pair = KemKeyPair::from_seed(kem, &fill(70 + i as u8, kem.seed_len())).unwrap();
        for j in 0..4u8 {
            let r: [u8; 64] = fill(80 + j, 64).try_into().unwrap();
            let n = if kem == Kem::XWing { 64 } else { 32 };
            let (ct, ss) = kem::encapsulate_with(kem, pair.public_key(), &r[..n]).unwrap();
            let (ct2, ss2) = pair.encapsulate_with(&r);
            assert_eq!((ct.clone(), &ss[..]), (ct2, &ss2[..]), "{kem:?}");
            assert_eq!(&pair.decapsulate(&ct).unwrap()[..], &ss[..]);
        }
    }
}

#[test]
fn xwing_matches_the_draft_vectors_and_rustcrypto() {
    let doc: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(XWING_DRAFT).unwrap()).unwrap();
    assert!(doc.len() >= 3);
    for v in &doc {
        let h = |k: &str| unhex(v[k].as_str().unwrap());
        let pair = KemKeyPair::from_seed(Kem::XWing, &h("sk")).unwrap();
        assert_eq!(pair.public_key(), &h("pk")[..]);
        let (ct, ss) = kem::encapsulate_with(Kem::XWing, &h("pk"), &h("eseed")).unwrap();
        assert_eq!(ct, h("ct"));
        assert_eq!(&ss[..], &h("ss")[..]);
        assert_eq!(&pair.decapsulate(&h("ct")).unwrap()[..], &h("ss")[..]);
    }
    // Fresh keys and randomness: ours and RustCrypto's agree both ways.
    use x_wing::{Decapsulate, Decapsulator, KeyExport};
    for i in 0..8u8 {
        let seed: [u8; 32] = fill(40 + i, 32).try_into().unwrap();
        let ours = KemKeyPair::from_seed(Kem::XWing, &seed).unwrap();
        let theirs = x_wing::DecapsulationKey::from(seed);
        assert_eq!(
            ours.public_key(),
            &theirs.encapsulation_key().to_bytes()[..]
        );
        let r: [u8; 64] = fill(60 + i, 64).try_into().unwrap();
        let (ct, ss) = kem::encapsulate_with(Kem::XWing, ours.public_key(), &r).unwrap();
        let (ct2, ss2) = theirs
            .encapsulation_key()
            .encapsulate_deterministic(&r.into());
        assert_eq!(ct, &ct2[..]);
        assert_eq!(&ss[..], &ss2[..]);
        assert_eq!(
            &theirs.decapsulate(&ct2)[..],
            &ours.decapsulate(&ct).unwrap()[..]
        );
    }
}

/// One v1 wrap with two layers, and everything needed to open it.
struct Sealed {
    pairs: Vec<KemKeyPair>,
    s: wrap::SealedV1,
    aad: Vec<u8>,
    uuid: &'static str,
}

fn seal_two(tag: u8, uuid: &'static str) -> Sealed {
    let pairs: Vec<KemKeyPair> = [Kem::MlKem768, Kem::XWing]
        .iter()
        .enumerate()
        .map(|(j, k)| KemKeyPair::from_seed(*k, &fill(tag + j as u8, k.seed_len())).unwrap())
        .collect();
    let aad = wrap::canonical_json(&json!({"wrapper_uuid": uuid, "wrap_version": "2"}));
    let layers: Vec<(Kem, &[u8])> = pairs.iter().map(|p| (p.kem(), p.public_key())).collect();
    let s = wrap::seal_v1(uuid, &aad, &[7u8; 32], &layers).unwrap();
    Sealed {
        pairs,
        s,
        aad,
        uuid,
    }
}

impl Sealed {
    fn open(&self, cts: &[&[u8]], aad: &[u8], kc: &[u8], w: &[u8]) -> Result<Vec<u8>, WrapError> {
        let layers: Vec<(&KemKeyPair, &[u8])> =
            self.pairs.iter().zip(cts.iter().copied()).collect();
        wrap::open_v1(self.uuid, aad, &layers, kc, w).map(|d| d.to_vec())
    }
}

#[test]
fn tampered_wraps_never_open() {
    let a = seal_two(1, "00000000-0000-4000-8000-000000000001");
    let b = seal_two(1, "00000000-0000-4000-8000-000000000002");
    let (ct0, ct1) = (&a.s.ciphertexts[0][..], &a.s.ciphertexts[1][..]);
    assert_eq!(
        a.open(&[ct0, ct1], &a.aad, &a.s.commitment, &a.s.wrap)
            .unwrap(),
        [7u8; 32]
    );
    // wrong AAD
    let other = wrap::canonical_json(&json!({"wrapper_uuid": a.uuid, "wrap_version": "3"}));
    assert_eq!(
        a.open(&[ct0, ct1], &other, &a.s.commitment, &a.s.wrap),
        Err(WrapError::Commitment)
    );
    // a layer swapped in from another wrapper (same keys)
    let foreign = &b.s.ciphertexts[1][..];
    assert_eq!(
        a.open(&[ct0, foreign], &a.aad, &a.s.commitment, &a.s.wrap),
        Err(WrapError::Commitment)
    );
    // layers in the other order (each key gets the other's ciphertext)
    assert!(
        a.open(&[ct1, ct0], &a.aad, &a.s.commitment, &a.s.wrap)
            .is_err()
    );
    // a truncated KEM ciphertext
    assert!(matches!(
        a.open(
            &[&ct0[..ct0.len() - 1], ct1],
            &a.aad,
            &a.s.commitment,
            &a.s.wrap
        ),
        Err(WrapError::Format(_))
    ));
    // a truncated or altered wrap
    let w = &a.s.wrap;
    assert_eq!(
        a.open(&[ct0, ct1], &a.aad, &a.s.commitment, &w[..w.len() - 1]),
        Err(WrapError::Auth)
    );
    let mut flipped = w.clone();
    flipped[20] ^= 0x80;
    assert_eq!(
        a.open(&[ct0, ct1], &a.aad, &a.s.commitment, &flipped),
        Err(WrapError::Auth)
    );
    // a flipped commitment bit
    let mut kc = a.s.commitment;
    kc[31] ^= 1;
    assert_eq!(
        a.open(&[ct0, ct1], &a.aad, &kc, &a.s.wrap),
        Err(WrapError::Commitment)
    );
    // a layer removed
    let one = [(&a.pairs[0], ct0)];
    assert_eq!(
        wrap::open_v1(a.uuid, &a.aad, &one, &a.s.commitment, &a.s.wrap).map(|d| d.to_vec()),
        Err(WrapError::Commitment)
    );
    // the other wrapper's commitment and wrap with these layers
    assert!(
        a.open(&[ct0, ct1], &a.aad, &b.s.commitment, &b.s.wrap)
            .is_err()
    );
}

#[test]
fn layer_selection_modes_and_edges() {
    let mut rng = rand::rng();
    let w = [1, 1, 1, 1];
    let uuid = "00000000-0000-4000-8000-00000000000a";
    // defined: the first min(max_layers, count), in preference order
    assert_eq!(
        choose_layers(LayerSelection::Defined, &w, 1, 3, 7, uuid, &mut rng),
        vec![0, 1, 2]
    );
    assert_eq!(
        choose_layers(LayerSelection::Defined, &w, 2, 9, 7, uuid, &mut rng),
        vec![0, 1, 2, 3]
    );
    assert_eq!(
        choose_layers(LayerSelection::Defined, &w[..1], 1, 1, 7, uuid, &mut rng),
        vec![0]
    );
    // round_robin: min_layers from wrapper_id mod count, wrapping around
    assert_eq!(
        choose_layers(LayerSelection::RoundRobin, &w, 2, 3, 7, uuid, &mut rng),
        vec![3, 0]
    );
    assert_eq!(
        choose_layers(LayerSelection::RoundRobin, &w, 1, 3, 8, uuid, &mut rng),
        vec![0]
    );
    assert_eq!(
        choose_layers(LayerSelection::RoundRobin, &w, 4, 4, 5, uuid, &mut rng),
        vec![1, 2, 3, 0]
    );
    // hash_mod: the offset is SHA-256(uuid)[0..8] mod count, not the id
    use sha2::Digest;
    let h = sha2::Sha256::digest(uuid.as_bytes());
    let off = (u64::from_be_bytes(h[..8].try_into().unwrap()) % 4) as usize;
    for id in [1, 2, 3] {
        assert_eq!(
            choose_layers(LayerSelection::HashMod, &w, 2, 3, id, uuid, &mut rng),
            vec![off, (off + 1) % 4]
        );
    }
    // random: min_layers distinct keys, by weight; weight 0 is never drawn
    let weights = [1, 0, 3, 1];
    let mut seen = [0usize; 4];
    for _ in 0..2000 {
        let pick = choose_layers(LayerSelection::Random, &weights, 2, 3, 1, uuid, &mut rng);
        assert_eq!(pick.len(), 2);
        assert_ne!(pick[0], pick[1]);
        for i in pick {
            seen[i] += 1;
        }
    }
    assert_eq!(seen[1], 0, "{seen:?}");
    // key 2 (weight 3) is drawn first far more often than keys 0 and 3
    assert!(seen[2] > seen[0] && seen[2] > seen[3], "{seen:?}");
    let one = choose_layers(LayerSelection::Random, &weights, 3, 3, 1, uuid, &mut rng);
    let mut sorted = one.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pqmig_opens_legacy_wraps_pyca_made() {
    let w = WrapFx::new(0, Kem::MlKem768, 1).await;
    let key = |r: &str| {
        w.keys
            .0
            .iter()
            .find(|k| k.key_ref == r)
            .unwrap()
            .secret
            .clone()
    };
    let (aes, x) = (key("local:kek-a"), key("local:ecies"));
    let uuids: Vec<String> = (0..20).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let deks: Vec<Vec<u8>> = (0..20).map(|i| fill(100 + i as u8, 32)).collect();
    let req = json!({"aes_key": b64(&aes), "x25519_secret": b64(&x), "uuids": uuids,
                     "deks": deks.iter().map(|d| b64(d)).collect::<Vec<_>>()});
    let made: Vec<Value> =
        serde_json::from_str(&wrap_check(&["make-legacy"], &req.to_string())).unwrap();
    let aes: [u8; 32] = aes[..].try_into().unwrap();
    let x: [u8; 32] = x[..].try_into().unwrap();
    for (m, dek) in made.iter().zip(&deks) {
        let uuid = m["uuid"].as_str().unwrap();
        assert_eq!(
            &wrap::open_legacy_aes(&aes, uuid, &unb64(&m["aes"])).unwrap()[..],
            &dek[..]
        );
        assert_eq!(
            &wrap::open_legacy_x25519(&x, uuid, &unb64(&m["x25519"])).unwrap()[..],
            &dek[..]
        );
        // bound to the uuid
        assert!(
            wrap::open_legacy_aes(&aes, &uuids[0].replace('-', "_"), &unb64(&m["aes"])).is_err()
        );
    }
}
