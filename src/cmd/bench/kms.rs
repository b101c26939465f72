//! `pqmig bench --scope wrappers --kms-region R` (or `--vault-location
//! URL`): the same wrappers job with its legacy wraps opened in-process
//! (`local` keyring) and by a key provider — AWS KMS (`legacy-aws-kms`,
//! each DEK encrypted by KMS under a scratch key) or Vault transit
//! (`legacy-vault-transit`, likewise) — and the ratio of their items/s
//! (issue #20's target: ≥ 0.5). KMS is whatever the SDK's standard chain
//! names (`AWS_ENDPOINT_URL_KMS` for moto on loopback); Vault is the
//! location given, with the token from `VAULT_TOKEN`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{BenchOptions, run_job, settle};
use crate::cmd::demo::{Scratch, private_dir};
use crate::config::Config;
use crate::crypto::kem::Kem;
use crate::crypto::wrap;
use crate::db;
use crate::keys::aws::{self, Kms};
use crate::keys::vault::{self, Vault};
use crate::sample::SampleKeys;

/// The key provider a bench opens the second half's wraps with.
pub enum Remote<'a> {
    /// AWS KMS of this region.
    Aws(&'a str),
    /// Vault / OpenBao transit at this location.
    Vault(&'a str),
}

/// A scratch key of the provider, and how to reach it.
enum Scratchkey {
    Aws(std::sync::Arc<Kms>, String),
    Vault(std::sync::Arc<Vault>, String),
}

impl Scratchkey {
    async fn create(remote: &Remote<'_>) -> anyhow::Result<Scratchkey> {
        Ok(match remote {
            Remote::Aws(region) => {
                let kms = aws::Clients::default().get(region).await;
                let arn = kms.create_key("pqmig bench scratch key").await?;
                Scratchkey::Aws(kms, arn)
            }
            Remote::Vault(location) => {
                let vault = vault::Clients::default().get(location)?;
                let name = format!("pqmig-bench-{}", uuid::Uuid::new_v4());
                vault.create_key(&name).await?;
                Scratchkey::Vault(vault, name)
            }
        })
    }

    /// (provider, format, key ref, what it is called in the output).
    fn names(&self) -> (&'static str, &'static str, &str, &'static str) {
        match self {
            Scratchkey::Aws(_, arn) => ("aws", wrap::FORMAT_LEGACY_AWS_KMS, arn, "KMS Decrypt"),
            Scratchkey::Vault(_, name) => {
                ("vault", wrap::FORMAT_LEGACY_VAULT, name, "transit decrypt")
            }
        }
    }

    async fn encrypt(&self, uuid: &str, dek: &[u8; 32]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Scratchkey::Aws(kms, arn) => {
                kms.encrypt(arn, dek, (wrap::AWS_KMS_CONTEXT_KEY, uuid))
                    .await?
            }
            Scratchkey::Vault(vault, name) => vault.encrypt(name, dek, uuid.as_bytes()).await?,
        })
    }

    /// The provider's own ceiling: these wraps opened its way (KMS: one
    /// request each, 32 in flight; transit: batches), no database.
    async fn open_all(&self, wraps: &[(&str, &[u8])]) -> anyhow::Result<()> {
        match self {
            Scratchkey::Aws(kms, arn) => {
                let opened =
                    futures_util::stream::iter(wraps.iter().map(|(uuid, blob)| {
                        kms.decrypt(arn, blob, (wrap::AWS_KMS_CONTEXT_KEY, uuid))
                    }))
                    .buffer_unordered(aws::CONCURRENCY)
                    .collect::<Vec<_>>()
                    .await;
                if let Some(Err(e)) = opened.into_iter().find(Result::is_err) {
                    anyhow::bail!("KMS Decrypt, before the jobs: {e}");
                }
            }
            Scratchkey::Vault(vault, name) => {
                let items: Vec<(&[u8], &[u8])> =
                    wraps.iter().map(|(u, b)| (*b, u.as_bytes())).collect();
                for r in vault.decrypt(name, &items).await? {
                    if let Err(e) = r {
                        anyhow::bail!("transit decrypt, before the jobs: {e}");
                    }
                }
            }
        }
        Ok(())
    }
}

pub async fn run(config: &Config, a: &BenchOptions, remote: Remote<'_>) -> anyhow::Result<()> {
    let scratch = Scratch::create(config, "pqmig_bench").await?;
    let result = run_in(config, &scratch, a, &remote).await;
    scratch.drop_database().await;
    result
}

async fn run_in(
    config: &Config,
    scratch: &Scratch,
    a: &BenchOptions,
    remote: &Remote<'_>,
) -> anyhow::Result<()> {
    let (mut cfg, client) = scratch.open(config, Duration::from_millis(100)).await?;
    let dir = private_dir("pqmig-bench")?;
    let keyring = dir.0.join("keyring.json");
    let mut keys = SampleKeys::default();
    let n = a.items as usize;
    let seed =
        crate::sample::seed_wrappers(&client, &mut keys, "", 2 * n, Kem::MlKem768, 1, "bench")
            .await?;
    keys.write(&keyring)?;
    cfg.keyring = Some(keyring);

    // The second half: each DEK encrypted by the provider, bound to its
    // uuid.
    let t = Instant::now();
    let key = Scratchkey::create(remote).await?;
    let (provider_name, format, key_ref, op) = key.names();
    let location = match remote {
        Remote::Aws(l) | Remote::Vault(l) => *l,
    };
    let provider: i64 = client
        .query_one(
            "INSERT INTO kms_providers (name, provider, location) VALUES ('bench-remote', $1, $2) RETURNING id",
            &[&provider_name, &location],
        )
        .await?
        .get(0);
    let key_id: i64 = client
        .query_one(
            "INSERT INTO kms_keys (provider_id, external_key_ref, purpose, algorithm) \
             VALUES ($1, $2, 'wrap', 'AES-256-GCM') RETURNING id",
            &[&provider, &key_ref],
        )
        .await?
        .get(0);
    let half = &seed.deks[n..];
    let (lo, hi) = (half[0].0, half[n - 1].0);
    let uuids: std::collections::HashMap<i64, String> = client
        .query(
            "SELECT id, wrapper_uuid::text FROM key_wrappers WHERE id BETWEEN $1 AND $2",
            &[&lo, &hi],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let blobs: Vec<(i64, Vec<u8>)> = futures_util::stream::iter(half.iter().map(|(id, dek)| {
        let (key, uuid) = (&key, &uuids[id]);
        async move { key.encrypt(uuid, dek).await.map(|b| (*id, b)) }
    }))
    .buffer_unordered(aws::CONCURRENCY)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let (ids, blobs): (Vec<i64>, Vec<Vec<u8>>) = blobs.into_iter().unzip();
    client
        .execute(
            "UPDATE key_wrappers w SET dek_wrap1 = u.blob, dek_wrap2 = NULL, kms1_key_id = $3, \
             kms2_key_id = NULL, crypto_suite = jsonb_build_object('format', $4::text) \
             FROM unnest($1::bigint[], $2::bytea[]) AS u (id, blob) WHERE w.id = u.id",
            &[&ids, &blobs, &key_id, &format],
        )
        .await?;
    settle(&client).await?;
    eprintln!(
        "seeded {} wrappers, {n} of them encrypted by {provider_name} in {:.1} s",
        2 * n,
        t.elapsed().as_secs_f64()
    );

    // The provider's own ceiling: the same wraps opened its way, no
    // database and no re-wrap.
    let sample = n.min(2000);
    let wraps: Vec<(&str, &[u8])> = ids[..sample]
        .iter()
        .zip(&blobs)
        .map(|(id, b)| (uuids[id].as_str(), b.as_slice()))
        .collect();
    let t = Instant::now();
    key.open_all(&wraps).await?;
    let ceiling = sample as f64 / t.elapsed().as_secs_f64();
    settle(&client).await?;

    let job = db::jobs::NewJob {
        scope: "wrappers".into(),
        target_policy_id: Some(seed.policy_id),
        ..Default::default()
    };
    let local = run_job(
        &cfg,
        &client,
        &super::job_over(&job, seed.deks[0].0, lo - 1, true),
    )
    .await?;
    settle(&client).await?;
    let remote_run = run_job(&cfg, &client, &super::job_over(&job, lo, hi, true)).await?;
    println!("wrappers, 1 ML-KEM-768 layer, {n} items per job, with backups:");
    println!(
        "  local provider     {:>9.0} items/s  ({:.2} s, {})",
        local.rate(),
        local.secs,
        local.status
    );
    println!(
        "  {:<17}  {:>9.0} items/s  ({:.2} s, {}; {op})",
        format!("{provider_name} provider"),
        remote_run.rate(),
        remote_run.secs,
        remote_run.status,
    );
    println!("  {op:<17}  {ceiling:>9.0} wraps/s  ({sample} wraps, no database)");
    println!(
        "  ratio              {:>9.2}  {provider_name} / local",
        remote_run.rate() / local.rate()
    );
    println!(
        "  ratio              {:>9.2}  {provider_name} / {op} only",
        remote_run.rate() / ceiling
    );
    for r in [&local, &remote_run] {
        if r.status != "done" {
            anyhow::bail!("a bench job ended {}", r.status);
        }
    }
    Ok(())
}
