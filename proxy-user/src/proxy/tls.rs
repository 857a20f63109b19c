//! TLS set-up: the device-facing TLS 1.3 server config, the client config (with client
//! certificate) for the Security server, and the start-up detection of kernel TLS.
//!
//! kTLS: after the handshake the proxy can hand the record keys to the kernel (the `ktls` crate)
//! so relaying is plain `read`/`write` on the socket. That needs the kernel's `tls` upper-layer
//! protocol (CONFIG_TLS). Start-up tries it on a loopback socket; without it the proxy keeps
//! rustls in user space, which is the same protocol on the wire.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS configuration that could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: no {what} found in PEM file")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// rustls refused the material.
    #[error("{what}: {source}")]
    Rustls {
        /// What was being built.
        what: &'static str,
        /// Why.
        source: rustls::Error,
    },
}

/// The crypto provider every config in this crate uses (named explicitly because other crates in
/// the build may enable a second one).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let pem = std::fs::read(path).map_err(read)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let pem = std::fs::read(path).map_err(read)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(read)?
        .ok_or_else(|| TlsError::Empty {
            path: path.to_owned(),
            what: "private key",
        })
}

/// The device-facing config: TLS 1.3 only, secret extraction enabled for kTLS.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "device TLS config",
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::Rustls {
            what: "proxy certificate and key",
            source,
        })?;
    // kTLS takes the traffic secrets out of rustls after the handshake.
    config.enable_secret_extraction = true;
    // Devices open a fresh session each time; tickets after the handshake would only be bytes the
    // kernel path has to drain.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The config for calls to the Security server: trusts `ca`, presents the proxy's certificate.
pub fn security_client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|source| TlsError::Rustls {
            what: "Security server CA",
            source,
        })?;
    }
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "Security client TLS config",
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::Rustls {
            what: "proxy client certificate and key",
            source,
        })
}

/// Whether the kernel accepts the TLS upper-layer protocol on a TCP socket (what kTLS needs).
/// Tried on a throw-away loopback connection.
pub async fn kernel_supports_ktls() -> bool {
    use std::os::fd::AsRawFd as _;
    let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
        return false;
    };
    let Ok(addr) = listener.local_addr() else {
        return false;
    };
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    match (client, accepted) {
        (Ok(client), Ok(_)) => {
            let ulp = b"tls";
            // SAFETY: the fd is an open TCP socket owned by `client` for the whole call, and the
            // option value points to `ulp.len()` readable bytes.
            let rc = unsafe {
                libc::setsockopt(
                    client.as_raw_fd(),
                    libc::SOL_TCP,
                    libc::TCP_ULP,
                    ulp.as_ptr().cast(),
                    ulp.len() as libc::socklen_t,
                )
            };
            rc == 0
        }
        _ => false,
    }
}
