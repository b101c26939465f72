//! `pqmig bench --scope wrappers --kms-region R`: the same wrappers job
//! with its legacy wraps opened in-process (`local` keyring) and by AWS
//! KMS (`legacy-aws-kms`, each DEK encrypted by KMS under a scratch key),
//! and the ratio of their items/s (issue #20's target: ≥ 0.5). KMS is
//! whatever the SDK's standard chain names: `AWS_ENDPOINT_URL_KMS` for
//! moto on loopback.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{BenchOptions, run_job, settle};
use crate::cmd::demo::{Scratch, private_dir};
use crate::config::Config;
use crate::crypto::kem::Kem;
use crate::crypto::wrap;
use crate::db;
use crate::keys::aws::{self, Kms};
use crate::sample::SampleKeys;

pub async fn run(config: &Config, a: &BenchOptions, region: &str) -> anyhow::Result<()> {
    let scratch = Scratch::create(config, "pqmig_bench").await?;
    let result = run_in(config, &scratch, a, region).await;
    scratch.drop_database().await;
    result
}

async fn run_in(
    config: &Config,
    scratch: &Scratch,
    a: &BenchOptions,
    region: &str,
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

    // The second half: each DEK encrypted by KMS with its uuid as context.
    let t = Instant::now();
    let clients = aws::Clients::default();
    let kms = clients.get(region).await;
    let arn = kms.create_key("pqmig bench scratch key").await?;
    let provider: i64 = client
        .query_one(
            "INSERT INTO kms_providers (name, provider, location) VALUES ('bench-kms', 'aws', $1) RETURNING id",
            &[&region],
        )
        .await?
        .get(0);
    let key_id: i64 = client
        .query_one(
            "INSERT INTO kms_keys (provider_id, external_key_ref, purpose, algorithm) \
             VALUES ($1, $2, 'wrap', 'AES-256-GCM') RETURNING id",
            &[&provider, &arn],
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
        let (kms, arn, uuid) = (&kms, &arn, &uuids[id]);
        async move { encrypt(kms, arn, uuid, dek).await.map(|b| (*id, b)) }
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
            &[&ids, &blobs, &key_id, &wrap::FORMAT_LEGACY_AWS_KMS],
        )
        .await?;
    settle(&client).await?;
    eprintln!(
        "seeded {} wrappers, {n} of them encrypted by KMS in {:.1} s",
        2 * n,
        t.elapsed().as_secs_f64()
    );

    // KMS's own ceiling: the same Decrypt requests, as many in flight, no
    // database and no re-wrap.
    let sample = n.min(2000);
    let t = Instant::now();
    let opened = futures_util::stream::iter(ids[..sample].iter().zip(&blobs).map(|(id, blob)| {
        let (kms, arn, uuid) = (&kms, &arn, &uuids[id]);
        async move {
            kms.decrypt(arn, blob, (wrap::AWS_KMS_CONTEXT_KEY, uuid))
                .await
        }
    }))
    .buffer_unordered(aws::CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    let ceiling = sample as f64 / t.elapsed().as_secs_f64();
    if let Some(Err(e)) = opened.into_iter().find(Result::is_err) {
        anyhow::bail!("KMS Decrypt, before the jobs: {e}");
    }
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
    let remote = run_job(&cfg, &client, &super::job_over(&job, lo, hi, true)).await?;
    println!("wrappers, 1 ML-KEM-768 layer, {n} items per job, with backups:");
    println!(
        "  local provider     {:>9.0} items/s  ({:.2} s, {})",
        local.rate(),
        local.secs,
        local.status
    );
    println!(
        "  aws provider       {:>9.0} items/s  ({:.2} s, {}; KMS Decrypt, {} in flight per batch)",
        remote.rate(),
        remote.secs,
        remote.status,
        aws::CONCURRENCY
    );
    println!(
        "  KMS Decrypt only   {ceiling:>9.0} requests/s  ({sample} requests, {} in flight, no database)",
        aws::CONCURRENCY
    );
    println!(
        "  ratio              {:>9.2}  aws / local",
        remote.rate() / local.rate()
    );
    println!(
        "  ratio              {:>9.2}  aws / KMS Decrypt only",
        remote.rate() / ceiling
    );
    for r in [&local, &remote] {
        if r.status != "done" {
            anyhow::bail!("a bench job ended {}", r.status);
        }
    }
    Ok(())
}

async fn encrypt(kms: &Kms, arn: &str, uuid: &str, dek: &[u8; 32]) -> anyhow::Result<Vec<u8>> {
    Ok(kms
        .encrypt(arn, dek, (wrap::AWS_KMS_CONTEXT_KEY, uuid))
        .await?)
}
