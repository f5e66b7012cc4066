//! Optional TLS on peer links ([`crate::TcpConfig::tls`]): rustls (ring provider),
//! mutual authentication against a cluster CA.
//!
//! Every replica presents its certificate both as a server (to dialers) and as a
//! client (to the peers it dials), and verifies the other side's certificate against
//! the CA. A dialer also checks the acceptor's certificate for the peer's name
//! ([`PeerTls::server_names`], by default the IP address it dials). The TLS handshake
//! runs first, non-blocking inside the transport's poll loop; the HELLO (and secret)
//! handshake and every frame then travel inside TLS.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use transport::PeerId;

/// TLS settings of the peer links.
#[derive(Clone)]
pub struct PeerTls {
    /// For accepting peers: our certificate chain and key, and (for mutual TLS) a
    /// verifier of the dialer's certificate.
    pub server: Arc<rustls::ServerConfig>,
    /// For dialing peers: the trusted roots and (for mutual TLS) our certificate.
    pub client: Arc<rustls::ClientConfig>,
    /// The name each peer's certificate must carry. A peer not listed must carry
    /// [`PeerTls::default_server_name`], or if that is `None` the IP address dialed.
    pub server_names: BTreeMap<PeerId, ServerName<'static>>,
    /// See [`PeerTls::server_names`].
    pub default_server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("server_names", &self.server_names)
            .field("default_server_name", &self.default_server_name)
            .finish_non_exhaustive()
    }
}

/// Why a [`PeerTls`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("{what} {path}: {detail}")]
    File {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the configuration (for example a key that does not match).
    #[error("peer TLS configuration: {0}")]
    Config(String),
}

fn file_err(what: &'static str, path: &Path, detail: String) -> TlsSetupError {
    TlsSetupError::File { what, path: path.display().to_string(), detail }
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(what, path, format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no certificate in it".into()));
    }
    Ok(certs)
}

impl PeerTls {
    /// Mutual TLS from PEM files: this replica's certificate chain and private key, and
    /// the cluster CA that signed every replica's certificate. Each certificate must be
    /// valid for both server and client authentication and carry the name peers dial
    /// it by (by default its IP address).
    pub fn from_pem_files(cert_file: &Path, key_file: &Path, ca_file: &Path) -> Result<PeerTls, TlsSetupError> {
        let chain = certs(cert_file, "peer TLS certificate file")?;
        let key_bytes = std::fs::read(key_file)
            .map_err(|e| file_err("peer TLS key file", key_file, format!("cannot read it: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| file_err("peer TLS key file", key_file, format!("no PEM private key in it: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca_file, "peer TLS CA file")? {
            roots
                .add(c)
                .map_err(|e| file_err("peer TLS CA file", ca_file, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone())
            .build()
            .map_err(|e| TlsSetupError::Config(e.to_string()))?;
        let server = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsSetupError::Config(e.to_string()))?;
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsSetupError::Config(e.to_string()))?;
        Ok(PeerTls {
            server: Arc::new(server),
            client: Arc::new(client),
            server_names: BTreeMap::new(),
            default_server_name: None,
        })
    }

    /// The name `peer`'s certificate must carry when dialed at `addr`.
    pub(crate) fn name_of(&self, peer: PeerId, addr: SocketAddr) -> ServerName<'static> {
        self.server_names
            .get(&peer)
            .or(self.default_server_name.as_ref())
            .cloned()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }
}
