//! The processes' life, on the real binaries: SIGHUP reloads certificates under traffic (no
//! request fails, the new certificate is served after, a bad one is refused and the old one
//! stays) on `scm-security` and `scm-proxy`; SIGTERM drains (an open tunnel or a request in
//! flight finishes, new connects are refused, the process exits 0, and what outlives
//! `--drain-timeout` is cut); an accept loop flooded past its descriptor limit backs off, counts
//! it, and serves again after the flood.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use scm_device::Session;
use scm_e2e::stack::{PASSWORD, binaries, free_port};
use scm_e2e::{Stack, StackOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn stack(opts: StackOptions) -> Stack {
    Stack::start(opts).await.expect("starting the stack")
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process of this test, which is alive (it is reaped only by
    // `Proc`'s wait, after this).
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// A new leaf certificate for 127.0.0.1 and localhost signed by the stack's development CA
/// (`certs/ca.pem`, `certs/ca.key`), written over `<name>.pem` and `<name>.key`; returns its
/// DER, to compare with what a server presents.
fn new_leaf(certs: &Path, name: &str, cn: &str) -> CertificateDer<'static> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SerialNumber,
    };
    // The issuer as `scm-security dev-certs` made it: same name, same key.
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "scm development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_params(&ca, ca_key);
    let mut p =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(SerialNumber::from(0x5c_a1_ab_1e_u64));
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    // Written to temporary names and renamed, as an operator's tooling would: a reload never
    // sees half a file.
    let (pem, keyf) = (
        certs.join(format!("{name}.pem")),
        certs.join(format!("{name}.key")),
    );
    std::fs::write(certs.join("new.pem"), cert.pem()).unwrap();
    std::fs::write(certs.join("new.key"), key.serialize_pem()).unwrap();
    std::fs::rename(certs.join("new.pem"), pem).unwrap();
    std::fs::rename(certs.join("new.key"), keyf).unwrap();
    cert.der().clone()
}

fn der_of(path: &Path) -> CertificateDer<'static> {
    scm_proto::tls::load_certs(path).unwrap().remove(0)
}

/// A TLS client of the Security server's device API trusting the stack's CA.
fn device_api_client(certs: &Path) -> tokio_rustls::TlsConnector {
    let roots = scm_proto::tls::load_roots(&certs.join("ca.pem")).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(scm_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// One request on a new connection: `GET /healthz`; the certificate the server presented.
async fn healthz(
    tls: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> Result<CertificateDer<'static>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let cert = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    if text.starts_with("HTTP/1.1 200") && text.ends_with("ok\n") {
        Ok(cert)
    } else {
        Err(format!("answer: {text:?}"))
    }
}

/// A client trusting the stack's CA that never resumes a session: every handshake is full, so
/// it sees the certificate the server presents now.
fn full_handshake_client(certs: &Path) -> tokio_rustls::TlsConnector {
    let roots = scm_proto::tls::load_roots(&certs.join("ca.pem")).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(scm_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// The certificate a full handshake with `addr` gets (`tls` from [`full_handshake_client`]).
async fn presented(
    tls: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let s = tls.connect(name, tcp).await.unwrap();
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A client loop: what it saw, while it runs.
#[derive(Default)]
struct Traffic {
    ok: AtomicU64,
    failed: Mutex<Vec<String>>,
    last_cert: Mutex<Option<CertificateDer<'static>>>,
    stop: AtomicBool,
}

impl Traffic {
    fn record(&self, r: Result<CertificateDer<'static>, String>) {
        match r {
            Ok(c) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                *self.last_cert.lock().unwrap() = Some(c);
            }
            Err(e) => self.failed.lock().unwrap().push(e),
        }
    }

    fn last(&self) -> Option<CertificateDer<'static>> {
        self.last_cert.lock().unwrap().clone()
    }

    async fn wait_cert(&self, want: &CertificateDer<'static>, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.last().as_ref() != Some(want) {
            assert!(Instant::now() < deadline, "{what}: not served within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` more requests have succeeded.
    async fn more(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "the traffic stalled; failures: {:?}",
                self.failed.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn wait_log(what: &str, log: impl Fn() -> String, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{what}: no {needle:?} in the log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_sighup_reloads_the_certificate_under_traffic() {
    let mut stack = stack(StackOptions::default()).await;
    let certs = stack.certs.clone();
    let old = der_of(&certs.join("security.pem"));
    let traffic = Arc::new(Traffic::default());
    let (t, addr, tls) = (traffic.clone(), stack.device_api, device_api_client(&certs));
    let client = tokio::spawn(async move {
        while !t.stop.load(Ordering::Relaxed) {
            t.record(healthz(&tls, addr).await);
        }
    });
    // A connection opened before the reload must live through it: the proxy's revocation
    // stream (mutual TLS to the proxies' API).
    traffic.wait_cert(&old, "the first certificate").await;
    let pid = stack.security_proc().unwrap().pid();

    let new = new_leaf(&certs, "security", "scm security server, renewed");
    signal(pid, libc::SIGHUP);
    traffic.wait_cert(&new, "the new certificate").await;
    traffic.more(20).await;
    assert!(
        stack
            .security_log()
            .contains("reloaded: new handshakes get the new files"),
        "{}",
        stack.security_log()
    );

    // A key that is not the certificate's: refused, the file named, the new pair kept.
    let stray = rcgen::KeyPair::generate().unwrap();
    std::fs::write(certs.join("security.key"), stray.serialize_pem()).unwrap();
    signal(pid, libc::SIGHUP);
    wait_log("a bad key", || stack.security_log(), "reload refused").await;
    let log = stack.security_log();
    assert!(log.contains("does not hold the key"), "{log}");
    assert!(log.contains("security.key"), "{log}");
    traffic.more(20).await;
    assert_eq!(
        traffic.last().as_ref(),
        Some(&new),
        "the good pair is still served"
    );

    traffic.stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let failed = traffic.failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "requests failed across the reloads: {failed:?}"
    );
    assert!(traffic.ok.load(Ordering::Relaxed) >= 40);
    // The proxy's revocation stream, a connection older than both reloads, is still up.
    assert_eq!(
        stack
            .metric("scm_proxy_revocation_stream_up")
            .await
            .unwrap(),
        1.0
    );
    assert!(
        stack
            .security_proc()
            .unwrap()
            .wait_exit(Duration::ZERO)
            .is_none()
    );
}

async fn login(stack: &Stack) -> Session {
    let d = stack
        .enroll("alice", "phone-1", "1.0.0")
        .await
        .expect("enroll");
    Session::login(&d, PASSWORD).await.expect("login")
}

/// One echo round trip through a tunnel; the certificate the proxy presented.
async fn tunnel_echo(session: &Session, proxy: &str) -> Result<CertificateDer<'static>, String> {
    let mut t = session
        .open_via(proxy, "echo")
        .await
        .map_err(|e| format!("open: {e}"))?;
    let cert = t.get_ref().1.peer_certificates().unwrap()[0].clone();
    echo(&mut t, b"ping").await?;
    Ok(cert)
}

async fn echo(t: &mut scm_device::ProxyStream, msg: &[u8]) -> Result<(), String> {
    t.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    t.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 5 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    if back == msg {
        Ok(())
    } else {
        Err(format!("echo {back:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sighup_reloads_the_certificate_under_traffic() {
    let mut stack = stack(StackOptions::default()).await;
    let certs = stack.certs.clone();
    let old = der_of(&certs.join("proxy.pem"));
    let session = Arc::new(login(&stack).await);
    let proxy = stack.proxy_addr.to_string();
    // A tunnel opened before the reloads, used after them.
    let mut held = session.open_via(&proxy, "echo").await.expect("a tunnel");
    echo(&mut held, b"before").await.unwrap();

    let traffic = Arc::new(Traffic::default());
    let (t, s, p) = (traffic.clone(), session.clone(), proxy.clone());
    let client = tokio::spawn(async move {
        while !t.stop.load(Ordering::Relaxed) {
            t.record(tunnel_echo(&s, &p).await);
        }
    });
    traffic.more(10).await;
    // The device resumes its TLS sessions (tickets), and a resumed session shows the
    // certificate of the handshake it resumes: a client without resumption checks what a new
    // handshake gets.
    let fresh = full_handshake_client(&certs);
    assert_eq!(presented(&fresh, stack.proxy_addr).await, old);
    let pid = stack.proxy_proc().unwrap().pid();

    let new = new_leaf(&certs, "proxy", "scm proxy, renewed");
    signal(pid, libc::SIGHUP);
    wait_log(
        "the reload",
        || stack.proxy_log(),
        "reloaded: new handshakes get the new certificate",
    )
    .await;
    assert_eq!(presented(&fresh, stack.proxy_addr).await, new);
    traffic.more(10).await;

    // An unparsable certificate: refused, the file named, the good pair kept.
    std::fs::write(
        certs.join("proxy.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    signal(pid, libc::SIGHUP);
    wait_log("a bad certificate", || stack.proxy_log(), "reload refused").await;
    assert!(
        stack.proxy_log().contains("proxy.pem"),
        "{}",
        stack.proxy_log()
    );
    traffic.more(10).await;
    assert_eq!(
        presented(&fresh, stack.proxy_addr).await,
        new,
        "the good pair is still served"
    );

    traffic.stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let failed = traffic.failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "tunnels failed across the reloads: {failed:?}"
    );
    echo(&mut held, b"after the reloads")
        .await
        .expect("the tunnel opened before the reloads still relays");
    assert!(
        stack
            .proxy_proc()
            .unwrap()
            .wait_exit(Duration::ZERO)
            .is_none()
    );
}

/// Connects until the port refuses (the listener closed); panics after `within`.
async fn wait_refused(addr: std::net::SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sigterm_lets_an_open_tunnel_finish_and_cuts_it_at_the_drain_timeout() {
    let mut stack = stack(StackOptions {
        proxy_args: vec!["--drain-timeout".into(), "3s".into()],
        ..StackOptions::default()
    })
    .await;
    let session = login(&stack).await;
    let proxy = stack.proxy_addr.to_string();

    // An open tunnel finishes its work after SIGTERM; new connects are refused meanwhile.
    let mut t = session.open_via(&proxy, "echo").await.unwrap();
    echo(&mut t, b"before").await.unwrap();
    let pid = stack.proxy_proc().unwrap().pid();
    signal(pid, libc::SIGTERM);
    wait_refused(stack.proxy_addr, Duration::from_secs(2)).await;
    echo(&mut t, b"while draining")
        .await
        .expect("the open tunnel still relays");
    t.shutdown().await.unwrap();
    drop(t);
    let status = tokio::task::block_in_place(|| {
        stack
            .proxy_proc()
            .unwrap()
            .wait_exit(Duration::from_secs(2))
    });
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 once its last tunnel closed, well before the drain timeout: {status:?}\n{}",
        stack.proxy_log()
    );
    assert!(
        stack
            .proxy_log()
            .contains("drained: every connection finished")
    );

    // A tunnel that outlives --drain-timeout is cut, and the process still exits 0.
    stack.start_proxy().await.unwrap();
    let mut t = session.open_via(&proxy, "echo").await.unwrap();
    echo(&mut t, b"before").await.unwrap();
    let pid = stack.proxy_proc().unwrap().pid();
    let sent = Instant::now();
    signal(pid, libc::SIGTERM);
    let status = tokio::task::block_in_place(|| {
        stack
            .proxy_proc()
            .unwrap()
            .wait_exit(Duration::from_secs(10))
    });
    let took = sent.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        stack.proxy_log()
    );
    assert!(
        took >= Duration::from_millis(2_900) && took < Duration::from_secs(8),
        "exited {took:?} after SIGTERM with --drain-timeout 3s"
    );
    assert!(
        stack
            .proxy_log()
            .contains("drain timeout: closing the connections still open")
    );
    let mut b = [0u8; 1];
    let cut = tokio::time::timeout(Duration::from_secs(5), t.read(&mut b)).await;
    assert!(
        matches!(cut, Ok(Ok(0)) | Ok(Err(_))),
        "the tunnel is closed: {cut:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_sigterm_lets_a_request_in_flight_finish_and_cuts_it_at_the_drain_timeout() {
    let mut stack = stack(StackOptions {
        security_args: vec!["--drain-timeout".into(), "3s".into()],
        ..StackOptions::default()
    })
    .await;
    let tls = device_api_client(&stack.certs);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // A request whose body is still arriving when SIGTERM comes.
    let slow_request = async |stack: &Stack| {
        let tcp = TcpStream::connect(stack.device_api).await.unwrap();
        let mut s = tls.connect(name.clone(), tcp).await.unwrap();
        // A login the server cannot take (no challenge): answered 4xx once the whole body is in.
        let body = br#"{"user":"alice","device_id":"phone-x"}"#;
        s.write_all(
            format!(
                "POST /v1/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        s.write_all(&body[..4]).await.unwrap();
        s.flush().await.unwrap();
        // The server reads the headers and calls its handler (which waits for the body): only
        // then is the request in flight; a connection whose headers it has not read is idle,
        // and a drain closes idle connections at once.
        tokio::time::sleep(Duration::from_millis(500)).await;
        (s, &body[4..])
    };

    let (mut s, rest) = slow_request(&stack).await;
    let pid = stack.security_proc().unwrap().pid();
    signal(pid, libc::SIGTERM);
    wait_refused(stack.device_api, Duration::from_secs(2)).await;
    wait_refused(stack.admin_api, Duration::from_secs(2)).await;
    let mut early = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.read(&mut early))
            .await
            .is_err(),
        "the request is in flight: no answer and no close before its body is complete"
    );
    s.write_all(rest).await.unwrap();
    s.flush().await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 4"),
        "the request in flight got its answer after SIGTERM: {text:?}"
    );
    assert!(
        closed.is_ok(),
        "and the server closed the connection after it (no keep-alive while draining)"
    );
    let status = tokio::task::block_in_place(|| {
        stack
            .security_proc()
            .unwrap()
            .wait_exit(Duration::from_secs(3))
    });
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 once its last request ended (the proxy's revocation stream ended on the \
         drain): {status:?}\n{}",
        stack.security_log()
    );

    // A request that outlives --drain-timeout is cut; the process still exits 0.
    stack.start_security().await.unwrap();
    let (mut s, _rest) = slow_request(&stack).await;
    let pid = stack.security_proc().unwrap().pid();
    let sent = Instant::now();
    signal(pid, libc::SIGTERM);
    let status = tokio::task::block_in_place(|| {
        stack
            .security_proc()
            .unwrap()
            .wait_exit(Duration::from_secs(10))
    });
    let took = sent.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        stack.security_log()
    );
    assert!(
        took >= Duration::from_millis(2_900) && took < Duration::from_secs(8),
        "exited {took:?} after SIGTERM with --drain-timeout 3s\n{}",
        stack.security_log()
    );
    assert!(
        stack
            .security_log()
            .contains("drain timeout: closing the connections still open")
    );
    let mut b = [0u8; 1];
    let cut = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    assert!(
        matches!(cut, Ok(Ok(0)) | Ok(Err(_))),
        "the request's connection is closed: {cut:?}"
    );
}

/// `text` without its ANSI colour sequences (the log's fields are coloured).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Floods `addr` (a listener of process `pid`, started with [`low_nofile`]) with more
/// connections than the process has descriptors, and checks that its accept loop backs off:
/// the back-offs counted in its log (`log`), at most a line a second, and little CPU used.
/// Returns the flood's connections, for the caller to drop.
async fn flood_past_the_limit(pid: u32, log: &Path, addr: std::net::SocketAddr) -> Vec<TcpStream> {
    // More connections than the process has descriptors: the accept queue holds the rest, so
    // the listener stays readable while accept(2) fails with EMFILE.
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(pid) - before;
    // SAFETY: sysconf(3) reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let text = strip_ansi(&std::fs::read_to_string(log).unwrap());
    assert!(
        text.contains("backing off instead of retrying at once"),
        "no back-off logged:\n{text}"
    );
    let counted: u64 = text
        .lines()
        .filter_map(|l| l.split("accept_backoffs=").nth(1))
        .filter_map(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .max()
        .unwrap_or(0);
    assert!(
        counted >= 2,
        "back-offs counted in the log: {counted}\n{text}"
    );
    // At most one line a second, with the count: not one line per failure.
    let lines = text
        .matches("backing off instead of retrying at once")
        .count();
    assert!(lines <= 8, "{lines} back-off lines in about 3.5 s");
    // A spinning loop burns a whole CPU (3 s); backing off costs next to nothing.
    assert!(
        used * 1000 / hz < 600,
        "{used} ticks of CPU ({hz}/s) during 3 s of flood"
    );

    flood
}

/// Makes `cmd`'s process start with a limit of 96 open descriptors.
fn low_nofile(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setrlimit(2) is async-signal-safe and touches only the child being started.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 96,
                rlim_max: 96,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Kills and reaps a child on drop.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_security_server_flooded_past_its_descriptor_limit_backs_off_and_serving_resumes() {
    let bins = tokio::task::spawn_blocking(binaries).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (certs, data) = (dir.path().join("certs"), dir.path().join("data"));
    for args in [
        vec![
            "dev-certs".into(),
            "--out".into(),
            certs.display().to_string(),
        ],
        vec![
            "init".into(),
            "--data-dir".into(),
            data.display().to_string(),
        ],
    ] {
        let st = std::process::Command::new(&bins.security)
            .args(&args)
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    }
    let port = |_| std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let [device, proxy, admin]: [std::net::SocketAddr; 3] = [0, 1, 2].map(port);
    let log = dir.path().join("security.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = std::process::Command::new(&bins.security);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--tls-cert")
        .arg(certs.join("security.pem"))
        .arg("--tls-key")
        .arg(certs.join("security.key"))
        .arg("--client-ca")
        .arg(certs.join("ca.pem"))
        .args(["--listen", &device.to_string()])
        .args(["--proxy-listen", &proxy.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        // Flood connections sit in their TLS handshake for the whole measurement.
        .args(["--io-timeout", "60s", "--backup-interval", "0"])
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    low_nofile(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let tls = device_api_client(&certs);
    let deadline = Instant::now() + Duration::from_secs(60);
    while healthz(&tls, device).await.is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "scm-security exited: {st}\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "scm-security did not serve within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let child = Kill(child);

    let flood = flood_past_the_limit(pid, &log, device).await;
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match healthz(&tls, device).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "not serving after the flood: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(child);
}

/// Whether a full TLS handshake with `addr` completes.
async fn handshake_ok(tls: &tokio_rustls::TlsConnector, addr: std::net::SocketAddr) -> bool {
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tls.connect(name, tcp)).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_flooded_past_its_descriptor_limit_backs_off_and_serving_resumes() {
    let bins = tokio::task::spawn_blocking(binaries).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(d.join("ca.pem"), ck.cert.pem()).unwrap();
    std::fs::write(d.join("proxy.key"), ck.signing_key.serialize_pem()).unwrap();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = d.join("proxy.log");
    let file = std::fs::File::create(&log).unwrap();
    let (cert, key) = (d.join("ca.pem"), d.join("proxy.key"));
    let mut cmd = std::process::Command::new(&bins.proxy);
    cmd.arg("serve")
        .args(["--listen", &listen.to_string()])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        // What is measured is the accept loop: no Security server is needed (nothing listens
        // on port 1; the proxy serves handshakes without one).
        .args(["--security-url", "https://127.0.0.1:1"])
        .arg("--security-ca")
        .arg(&cert)
        .arg("--client-cert")
        .arg(&cert)
        .arg("--client-key")
        .arg(&key)
        // Flood connections sit in their TLS handshake for the whole measurement.
        .args(["--handshake-timeout", "60s", "--tls-path", "userspace"])
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    low_nofile(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let tls = full_handshake_client(d);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handshake_ok(&tls, listen).await {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "scm-proxy exited: {st}\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "scm-proxy did not serve within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let child = Kill(child);

    let flood = flood_past_the_limit(pid, &log, listen).await;
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !handshake_ok(&tls, listen).await {
        assert!(Instant::now() < deadline, "not serving after the flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(child);
}
