//! A SoftHSM2 token of a test's own (`.ci/setup` installs SoftHSM2; tokens
//! live in a token directory of the test run's own, under `target/`, named
//! by the `SOFTHSM2_CONF` that `.cargo/config.toml` sets), with an AES-256
//! key generated in
//! it that cannot be read out, and that key's AES-GCM encryption for
//! making legacy wraps. The token is deleted when the guard drops.
//!
//! PKCS#11 allows one `C_Initialize` per process: this module's context is
//! process-wide and never finalised, and pqmig's provider, loaded in the
//! same process by an in-process daemon, finds the module initialised.

use std::sync::OnceLock;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::{Mechanism, aead::GcmParams};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "user-1234";
const SO_PIN: &str = "so-123456";

/// `SOFTHSM2_CONF` as cargo sets it, for the `pqmig` processes a test
/// starts with a clean environment.
pub fn conf() -> String {
    std::env::var("SOFTHSM2_CONF").expect("SOFTHSM2_CONF (set by .cargo/config.toml)")
}

/// Write the configuration `SOFTHSM2_CONF` names, with an empty token
/// directory beside it (what an earlier run left is removed).
fn write_conf() {
    let conf = std::path::PathBuf::from(conf());
    let dir = conf.parent().expect("a directory");
    let tokens = dir.join("tokens");
    let _ = std::fs::remove_dir_all(&tokens);
    std::fs::create_dir_all(&tokens).expect("token directory");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )
    .expect("softhsm2.conf");
}

fn context() -> &'static Pkcs11 {
    static CTX: OnceLock<Pkcs11> = OnceLock::new();
    CTX.get_or_init(|| {
        write_conf();
        let ctx = Pkcs11::new(MODULE).expect("SoftHSM2's module (bash .ci/setup installs it)");
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::CryptokiAlreadyInitialized,
                _,
            )) => {}
            Err(e) => panic!("C_Initialize: {e}"),
        }
        ctx
    })
}

/// A token of a test's own, logged in.
pub struct Token {
    pub label: String,
    session: Session,
    /// A file holding the user PIN (mode 0600), for `keys.pkcs11_pin_file`.
    pub pin_file: std::path::PathBuf,
}

/// The one PIN file of the test process (every token has the same PIN):
/// pqmig loads the module once per process and logs in to each token
/// with the PIN file of the settings it was first opened with, so a
/// per-test file would vanish under the other tests' daemons.
fn pin_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pkcs11-pin");
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("pin file");
        std::io::Write::write_all(&mut f, format!("{PIN}\n").as_bytes()).expect("write pin");
        path
    })
}

impl Token {
    /// Initialise a free slot's token as `label` (at most 32 bytes).
    pub fn new(label: &str) -> Token {
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let ctx = context();
        let slot = {
            // Two tests must not take the same free slot.
            let _one = INIT.lock().unwrap();
            let free = free_slot(ctx);
            ctx.init_token(free, &AuthPin::new(SO_PIN.into()), label)
                .expect("init token");
            let s = ctx.open_rw_session(free).expect("session");
            s.login(UserType::So, Some(&AuthPin::new(SO_PIN.into())))
                .expect("SO login");
            s.init_pin(&AuthPin::new(PIN.into())).expect("init pin");
            s.logout().expect("logout");
            slot_of(ctx, label)
        };
        let session = ctx.open_rw_session(slot).expect("session");
        match session.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => panic!("user login: {e}"),
        }
        Token {
            label: label.to_owned(),
            session,
            pin_file: pin_file().to_owned(),
        }
    }

    /// A new AES-256 key labelled `label`, made in the token: sensitive,
    /// not extractable.
    pub fn aes_key(&self, label: &str) -> ObjectHandle {
        self.session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                ],
            )
            .expect("generate an AES key in the token")
    }

    /// A generic secret labelled `label` holding `value`, for HMAC (sign
    /// and verify): sensitive and, unless `extractable`, never to leave
    /// the token. The test knows the value, so it can check the token's
    /// MACs on its own.
    pub fn hmac_key(&self, label: &str, value: &[u8], extractable: bool) -> ObjectHandle {
        self.session
            .create_object(&[
                Attribute::Class(cryptoki::object::ObjectClass::SECRET_KEY),
                Attribute::KeyType(cryptoki::object::KeyType::GENERIC_SECRET),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Value(value.to_vec()),
                Attribute::Sign(true),
                Attribute::Verify(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(extractable),
            ])
            .expect("create an HMAC key in the token")
    }

    /// A new X25519 key pair labelled `label`, made in the token (SoftHSM
    /// keeps curve25519 keys as `CKK_EC_EDWARDS`, made by
    /// `CKM_EC_EDWARDS_KEY_PAIR_GEN` on the X25519 OID): the private key
    /// sensitive, not extractable, allowed to derive. Its public key, and
    /// the private key's handle.
    pub fn x25519_key(&self, label: &str) -> ([u8; 32], ObjectHandle) {
        const X25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x6e];
        let (public, private) = self
            .session
            .generate_key_pair(
                &Mechanism::EccEdwardsKeyPairGen,
                &[
                    Attribute::Token(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::EcParams(X25519_OID.to_vec()),
                ],
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Derive(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                ],
            )
            .expect("generate an X25519 key pair in the token");
        let point = self
            .session
            .get_attributes(public, &[AttributeType::EcPoint])
            .expect("its public key")
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .expect("CKA_EC_POINT");
        // A DER OCTET STRING of the 32 bytes, or the 32 bytes.
        let raw = match &point[..] {
            [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest,
            raw => raw,
        };
        (raw.try_into().expect("32 bytes"), private)
    }

    /// nonce || AES-256-GCM(key, nonce, plain, aad), computed in the token.
    pub fn seal(&self, key: ObjectHandle, nonce: [u8; 12], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut iv = nonce;
        let params = GcmParams::new(&mut iv, aad, 128.into()).unwrap();
        let ct = self
            .session
            .encrypt(&Mechanism::AesGcm(params), key, plain)
            .expect("encrypt in the token");
        [&nonce[..], &ct].concat()
    }

    /// Log this process out of the token, so that pqmig, in this process
    /// too, must log in with the PIN from its file.
    pub fn logout(&self) {
        self.session.logout().expect("logout");
    }

    /// The key's value as the token gives it out: nothing, for these keys.
    pub fn readable_value(&self, key: ObjectHandle) -> Option<Vec<u8>> {
        self.session
            .get_attributes(key, &[AttributeType::Value])
            .ok()?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        let _ = std::process::Command::new("softhsm2-util")
            .args(["--delete-token", "--token", &self.label])
            .output();
    }
}

/// `tests/support/p11_faulty.c` built into `dir`: a module that is
/// SoftHSM but for the outages a test asks for (its doc comment says how).
pub fn faulty_module(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("libp11faulty.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall"])
        .arg("-I/usr/include/p11-kit-1")
        .arg("-o")
        .arg(&out)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/p11_faulty.c"
        ))
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("cc (gcc; p11-kit's pkcs11.h from libp11-kit-dev, .ci/setup)");
    assert!(status.success(), "building p11_faulty.c: {status}");
    out
}

/// Every outage the count file `faults` asked of `faulty_module` was met,
/// and a daemon's `log` shows a batch retried after one, its error naming
/// each of `said`.
pub fn assert_outages_met(faults: &std::path::Path, log: &str, said: &[&str]) {
    let left = std::fs::read_to_string(faults).expect("the count file");
    assert_eq!(
        left.split_whitespace().nth(1),
        Some("0"),
        "every outage was met: {left}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("batch failed; retrying") && said.iter().all(|w| l.contains(w))),
        "the batch that met the outage was retried, the token's error logged ({said:?}):\n{log}"
    );
}

fn free_slot(ctx: &Pkcs11) -> Slot {
    ctx.get_all_slots()
        .expect("slots")
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()))
        .expect("SoftHSM2 always offers a free slot")
}

fn slot_of(ctx: &Pkcs11, label: &str) -> Slot {
    ctx.get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == label)
        })
        .expect("the token just made")
}
