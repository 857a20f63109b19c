//! The device and proxy flows, each on SQLite and PostgreSQL: enrollment, login, replay, challenge
//! expiry, lockout, source limit, session expiry, logout and revocation reaching a subscriber,
//! validation over mutual TLS, apps, activation codes, sites, and keys at rest.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use reqwest::{Method, StatusCode};
use scm_proto::api::{
    PATH_LOGIN, PATH_LOGOUT, PATH_PROXY_APPS, PATH_PROXY_RESOURCES, PATH_PROXY_REVOCATIONS,
    ProxyEvent, UpdateCheckResponse, ValidateResponse,
};
use scm_proto::crypto;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::both_backends;
use crate::support::{Db, Device, Server, assert_error, eventually, send};

both_backends!(
    enroll_login_validate_logout,
    login_replay_and_bad_mac_refused,
    challenge_expiry,
    lockout_per_user,
    source_address_limit,
    challenge_rate_limit,
    idle_expiry,
    absolute_expiry,
    admin_revocation_reaches_subscriber,
    key_revocation,
    proxy_api_requires_client_certificate,
    apps_publish_update_download,
    activation_codes,
    sites_and_user_at_site,
    no_plaintext_key_at_rest,
    admin_api_requires_token,
    user_changes_and_session_cap,
);

async fn enroll_login_validate_logout(db: Db) {
    let srv = Server::start(db, &[]).await;
    srv.add_user("alice", "alice-pw", &["staff"]).await;
    srv.admin_ok(
        Method::PUT,
        "/sites/main",
        Some(json!({"proxy_urls": ["127.0.0.1:9443", "127.0.0.1:9444"]})),
    )
    .await;
    srv.admin_ok(
        Method::PUT,
        "/resources/intranet",
        Some(json!({"address": "10.0.0.7:80", "mode": "http", "allowed_groups": ["staff"]})),
    )
    .await;
    srv.admin_ok(
        Method::PUT,
        "/resources/secret",
        Some(json!({"address": "10.0.0.8:22", "mode": "tcp", "allowed_groups": ["admins"]})),
    )
    .await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    assert!(dev.key_id.starts_with("k_"));
    let login = dev.login(&srv).await;
    let r = &login.resp;
    // The session key is derived by both ends, never sent to the device.
    let wire = serde_json::to_string(r).unwrap();
    assert!(!wire.contains("key") && !wire.contains(&crypto::b64(login.session_key.as_bytes())));
    assert_eq!(r.user, "alice");
    assert_eq!(r.groups, vec!["staff"]);
    assert_eq!(r.site, "main");
    assert_eq!(r.proxy_urls, vec!["127.0.0.1:9443", "127.0.0.1:9444"]);
    assert_eq!(r.session_id.len(), crypto::SessionId::ENCODED_LEN);
    assert!(r.absolute_expires_at > scm_security::store::unix_now() as u64 + 3600);

    // The proxy's view: same derived session key, user, groups, app context, allowed resources.
    let (s, v) = srv.validate(&r.session_id).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let val: ValidateResponse = serde_json::from_value(v).unwrap();
    assert_eq!(val.session_key, crypto::b64(login.session_key.as_bytes()));
    assert_eq!(val.user, "alice");
    assert_eq!(val.device_id, "phone-1");
    assert_eq!(val.app_id, "mail");
    assert_eq!(val.app_version, "1.0");
    assert_eq!(val.allowed_resources, vec!["intranet"]);
    assert_eq!(val.session_tag, crypto::session_tag(&r.session_id).0);
    // The session id never appears in the login or enroll audit entries.
    let audit = srv
        .admin_ok(Method::GET, "/audit?limit=100", None)
        .await
        .to_string();
    assert!(audit.contains("\"login\""));
    assert!(audit.contains("\"enroll\""));
    assert!(!audit.contains(&r.session_id));

    let (s, _) = send(
        srv.proxy
            .get(format!("{}{PATH_PROXY_RESOURCES}", srv.proxy_url)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // Forward-auth is not on the device listener (it is opt-in, on a mutual-TLS listener of its
    // own: tests in forward_auth.rs); the old route answers the JSON 404 like any unknown path.
    for path in [
        "/v1/auth/nginx",
        scm_security::api::forward_auth::PATH_FORWARD_AUTH,
    ] {
        assert_error(
            &send(
                srv.device
                    .get(format!("{}{path}", srv.device_url))
                    .bearer_auth(&r.session_id),
            )
            .await,
            404,
            "not_found",
        );
    }

    // Logout ends it; a second logout and a validation see nothing.
    let out = srv
        .device
        .post(format!("{}{PATH_LOGOUT}", srv.device_url))
        .bearer_auth(&r.session_id)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    assert_error(&srv.validate(&r.session_id).await, 404, "unknown_session");
    let again = send(
        srv.device
            .post(format!("{}{PATH_LOGOUT}", srv.device_url))
            .bearer_auth(&r.session_id),
    )
    .await;
    assert_error(&again, 401, "unknown_session");
    // Two logins give two different sessions with different keys.
    let a = dev.login(&srv).await;
    let b = dev.login(&srv).await;
    assert_ne!(a.resp.session_id, b.resp.session_id);
    assert_ne!(a.session_key, b.session_key);
}

async fn login_replay_and_bad_mac_refused(db: Db) {
    let srv = Server::start(db, &[]).await;
    srv.add_user("alice", "alice-pw", &["staff"]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let ch = Device::challenge(&srv).await;
    let (req, _) = dev.login_request(&ch, &dev.key);
    let body = serde_json::to_value(&req).unwrap();
    let (s, _) = srv.device_post(PATH_LOGIN, &body).await;
    assert_eq!(s, StatusCode::OK);
    // The very same request again: the challenge is spent.
    assert_error(
        &srv.device_post(PATH_LOGIN, &body).await,
        401,
        "unknown_challenge",
    );
    assert_eq!(srv.state().sessions.len(), 1);

    // A MAC made with another key.
    let ch = Device::challenge(&srv).await;
    let (req, _) = dev.login_request(&ch, &crypto::SharedKey::generate());
    assert_error(
        &srv.device_post(PATH_LOGIN, &serde_json::to_value(&req).unwrap())
            .await,
        401,
        "bad_mac",
    );
    // A valid MAC moved to another challenge.
    let ch1 = Device::challenge(&srv).await;
    let ch2 = Device::challenge(&srv).await;
    let (mut req, _) = dev.login_request(&ch1, &dev.key);
    req.challenge_id = ch2.challenge_id.clone();
    assert_error(
        &srv.device_post(PATH_LOGIN, &serde_json::to_value(&req).unwrap())
            .await,
        401,
        "bad_mac",
    );
    // A valid MAC with a field changed (the version claimed).
    let ch = Device::challenge(&srv).await;
    let (mut req, _) = dev.login_request(&ch, &dev.key);
    req.app_version = "9.9".into();
    assert_error(
        &srv.device_post(PATH_LOGIN, &serde_json::to_value(&req).unwrap())
            .await,
        401,
        "bad_mac",
    );
    // The right proof with the wrong password.
    let mut wrong = dev.clone();
    wrong.password = "nope".into();
    let e = wrong.try_login(&srv).await.err().expect("refused");
    assert_error(&e, 401, "bad_credentials");
    // Another user's key.
    srv.add_user("bob", "bob-pw", &[]).await;
    let mut stolen = dev.clone();
    stolen.username = "bob".into();
    stolen.password = "bob-pw".into();
    assert_error(
        &stolen.try_login(&srv).await.err().expect("refused"),
        401,
        "unknown_key",
    );
    assert_eq!(
        srv.state().sessions.len(),
        1,
        "no failed attempt made a session"
    );
}

async fn challenge_expiry(db: Db) {
    let srv = Server::start(db, &["--challenge-ttl", "1s"]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let ch = Device::challenge(&srv).await;
    assert_eq!(ch.expires_in_secs, 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (req, _) = dev.login_request(&ch, &dev.key);
    let body = serde_json::to_value(&req).unwrap();
    assert_error(
        &srv.device_post(PATH_LOGIN, &body).await,
        401,
        "challenge_expired",
    );
    // Challenges are stateless: the id carries its expiry, so it stays refused as expired.
    assert_error(
        &srv.device_post(PATH_LOGIN, &body).await,
        401,
        "challenge_expired",
    );
    assert!(srv.state().sessions.is_empty());
}

async fn lockout_per_user(db: Db) {
    let srv = Server::start(db, &["--lockout-threshold", "3"]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    srv.add_user("bob", "bob-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let bob = Device::enroll(&srv, "bob", "bob-pw", "phone-2").await;
    let mut wrong = dev.clone();
    wrong.password = "guess".into();
    for _ in 0..3 {
        assert_error(
            &wrong.try_login(&srv).await.err().unwrap(),
            401,
            "bad_credentials",
        );
    }
    // Locked: even the right password is refused, and enrollment too.
    assert_error(&dev.try_login(&srv).await.err().unwrap(), 403, "locked_out");
    let e = Device::try_enroll(&srv, "alice", "alice-pw", "phone-9", None)
        .await
        .err()
        .unwrap();
    assert_error(&e, 403, "locked_out");
    // Other users are not affected.
    bob.login(&srv).await;
    let audit = srv
        .admin_ok(Method::GET, "/audit?limit=100", None)
        .await
        .to_string();
    assert!(audit.contains("\"lockout\""), "{audit}");
    // Admin unlock.
    srv.admin_ok(Method::POST, "/users/alice/unlock", None)
        .await;
    dev.login(&srv).await;
}

async fn source_address_limit(db: Db) {
    let srv = Server::start(
        db,
        &["--source-failure-limit", "4", "--lockout-threshold", "100"],
    )
    .await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let mut wrong = dev.clone();
    for i in 0..4 {
        wrong.username = format!("nobody{i}");
        let e = wrong.try_login(&srv).await.err().unwrap();
        assert_eq!(e.0.as_u16(), 401, "{}", e.1);
    }
    // Every user is now refused from this address, challenges included.
    let (s, v) = srv
        .device_post(scm_proto::api::PATH_CHALLENGE, &json!({}))
        .await;
    assert_error(&(s, v), 429, "rate_limited");
    let e = Device::try_enroll(&srv, "alice", "alice-pw", "phone-2", None)
        .await
        .err()
        .unwrap();
    assert_error(&e, 429, "rate_limited");
}

async fn challenge_rate_limit(db: Db) {
    let srv = Server::start(db, &["--challenge-rate-limit", "5"]).await;
    for _ in 0..5 {
        Device::challenge(&srv).await;
    }
    let r = srv
        .device_post(scm_proto::api::PATH_CHALLENGE, &json!({}))
        .await;
    assert_error(&r, 429, "rate_limited");
}

async fn idle_expiry(db: Db) {
    let srv = Server::start(db, &["--session-idle-timeout", "2s"]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let login = dev.login(&srv).await;
    assert_eq!(login.resp.idle_timeout_secs, 2);
    // Activity keeps it alive past the idle timeout...
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(srv.validate(&login.resp.session_id).await.0, StatusCode::OK);
    }
    // ...and silence ends it; the sweeper removes it without anyone asking.
    let gone = eventually(Duration::from_secs(5), async || {
        srv.state().sessions.is_empty()
    })
    .await;
    assert!(gone, "idle session swept");
    let r = srv.validate(&login.resp.session_id).await;
    assert_eq!(r.0.as_u16(), 404);
}

async fn absolute_expiry(db: Db) {
    let srv = Server::start(
        db,
        &[
            "--session-idle-timeout",
            "1m",
            "--session-max-lifetime",
            "2s",
        ],
    )
    .await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let login = dev.login(&srv).await;
    let start = Instant::now();
    loop {
        let (s, v) = srv.validate(&login.resp.session_id).await;
        if s != StatusCode::OK {
            assert_eq!(s.as_u16(), 404, "{v}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "session outlived its absolute expiry"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "ended too early: {:?}",
        start.elapsed()
    );
}

/// Reads revocation-stream lines until `pred` matches one; returns it.
async fn next_event(
    lines: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut Vec<u8>,
    pred: impl Fn(&ProxyEvent) -> bool,
) -> ProxyEvent {
    loop {
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: ProxyEvent = serde_json::from_slice(&line).expect("NDJSON ProxyEvent");
            if pred(&ev) {
                return ev;
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), lines.next())
            .await
            .expect("stream line in time")
            .expect("stream open")
            .expect("chunk");
        buf.extend_from_slice(&chunk);
    }
}

async fn admin_revocation_reaches_subscriber(db: Db) {
    let srv = Server::start(db, &["--heartbeat-interval", "1s"]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let login = dev.login(&srv).await;
    let tag = crypto::session_tag(&login.resp.session_id).0;

    let resp = srv
        .proxy
        .get(format!("{}{PATH_PROXY_REVOCATIONS}", srv.proxy_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    // The first line says the subscription is live.
    next_event(&mut stream, &mut buf, |e| {
        matches!(e, ProxyEvent::Heartbeat { .. })
    })
    .await;

    let t0 = Instant::now();
    srv.admin_ok(Method::POST, &format!("/sessions/{tag}/revoke"), None)
        .await;
    let ev = next_event(&mut stream, &mut buf, |e| {
        matches!(e, ProxyEvent::Revoked { .. })
    })
    .await;
    let took = t0.elapsed();
    assert_eq!(
        ev,
        ProxyEvent::Revoked {
            session_tag: tag.clone(),
            reason: "admin".into()
        }
    );
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert_error(
        &srv.validate(&login.resp.session_id).await,
        404,
        "unknown_session",
    );
    assert_error(
        &srv.admin(Method::POST, &format!("/sessions/{tag}/revoke"), None)
            .await,
        404,
        "unknown_session",
    );
    // Heartbeats keep coming.
    next_event(&mut stream, &mut buf, |e| {
        matches!(e, ProxyEvent::Heartbeat { .. })
    })
    .await;
    // Catalog changes are announced too.
    srv.admin_ok(
        Method::PUT,
        "/resources/r1",
        Some(json!({"address": "127.0.0.1:1", "mode": "tcp", "allowed_groups": []})),
    )
    .await;
    next_event(&mut stream, &mut buf, |e| *e == ProxyEvent::CatalogChanged).await;
    // Logout is a revocation as well.
    let login = dev.login(&srv).await;
    srv.device
        .post(format!("{}{PATH_LOGOUT}", srv.device_url))
        .bearer_auth(&login.resp.session_id)
        .send()
        .await
        .unwrap();
    let ev = next_event(&mut stream, &mut buf, |e| {
        matches!(e, ProxyEvent::Revoked { .. })
    })
    .await;
    assert_eq!(
        ev,
        ProxyEvent::Revoked {
            session_tag: crypto::session_tag(&login.resp.session_id).0,
            reason: "logout".into()
        }
    );
}

async fn key_revocation(db: Db) {
    let srv = Server::start(db, &[]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let other = Device::enroll(&srv, "alice", "alice-pw", "tablet").await;
    let s1 = dev.login(&srv).await;
    let s2 = other.login(&srv).await;
    let mut events = srv.state().sessions.subscribe();
    let r = srv
        .admin_ok(Method::POST, &format!("/keys/{}/revoke", dev.key_id), None)
        .await;
    assert_eq!(r["sessions"], 1);
    assert_eq!(
        events.recv().await.unwrap(),
        ProxyEvent::Revoked {
            session_tag: crypto::session_tag(&s1.resp.session_id).0,
            reason: "key_revoked".into()
        }
    );
    assert_error(
        &srv.validate(&s1.resp.session_id).await,
        404,
        "unknown_session",
    );
    assert_eq!(srv.validate(&s2.resp.session_id).await.0, StatusCode::OK);
    assert_error(
        &dev.try_login(&srv).await.err().unwrap(),
        401,
        "key_revoked",
    );
    assert_error(
        &srv.admin(Method::POST, "/keys/k_nope/revoke", None).await,
        404,
        "unknown_key",
    );
    // Revoking the device ends the other key too.
    srv.admin_ok(Method::POST, "/devices/tablet/revoke", None)
        .await;
    assert_error(
        &other.try_login(&srv).await.err().unwrap(),
        401,
        "key_revoked",
    );
    // Re-enrolling replaces the key; the old one stops working.
    let again = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    again.login(&srv).await;
    let keys = srv.admin_ok(Method::GET, "/keys?user=alice", None).await;
    assert_eq!(keys.as_array().unwrap().len(), 3);
}

async fn proxy_api_requires_client_certificate(db: Db) {
    let srv = Server::start(db, &[]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let login = dev.login(&srv).await;
    let body = json!({"session_id": login.resp.session_id});
    let url = format!("{}{}", srv.proxy_url, scm_proto::api::PATH_PROXY_VALIDATE);
    // No client certificate: the TLS handshake is refused, nothing is answered.
    let no_cert = crate::support::client(&srv.certs(), None);
    assert!(no_cert.post(&url).json(&body).send().await.is_err());
    // A certificate from the right CA but for a server, not a client: refused.
    let server_cert = crate::support::client(&srv.certs(), Some(("security.pem", "security.key")));
    assert!(server_cert.post(&url).json(&body).send().await.is_err());
    // A client certificate from another CA: refused.
    let other = tempfile::tempdir().unwrap();
    let other_certs = crate::support::certs(other.path());
    let foreign = {
        let tls = scm_security::tls::client_config(
            &srv.certs().join("ca.pem"),
            Some((
                &other_certs.join("proxy-client.pem"),
                &other_certs.join("proxy-client.key"),
            )),
        )
        .unwrap();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .unwrap()
    };
    assert!(foreign.post(&url).json(&body).send().await.is_err());
    // The proxy's client certificate works.
    assert_eq!(srv.validate(&login.resp.session_id).await.0, StatusCode::OK);
    // The device port does not serve the proxies' API, and the proxies' port not the device API.
    let (s, v) = srv
        .device_post(scm_proto::api::PATH_PROXY_VALIDATE, &body)
        .await;
    assert_error(&(s, v), 404, "not_found");
    let (s, v) = srv
        .proxy_post(scm_proto::api::PATH_CHALLENGE, &json!({}))
        .await;
    assert_error(&(s, v), 404, "not_found");
}

async fn apps_publish_update_download(db: Db) {
    let srv = Server::start(db, &[]).await;
    let package: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = hex::encode(Sha256::digest(&package));
    for (v, body) in [
        ("1.0", b"old".to_vec()),
        ("1.2", package.clone()),
        ("2.0", b"bad".to_vec()),
    ] {
        let (s, r) = send(
            srv.admin
                .put(format!("{}/v1/admin/apps/mail/android/{v}", srv.admin_url))
                .bearer_auth(&srv.token)
                .body(body),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
    }
    let (s, r) = send(
        srv.admin
            .put(format!("{}/v1/admin/apps/mail/android/1.2", srv.admin_url))
            .bearer_auth(&srv.token)
            .body("again"),
    )
    .await;
    assert_error(&(s, r), 409, "already_published");
    srv.admin_ok(
        Method::PUT,
        "/apps/mail/policy",
        Some(json!({"min_version": "1.1", "revoke": ["2.0"]})),
    )
    .await;

    let check = |v: &'static str| {
        let url = format!(
            "{}/v1/apps/mail/update?platform=android&version={v}",
            srv.device_url
        );
        let c = srv.device.clone();
        async move {
            let (s, v) = send(c.get(url)).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            serde_json::from_value::<UpdateCheckResponse>(v).unwrap()
        }
    };
    let a = check("1.0").await;
    assert!(a.update_available && !a.current_allowed);
    let latest = a.latest.unwrap();
    assert_eq!(latest.version, "1.2", "revoked 2.0 is never offered");
    assert_eq!(latest.sha256, sha);
    assert_eq!(latest.size, package.len() as u64);
    assert_eq!(a.min_version.as_deref(), Some("1.1"));
    let b = check("1.2").await;
    assert!(!b.update_available && b.current_allowed);
    assert!(!check("2.0").await.current_allowed);

    // Whole download, checked against the header and our own hash.
    let url = format!("{}{}", srv.device_url, latest.download_path);
    let resp = srv.device.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[scm_proto::api::HEADER_SHA256], sha.as_str());
    assert_eq!(resp.headers()["accept-ranges"], "bytes");
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), sha);
    // A range (resuming a download).
    let resp = srv
        .device
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-1999/{}", package.len())
    );
    assert_eq!(resp.headers()[scm_proto::api::HEADER_SHA256], sha.as_str());
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &package[1000..2000]);
    let resp = srv
        .device
        .get(&url)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        &package[package.len() - 10..]
    );
    let r = send(srv.device.get(&url).header("range", "bytes=999999-")).await;
    assert_error(&r, 416, "range_not_satisfiable");
    let r = send(srv.device.get(format!(
        "{}/v1/apps/mail/download/android/9.9",
        srv.device_url
    )))
    .await;
    assert_error(&r, 404, "unknown_release");
    let r = send(srv.device.get(format!(
        "{}/v1/apps/nope/update?platform=android&version=1",
        srv.device_url
    )))
    .await;
    assert_error(&r, 404, "unknown_app");

    // The proxies see the policy; a revoked or too old version cannot log in.
    let (s, v) = send(srv.proxy.get(format!("{}{PATH_PROXY_APPS}", srv.proxy_url))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v,
        json!([{"app_id": "mail", "min_version": "1.1", "revoked_versions": ["2.0"]}])
    );
    srv.add_user("alice", "alice-pw", &[]).await;
    let mut dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    dev.app_version = "1.0".into();
    assert_error(
        &dev.try_login(&srv).await.err().unwrap(),
        403,
        "app_version_not_allowed",
    );
    dev.app_version = "2.0".into();
    assert_error(
        &dev.try_login(&srv).await.err().unwrap(),
        403,
        "app_version_not_allowed",
    );
    dev.app_version = "1.2".into();
    dev.login(&srv).await;
}

async fn activation_codes(db: Db) {
    let srv = Server::start(db, &["--require-activation-code"]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let e = Device::try_enroll(&srv, "alice", "alice-pw", "p1", None)
        .await
        .err()
        .unwrap();
    assert_error(&e, 403, "activation_code_required");
    let e = Device::try_enroll(&srv, "alice", "alice-pw", "p1", Some("0000-0000"))
        .await
        .err()
        .unwrap();
    assert_error(&e, 403, "bad_activation_code");
    let code = srv
        .admin_ok(
            Method::POST,
            "/users/alice/activation-codes",
            Some(json!({"ttl_secs": 600})),
        )
        .await["code"]
        .as_str()
        .unwrap()
        .to_owned();
    // Valid code but wrong password: the code is not spent.
    let e = Device::try_enroll(&srv, "alice", "wrong", "p1", Some(&code))
        .await
        .err()
        .unwrap();
    assert_error(&e, 401, "bad_credentials");
    srv.add_user("bob", "bob-pw", &[]).await;
    let e = Device::try_enroll(&srv, "bob", "bob-pw", "p1", Some(&code))
        .await
        .err()
        .unwrap();
    assert_error(&e, 403, "bad_activation_code");
    Device::try_enroll(&srv, "alice", "alice-pw", "p1", Some(&code))
        .await
        .unwrap();
    let e = Device::try_enroll(&srv, "alice", "alice-pw", "p2", Some(&code))
        .await
        .err()
        .unwrap();
    assert_error(&e, 403, "bad_activation_code");
    assert_eq!(srv.count("device_keys").await, 1);
}

async fn sites_and_user_at_site(db: Db) {
    let srv = Server::start(db, &[]).await;
    srv.admin_ok(
        Method::PUT,
        "/sites/paris",
        Some(json!({"proxy_urls": ["proxy.paris:443"]})),
    )
    .await;
    srv.admin_ok(
        Method::POST,
        "/users",
        Some(json!({"name": "amelie", "password": "pw-amelie", "groups": ["staff"], "site": "paris"})),
    )
    .await;
    let dev = Device::enroll(&srv, "amelie@paris", "pw-amelie", "phone").await;
    let login = dev.login(&srv).await;
    assert_eq!(login.resp.site, "paris");
    assert_eq!(login.resp.proxy_urls, vec!["proxy.paris:443"]);
    let v: ValidateResponse =
        serde_json::from_value(srv.validate(&login.resp.session_id).await.1).unwrap();
    assert_eq!(v.site, "paris");
    let e = Device::try_enroll(&srv, "amelie@main", "pw-amelie", "phone2", None)
        .await
        .err()
        .unwrap();
    assert_error(&e, 401, "wrong_site");
    assert_error(
        &srv.admin(Method::DELETE, "/sites/paris", None).await,
        409,
        "site_in_use",
    );
    assert_error(
        &srv.admin(Method::DELETE, "/sites/nowhere", None).await,
        404,
        "unknown_site",
    );
    let r = srv
        .admin(
            Method::POST,
            "/users",
            Some(json!({"name": "x", "password": "p", "site": "nowhere"})),
        )
        .await;
    assert_error(&r, 404, "unknown_site");
}

fn assert_no_key(haystack: &[u8], keys: &[crypto::SharedKey], what: &str) {
    let text = String::from_utf8_lossy(haystack);
    for k in keys {
        assert!(
            !haystack.windows(32).any(|w| w == k.as_bytes()),
            "raw key in {what}"
        );
        assert!(!text.contains(&k.to_b64()), "base64 key in {what}");
        assert!(
            !text.to_lowercase().contains(&hex::encode(k.as_bytes())),
            "hex key in {what}"
        );
    }
}

async fn no_plaintext_key_at_rest(db: Db) {
    let mut srv = Server::start(db.clone(), &[]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let mut keys = Vec::new();
    let mut devices = Vec::new();
    for d in ["p1", "p2", "p3"] {
        let dev = Device::enroll(&srv, "alice", "alice-pw", d).await;
        keys.push(dev.key.clone());
        devices.push(dev);
    }
    // Positive control: the sealed column is there and opens to the keys under the master key.
    let rows = srv.state().store.keys(Some("alice")).await.unwrap();
    assert_eq!(rows.len(), 3);
    for dev in &devices {
        let row = rows.iter().find(|r| r.key_id == dev.key_id).expect("row");
        assert_eq!(
            srv.state()
                .master
                .open(&row.key_id, &row.sealed_key)
                .unwrap(),
            dev.key
        );
    }
    let data_dir = srv.dir.path().join("data");
    srv.stop().await;
    match &db {
        Db::Sqlite => {
            let mut all = Vec::new();
            for f in ["scm.db", "scm.db-wal", "scm.db-shm"] {
                if let Ok(b) = std::fs::read(data_dir.join(f)) {
                    all.extend_from_slice(&b);
                }
            }
            assert!(all.len() > 4096, "database file read");
            assert!(
                String::from_utf8_lossy(&all).contains("alice"),
                "control: the dump has the rows"
            );
            assert_no_key(&all, &keys, "SQLite file");
        }
        Db::Postgres(url) => {
            let dump = crate::pg::dump(url);
            assert!(
                dump.contains("device_keys") && dump.contains("alice"),
                "control: {dump}"
            );
            assert_no_key(dump.as_bytes(), &keys, "pg_dump");
        }
    }
    // The master key file is 0600 and is not in the database directory's database.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(data_dir.join("master.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

async fn admin_api_requires_token(db: Db) {
    let srv = Server::start(db, &[]).await;
    let url = format!("{}/v1/admin/users", srv.admin_url);
    assert_error(&send(srv.admin.get(&url)).await, 401, "bad_admin_token");
    assert_error(
        &send(srv.admin.get(&url).bearer_auth("x".repeat(64))).await,
        401,
        "bad_admin_token",
    );
    let short = &srv.token[..srv.token.len() - 1];
    assert_error(
        &send(srv.admin.get(&url).bearer_auth(short)).await,
        401,
        "bad_admin_token",
    );
    assert_eq!(
        send(srv.admin.get(&url).bearer_auth(&srv.token)).await.0,
        StatusCode::OK
    );
    // The admin API is not on the device port.
    let r = send(
        srv.device
            .get(format!("{}/v1/admin/users", srv.device_url))
            .bearer_auth(&srv.token),
    )
    .await;
    assert_error(&r, 404, "not_found");
}

/// A server refuses to start with a master key that does not open the stored keys, rather than
/// failing every login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_master_key_refused_at_start() {
    let mut srv = Server::start(Db::Sqlite, &[]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    Device::enroll(&srv, "alice", "alice-pw", "p1").await;
    srv.stop().await;
    let other = srv.dir.path().join("other.key");
    scm_security::secrets::write_secret_file(
        &other,
        &scm_security::master_key::new_master_key_text(),
    )
    .unwrap();
    let certs = srv.certs();
    let args = crate::support::serve_args(
        srv.dir.path(),
        &certs,
        &Db::Sqlite,
        &["--master-key-file", other.to_str().unwrap()],
    );
    let err = scm_security::server::start(&args)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("wrong master key"), "{err}");
    // The right key still works.
    let args = crate::support::serve_args(srv.dir.path(), &certs, &Db::Sqlite, &[]);
    scm_security::server::start(&args)
        .await
        .expect("starts")
        .shutdown()
        .await;
}

async fn user_changes_and_session_cap(db: Db) {
    let srv = Server::start(db, &["--max-sessions", "2"]).await;
    srv.add_user("alice", "alice-pw", &["staff"]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let first = dev.login(&srv).await;
    // Group changes apply at the next login.
    let v = srv
        .admin_ok(
            Method::PATCH,
            "/users/alice",
            Some(json!({"groups": ["staff", "ops"]})),
        )
        .await;
    assert_eq!(v["groups"], json!(["staff", "ops"]));
    let second = dev.login(&srv).await;
    assert_eq!(second.resp.groups, vec!["staff", "ops"]);
    // The table is full: a third login is refused, nothing else changes.
    let e = dev.try_login(&srv).await.err().expect("refused");
    assert_error(&e, 503, "too_many_sessions");
    // A new password replaces the old one.
    srv.admin_ok(
        Method::PATCH,
        "/users/alice",
        Some(json!({"password": "new-pw"})),
    )
    .await;
    let mut old = dev.clone();
    old.password = "alice-pw".into();
    srv.admin_ok(
        Method::POST,
        &format!(
            "/sessions/{}/revoke",
            crypto::session_tag(&first.resp.session_id).0
        ),
        None,
    )
    .await;
    assert_error(
        &old.try_login(&srv).await.err().unwrap(),
        401,
        "bad_credentials",
    );
    // Deleting the user ends their sessions and revokes their keys.
    let r = srv.admin_ok(Method::DELETE, "/users/alice", None).await;
    assert_eq!(r["sessions"], 1);
    assert_eq!(r["keys"], json!([dev.key_id]));
    assert_error(
        &srv.validate(&second.resp.session_id).await,
        404,
        "unknown_session",
    );
    assert!(
        srv.state()
            .store
            .key(&dev.key_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );
}
