//! One wrapper's re-wrap, on the blocking pool: recover its DEK, choose the
//! layer keys, build the `pqmig-wrap-v1` wrap, open it again (verify before
//! write), and gather a batch's new values for one compare-and-set.

use std::sync::Arc;

use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::keys::{Failure, SourceKeys, UNAVAILABLE, format_of, suite_kem, suite_policy};
use super::policy::{AadValues, LayerSelection, choose_layers, render_aad};
use crate::crypto::kem::{self, Kem, KemKeyPair};
use crate::crypto::{suite, wrap};
use crate::db::wrappers::{NewLayers, Policy, WrapperRow, WrapperUpdates};
use crate::keys::pkcs11::Hsm;
use crate::scope::ItemFailure;

/// A usable layer key of the target policy.
pub struct LayerKey {
    pub kms_key_id: i64,
    pub weight: i32,
    pub key: LayerSecret,
}

/// Where a layer key's private half is. New layers are sealed by pqmig
/// either way (a public key is all that needs); checking a new wrap
/// before it is written takes the private key.
pub enum LayerSecret {
    /// In the keyring: both in process.
    Here(KemKeyPair),
    /// ML-KEM (or X-Wing, by its two halves) in an HSM token (provider
    /// `pkcs11`): sealed to its public key ([`Hsm::ml_kem_public`],
    /// checked to be the private key's), each new layer decapsulated in
    /// the token.
    Token {
        hsm: Arc<Hsm>,
        token: String,
        label: String,
        kem: Kem,
        public: Vec<u8>,
    },
}

impl LayerKey {
    fn public_key(&self) -> &[u8] {
        match &self.key {
            LayerSecret::Here(pair) => pair.public_key(),
            LayerSecret::Token { public, .. } => public,
        }
    }

    /// A new layer: (ciphertext, shared secret), fresh randomness.
    fn encapsulate(&self) -> (Vec<u8>, Zeroizing<[u8; 32]>) {
        match &self.key {
            LayerSecret::Here(pair) => pair.encapsulate(),
            LayerSecret::Token { kem, public, .. } => kem::encapsulate(*kem, public)
                .expect("a token's public key is checked when the job loads it"),
        }
    }

    /// The shared secret of a new layer, as opening the wrap later will
    /// find it. Any token error is the job's transient error: the key was
    /// checked when the job started, so the token is failing now, or its
    /// setup changed since, which the job's next start finds and fails
    /// the job for, naming it (never an item failed for a wrap that is
    /// sound).
    fn decapsulate(&self, ct: &[u8]) -> Result<Zeroizing<[u8; 32]>, Failure> {
        match &self.key {
            LayerSecret::Here(pair) => pair
                .decapsulate(ct)
                .map_err(|e| ("verify", format!("the new wrap: {}", e.0))),
            LayerSecret::Token {
                hsm,
                token,
                label,
                kem,
                ..
            } => hsm
                .ml_kem_decapsulate(token, label, *kem, ct)
                .map_err(|e| (UNAVAILABLE, e.to_string())),
        }
    }
}

/// What the computation threads share for the whole job.
pub struct Plan {
    pub job_id: i64,
    pub policy: Policy,
    pub mode: LayerSelection,
    pub kem: Kem,
    pub kem_algo_id: i64,
    pub template: Value,
    pub layer_keys: Vec<LayerKey>,
    pub verify: bool,
    pub allow_downgrade: bool,
    pub source: SourceKeys,
}

/// The new values of one batch.
#[derive(Default)]
pub struct Computed {
    pub updates: WrapperUpdates,
    pub failures: Vec<ItemFailure>,
    pub skipped: i64,
}

impl Computed {
    /// Bytes these rewrites add: the new wrap, suite and layer rows (with
    /// ~40 bytes of row overhead each) minus what they replace.
    pub fn growth_bytes(&self) -> i64 {
        let u = &self.updates;
        let len = |v: &[Vec<u8>]| crate::scope::total_len(v);
        let opt = |v: &[Option<Vec<u8>>]| v.iter().flatten().map(|b| b.len() as i64).sum::<i64>();
        let json = |v: &[Value]| v.iter().map(|j| j.to_string().len() as i64).sum::<i64>();
        let old_suites: i64 = u
            .old_suites
            .iter()
            .flatten()
            .map(|j| j.to_string().len() as i64)
            .sum();
        len(&u.new_wrap1)
            + json(&u.new_suites)
            + len(&u.layers.ciphertexts)
            + len(&u.layers.public_keys)
            + json(&u.layers.aads)
            + json(&u.layers.metas)
            + 40 * u.layers.wrapper_ids.len() as i64
            - opt(&u.old_wrap1)
            - opt(&u.old_wrap2)
            - old_suites
            - u.replaced_layer_bytes
    }
}

/// What became of one wrapper.
pub enum Outcome {
    Skip,
    Fail(&'static str, String),
    Write(NewWrap),
}

/// A wrapper's new values.
pub struct NewWrap {
    pub wrap: Vec<u8>,
    pub suite: Value,
    pub aad: Value,
    pub layers: Vec<(i64, Vec<u8>, Vec<u8>)>,
}

impl Plan {
    /// Claims to be in the target state: v1 under the same policy and KEM,
    /// every layer under one of the policy's keys. The claim is
    /// `crypto_suite`, which nothing authenticates, so [`Plan::process`]
    /// opens the wrap (bound to its row) before skipping it.
    fn claims_migrated(&self, row: &WrapperRow) -> bool {
        let Some(s) = &row.suite else { return false };
        s.get("format").and_then(Value::as_str) == Some(wrap::FORMAT_V1)
            && suite_policy(row) == Some(self.policy.id)
            && suite_kem(row) == Some(self.kem)
            && !row.layers.is_empty()
            && row.layers.iter().all(|l| {
                l.kms_key_id
                    .is_some_and(|id| self.layer_keys.iter().any(|k| k.kms_key_id == id))
            })
    }

    /// The whole item: skip, fail or the new values.
    pub fn process(&self, row: &WrapperRow, rng: &mut impl rand::Rng) -> Outcome {
        let claims_migrated = self.claims_migrated(row);
        let dek = match self.source.recover(row) {
            Ok(d) => d,
            Err((code, msg)) => return Outcome::Fail(code, msg),
        };
        if claims_migrated {
            return Outcome::Skip;
        }
        if format_of(row) == Ok(wrap::FORMAT_V1)
            && let Some(source) = suite_kem(row)
            && self.kem.is_downgrade_from(source)
            && !self.allow_downgrade
        {
            return Outcome::Fail(
                "downgrade",
                format!(
                    "wrapped under {}; re-wrapping it under {} would weaken it (selection.allow_downgrade permits it)",
                    source.alias(),
                    self.kem.alias()
                ),
            );
        }
        if dek.len() != wrap::DEK_LEN {
            return Outcome::Fail(
                "data",
                format!("the DEK is {} bytes, expected {}", dek.len(), wrap::DEK_LEN),
            );
        }
        let Some(version) = row.wrap_version.checked_add(1) else {
            return Outcome::Fail("data", "wrap_version is at its maximum".into());
        };
        let uuid = match wrap::canonical_uuid(&row.uuid) {
            Ok(u) => u,
            Err(e) => return Outcome::Fail("data", e),
        };
        let weights: Vec<i32> = self.layer_keys.iter().map(|k| k.weight).collect();
        let chosen = choose_layers(
            self.mode,
            &weights,
            self.policy.min_layers as usize,
            self.policy.max_layers as usize,
            row.id,
            &uuid,
            rng,
        );
        let aad = render_aad(
            &self.template,
            &AadValues {
                wrapper_id: row.id,
                wrapper_uuid: &uuid,
                policy_id: self.policy.id,
                policy_name: &self.policy.name,
                wrap_version: version,
            },
        );
        let aad_bytes = wrap::canonical_json(&aad);
        let keys: Vec<&LayerKey> = chosen.iter().map(|&i| &self.layer_keys[i]).collect();
        let (ciphertexts, shared): (Vec<_>, Vec<_>) = keys.iter().map(|k| k.encapsulate()).unzip();
        let sealed = wrap::seal_v1_shared(&uuid, &aad_bytes, &dek, ciphertexts, &shared);
        drop(shared);
        if self.verify {
            // Opened as a reader will open it: each layer decapsulated
            // again (in its token, for a key held there).
            let mut opened = Vec::with_capacity(keys.len());
            for (k, ct) in keys.iter().zip(&sealed.ciphertexts) {
                match k.decapsulate(ct) {
                    Ok(secret) => opened.push(secret),
                    Err((code, msg)) => return Outcome::Fail(code, msg),
                }
            }
            let cts: Vec<&[u8]> = sealed.ciphertexts.iter().map(Vec::as_slice).collect();
            let ok = wrap::open_v1_shared(
                &uuid,
                &aad_bytes,
                &opened,
                &cts,
                &sealed.commitment,
                &sealed.wrap,
            )
            .is_ok_and(|d| bool::from(d.ct_eq(&dek)));
            if !ok {
                return Outcome::Fail(
                    "verify",
                    "the new wrap did not open to the same DEK; nothing written".into(),
                );
            }
        }
        let suite = suite::v1(
            self.kem,
            keys.len(),
            &sealed.commitment,
            self.policy.id,
            self.job_id,
        );
        Outcome::Write(NewWrap {
            wrap: sealed.wrap,
            suite,
            aad,
            layers: keys
                .iter()
                .zip(sealed.ciphertexts)
                .map(|(k, ct)| (k.kms_key_id, ct, k.public_key().to_vec()))
                .collect(),
        })
    }

    /// A batch, in order, on the calling thread.
    pub fn compute(&self, rows: &[WrapperRow]) -> Computed {
        let mut rng = rand::rng();
        let mut out = Computed {
            updates: WrapperUpdates::default(),
            failures: Vec::new(),
            skipped: 0,
        };
        let meta = json!({"job_id": self.job_id, "format": wrap::FORMAT_V1});
        for row in rows {
            match self.process(row, &mut rng) {
                Outcome::Skip => out.skipped += 1,
                Outcome::Fail(code, message) => out.failures.push(ItemFailure {
                    item_id: row.id,
                    code,
                    message,
                }),
                Outcome::Write(new) => {
                    let u = &mut out.updates;
                    u.ids.push(row.id);
                    u.old_versions.push(row.wrap_version);
                    u.old_wrap1.push(row.wrap1.clone());
                    u.old_wrap2.push(row.wrap2.clone());
                    u.old_suites.push(row.suite.clone());
                    u.replaced_layer_bytes += row
                        .layers
                        .iter()
                        .map(|l| i64::from(l.stored_bytes))
                        .sum::<i64>();
                    u.new_wrap1.push(new.wrap);
                    u.new_suites.push(new.suite);
                    let l: &mut NewLayers = &mut u.layers;
                    for (j, (kid, ct, pk)) in new.layers.into_iter().enumerate() {
                        l.wrapper_ids.push(row.id);
                        l.layer_nos.push(j as i16 + 1);
                        l.kms_key_ids.push(kid);
                        l.kem_algo_ids.push(self.kem_algo_id);
                        l.ciphertexts.push(ct);
                        l.public_keys.push(pk);
                        l.aads.push(new.aad.clone());
                        l.metas.push(meta.clone());
                    }
                }
            }
        }
        out
    }
}

/// Append `b` to `a` (results of chunks computed in parallel, in order).
pub(super) fn merge(a: &mut Computed, b: Computed) {
    let (u, v) = (&mut a.updates, b.updates);
    u.ids.extend(v.ids);
    u.old_versions.extend(v.old_versions);
    u.old_wrap1.extend(v.old_wrap1);
    u.old_wrap2.extend(v.old_wrap2);
    u.old_suites.extend(v.old_suites);
    u.replaced_layer_bytes += v.replaced_layer_bytes;
    u.new_wrap1.extend(v.new_wrap1);
    u.new_suites.extend(v.new_suites);
    let (l, m) = (&mut u.layers, v.layers);
    l.wrapper_ids.extend(m.wrapper_ids);
    l.layer_nos.extend(m.layer_nos);
    l.kms_key_ids.extend(m.kms_key_ids);
    l.kem_algo_ids.extend(m.kem_algo_ids);
    l.ciphertexts.extend(m.ciphertexts);
    l.public_keys.extend(m.public_keys);
    l.aads.extend(m.aads);
    l.metas.extend(m.metas);
    a.failures.extend(b.failures);
    a.skipped += b.skipped;
}
