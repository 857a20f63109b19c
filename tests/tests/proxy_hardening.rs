//! End-to-end tests of the proxy's hardening (issue 10, the proxy's side), with the real
//! `scm-security` and `scm-proxy` processes, real TLS and SQLite: revocations missed while the
//! proxy–Security link was cut, the absolute expiry enforced on open tunnels, fail-closed after
//! unanswered revalidations, activity counted only after the binding holds, the app version bound
//! to the login, spoofed headers in http mode, and the single-process per-source failure limit.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use scm_device::{DeviceError, ProxyStream, Session};
use scm_e2e::backend::Seen;
use scm_e2e::ha::echo_once;
use scm_e2e::stack::PASSWORD;
use scm_e2e::{Stack, StackOptions};
use scm_proto::preamble::{Preamble, Status};
use tokio::io::AsyncReadExt as _;

async fn login(stack: &Stack, user: &str, device: &str, version: &str) -> Session {
    let d = stack
        .enroll(user, device, version)
        .await
        .expect("enrollment");
    Session::login(&d, PASSWORD).await.expect("login")
}

fn refused(r: Result<ProxyStream, DeviceError>) -> (Status, String) {
    match r {
        Err(DeviceError::ProxyRefused { status, reason }) => (status, reason),
        Err(e) => panic!("expected a refusal, got error {e}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    }
}

/// Waits up to `within` for the peer to close `stream`; returns how long it took.
async fn closed_within(stream: &mut ProxyStream, within: Duration, what: &str) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {within:?}"));
    assert!(matches!(n, Ok(0) | Err(_)), "{what}: {n:?}");
    started.elapsed()
}

/// A preamble edited by `edit` and MACed with the session's own key over `conn`'s exporter:
/// what a device lying about its context could send.
fn bound(s: &Session, conn: &ProxyStream, edit: impl FnOnce(&mut Preamble)) -> Preamble {
    let exporter = Session::exporter(conn).unwrap();
    let mut p = s.preamble("echo", &exporter);
    edit(&mut p);
    let key = scm_proto::crypto::SessionKey::from_b64(&s.saved().session_key).unwrap();
    p.mac = scm_proto::crypto::binding_mac(
        &key,
        &scm_proto::crypto::BindingTranscript {
            exporter: &exporter,
            session_id: &p.session_id,
            app_id: &p.app_id,
            app_version: &p.app_version,
            device_id: &p.device_id,
            resource: &p.resource,
        },
    );
    p
}

/// Sends the session's id with a made-up MAC; returns the proxy's answer.
async fn forged(stack: &Stack, s: &Session) -> Status {
    let mut conn = s.connect(&stack.proxy_addr.to_string()).await.unwrap();
    let mut p = s.preamble("echo", &[0; 32]);
    p.mac = [0x55; 32];
    Session::exchange(&mut conn, &p.encode().unwrap())
        .await
        .unwrap()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_while_the_link_was_cut_is_applied_when_the_stream_is_back() {
    let mut stack = Stack::start(StackOptions {
        // Long enough that neither the cache nor the periodic revalidation would catch it.
        cache_ttl: "120s".into(),
        cuttable_link: true,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let bob = login(&stack, "bob", "bob-phone", "1.0.0").await;
    let mut tunnel = alice.open("echo").await.unwrap();
    echo_once(&mut tunnel, b"before the cut").await;
    let mut bystander = bob.open("echo").await.unwrap();
    echo_once(&mut bystander, b"bob before").await;

    let link = stack.link.clone().unwrap();
    link.cut();
    stack
        .wait_metric_below("scm_proxy_revocation_stream_up", 1.0)
        .await;
    // The logout reaches the Security server (device API, not cut) while no stream is open.
    alice.clone().logout().await.expect("logout in the gap");
    tokio::time::sleep(Duration::from_secs(3)).await;
    link.restore();
    let back = Instant::now();
    stack
        .wait_metric(
            "scm_proxy_revocation_stream_up",
            1.0,
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // The open tunnel of the logged-out session is cut, and a new one is refused, promptly.
    closed_within(&mut tunnel, Duration::from_secs(3), "the logged-out tunnel").await;
    let (status, reason) = refused(alice.open("echo").await);
    assert_eq!(status, Status::SessionInvalid, "{reason}");
    assert!(
        back.elapsed() < Duration::from_secs(8),
        "{:?}",
        back.elapsed()
    );
    // A session still live at the Security server keeps its tunnel and can open new ones.
    echo_once(&mut bystander, b"bob after").await;
    let mut again = bob.open("echo").await.unwrap();
    echo_once(&mut again, b"bob new tunnel").await;
    assert!(
        stack
            .proxy_log()
            .contains("cache emptied, open sessions revalidated"),
        "{}",
        stack.proxy_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_is_cut_at_the_absolute_expiry_with_no_security_server() {
    let mut stack = Stack::start(StackOptions {
        cache_ttl: "120s".into(),
        security_args: vec!["--session-max-lifetime".into(), "5s".into()],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let logged_in = Instant::now();
    let mut tunnel = alice.open("echo").await.unwrap();
    echo_once(&mut tunnel, b"live").await;
    // Nobody can tell the proxy the session ended: it must know by itself.
    stack.kill_security();
    tokio::time::sleep(Duration::from_secs(2)).await;
    echo_once(&mut tunnel, b"still before the expiry").await;
    closed_within(&mut tunnel, Duration::from_secs(6), "the expired tunnel").await;
    let at = logged_in.elapsed();
    // The expiry travels in whole seconds, so the cut may come up to a second early.
    assert!(
        at >= Duration::from_secs(3) && at < Duration::from_secs(7),
        "{at:?}"
    );
    // The close reaches the device before the proxy's log line is written: wait for the line.
    let logged = async {
        for _ in 0..50 {
            if stack
                .proxy_log()
                .contains("closed: the session reached its absolute expiry")
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(logged.await, "{}", stack.proxy_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_fail_closed_after_unanswered_revalidations() {
    let mut stack = Stack::start(StackOptions {
        cache_ttl: "1s".into(),
        proxy_args: vec!["--fail-closed-after".into(), "2".into()],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let mut tunnel = alice.open("echo").await.unwrap();
    echo_once(&mut tunnel, b"live").await;
    stack.kill_security();
    let took = closed_within(
        &mut tunnel,
        Duration::from_secs(10),
        "a tunnel nobody can revalidate",
    )
    .await;
    // Two revalidations about a TTL apart, each given up after the Security timeout at worst.
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(
        stack.proxy_log().contains("--fail-closed-after"),
        "{}",
        stack.proxy_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validations_with_a_wrong_mac_do_not_keep_a_session_alive() {
    let stack = Stack::start(StackOptions {
        cache_ttl: "1s".into(),
        security_args: vec!["--session-idle-timeout".into(), "3s".into()],
        // Many binding failures from 127.0.0.1 on purpose: no per-source block here.
        proxy_args: vec!["--block-after".into(), "0".into()],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let victim = login(&stack, "alice", "phone-1", "1.0.0").await;
    let honest = login(&stack, "alice", "phone-2", "1.0.0").await;
    // For over two idle timeouts the victim's session id is only ever presented with a wrong
    // MAC (each one a validation at the Security server), while the honest session is used.
    // Once the victim's session has expired the forged preambles get `session_invalid`.
    let started = Instant::now();
    let mut statuses = Vec::new();
    while started.elapsed() < Duration::from_secs(7) {
        let status = forged(&stack, &victim).await;
        statuses.push(status);
        assert_eq!(statuses[0], Status::BindingFailed);
        assert!(
            matches!(status, Status::BindingFailed | Status::SessionInvalid),
            "{statuses:?}"
        );
        let mut t = honest.open("echo").await.expect("the honest session");
        echo_once(&mut t, b"in use").await;
        drop(t);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // The victim's session reached its idle timeout; the honest one is alive.
    let (status, reason) = refused(victim.open("echo").await);
    assert_eq!(status, Status::SessionInvalid, "{reason}");
    let mut t = honest.open("echo").await.expect("the honest session");
    echo_once(&mut t, b"still alive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_version_must_be_the_one_logged_in_with() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let old = login(&stack, "alice", "phone-1", "1.0.0").await;
    let proxy = stack.proxy_addr.to_string();
    // 1.1.0 is published and allowed, but this session logged in as 1.0.0.
    let mut conn = old.connect(&proxy).await.unwrap();
    let p = bound(&old, &conn, |p| p.app_version = "1.1.0".into());
    let reply = Session::exchange(&mut conn, &p.encode().unwrap())
        .await
        .unwrap();
    assert_eq!(reply.status, Status::AppRefused, "{}", reply.reason);
    assert!(reply.reason.contains("logged in with"), "{}", reply.reason);
    // The login's own version is accepted.
    let mut ok = old.open("echo").await.unwrap();
    echo_once(&mut ok, b"1.0.0 as logged in").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_drops_spoofed_identity_and_forwarding_headers() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let stream = alice.open("web").await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/who")
        .header("host", "web")
        .header("x_scm_user", "root")
        .header("x_scm_groups", "admins")
        .header("x-scm-user", "root")
        .header("forwarded", "for=203.0.113.9;proto=https")
        .header("x-real-ip", "203.0.113.9")
        .header("x_real_ip", "203.0.113.9")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-host", "intranet.example")
        .header("x-forwarded-proto", "https")
        .header("x-keep-me", "yes")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("http request");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: Seen = serde_json::from_slice(&body).unwrap();
    let h = &seen.headers;
    for name in [
        "x_scm_user",
        "x_scm_groups",
        "forwarded",
        "x-real-ip",
        "x_real_ip",
        "x-forwarded-host",
        "x-forwarded-proto",
    ] {
        assert!(!h.contains_key(name), "{name} reached the back end: {h:?}");
    }
    assert_eq!(h["x-scm-user"], "alice");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h:?}");
    assert_eq!(h["x-keep-me"], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_one_source_are_rate_limited() {
    let stack = Stack::start(StackOptions {
        proxy_args: vec![
            "--block-after".into(),
            "3".into(),
            "--block-window".into(),
            "60s".into(),
            "--block-for".into(),
            "3s".into(),
        ],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let mut open = alice.open("echo").await.unwrap();
    echo_once(&mut open, b"before").await;
    for _ in 0..3 {
        assert_eq!(forged(&stack, &alice).await, Status::BindingFailed);
    }
    let misses = stack.metric("scm_proxy_cache_misses_total").await.unwrap();
    // The source is blocked: even a good preamble gets status 10, with no Security call.
    let (status, reason) = refused(alice.open("echo").await);
    assert_eq!(status, Status::RateLimited, "{reason}");
    assert!(reason.contains("try again"), "{reason}");
    assert_eq!(forged(&stack, &alice).await, Status::RateLimited);
    assert_eq!(
        stack.metric("scm_proxy_cache_misses_total").await.unwrap(),
        misses
    );
    assert!(
        stack
            .metric("scm_proxy_replies_total{status=\"rate_limited\"}")
            .await
            .unwrap()
            >= 2.0
    );
    // An established tunnel is not touched, and the block ends after --block-for.
    echo_once(&mut open, b"during the block").await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let mut again = alice.open("echo").await.expect("after the block");
    echo_once(&mut again, b"after the block").await;
}
