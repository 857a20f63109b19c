//! Forward-auth (nginx `auth_request`): off by default and absent from the device listener; on
//! its own listener it requires a client certificate from its CA at the TLS handshake, answers
//! identity headers for a live session and 401 otherwise, is rate-limited per source and overall
//! (429), and never counts as session activity. Then the documented nginx configuration
//! (docs/operations.md), run by a real nginx in front of a tiny back end.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser as _;
use reqwest::{Client, StatusCode};
use scm_security::api::forward_auth::PATH_FORWARD_AUTH;
use scm_security::config::Cli;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{Db, Device, Server, assert_error, send, serve_args, skip};

/// An HTTPS client trusting `certs/ca.pem`, with a client certificate from `identity`
/// (`(cert, key)` paths) and bound to a local source address.
fn client_from(ca: &Path, identity: Option<(&Path, &Path)>, source: Option<IpAddr>) -> Client {
    let tls = scm_security::tls::client_config(ca, identity).expect("client TLS config");
    // localhost is 127.0.0.1 only, so that a client bound to a 127.0.0.x source never tries ::1.
    let mut b = Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], 0)))
        .timeout(Duration::from_secs(30));
    if let Some(ip) = source {
        b = b.local_address(ip);
    }
    b.build().expect("client")
}

/// A client with the dev certificates' `proxy-client` identity (signed by the dev CA).
fn with_cert(srv: &Server, source: Option<IpAddr>) -> Client {
    let c = srv.certs();
    client_from(
        &c.join("ca.pem"),
        Some((&c.join("proxy-client.pem"), &c.join("proxy-client.key"))),
        source,
    )
}

fn fa_url(srv: &Server) -> String {
    let addr = srv
        .running
        .as_ref()
        .and_then(|r| r.forward_auth_addr)
        .expect("forward-auth listener on");
    format!("https://localhost:{}{PATH_FORWARD_AUTH}", addr.port())
}

async fn logged_in(srv: &Server, user: &str, groups: &[&str]) -> String {
    srv.add_user(user, &format!("{user}-pw"), groups).await;
    let dev = Device::enroll(srv, user, &format!("{user}-pw"), &format!("{user}-phone")).await;
    dev.login(srv).await.resp.session_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default_and_not_on_the_device_listener() {
    let srv = Server::start(Db::Sqlite, &[]).await;
    assert!(srv.running.as_ref().unwrap().forward_auth_addr.is_none());
    let sid = logged_in(&srv, "alice", &["staff"]).await;
    for path in ["/v1/auth/nginx", PATH_FORWARD_AUTH] {
        let got = send(
            srv.device
                .get(format!("{}{path}", srv.device_url))
                .bearer_auth(&sid),
        )
        .await;
        assert_error(&got, 404, "not_found");
    }
}

#[test]
fn flags_are_checked() {
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "scm-security",
            "serve",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--client-ca",
            "ca",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(parse(&[]).is_ok());
    let e = parse(&["--forward-auth-client-ca", "x.pem"]).unwrap_err();
    assert!(e.contains("--forward-auth-listen"), "{e}");
    for flag in ["--forward-auth-rate", "--forward-auth-rate-per-source"] {
        let e = parse(&["--forward-auth-listen", "127.0.0.1:0", flag, "0"]).unwrap_err();
        assert!(e.contains(flag), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_client_ca_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::support::certs(dir.path());
    let missing = dir.path().join("no-such-ca.pem");
    let args = serve_args(
        dir.path(),
        &certs,
        &Db::Sqlite,
        &[
            "--forward-auth-listen",
            "127.0.0.1:0",
            "--forward-auth-client-ca",
            missing.to_str().unwrap(),
        ],
    );
    let e = scm_security::server::start(&args).await.unwrap_err();
    assert!(e.to_string().contains("no-such-ca.pem"), "{e}");
}

/// One raw TLS exchange with the listener: the HTTP status line, or the error that ended it.
async fn raw_request(addr: SocketAddr, ca: &Path, identity: Option<(&Path, &Path)>) -> String {
    let cfg = scm_security::tls::client_config(ca, identity).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = match connector.connect(name, tcp).await {
        Ok(t) => t,
        Err(e) => return format!("handshake: {e}"),
    };
    let req =
        format!("GET {PATH_FORWARD_AUTH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if let Err(e) = tls.write_all(req.as_bytes()).await {
        return format!("write: {e}");
    }
    let mut out = Vec::new();
    match tls.read_to_end(&mut out).await {
        Err(e) => format!("read: {e}"),
        Ok(_) => String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_its_ca_is_required_at_tls() {
    // The reverse proxies' CA is a second dev CA, not the proxies' --client-ca.
    let dir = tempfile::tempdir().unwrap();
    crate::support::certs(dir.path());
    let other = dir.path().join("nginx-certs");
    scm_security::devcerts::generate(&other, &[], false).unwrap();
    let other_ca = other.join("ca.pem");
    let srv = Server::start_in(
        dir,
        Db::Sqlite,
        &[
            "--forward-auth-listen",
            "127.0.0.1:0",
            "--forward-auth-client-ca",
            other_ca.to_str().unwrap(),
        ],
    )
    .await;
    let addr = srv.running.as_ref().unwrap().forward_auth_addr.unwrap();
    let certs = srv.certs();
    let ca = certs.join("ca.pem");
    let other = srv.dir.path().join("nginx-certs");
    let nginx_id = (
        other.join("proxy-client.pem"),
        other.join("proxy-client.key"),
    );
    let proxy_id = (
        certs.join("proxy-client.pem"),
        certs.join("proxy-client.key"),
    );

    // No certificate: the server's alert ends the exchange before any HTTP.
    let none = raw_request(addr, &ca, None).await;
    assert!(none.contains("CertificateRequired"), "{none}");
    // A certificate from the proxies' CA is not one of the reverse proxies'.
    let wrong = raw_request(addr, &ca, Some((&proxy_id.0, &proxy_id.1))).await;
    assert!(!wrong.starts_with("HTTP/"), "{wrong}");
    assert!(
        wrong.contains("alert") || wrong.contains("Alert"),
        "{wrong}"
    );
    // The right one: HTTP, 401 without a token.
    let right = raw_request(addr, &ca, Some((&nginx_id.0, &nginx_id.1))).await;
    assert!(right.starts_with("HTTP/1.1 401"), "{right}");

    // And over reqwest: refused without a certificate, answered with one.
    let url = fa_url(&srv);
    assert!(srv.device.get(&url).send().await.is_err());
    let nginx = client_from(&ca, Some((&nginx_id.0, &nginx_id.1)), None);
    let sid = logged_in(&srv, "alice", &["staff"]).await;
    let resp = nginx.get(&url).bearer_auth(&sid).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-scm-user"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_for_a_live_session_401_otherwise() {
    let srv = Server::start(Db::Sqlite, &["--forward-auth-listen", "127.0.0.1:0"]).await;
    let sid = logged_in(&srv, "alice", &["staff", "dev"]).await;
    let c = with_cert(&srv, None);
    let url = fa_url(&srv);
    let resp = c.get(&url).bearer_auth(&sid).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(h["x-scm-user"], "alice");
    assert_eq!(h["x-scm-groups"], "staff,dev");
    assert_eq!(h["x-scm-site"], "main");
    assert_eq!(h["x-scm-device"], "alice-phone");
    assert_eq!(h["x-scm-app"], "mail/1.0");
    assert_eq!(
        h["x-scm-session-tag"],
        scm_proto::crypto::session_tag(&sid).0.as_str()
    );
    let body = resp.bytes().await.unwrap();
    assert!(body.is_empty());
    // nginx may forward the original method: any method is answered the same.
    let post = c.post(&url).bearer_auth(&sid).send().await.unwrap();
    assert_eq!(post.status(), StatusCode::OK);

    for bad in [
        c.get(&url),
        c.get(&url).bearer_auth("nope"),
        c.get(&url)
            .bearer_auth(scm_proto::crypto::SessionId::generate().expose()),
        c.get(&url).header("authorization", format!("Basic {sid}")),
    ] {
        assert_error(&send(bad).await, 401, "unknown_session");
    }
    // The listener serves forward-auth only, not the device API.
    let port = srv
        .running
        .as_ref()
        .unwrap()
        .forward_auth_addr
        .unwrap()
        .port();
    for path in ["/healthz", "/v1/challenge", "/v1/auth/nginx"] {
        let got = send(
            c.post(format!("https://localhost:{port}{path}"))
                .json(&json!({})),
        )
        .await;
        assert_error(&got, 404, "not_found");
    }
    // A logged-out session is unknown at once.
    let out = srv
        .device
        .post(format!("{}{}", srv.device_url, scm_proto::api::PATH_LOGOUT))
        .bearer_auth(&sid)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    assert_error(
        &send(c.get(&url).bearer_auth(&sid)).await,
        401,
        "unknown_session",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_per_source_and_overall() {
    // One request a second per source, two a second in all (bursts of as many).
    let srv = Server::start(
        Db::Sqlite,
        &[
            "--forward-auth-listen",
            "127.0.0.1:0",
            "--forward-auth-rate-per-source",
            "1",
            "--forward-auth-rate",
            "2",
        ],
    )
    .await;
    let sid = logged_in(&srv, "alice", &["staff"]).await;
    let url = fa_url(&srv);
    let src = |last: u8| with_cert(&srv, Some(IpAddr::from([127, 0, 0, last])));
    let (a, b, c) = (src(1), src(2), src(3));
    let started = Instant::now();
    let a1 = send(a.get(&url).bearer_auth(&sid)).await;
    let a2 = a.get(&url).bearer_auth(&sid).send().await.unwrap();
    let b1 = send(b.get(&url).bearer_auth(&sid)).await;
    let c1 = send(c.get(&url).bearer_auth(&sid)).await;
    let took = started.elapsed();
    // The overall bucket refills one token per 500 ms: the checks below hold when the four
    // requests took less than that (they take a few milliseconds).
    assert!(took < Duration::from_millis(500), "took {took:?}");
    assert_eq!(a1.0, StatusCode::OK, "{}", a1.1);
    // Source A used its one: refused, with a Retry-After, whatever the overall bucket holds.
    assert_eq!(a2.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a2.headers()["retry-after"], "1");
    let body: Value = a2.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // Source B has its own bucket.
    assert_eq!(b1.0, StatusCode::OK, "{}", b1.1);
    // Source C has a full bucket of its own, but the two of the overall one are spent.
    assert_error(&c1, 429, "rate_limited");
    // After a second everything has refilled.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(send(c.get(&url).bearer_auth(&sid)).await.0, StatusCode::OK);
    assert_eq!(send(a.get(&url).bearer_auth(&sid)).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_is_not_activity() {
    let srv = Server::start(
        Db::Sqlite,
        &[
            "--forward-auth-listen",
            "127.0.0.1:0",
            "--session-idle-timeout",
            "2s",
        ],
    )
    .await;
    let sid = logged_in(&srv, "alice", &["staff"]).await;
    let logged_in_at = Instant::now();
    let c = with_cert(&srv, None);
    let url = fa_url(&srv);
    let session = |srv: &Server| {
        srv.state()
            .sessions
            .list()
            .into_iter()
            .find(|s| s.user == "alice")
    };
    let before = session(&srv).expect("live").last_seen_ms();
    let mut first_refusal = None;
    while logged_in_at.elapsed() < Duration::from_secs(5) {
        // Sent at `sent`: the server answered after that, so an OK means the session was still
        // alive at `sent` or later (a loaded machine may answer much later than it was asked).
        let sent = logged_in_at.elapsed();
        let (status, body) = send(c.get(&url).bearer_auth(&sid)).await;
        let at = logged_in_at.elapsed();
        if status == StatusCode::OK {
            // Still alive, and the calls did not move its last activity.
            assert!(
                sent < Duration::from_millis(2300),
                "alive when asked at {sent:?}"
            );
            if let Some(s) = session(&srv) {
                assert_eq!(s.last_seen_ms(), before, "forward-auth counted as activity");
            }
        } else {
            assert_error(&(status, body), 401, "unknown_session");
            first_refusal = Some(at);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let at = first_refusal.expect("the session outlived its idle timeout through forward-auth");
    assert!(at >= Duration::from_millis(1900), "ended early, at {at:?}");
    // Gone everywhere: the proxies' view agrees.
    assert!(session(&srv).is_none());
    assert_error(&srv.validate(&sid).await, 404, "unknown_session");
}

// ---- The documented nginx configuration, run by a real nginx ----

/// The nginx block of docs/operations.md that follows the snippet marker.
fn documented_snippet() -> String {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let text = std::fs::read_to_string(&doc).expect("docs/operations.md");
    let marker = text
        .find("<!-- forward-auth-snippet")
        .expect("the snippet marker in docs/operations.md");
    let rest = &text[marker..];
    let start = rest
        .find("```nginx\n")
        .expect("an nginx block after the marker")
        + 9;
    let len = rest[start..]
        .find("```")
        .expect("the end of the nginx block");
    rest[start..start + len].to_owned()
}

/// Replaces an example value of the snippet by the test's, insisting that it is there.
fn put(text: String, example: &str, real: &str) -> String {
    assert!(
        text.contains(example),
        "docs/operations.md's nginx snippet no longer contains {example:?}: update this test"
    );
    text.replace(example, real)
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// nginx in the foreground, stopped when dropped.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // master_process off: this one process is all of nginx.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tiny back end: answers every request with the headers nginx passed, as JSON.
async fn back_end(hits: Arc<AtomicUsize>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let h = req.headers();
            let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
            axum::Json(json!({
                "method": req.method().as_str(),
                "path": req.uri().path(),
                "user": get("x-scm-user"),
                "groups": get("x-scm-groups"),
                "device": get("x-scm-device"),
                "app": get("x-scm-app"),
                "authorization": get("authorization"),
            }))
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_in_front_of_a_back_end() {
    let Some(nginx_bin) = nginx_binary() else {
        skip(
            "nginx",
            "no nginx binary (apt-get install nginx, or cargo xtask setup)",
        );
        return;
    };
    // nginx's client certificate comes from a CA of its own, as the docs advise.
    let dir = tempfile::tempdir().unwrap();
    crate::support::certs(dir.path());
    let nginx_certs = dir.path().join("nginx-certs");
    scm_security::devcerts::generate(&nginx_certs, &[], false).unwrap();
    let nginx_ca = nginx_certs.join("ca.pem");
    let srv = Server::start_in(
        dir,
        Db::Sqlite,
        &[
            "--forward-auth-listen",
            "127.0.0.1:0",
            "--forward-auth-client-ca",
            nginx_ca.to_str().unwrap(),
        ],
    )
    .await;
    let fa = srv.running.as_ref().unwrap().forward_auth_addr.unwrap();
    let certs = srv.certs();
    let hits = Arc::new(AtomicUsize::new(0));
    let be = back_end(hits.clone()).await;
    let front = crate::support::free_port();

    let ng = srv.dir.path().join("nginx");
    std::fs::create_dir_all(&ng).unwrap();
    let p = |path: PathBuf| path.display().to_string();
    let mut snippet = documented_snippet();
    for (example, real) in [
        ("10.0.0.5:8446", fa.to_string()),
        ("listen 443 ssl;", format!("listen 127.0.0.1:{front} ssl;")),
        ("intranet.example.com", "localhost".into()),
        ("/etc/nginx/tls/intranet.pem", p(certs.join("proxy.pem"))),
        ("/etc/nginx/tls/intranet.key", p(certs.join("proxy.key"))),
        (
            "/etc/nginx/scm/nginx-client.pem",
            p(nginx_certs.join("proxy-client.pem")),
        ),
        (
            "/etc/nginx/scm/nginx-client.key",
            p(nginx_certs.join("proxy-client.key")),
        ),
        ("/etc/nginx/scm/security-ca.pem", p(certs.join("ca.pem"))),
        ("security.example.com", "localhost".into()),
        ("10.0.0.7:8080", be.to_string()),
    ] {
        snippet = put(snippet, example, &real);
    }
    let d = ng.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n\
         \x20   proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n{snippet}}}\n"
    );
    std::fs::write(ng.join("nginx.conf"), &conf).unwrap();
    let child = Command::new(&nginx_bin)
        .arg("-e")
        .arg(ng.join("error.log"))
        .arg("-p")
        .arg(&ng)
        .arg("-c")
        .arg(ng.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nginx");
    let mut nginx = Nginx {
        child,
        dir: ng.clone(),
    };
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = nginx.child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = nginx.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!(
                "nginx exited ({status}): {err}\n{}\nconfig:\n{conf}",
                nginx.log()
            );
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", front))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "nginx not listening: {}",
            nginx.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let alice = logged_in(&srv, "alice", &["staff", "dev"]).await;
    let bob = logged_in(&srv, "bob", &[]).await;
    let web = crate::support::client(&certs, None);
    let url = format!("https://localhost:{front}/hello");
    let call = |req: reqwest::RequestBuilder| async {
        let r = req.send().await.expect("nginx answers");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        (status, text)
    };

    // A device's session id as bearer: the back end learns who it is, not the token, and no
    // forged identity header gets through.
    let (s, body) = call(
        web.post(&url)
            .bearer_auth(&alice)
            .header("x-scm-user", "mallory")
            .header("x-scm-groups", "admins"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}\n{}", nginx.log());
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/hello");
    assert_eq!(v["user"], "alice");
    assert_eq!(v["groups"], "staff,dev");
    assert_eq!(v["device"], "alice-phone");
    assert_eq!(v["app"], "mail/1.0");
    assert_eq!(v["authorization"], Value::Null);
    // A user without groups: nginx sends no x-scm-groups, and drops the client's.
    let (s, body) = call(
        web.get(&url)
            .bearer_auth(&bob)
            .header("x-scm-groups", "admins"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["user"], "bob");
    assert_eq!(v["groups"], Value::Null);
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // No token, an unknown one, a malformed one: 401 from nginx, the back end never reached.
    let unknown = scm_proto::crypto::SessionId::generate();
    for req in [
        web.get(&url),
        web.get(&url).bearer_auth(unknown.expose()),
        web.get(&url).bearer_auth("nope"),
        web.get(&url).header("x-scm-user", "alice"),
    ] {
        let (s, body) = call(req).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    drop(nginx);
}
