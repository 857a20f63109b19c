//! Identity assertions: the real server signs them on the proxies' API, and this side verifies
//! them as a back end would — with the `jsonwebtoken` crate and the JWK Set fetched from the
//! real device listener — on SQLite and PostgreSQL: claims, audience, expiry, tampering, key
//! rotation, and the signing keys sealed at rest.

use std::time::{Duration, Instant};

use aws_lc_rs::encoding::AsBigEndian as _;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::{Method, StatusCode};
use scm_proto::api::{AssertionResponse, PATH_JWKS, PATH_PROXY_ASSERTION};
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Db, Device, Login, Server, assert_error, send};

/// alice (staff) logged in from phone-1; `intranet` (http, staff) and `secret` (tcp, admins).
async fn setup(srv: &Server) -> (Device, Login) {
    srv.add_user("alice", "alice-pw", &["staff"]).await;
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
    let dev = Device::enroll(srv, "alice", "alice-pw", "phone-1").await;
    let login = dev.login(srv).await;
    (dev, login)
}

async fn ask(srv: &Server, session_id: &str, resource: &str) -> (StatusCode, Value) {
    srv.proxy_post(
        PATH_PROXY_ASSERTION,
        &json!({"session_id": session_id, "resource": resource}),
    )
    .await
}

async fn sign(srv: &Server, login: &Login, resource: &str) -> AssertionResponse {
    let (s, v) = ask(srv, &login.resp.session_id, resource).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    serde_json::from_value(v).expect("AssertionResponse")
}

/// The JWK Set, fetched from the device listener as any back end would.
async fn jwks(srv: &Server) -> JwkSet {
    let resp = srv
        .device
        .get(format!("{}{PATH_JWKS}", srv.device_url))
        .send()
        .await
        .expect("JWKS answered");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["cache-control"]
            .to_str()
            .unwrap()
            .starts_with("public, max-age="),
    );
    resp.json().await.expect("a JWK Set")
}

fn kids(set: &JwkSet) -> Vec<String> {
    set.keys
        .iter()
        .map(|k| k.common.key_id.clone().expect("every key has a kid"))
        .collect()
}

/// Verifies like a back end: the key named by the token's `kid`, ES256 only, the audience and the
/// issuer, no leeway on `exp`.
fn verify(token: &str, set: &JwkSet, audience: &str) -> Result<Value, ErrorKind> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.into_kind())?;
    let kid = header.kid.ok_or(ErrorKind::InvalidToken)?;
    let jwk = set.find(&kid).ok_or(ErrorKind::InvalidKeyFormat)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.into_kind())?;
    let mut v = Validation::new(Algorithm::ES256);
    v.leeway = 0;
    v.set_audience(&[audience]);
    v.set_issuer(&["scm-security"]);
    v.set_required_spec_claims(&["exp", "iat", "aud", "iss", "sub"]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.into_kind())
}

async fn assertions_verify_against_the_jwks(db: Db) {
    let mut srv = Server::start(db.clone(), &[]).await;
    let (_dev, login) = setup(&srv).await;
    let a = sign(&srv, &login, "intranet").await;
    let set = jwks(&srv).await;
    assert_eq!(kids(&set), vec![a.kid.clone()], "one key at first");
    let header = jsonwebtoken::decode_header(&a.token).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), Some(a.kid.as_str()));

    let c = verify(&a.token, &set, "intranet").expect("verifies");
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["aud"], "intranet");
    assert_eq!(c["iss"], "scm-security");
    assert_eq!(c["groups"], json!(["staff"]));
    assert_eq!(c["device"], "phone-1");
    assert_eq!(c["app"], "mail");
    assert_eq!(c["app_version"], "1.0");
    assert_eq!(c["site"], "main");
    let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
    assert_eq!(exp - iat, 60, "the default lifetime");
    assert_eq!(exp as u64, a.expires_at);
    assert_eq!(a.expires_in, 60);
    assert!(
        (iat - scm_security::store::unix_now()).abs() <= 2,
        "fresh iat"
    );
    let jti = c["jti"].as_str().unwrap().to_owned();
    assert_eq!(jti.len(), 32);
    // Nothing of the session's secrets is in it.
    let payload = a.token.split('.').nth(1).unwrap();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert!(!payload.contains(&login.resp.session_id));
    assert!(!payload.contains(&STANDARD.encode(login.session_key.as_bytes())));
    // Each token is new.
    let b = sign(&srv, &login, "intranet").await;
    assert_ne!(
        verify(&b.token, &set, "intranet").unwrap()["jti"],
        json!(jti)
    );

    // A back end of another resource refuses it.
    assert_eq!(
        verify(&a.token, &set, "payroll").unwrap_err(),
        ErrorKind::InvalidAudience
    );
    // A token with an edited claim, or a signature from elsewhere, does not verify.
    let parts: Vec<&str> = a.token.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(payload.replace("\"alice\"", "\"admin\""));
    let forged = format!("{}.{forged}.{}", parts[0], parts[2]);
    assert_eq!(
        verify(&forged, &set, "intranet").unwrap_err(),
        ErrorKind::InvalidSignature
    );
    let other = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        b.token.split('.').nth(2).unwrap()
    );
    assert_eq!(
        verify(&other, &set, "intranet").unwrap_err(),
        ErrorKind::InvalidSignature
    );

    // Only for a live session, for a resource its groups allow.
    assert_error(
        &ask(&srv, &login.resp.session_id, "secret").await,
        403,
        "resource_refused",
    );
    assert_error(
        &ask(&srv, &login.resp.session_id, "nope").await,
        404,
        "unknown_resource",
    );
    let unknown = scm_proto::crypto::SessionId::generate();
    assert_error(
        &ask(&srv, unknown.expose(), "intranet").await,
        404,
        "unknown_session",
    );
    // Devices cannot ask for one: it is on the proxies' API (mutual TLS) only.
    let on_device = send(
        srv.device
            .post(format!("{}{PATH_PROXY_ASSERTION}", srv.device_url))
            .json(&json!({"session_id": login.resp.session_id, "resource": "intranet"})),
    )
    .await;
    assert_error(&on_device, 404, "not_found");

    // At rest the private key is sealed under the master key (positive control: it opens, and
    // its public half is the published one), and the database holds no trace of it.
    let rows = srv.state().store.assertion_keys().await.unwrap();
    assert_eq!(rows.len(), 1);
    let pkcs8 = srv
        .state()
        .master
        .open_bytes(
            &format!("assertion-key:{}", rows[0].kid),
            &rows[0].sealed_key,
        )
        .expect("the sealed key opens under the master key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let jwk = serde_json::to_value(set.find(&a.kid).unwrap()).unwrap();
    assert_eq!(jwk["x"], URL_SAFE_NO_PAD.encode(&point[1..33]));
    assert_eq!(jwk["y"], URL_SAFE_NO_PAD.encode(&point[33..]));
    let scalar = pair.private_key().as_be_bytes().unwrap().as_ref().to_vec();
    assert_eq!(scalar.len(), 32);
    let data_dir = srv.dir.path().join("data");
    srv.stop().await;
    let dump = match &db {
        Db::Sqlite => {
            let mut all = Vec::new();
            for f in ["scm.db", "scm.db-wal", "scm.db-shm"] {
                if let Ok(b) = std::fs::read(data_dir.join(f)) {
                    all.extend_from_slice(&b);
                }
            }
            all
        }
        Db::Postgres(url) => crate::pg::dump(url).into_bytes(),
    };
    let text = String::from_utf8_lossy(&dump).to_lowercase();
    assert!(
        text.contains("assertion_keys"),
        "control: the table is in the dump"
    );
    assert!(
        text.contains(&a.kid.to_lowercase()),
        "control: the key's row is in the dump"
    );
    for (what, secret) in [("scalar", &scalar), ("PKCS#8", &pkcs8)] {
        assert!(
            !dump.windows(secret.len()).any(|w| w == secret.as_slice()),
            "raw {what} in the dump"
        );
        assert!(
            !text.contains(&hex::encode(secret)),
            "hex {what} in the dump"
        );
        for b64 in [STANDARD.encode(secret), URL_SAFE_NO_PAD.encode(secret)] {
            assert!(
                !text.contains(&b64.to_lowercase()),
                "base64 {what} in the dump"
            );
        }
    }

    // A restart reopens the same key: tokens signed before it still verify after it.
    let dir = std::mem::replace(&mut srv.dir, tempfile::tempdir().unwrap());
    let srv = Server::start_in(dir, db, &[]).await;
    let set = jwks(&srv).await;
    assert_eq!(kids(&set), vec![a.kid.clone()]);
    verify(&a.token, &set, "intranet").expect("verifies after a restart");
}

async fn assertions_expire(db: Db) {
    let srv = Server::start(db, &["--assertion-ttl", "2s"]).await;
    let (_dev, login) = setup(&srv).await;
    let a = sign(&srv, &login, "intranet").await;
    assert_eq!(a.expires_in, 2);
    let set = jwks(&srv).await;
    verify(&a.token, &set, "intranet").expect("verifies while fresh");
    // Past its exp (a whole second more, as exp is in seconds) no verifier takes it.
    let wait = a.expires_at as i64 - scm_security::store::unix_now() + 1;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64 * 1000 + 200)).await;
    assert_eq!(
        verify(&a.token, &set, "intranet").unwrap_err(),
        ErrorKind::ExpiredSignature
    );
    // After logout none is issued.
    let (s, _) = send(
        srv.device
            .post(format!("{}{}", srv.device_url, scm_proto::api::PATH_LOGOUT))
            .bearer_auth(&login.resp.session_id),
    )
    .await;
    assert!(s.is_success(), "logout: {s}");
    assert_error(
        &ask(&srv, &login.resp.session_id, "intranet").await,
        404,
        "unknown_session",
    );

    // A token never outlives its session.
    let srv = Server::start(Db::Sqlite, &["--session-max-lifetime", "20s"]).await;
    let (_dev, login) = setup(&srv).await;
    let a = sign(&srv, &login, "intranet").await;
    let c = verify(&a.token, &jwks(&srv).await, "intranet").unwrap();
    assert!(c["exp"].as_u64().unwrap() <= login.resp.absolute_expires_at);
    assert!(a.expires_in <= 20, "{}", a.expires_in);
}

async fn rotation_keeps_old_tokens_until_they_expire(db: Db) {
    // Keys sign for 4 s each; tokens live 3 s.
    let srv = Server::start(
        db,
        &["--assertion-ttl", "3s", "--assertion-key-rotation", "4s"],
    )
    .await;
    let (_dev, login) = setup(&srv).await;
    let first = sign(&srv, &login, "intranet").await;
    // Sign until the key changes, keeping the last token of the first key.
    let mut last_old = first.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        let t = sign(&srv, &login, "intranet").await;
        if t.kid != first.kid {
            break t;
        }
        last_old = t;
        assert!(Instant::now() < deadline, "the signing key never rotated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Right after the switch both keys are published, and both tokens verify.
    let set = jwks(&srv).await;
    let published = kids(&set);
    assert!(
        published.contains(&first.kid) && published.contains(&new.kid),
        "{published:?}"
    );
    verify(&last_old.token, &set, "intranet").expect("the old key's token still verifies");
    verify(&new.token, &set, "intranet").expect("the new key's token verifies");
    // The old key leaves the JWK Set only once its last token has expired, and then it does.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = scm_security::store::unix_now();
        let set = jwks(&srv).await;
        if !kids(&set).contains(&first.kid) {
            assert!(
                now >= last_old.expires_at as i64,
                "the old key left at {now}, before its token's exp {}",
                last_old.expires_at
            );
            break;
        }
        if now < last_old.expires_at as i64 {
            verify(&last_old.token, &set, "intranet").expect("verifies until its exp");
        }
        assert!(
            Instant::now() < deadline,
            "the retired key was never withdrawn"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its row is deleted too.
    let gone = crate::support::eventually(Duration::from_secs(5), async || {
        !srv.state()
            .store
            .assertion_keys()
            .await
            .unwrap()
            .iter()
            .any(|r| r.kid == first.kid)
    })
    .await;
    assert!(gone, "the retired key's row stays in the database");
}

#[tokio::test]
async fn bad_assertion_flags_are_refused() {
    for (flags, says) in [
        (&["--assertion-ttl", "0s"][..], "--assertion-ttl"),
        (&["--assertion-ttl", "2h"][..], "--assertion-ttl"),
        (
            &["--assertion-key-rotation", "1s"][..],
            "--assertion-key-rotation",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::support::certs(dir.path());
        let args = crate::support::serve_args(dir.path(), &certs, &Db::Sqlite, flags);
        let e = scm_security::server::start(&args).await.unwrap_err();
        assert!(e.to_string().contains(says), "{flags:?}: {e}");
    }
}

both_backends!(
    assertions_verify_against_the_jwks,
    assertions_expire,
    rotation_keeps_old_tokens_until_they_expire,
);
