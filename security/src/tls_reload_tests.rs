//! The Security server's all-or-nothing reload of its TLS files (`tls::reload`), with real
//! certificates from `devcerts` (a module of its own: `devcerts` builds on `tls`, so the test
//! cannot sit inside `tls` without an import circle).

use std::sync::Arc;

use crate::tls::{LiveConfig, load_cert_reloader, reload};

/// Every listener's configuration is rebuilt by a good reload; a bad file anywhere (here the
/// client CA) leaves the certificate and every configuration as they were.
#[test]
fn a_reload_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::devcerts::generate(d, &[], false).unwrap();
    let cert = load_cert_reloader(&d.join("security.pem"), &d.join("security.key")).unwrap();
    let plain = LiveConfig::plain(cert.clone()).unwrap();
    let mtls = LiveConfig::mtls(cert.clone(), &d.join("ca.pem"), &[]).unwrap();
    let (p0, m0, c0) = (plain.get(), mtls.get(), cert.current());

    // A new pair (another dev CA's) and the client CA: both installed.
    let other = d.join("other");
    crate::devcerts::generate(&other, &[], false).unwrap();
    for f in ["security.pem", "security.key", "ca.pem"] {
        std::fs::copy(other.join(f), d.join(f)).unwrap();
    }
    reload(&cert, &[&plain, &mtls]).unwrap();
    assert_ne!(cert.current().cert, c0.cert);
    assert!(!Arc::ptr_eq(&plain.get(), &p0));
    assert!(!Arc::ptr_eq(&mtls.get(), &m0));

    // An unreadable client CA: refused, naming it; nothing changes, the certificate neither.
    let (p1, m1, c1) = (plain.get(), mtls.get(), cert.current());
    crate::devcerts::generate(&d.join("third"), &[], false).unwrap();
    std::fs::copy(d.join("third/security.pem"), d.join("security.pem")).unwrap();
    std::fs::copy(d.join("third/security.key"), d.join("security.key")).unwrap();
    std::fs::remove_file(d.join("ca.pem")).unwrap();
    let e = reload(&cert, &[&plain, &mtls]).unwrap_err().to_string();
    assert!(e.contains("ca.pem"), "{e}");
    assert_eq!(cert.current().cert, c1.cert);
    assert!(Arc::ptr_eq(&plain.get(), &p1));
    assert!(Arc::ptr_eq(&mtls.get(), &m1));
}
