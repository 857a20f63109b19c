//! End-to-end tests: real `scm-security` and `scm-proxy` processes on 127.0.0.1, real TLS with
//! generated certificates, a real SQLite file, real back ends, and the device library.

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
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn stack() -> Stack {
    Stack::start(StackOptions::default())
        .await
        .expect("starting the stack")
}

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

async fn http_get(stream: ProxyStream, path: &str, headers: &[(&str, &str)]) -> (u16, Bytes) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", "web");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .expect("http request");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// Until `f` returns Some or the time is up.
async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_steps_end_to_end() {
    let stack = stack().await;
    // 1-2: TLS to the Security server, enroll, log in (proof of the shared key).
    let device = stack.enroll("alice", "phone-1", "1.0.0").await.unwrap();
    let session = Session::login(&device, PASSWORD).await.unwrap();
    assert_eq!(session.saved().login.user, "alice");
    assert_eq!(session.proxies(), [stack.proxy_addr.to_string()]);
    // 3-6: TLS to the proxy, preamble, validation, relay to the tcp back end.
    let mut tunnel = session.open("echo").await.unwrap();
    echo_once(&mut tunnel, b"hello through scm").await;
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    echo_once(&mut tunnel, &big).await;
    // Half-close: the device stops sending, still receives what the back end sends back.
    tunnel.write_all(b"last words").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"last words");

    // http mode: identity headers in, spoofed identity and session material out.
    let resp = session.get("http://web/hello?x=1").await.unwrap();
    assert_eq!(resp.status, 200);
    let seen: Seen = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(seen.path, "/hello?x=1");
    assert_eq!(seen.headers["x-scm-user"], "alice");
    assert!(
        seen.headers["x-scm-groups"]
            .split(',')
            .any(|g| g == "staff")
    );
    assert_eq!(seen.headers["x-scm-device"], "phone-1");
    let stream = session.open("web").await.unwrap();
    let (status, body) = http_get(
        stream,
        "/spoof",
        &[("x-scm-user", "root"), ("x-scm-groups", "admins")],
    )
    .await;
    assert_eq!(status, 200);
    let seen: Seen = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen.headers["x-scm-user"], "alice");
    assert!(!seen.headers["x-scm-groups"].contains("admins"));
    let everything = serde_json::to_string(&seen).unwrap();
    assert!(!everything.contains(session.id().expose()));

    // Updates: 1.1.0 is newer than 1.0.0; the download's sha256 is checked.
    let bearer = session.saved().login.session_id.clone();
    let check = device.update_check(Some(&bearer)).await.unwrap();
    assert!(check.update_available && check.current_allowed);
    let latest = check.latest.unwrap();
    assert_eq!(latest.version, "1.1.0");
    let out = stack.dir.path().join("fetched.pkg");
    device
        .update_fetch(&latest, &out, Some(&bearer))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"mail package 1.1.0, newer");
    let mut tampered = latest.clone();
    tampered.sha256 = "00".repeat(32);
    let e = device
        .update_fetch(&tampered, &stack.dir.path().join("bad.pkg"), Some(&bearer))
        .await
        .unwrap_err();
    assert!(matches!(e, DeviceError::Checksum { .. }), "{e}");

    // Logout: the proxy hears of it and refuses the session from then on.
    session.logout().await.unwrap();
    let r = eventually(Duration::from_secs(2), || async {
        match session.open("echo").await {
            Err(DeviceError::ProxyRefused { status, .. }) => Some(status),
            _ => None,
        }
    })
    .await;
    assert_eq!(r, Some(Status::SessionInvalid));

    // Session ids never reach the logs.
    assert!(!stack.proxy_log().contains(session.id().expose()));
    assert!(!stack.security_log().contains(session.id().expose()));
    assert!(stack.proxy_log().contains(&session.tag().0));
    let m = stack.metrics().await.unwrap();
    assert!(
        m.contains("scm_proxy_tls_path_info{path=\"userspace\"} 1"),
        "{m}"
    );
    assert!(stack.metric("scm_proxy_cache_hits_total").await.unwrap() >= 1.0);
    assert!(
        stack
            .metric("scm_proxy_bytes_total{direction=\"to_device\"}")
            .await
            .unwrap()
            >= 200_000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stolen_session_id_on_another_connection_is_refused() {
    let stack = stack().await;
    let session = login(&stack, "alice", "phone-1", "1.0.0").await;
    let proxy = stack.proxy_addr.to_string();

    // The victim's preamble, MAC and all, replayed on the attacker's own TLS connection.
    let victim = session.connect(&proxy).await.unwrap();
    let victim_frame = session
        .preamble("echo", &Session::exporter(&victim).unwrap())
        .encode()
        .unwrap();
    let mut attacker = session.connect(&proxy).await.unwrap();
    let reply = Session::exchange(&mut attacker, &victim_frame)
        .await
        .unwrap();
    assert_eq!(reply.status, Status::BindingFailed, "{}", reply.reason);
    // After the refusal the proxy closes the connection.
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(2), attacker.read(&mut buf))
        .await
        .expect("closed after the refusal");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // The session id alone, with a MAC the attacker made up.
    let mut attacker = session.connect(&proxy).await.unwrap();
    let mut forged: Preamble = session.preamble("echo", &[0; 32]);
    forged.mac = [0x55; 32];
    let reply = Session::exchange(&mut attacker, &forged.encode().unwrap())
        .await
        .unwrap();
    assert_eq!(reply.status, Status::BindingFailed);

    // The preamble changed in flight (another resource) fails too.
    let mut conn = session.connect(&proxy).await.unwrap();
    let mut p = session.preamble("echo", &Session::exporter(&conn).unwrap());
    p.resource = "web".into();
    let reply = Session::exchange(&mut conn, &p.encode().unwrap())
        .await
        .unwrap();
    assert_eq!(reply.status, Status::BindingFailed);

    // The rightful owner is unaffected.
    let mut ok = session.open("echo").await.unwrap();
    echo_once(&mut ok, b"still mine").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_session_is_cut_within_a_second() {
    let stack = stack().await;
    let session = login(&stack, "alice", "phone-1", "1.0.0").await;
    let other = login(&stack, "alice", "phone-2", "1.0.0").await;
    let mut tcp = session.open("echo").await.unwrap();
    echo_once(&mut tcp, b"before").await;
    let mut http = session.open("web").await.unwrap();
    let mut bystander = other.open("echo").await.unwrap();

    let tag = session.tag().0;
    stack.admin(&["sessions", "revoke", &tag]).unwrap();
    let revoked_at = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf))
        .await
        .expect("the tcp connection must be closed within a second");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let n = tokio::time::timeout(Duration::from_secs(1), http.read(&mut buf))
        .await
        .expect("the http connection must be closed within a second");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(revoked_at.elapsed() < Duration::from_secs(1));

    let (status, _) = refused(session.open("echo").await);
    assert_eq!(status, Status::SessionInvalid);
    // Another session of the same user is untouched.
    echo_once(&mut bystander, b"unaffected").await;
    assert!(stack.metric("scm_proxy_revocations_total").await.unwrap() >= 1.0);
    assert!(
        stack
            .metric("scm_proxy_revoked_connections_total")
            .await
            .unwrap()
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_below_minimum_or_revoked_version_is_refused() {
    let stack = stack().await;
    let old = login(&stack, "alice", "phone-old", "1.0.0").await;
    let new = login(&stack, "alice", "phone-new", "1.1.0").await;
    old.open("echo").await.unwrap();

    stack
        .admin(&["apps", "policy", "mail", "--min-version", "1.1.0"])
        .unwrap();
    let refusal = eventually(Duration::from_secs(3), || async {
        match old.open("echo").await {
            Err(DeviceError::ProxyRefused { status, reason }) => Some((status, reason)),
            _ => None,
        }
    })
    .await
    .expect("the old app must be refused once the minimum is raised");
    assert_eq!(refusal.0, Status::AppRefused);
    assert!(refusal.1.contains("minimum"), "{}", refusal.1);
    let mut ok = new.open("echo").await.unwrap();
    echo_once(&mut ok, b"new app").await;

    // A revoked version is refused.
    stack
        .admin(&["apps", "policy", "mail", "--revoke", "1.1.0"])
        .unwrap();
    let refusal = eventually(Duration::from_secs(3), || async {
        match new.open("echo").await {
            Err(DeviceError::ProxyRefused { status, reason }) => Some((status, reason)),
            _ => None,
        }
    })
    .await
    .expect("a revoked version must be refused");
    assert_eq!(refusal.0, Status::AppRefused);
    assert!(refusal.1.contains("revoked"), "{}", refusal.1);

    // Another app id or device id than the session's is refused even with a valid MAC.
    stack
        .admin(&["apps", "policy", "mail", "--unrevoke", "1.1.0"])
        .unwrap();
    let proxy = stack.proxy_addr.to_string();
    for edit in [
        (|p: &mut Preamble| p.device_id = "phone-old".into()) as fn(&mut Preamble),
        |p: &mut Preamble| p.app_id = "chat".into(),
    ] {
        let mut conn = new.connect(&proxy).await.unwrap();
        let p = bound(&new, &conn, edit);
        let reply = Session::exchange(&mut conn, &p.encode().unwrap())
            .await
            .unwrap();
        assert_eq!(reply.status, Status::AppRefused, "{}", reply.reason);
    }
}

/// A preamble edited by `edit` and MACed with the session's own key over `conn`'s exporter: what
/// a device lying about its context could send.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_not_in_the_resource_group_is_refused() {
    let stack = stack().await;
    let bob = login(&stack, "bob", "bob-phone", "1.0.0").await;
    let alice = login(&stack, "alice", "alice-phone", "1.0.0").await;
    let (status, reason) = refused(bob.open("web").await);
    assert_eq!(status, Status::Forbidden);
    assert!(reason.contains("bob"), "{reason}");
    let mut ok = bob.open("echo").await.unwrap();
    echo_once(&mut ok, b"contractors may echo").await;
    assert_eq!(refused(alice.open("secret").await).0, Status::Forbidden);
    assert_eq!(
        refused(alice.open("no-such-thing").await).0,
        Status::UnknownResource
    );
    // The group rule follows catalog changes.
    stack
        .admin(&[
            "resources",
            "set",
            "web",
            "--address",
            &stack.http.to_string(),
            "--mode",
            "http",
            "--groups",
            "staff,contractors",
        ])
        .unwrap();
    let ok = eventually(Duration::from_secs(3), || async {
        bob.open("web").await.ok()
    })
    .await;
    assert!(ok.is_some(), "bob must get in once his group is allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_a_clear_error() {
    let stack = stack().await;
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let (status, reason) = refused(alice.open("dead").await);
    assert_eq!(status, Status::BackendUnavailable);
    assert!(
        reason.contains("dead") && reason.contains(&stack.dead.to_string()),
        "{reason}"
    );
    // http mode: a 502 that says which back end failed.
    stack
        .admin(&[
            "resources",
            "set",
            "deadweb",
            "--address",
            &stack.dead.to_string(),
            "--mode",
            "http",
            "--groups",
            "staff",
        ])
        .unwrap();
    let resp = eventually(Duration::from_secs(3), || async {
        alice.get("http://deadweb/").await.ok()
    })
    .await
    .expect("the proxy accepts the http resource");
    assert_eq!(resp.status, 502);
    let body = String::from_utf8_lossy(&resp.body);
    assert!(
        body.contains("backend_unavailable") && body.contains("deadweb"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_preambles_are_refused_without_harming_others() {
    let stack = stack().await;
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let proxy = stack.proxy_addr.to_string();
    let mut good = alice.open("echo").await.unwrap();
    echo_once(&mut good, b"before").await;

    let mut tasks = Vec::new();
    // Malformed: wrong version, then a field with a space, then a bad session id.
    for frame in [
        vec![9u8, 0, 4, 1, 2, 3, 4],
        {
            let mut p = alice.preamble("echo", &[0; 32]).encode().unwrap();
            p[4] = b' ';
            p
        },
        {
            let mut p = alice.preamble("echo", &[0; 32]);
            p.session_id = "not-a-session".into();
            p.encode().unwrap()
        },
    ] {
        let (a, proxy) = (alice.clone(), proxy.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = a.connect(&proxy).await.unwrap();
            let r = Session::exchange(&mut c, &frame).await.unwrap();
            ("malformed", r.status)
        }));
    }
    // Oversized: the header announces 60000 bytes; refused before they are read.
    let (a, p) = (alice.clone(), proxy.clone());
    tasks.push(tokio::spawn(async move {
        let mut c = a.connect(&p).await.unwrap();
        let r = Session::exchange(&mut c, &[1, 0xea, 0x60]).await.unwrap();
        ("oversized", r.status)
    }));
    // Truncated: half a preamble, then the device closes its sending side.
    let (a, p) = (alice.clone(), proxy.clone());
    tasks.push(tokio::spawn(async move {
        let mut c = a.connect(&p).await.unwrap();
        let frame = a.preamble("echo", &[0; 32]).encode().unwrap();
        c.write_all(&frame[..frame.len() / 2]).await.unwrap();
        c.shutdown().await.unwrap();
        let r = scm_device::session::read_reply(&mut c).await;
        (
            "truncated",
            r.map(|r| r.status).unwrap_or(Status::BadPreamble),
        )
    }));
    // Slow: a few bytes, then nothing; the proxy gives up after --preamble-timeout (2 s).
    let (a, p) = (alice.clone(), proxy.clone());
    tasks.push(tokio::spawn(async move {
        let mut c = a.connect(&p).await.unwrap();
        let frame = a.preamble("echo", &[0; 32]).encode().unwrap();
        c.write_all(&frame[..5]).await.unwrap();
        c.flush().await.unwrap();
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            scm_device::session::read_reply(&mut c),
        )
        .await
        .expect("the proxy must give up on a slow preamble")
        .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(1500));
        ("slow", r.status)
    }));
    // Meanwhile the established tunnel keeps working.
    for i in 0..20 {
        echo_once(&mut good, format!("during {i}").as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        let (what, status) = t.await.unwrap();
        let expected = if what == "malformed" && status == Status::SessionInvalid {
            Status::SessionInvalid
        } else {
            Status::BadPreamble
        };
        assert_eq!(status, expected, "{what}");
    }
    echo_once(&mut good, b"after").await;
    let mut fresh = alice.open("echo").await.unwrap();
    echo_once(&mut fresh, b"new connections too").await;
    let m = stack.metrics().await.unwrap();
    for class in [
        "preamble_malformed",
        "preamble_oversized",
        "preamble_timeout",
        "preamble_truncated",
    ] {
        assert!(m.contains(&format!("class=\"{class}\"")), "{class} in {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_keeps_serving_cached_sessions_while_security_restarts() {
    let mut stack = Stack::start(StackOptions {
        cache_ttl: "120s".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let never_used = login(&stack, "alice", "phone-2", "1.0.0").await;
    let mut tunnel = alice.open("echo").await.unwrap();
    echo_once(&mut tunnel, b"before the crash").await;

    stack.kill_security();
    stack
        .wait_metric_below("scm_proxy_revocation_stream_up", 1.0)
        .await;
    echo_once(&mut tunnel, b"open tunnels keep going").await;
    let mut again = alice.open("echo").await.expect("cached session served");
    echo_once(&mut again, b"new connection from the cache").await;
    // A session the proxy never saw cannot be validated while no Security server answers.
    assert_eq!(
        refused(never_used.open("echo").await).0,
        Status::SecurityUnavailable
    );

    stack.start_security().await.unwrap();
    stack
        .wait_metric(
            "scm_proxy_revocation_stream_up",
            1.0,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(stack.metric("scm_proxy_cache_hits_total").await.unwrap() >= 1.0);
    // Once the stream is back the proxy cannot know what it missed, so it forgets its cache and
    // revalidates open sessions: the restarted server has forgotten this one (sessions live in
    // its memory), so its tunnel is closed and the id is refused from now on.
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
        .await
        .expect("the tunnel of a session the restarted server forgot is closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(refused(alice.open("echo").await).0, Status::SessionInvalid);
    // Devices log in again on the restarted server; nobody re-enrolls.
    let d = alice.device().clone();
    let relogged = Session::login(&d, PASSWORD).await.unwrap();
    let mut s = relogged.open("echo").await.unwrap();
    echo_once(&mut s, b"new session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_fails_over_to_the_next_security_url() {
    let dead = scm_e2e::stack::free_port();
    let stack = Stack::start(StackOptions {
        security_urls_before: vec![format!("https://127.0.0.1:{dead}")],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let mut s = alice.open("echo").await.unwrap();
    echo_once(&mut s, b"via the second Security server").await;
    assert!(
        stack
            .metric("scm_proxy_security_failovers_total")
            .await
            .unwrap()
            >= 1.0
    );
}

/// Runs the device CLI with the stack's state file; returns stdout, failing on a non-zero exit.
fn cli(stack: &Stack, args: &[&str]) -> String {
    let out = std::process::Command::new(&scm_e2e::stack::binaries().device)
        .arg("--state")
        .arg(stack.dir.path().join("alice.json"))
        .args(args)
        .env("SCM_DEVICE_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scm-device {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_cli_runs_the_whole_workflow() {
    let stack = stack().await;
    let url = format!("https://{}", stack.device_api);
    let ca = stack.certs.join("ca.pem");
    let out = cli(
        &stack,
        &[
            "enroll",
            "--security-url",
            &url,
            "--ca",
            ca.to_str().unwrap(),
            "--user",
            "alice",
            "--device-id",
            "cli-phone",
            "--app-id",
            "mail",
            "--app-version",
            "1.0.0",
        ],
    );
    assert!(out.contains("enrolled alice"), "{out}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(stack.dir.path().join("alice.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let out = cli(&stack, &["login"]);
    assert!(out.contains("logged in as alice"), "{out}");

    let out = cli(&stack, &["get", "http://web/from-cli"]);
    let seen: Seen = serde_json::from_str(&out).unwrap();
    assert_eq!(seen.path, "/from-cli");
    assert_eq!(seen.headers["x-scm-user"], "alice");

    let port = scm_e2e::stack::free_port();
    let forward = format!("127.0.0.1:{port}:echo");
    let mut tunnel = std::process::Command::new(&scm_e2e::stack::binaries().device)
        .arg("--state")
        .arg(stack.dir.path().join("alice.json"))
        .args(["tunnel", "-L", &forward])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut local = eventually(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await
    .expect("the tunnel listens");
    local.write_all(b"ssh -L style").await.unwrap();
    let mut got = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), local.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ssh -L style");
    let _ = tunnel.kill();
    let _ = tunnel.wait();

    let out = cli(&stack, &["update", "check"]);
    assert!(out.contains("\"update_available\": true"), "{out}");
    let pkg = stack.dir.path().join("update.pkg");
    let out = cli(&stack, &["update", "fetch", "--out", pkg.to_str().unwrap()]);
    assert!(out.contains("verified"), "{out}");
    assert_eq!(std::fs::read(&pkg).unwrap(), b"mail package 1.1.0, newer");

    let out = cli(&stack, &["logout"]);
    assert!(out.contains("logged out"), "{out}");
    let out = cli(&stack, &["status"]);
    assert!(out.contains("not logged in"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_are_revalidated_every_ttl() {
    let mut stack = Stack::start(StackOptions {
        cache_ttl: "1s".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let mut tunnel = alice.open("echo").await.unwrap();
    // Several TTLs pass: the proxy validates the session again and keeps the tunnel.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    echo_once(&mut tunnel, b"still valid").await;
    assert!(
        stack
            .metric("scm_proxy_validations_total{result=\"valid\"}")
            .await
            .unwrap()
            >= 2.0
    );
    // A restarted Security server has forgotten the session (sessions live in its memory): the
    // next revalidation finds it gone and closes the tunnel, with no revocation event needed.
    stack.kill_security();
    stack.start_security().await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
        .await
        .expect("the tunnel of a forgotten session must be closed within a few TTLs");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(refused(alice.open("echo").await).0, Status::SessionInvalid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_are_closed() {
    let stack = Stack::start(StackOptions {
        idle_timeout: "1s".into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    let mut busy = alice.open("echo").await.unwrap();
    let mut idle = alice.open("echo").await.unwrap();
    let started = Instant::now();
    // Traffic every 300 ms keeps one tunnel open past the idle timeout.
    while started.elapsed() < Duration::from_millis(2500) {
        echo_once(&mut busy, b"tick").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut buf))
        .await
        .expect("the idle tunnel is closed by now");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    echo_once(&mut busy, b"busy one still open").await;
}

/// A back end that trusts nothing but the signed identity: it verifies `x-scm-assertion` with
/// `jsonwebtoken` against the JWK Set it fetches from the Security server, with its own resource
/// name as the audience, and answers the claims (200) or why it refused (401).
async fn verifying_backend(stack: &Stack, audience: &'static str) -> std::net::SocketAddr {
    use hyper::body::Incoming;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(trusting_ca(stack))
        .build()
        .unwrap();
    let jwks_url = format!(
        "https://localhost:{}{}",
        stack.device_api.port(),
        scm_proto::api::PATH_JWKS
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (client, jwks_url) = (client.clone(), jwks_url.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let (client, jwks_url) = (client.clone(), jwks_url.clone());
                    async move {
                        let token = req
                            .headers()
                            .get(scm_proto::api::HEADER_ASSERTION)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let (status, body) = match token {
                            None => (401, "no assertion".to_owned()),
                            Some(t) => {
                                let set = client.get(&jwks_url).send().await.unwrap();
                                let set: jsonwebtoken::jwk::JwkSet = set.json().await.unwrap();
                                match verify_assertion(&t, &set, audience) {
                                    Ok(claims) => (200, claims.to_string()),
                                    Err(e) => (401, format!("refused: {e:?}")),
                                }
                            }
                        };
                        let mut resp =
                            hyper::Response::new(http_body_util::Full::new(Bytes::from(body)));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A back end's check: the key the token names, ES256 only, this resource as the audience, the
/// Security server as the issuer, no leeway on the expiry.
fn verify_assertion(
    token: &str,
    set: &jsonwebtoken::jwk::JwkSet,
    audience: &str,
) -> Result<serde_json::Value, jsonwebtoken::errors::ErrorKind> {
    use jsonwebtoken::errors::ErrorKind;
    let kid = jsonwebtoken::decode_header(token)
        .map_err(|e| e.into_kind())?
        .kid
        .ok_or(ErrorKind::InvalidToken)?;
    let jwk = set.find(&kid).ok_or(ErrorKind::InvalidKeyFormat)?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.into_kind())?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.leeway = 0;
    v.set_audience(&[audience]);
    v.set_issuer(&["scm-security"]);
    v.set_required_spec_claims(&["exp", "iat", "aud", "iss", "sub"]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.into_kind())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_back_ends_verify_the_signed_identity() {
    let stack = stack().await;
    let wiki = verifying_backend(&stack, "wiki").await;
    stack
        .admin(&[
            "resources",
            "set",
            "wiki",
            "--address",
            &wiki.to_string(),
            "--mode",
            "http",
            "--groups",
            "staff",
        ])
        .unwrap();
    let alice = login(&stack, "alice", "phone-1", "1.0.0").await;
    // The catalog change reaches the proxy on the revocation stream.
    let resp = eventually(Duration::from_secs(5), || async {
        alice.get("http://wiki/who").await.ok()
    })
    .await
    .expect("the proxy serves the new resource");
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    assert_eq!(
        resp.status, 200,
        "the back end verified the assertion: {body}"
    );
    let claims: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], "wiki");
    assert_eq!(claims["groups"], serde_json::json!(["staff"]));
    assert_eq!(claims["device"], "phone-1");
    assert_eq!(claims["app"], "mail");
    assert_eq!(claims["app_version"], "1.0.0");
    assert_eq!(claims["site"], "main");

    // On the describing back end: the assertion is there beside the bare headers, for its own
    // resource, and reused across the session's requests until shortly before it expires.
    let seen = |body: &[u8]| -> Seen { serde_json::from_slice(body).unwrap() };
    let first = seen(&alice.get("http://web/a").await.unwrap().body);
    let second = seen(&alice.get("http://web/b").await.unwrap().body);
    let web_token = first.headers[scm_proto::api::HEADER_ASSERTION].clone();
    assert_eq!(second.headers[scm_proto::api::HEADER_ASSERTION], web_token);
    assert!(!web_token.contains(alice.id().expose()));
    let set: jsonwebtoken::jwk::JwkSet = reqwest_jwks(&stack).await;
    assert_eq!(
        verify_assertion(&web_token, &set, "web").unwrap()["sub"],
        "alice"
    );
    // A back end of another resource refuses it.
    assert_eq!(
        verify_assertion(&web_token, &set, "wiki").unwrap_err(),
        jsonwebtoken::errors::ErrorKind::InvalidAudience
    );

    // A device cannot bring its own: a forged header, or a real token of another resource (the
    // `web` one replayed to `wiki`), is stripped and replaced by the proxy's.
    let stream = alice.open("web").await.unwrap();
    let (status, body) = http_get(
        stream,
        "/forged",
        &[
            (
                "x-scm-assertion",
                "eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290In0.",
            ),
            ("authorization", "Bearer the-device-s-own"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let forged: Seen = serde_json::from_slice(&body).unwrap();
    assert_eq!(forged.headers[scm_proto::api::HEADER_ASSERTION], web_token);
    // `Authorization` is the device's to use with its back end: left untouched.
    assert_eq!(forged.headers["authorization"], "Bearer the-device-s-own");
    let stream = alice.open("wiki").await.unwrap();
    let (status, body) = http_get(stream, "/replayed", &[("X-Scm-Assertion", &web_token)]).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "{body}");
    let claims: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        claims["aud"], "wiki",
        "the proxy's own assertion reached the back end"
    );

    // The documented Python back end (PyJWT) accepts the same token.
    python_snippet_verifies(&stack, &web_token, "web");
}

/// A client TLS config (the workspace's TLS profile) trusting only the stack's CA: reqwest is
/// built without a crypto provider of its own.
fn trusting_ca(stack: &Stack) -> rustls::ClientConfig {
    let roots = scm_proto::tls::load_roots(&stack.certs.join("ca.pem")).unwrap();
    scm_proto::tls::client_builder()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

async fn reqwest_jwks(stack: &Stack) -> jsonwebtoken::jwk::JwkSet {
    reqwest::Client::builder()
        .use_preconfigured_tls(trusting_ca(stack))
        .build()
        .unwrap()
        .get(format!(
            "https://localhost:{}{}",
            stack.device_api.port(),
            scm_proto::api::PATH_JWKS
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runs the Python snippet of docs/proxy-and-device.md, as printed there, on `token`: it must
/// return the claims for `audience` and refuse the token for any other audience.
fn python_snippet_verifies(stack: &Stack, token: &str, audience: &str) {
    let doc =
        std::fs::read_to_string(scm_e2e::stack::workspace_root().join("docs/proxy-and-device.md"))
            .unwrap();
    let start = doc
        .find("<!-- verify-assertion.py -->")
        .expect("the snippet's marker in docs/proxy-and-device.md");
    let code = &doc[start..];
    let code = &code[code.find("```python\n").expect("a python block") + 10..];
    let snippet = &code[..code.find("```").expect("the block's end")];
    let python = ["/usr/bin/python3", "python3"].into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import jwt, cryptography"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(python) = python else {
        let why =
            "no python3 with PyJWT and cryptography (Debian: python3-jwt python3-cryptography)";
        scm_netns::skip::skip("the documented PyJWT snippet", "python3 with PyJWT", why);
        return;
    };
    let run = |aud: &str| {
        let script = format!(
            "{snippet}\nimport sys\nJWKS_URL, CA_FILE, RESOURCE = sys.argv[1:4]\n\
             print(json.dumps(caller({{'x-scm-assertion': sys.argv[4]}})))\n"
        );
        std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(format!(
                "https://localhost:{}{}",
                stack.device_api.port(),
                scm_proto::api::PATH_JWKS
            ))
            .arg(stack.certs.join("ca.pem"))
            .arg(aud)
            .arg(token)
            .output()
            .unwrap()
    };
    let ok = run(audience);
    assert!(
        ok.status.success(),
        "the snippet refused a good token: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let claims: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], audience);
    let wrong = run("payroll");
    assert!(
        !wrong.status.success(),
        "the snippet took another resource's token"
    );
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("InvalidAudienceError"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}
