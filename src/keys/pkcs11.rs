//! The `pkcs11` key provider: keys that live in an HSM (any PKCS#11
//! module: an on-premises HSM, CloudHSM, Cloud HSM; tested against
//! SoftHSM2) and never leave it. pqmig asks the token to do the operation:
//! AES-256-GCM decryption (`CKM_AES_GCM`) opens `legacy-aes-gcm` wraps and
//! unseals signing keys, X25519 agreement (`CKM_ECDH1_DERIVE`) opens
//! `legacy-x25519` wraps, ML-KEM decapsulation (`CKM_ML_KEM`, PKCS#11 3.2)
//! opens the layers of `pqmig-wrap-v1` wraps and checks new ones sealed to
//! a token key's public key object (an X-Wing key is its ML-KEM-768 and
//! X25519 halves under one label, combined here), HMAC (`CKM_SHA256_HMAC`,
//! `CKM_SHA512_HMAC`) computes peppered hashes.
//!
//! A `kms_providers` row with provider `pkcs11` names the token by its
//! label in `location`; its `kms_keys` rows name a secret key object by
//! its `CKA_LABEL` in `external_key_ref`. The module and the user PIN come
//! from the configuration (`keys.pkcs11_module`, `keys.pkcs11_pin_file`),
//! never from the database. The module is loaded and initialised once per
//! process; each token is logged in once, and its sessions are pooled: a
//! session is taken per operation and given back, so there are as many as
//! operations run at once (the crypto threads), and never more than
//! `worker.concurrency` × cores: beyond that an operation waits for one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType, aead::GcmParams};
use cryptoki::object::{
    Attribute, AttributeType, KeyType, MlKemParameterSetType, ObjectClass, ObjectHandle,
    ParameterSetType,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::kem::{self, Kem};
use crate::crypto::onion::HmacHash;
use crate::crypto::wrap;

/// `keys.pkcs11_module` and `keys.pkcs11_pin_file`, and how many
/// operation sessions a token may have open at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Settings {
    pub module: PathBuf,
    pub pin_file: PathBuf,
    /// At most this many operations run in one token at once; more wait
    /// for a session to come back. [`Pkcs11Settings::with_sessions_for`].
    pub max_sessions: usize,
}

impl Pkcs11Settings {
    /// With a session cap for one worker slot.
    pub fn new(module: PathBuf, pin_file: PathBuf) -> Pkcs11Settings {
        Pkcs11Settings {
            module,
            pin_file,
            max_sessions: 1,
        }
        .with_sessions_for(1)
    }

    /// Sessions for `workers` worker slots: each job's batch is computed
    /// on one thread per core, so a token serves at most `workers` ×
    /// cores operations at once (the read-ahead of a job's next batch
    /// waits for a session rather than opening one more).
    pub fn with_sessions_for(mut self, workers: usize) -> Pkcs11Settings {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.max_sessions = workers.max(1) * cores;
        self
    }
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The ciphertext does not open under the key (its tag fails): the
    /// data's fault, not the token's.
    #[error("does not open under {0} (authentication failed)")]
    Authentication(String),
    /// Set up wrong: no such token, key or mechanism, a wrong PIN. The job
    /// fails before any item with this message.
    #[error("{0}")]
    Config(String),
    /// The token cannot do the operation for this process at all, for any
    /// key (it refuses the mechanism or its parameters, or keeps the
    /// result in): set up wrong, as [`HsmError::Config`], but the token's,
    /// not one key's.
    #[error("{0}")]
    Unsupported(String),
    /// The token or its connection failed: try again later.
    #[error("{0}")]
    Unavailable(String),
}

/// The loaded module, its tokens by label.
pub struct Hsm {
    ctx: Pkcs11,
    module: PathBuf,
    pin_file: PathBuf,
    /// Operation sessions per token: the smallest cap any settings this
    /// process opened the module with asked for.
    max_sessions: std::sync::atomic::AtomicUsize,
    tokens: Mutex<HashMap<String, Arc<Token>>>,
}

/// A logged-in token: its slot, pooled sessions, key handles by label.
pub struct Token {
    label: String,
    slot: Slot,
    /// The session the login was made on, never used for operations: the
    /// login lasts while one session of the token is open, so dropping a
    /// broken operation session never logs the process out.
    _login: Mutex<Session>,
    sessions: Mutex<Vec<Session>>,
    /// Operation sessions open now (pooled or in use), at most
    /// `max_sessions`; [`Hsm::session`] waits on `returned` at the cap.
    open: Mutex<usize>,
    returned: std::sync::Condvar,
    /// The most operation sessions ever open at once.
    peak: std::sync::atomic::AtomicUsize,
    keys: Mutex<HashMap<String, ObjectHandle>>,
    /// X25519 keys found, by label: the private key and its public key.
    x25519: Mutex<HashMap<String, X25519Key>>,
    mechanisms: Vec<MechanismType>,
}

/// The process's module (PKCS#11 allows one `C_Initialize` per process).
static HSM: OnceLock<Mutex<Option<Arc<Hsm>>>> = OnceLock::new();

/// The module these settings name, loaded and initialised on first use.
pub fn open(settings: &Pkcs11Settings) -> Result<Arc<Hsm>, HsmError> {
    let mut slot = HSM.get_or_init(|| Mutex::new(None)).lock().expect("hsm");
    if let Some(hsm) = &*slot {
        if hsm.module != settings.module {
            return Err(HsmError::Config(format!(
                "keys.pkcs11_module: this process already loaded {}; one module per process",
                hsm.module.display()
            )));
        }
        // One process, one cap: the smallest asked for (a test process
        // runs daemons of several configurations).
        hsm.max_sessions.fetch_min(
            settings.max_sessions.max(1),
            std::sync::atomic::Ordering::Relaxed,
        );
        return Ok(Arc::clone(hsm));
    }
    let module = &settings.module;
    let ctx = Pkcs11::new(module).map_err(|e| {
        HsmError::Config(format!(
            "keys.pkcs11_module: cannot load {}: {e}",
            module.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(HsmError::Config(format!(
                "keys.pkcs11_module: {} did not initialise: {e}",
                module.display()
            )));
        }
    }
    let hsm = Arc::new(Hsm {
        ctx,
        module: module.clone(),
        pin_file: settings.pin_file.clone(),
        max_sessions: std::sync::atomic::AtomicUsize::new(settings.max_sessions.max(1)),
        tokens: Mutex::new(HashMap::new()),
    });
    *slot = Some(Arc::clone(&hsm));
    Ok(hsm)
}

/// A session taken from a token's count: given back to the pool, or
/// closed (and its place in the count freed) when dropped, even by a
/// panic, so the cap can never shrink.
struct Checkout<'a> {
    token: &'a Token,
    session: Option<Session>,
}

impl Checkout<'_> {
    fn give_back(&mut self) {
        if let Some(session) = self.session.take() {
            // Under the count's lock, so a waiter cannot miss it.
            let _open = self.token.open.lock().expect("session count");
            self.token.sessions.lock().expect("sessions").push(session);
            self.token.returned.notify_one();
        }
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            drop(session);
            Hsm::closed(self.token);
        }
    }
}

/// Errors of the token or the link to it, as opposed to the request's.
fn unavailable(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::SessionCount
            | RvError::HostMemory
            | RvError::FunctionCanceled
            | RvError::UserNotLoggedIn
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
    )
}

fn classify(what: String, e: P11Error) -> HsmError {
    match e {
        P11Error::Pkcs11(rv, _) if unavailable(rv) => HsmError::Unavailable(format!("{what}: {e}")),
        _ => HsmError::Config(format!("{what}: {e}")),
    }
}

impl Hsm {
    fn read_pin(&self) -> Result<AuthPin, HsmError> {
        let raw = Zeroizing::new(std::fs::read_to_string(&self.pin_file).map_err(|e| {
            HsmError::Config(format!(
                "keys.pkcs11_pin_file {}: {e}",
                self.pin_file.display()
            ))
        })?);
        let pin = raw.trim_end_matches(['\n', '\r']);
        if pin.is_empty() {
            return Err(HsmError::Config(format!(
                "keys.pkcs11_pin_file {}: empty",
                self.pin_file.display()
            )));
        }
        Ok(AuthPin::new(pin.into()))
    }

    /// The token labelled `label`, logged in (once).
    pub fn token(&self, label: &str) -> Result<Arc<Token>, HsmError> {
        if let Some(t) = self.tokens.lock().expect("tokens").get(label) {
            return Ok(Arc::clone(t));
        }
        let slots = self
            .ctx
            .get_slots_with_token()
            .map_err(|e| classify("listing the PKCS#11 slots".into(), e))?;
        let slot = slots
            .into_iter()
            .find(|s| {
                self.ctx
                    .get_token_info(*s)
                    .is_ok_and(|i| i.label().trim_end() == label)
            })
            .ok_or_else(|| {
                HsmError::Config(format!(
                    "no token labelled {label:?} in {}",
                    self.module.display()
                ))
            })?;
        let mechanisms = self
            .ctx
            .get_mechanism_list(slot)
            .map_err(|e| classify(format!("token {label:?}: listing its mechanisms"), e))?;
        let session = self
            .ctx
            .open_ro_session(slot)
            .map_err(|e| classify(format!("token {label:?}: opening a session"), e))?;
        match session.login(UserType::User, Some(&self.read_pin()?)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(P11Error::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid, _)) => {
                return Err(HsmError::Config(format!(
                    "token {label:?}: the PIN in {} is wrong",
                    self.pin_file.display()
                )));
            }
            Err(e) => return Err(classify(format!("token {label:?}: login"), e)),
        }
        let token = Arc::new(Token {
            label: label.to_owned(),
            slot,
            _login: Mutex::new(session),
            sessions: Mutex::new(Vec::new()),
            open: Mutex::new(0),
            returned: std::sync::Condvar::new(),
            peak: std::sync::atomic::AtomicUsize::new(0),
            keys: Mutex::new(HashMap::new()),
            x25519: Mutex::new(HashMap::new()),
            mechanisms,
        });
        self.tokens
            .lock()
            .expect("tokens")
            .insert(label.to_owned(), Arc::clone(&token));
        Ok(token)
    }

    /// Drop what is known of a token that failed as a device: the next
    /// operation finds its slot, logs in and looks its keys up again (a
    /// token removed and put back, a network HSM that reconnected).
    fn forget(&self, token: &Token) {
        let mut tokens = self.tokens.lock().expect("tokens");
        if tokens
            .get(&token.label)
            .is_some_and(|t| std::ptr::eq(&**t, token))
        {
            tokens.remove(&token.label);
        }
    }

    /// A session of `token`: a pooled one, or a new one while fewer than
    /// `max_sessions` are open, else the next one given back.
    fn session(&self, token: &Token) -> Result<Session, HsmError> {
        let mut open = token.open.lock().expect("session count");
        loop {
            if let Some(s) = token.sessions.lock().expect("sessions").pop() {
                return Ok(s);
            }
            if *open < self.max_sessions.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            open = token.returned.wait(open).expect("session count");
        }
        *open += 1;
        token
            .peak
            .fetch_max(*open, std::sync::atomic::Ordering::Relaxed);
        drop(open);
        self.ctx.open_ro_session(token.slot).map_err(|e| {
            Self::closed(token);
            classify(format!("token {:?}: opening a session", token.label), e)
        })
    }

    /// The most operation sessions the token `label` had open at once in
    /// this process (`None`: not logged in yet).
    pub fn session_peak(&self, label: &str) -> Option<usize> {
        let tokens = self.tokens.lock().expect("tokens");
        let token = tokens.get(label)?;
        Some(token.peak.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// One operation session fewer (dropped, or never opened).
    fn closed(token: &Token) {
        *token.open.lock().expect("session count") -= 1;
        token.returned.notify_one();
    }

    /// Run `f` on a session of `token` (`Err`: no session could be had);
    /// the session goes back to the pool unless the token said it is gone.
    fn with_session<T>(
        &self,
        token: &Token,
        f: impl FnOnce(&Session) -> Result<T, P11Error>,
    ) -> Result<Result<T, P11Error>, HsmError> {
        let mut held = Checkout {
            token,
            session: Some(self.session(token)?),
        };
        let out = f(held.session.as_ref().expect("held"));
        let broken = matches!(&out, Err(P11Error::Pkcs11(rv, _)) if unavailable(*rv));
        if !broken {
            held.give_back();
        }
        // A broken session (or one `f` panicked with) is closed on drop.
        Ok(out)
    }

    /// The token does `CKM_AES_GCM` (opens `legacy-aes-gcm` wraps and
    /// sealed signing keys).
    pub fn does_aes_gcm(token: &Token) -> bool {
        token.mechanisms.contains(&MechanismType::AES_GCM)
    }

    /// The token does `CKM_ECDH1_DERIVE` (opens `legacy-x25519` wraps).
    pub fn does_x25519(token: &Token) -> bool {
        token.mechanisms.contains(&MechanismType::ECDH1_DERIVE)
    }

    /// The token does `CKM_ML_KEM` decapsulation (PKCS#11 3.2: opens the
    /// ML-KEM layers of `pqmig-wrap-v1` wraps).
    pub fn does_ml_kem(token: &Token) -> bool {
        token.mechanisms.contains(&MechanismType::ML_KEM)
    }

    /// The ML-KEM private key labelled `key` in `token` for `kem`,
    /// checked: an ML-KEM key of that parameter set allowed to
    /// decapsulate, the token does `CKM_ML_KEM`, its value cannot be read
    /// out, and, when it is first found, it decapsulates a random
    /// ciphertext and gives the secret out: so a token that refuses the
    /// operation or keeps the secret in is said once (`Unsupported`, its
    /// setup), before any wrap. An X-Wing key (no PKCS#11 mechanism of its
    /// own) is its two halves under one label: this ML-KEM-768 key and an
    /// X25519 key ([`Hsm::x25519_key`], checked here too), combined by
    /// pqmig ([`Hsm::ml_kem_decapsulate`]).
    pub fn ml_kem_key(&self, token: &Token, key: &str, kem: Kem) -> Result<ObjectHandle, HsmError> {
        let (set, part) = match kem {
            Kem::MlKem768 => (MlKemParameterSetType::ML_KEM_768, kem),
            Kem::MlKem1024 => (MlKemParameterSetType::ML_KEM_1024, kem),
            Kem::XWing => (MlKemParameterSetType::ML_KEM_768, Kem::MlKem768),
        };
        if !Self::does_ml_kem(token) {
            return Err(HsmError::Unsupported(format!(
                "token {:?} does not support CKM_ML_KEM, which decapsulating with {key:?} needs",
                token.label
            )));
        }
        if kem == Kem::XWing && !Self::does_x25519(token) {
            return Err(HsmError::Unsupported(format!(
                "token {:?} does not support CKM_ECDH1_DERIVE, which the X25519 half of X-Wing key {key:?} needs",
                token.label
            )));
        }
        let tried = format!("ml-kem-tried:{}:{key}", kem.alias());
        if let Some(h) = token.keys.lock().expect("keys").get(&tried) {
            return Ok(*h);
        }
        let set = ParameterSetType::from(set);
        let usage = [AttributeType::ParameterSet, AttributeType::Decapsulate];
        let kind = format!("ml-kem:{}", kem.alias());
        let private = self.key_object(
            token,
            ObjectClass::PRIVATE_KEY,
            key,
            &kind,
            &usage,
            |a| match a {
                Attribute::KeyType(t) => (*t == KeyType::ML_KEM, "not an ML-KEM key (CKK_ML_KEM)"),
                Attribute::ParameterSet(p) => (*p == set, "of another ML-KEM parameter set"),
                Attribute::Decapsulate(d) => (*d, "not allowed to decapsulate (CKA_DECAPSULATE)"),
                _ => (true, ""),
            },
        )?;
        let what = format!("token {:?} key {key:?}", token.label);
        let mut ct = vec![0u8; part.ciphertext_len()];
        rand::fill(&mut ct[..]);
        self.with_session(token, |s| decapsulate(s, private, &ct))?
            .map_err(|e| self.first_secret_error(token, &what, "ML-KEM decapsulation", e))?;
        if kem == Kem::XWing {
            self.x25519_key(token, key)?;
        }
        token.keys.lock().expect("keys").insert(tried, private);
        Ok(private)
    }

    /// What an error of a key's first secret (`operation`: the X25519
    /// agreement or ML-KEM decapsulation tried when the key is found)
    /// means: the token failing for now (a lost device, a general error:
    /// tried again later, the token forgotten), or not doing it at all
    /// (refusing the operation, its parameters or template, or keeping the
    /// secret sensitive: `Unsupported`, the token's setup).
    fn first_secret_error(
        &self,
        token: &Token,
        what: &str,
        operation: &str,
        e: P11Error,
    ) -> HsmError {
        match e {
            P11Error::Pkcs11(rv, _)
                if unavailable(rv)
                    || matches!(rv, RvError::GeneralError | RvError::FunctionFailed) =>
            {
                self.forget(token);
                HsmError::Unavailable(format!("{what}: {operation}: {e}"))
            }
            P11Error::InvalidValue => HsmError::Unsupported(format!(
                "{what}: the token does not give out the shared secret of its {operation} (CKA_VALUE of the key it makes), which pqmig's key derivation needs"
            )),
            e => HsmError::Unsupported(format!("{what}: {operation}: {e}")),
        }
    }

    /// The ML-KEM shared secret of `ct` under the token's key `key`,
    /// computed in the token (`C_DecapsulateKey`): it comes out as a
    /// session object that is read and destroyed at once; the private key
    /// stays in the token. ML-KEM rejects implicitly (a wrong ciphertext
    /// gives another secret, which the wrap's commitment catches), the
    /// caller checks the length before, and the key was seen to
    /// decapsulate when it was found: so any error here is the token's
    /// failing for now, [`HsmError::Unavailable`], the token forgotten.
    ///
    /// X-Wing: the ML-KEM-768 half decapsulates the first 1088 bytes, the
    /// X25519 half agrees with the last 32 (a low-order point gives the
    /// all-zero secret without asking the token, as X25519 does in
    /// process), and pqmig combines them with the X25519 public key.
    pub fn ml_kem_decapsulate(
        &self,
        token: &str,
        key: &str,
        kem: Kem,
        ct: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, HsmError> {
        metered("decrypt", || {
            let token = self.token(token)?;
            self.decapsulate_in(&token, key, kem, ct)
        })
    }

    /// [`Hsm::ml_kem_decapsulate`] in a token found, not counted.
    fn decapsulate_in(
        &self,
        token: &Token,
        key: &str,
        kem: Kem,
        ct: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, HsmError> {
        let what = format!("token {:?} key {key:?}", token.label);
        if ct.len() != kem.ciphertext_len() {
            return Err(HsmError::Config(format!(
                "{what}: a {} ciphertext is {} bytes, not {}",
                kem.alias(),
                kem.ciphertext_len(),
                ct.len()
            )));
        }
        let private = self.ml_kem_key(token, key, kem)?;
        let failing = |operation: &str, e: P11Error| {
            self.forget(token);
            HsmError::Unavailable(format!("{what}: {operation}: {e}"))
        };
        if kem != Kem::XWing {
            return self
                .with_session(token, |s| decapsulate(s, private, ct))?
                .map_err(|e| failing("ML-KEM decapsulation", e));
        }
        let (ct_m, ct_x) = ct.split_at(Kem::MlKem768.ciphertext_len());
        let ct_x: &[u8; 32] = ct_x.try_into().expect("length checked");
        let x = self.x25519_key(token, key)?;
        let ss_m = self
            .with_session(token, |s| decapsulate(s, private, ct_m))?
            .map_err(|e| failing("ML-KEM decapsulation", e))?;
        let ss_x = if wrap::x25519_contributory(ct_x) {
            let peer = wrap::x25519_canonical(ct_x);
            self.with_session(token, |s| derive_x25519(s, x.private, &peer))?
                .map_err(|e| failing("X25519 agreement", e))?
        } else {
            Zeroizing::new([0u8; 32])
        };
        Ok(kem::xwing_combine(&ss_m, &ss_x, ct_x, &x.public))
    }

    /// The encapsulation key of the token's ML-KEM key `key`, to wrap new
    /// layers to: the value of the `CKK_ML_KEM` public key object with the
    /// same label and parameter set (the one `C_GenerateKeyPair` made with
    /// it, or one imported beside it). It is checked to be the private
    /// key's: pqmig encapsulates to it and the token must decapsulate the
    /// same secret, so a public key object of another key (a label used
    /// twice) fails the job before any wrap is sealed to it.
    pub fn ml_kem_public(&self, token: &str, key: &str, kem: Kem) -> Result<Vec<u8>, HsmError> {
        self.ml_kem_public_object(token, key, kem)?.ok_or_else(|| {
            HsmError::Config(format!(
                "token {token:?} key {key:?}: no ML-KEM public key object with that label, which wrapping new layers to the key needs (keep the one C_GenerateKeyPair makes, or import the encapsulation key as a CKO_PUBLIC_KEY)"
            ))
        })
    }

    /// [`Hsm::ml_kem_public`], `None` when the token has no public key
    /// object of that label (the key can still decapsulate).
    pub fn ml_kem_public_object(
        &self,
        token: &str,
        key: &str,
        kem: Kem,
    ) -> Result<Option<Vec<u8>>, HsmError> {
        let token = self.token(token)?;
        let private = self.ml_kem_key(&token, key, kem)?;
        let what = format!("token {:?} key {key:?}", token.label);
        let found = self
            .with_session(&token, |s| {
                s.find_objects(&[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(KeyType::ML_KEM),
                    Attribute::Label(key.as_bytes().to_vec()),
                ])
            })?
            .map_err(|e| classify(what.clone(), e))?;
        let handle = match found[..] {
            [h] => h,
            [] => return Ok(None),
            _ => {
                return Err(HsmError::Config(format!(
                    "{what}: {} ML-KEM public key objects carry that label",
                    found.len()
                )));
            }
        };
        let attrs = self
            .with_session(&token, |s| {
                s.get_attributes(handle, &[AttributeType::ParameterSet, AttributeType::Value])
            })?
            .map_err(|e| classify(what.clone(), e))?;
        let mut public = None;
        let mut set = None;
        for a in attrs {
            match a {
                Attribute::Value(v) => public = Some(v),
                Attribute::ParameterSet(p) => set = Some(p),
                _ => {}
            }
        }
        let wanted = ParameterSetType::from(match kem {
            Kem::MlKem1024 => MlKemParameterSetType::ML_KEM_1024,
            _ => MlKemParameterSetType::ML_KEM_768,
        });
        if set.is_some_and(|p| p != wanted) {
            return Err(HsmError::Config(format!(
                "{what}: its public key object is of another ML-KEM parameter set"
            )));
        }
        let mut public = public.ok_or_else(|| {
            HsmError::Config(format!(
                "{what}: the token did not give the public key's value (CKA_VALUE)"
            ))
        })?;
        if kem == Kem::XWing {
            // pk_M || pk_X, the X25519 half's public key computed by the
            // token.
            public.extend_from_slice(&self.x25519_key(&token, key)?.public);
        }
        let (ct, expected) = kem::encapsulate(kem, &public)
            .map_err(|e| HsmError::Config(format!("{what}: its public key object: {}", e.0)))?;
        // One `decrypt` request of the provider, as a layer's opening is.
        let got = metered("decrypt", || match kem {
            Kem::XWing => self.decapsulate_in(&token, key, kem, &ct),
            _ => self
                .with_session(&token, |s| decapsulate(s, private, &ct))?
                .map_err(|e| self.first_secret_error(&token, &what, "ML-KEM decapsulation", e)),
        })?;
        if *got != *expected {
            return Err(HsmError::Config(format!(
                "{what}: its public key object is not the private key's (the token decapsulated another secret from a ciphertext sealed to it)"
            )));
        }
        Ok(Some(public))
    }

    /// The AES-256 secret key labelled `key` in `token`, checked: it can
    /// decrypt, the token does `CKM_AES_GCM`, and its value cannot be
    /// read out (sensitive or not extractable).
    pub fn aes_key(&self, token: &Token, key: &str) -> Result<ObjectHandle, HsmError> {
        if !Self::does_aes_gcm(token) {
            return Err(HsmError::Config(format!(
                "token {:?} does not support CKM_AES_GCM, which opening with {key:?} needs",
                token.label
            )));
        }
        let usage = [AttributeType::ValueLen, AttributeType::Decrypt];
        self.secret_key(token, key, "aes", &usage, |a| match a {
            Attribute::KeyType(t) => (*t == KeyType::AES, "not an AES key"),
            Attribute::ValueLen(n) => (u64::from(*n) == 32, "not 256 bits"),
            Attribute::Decrypt(d) => (*d, "not allowed to decrypt (CKA_DECRYPT)"),
            _ => (true, ""),
        })
    }

    /// The HMAC key labelled `key` in `token` for `hash`, checked: a
    /// generic secret (or that hash's HMAC key type) of at least 256 bits
    /// allowed to sign and verify, the token does the mechanism, and its
    /// value cannot be read out.
    pub fn hmac_key(
        &self,
        token: &Token,
        key: &str,
        hash: HmacHash,
    ) -> Result<ObjectHandle, HsmError> {
        let (mechanism, own_type) = hmac_mechanism(hash).ok_or_else(|| {
            HsmError::Config(format!(
                "the pkcs11 provider computes HMAC-SHA-256 and HMAC-SHA-512 only; {hash} with {key:?} is not supported yet"
            ))
        })?;
        if !token.mechanisms.contains(&mechanism.mechanism_type()) {
            return Err(HsmError::Config(format!(
                "token {:?} does not support {}, which {hash} with {key:?} needs",
                token.label,
                mechanism.mechanism_type()
            )));
        }
        let usage = [
            AttributeType::ValueLen,
            AttributeType::Sign,
            AttributeType::Verify,
        ];
        self.secret_key(token, key, "hmac", &usage, |a| match a {
            Attribute::KeyType(t) => (
                *t == KeyType::GENERIC_SECRET || *t == own_type,
                "not a generic secret or HMAC key",
            ),
            Attribute::ValueLen(n) => (
                u64::from(*n) >= crate::crypto::onion::MIN_PEPPER_LEN as u64,
                "shorter than 256 bits",
            ),
            Attribute::Sign(d) => (*d, "not allowed to sign (CKA_SIGN)"),
            Attribute::Verify(d) => (*d, "not allowed to verify (CKA_VERIFY)"),
            _ => (true, ""),
        })
    }

    /// The one secret key labelled `key` in `token`, its attributes
    /// (type, the `usage` attributes, sensitive, extractable) judged by
    /// `check` and by the rule that its value can never be read out; found
    /// once, then kept under `kind`.
    fn secret_key(
        &self,
        token: &Token,
        key: &str,
        kind: &str,
        usage: &[AttributeType],
        check: impl Fn(&Attribute) -> (bool, &'static str),
    ) -> Result<ObjectHandle, HsmError> {
        self.key_object(token, ObjectClass::SECRET_KEY, key, kind, usage, check)
    }

    /// The one key object of `class` labelled `key` in `token`, judged as
    /// [`Hsm::secret_key`] says.
    fn key_object(
        &self,
        token: &Token,
        class: ObjectClass,
        key: &str,
        kind: &str,
        usage: &[AttributeType],
        check: impl Fn(&Attribute) -> (bool, &'static str),
    ) -> Result<ObjectHandle, HsmError> {
        let cached = format!("{kind}:{key}");
        if let Some(h) = token.keys.lock().expect("keys").get(&cached) {
            return Ok(*h);
        }
        let what = format!("token {:?} key {key:?}", token.label);
        let noun = if class == ObjectClass::PRIVATE_KEY {
            "private key"
        } else {
            "secret key"
        };
        let found = self
            .with_session(token, |s| {
                s.find_objects(&[
                    Attribute::Class(class),
                    Attribute::Label(key.as_bytes().to_vec()),
                ])
            })?
            .map_err(|e| classify(what.clone(), e))?;
        // Several keys of a label (an X-Wing key's two halves): the one of
        // the kind wanted.
        let labelled = found.len();
        let found = if labelled > 1 {
            let mut kept = Vec::with_capacity(found.len());
            for h in found {
                let kind = self
                    .with_session(token, |s| s.get_attributes(h, &[AttributeType::KeyType]))?
                    .map_err(|e| classify(what.clone(), e))?;
                if kind.iter().all(|a| check(a).0) {
                    kept.push(h);
                }
            }
            kept
        } else {
            found
        };
        let handle = match found[..] {
            [h] => h,
            [] if labelled == 0 => {
                return Err(HsmError::Config(format!(
                    "{what}: no {noun} with that label"
                )));
            }
            [] => {
                return Err(HsmError::Config(format!(
                    "{what}: {labelled} {noun}s carry that label, none of the kind wanted"
                )));
            }
            _ => {
                return Err(HsmError::Config(format!(
                    "{what}: {} {noun}s carry that label",
                    found.len()
                )));
            }
        };
        let mut wanted = vec![
            AttributeType::KeyType,
            AttributeType::Sensitive,
            AttributeType::Extractable,
        ];
        wanted.extend_from_slice(usage);
        let attrs = self
            .with_session(token, |s| s.get_attributes(handle, &wanted))?
            .map_err(|e| classify(what.clone(), e))?;
        if attrs.len() != wanted.len() {
            return Err(HsmError::Config(format!(
                "{what}: the token did not say what kind of key it is ({} of {} attributes)",
                attrs.len(),
                wanted.len()
            )));
        }
        for a in &attrs {
            let (ok, why) = match a {
                Attribute::Sensitive(v) => (*v, "not sensitive: its value could be read out"),
                Attribute::Extractable(x) => (!*x, "extractable: it could leave the token"),
                other => check(other),
            };
            if !ok {
                return Err(HsmError::Config(format!("{what}: {why}")));
            }
        }
        token.keys.lock().expect("keys").insert(cached, handle);
        Ok(handle)
    }

    /// The X25519 private key labelled `key` in `token` and its public key,
    /// checked: an X25519 key (`CKK_EC_MONTGOMERY`, or `CKK_EC_EDWARDS` on
    /// curve25519 as SoftHSM keeps it) allowed to derive, the token does
    /// `CKM_ECDH1_DERIVE`, and its value cannot be read out. The public key
    /// is computed by the token, X25519(key, 9): so it is this key's, and
    /// the agreement works and gives its secret out, before any wrap is
    /// tried.
    pub fn x25519_key(&self, token: &Token, key: &str) -> Result<X25519Key, HsmError> {
        if !Self::does_x25519(token) {
            return Err(HsmError::Config(format!(
                "token {:?} does not support CKM_ECDH1_DERIVE, which X25519 agreement with {key:?} needs",
                token.label
            )));
        }
        if let Some(k) = token.x25519.lock().expect("x25519 keys").get(key) {
            return Ok(*k);
        }
        let usage = [AttributeType::EcParams, AttributeType::Derive];
        let private = self.key_object(
            token,
            ObjectClass::PRIVATE_KEY,
            key,
            "x25519",
            &usage,
            |a| match a {
                Attribute::KeyType(t) => (
                    *t == KeyType::EC_MONTGOMERY || *t == KeyType::EC_EDWARDS,
                    "not an X25519 key (CKK_EC_MONTGOMERY)",
                ),
                Attribute::EcParams(p) => (is_x25519_params(p), "not on curve25519 (X25519)"),
                Attribute::Derive(d) => (*d, "not allowed to derive (CKA_DERIVE)"),
                _ => (true, ""),
            },
        )?;
        let what = format!("token {:?} key {key:?}", token.label);
        let mut base = [0u8; 32];
        base[0] = 9;
        let public = self
            .with_session(token, |s| derive_x25519(s, private, &base))?
            .map_err(|e| self.first_secret_error(token, &what, "X25519 agreement", e))?;
        let found = X25519Key {
            private,
            public: *public,
        };
        token
            .x25519
            .lock()
            .expect("x25519 keys")
            .insert(key.to_owned(), found);
        Ok(found)
    }

    /// The public key of the token's X25519 key `key`.
    pub fn x25519_public(&self, token: &str, key: &str) -> Result<[u8; 32], HsmError> {
        let token = self.token(token)?;
        Ok(self.x25519_key(&token, key)?.public)
    }

    /// X25519(key, `peer`) computed in the token (`C_DeriveKey`,
    /// `CKM_ECDH1_DERIVE` with no KDF) and the key's public key: the shared
    /// secret comes out as a session object that is read and destroyed at
    /// once; the private key stays in the token. The caller refuses
    /// low-order points before (they are the data's fault), so any error
    /// here is the token's: [`HsmError::Unavailable`], the token forgotten.
    pub fn x25519_agree(
        &self,
        token: &str,
        key: &str,
        peer: &[u8; 32],
    ) -> Result<(Zeroizing<[u8; 32]>, [u8; 32]), HsmError> {
        metered("decrypt", || {
            let token = self.token(token)?;
            let k = self.x25519_key(&token, key)?;
            let what = format!("token {:?} key {key:?}", token.label);
            match self.with_session(&token, |s| derive_x25519(s, k.private, peer))? {
                Ok(shared) => Ok((shared, k.public)),
                Err(e) => {
                    self.forget(&token);
                    Err(HsmError::Unavailable(format!(
                        "{what}: X25519 agreement: {e}"
                    )))
                }
            }
        })
    }

    /// HMAC-`hash` of each message under the token's key `key`, computed
    /// in the token (`C_Sign`), full length; with `verify`, each MAC is
    /// also checked by the token (`C_Verify`), and `None` stands for one
    /// that does not verify. One session for the lot.
    pub fn hmac(
        &self,
        token: &str,
        key: &str,
        hash: HmacHash,
        messages: &[&[u8]],
        verify: bool,
    ) -> Result<Vec<Option<Vec<u8>>>, HsmError> {
        metered("mac", || {
            let token = self.token(token)?;
            let handle = self.hmac_key(&token, key, hash)?;
            let (mechanism, _) = hmac_mechanism(hash).expect("checked by hmac_key");
            let what = format!("token {:?} key {key:?}", token.label);
            self.with_session(&token, |s| {
                let mut out = Vec::with_capacity(messages.len());
                for m in messages {
                    let mac = s.sign(&mechanism, handle, m)?;
                    let good = !verify
                        || match s.verify(&mechanism, handle, m, &mac) {
                            Ok(()) => true,
                            Err(P11Error::Pkcs11(
                                RvError::SignatureInvalid | RvError::SignatureLenRange,
                                _,
                            )) => false,
                            Err(e) => return Err(e),
                        };
                    out.push(good.then_some(mac));
                }
                Ok(out)
            })?
            .map_err(|e| {
                if matches!(&e, P11Error::Pkcs11(rv, _) if unavailable(*rv)) {
                    self.forget(&token);
                }
                classify(format!("{what}: HMAC"), e)
            })
        })
    }

    /// nonce(12) || AES-256-GCM(key, nonce, plain, aad), sealed in the
    /// token with a fresh random nonce (sealing a signing key).
    pub fn aes_gcm_seal(
        &self,
        token: &str,
        key: &str,
        plain: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        metered("encrypt", || self.seal(token, key, plain, aad))
    }

    /// nonce(12) || AES-256-GCM ciphertext || tag(16), opened in the token.
    pub fn aes_gcm_open(
        &self,
        token: &str,
        key: &str,
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        metered("decrypt", || self.open(token, key, sealed, aad))
    }

    fn seal(&self, token: &str, key: &str, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, HsmError> {
        let token = self.token(token)?;
        let handle = self.aes_key(&token, key)?;
        let what = format!("token {:?} key {key:?}", token.label);
        // A token in FIPS mode chooses the IV itself and writes it back.
        let mut iv: [u8; 12] = rand::random();
        let sealed = self
            .with_session(&token, |s| {
                let params = GcmParams::new(&mut iv, aad, 128.into())?;
                s.encrypt(&Mechanism::AesGcm(params), handle, plain)
            })?
            .map_err(|e| {
                if matches!(&e, P11Error::Pkcs11(rv, _) if unavailable(*rv)) {
                    self.forget(&token);
                }
                classify(format!("{what}: encrypting"), e)
            })?;
        Ok([&iv[..], &sealed].concat())
    }

    fn open(
        &self,
        token: &str,
        key: &str,
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let token = self.token(token)?;
        let handle = self.aes_key(&token, key)?;
        let what = format!("token {:?} key {key:?}", token.label);
        if sealed.len() < 12 + 16 {
            return Err(HsmError::Authentication(what));
        }
        let (nonce, body) = sealed.split_at(12);
        let mut iv = [0u8; 12];
        iv.copy_from_slice(nonce);
        let out = self.with_session(&token, |s| {
            let params = GcmParams::new(&mut iv, aad, 128.into())?;
            s.decrypt(&Mechanism::AesGcm(params), handle, body)
        })?;
        match out {
            Ok(plain) => Ok(Zeroizing::new(plain)),
            // A failed tag, as the standard says it.
            Err(P11Error::Pkcs11(
                RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                _,
            )) => Err(HsmError::Authentication(what)),
            // SoftHSM says CKR_GENERAL_ERROR for a failed tag; so might a
            // failing device. A test string that seals and opens with the
            // same key tells them apart.
            Err(P11Error::Pkcs11(RvError::GeneralError, _)) if self.probe(&token, handle) => {
                Err(HsmError::Authentication(what))
            }
            // Anything else is the token's trouble, never the data's.
            Err(e) => {
                self.forget(&token);
                Err(HsmError::Unavailable(format!("{what}: {e}")))
            }
        }
    }

    /// Whether the key works: a test string sealed and opened with it.
    fn probe(&self, token: &Token, handle: ObjectHandle) -> bool {
        const PROBE: &[u8] = b"pqmig pkcs11 probe";
        let mut iv: [u8; 12] = rand::random();
        let out = self.with_session(token, |s| {
            let params = GcmParams::new(&mut iv, b"", 128.into())?;
            let sealed = s.encrypt(&Mechanism::AesGcm(params), handle, PROBE)?;
            let params = GcmParams::new(&mut iv, b"", 128.into())?;
            s.decrypt(&Mechanism::AesGcm(params), handle, &sealed)
        });
        matches!(out, Ok(Ok(plain)) if plain == PROBE)
    }
}

/// An X25519 private key in a token and its public key.
#[derive(Debug, Clone, Copy)]
pub struct X25519Key {
    private: ObjectHandle,
    pub public: [u8; 32],
}

/// DER of the curve25519 (X25519) OID 1.3.101.110, and its name as a
/// PrintableString, the two `CKA_EC_PARAMS` forms PKCS#11 3.0 allows.
fn is_x25519_params(p: &[u8]) -> bool {
    const OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x6e];
    const NAME: &[u8] = b"\x13\x0acurve25519";
    p == OID || p == NAME
}

/// The raw X25519 shared secret of `private` and `peer`, as a session
/// object read out and destroyed.
fn derive_x25519(
    s: &Session,
    private: ObjectHandle,
    peer: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, P11Error> {
    use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
    let mechanism = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), peer));
    let derived = s.derive_key(&mechanism, private, &shared_template())?;
    read_secret(s, derived)
}

/// The ML-KEM shared secret of `ct` under `private`, as a session object
/// read out and destroyed.
fn decapsulate(
    s: &Session,
    private: ObjectHandle,
    ct: &[u8],
) -> Result<Zeroizing<[u8; 32]>, P11Error> {
    let secret = s.decapsulate_key(&Mechanism::MlKem, private, &shared_template(), ct)?;
    read_secret(s, secret)
}

/// How a shared secret comes out of the token: a 32-byte generic secret
/// session object whose value can be read.
fn shared_template() -> [Attribute; 6] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

/// The value of the 32-byte secret session object `derived`, which is
/// destroyed whatever the read gives.
fn read_secret(s: &Session, derived: ObjectHandle) -> Result<Zeroizing<[u8; 32]>, P11Error> {
    let read = s.get_attributes(derived, &[AttributeType::Value]);
    // Destroyed whatever the read gave.
    let destroyed = s.destroy_object(derived);
    let mut shared = Zeroizing::new([0u8; 32]);
    let mut found = false;
    for a in read? {
        if let Attribute::Value(mut v) = a {
            found = v.len() == shared.len();
            if found {
                shared.copy_from_slice(&v);
            }
            v.zeroize();
        }
    }
    destroyed?;
    // A token that keeps derived secrets sensitive gives no value (cryptoki
    // leaves the attribute out): never an all-zero secret.
    if !found || shared.iter().all(|b| *b == 0) {
        return Err(P11Error::InvalidValue);
    }
    Ok(shared)
}

/// The token's mechanism for HMAC-`hash`, and the key type of its own
/// (SHA-3 HMAC has no mechanism in cryptoki yet).
fn hmac_mechanism(hash: HmacHash) -> Option<(Mechanism<'static>, KeyType)> {
    match hash {
        HmacHash::Sha256 => Some((Mechanism::Sha256Hmac, KeyType::SHA256_HMAC)),
        HmacHash::Sha512 => Some((Mechanism::Sha512Hmac, KeyType::SHA512_HMAC)),
        HmacHash::Sha3_256 | HmacHash::Sha3_512 => None,
    }
}

/// Count and time one operation (login and key lookup included).
fn metered<T>(operation: &str, f: impl FnOnce() -> Result<T, HsmError>) -> Result<T, HsmError> {
    let started = std::time::Instant::now();
    let out = f();
    let outcome = match &out {
        Ok(_) => "ok",
        Err(HsmError::Authentication(_)) => "integrity",
        Err(HsmError::Config(_) | HsmError::Unsupported(_)) => "refused",
        Err(HsmError::Unavailable(_)) => "unavailable",
    };
    super::meter::observe("pkcs11", operation, outcome, started.elapsed());
    out
}
