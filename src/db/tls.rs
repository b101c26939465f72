//! TLS for every database connection (the pool, LISTEN, the CLI's), with
//! the `sslmode` semantics of libpq.
//!
//! rustls through tokio-postgres-rustls rather than postgres-native-tls:
//! the same certificate checks on every host (no dependency on the
//! system's OpenSSL version or its configuration), memory-safe, and
//! `tls-server-end-point` channel binding for SCRAM-SHA-256-PLUS. The
//! crypto provider is `ring`: pure Rust plus assembly, so the build needs
//! no cmake or C toolchain as aws-lc-rs does, and it is fast enough for a
//! handshake per pooled connection.
//!
//! Certificate checks by mode: `verify-full` checks the chain against
//! `sslrootcert` and the host name; `verify-ca` the chain only; `require`
//! and `prefer` check the chain only when `sslrootcert` is configured
//! (libpq's rule) and otherwise encrypt without authenticating the server.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::Socket;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseConfig, SslMode};

/// The stream of a TLS (or, under `prefer`/`disable`, plain) connection.
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;

/// A handshake failure, said the way an operator can act on it, e.g.
/// "database TLS: server certificate not valid for host name 127.0.0.2
/// (sslmode=verify-full)". tokio-postgres keeps it as the error's source.
#[derive(Debug, thiserror::Error)]
#[error("database TLS: {reason} (sslmode={mode})")]
pub struct TlsFailure {
    pub reason: String,
    pub mode: SslMode,
}

/// Build the connector once per pool (or per CLI connection).
#[derive(Clone)]
pub struct Connector {
    inner: MakeRustlsConnect,
    mode: SslMode,
    rootcert: Option<String>,
}

impl Connector {
    pub fn new(cfg: &DatabaseConfig) -> anyhow::Result<Connector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &cfg.sslrootcert {
            Some(rc) => {
                let mut store = RootCertStore::empty();
                for cert in &rc.certs {
                    store.add(cert.clone()).map_err(|e| {
                        anyhow::anyhow!(
                            "database.sslrootcert: {} holds a certificate that cannot be a trust anchor: {e}",
                            rc.path.display()
                        )
                    })?;
                }
                Some(Arc::new(store))
            }
            None => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (cfg.sslmode, roots) {
            (SslMode::VerifyFull, Some(roots)) => {
                WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider)).build()?
            }
            (_, Some(roots)) => Arc::new(ChainOnly(
                WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                    .build()?,
            )),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                anyhow::bail!(
                    "database.sslmode: {} needs database.sslrootcert",
                    cfg.sslmode
                )
            }
            (_, None) => Arc::new(Unauthenticated(Arc::clone(&provider))),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // What libpq sends; required by servers when sslnegotiation=direct.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Connector {
            inner: MakeRustlsConnect::new(config),
            mode: cfg.sslmode,
            rootcert: cfg
                .sslrootcert
                .as_ref()
                .map(|rc| rc.path.display().to_string()),
        })
    }
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = TlsStream;
    type TlsConnect = Connect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, Self::Error> {
        let inner =
            <MakeRustlsConnect as MakeTlsConnect<Socket>>::make_tls_connect(&mut self.inner, host)?;
        Ok(Connect {
            inner,
            host: host.to_owned(),
            mode: self.mode,
            rootcert: self.rootcert.clone(),
        })
    }
}

pub struct Connect {
    inner: RustlsConnect,
    host: String,
    mode: SslMode,
    rootcert: Option<String>,
}

impl TlsConnect<Socket> for Connect {
    type Stream = TlsStream;
    type Error = TlsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream, TlsFailure>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let Connect {
            inner,
            host,
            mode,
            rootcert,
        } = self;
        Box::pin(async move {
            inner.connect(stream).await.map_err(|e| TlsFailure {
                reason: explain(&e, &host, rootcert.as_deref()),
                mode,
            })
        })
    }
}

/// The reason of a failed handshake in an operator's words.
fn explain(e: &std::io::Error, host: &str, rootcert: Option<&str>) -> String {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return format!("handshake failed: {e}");
    };
    let ca = rootcert.unwrap_or("sslrootcert");
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("server certificate not valid for host name {host}")
            }
            CertificateError::UnknownIssuer => {
                format!("server certificate not issued by a CA in {ca}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "server certificate expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "server certificate not valid yet (check the clocks)".into()
            }
            CertificateError::BadSignature => format!(
                "server certificate signature does not verify with the CA in {ca} (another CA of the same name?)"
            ),
            CertificateError::Revoked => "server certificate revoked".into(),
            other => format!("server certificate rejected: {other}"),
        },
        other => format!("handshake failed: {other}"),
    }
}

/// `verify-ca` (and `require`/`prefer` with a CA): the chain must lead to
/// `sslrootcert`; the host name is not checked. webpki checks the chain
/// before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require`/`prefer` without a CA, as libpq: encrypted, but the server is
/// not authenticated (any certificate). The handshake signature is still
/// checked, so the session key belongs to whoever holds that certificate.
#[derive(Debug)]
struct Unauthenticated(Arc<CryptoProvider>);

impl ServerCertVerifier for Unauthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
