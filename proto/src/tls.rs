//! The TLS profile every scm component uses: one crypto provider (aws-lc-rs), the protocol
//! versions of each link, and PEM loading whose errors name the file.
//!
//! Every rustls configuration in the workspace is built from [`server_builder`] or
//! [`client_builder`], so the provider is named in one place. It is passed explicitly rather
//! than installed process-wide: a library that installs a default can race another that does.
//! PEM files are parsed with `rustls-pki-types`' [`PemObject`] (the maintained successor of
//! `rustls-pemfile`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{RootCertStore, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// TLS 1.3 only: the device ↔ proxy link, whose channel binding relies on the 1.3 exporter.
pub static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
/// TLS 1.3 and 1.2: the HTTPS listeners of the Security server (reverse proxies and admin tools
/// may still speak 1.2).
pub static TLS13_AND_12: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A TLS file or configuration that could not be used.
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
    /// A PEM file is malformed (a section without its end, bad base64).
    #[error("{path}: malformed PEM: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file holds nothing of the kind expected.
    #[error("{path}: no {what} found in PEM file")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// rustls refused the material or the settings.
    #[error("{what}: {source}")]
    Rustls {
        /// What was being built (often a file name).
        what: String,
        /// Why.
        source: rustls::Error,
    },
}

impl TlsError {
    /// Wraps a rustls error with what was being built.
    pub fn rustls(what: impl Into<String>) -> impl FnOnce(rustls::Error) -> Self {
        let what = what.into();
        move |source| TlsError::Rustls { what, source }
    }
}

/// The crypto provider of every configuration (named explicitly because a dependency may enable
/// a second one, and then rustls has no default).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server configuration builder on [`provider`] with `versions`.
pub fn server_builder(
    versions: &[&'static SupportedProtocolVersion],
) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(TlsError::rustls("TLS server settings"))
}

/// A client configuration builder on [`provider`] with rustls' safe default versions (1.3, 1.2).
pub fn client_builder()
-> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::rustls("TLS client settings"))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_err(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
    |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    }
}

fn non_empty<T>(items: Vec<T>, path: &Path, what: &'static str) -> Result<Vec<T>, TlsError> {
    if items.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what,
        });
    }
    Ok(items)
}

/// Every certificate in PEM `data` (other sections are skipped); `path` names it in errors.
pub fn certs_from_pem(data: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    non_empty(certs, path, "certificate")
}

/// Every certificate in a PEM file: at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem(&read(path)?, path)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    match PrivateKeyDer::from_pem_slice(&read(path)?) {
        Ok(key) => Ok(key),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(TlsError::Empty {
            path: path.to_owned(),
            what: "private key",
        }),
        Err(e) => Err(pem_err(path)(e)),
    }
}

/// Every certificate revocation list in a PEM file: at least one.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    non_empty(crls, path, "\"X509 CRL\" PEM block")
}

/// A root store holding `certs`; `what` names them in errors.
pub fn roots(
    certs: impl IntoIterator<Item = CertificateDer<'static>>,
    what: &str,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(TlsError::rustls(what))?;
    }
    Ok(roots)
}

/// The CA certificates in a PEM file as a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    roots(load_certs(path)?, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBdTCCARugAwIBAgIUBGuY\n-----END CERTIFICATE-----\n";

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn pem_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let missing = dir.join("missing.pem");
        let e = load_certs(&missing).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");

        let empty = file(dir, "empty.pem", "no PEM here\n");
        let e = load_certs(&empty).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = load_key(&empty).unwrap_err().to_string();
        assert!(e.contains("no private key"), "{e}");
        let e = load_crls(&empty).unwrap_err().to_string();
        assert!(e.contains("no \"X509 CRL\" PEM block"), "{e}");

        let cert = file(dir, "cert.pem", CERT);
        assert_eq!(load_certs(&cert).unwrap().len(), 1);
        // A certificate is not a key: reported as missing, with the file.
        let e = load_key(&cert).unwrap_err().to_string();
        assert!(
            e.contains("cert.pem") && e.contains("no private key"),
            "{e}"
        );

        let cut = file(dir, "cut.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        let e = load_certs(&cut).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e}");
    }

    #[test]
    fn builders_use_aws_lc_rs() {
        assert!(server_builder(TLS13_ONLY).is_ok());
        assert!(server_builder(TLS13_AND_12).is_ok());
        assert!(client_builder().is_ok());
        let p = provider();
        assert!(!p.cipher_suites.is_empty());
    }
}
