//! The wrappers scope: formats pinned by committed vectors and checked
//! against independent implementations (pyca/cryptography on OpenSSL, the
//! X-Wing draft's vectors and RustCrypto's x-wing), tampering, layer
//! selection, and jobs end to end against the real database and daemons.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use pqmig::crypto::kem::{self, Kem, KemKeyPair};
use pqmig::crypto::wrap::{self, WrapError};
use pqmig::db::wrappers::WrapperRow;
use pqmig::sample::{SampleKeys, WrapperSeed};
use pqmig::scope::wrappers::SourceKeys;
use pqmig::scope::wrappers::policy::{LayerSelection, choose_layers};

use crate::engine::InProcess;
use crate::hashes_fixture::{Fixture, terminal, terminate};

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/wrap_vectors.json"
);
const CHECKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/wrap_check.py");
const XWING_DRAFT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/xwing_draft.json"
);

fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

fn unb64(v: &Value) -> Vec<u8> {
    STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("base64")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// pyca/cryptography in the CI venv (made by .ci/setup).
fn python(args: &[&str], stdin: &str) -> String {
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let mut child = Command::new(py)
        .arg(CHECKER)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run .venv/bin/python (bash .ci/setup makes it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "wrap_check.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

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
    let out = python(&["check-vectors", VECTORS], "");
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

/// A database with legacy wrappers, their keys in the fixture's keyring,
/// and a PQ policy.
pub struct WrapFx {
    pub fx: Fixture,
    pub seed: WrapperSeed,
    /// The same keys as the keyring file (for the independent checks).
    pub keys: SampleKeys,
}

impl WrapFx {
    pub async fn new(n: usize, kem: Kem, layers: usize) -> WrapFx {
        let fx = Fixture::new(0).await;
        let mut keys = SampleKeys::default();
        let seed = pqmig::sample::seed_wrappers(
            &fx.db.client().await,
            &mut keys,
            "",
            n,
            kem,
            layers,
            "pq-policy",
        )
        .await
        .expect("seed wrappers");
        std::fs::remove_file(&fx.keyring).expect("replace keyring");
        keys.write(&fx.keyring).expect("keyring");
        WrapFx { fx, seed, keys }
    }

    pub async fn enqueue(&self, policy_id: i64, selection: Value) -> i64 {
        self.fx
            .db
            .client()
            .await
            .query_one(
                "INSERT INTO pq_migration_jobs (scope, target_policy_id, selection) VALUES ('wrappers', $1, $2) RETURNING id",
                &[&policy_id, &selection],
            )
            .await
            .expect("enqueue")
            .get(0)
    }

    /// Every wrapper's DEK, opened through pqmig's reader.
    pub async fn open_all(&self) -> HashMap<i64, Result<Vec<u8>, String>> {
        let c = self.fx.db.client().await;
        let keyring =
            std::sync::Arc::new(pqmig::keys::LocalKeyring::load(&self.fx.keyring).unwrap());
        let keys = SourceKeys::new(keyring);
        let mut out = HashMap::new();
        let mut after = i64::MIN;
        loop {
            let rows = pqmig::db::wrappers::wrappers_all(&c, after, 1000)
                .await
                .unwrap();
            let Some(last) = rows.last() else { break };
            after = last.id;
            let refs: Vec<&WrapperRow> = rows.iter().collect();
            keys.resolve(&c, &refs).await.unwrap();
            for r in &rows {
                out.insert(
                    r.id,
                    keys.recover(r)
                        .map(|d| d.to_vec())
                        .map_err(|(c, m)| format!("{c}: {m}")),
                );
            }
        }
        out
    }

    pub async fn assert_every_dek_intact(&self) {
        let now = self.open_all().await;
        assert_eq!(now.len(), self.seed.deks.len());
        for (id, dek) in &self.seed.deks {
            assert_eq!(now[id].as_deref(), Ok(&dek[..]), "wrapper {id}");
        }
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        self.fx
            .db
            .client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }

    /// pyca/cryptography opens these wrappers (`pqmig-wrap-v1`, as stored,
    /// the uuid as SPEC §5 writes it: lowercase) to these DEKs.
    pub async fn assert_pyca_opens(&self, deks: &[(i64, [u8; 32])]) {
        let c = self.fx.db.client().await;
        let refs: HashMap<i64, String> = c
            .query("SELECT k.id, k.external_key_ref FROM kms_keys k", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let secret = |kid: i64| {
            let r = &refs[&kid];
            let k = self.keys.0.iter().find(|k| &k.key_ref == r).unwrap();
            (k.algorithm, b64(&k.secret))
        };
        let mut items = Vec::new();
        for (wid, dek) in deks {
            let r = c
                .query_one("SELECT lower(wrapper_uuid::text), dek_wrap1, crypto_suite FROM key_wrappers WHERE id = $1", &[wid])
                .await
                .unwrap();
            let layers = c
                .query("SELECT kms_key_id, kem_ciphertext, aad FROM key_wrapper_layers WHERE key_wrapper_id = $1 ORDER BY layer_no", &[wid])
                .await
                .unwrap();
            let suite: Value = r.get(2);
            let aad: Value = layers[0].get(2);
            items.push(json!({
                "uuid": r.get::<_, String>(0), "wrap": b64(&r.get::<_, Vec<u8>>(1)), "kc": suite["kc"],
                "aad": aad, "dek": b64(dek),
                "layers": layers.iter().map(|l| {
                    let (alg, seed) = secret(l.get(0));
                    json!({"alg": alg, "seed": seed, "ct": b64(&l.get::<_, Vec<u8>>(1))})
                }).collect::<Vec<_>>(),
            }));
        }
        let out = python(&["open-v1"], &serde_json::to_string(&items).unwrap());
        assert_eq!(out.trim(), format!("ok {} wrappers", items.len()));
    }

    /// Rows as stored, for byte comparisons.
    pub async fn snapshot(&self) -> Vec<String> {
        let c = self.fx.db.client().await;
        let rows = c
            .query(
                "SELECT (SELECT to_jsonb(w) FROM key_wrappers w WHERE w.id = x.id)::text || \
                        COALESCE((SELECT jsonb_agg(to_jsonb(l) ORDER BY layer_no)::text FROM key_wrapper_layers l WHERE l.key_wrapper_id = x.id), '') \
                 FROM key_wrappers x ORDER BY x.id",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrappers_job_rewraps_both_formats_once_and_pyca_opens_the_result() {
    let w = WrapFx::new(240, Kem::MlKem768, 2).await;
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w.enqueue(w.seed.policy_id, json!({"batch_size": 50})).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!((j.processed, j.failed, j.total), (240, 0, Some(240)));
    assert_eq!(j.result.as_ref().unwrap()["migrated"], 240);
    w.assert_every_dek_intact().await;
    assert_eq!(w.scalar("SELECT count(*) FROM key_wrappers WHERE crypto_suite->>'format' = 'pqmig-wrap-v1' AND wrap_version = 2 AND dek_wrap2 = ''::bytea AND (crypto_suite->>'layers')::int = 2").await, 240);
    assert_eq!(
        w.scalar("SELECT count(*) FROM key_wrapper_layers").await,
        480
    );
    assert_eq!(
        w.scalar(&format!(
            "SELECT count(*) FROM pq_migration_backups WHERE job_id = {id}"
        ))
        .await,
        240
    );

    // pyca opens a sample of what pqmig wrote, from the rows as stored.
    let sample: Vec<(i64, [u8; 32])> = w.seed.deks.iter().step_by(20).copied().collect();
    w.assert_pyca_opens(&sample).await;

    // Re-running: nothing is wrapped twice, no version moves.
    let before = w.snapshot().await;
    let again = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(again, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.result.as_ref().unwrap()["skipped"], 240);
    assert_eq!(j.result.as_ref().unwrap()["migrated"], 0);
    assert_eq!(w.snapshot().await, before);
    daemon.stop().await;
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
        serde_json::from_str(&python(&["make-legacy"], &req.to_string())).unwrap();
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

impl WrapFx {
    fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.fx.db.url.clone()),
            (
                "PQMIG_KEYRING".into(),
                self.fx.keyring.display().to_string(),
            ),
        ]
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let env = self.cli_env();
        let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        crate::common::run(args, &envs)
    }

    /// A second policy over `n` fresh `kem` keys, registered and in the keyring.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_policy(
        &mut self,
        name: &str,
        kem: Kem,
        n: usize,
        mode: &str,
        min: i16,
        max: i16,
        template: Option<Value>,
    ) -> i64 {
        let c = self.fx.db.client().await;
        let mut ids = Vec::new();
        for j in 0..n {
            let r = format!("local:{name}-{j}");
            self.keys.generate(&r, kem.alias(), kem.seed_len());
            ids.push(
                pqmig::db::kms::kms_key_register(&c, &r, "wrap", kem.alias())
                    .await
                    .unwrap(),
            );
        }
        std::fs::remove_file(&self.fx.keyring).unwrap();
        self.keys.write(&self.fx.keyring).unwrap();
        let id = pqmig::sample::policy_create(&c, name, mode, min, max, kem.alias(), &ids)
            .await
            .unwrap();
        c.execute(
            "UPDATE encryption_policies SET aad_template = $2 WHERE id = $1",
            &[&id, &template],
        )
        .await
        .unwrap();
        id
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_jobs_fail_before_touching_any_wrapper() {
    let mut w = WrapFx::new(20, Kem::MlKem768, 1).await;
    let before = w.snapshot().await;
    let c = w.fx.db.client().await;
    let bad_template = w
        .add_policy(
            "bad-aad",
            Kem::MlKem768,
            1,
            "defined",
            1,
            1,
            Some(json!({"t": "{tenant_id}"})),
        )
        .await;
    let too_few = w
        .add_policy("too-few", Kem::MlKem768, 2, "round_robin", 3, 3, None)
        .await;
    let wrong_algo_keys = w
        .add_policy("xwing-keys", Kem::XWing, 2, "defined", 1, 2, None)
        .await;
    // the X-Wing policy's keys do not match an ML-KEM-1024 target
    let mlkem1024: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'ML-KEM-1024'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let x25519: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'X25519'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mlkem512: i64 = c
        .query_one(
            "SELECT algo_id FROM crypto_standard_aliases WHERE alias = 'ML-KEM-512'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let p = w.seed.policy_id;
    let jobs: Vec<(i64, &str)> = vec![
        (
            w.enqueue(bad_template, json!({})).await,
            "unknown placeholder {tenant_id}",
        ),
        (
            w.enqueue(too_few, json!({})).await,
            "has 2 usable ML-KEM-768 keys",
        ),
        (
            w.enqueue(p, json!({"formats": ["pgp"]})).await,
            "selection.formats[0]",
        ),
        (
            w.enqueue(p, json!({"status": "active"})).await,
            "selection.status: expected an array",
        ),
    ];
    let mut jobs = jobs;
    let no_policy: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope) VALUES ('wrappers') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    jobs.push((no_policy, "target_policy_id is required"));
    for (algo, want) in [
        (mlkem1024, "has 0 usable ML-KEM-1024 keys"),
        (x25519, "is not post-quantum"),
        (mlkem512, "not supported for wrapping"),
    ] {
        let id: i64 = c
            .query_one(
                "INSERT INTO pq_migration_jobs (scope, target_policy_id, target_algo_id) VALUES ('wrappers', $1, $2) RETURNING id",
                &[&wrong_algo_keys, &algo],
            )
            .await
            .unwrap()
            .get(0);
        jobs.push((id, want));
    }
    let daemon = InProcess::start(&w.fx, &[]).await;
    for (id, want) in jobs {
        let j = w.fx.wait_job(id, 30, terminal).await;
        assert_eq!(j.status, "failed", "job {id}: {j:?}");
        let err = j.error.unwrap_or_default();
        assert!(err.contains(want), "job {id}: {err:?} should say {want:?}");
        assert!(!err.contains('\n'));
        assert_eq!(j.processed + j.failed, 0);
    }
    daemon.stop().await;
    assert_eq!(w.snapshot().await, before);
    assert_eq!(
        w.scalar("SELECT count(*) FROM pq_migration_backups").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_wrappers_are_item_failures_and_the_rest_migrate() {
    let w = WrapFx::new(30, Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let ids: Vec<i64> = w.seed.deks.iter().map(|(id, _)| *id).collect();
    // 1: both AES wraps tampered (integrity); 2: x25519 wrap truncated
    // (integrity); 3: its key is not in the keyring (data); 4: no wraps
    // at all (data); 5: kms2 alone still opens it, kms1's wrap is
    // tampered (integrity: both wraps are checked); 6: both open, to
    // different DEKs (integrity).
    c.execute("UPDATE key_wrappers SET dek_wrap1 = set_byte(dek_wrap1, 20, get_byte(dek_wrap1, 20) # 1), dek_wrap2 = set_byte(dek_wrap2, 13, get_byte(dek_wrap2, 13) # 1) WHERE id = $1", &[&ids[0]]).await.unwrap();
    c.execute(
        "UPDATE key_wrappers SET dek_wrap1 = substring(dek_wrap1 FROM 1 FOR 40) WHERE id = $1",
        &[&ids[1]],
    )
    .await
    .unwrap();
    let ghost = pqmig::db::kms::kms_key_register(&c, "local:not-in-keyring", "wrap", "AES-256-GCM")
        .await
        .unwrap();
    c.execute("UPDATE key_wrappers SET kms1_key_id = $2, kms2_key_id = NULL, dek_wrap2 = NULL WHERE id = $1", &[&ids[2], &ghost]).await.unwrap();
    c.execute(
        "UPDATE key_wrappers SET dek_wrap1 = NULL, dek_wrap2 = NULL WHERE id = $1",
        &[&ids[4]],
    )
    .await
    .unwrap();
    c.execute("UPDATE key_wrappers SET dek_wrap1 = set_byte(dek_wrap1, 20, get_byte(dek_wrap1, 20) # 1) WHERE id = $1", &[&ids[6]]).await.unwrap();
    let kek_b: [u8; 32] = w
        .keys
        .0
        .iter()
        .find(|k| k.key_ref == "local:kek-b")
        .expect("kek-b")
        .secret[..]
        .try_into()
        .unwrap();
    let uuid: String = c
        .query_one(
            "SELECT wrapper_uuid::text FROM key_wrappers WHERE id = $1",
            &[&ids[8]],
        )
        .await
        .unwrap()
        .get(0);
    let other = pqmig::crypto::wrap::seal_legacy_aes(&kek_b, &uuid, &[7u8; 32]);
    c.execute(
        "UPDATE key_wrappers SET dek_wrap2 = $2 WHERE id = $1",
        &[&ids[8], &other],
    )
    .await
    .unwrap();
    let daemon = InProcess::start(&w.fx, &[]).await;
    let id = w.enqueue(w.seed.policy_id, json!({})).await;
    let j = w.fx.wait_job(id, 60, terminal).await;
    daemon.stop().await;
    assert_eq!(j.status, "failed", "{j:?}");
    assert_eq!(j.error.as_deref(), Some("6 items failed"));
    assert_eq!((j.processed, j.failed), (24, 6));
    let errors: Vec<(String, String)> = c
        .query("SELECT item_id, error_code FROM pq_migration_item_errors WHERE job_id = $1 ORDER BY item_id::bigint", &[&id])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(String, String)> = [
        (0, "integrity"),
        (1, "integrity"),
        (2, "data"),
        (4, "data"),
        (6, "integrity"),
        (8, "integrity"),
    ]
    .iter()
    .map(|(i, code)| (ids[*i].to_string(), code.to_string()))
    .collect();
    assert_eq!(errors, want);
    // the failed ones are untouched legacy wrappers; every other opens to its DEK
    let now = w.open_all().await;
    for (i, (wid, dek)) in w.seed.deks.iter().enumerate() {
        if [0, 1, 2, 4, 6, 8].contains(&i) {
            assert!(now[wid].is_err(), "{i}");
        } else {
            assert_eq!(now[wid].as_deref(), Ok(&dek[..]), "{i}");
        }
    }
    assert_eq!(
        w.scalar(
            "SELECT count(*) FROM key_wrappers WHERE crypto_suite->>'format' = 'pqmig-wrap-v1'"
        )
        .await,
        24
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_to_policy_rewrap_verify_rollback_and_purge() {
    let mut w = WrapFx::new(60, Kem::MlKem768, 1).await;
    let original = w.snapshot().await;
    let template = json!({"id": "{wrapper_id}", "u": "{wrapper_uuid}", "p": "{policy_name}/{policy_id}", "v": "{wrap_version}", "fixed": ["x", "1"]});
    let second = w
        .add_policy("hybrid", Kem::XWing, 3, "round_robin", 2, 3, Some(template))
        .await;
    let daemon = InProcess::start(&w.fx, &[]).await;

    let first = w.enqueue(w.seed.policy_id, json!({})).await;
    assert_eq!(w.fx.wait_job(first, 60, terminal).await.status, "done");
    let after_first = w.snapshot().await;
    let job2 = w.enqueue(second, json!({"batch_size": 7})).await;
    let j = w.fx.wait_job(job2, 60, terminal).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(j.processed, 60);
    w.assert_every_dek_intact().await;
    daemon.stop().await;
    let c = w.fx.db.client().await;
    // the AAD is the rendered template; round_robin gives 2 X-Wing layers
    let r = c
        .query_one(
            "SELECT w.id, w.wrapper_uuid::text, l.aad, w.wrap_version, (SELECT count(*) FROM key_wrapper_layers x WHERE x.key_wrapper_id = w.id) \
             FROM key_wrappers w JOIN key_wrapper_layers l ON l.key_wrapper_id = w.id AND l.layer_no = 1 ORDER BY w.id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (wid, uuid, aad): (i64, String, Value) = (r.get(0), r.get(1), r.get(2));
    assert_eq!(
        aad,
        json!({"id": wid.to_string(), "u": uuid, "p": format!("hybrid/{second}"), "v": "3", "fixed": ["x", "1"]})
    );
    assert_eq!((r.get::<_, i32>(3), r.get::<_, i64>(4)), (3, 2));

    // purge is refused before verify; verify passes for both jobs
    let out = w.cli(&["purge-backups", &job2.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        crate::common::stderr(&out)
    );
    assert!(crate::common::stderr(&out).contains("run `pqmig verify"));
    let out = w.cli(&["verify", &job2.to_string()]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    assert!(crate::common::stdout(&out).contains("60 items verified"));

    // a wrapper altered after the job fails verification
    c.execute("UPDATE key_wrappers SET dek_wrap1 = set_byte(dek_wrap1, 30, get_byte(dek_wrap1, 30) # 4) WHERE id = $1", &[&wid]).await.unwrap();
    let out = w.cli(&["verify", &job2.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        crate::common::stderr(&out).contains("1 of 60 items failed verification"),
        "{}",
        crate::common::stderr(&out)
    );
    c.execute("UPDATE key_wrappers SET dek_wrap1 = set_byte(dek_wrap1, 30, get_byte(dek_wrap1, 30) # 4) WHERE id = $1", &[&wid]).await.unwrap();

    // rollback of job 2 restores exactly the state job 1 left, then job 1's
    // rollback the original legacy rows, byte for byte
    let out = w.cli(&["rollback", &job2.to_string()]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    assert!(crate::common::stdout(&out).contains("restored 60 of 60"));
    assert_eq!(w.snapshot().await, after_first);
    // rolling back twice changes nothing
    let out = w.cli(&["rollback", &job2.to_string()]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    assert!(
        crate::common::stdout(&out).contains("was rolled back already"),
        "{}",
        crate::common::stdout(&out)
    );
    assert_eq!(w.snapshot().await, after_first);
    let out = w.cli(&["rollback", &first.to_string()]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    assert_eq!(w.snapshot().await, original);
    w.assert_every_dek_intact().await;

    // purge deletes only the verified job's backups
    let out = w.cli(&["verify", &first.to_string()]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let out = w.cli(&["purge-backups", &first.to_string()]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    assert!(crate::common::stdout(&out).contains("deleted 60 backups"));
    assert_eq!(
        w.scalar(&format!(
            "SELECT count(*) FROM pq_migration_backups WHERE job_id = {first}"
        ))
        .await,
        0
    );
    assert_eq!(
        w.scalar(&format!(
            "SELECT count(*) FROM pq_migration_backups WHERE job_id = {job2}"
        ))
        .await,
        60
    );
    // unknown job: usage error
    let out = w.cli(&["verify", "987654"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(crate::common::stderr(&out).contains("no job with id 987654"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_migrate_ten_thousand_wrappers_with_every_dek_intact() {
    let w = WrapFx::new(10_000, Kem::MlKem768, 1).await;
    let mut a = w.fx.spawn_daemon("a", &[]);
    let mut b = w.fx.spawn_daemon("b", &[]);
    // two jobs over disjoint halves, one per daemon (they may also share)
    let mid = w.seed.deks[5_000].0;
    let j1 = w.enqueue(w.seed.policy_id, json!({"id_to": mid - 1})).await;
    let j2 = w.enqueue(w.seed.policy_id, json!({"id_from": mid})).await;
    for id in [j1, j2] {
        let j = w.fx.wait_job(id, 120, terminal).await;
        assert_eq!(j.status, "done", "{j:?}");
        assert_eq!((j.processed, j.failed), (5_000, 0));
    }
    terminate(&mut a);
    terminate(&mut b);
    w.assert_every_dek_intact().await;
    assert_eq!(w.scalar("SELECT count(*) FROM key_wrappers WHERE wrap_version = 2 AND crypto_suite->>'format' = 'pqmig-wrap-v1'").await, 10_000);
    assert_eq!(
        w.scalar("SELECT count(*) FROM pq_migration_backups").await,
        10_000
    );
    for name in ["a", "b"] {
        let log = w.fx.log(name);
        for k in &w.keys.0 {
            assert!(
                !log.contains(&b64(&k.secret)),
                "{name}: a secret in the log"
            );
            let hex: String = k.secret.iter().map(|b| format!("{b:02x}")).collect();
            assert!(!log.contains(&hex), "{name}: a secret in the log");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_generate_adds_keys_atomically_and_registers_them() {
    use std::os::unix::fs::PermissionsExt;
    let db = crate::common::TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PQMIG_KEYRING", path.to_str().unwrap()),
    ];
    let out = crate::common::run(
        &[
            "keys",
            "generate",
            "--algorithm",
            "ml-kem-768",
            "--ref",
            "local:pq-a",
            "--register",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let text = crate::common::stdout(&out);
    assert!(
        text.contains("local:pq-a (ML-KEM-768): public key 1184 bytes"),
        "{text}"
    );
    assert!(text.contains("registered as kms_keys id"), "{text}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = crate::common::run(
        &[
            "keys",
            "generate",
            "--algorithm",
            "AES-256-GCM",
            "--ref",
            "local:kek",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let before = std::fs::read(&path).unwrap();
    // refused: a duplicate reference, an unknown algorithm, --register of a pepper
    for (args, want) in [
        (
            vec!["--algorithm", "X-Wing", "--ref", "local:pq-a"],
            "already holds \"local:pq-a\"",
        ),
        (
            vec!["--algorithm", "RSA-2048", "--ref", "local:r"],
            "unknown algorithm \"RSA-2048\"",
        ),
        (
            vec![
                "--algorithm",
                "HMAC-SHA3-256",
                "--ref",
                "local:p",
                "--register",
            ],
            "--register is for wrapping keys",
        ),
    ] {
        let mut a = vec!["keys", "generate"];
        a.extend(args);
        let out = crate::common::run(&a, &env);
        assert_eq!(out.status.code(), Some(2), "{a:?}");
        assert!(
            crate::common::stderr(&out).contains(want),
            "{}",
            crate::common::stderr(&out)
        );
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a refused run leaves the keyring as it was"
    );
    let ring = pqmig::keys::LocalKeyring::load(&path).unwrap();
    let refs: Vec<&str> = ring.entries().map(|(r, _)| r).collect();
    assert_eq!(refs, vec!["local:kek", "local:pq-a"]);
    // the secret never reaches stdout or stderr
    for (_, s) in ring.entries() {
        assert!(!text.contains(&b64(&s.bytes)));
    }
    let c = db.client().await;
    let row = c
        .query_one("SELECT k.algorithm, k.purpose, p.provider FROM kms_keys k JOIN kms_providers p ON p.id = k.provider_id WHERE k.external_key_ref = 'local:pq-a'", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2)
        ),
        ("ML-KEM-768".into(), "wrap".into(), "local".into())
    );
}

/// The application rotates one wrapper and deletes another between the
/// batch's read and its write: the rotation is not lost (the wrapper is
/// re-read under lock and wrapped from its new DEK), the deleted one is
/// no longer an item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_rotation_by_the_application_is_not_lost() {
    use pqmig::scope::ScopeContext;
    let w = WrapFx::new(10, Kem::MlKem768, 1).await;
    let c = w.fx.db.client().await;
    let id = w.enqueue(w.seed.policy_id, json!({})).await;
    let job = pqmig::db::jobs::job_claim(&c, 1, "w")
        .await
        .unwrap()
        .remove(0);
    assert_eq!(job.lease.job_id, id);
    let ctx = ScopeContext {
        keyring: Some(w.fx.keyring.clone()),
    };
    let spec = job.spec.as_ref().expect("a readable job");
    let prepared = spec.scope.prepare(&c, spec, &ctx).await.expect("prepare");
    let rows = prepared.fetch(&c, i64::MIN, 10).await.expect("fetch");
    let computed = prepared.compute(rows).await.expect("compute");

    // meanwhile: the app re-wraps wrapper 0 (legacy AES) with a new DEK
    // and deletes wrapper 2
    let (w0, w2) = (w.seed.deks[0].0, w.seed.deks[2].0);
    let kek: [u8; 32] = w
        .keys
        .0
        .iter()
        .find(|k| k.key_ref == "local:kek-a")
        .unwrap()
        .secret[..]
        .try_into()
        .unwrap();
    let uuid: String = c
        .query_one(
            "SELECT wrapper_uuid::text FROM key_wrappers WHERE id = $1",
            &[&w0],
        )
        .await
        .unwrap()
        .get(0);
    let new_dek = [0x42u8; 32];
    let rewrapped = wrap::seal_legacy_aes(&kek, &uuid, &new_dek);
    c.execute("UPDATE key_wrappers SET dek_wrap1 = $2, dek_wrap2 = NULL, kms2_key_id = NULL WHERE id = $1", &[&w0, &rewrapped]).await.unwrap();
    c.execute("DELETE FROM key_wrappers WHERE id = $1", &[&w2])
        .await
        .unwrap();

    let mut conn = w.fx.db.client().await;
    let tx = conn.transaction().await.unwrap();
    let (counts, failures) = prepared.write(&tx, id, computed).await.expect("write");
    tx.commit().await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!((counts.migrated, counts.skipped), (9, 1));
    let now = w.open_all().await;
    assert_eq!(now.len(), 9);
    assert_eq!(
        now[&w0].as_deref(),
        Ok(&new_dek[..]),
        "the app's rotation survives"
    );
    for (wid, dek) in &w.seed.deks[1..] {
        if *wid != w2 {
            assert_eq!(now[wid].as_deref(), Ok(&dek[..]));
        }
    }
    // the backup holds the app's version, the one actually replaced
    let backup: Vec<u8> = c
        .query_one(
            "SELECT r.dek_wrap1 FROM pq_migration_backups b, jsonb_populate_record(NULL::key_wrappers, b.data->'row') r WHERE b.item_id = $1::bigint::text",
            &[&w0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(backup, rewrapped);
}
