//! The tenant API's TLS: a self-signed identity kept in the state dir,
//! pinned by its SHA-256 fingerprint, and the listener that serves it.
//!
//! Invariants:
//! - the key file is written 0600 in a 0700 directory, atomically (a
//!   crash leaves the old pair or the new one, never half of one), and is
//!   never logged; the fingerprint is of the certificate, public;
//! - the pinned client accepts exactly one end-entity certificate, and
//!   still checks the handshake's signature with that certificate's key,
//!   so presenting the (public) certificate without its key fails;
//! - the listener runs each handshake in its own task with a deadline and
//!   a cap on those in flight: a client that never finishes its handshake
//!   holds one slot for [`HANDSHAKE_TIMEOUT`], not the accept loop.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::AccessError;

/// Longest a TLS handshake may take before its connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in flight; connections beyond are closed at once.
pub const MAX_HANDSHAKES: usize = 256;

/// The SHA-256 of a certificate's DER, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = AccessError;

    /// 64 hex digits; `:` separators (as openssl prints them) are allowed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits: String = s.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out)
            .map_err(|_| AccessError::InvalidFingerprint(s.chars().take(100).collect()))?;
        Ok(Fingerprint(out))
    }
}

/// The server's certificate and key.
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

const CERT_FILE: &str = "cert.der";
const KEY_FILE: &str = "key.der";

impl TlsIdentity {
    /// The identity kept in `dir`, made (self-signed for `names`) when
    /// there is none. An existing one is kept whatever its names: consumers
    /// pin its fingerprint, so it must not change under them.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<TlsIdentity, AccessError> {
        let io = |what: String| move |source| AccessError::Io { what, source };
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if cert_path.exists() || key_path.exists() {
            let cert = std::fs::read(&cert_path).map_err(io(cert_path.display().to_string()))?;
            let key = std::fs::read(&key_path).map_err(io(key_path.display().to_string()))?;
            let mode = std::fs::metadata(&key_path)
                .map_err(io(key_path.display().to_string()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(AccessError::KeyMode {
                    path: key_path.display().to_string(),
                    mode: mode & 0o777,
                });
            }
            return Ok(TlsIdentity {
                cert: CertificateDer::from(cert),
                key: PrivatePkcs8KeyDer::from(key),
            });
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir.display().to_string()))?;
        let made = rcgen::generate_simple_self_signed(names.to_vec())?;
        let id = TlsIdentity {
            cert: made.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()),
        };
        // The key first, then the certificate: `exists` above looks at
        // either, and a pair is complete once the certificate is there.
        write_atomic(&key_path, id.key.secret_pkcs8_der(), 0o600)?;
        write_atomic(&cert_path, id.cert.as_ref(), 0o644)?;
        Ok(id)
    }

    /// The certificate's fingerprint, as offers publish it.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.cert.as_ref())
    }

    /// A rustls server config (TLS 1.2 and 1.3, ring) for this identity.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, AccessError> {
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        Ok(Arc::new(cfg))
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AccessError> {
    let io = |source| AccessError::Io {
        what: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config that trusts exactly the certificate `pin` names. The
/// fingerprint the server presented is written to `seen`, so a mismatch
/// can be reported with both.
pub fn pinned_client_config(
    pin: Fingerprint,
    seen: Arc<Mutex<Option<Fingerprint>>>,
) -> Result<Arc<ClientConfig>, AccessError> {
    let p = provider();
    let verifier = Pinned {
        pin,
        seen,
        algs: p.signature_verification_algorithms,
    };
    let cfg = ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct Pinned {
    pin: Fingerprint,
    seen: Arc<Mutex<Option<Fingerprint>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity.as_ref());
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(got);
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A TCP listener that hands out finished TLS streams, for `axum::serve`.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accept_task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!("tenant API accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(
                        "tenant API: {MAX_HANDSHAKES} handshakes in flight; closing {peer}"
                    );
                    continue;
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("tenant API handshake from {peer}: {e}"),
                        Err(_) => tracing::debug!("tenant API handshake from {peer} timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            rx,
            local,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (it never does while the listener
            // lives): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
