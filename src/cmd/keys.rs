//! `pqmig keys generate` (a key in the keyring file, optionally registered
//! as a `kms_keys` row) and `pqmig keys signing` (a `signing_keys` row
//! sealed under a KEK, SPEC §4), `pqmig keys list` and `pqmig keys check`
//! (what each kms_keys row is, and whether this process can use it).

use super::UsageError;
use crate::config::Config;
use crate::db;

/// `keys generate`.
pub struct NewKey {
    pub algorithm: String,
    pub key_ref: String,
    pub register: bool,
}

/// `keys signing`.
pub struct NewSigningKey {
    pub algorithm: String,
    pub name: String,
    pub kek: String,
    pub scope: Option<String>,
}

pub async fn generate(config: &Config, a: &NewKey) -> anyhow::Result<()> {
    let path = config.keyring.as_ref().ok_or_else(|| {
        UsageError("no keyring path: set keys.keyring, PQMIG_KEYRING or --keyring".into())
    })?;
    let wraps = [
        "AES-256-GCM",
        "X25519",
        "ML-KEM-768",
        "ML-KEM-1024",
        "X-Wing",
    ];
    let canonical = wraps.iter().find(|w| w.eq_ignore_ascii_case(&a.algorithm));
    if a.register && canonical.is_none() {
        return Err(UsageError(format!(
            "--register is for wrapping keys ({}); {} keys are named elsewhere (hash_profiles.params.key_ref, signing_keys)",
            wraps.join(", "),
            a.algorithm
        ))
        .into());
    }
    // Connect before creating the key, so a bad database leaves no orphan key.
    let client = match a.register {
        true => Some(super::connect(config).await?),
        false => None,
    };
    let made = crate::keys::add_key(path, &a.key_ref, &a.algorithm).map_err(UsageError)?;
    println!("created {}", made.describe());
    if let (Some(c), Some(algorithm)) = (client, canonical) {
        let id = db::kms::kms_key_register(&c, &made.key_ref, "wrap", algorithm).await?;
        println!("registered as kms_keys id {id} (provider local, purpose wrap)");
    }
    Ok(())
}

pub async fn signing(config: &Config, a: &NewSigningKey) -> anyhow::Result<()> {
    use crate::keys::signing::{SigningKeyError, create_signing_key};
    let path = config.keyring.as_ref().ok_or_else(|| {
        UsageError(
            "no keyring path: set keys.keyring, PQMIG_KEYRING or --keyring (it holds the KEK)"
                .into(),
        )
    })?;
    let keyring = crate::keys::LocalKeyring::load(path)?;
    let client = super::connect(config).await?;
    let made = create_signing_key(
        &client,
        &keyring,
        config.pkcs11.as_ref(),
        &a.algorithm,
        &a.name,
        &a.kek,
        a.scope.as_deref(),
    )
    .await
    .map_err(|e| match e {
        SigningKeyError::Usage(m) => anyhow::Error::from(UsageError(m)),
        SigningKeyError::Db(e) => anyhow::anyhow!("database: {}", db::error_chain(&e)),
    })?;
    use sha2::Digest;
    let fp: String = sha2::Sha256::digest(&made.public_key)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!(
        "created signing key {} ({:?}, {}): public key {} bytes, SHA-256 {fp}; private key sealed under kms_keys id {}",
        made.id,
        a.name,
        made.alg.alias(),
        made.public_key.len(),
        made.kms_key_id
    );
    Ok(())
}

/// A row's reason when the keyring itself does not load.
const KEYRING_BAD: &str = "the keyring does not load";

/// The keyring for `keys list` / `keys check`: `Err` says why it cannot be
/// used (then no key is usable), never a secret.
fn keyring_of(config: &Config) -> Result<crate::keys::LocalKeyring, String> {
    let path = config
        .keyring
        .as_ref()
        .ok_or("no keyring path: set keys.keyring, PQMIG_KEYRING or --keyring")?;
    crate::keys::LocalKeyring::load(path).map_err(|e| e.to_string())
}

/// `keys list`: every kms_keys row with its provider, and whether this
/// process can use it.
pub async fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    use crate::keys::check::usable;
    let client = super::connect(config).await?;
    let rows = db::kms::kms_keys_all(&client).await?;
    let keyring = keyring_of(config);
    let ring = keyring.as_ref().ok();
    let usability = |k: &db::kms::KmsKey| match (&keyring, k.provider.as_str()) {
        // Only the local provider needs the file; why it does not load is
        // said once, above the table.
        (Err(_), "local") if k.provider_enabled => Err(KEYRING_BAD.to_owned()),
        _ => usable(ring, config.pkcs11.as_ref(), k).map(|u| format!("usable: {u}")),
    };
    if json {
        let keys: Vec<serde_json::Value> = rows
            .iter()
            .map(|(k, provider_name)| {
                let u = usability(k);
                serde_json::json!({
                    "id": k.id,
                    "external_key_ref": k.key_ref,
                    "algorithm": k.algorithm,
                    "purpose": k.purpose,
                    "status": k.status,
                    "provider": k.provider,
                    "provider_name": provider_name,
                    "provider_enabled": k.provider_enabled,
                    "usable": u.is_ok(),
                    "detail": match u { Ok(s) | Err(s) => s },
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "keyring": config.keyring.as_ref().map(|p| p.display().to_string()),
                "keyring_error": keyring.as_ref().err(),
                "keys": keys,
            }))?
        );
        return Ok(());
    }
    if let Err(why) = &keyring {
        eprintln!("pqmig: {why}");
    }
    if rows.is_empty() {
        println!("no kms_keys rows");
        return Ok(());
    }
    println!(
        "{:>4}  {:<24} {:<13} {:<7} {:<8} {:<22} USE",
        "ID", "REF", "ALGORITHM", "PURPOSE", "STATUS", "PROVIDER"
    );
    for (k, provider_name) in &rows {
        let provider = match k.provider_enabled {
            true => format!("{} ({provider_name})", k.provider),
            false => format!("{} ({provider_name}, disabled)", k.provider),
        };
        let u = match usability(k) {
            Ok(s) => s,
            Err(s) => format!("not usable: {s}"),
        };
        println!(
            "{:>4}  {:<24} {:<13} {:<7} {:<8} {:<22} {u}",
            k.id,
            k.key_ref,
            k.algorithm.as_deref().unwrap_or("-"),
            k.purpose,
            k.status,
            provider
        );
    }
    Ok(())
}

/// `keys check`: each active kms_keys row's key used once, one line each;
/// an error naming the first that failed.
pub async fn check(config: &Config) -> anyhow::Result<()> {
    use crate::keys::check::try_key;
    let client = super::connect(config).await?;
    let rows = db::kms::kms_keys_all(&client).await?;
    let keyring = keyring_of(config);
    let kms = crate::keys::aws::Clients::default();
    let vault = crate::keys::vault::Clients::default();
    let mut first_failure = None;
    let mut checked = 0;
    for (k, _) in rows.iter().filter(|(k, _)| k.status == "active") {
        checked += 1;
        let outcome = match (&keyring, k.provider.as_str()) {
            // The full reason once, in the error that ends the command.
            (Err(why), "local") if k.provider_enabled => Err((KEYRING_BAD.to_owned(), why.clone())),
            (_, "aws") => crate::keys::check::try_aws(&kms, k)
                .await
                .map_err(|e| (e.clone(), e)),
            (_, "vault") => crate::keys::check::try_vault(&vault, k)
                .await
                .map_err(|e| (e.clone(), e)),
            (ring, _) => {
                try_key(ring.as_ref().ok(), config.pkcs11.as_ref(), k).map_err(|e| (e.clone(), e))
            }
        };
        match outcome {
            Ok(done) => println!("ok      kms_keys {} {:?}: {done}", k.id, k.key_ref),
            Err((short, why)) => {
                println!("FAILED  kms_keys {} {:?}: {short}", k.id, k.key_ref);
                first_failure.get_or_insert(format!("kms_keys {} {:?}: {why}", k.id, k.key_ref));
            }
        }
    }
    if let Some(failure) = first_failure {
        anyhow::bail!("key check failed: {failure}");
    }
    if checked == 0 {
        println!("no active kms_keys rows");
    }
    Ok(())
}
