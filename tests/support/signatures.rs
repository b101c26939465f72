//! Signed records (Ed25519 and ECDSA P-256 sources) with an active
//! ML-DSA-65 signing key, and its keyring.

use serde_json::{Value, json};

use pqmig::crypto::sig::SigAlg;
use pqmig::sample::{SampleKeys, SignatureSeed};

use super::codec::b64;
use super::hashes::Fixture;

/// `tests/vectors/sig_check.py` (pyca/cryptography).
pub fn sig_check(args: &[&str], stdin: &str) -> String {
    super::python::run("sig_check.py", args, stdin)
}

/// Signed records with their keys, an active ML-DSA-65 signing key.
pub struct SigFx {
    pub fx: Fixture,
    pub seed: SignatureSeed,
    pub keys: SampleKeys,
}

impl SigFx {
    pub async fn new(n: usize) -> SigFx {
        let fx = Fixture::new(0).await;
        let mut keys = SampleKeys::default();
        let seed = pqmig::sample::seed_signatures(
            &fx.db.client().await,
            &mut keys,
            "",
            n,
            true,
            SigAlg::MlDsa65,
            "pq-sign",
        )
        .await
        .expect("seed signatures");
        std::fs::remove_file(&fx.keyring).unwrap();
        keys.write(&fx.keyring).unwrap();
        SigFx { fx, seed, keys }
    }

    pub async fn enqueue(&self, algo_id: i64, selection: Value) -> i64 {
        self.fx
            .db
            .client()
            .await
            .query_one(
                "INSERT INTO pq_migration_jobs (scope, target_algo_id, selection) VALUES ('signatures', $1, $2) RETURNING id",
                &[&algo_id, &selection],
            )
            .await
            .unwrap()
            .get(0)
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

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let keyring = self.fx.keyring.display().to_string();
        crate::support::run(
            args,
            &[
                ("DATABASE_URL", self.fx.db.url.as_str()),
                ("PQMIG_KEYRING", keyring.as_str()),
            ],
        )
    }

    /// Countersignatures of the target algorithm, as pyca input.
    pub async fn countersignatures(&self) -> Vec<Value> {
        let c = self.fx.db.client().await;
        c.query(
            "SELECT k.public_key, s.payload_hash, s.context::text, s.signature FROM signatures s \
             JOIN signing_keys k ON k.id = s.signing_key_id WHERE s.algo_id = $1 ORDER BY s.id",
            &[&self.seed.target_algo_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            json!({"alg": "ML-DSA-65", "pk": b64(&r.get::<_, Vec<u8>>(0)), "msg": b64(&r.get::<_, Vec<u8>>(1)),
                   "ctx": r.get::<_, String>(2), "sig": b64(&r.get::<_, Vec<u8>>(3))})
        })
        .collect()
    }
}
