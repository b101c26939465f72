//! A kryoptic token of a test's own: kryoptic is a PKCS#11 3.2 soft token
//! with ML-KEM (`.ci/setup-kryoptic` builds it against OpenSSL 3.5, which
//! Debian 12 lacks). Its store is a sqlite file in the test's directory;
//! the token is set up (initialised, user PIN set, keys imported) by this
//! process, which then finalises the module, before a `pqmig` process
//! opens the same store through `KRYOPTIC_CONF`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, MlKemParameterSetType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use pqmig::crypto::kem::{Kem, KemKeyPair};

/// A key of a test token.
pub enum TokenKey<'a> {
    /// A private key imported from its 64-byte seed (d || z), and, given
    /// its value, a public key object of the same label beside it.
    Import {
        label: &'a str,
        seed: &'a [u8],
        public: Option<&'a [u8]>,
    },
    /// An ML-KEM-768 key pair generated in the token (the private key
    /// never outside).
    Generate { label: &'a str },
    /// An X-Wing key from its 32-byte seed: its two halves under one
    /// label, the ML-KEM-768 key (with its public key object) and the
    /// X25519 key (`CKK_EC_MONTGOMERY`, allowed to derive).
    XWing { label: &'a str, seed: &'a [u8] },
}

/// Where `.ci/setup-kryoptic` puts the module.
pub const MODULE: &str = "/opt/pqmig-test/kryoptic-1.5.4/libkryoptic_pkcs11.so";
const PIN: &str = "user-5678";
const SO_PIN: &str = "so-567890";

/// A token in `dir`: its store, the configuration naming it (for
/// `KRYOPTIC_CONF`) and a file holding the user PIN (mode 0600).
pub struct Token {
    pub label: String,
    pub conf: PathBuf,
    pub pin_file: PathBuf,
    store: PathBuf,
}

impl Token {
    /// Make the token labelled `label` in `dir` with these ML-KEM-768
    /// keys: private keys sensitive, not extractable, allowed to
    /// decapsulate only.
    pub fn new(dir: &Path, label: &str, keys: &[TokenKey<'_>]) -> Token {
        use std::os::unix::fs::OpenOptionsExt;
        let store = dir.join("kryoptic.sql");
        let conf = dir.join("kryoptic.conf");
        std::fs::write(
            &conf,
            format!(
                "[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
                store.display()
            ),
        )
        .expect("kryoptic.conf");
        let pin_file = dir.join("kryoptic-pin");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pin_file)
            .expect("pin file");
        std::io::Write::write_all(&mut f, format!("{PIN}\n").as_bytes()).expect("write pin");
        let token = Token {
            label: label.into(),
            conf,
            pin_file,
            store,
        };
        token.set_up(keys);
        token
    }

    fn set_up(&self, keys: &[TokenKey<'_>]) {
        // One C_Initialize at a time in this process (tests run at once).
        static ONE: Mutex<()> = Mutex::new(());
        let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = Pkcs11::new(MODULE).expect("kryoptic's module (bash .ci/setup builds it)");
        // kryoptic takes its store from C_Initialize's reserved argument:
        // the environment (KRYOPTIC_CONF) is the test process's, shared.
        let store = CString::new(self.store.display().to_string()).expect("a path");
        let reserved = NonNull::new(store.as_ptr() as *mut std::ffi::c_void).expect("not null");
        // SAFETY: `store` outlives the call, and kryoptic only reads it.
        let args = unsafe {
            CInitializeArgs::new_with_reserved(CInitializeFlags::OS_LOCKING_OK, reserved)
        };
        ctx.initialize(args).expect("C_Initialize");
        let slot = ctx.get_slots_with_token().expect("slots")[0];
        let so = AuthPin::new(SO_PIN.into());
        let user = AuthPin::new(PIN.into());
        ctx.init_token(slot, &so, &self.label).expect("init token");
        {
            let s = ctx.open_rw_session(slot).expect("session");
            s.login(UserType::So, Some(&so)).expect("SO login");
            s.init_pin(&user).expect("init pin");
        }
        let s = ctx.open_rw_session(slot).expect("session");
        s.login(UserType::User, Some(&user)).expect("user login");
        let set = || Attribute::ParameterSet(MlKemParameterSetType::ML_KEM_768.into());
        let private = |label: &str| {
            vec![
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Decapsulate(true),
            ]
        };
        let public = |label: &str| {
            vec![
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Token(true),
                Attribute::Encapsulate(true),
                set(),
            ]
        };
        for key in keys {
            match key {
                TokenKey::Import {
                    label,
                    seed,
                    public: value,
                } => {
                    let mut template = private(label);
                    template.extend([
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::KeyType(KeyType::ML_KEM),
                        set(),
                        Attribute::Seed(seed.to_vec()),
                    ]);
                    s.create_object(&template).expect("import the ML-KEM key");
                    if let Some(value) = value {
                        let mut template = public(label);
                        template.extend([
                            Attribute::Class(ObjectClass::PUBLIC_KEY),
                            Attribute::KeyType(KeyType::ML_KEM),
                            Attribute::Value(value.to_vec()),
                        ]);
                        s.create_object(&template)
                            .expect("import the ML-KEM public key");
                    }
                }
                TokenKey::XWing { label, seed } => {
                    use shake::{ExtendableOutput, Update, XofReader};
                    let mut expanded = [0u8; 96];
                    let mut xof = shake::Shake256::default();
                    xof.update(seed);
                    xof.finalize_xof().read(&mut expanded);
                    let pair = KemKeyPair::from_seed(Kem::XWing, seed).expect("an X-Wing seed");
                    let mut template = private(label);
                    template.extend([
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::KeyType(KeyType::ML_KEM),
                        set(),
                        Attribute::Seed(expanded[..64].to_vec()),
                    ]);
                    s.create_object(&template)
                        .expect("import X-Wing's ML-KEM half");
                    let mut template = public(label);
                    template.extend([
                        Attribute::Class(ObjectClass::PUBLIC_KEY),
                        Attribute::KeyType(KeyType::ML_KEM),
                        Attribute::Value(pair.public_key()[..1184].to_vec()),
                    ]);
                    s.create_object(&template)
                        .expect("import X-Wing's ML-KEM public key");
                    s.create_object(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::KeyType(KeyType::EC_MONTGOMERY),
                        // curve25519's OID, DER.
                        Attribute::EcParams(vec![0x06, 0x03, 0x2b, 0x65, 0x6e]),
                        Attribute::Value(expanded[64..].to_vec()),
                        Attribute::Label(label.as_bytes().to_vec()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Derive(true),
                    ])
                    .expect("import X-Wing's X25519 half");
                }
                TokenKey::Generate { label } => {
                    s.generate_key_pair(
                        &Mechanism::MlKemKeyPairGen,
                        &public(label),
                        &private(label),
                    )
                    .expect("generate an ML-KEM key pair in the token");
                }
            }
        }
        drop(s);
        ctx.finalize().expect("C_Finalize");
    }

    /// What a `pqmig` process needs to use the token.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PQMIG_PKCS11_MODULE", MODULE.into()),
            ("PQMIG_PKCS11_PIN_FILE", self.pin_file.display().to_string()),
            ("KRYOPTIC_CONF", self.conf.display().to_string()),
        ]
    }
}
