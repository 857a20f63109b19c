//! The server certificate a SIGHUP replaces without a restart: a rustls
//! [`ResolvesServerCert`] holding a swappable `Arc<CertifiedKey>`.
//!
//! Every handshake asks [`CertReloader::resolve`] for the pair in force at that moment, so a
//! reload changes what new handshakes present and leaves open connections alone (their keys are
//! agreed already). A new pair is read and checked whole (both files readable and parsable, the
//! key the certificate's) before it replaces the old one; a bad pair is refused with the file
//! and the reason, and the old one goes on being served.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::tls::{TlsError, load_certs, load_key, provider};

/// Reads `cert` (PEM chain) and `key` (PEM private key) into a checked pair: the key parses
/// for the workspace's provider and is the one of the chain's first certificate.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(TlsError::rustls(format!("{}: private key", key.display())))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(TlsError::rustls(format!(
        "{} does not hold the key of the certificate in {}",
        key.display(),
        cert.display()
    )))?;
    Ok(pair)
}

/// The certificate and key a server presents, reloadable from their files.
#[derive(Debug)]
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertReloader {
    /// Loads the pair from `cert` and `key` (an error when it is bad: at start-up nothing runs
    /// yet to fall back on).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(certified_key(cert, key)?)),
            cert: cert.to_owned(),
            key: key.to_owned(),
        }))
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// Reads and checks the files again without using them: what a reload would install.
    pub fn check(&self) -> Result<CertifiedKey, TlsError> {
        certified_key(&self.cert, &self.key)
    }

    /// Reads the files again and, when the pair is good, serves it from the next handshake on.
    /// On an error the pair in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = Arc::new(self.check()?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
        Ok(())
    }

    /// The pair in force.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, ck.cert.pem()).unwrap();
        std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn a_good_pair_replaces_the_old_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "one");
        let r = CertReloader::load(&c, &k).unwrap();
        let first = r.current().cert[0].clone();

        // A new good pair is served after the reload.
        let (c2, k2) = write_pair(dir.path(), "two");
        std::fs::copy(&c2, &c).unwrap();
        std::fs::copy(&k2, &k).unwrap();
        r.reload().unwrap();
        let second = r.current().cert[0].clone();
        assert_ne!(first, second);

        // A key that is not the certificate's: refused, naming the files; the pair stays.
        let (_, k3) = write_pair(dir.path(), "three");
        std::fs::copy(&k3, &k).unwrap();
        let e = r.reload().unwrap_err().to_string();
        assert!(e.contains("does not hold the key"), "{e}");
        assert!(e.contains(&k.display().to_string()), "{e}");
        assert_eq!(r.current().cert[0], second);

        // An unparsable certificate: refused, naming the file.
        std::fs::copy(&k2, &k).unwrap();
        std::fs::write(&c, "not a certificate").unwrap();
        let e = r.reload().unwrap_err().to_string();
        assert!(e.contains(&c.display().to_string()), "{e}");
        assert_eq!(r.current().cert[0], second);

        // An unreadable one: refused.
        std::fs::remove_file(&c).unwrap();
        assert!(matches!(r.reload(), Err(TlsError::Read { .. })));
        assert_eq!(r.current().cert[0], second);
    }
}
