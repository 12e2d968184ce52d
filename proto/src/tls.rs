//! Transport security: TLS on every connection to a node, mutual between nodes.
//!
//! A cluster has its own certificate authority (`skiffd certs` makes it). Every node holds a
//! certificate the CA signed, naming the hosts it is reached at. A node's listener always
//! completes a TLS handshake before it reads a byte of RPC:
//!
//! - a **client** checks the node's certificate against the CA and the host it dialed, so its
//!   bearer token only ever crosses an encrypted channel to a real member;
//! - a **node** dialing a peer also presents its own certificate; the listener verifies it
//!   against the CA and serves the peer service (Raft votes, appends, snapshots, forwarded
//!   reads) only on a connection that presented one. A process without a CA-signed
//!   certificate cannot join, vote or read.
//!
//! Only the cluster's CA is trusted (no system roots): the CA key signs nothing but node
//! certificates, so "signed by the CA" means "a node of this cluster".

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Largest PEM file read (a CA bundle, a certificate chain or a key).
pub const PEM_FILE_BYTES_MAX: u64 = 256 * 1024;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Read(String),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::files::read_bounded(path, PEM_FILE_BYTES_MAX, "PEM file").map_err(TlsError::Read)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let invalid = |message: String| TlsError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("holds no certificate".into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        path: path.to_path_buf(),
        message: format!("no PEM private key: {e}"),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            path: ca.to_path_buf(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The dialing side: trusts the cluster CA and, on a node, presents the node's certificate.
#[derive(Clone)]
pub struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector").finish_non_exhaustive()
    }
}

impl TlsConnector {
    /// A client's connector: checks nodes against the CA in `ca` (PEM), presents nothing.
    pub fn client(ca: &Path) -> Result<TlsConnector, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        Ok(TlsConnector {
            connector: Arc::new(config).into(),
        })
    }

    /// A node's connector to its peers: checks them against `ca` and presents `cert`/`key`.
    pub fn node(ca: &Path, cert: &Path, key: &Path) -> Result<TlsConnector, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_root_certificates(roots(ca)?)
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(config_err)?;
        Ok(TlsConnector {
            connector: Arc::new(config).into(),
        })
    }

    /// Runs the handshake on `tcp`, checking the certificate names `host`.
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> std::io::Result<Conn> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host:?} is not a host name or address for TLS: {e}"),
            )
        })?;
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TLS handshake with {host} timed out after {HANDSHAKE_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("TLS handshake with {host}: {e}"))
            })?;
        Ok(Conn::Tls(Box::new(tls.into())))
    }
}

/// The listening side of a node: its certificate, and the CA that peers' certificates must
/// chain to. Clients may connect without a certificate; whether one was presented is what
/// [`Conn::peer_verified`] tells.
#[derive(Clone)]
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor").finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    pub fn node(ca: &Path, cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certificates(cert)?, private_key(key)?)
            .map_err(config_err)?;
        Ok(TlsAcceptor {
            acceptor: Arc::new(config).into(),
        })
    }

    /// Runs the server side of the handshake on `tcp`.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Conn> {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
        Ok(Conn::Tls(Box::new(tls.into())))
    }
}

/// One connection to or from a node: TLS, or plaintext on a cluster configured without it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Conn {
    /// Whether the other side presented a certificate the CA signed (only a listener's
    /// connections can say yes; the verifier refused the handshake for any other certificate).
    pub fn peer_verified(&self) -> bool {
        match self {
            Conn::Plain(_) => false,
            Conn::Tls(tls) => match tls.as_ref() {
                tokio_rustls::TlsStream::Server(s) => s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_some_and(|c| !c.is_empty()),
                tokio_rustls::TlsStream::Client(_) => false,
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
