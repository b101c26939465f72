//! Legacy sample data for `pqmig demo`, the benchmarks and the tests:
//! keys for a keyring file, their `kms_keys` rows, a PQ policy, and
//! wrappers in both legacy formats (SPEC §5.1) whose DEKs are returned so
//! a caller can check them after migration.

use serde_json::json;
use tokio_postgres::GenericClient;

use crate::crypto::kem::Kem;
use crate::crypto::wrap;
use crate::db::kms;

pub use crate::keys::document::{SampleKey, SampleKeys};

/// What [`seed_signatures`] created.
pub struct SignatureSeed {
    pub target_algo_id: i64,
    /// The active signing key of the target algorithm.
    pub signing_key_id: i64,
    /// The source signers: Ed25519 and ECDSA P-256 (public keys only).
    pub source_key_ids: [i64; 2],
    /// The source signers themselves, for tests that sign more rows.
    pub source_signers: [crate::crypto::sig::Signer; 2],
}

/// `n` signed records (`subject_table` "documents", context "doc-v1") over
/// a SHA-256 payload hash, alternately Ed25519 and ECDSA P-256 (`mixed`)
/// or all Ed25519, and an active signing key `key_name` of `target` sealed
/// under a fresh KEK.
#[allow(clippy::too_many_arguments)]
pub async fn seed_signatures(
    c: &impl GenericClient,
    keys: &mut SampleKeys,
    prefix: &str,
    n: usize,
    mixed: bool,
    target: crate::crypto::sig::SigAlg,
    key_name: &str,
) -> anyhow::Result<SignatureSeed> {
    use crate::crypto::sig::{SigAlg, Signer, generate_seed};
    use crate::db::signatures as dbs;
    let kek_ref = format!("local:{prefix}kek-signing");
    keys.generate(&kek_ref, "AES-256-GCM", 32);
    kms::kms_key_register(c, &kek_ref, "encrypt", "AES-256-GCM").await?;
    let made = crate::keys::signing::create_signing_key(
        c,
        &*keys,
        None,
        target.alias(),
        key_name,
        &kek_ref,
        None,
    )
    .await?;
    let alias_id = |alias: &'static str| async move {
        crate::db::algorithms::algorithm_by_alias(c, alias)
            .await?
            .ok_or_else(|| anyhow::anyhow!("alias {alias} missing"))
    };
    let target_algo_id = alias_id(target.alias()).await?;
    let ed_algo = alias_id("Ed25519").await?;
    let ec_algo = alias_id("ECDSA-P256").await?;
    let sha256 = alias_id("SHA-256").await?;
    let ed = Signer::from_seed(SigAlg::Ed25519, &generate_seed(SigAlg::Ed25519))?;
    let ec = Signer::from_seed(SigAlg::EcdsaP256, &generate_seed(SigAlg::EcdsaP256))?;
    let ed_id = dbs::signing_key_import(
        c,
        ed_algo,
        &format!("{prefix}legacy-ed25519"),
        ed.public_key(),
    )
    .await?;
    let ec_id =
        dbs::signing_key_import(c, ec_algo, &format!("{prefix}legacy-p256"), ec.public_key())
            .await?;
    for start in (0..n).step_by(5_000) {
        let m = (n - start).min(5_000);
        let (mut pks, mut algos, mut kids, mut sigs, mut hashes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in start..start + m {
            let mut body = [0u8; 32];
            rand::fill(&mut body);
            let h = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(body))
                .to_vec();
            let (signer, algo, kid) = if i % 2 == 0 || !mixed {
                (&ed, ed_algo, ed_id)
            } else {
                (&ec, ec_algo, ec_id)
            };
            sigs.push(signer.sign(&h, &[])?);
            pks.push(format!("{}", i + 1));
            algos.push(algo);
            kids.push(kid);
            hashes.push(h);
        }
        crate::db::sample::signatures_insert_documents(
            c, &pks, &algos, &kids, &sigs, &hashes, sha256,
        )
        .await?;
    }
    Ok(SignatureSeed {
        target_algo_id,
        signing_key_id: made.id,
        source_key_ids: [ed_id, ec_id],
        source_signers: [ed, ec],
    })
}

/// What [`seed_wrappers`] created.
pub struct WrapperSeed {
    pub policy_id: i64,
    pub kem_algo_id: i64,
    /// The policy's layer keys (kms_keys ids), most preferred first.
    pub layer_key_ids: Vec<i64>,
    /// kms_keys ids of the legacy keys: two AES-256-GCM KEKs, one X25519.
    pub legacy_key_ids: [i64; 3],
    /// (wrapper id, DEK) of every wrapper, in id order.
    pub deks: Vec<(i64, [u8; 32])>,
}

pub use crate::db::sample::policy_create;

/// `n` wrappers, alternating `legacy-aes-gcm` (wrapped under two KEKs,
/// kms1 and kms2) and `legacy-x25519` (kms1 only), plus a policy `policy`
/// with `layers` fresh `kem` keys (`defined`, min 1, max `layers`). Keys go
/// into `keys` under references starting with `prefix`.
pub async fn seed_wrappers(
    c: &impl GenericClient,
    keys: &mut SampleKeys,
    prefix: &str,
    n: usize,
    kem: Kem,
    layers: usize,
    policy: &str,
) -> anyhow::Result<WrapperSeed> {
    let kek_a = keys.generate(&format!("local:{prefix}kek-a"), "AES-256-GCM", 32);
    let kek_b = keys.generate(&format!("local:{prefix}kek-b"), "AES-256-GCM", 32);
    let ecies = keys.generate(&format!("local:{prefix}ecies"), "X25519", 32);
    let kek_a: [u8; 32] = kek_a[..].try_into().expect("32 bytes");
    let kek_b: [u8; 32] = kek_b[..].try_into().expect("32 bytes");
    let ecies_pub = wrap::x25519_public(&ecies[..].try_into().expect("32 bytes"));
    let id_a =
        kms::kms_key_register(c, &format!("local:{prefix}kek-a"), "wrap", "AES-256-GCM").await?;
    let id_b =
        kms::kms_key_register(c, &format!("local:{prefix}kek-b"), "wrap", "AES-256-GCM").await?;
    let id_x = kms::kms_key_register(c, &format!("local:{prefix}ecies"), "wrap", "X25519").await?;

    let mut layer_key_ids = Vec::with_capacity(layers);
    for j in 0..layers {
        let key_ref = format!("local:{prefix}pq-{j}");
        keys.generate(&key_ref, kem.alias(), kem.seed_len());
        layer_key_ids.push(kms::kms_key_register(c, &key_ref, "wrap", kem.alias()).await?);
    }
    let policy_id = policy_create(
        c,
        policy,
        "defined",
        1,
        layers as i16,
        kem.alias(),
        &layer_key_ids,
    )
    .await?;
    let kem_algo_id = crate::db::algorithms::algorithm_by_alias(c, kem.alias())
        .await?
        .ok_or_else(|| anyhow::anyhow!("alias {} missing (run pqmig migrate)", kem.alias()))?;

    let mut deks = Vec::with_capacity(n);
    for chunk_start in (0..n).step_by(5_000) {
        let m = (n - chunk_start).min(5_000);
        let mut uuids = Vec::with_capacity(m);
        let (mut k1, mut k2) = (Vec::with_capacity(m), Vec::with_capacity(m));
        let (mut w1, mut w2) = (Vec::with_capacity(m), Vec::with_capacity(m));
        let mut suites = Vec::with_capacity(m);
        let mut chunk_deks = Vec::with_capacity(m);
        for i in chunk_start..chunk_start + m {
            let uuid = uuid::Uuid::new_v4().to_string();
            let mut dek = [0u8; 32];
            rand::fill(&mut dek);
            if i % 2 == 0 {
                k1.push(id_a);
                k2.push(Some(id_b));
                w1.push(wrap::seal_legacy_aes(&kek_a, &uuid, &dek));
                w2.push(Some(wrap::seal_legacy_aes(&kek_b, &uuid, &dek)));
                suites.push(json!({"format": wrap::FORMAT_LEGACY_AES}));
            } else {
                k1.push(id_x);
                k2.push(None);
                w1.push(wrap::seal_legacy_x25519(&ecies_pub, &uuid, &dek));
                w2.push(None);
                suites.push(json!({"format": wrap::FORMAT_LEGACY_X25519}));
            }
            uuids.push(uuid);
            chunk_deks.push(dek);
        }
        let rows =
            crate::db::sample::wrappers_insert(c, &uuids, &k1, &k2, &w1, &w2, &suites).await?;
        let by_uuid: std::collections::HashMap<&str, [u8; 32]> =
            uuids.iter().map(String::as_str).zip(chunk_deks).collect();
        for (id, uuid) in &rows {
            deks.push((*id, by_uuid[uuid.trim_end()]));
        }
    }
    deks.sort_unstable_by_key(|(id, _)| *id);
    Ok(WrapperSeed {
        policy_id,
        kem_algo_id,
        layer_key_ids,
        legacy_key_ids: [id_a, id_b, id_x],
        deks,
    })
}
