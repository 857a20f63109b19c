//! Every class of bad input, on every API, gets a 4xx JSON `ErrorBody` with a stable code; nothing
//! is written and the server keeps answering.

use reqwest::{Method, StatusCode};
use scm_proto::api::{PATH_ENROLL, PATH_LOGIN, PATH_PROXY_VALIDATE};
use serde_json::json;

use crate::both_backends;
use crate::support::{Db, Device, Server, assert_error, send};

both_backends!(bad_input_is_refused_cleanly);

async fn counts(srv: &Server) -> [i64; 5] {
    [
        srv.count("users").await,
        srv.count("device_keys").await,
        srv.count("audit_log").await,
        srv.count("resources").await,
        srv.count("app_releases").await,
    ]
}

async fn bad_input_is_refused_cleanly(db: Db) {
    let srv = Server::start(db, &[]).await;
    srv.add_user("alice", "alice-pw", &["staff"]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    let sessions_before = srv.state().sessions.len();
    let before = counts(&srv).await;
    let d = &srv.device_url;
    let raw = |url: String, ct: &'static str, body: Vec<u8>| {
        srv.device.post(url).header("content-type", ct).body(body)
    };

    // Malformed JSON, truncated JSON, not an object.
    for body in [&b"{\"username\":"[..], b"not json", b"", b"[1,2]"] {
        let r = send(raw(
            format!("{d}{PATH_LOGIN}"),
            "application/json",
            body.to_vec(),
        ))
        .await;
        assert!(
            r.0 == StatusCode::BAD_REQUEST || r.0 == StatusCode::UNPROCESSABLE_ENTITY,
            "{r:?}"
        );
    }
    assert_error(
        &send(raw(
            format!("{d}{PATH_LOGIN}"),
            "application/json",
            b"{\"username\":".to_vec(),
        ))
        .await,
        400,
        "malformed_json",
    );
    // Missing fields, unknown fields, wrong types.
    assert_error(
        &srv.device_post(PATH_LOGIN, &json!({})).await,
        422,
        "invalid_request",
    );
    assert_error(
        &srv.device_post(PATH_ENROLL, &json!({"username": "alice", "password": "alice-pw", "device_id": "d", "app_id": "a", "admin": true})).await,
        422,
        "invalid_request",
    );
    assert_error(
        &srv.device_post(
            PATH_ENROLL,
            &json!({"username": 5, "password": "x", "device_id": "d", "app_id": "a"}),
        )
        .await,
        422,
        "invalid_request",
    );
    // Wrong content type.
    let body = serde_json::to_vec(&json!({"username": "alice"})).unwrap();
    assert_error(
        &send(raw(format!("{d}{PATH_LOGIN}"), "text/plain", body.clone())).await,
        415,
        "unsupported_media_type",
    );
    assert_error(
        &send(srv.device.post(format!("{d}{PATH_ENROLL}")).body(body)).await,
        415,
        "unsupported_media_type",
    );
    // Oversized, with and without a Content-Length.
    let big = format!("{{\"username\":\"{}\"}}", "a".repeat(100_000));
    // Refused from the Content-Length alone: the client may still be writing when the server
    // answers and closes (a broken pipe), which DESIGN allows; at least one of a few attempts
    // must read the 413.
    let mut answered = false;
    for _ in 0..5 {
        let r = raw(
            format!("{d}{PATH_LOGIN}"),
            "application/json",
            big.clone().into_bytes(),
        )
        .send()
        .await;
        if let Ok(resp) = r {
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            assert_error(&(status, v), 413, "payload_too_large");
            answered = true;
            break;
        }
    }
    assert!(
        answered,
        "an oversized body is answered 413 at least once in 5 tries"
    );
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 4096])),
    ));
    // The server answers as soon as the limit is passed; the client may still be writing and see
    // the connection close instead of the answer, which DESIGN allows ("a clear error or a closed
    // connection").
    let r = srv
        .device
        .post(format!("{d}{PATH_ENROLL}"))
        .header("content-type", "application/json")
        .body(chunked)
        .send()
        .await;
    if let Ok(resp) = r {
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_error(&(status, v), 413, "payload_too_large");
    }
    // Wrong lengths and encodings in the login.
    let ch = Device::challenge(&srv).await;
    let (good, _) = dev.login_request(&ch, &dev.key);
    let mut v = serde_json::to_value(&good).unwrap();
    v["client_nonce"] = json!(scm_proto::crypto::b64(&[0u8; 16]));
    assert_error(&srv.device_post(PATH_LOGIN, &v).await, 400, "invalid_field");
    let mut v = serde_json::to_value(&good).unwrap();
    v["mac"] = json!("!!!not base64!!!");
    assert_error(&srv.device_post(PATH_LOGIN, &v).await, 400, "invalid_field");
    let mut v = serde_json::to_value(&good).unwrap();
    v["app_version"] = json!("1.x");
    assert_error(&srv.device_post(PATH_LOGIN, &v).await, 400, "invalid_field");
    let mut v = serde_json::to_value(&good).unwrap();
    v["username"] = json!("al ice");
    assert_error(&srv.device_post(PATH_LOGIN, &v).await, 400, "invalid_field");
    let mut v = serde_json::to_value(&good).unwrap();
    v["device_id"] = json!("d".repeat(129));
    assert_error(&srv.device_post(PATH_LOGIN, &v).await, 400, "invalid_field");
    // Unknown challenge id (never issued).
    let mut v = serde_json::to_value(&good).unwrap();
    v["challenge_id"] = json!("0123456789abcdef");
    assert_error(
        &srv.device_post(PATH_LOGIN, &v).await,
        401,
        "unknown_challenge",
    );
    // Enrollment with ids the preamble could not carry.
    for (field, val) in [
        ("device_id", "has space"),
        ("app_id", ""),
        ("device_id", "é"),
    ] {
        let mut e = json!({"username": "alice", "password": "alice-pw", "device_id": "d", "app_id": "mail"});
        e[field] = json!(val);
        assert_error(
            &srv.device_post(PATH_ENROLL, &e).await,
            400,
            "invalid_field",
        );
    }
    // Unknown paths and wrong methods.
    assert_error(
        &send(srv.device.get(format!("{d}/v1/nope"))).await,
        404,
        "not_found",
    );
    assert_error(
        &send(srv.device.get(format!("{d}{PATH_LOGIN}"))).await,
        405,
        "method_not_allowed",
    );
    // Update check without or with bad query.
    assert_error(
        &send(srv.device.get(format!("{d}/v1/apps/mail/update"))).await,
        400,
        "invalid_query",
    );
    assert_error(
        &send(srv.device.get(format!(
            "{d}/v1/apps/mail/update?platform=android&version=one"
        )))
        .await,
        400,
        "invalid_field",
    );
    // Logout without a token, with garbage.
    assert_error(
        &send(srv.device.post(format!("{d}/v1/logout"))).await,
        401,
        "missing_token",
    );
    assert_error(
        &send(
            srv.device
                .post(format!("{d}/v1/logout"))
                .bearer_auth("garbage"),
        )
        .await,
        401,
        "unknown_session",
    );

    // Proxies' API.
    assert_error(&srv.validate("garbage").await, 404, "unknown_session");
    assert_error(&srv.validate(&"A".repeat(43)).await, 404, "unknown_session");
    assert_error(
        &srv.proxy_post(PATH_PROXY_VALIDATE, &json!({"sid": "x"}))
            .await,
        422,
        "invalid_request",
    );
    let r = send(
        srv.proxy
            .post(format!("{}{PATH_PROXY_VALIDATE}", srv.proxy_url))
            .header("content-type", "application/json")
            .body("{"),
    )
    .await;
    assert_error(&r, 400, "malformed_json");

    // Admin API.
    assert_error(
        &srv.admin(
            Method::POST,
            "/users",
            Some(json!({"name": "bad name", "password": "p"})),
        )
        .await,
        400,
        "invalid_field",
    );
    assert_error(
        &srv.admin(
            Method::POST,
            "/users",
            Some(json!({"name": "bob", "password": ""})),
        )
        .await,
        400,
        "invalid_field",
    );
    assert_error(
        &srv.admin(
            Method::POST,
            "/users",
            Some(json!({"name": "alice", "password": "p"})),
        )
        .await,
        409,
        "conflict",
    );
    assert_error(
        &srv.admin(
            Method::PUT,
            "/resources/r",
            Some(json!({"address": "h:1", "mode": "udp", "allowed_groups": []})),
        )
        .await,
        422,
        "invalid_request",
    );
    assert_error(
        &srv.admin(
            Method::PUT,
            "/resources/r",
            Some(json!({"address": "no-port", "mode": "tcp"})),
        )
        .await,
        400,
        "invalid_field",
    );
    assert_error(
        &srv.admin(Method::PUT, "/sites/s", Some(json!({"proxy_urls": ["x"]})))
            .await,
        400,
        "invalid_field",
    );
    assert_error(
        &srv.admin(
            Method::PUT,
            "/apps/mail/policy",
            Some(json!({"min_version": "v2"})),
        )
        .await,
        400,
        "invalid_field",
    );
    assert_error(
        &srv.admin(Method::DELETE, "/users/nobody", None).await,
        404,
        "unknown_user",
    );
    assert_error(
        &srv.admin(Method::DELETE, "/resources/nothing", None).await,
        404,
        "unknown_resource",
    );
    assert_error(
        &srv.admin(
            Method::POST,
            "/users/nobody/activation-codes",
            Some(json!({"ttl_secs": 5})),
        )
        .await,
        404,
        "unknown_user",
    );
    assert_error(
        &srv.admin(
            Method::POST,
            "/users/alice/activation-codes",
            Some(json!({"ttl_secs": 0})),
        )
        .await,
        400,
        "invalid_field",
    );
    assert_error(
        &srv.admin(Method::POST, "/devices/none/revoke", None).await,
        404,
        "unknown_device",
    );
    assert_error(
        &srv.admin(Method::GET, "/nothing", None).await,
        404,
        "not_found",
    );
    let r = send(
        srv.admin
            .put(format!(
                "{}/v1/admin/apps/mail/android/not-a-version",
                srv.admin_url
            ))
            .bearer_auth(&srv.token)
            .body("x"),
    )
    .await;
    assert_error(&r, 400, "invalid_field");
    let r = send(
        srv.admin
            .put(format!("{}/v1/admin/apps/mail/android/1.0", srv.admin_url))
            .bearer_auth(&srv.token)
            .body(""),
    )
    .await;
    assert_error(&r, 400, "empty_package");
    assert_eq!(
        std::fs::read_dir(srv.dir.path().join("data/apps"))
            .unwrap()
            .count(),
        0,
        "no partial upload left behind"
    );

    // Nothing was written, no session made, and the server still works.
    assert_eq!(counts(&srv).await, before);
    assert_eq!(srv.state().sessions.len(), sessions_before);
    dev.login(&srv).await;
    let r = send(srv.device.get(format!("{d}/healthz"))).await;
    assert_eq!(r.0, StatusCode::OK);
}

/// Slow clients: one that never starts TLS, one that never finishes its headers, one that never
/// finishes its body. Each is cut off after --io-timeout while others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let srv = Server::start(Db::Sqlite, &["--io-timeout", "1s"]).await;
    let addr = srv.running.as_ref().unwrap().device_addr;
    let tls =
        Arc::new(scm_security::tls::client_config(&srv.certs().join("ca.pem"), None).unwrap());
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();

    // Reads until EOF or error; returns what arrived, failing if the server holds on too long.
    async fn drain(mut s: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(r.is_ok(), "the server kept a slow connection open");
        out
    }

    // 1. TCP only, no TLS handshake.
    let t0 = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    drain(tcp).await;
    assert!(t0.elapsed() >= Duration::from_millis(800));

    // 2. Headers never finished.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = connector.connect(name.clone(), tcp).await.unwrap();
    s.write_all(b"POST /v1/login HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let got = drain(s).await;
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // 3. Body never finished: a JSON 408.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = connector.connect(name.clone(), tcp).await.unwrap();
    s.write_all(
        b"POST /v1/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user",
    )
    .await
    .unwrap();
    let got = String::from_utf8_lossy(&drain(s).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("request_timeout"), "{got}");

    // The server is still serving.
    let r = send(srv.device.get(format!("{}/healthz", srv.device_url))).await;
    assert_eq!(r.0, StatusCode::OK);
}
