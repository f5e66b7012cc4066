//! TLS for the client port (rustls, ring provider): loading the server's certificate
//! chain and key, and a client configuration trusting a CA file.
//!
//! With `[security] tls_cert_file` and `tls_key_file` set, the client port speaks TLS
//! only (1.2 or 1.3): a plaintext client fails its handshake and is logged. The client
//! library speaks TLS when [`ClientConfig::tls`](super::ClientConfig) is set, verifying
//! the server's certificate against the CA file for the given server name.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("{what} {}: {detail}", path.display())]
    File {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the configuration (for example a key that does not match).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |detail: String| TlsError::File { what, path: path.to_path_buf(), detail };
    let bytes = std::fs::read(path).map_err(|e| file(format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file("no certificate in it".into()));
    }
    Ok(certs)
}

/// The server side: the certificate chain in `cert_file` and the private key in
/// `key_file` (PEM).
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(cert_file, "TLS certificate file")?;
    let bytes = std::fs::read(key_file).map_err(|e| TlsError::File {
        what: "TLS key file",
        path: key_file.to_path_buf(),
        detail: format!("cannot read it: {e}"),
    })?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
        what: "TLS key file",
        path: key_file.to_path_buf(),
        detail: format!("no PEM private key in it: {e}"),
    })?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// What a client needs to speak TLS to the client port.
#[derive(Clone)]
pub struct TlsClientConfig {
    /// The rustls configuration (trusted roots).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry (a DNS name or an IP address).
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClientConfig{{server_name: {:?}}}", self.server_name)
    }
}

impl TlsClientConfig {
    /// Trusts the certificates in `ca_file` (PEM) and expects `server_name`.
    pub fn from_ca_file(ca_file: &Path, server_name: &str) -> Result<TlsClientConfig, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca_file, "TLS CA file")? {
            roots.add(c).map_err(|e| TlsError::File {
                what: "TLS CA file",
                path: ca_file.to_path_buf(),
                detail: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let server_name =
            ServerName::try_from(server_name.to_string()).map_err(|_| TlsError::ServerName(server_name.into()))?;
        Ok(TlsClientConfig { config: Arc::new(config), server_name })
    }
}
