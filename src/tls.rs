//! TLS termination: a rustls server config from PEM files, with ALPN offering HTTP/2
//! and HTTP/1.1. Loaded at start and again on SIGHUP; a listener reads the current
//! one per connection. Every worker has a TLS socket of its own (like the plain
//! ones), and all share one set of session-ticket keys, so a client resumes on
//! whichever worker it lands; the keys outlive reloads and rotate every 6 hours.

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::TlsConfig;

/// TLS settings a listener reads per connection, so a reload swaps certificates for
/// new connections without touching open ones. Shared by every worker's TLS
/// listener, so a ticket one worker issued resumes on any other.
pub type TlsSource = Arc<Tls>;

/// The server config in force and the session-ticket keys, which outlive reloads (a
/// certificate swap does not log every client out of resumption).
pub struct Tls {
    current: ArcSwap<rustls::ServerConfig>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("session_tickets", &self.ticketer.is_some())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the PEM files; makes the ticket keys when `session_tickets` is on.
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        let ticketer = if config.session_tickets {
            Some(provider::ticketer().map_err(TlsError::Tickets)?)
        } else {
            None
        };
        let server = server_config(config, ticketer.as_ref())?;
        Ok(Self {
            current: ArcSwap::from_pointee(server),
            ticketer,
        })
    }

    /// Swaps in a config read from `config`'s files, for new connections.
    pub fn reload(&self, config: &TlsConfig) -> Result<(), TlsError> {
        let server = server_config(config, self.ticketer.as_ref())?;
        self.current.store(Arc::new(server));
        Ok(())
    }

    /// The acceptor for one new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// The server's crypto provider, chosen at build time by measurement (docs/performance.md):
/// aws-lc-rs (the default `aws-lc` feature; a full handshake on an RSA
/// certificate costs 0.6x the CPU it does with *ring*, the rest is even), else *ring*.
mod provider {
    use std::sync::Arc;

    #[cfg(not(feature = "aws-lc"))]
    use rustls::crypto::ring as chosen;

    #[cfg(feature = "aws-lc")]
    use rustls::crypto::aws_lc_rs as chosen;

    pub fn get() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(chosen::default_provider())
    }

    /// Ticket keys that rotate every 6 hours; a ticket is accepted for at most 12.
    pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
        chosen::Ticketer::new()
    }
}

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls.cert_path {path}: {message}")]
    Cert { path: String, message: String },
    #[error("server.tls.key_path {path}: {message}")]
    Key { path: String, message: String },
    #[error("server.tls: certificate and key do not form a usable pair: {0}")]
    Pair(#[source] rustls::Error),
    #[error("server.tls.session_tickets: cannot make the ticket keys: {0}")]
    Tickets(#[source] rustls::Error),
}

/// Reads the PEM files and builds the server config (what `canarygate check` runs).
pub fn server_config(
    config: &TlsConfig,
    ticketer: Option<&Arc<dyn rustls::server::ProducesTickets>>,
) -> Result<rustls::ServerConfig, TlsError> {
    // The process-wide provider, for the clients (Redis, SMTP, webhooks) that ask for it;
    // a second install is refused harmlessly.
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
    let mut server = rustls::ServerConfig::builder_with_provider(provider::get())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Pair)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Pair)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if let Some(ticketer) = ticketer {
        // Stateless resumption (TLS 1.3 and 1.2): nothing to share between workers but
        // the keys, and no per-client memory.
        server.ticketer = Arc::clone(ticketer);
    }
    Ok(server)
}
