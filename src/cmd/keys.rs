//! `pqmig keys generate` (a key in the keyring file, optionally registered
//! as a `kms_keys` row) and `pqmig keys signing` (a `signing_keys` row
//! sealed under a KEK, SPEC §4).

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
