//! A database of legacy DEK wrappers (both formats, two KEKs and an X25519
//! key) with a PQ policy, its keyring, and the checks the wrappers tests
//! share: every DEK still opens, pyca opens what pqmig wrote.

use std::collections::HashMap;

use serde_json::{Value, json};

use pqmig::crypto::kem::Kem;
use pqmig::db::wrappers::WrapperRow;
use pqmig::sample::{SampleKeys, WrapperSeed};
use pqmig::scope::wrappers::SourceKeys;

use super::codec::b64;
use super::hashes::Fixture;

/// `tests/vectors/wrap_check.py` (pyca/cryptography).
pub fn wrap_check(args: &[&str], stdin: &str) -> String {
    super::python::run("wrap_check.py", args, stdin)
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
        let out = wrap_check(&["open-v1"], &serde_json::to_string(&items).unwrap());
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
        crate::support::run(args, &envs)
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

/// A `kms_providers` row (`provider`, `location`) named `name` and a
/// `kms_keys` row of it for the AES-256-GCM KEK `key_ref`: the key's id.
pub async fn register_kek(
    c: &tokio_postgres::Client,
    name: &str,
    provider: &str,
    location: &str,
    key_ref: &str,
) -> i64 {
    register_key(c, name, provider, location, key_ref, "AES-256-GCM").await
}

/// A `kms_providers` row and a `kms_keys` row of `algorithm` in it.
pub async fn register_key(
    c: &tokio_postgres::Client,
    name: &str,
    provider: &str,
    location: &str,
    key_ref: &str,
    algorithm: &str,
) -> i64 {
    let provider: i64 = c
        .query_one(
            "INSERT INTO kms_providers (name, provider, location) VALUES ($1, $2, $3) RETURNING id",
            &[&name, &provider, &location],
        )
        .await
        .unwrap_or_else(|e| panic!("a {provider} provider: {e}"))
        .get(0);
    c.query_one(
        "INSERT INTO kms_keys (provider_id, external_key_ref, purpose, algorithm) \
         VALUES ($1, $2, 'wrap', $3) RETURNING id",
        &[&provider, &key_ref, &algorithm],
    )
    .await
    .unwrap()
    .get(0)
}

/// A provider-held KEK sealing a signing key, end to end through `pqmig`
/// (`run`: the CLI with the provider's settings): `keys signing` seals a
/// new ML-DSA-65 attestation key `name` under kms_keys `kek`, `attest` of
/// the done `job` unseals it and signs, `attest verify` accepts the
/// envelope and names the key; renamed, the sealed seed no longer opens
/// (its name is bound in). The sealed `private_key_enc`, for the caller's
/// provider-specific checks.
pub async fn attest_with_a_sealed_key(
    c: &tokio_postgres::Client,
    run: impl Fn(&[&str]) -> std::process::Output,
    kek: i64,
    name: &str,
    job: i64,
) -> Vec<u8> {
    use super::{stderr, stdout};
    let kek = kek.to_string();
    let out = run(&[
        "keys",
        "signing",
        "--algorithm",
        "ML-DSA-65",
        "--name",
        name,
        "--kek",
        &kek,
        "--scope",
        "attestation",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sealed: Vec<u8> = c
        .query_one(
            "SELECT private_key_enc FROM signing_keys WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.dsse.json").display().to_string();
    let out = run(&["attest", &job.to_string(), "--out", &file]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["attest", "verify", &file]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!("ML-DSA-65 key \"{name}\"")),
        "{}",
        stdout(&out)
    );
    let renamed = format!("{name}-renamed");
    c.execute(
        "UPDATE signing_keys SET name = $2 WHERE name = $1",
        &[&name, &renamed],
    )
    .await
    .unwrap();
    let out = run(&["attest", &job.to_string(), "--out", &file]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "signing key \"{renamed}\": private_key_enc does not open with its KEK"
        )),
        "{}",
        stderr(&out)
    );
    c.execute(
        "UPDATE signing_keys SET name = $1 WHERE name = $2",
        &[&name, &renamed],
    )
    .await
    .unwrap();
    sealed
}
