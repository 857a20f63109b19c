//! Who may use the proxies' API: with `--proxy-allow`, a proxy whose client certificate (from
//! the right CA) does not carry a listed name is refused on every request, a site-bound proxy
//! sees only its sites' sessions, and with `--client-crl` a revoked certificate is refused at
//! the TLS handshake. Real servers, real TLS, certificates made with rcgen.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    RevocationReason, RevokedCertParams, SerialNumber, date_time_ymd,
};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{Db, Device, Server, assert_error, certs, client, send, serve_args};

/// A client CA of its own in `dir`: `client-ca.pem`, one client certificate per
/// `(file, common name, DNS name, serial)`, and `crl.pem` revoking serial 0x33.
fn client_pki(dir: &Path, leaves: &[(&str, &str, &str, u8)]) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "test proxy CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca =
        CertifiedIssuer::self_signed(p, KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap())
            .unwrap();
    std::fs::write(dir.join("client-ca.pem"), ca.pem()).unwrap();
    for (file, cn, dns, serial) in leaves {
        let mut p = CertificateParams::new(vec![dns.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, *cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.serial_number = Some(SerialNumber::from(vec![*serial]));
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }
    let crl = CertificateRevocationListParams {
        this_update: date_time_ymd(2024, 1, 1),
        next_update: date_time_ymd(2099, 1, 1),
        crl_number: SerialNumber::from(vec![1]),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(vec![0x33]),
            revocation_time: date_time_ymd(2024, 6, 1),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca)
    .unwrap();
    std::fs::write(dir.join("crl.pem"), crl.pem().unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_are_named_and_revoked_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    client_pki(
        &certs,
        &[
            ("allowed", "proxy a", "proxy-a.test", 0x11),
            ("unlisted", "proxy b", "proxy-b.test", 0x22),
            ("revoked", "proxy r", "proxy-r.test", 0x33),
            ("branch", "branch proxy", "proxy-branch.test", 0x44),
        ],
    );
    let crl = certs.join("crl.pem").display().to_string();
    let mut args = serve_args(
        dir.path(),
        &certs,
        &Db::Sqlite,
        &[
            "--proxy-allow",
            "dns:proxy-a.test",
            "--proxy-allow",
            "dns:proxy-r.test",
            "--proxy-allow",
            "cn:branch proxy@branch",
            "--client-crl",
            &crl,
        ],
    );
    args.client_ca = certs.join("client-ca.pem");
    let running = scm_security::server::start(&args)
        .await
        .expect("server starts");
    let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let port = |p: u16| format!("https://localhost:{p}");
    let proxy_url = port(running.proxy_addr.port());
    let srv = Server {
        device_url: port(running.device_addr.port()),
        proxy_url: proxy_url.clone(),
        admin_url: port(running.admin_addr.port()),
        device: client(&certs, None),
        proxy: client(&certs, Some(("allowed.pem", "allowed.key"))),
        admin: client(&certs, None),
        running: Some(running),
        dir,
        token,
    };
    srv.add_user("alice", "pw-alice", &["staff"]).await;
    srv.admin_ok(
        Method::PUT,
        "/sites/branch",
        Some(json!({"proxy_urls": []})),
    )
    .await;
    srv.admin_ok(
        Method::POST,
        "/users",
        Some(json!({"name": "bob", "password": "pw-bob", "groups": [], "site": "branch"})),
    )
    .await;
    let alice = Device::enroll(&srv, "alice", "pw-alice", "a1")
        .await
        .login(&srv)
        .await;
    let bob = Device::enroll(&srv, "bob", "pw-bob", "b1")
        .await
        .login(&srv)
        .await;

    // On the list, every site.
    let (s, v) = srv.validate(&alice.resp.session_id).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["user"], "alice");
    assert_eq!(srv.validate(&bob.resp.session_id).await.0, StatusCode::OK);

    // From the right CA but not on the list: refused on every route, known or not.
    let unlisted = client(&certs, Some(("unlisted.pem", "unlisted.key")));
    let validate = |c: &reqwest::Client, sid: &str| {
        c.post(format!(
            "{proxy_url}{}",
            scm_proto::api::PATH_PROXY_VALIDATE
        ))
        .json(&json!({"session_id": sid}))
    };
    assert_error(
        &send(validate(&unlisted, &alice.resp.session_id)).await,
        403,
        "proxy_not_allowed",
    );
    for path in [
        scm_proto::api::PATH_PROXY_RESOURCES,
        scm_proto::api::PATH_PROXY_APPS,
        scm_proto::api::PATH_PROXY_REVOCATIONS,
        "/v1/proxy/no-such-route",
    ] {
        assert_error(
            &send(unlisted.get(format!("{proxy_url}{path}"))).await,
            403,
            "proxy_not_allowed",
        );
    }

    // Bound to a site: its sessions only.
    let branch = client(&certs, Some(("branch.pem", "branch.key")));
    let (s, v) = send(validate(&branch, &bob.resp.session_id)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_error(
        &send(validate(&branch, &alice.resp.session_id)).await,
        403,
        "wrong_site",
    );

    // Revoked in the CRL (and on the list): refused at the handshake.
    let revoked = client(&certs, Some(("revoked.pem", "revoked.key")));
    let err = revoked
        .get(format!(
            "{proxy_url}{}",
            scm_proto::api::PATH_PROXY_RESOURCES
        ))
        .send()
        .await
        .expect_err("a revoked certificate gets no answer");
    let chain = format!("{err:?}");
    assert!(chain.contains("Revoked"), "{chain}");
    // The harness's proxy certificate comes from another CA: no handshake either.
    let foreign = client(&certs, Some(("proxy-client.pem", "proxy-client.key")));
    assert!(
        foreign
            .get(format!(
                "{proxy_url}{}",
                scm_proto::api::PATH_PROXY_RESOURCES
            ))
            .send()
            .await
            .is_err()
    );
}

/// Bad allow-list entries and CRL files stop the server with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_proxy_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let not_crl = certs.join("ca.pem").display().to_string();
    for (flags, needle) in [
        (vec!["--proxy-allow", "proxy-a.test"], "expected dns:NAME"),
        (vec!["--proxy-allow", "ip:10.0.0"], "not an IP address"),
        (vec!["--client-crl", &not_crl], "no \"X509 CRL\" PEM block"),
    ] {
        let args = serve_args(dir.path(), &certs, &Db::Sqlite, &flags);
        let err = scm_security::server::start(&args)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(needle), "{flags:?}: {err}");
    }
}
