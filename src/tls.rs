//! TLS termination: a rustls server config from PEM files, with ALPN offering HTTP/2
//! and HTTP/1.1. Loaded at start and again on SIGHUP; a listener reads the current
//! one per connection.

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::TlsConfig;

/// TLS settings a listener reads per connection, so a reload swaps certificates for
/// new connections without touching open ones.
pub type TlsSource = Arc<ArcSwap<rustls::ServerConfig>>;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls.cert_path {path}: {message}")]
    Cert { path: String, message: String },
    #[error("server.tls.key_path {path}: {message}")]
    Key { path: String, message: String },
    #[error("server.tls: certificate and key do not form a usable pair: {0}")]
    Pair(#[source] rustls::Error),
}

/// Reads the PEM files and builds the server config.
pub fn server_config(config: &TlsConfig) -> Result<rustls::ServerConfig, TlsError> {
    // rustls needs a process-wide crypto provider; a second install is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert_path = config.cert_path.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_path)
        .and_then(Iterator::collect)
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert_path,
            message: "no certificate in the file".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_path).map_err(|e| TlsError::Key {
        path: config.key_path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Pair)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}
