//! TLS client configuration: the CA the device trusts for both the Security server and the
//! proxies, and the server name a `host:port` address is checked against.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::error::DeviceError;

/// Reads the PEM CA certificates at `path`.
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, DeviceError> {
    let pem = std::fs::read(path).map_err(|source| DeviceError::File {
        what: "CA certificate",
        path: path.to_owned(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| DeviceError::File {
            what: "CA certificate",
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(DeviceError::BadFile {
            what: "CA certificate",
            path: path.to_owned(),
            why: "no certificate in the PEM file".into(),
        });
    }
    Ok(certs)
}

/// A TLS client config trusting only `ca` (TLS 1.3 and 1.2 for the Security server; the proxies
/// only speak 1.3).
pub fn client_config(
    ca: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, DeviceError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The server name to verify for `host:port` (an IP address or a DNS name).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, DeviceError> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_owned())
        .map_err(|_| DeviceError::Usage(format!("{addr:?} is not a host:port address")))
}
