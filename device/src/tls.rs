//! TLS client configuration: the CA the device trusts for both the Security server and the
//! proxies, and the server name a `host:port` address is checked against.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, ServerName};
use scm_proto::tls::TlsError;

use crate::error::DeviceError;

/// Reads the PEM CA certificates at `path`.
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, DeviceError> {
    scm_proto::tls::load_certs(path).map_err(|e| match e {
        TlsError::Read { path, source } => DeviceError::File {
            what: "CA certificate",
            path,
            source,
        },
        TlsError::Empty { path, .. } => DeviceError::BadFile {
            what: "CA certificate",
            path,
            why: "no certificate in the PEM file".into(),
        },
        other => DeviceError::BadFile {
            what: "CA certificate",
            path: path.to_owned(),
            why: other.to_string(),
        },
    })
}

/// A TLS client config trusting only `ca` (TLS 1.3 and 1.2 for the Security server; the proxies
/// only speak 1.3).
pub fn client_config(
    ca: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, DeviceError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c.clone())?;
    }
    let config = scm_proto::tls::client_builder()?
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
