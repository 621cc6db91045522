//! The site's TLS server configurations, both from its one certificate:
//! the API's (HTTP/2 by ALPN, as gRPC clients require) and NBD's STARTTLS.

use crate::site::Site;
use std::sync::Arc;

/// The API's TLS acceptor.
pub fn api_acceptor(site: &Site) -> Result<tokio_rustls::TlsAcceptor, String> {
    let mut cfg = server_config(site)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// The acceptor for NBD STARTTLS.
pub fn nbd_acceptor(site: &Site) -> Result<tokio_rustls::TlsAcceptor, String> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server_config(
        site,
    )?)))
}

fn server_config(site: &Site) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(site.tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("site certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(site.tls.key_pem.as_bytes())
        .map_err(|e| format!("site key: {e}"))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS setup: {e}"))
}
