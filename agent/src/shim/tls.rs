//! TLS for listeners: rustls with the ring provider (no aws-lc, no OpenSSL), and
//! certificate reload when the files change, without dropping connections.

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use anyhow::Context as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::net::TcpStream;
use tokio_rustls::{rustls, server::TlsStream};

use crate::config::TlsConfig;

fn server_config(tls: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("reading {}", tls.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", tls.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", tls.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("reading the private key in {}", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The acceptor in use and the files' modification times it was built from.
type Loaded = (
    tokio_rustls::TlsAcceptor,
    Option<SystemTime>,
    Option<SystemTime>,
);

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A TLS acceptor whose certificate can be swapped while it serves.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: TlsConfig,
    current: Arc<RwLock<Loaded>>,
}

impl TlsAcceptor {
    pub fn load(config: &TlsConfig) -> anyhow::Result<Self> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(config)?));
        Ok(Self {
            config: config.clone(),
            current: Arc::new(RwLock::new((
                acceptor,
                mtime(&config.cert),
                mtime(&config.key),
            ))),
        })
    }

    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let acceptor = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone();
        acceptor.accept(stream).await
    }

    /// Reload when the certificate or key file changed. A broken new pair is
    /// logged and the old one kept. Returns whether a new pair is in use.
    pub fn reload_if_changed(&self) -> bool {
        let (cert_m, key_m) = (mtime(&self.config.cert), mtime(&self.config.key));
        {
            let cur = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cur.1 == cert_m && cur.2 == key_m {
                return false;
            }
        }
        match server_config(&self.config) {
            Ok(c) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    (tokio_rustls::TlsAcceptor::from(Arc::new(c)), cert_m, key_m);
                tracing::info!(cert = %self.config.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "TLS certificate change not applied; keeping the previous one");
                false
            }
        }
    }
}
