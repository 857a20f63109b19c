//! The controls around the protocol under attack (issue 10): concurrent guesses against the
//! lockout (HTTP/1.1 and HTTP/2), lockout of other users without a proof, challenge exhaustion,
//! idle connections and per-source connection caps — each against a real server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Client, StatusCode};
use scm_proto::api::PATH_ENROLL;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

use crate::both_backends;
use crate::support::{Db, Device, Remote, Server, assert_error, send};

both_backends!(
    concurrent_guesses_are_bounded_by_the_lockout,
    concurrent_guesses_are_bounded_by_the_source_limit,
    unknown_key_ids_do_not_lock_the_user_out,
);

/// A client of the device API speaking HTTP/2 only (ALPN h2, prior knowledge).
fn h2_client(srv: &Server) -> Client {
    let mut tls =
        scm_security::tls::client_config(&srv.certs().join("ca.pem"), None).expect("TLS config");
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Client::builder()
        .use_preconfigured_tls(tls)
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("h2 client")
}

/// Sends `n` enrollments at once, each made by `body(i)`; returns the error codes answered.
async fn storm(client: &Client, url: &str, n: usize, body: impl Fn(usize) -> Value) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let req = client.post(format!("{url}{PATH_ENROLL}")).json(&body(i));
        tasks.spawn(async move { send(req).await });
    }
    let mut codes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (s, v) = r.expect("task");
        assert_ne!(s, StatusCode::OK, "a wrong password enrolled: {v}");
        codes.push(v["code"].as_str().unwrap_or("?").to_owned());
    }
    codes
}

fn count(codes: &[String], code: &str) -> usize {
    codes.iter().filter(|c| *c == code).count()
}

fn wrong_enroll(user: &str) -> impl Fn(usize) -> Value {
    let user = user.to_owned();
    move |i| json!({"username": user, "password": format!("guess-{i}"), "device_id": format!("d{i}"), "app_id": "mail"})
}

async fn concurrent_guesses_are_bounded_by_the_lockout(db: Db) {
    let srv = Server::start(
        db,
        &[
            "--lockout-threshold",
            "5",
            "--source-failure-limit",
            "100000",
        ],
    )
    .await;
    for (user, client) in [("alice", srv.device.clone()), ("bob", h2_client(&srv))] {
        srv.add_user(user, "right-pw", &[]).await;
        let codes = storm(&client, &srv.device_url, 200, wrong_enroll(user)).await;
        let checked = count(&codes, "bad_credentials");
        assert!(
            (1..=5).contains(&checked),
            "{user}: {checked} of 200 concurrent guesses had their password checked (threshold 5): {codes:?}"
        );
        assert_eq!(
            checked + count(&codes, "locked_out") + count(&codes, "attempts_in_flight"),
            200,
            "{codes:?}"
        );
        // Locked now, whatever the password.
        let e = Device::try_enroll(&srv, user, "right-pw", "phone", None)
            .await
            .err()
            .expect("locked");
        assert_error(&e, 403, "locked_out");
    }
}

async fn concurrent_guesses_are_bounded_by_the_source_limit(db: Db) {
    let srv = Server::start(
        db,
        &["--lockout-threshold", "1000", "--source-failure-limit", "5"],
    )
    .await;
    let h2 = h2_client(&srv);
    let codes = storm(&h2, &srv.device_url, 200, |i| {
        json!({"username": format!("user{i}"), "password": "guess", "device_id": "d", "app_id": "mail"})
    })
    .await;
    let checked = count(&codes, "bad_credentials");
    assert!(
        (1..=5).contains(&checked),
        "{checked} of 200 concurrent guesses from one source were checked (limit 5): {codes:?}"
    );
    assert_eq!(
        checked + count(&codes, "rate_limited") + count(&codes, "attempts_in_flight"),
        200,
        "{codes:?}"
    );
}

async fn unknown_key_ids_do_not_lock_the_user_out(db: Db) {
    let srv = Server::start(
        db,
        &["--lockout-threshold", "3", "--source-failure-limit", "1000"],
    )
    .await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    // Anyone can name alice with random key ids, or a bad MAC: no proof, no count against her.
    for i in 0..10 {
        let mut forged = dev.clone();
        forged.key_id = format!("k_{i:032x}");
        assert_error(
            &forged.try_login(&srv).await.err().unwrap(),
            401,
            "unknown_key",
        );
        let mut bad_mac = dev.clone();
        bad_mac.key = scm_proto::crypto::SharedKey::generate();
        assert_error(
            &bad_mac.try_login(&srv).await.err().unwrap(),
            401,
            "bad_mac",
        );
    }
    dev.login(&srv).await;
    // They counted against the source, which is blocked once its budget is spent.
    let srv = Server::start(
        Db::Sqlite,
        &["--lockout-threshold", "3", "--source-failure-limit", "4"],
    )
    .await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    for i in 0..4 {
        let mut forged = dev.clone();
        forged.key_id = format!("k_{i:032x}");
        let _ = forged.try_login(&srv).await;
    }
    assert_error(
        &srv.device_post(scm_proto::api::PATH_CHALLENGE, &json!({}))
            .await,
        429,
        "rate_limited",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenges_cannot_be_exhausted() {
    let srv = Server::start(Db::Sqlite, &["--challenge-rate-limit", "0"]).await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "alice-pw", "phone-1").await;
    // Far more challenges than the old table's cap of 100,000, issued by the running server.
    for _ in 0..150_000 {
        let _ = srv.state().challenges.issue();
    }
    for _ in 0..50 {
        Device::challenge(&srv).await;
    }
    assert_eq!(
        srv.state().challenges.used_len(),
        0,
        "issuing stores nothing"
    );
    // Everyone can still log in, and a used challenge stays used.
    let ch = Device::challenge(&srv).await;
    let (req, _) = dev.login_request(&ch, &dev.key);
    let body = serde_json::to_value(&req).unwrap();
    let (s, v) = srv.device_post(scm_proto::api::PATH_LOGIN, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_error(
        &srv.device_post(scm_proto::api::PATH_LOGIN, &body).await,
        401,
        "unknown_challenge",
    );
    assert_eq!(srv.state().challenges.used_len(), 1);
}

fn addr(srv: &Server) -> SocketAddr {
    srv.running.as_ref().expect("running").device_addr
}

fn tls_connector(srv: &Server, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut cfg =
        scm_security::tls::client_config(&srv.certs().join("ca.pem"), None).expect("TLS config");
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tcp_from(src: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(to).await
}

/// Whether the server closes `tls` (EOF or reset) within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(tls: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, tls.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Session tickets or h2 frames: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let srv = Server::start(Db::Sqlite, &["--connection-idle-timeout", "1s"]).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // HTTP/1.1: a TLS connection that never sends a request.
    let tcp = tcp_from("127.0.0.1".parse().unwrap(), addr(&srv))
        .await
        .unwrap();
    let mut h1 = tls_connector(&srv, b"http/1.1")
        .connect(name.clone(), tcp)
        .await
        .expect("handshake");
    assert!(
        closed_within(&mut h1, Duration::from_secs(5)).await,
        "an HTTP/1.1 connection with no request stayed open"
    );
    // HTTP/2: a request, then nothing but the client's pings (which must not keep it open).
    let tcp = tcp_from("127.0.0.1".parse().unwrap(), addr(&srv))
        .await
        .unwrap();
    let h2 = tls_connector(&srv, b"h2")
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(h2))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(format!("{}/healthz", srv.device_url))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("h2 request");
    assert_eq!(resp.status(), 200);
    drop(resp);
    let ended = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_at_its_cap_cannot_stop_another_source() {
    let srv = Server::start(
        Db::Sqlite,
        &[
            "--max-connections-per-source",
            "8",
            "--connection-idle-timeout",
            "60s",
        ],
    )
    .await;
    srv.add_user("alice", "alice-pw", &[]).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let hog: IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        let tcp = tcp_from(hog, addr(&srv)).await.unwrap();
        held.push(
            tls_connector(&srv, b"http/1.1")
                .connect(name.clone(), tcp)
                .await
                .expect("within the cap"),
        );
    }
    // The ninth from the same source is closed at once.
    let tcp = tcp_from(hog, addr(&srv)).await.unwrap();
    let ninth = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connector(&srv, b"http/1.1").connect(name.clone(), tcp),
    )
    .await
    .expect("answered");
    assert!(
        ninth.is_err(),
        "a ninth connection from one source was served"
    );
    // Another source enrolls and logs in meanwhile.
    let other = Remote {
        client: Client::builder()
            .use_preconfigured_tls(
                scm_security::tls::client_config(&srv.certs().join("ca.pem"), None).unwrap(),
            )
            .local_address("127.0.0.3".parse::<IpAddr>().unwrap())
            .resolve("localhost", addr(&srv))
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        url: srv.device_url.clone(),
    };
    let dev = Device::enroll(&other, "alice", "alice-pw", "phone-1").await;
    dev.login(&other).await;
    // The hog's slots come back when its connections close.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tcp = tcp_from(hog, addr(&srv)).await.unwrap();
    tls_connector(&srv, b"http/1.1")
        .connect(name, tcp)
        .await
        .expect("a slot again");
}
