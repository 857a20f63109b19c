//! LDAP against a real slapd: bind authentication, sync of users and groups at start and
//! periodically, removal of users who leave the directory (ending their sessions); LDAP over
//! TLS (ldaps:// and StartTLS with --ldap-ca), a wrong CA refused, plain ldap:// refused
//! without --ldap-insecure-plaintext; a directory with more users than its size limit synced
//! whole through paged search (RFC 2696).

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::both_backends;
use crate::ldap::{BASE, ROOT_DN, ROOT_PW, Slapd};
use crate::support::{Db, Device, Server, assert_error, eventually};

both_backends!(ldap_bind_and_sync);

async fn ldap_bind_and_sync(db: Db) {
    let Some(slapd) = Slapd::start() else { return };
    let pw_file = slapd.dir.path().join("bind.pw");
    std::fs::write(&pw_file, format!("{ROOT_PW}\n")).unwrap();
    let user_base = format!("ou=people,{BASE}");
    let group_base = format!("ou=groups,{BASE}");
    let srv = Server::start(
        db,
        &[
            "--ldap-url",
            &slapd.url,
            "--ldap-bind-dn",
            ROOT_DN,
            "--ldap-bind-password-file",
            pw_file.to_str().unwrap(),
            "--ldap-user-base",
            &user_base,
            "--ldap-group-base",
            &group_base,
            "--ldap-sync-interval",
            "1s",
            // slapd on loopback without TLS; TLS is `ldap_over_tls`'s.
            "--ldap-insecure-plaintext",
        ],
    )
    .await;
    // The first sync runs at start.
    let users = async || srv.admin_ok(Method::GET, "/users", None).await;
    let synced = eventually(Duration::from_secs(10), async || {
        users().await.as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    assert!(synced, "LDAP users synced: {}", users().await);
    let list = users().await;
    let carol = list
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "carol")
        .unwrap()
        .clone();
    assert_eq!(carol["source"], "ldap");
    assert_eq!(carol["groups"], serde_json::json!(["ops", "staff"]));
    assert_eq!(carol["ldap_dn"], format!("uid=carol,{user_base}"));

    // Bind authentication.
    let dev = Device::enroll(&srv, "carol", "carol-pw", "phone").await;
    let login = dev.login(&srv).await;
    assert_eq!(login.resp.groups, vec!["ops", "staff"]);
    let e = Device::try_enroll(&srv, "carol", "wrong", "phone2", None)
        .await
        .err()
        .unwrap();
    assert_error(&e, 401, "bad_credentials");
    // An empty password would be an anonymous bind: refused.
    let e = Device::try_enroll(&srv, "carol", "", "phone2", None)
        .await
        .err()
        .unwrap();
    assert_error(&e, 401, "bad_credentials");
    // LDAP users' passwords are not set here.
    let r = srv
        .admin(
            Method::PATCH,
            "/users/carol",
            Some(serde_json::json!({"password": "x"})),
        )
        .await;
    assert_error(&r, 409, "ldap_user");

    let dave = Device::enroll(&srv, "dave", "dave-pw", "dphone").await;
    let dave_login = dave.login(&srv).await;

    // Periodic sync picks up additions and removals.
    slapd.tool(
        "ldapadd",
        &[],
        Some(&format!(
            "dn: uid=erin,{user_base}\nobjectClass: inetOrgPerson\nuid: erin\ncn: Erin\nsn: E\nuserPassword: erin-pw\n"
        )),
    );
    slapd.tool("ldapdelete", &[&format!("uid=dave,{user_base}")], None);
    let changed = eventually(Duration::from_secs(10), async || {
        let names: Vec<Value> = users()
            .await
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].clone())
            .collect();
        names.contains(&"erin".into()) && !names.contains(&"dave".into())
    })
    .await;
    assert!(
        changed,
        "sync saw erin added and dave removed: {}",
        users().await
    );
    assert_error(
        &srv.validate(&dave_login.resp.session_id).await,
        404,
        "unknown_session",
    );
    assert!(dave.try_login(&srv).await.is_err());
    Device::enroll(&srv, "erin", "erin-pw", "ephone")
        .await
        .login(&srv)
        .await;
    // Sync on demand through the admin API.
    let report = srv.admin_ok(Method::POST, "/ldap/sync", None).await;
    assert_eq!(report["users"], 2);
}

/// ldaps:// and StartTLS against slapd serving the dev certificate, trusting it with
/// --ldap-ca; the wrong CA fails the sync and the bind; plain ldap:// does not start without
/// --ldap-insecure-plaintext, nor --ldap-ca without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldap_over_tls() {
    let pki = tempfile::tempdir().unwrap();
    let certs = crate::support::certs(pki.path());
    let Some(slapd) = Slapd::start_tls(&certs.join("security.pem"), &certs.join("security.key"))
    else {
        return;
    };
    let ldaps = slapd.ldaps_url.clone().unwrap();
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = crate::support::certs(other.path()).join("ca.pem");
    let ca = certs.join("ca.pem");
    let pw_file = slapd.dir.path().join("bind.pw");
    std::fs::write(&pw_file, format!("{ROOT_PW}\n")).unwrap();
    let user_base = format!("ou=people,{BASE}");
    let flags = |url: &str, extra: &[&str]| {
        let mut v = vec![
            "--ldap-url".to_string(),
            url.to_string(),
            "--ldap-bind-dn".into(),
            ROOT_DN.into(),
            "--ldap-bind-password-file".into(),
            pw_file.display().to_string(),
            "--ldap-user-base".into(),
            user_base.clone(),
            "--ldap-sync-interval".into(),
            "1h".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let ca_s = ca.display().to_string();
    let wrong_s = wrong_ca.display().to_string();

    for (url, extra) in [
        (ldaps.as_str(), vec!["--ldap-ca", &ca_s]),
        (
            slapd.url.as_str(),
            vec!["--ldap-starttls", "--ldap-ca", &ca_s],
        ),
    ] {
        let f = flags(url, &extra);
        let argv: Vec<&str> = f.iter().map(String::as_str).collect();
        let srv = Server::start(Db::Sqlite, &argv).await;
        // The sync at start, over TLS (an admin sync now could race it).
        let users = async || srv.admin_ok(Method::GET, "/users", None).await;
        let synced = eventually(Duration::from_secs(10), async || {
            users().await.as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
        assert!(synced, "{url} {extra:?}: {}", users().await);
        let dev = Device::enroll(&srv, "carol", "carol-pw", "phone").await;
        dev.login(&srv).await;
        let e = Device::try_enroll(&srv, "carol", "wrong", "phone2", None)
            .await
            .err()
            .unwrap();
        assert_error(&e, 401, "bad_credentials");
    }

    // The wrong CA: the server starts, but neither the sync nor a bind gets through.
    for (url, extra) in [
        (ldaps.as_str(), vec!["--ldap-ca", &wrong_s]),
        (
            slapd.url.as_str(),
            vec!["--ldap-starttls", "--ldap-ca", &wrong_s],
        ),
    ] {
        let f = flags(url, &extra);
        let argv: Vec<&str> = f.iter().map(String::as_str).collect();
        let srv = Server::start(Db::Sqlite, &argv).await;
        let (status, body) = srv.admin(Method::POST, "/ldap/sync", None).await;
        assert_eq!(status.as_u16(), 502, "{url}: {body}");
        let msg = body["message"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            msg.contains("certificate") || msg.contains("issuer"),
            "{msg}"
        );
        let users = srv.admin_ok(Method::GET, "/users", None).await;
        assert_eq!(users.as_array().unwrap().len(), 0, "{users}");
    }

    // Plain LDAP needs the explicit flag; --ldap-ca needs TLS.
    for (url, extra, needle) in [
        (slapd.url.as_str(), vec![], "--ldap-insecure-plaintext"),
        (
            slapd.url.as_str(),
            vec!["--ldap-ca", &ca_s, "--ldap-insecure-plaintext"],
            "--ldap-ca needs ldaps:// or --ldap-starttls",
        ),
        (
            ldaps.as_str(),
            vec!["--ldap-starttls"],
            "--ldap-starttls is for ldap://",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let c = crate::support::certs(dir.path());
        let f = flags(url, &extra);
        let argv: Vec<&str> = f.iter().map(String::as_str).collect();
        let args = crate::support::serve_args(dir.path(), &c, &Db::Sqlite, &argv);
        let err = scm_security::server::start(&args)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(needle), "{url} {extra:?}: {err}");
    }
}

/// A directory holding more users than the server's size limit (5 here, 1000 in a default Active
/// Directory): a plain search ends with "size limit exceeded"; the sync pages (RFC 2696 simple
/// paged results, --ldap-page-size at most the limit) and gets every user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldap_sync_pages_past_the_size_limit() {
    const LIMIT: usize = 5;
    const EXTRA: usize = 12;
    let Some(slapd) = Slapd::start_size_limited(LIMIT) else {
        return;
    };
    let user_base = format!("ou=people,{BASE}");
    let ldif: String = (0..EXTRA)
        .map(|i| {
            format!(
                "dn: uid=user{i:02},{user_base}\nobjectClass: inetOrgPerson\nuid: user{i:02}\n\
                 cn: User {i}\nsn: U\nuserPassword: pw-{i}\n\n"
            )
        })
        .collect();
    slapd.tool("ldapadd", &[], Some(&ldif));
    let total = EXTRA + 2; // and carol and dave
    // The limit holds for the sync's own identity (anonymous: the root DN has no limits).
    let plain = std::process::Command::new("ldapsearch")
        .args(["-x", "-H", &slapd.url, "-b", &user_base, "uid"])
        .output()
        .expect("ldapsearch (apt install ldap-utils)");
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.contains("Size limit exceeded"), "{plain}");

    let srv = Server::start(
        Db::Sqlite,
        &[
            "--ldap-url",
            &slapd.url,
            "--ldap-user-base",
            &user_base,
            "--ldap-page-size",
            "4",
            "--ldap-sync-interval",
            "1h",
            "--ldap-insecure-plaintext",
        ],
    )
    .await;
    // The sync at start (an admin sync now could race it), then one on demand.
    let users = async || srv.admin_ok(Method::GET, "/users", None).await;
    let synced = eventually(Duration::from_secs(10), async || {
        users().await.as_array().is_some_and(|a| a.len() == total)
    })
    .await;
    assert!(synced, "every LDAP user synced: {}", users().await);
    let report = srv.admin_ok(Method::POST, "/ldap/sync", None).await;
    assert_eq!(report["users"], total, "{report}");
    let users = users().await;
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(names.len(), total, "{users}");
    assert!(
        names.contains(&"user11") && names.contains(&"carol"),
        "{users}"
    );
    // A user from a later page authenticates by bind like any other.
    Device::enroll(&srv, "user11", "pw-11", "phone")
        .await
        .login(&srv)
        .await;
}
