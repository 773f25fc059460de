//! TLS termination with rustls (aws-lc-rs provider) from PEM files. The certificate sits behind
//! a resolver holding an `ArcSwap`, so a reload replaces it for new handshakes while existing
//! connections keep theirs.

use super::StartError;
use crate::config::TlsConfig;
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// The current certificate, swappable at reload.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertResolver {
    /// Loads the files and replaces the certificate (new handshakes only).
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), StartError> {
        self.current.store(Arc::new(load(cfg)?));
        Ok(())
    }
}

fn load(cfg: &TlsConfig) -> Result<CertifiedKey, StartError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| StartError::Tls(format!("{}: {e}", cfg.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| StartError::Tls(format!("{}: {e}", cfg.cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!("{}: no certificate found", cfg.cert.display())));
    }
    let key =
        PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| StartError::Tls(format!("{}: {e}", cfg.key.display())))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| StartError::Tls(format!("{}: {e}", cfg.key.display())))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| StartError::Tls(format!("certificate and key do not match: {e}")))?;
    Ok(ck)
}

/// A TLS acceptor for the main listener (ALPN `h2` when enabled, then `http/1.1`) and the
/// resolver that lets a reload replace its certificate.
pub fn acceptor(cfg: &TlsConfig, http2: bool) -> Result<(tokio_rustls::TlsAcceptor, Arc<CertResolver>), StartError> {
    let resolver = Arc::new(CertResolver { current: ArcSwap::from_pointee(load(cfg)?) });
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = if http2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), resolver))
}
