//! `scm-security dev-certs`: a development CA (ECDSA P-256) and the leaf certificates a test or
//! demo deployment needs — the Security server's, a proxy's (for the devices' TLS) and a proxy's
//! client certificate (for mutual TLS to the Security server).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::error::Error;

/// Names of the files written, relative to the output directory.
pub const FILES: [&str; 8] = [
    "ca.pem",
    "ca.key",
    "security.pem",
    "security.key",
    "proxy.pem",
    "proxy.key",
    "proxy-client.pem",
    "proxy-client.key",
];

fn tls_err(e: rcgen::Error) -> Error {
    Error::Tls(format!("generating certificates: {e}"))
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool, force: bool) -> Result<(), Error> {
    let path = dir.join(name);
    if force && path.exists() {
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    if secret {
        crate::secrets::write_secret_file(&path, contents)
    } else {
        if path.exists() {
            return Err(Error::Conflict(format!(
                "{} exists (use --force to overwrite)",
                path.display()
            )));
        }
        std::fs::write(&path, contents).map_err(|e| Error::io(&path, e))
    }
}

/// Writes the CA and leaf certificates into `out`; leaf SANs are localhost, 127.0.0.1 and `sans`.
pub fn generate(out: &Path, sans: &[String], force: bool) -> Result<(), Error> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    if !force && let Some(f) = FILES.iter().find(|f| out.join(f).exists()) {
        return Err(Error::Conflict(format!(
            "{} exists (use --force to overwrite)",
            out.join(f).display()
        )));
    }
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "scm development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls_err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(tls_err)?;
    write(out, "ca.pem", &ca.pem(), false, force)?;
    write(out, "ca.key", &ca_key_pem, true, force)?;

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let leaves = [
        (
            "security",
            "scm security server",
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        ("proxy", "scm proxy", ExtendedKeyUsagePurpose::ServerAuth),
        (
            "proxy-client",
            "scm proxy client",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ];
    for (file, cn, eku) in leaves {
        let mut params = CertificateParams::new(names.clone()).map_err(tls_err)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![eku];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls_err)?;
        let cert = params.signed_by(&key, &ca).map_err(tls_err)?;
        write(out, &format!("{file}.pem"), &cert.pem(), false, force)?;
        write(
            out,
            &format!("{file}.key"),
            &key.serialize_pem(),
            true,
            force,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_usable_pem_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["proxy.lan".into(), "10.1.2.3".into()], false).unwrap();
        for f in FILES {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        crate::tls::server_config(
            &dir.path().join("security.pem"),
            &dir.path().join("security.key"),
        )
        .unwrap();
        crate::tls::client_config(
            &dir.path().join("ca.pem"),
            Some((
                &dir.path().join("proxy-client.pem"),
                &dir.path().join("proxy-client.key"),
            )),
        )
        .unwrap();
        assert!(generate(dir.path(), &[], false).is_err());
        generate(dir.path(), &[], true).unwrap();
    }
}
