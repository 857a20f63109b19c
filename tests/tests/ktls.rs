//! Kernel TLS end to end with the real binaries: device -> `scm-proxy --tls-path ktls` -> back
//! end, in tunnel mode (splice relay) and http mode; close_notify, an alert and a TLS 1.3
//! KeyUpdate from the device; revocation; a per-connection fallback to user-space rustls; the
//! kernel's own counters in `/proc/net/tls_stat`.
//!
//! A host kernel without TLS (this project's machines) cannot run them: there the binary first
//! checks that `--tls-path ktls` is a clear start-up error and that `auto` counts every
//! connection as user space, then re-runs itself inside Debian
//! 12's 6.1 cloud kernel (`scm_guest`, one boot for every test, the binaries at the same paths)
//! and reports the guest's result as its own. A kernel with TLS runs them directly.
//!
//! The guest loads the TLS module and the AES-GCM helpers but not the ChaCha20-Poly1305 ones, so
//! a device that insists on ChaCha20 is a real connection the kernel cannot take: the fallback.

use std::ffi::OsStr;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use ktls::CorkStream;
use rustls::SupportedCipherSuite;
use rustls::crypto::aws_lc_rs::cipher_suite as suites;
use rustls_pki_types::ServerName;
use scm_device::Session;
use scm_e2e::ha::echo_once;
use scm_e2e::stack::{PASSWORD, binaries};
use scm_e2e::{Stack, StackOptions};
use scm_proto::preamble::Status;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Set inside the guest: run the kTLS tests here.
const IN_GUEST: &str = "SCM_KTLS_IN_GUEST";

/// The guest's modules: those kernel TLS needs, deliberately without ChaCha20-Poly1305's (the
/// cipher-fallback test needs a cipher the kernel lacks).
fn guest_modules() -> Vec<&'static str> {
    scm_guest::KTLS_MODULES
        .iter()
        .copied()
        .filter(|m| !m.contains("chacha") && !m.contains("poly1305"))
        .collect()
}

struct Fixture {
    stack: Stack,
    session: Session,
}

type TestFn = for<'a> fn(&'a Fixture) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

/// The tests run against one stack (a proxy start costs seconds under emulation); each checks
/// metric deltas, so their order does not matter.
const TESTS: &[(&str, TestFn)] = &[
    (
        "tunnel_splices_large_transfers_both_ways_checksummed",
        |f| Box::pin(tunnel_splices_large_transfers_both_ways_checksummed(f)),
    ),
    ("http_mode_runs_on_ktls", |f| {
        Box::pin(http_mode_runs_on_ktls(f))
    }),
    (
        "a_key_update_from_the_device_ends_the_connection_cleanly",
        |f| Box::pin(a_key_update_from_the_device_ends_the_connection_cleanly(f)),
    ),
    (
        "an_alert_from_the_device_ends_the_connection_and_is_counted",
        |f| {
            Box::pin(an_alert_from_the_device_ends_the_connection_and_is_counted(
                f,
            ))
        },
    ),
    ("revocation_cuts_a_ktls_tunnel", |f| {
        Box::pin(revocation_cuts_a_ktls_tunnel(f))
    }),
    ("an_idle_splice_tunnel_is_closed", |f| {
        Box::pin(an_idle_splice_tunnel_is_closed(f))
    }),
    ("a_cipher_the_kernel_lacks_goes_on_in_userspace", |f| {
        Box::pin(a_cipher_the_kernel_lacks_goes_on_in_userspace(f))
    }),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("ktls_path_is_a_startup_error_without_kernel_tls: test");
        println!("without_kernel_tls_auto_counts_every_connection_as_userspace: test");
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    if std::env::var_os(IN_GUEST).is_some() || scm_guest::host_has_ktls() {
        return run_here(filter.as_deref());
    }
    on_host_without_ktls(filter.as_deref())
}

/// Prints libtest-like lines and a real count.
fn report(results: &[(&str, bool)]) -> ExitCode {
    let passed = results.iter().filter(|r| r.1).count();
    let failed = results.len() - passed;
    let word = if failed == 0 { "ok" } else { "FAILED" };
    println!("\ntest result: {word}. {passed} passed; {failed} failed; 0 ignored; 0 measured");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn wanted(filter: Option<&str>, name: &str) -> bool {
    filter.is_none_or(|f| name.contains(f))
}

/// This kernel has TLS (or this is the guest): every test, here.
fn run_here(filter: Option<&str>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kTLS tests on kernel {}", release.trim());
    let tests: Vec<_> = TESTS.iter().filter(|(n, _)| wanted(filter, n)).collect();
    if tests.is_empty() {
        return report(&[]);
    }
    let fixture = rt.block_on(async {
        let stack = Stack::start(StackOptions {
            proxy_args: vec!["--tls-path".into(), "ktls".into()],
            // Short enough for the idle test, far longer than any pause of the others.
            idle_timeout: "8s".into(),
            ..StackOptions::default()
        })
        .await
        .expect("starting the stack with --tls-path ktls");
        let session = login(&stack, "phone-1").await;
        Fixture { stack, session }
    });
    let mut results = Vec::new();
    for (name, test) in tests {
        let ok = std::panic::catch_unwind(AssertUnwindSafe(|| {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(120), test(&fixture)).await
            })
            .unwrap_or_else(|_| panic!("{name} did not finish within 120 s"))
        }))
        .is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            println!(
                "proxy log (tail):\n{}",
                tail(&fixture.stack.proxy_log(), 40)
            );
        }
        results.push((*name, ok));
    }
    report(&results)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// This host has no kernel TLS: `--tls-path ktls` must refuse to start here, and the rest runs
/// in the guest kernel.
fn on_host_without_ktls(filter: Option<&str>) -> ExitCode {
    let mut results = Vec::new();
    let name = "ktls_path_is_a_startup_error_without_kernel_tls";
    if wanted(filter, name) {
        let ok = std::panic::catch_unwind(ktls_path_is_a_startup_error_without_kernel_tls).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        results.push((name, ok));
    }
    let name = "without_kernel_tls_auto_counts_every_connection_as_userspace";
    if wanted(filter, name) {
        let ok = std::panic::catch_unwind(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(without_kernel_tls_auto_counts_every_connection_as_userspace())
        })
        .is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        results.push((name, ok));
    }
    let host = report(&results);
    if !TESTS.iter().any(|(n, _)| wanted(filter, n)) {
        return host;
    }
    let guest = match scm_guest::Guest::new() {
        Ok(g) => g,
        Err(e) if e.is_unavailable() => {
            scm_netns::skip::skip(
                "ktls (guest kernel)",
                "qemu, busybox, cpio and the Debian kernel package (cargo xtask setup)",
                &e.to_string(),
            );
            return host;
        }
        Err(e) => panic!("the guest kernel cannot be prepared: {e}"),
    };
    let exe = std::env::current_exe().expect("current_exe");
    let bins = binaries();
    let dir = bins
        .proxy
        .parent()
        .expect("the binaries' directory")
        .to_owned();
    for b in [&bins.security, &bins.device] {
        assert_eq!(
            b.parent(),
            Some(dir.as_path()),
            "the binaries must share a directory"
        );
    }
    let mut guest = guest
        .file(&exe)
        .file(&bins.security)
        .file(&bins.proxy)
        .file(&bins.device)
        .modules(&guest_modules())
        .env(IN_GUEST, "1")
        .env("SCM_E2E_BIN_DIR", &dir.to_string_lossy())
        .env("RUST_BACKTRACE", "1")
        .memory_mib(2048)
        .cpus(2)
        .timeout(Duration::from_secs(540));
    if scm_netns::skip::ci() {
        guest = guest.env("CI", "true");
    }
    let mut argv: Vec<&OsStr> = vec![exe.as_os_str()];
    if let Some(f) = filter {
        argv.push(OsStr::new(f));
    }
    println!(
        "running the kTLS tests in the guest kernel {}",
        guest.kernel_release()
    );
    let run = guest
        .run(&argv)
        .unwrap_or_else(|e| panic!("the guest run failed: {e}"));
    println!(
        "--- guest ({}) ---\n{}",
        run.kernel_release,
        run.output.trim_end()
    );
    println!("--- guest exit code {} ---", run.exit_code);
    if host == ExitCode::SUCCESS && run.exit_code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The real binary, asked for kTLS on a kernel without it, must refuse with a clear error.
fn ktls_path_is_a_startup_error_without_kernel_tls() {
    let out = Command::new(&binaries().proxy)
        .args(["serve", "--tls-path", "ktls", "--listen", "127.0.0.1:0"])
        .args([
            "--tls-cert",
            "/nonexistent/proxy.pem",
            "--tls-key",
            "/nonexistent/proxy.key",
        ])
        .args([
            "--security-url",
            "https://127.0.0.1:1",
            "--security-ca",
            "/nonexistent/ca.pem",
        ])
        .args([
            "--client-cert",
            "/nonexistent/c.pem",
            "--client-key",
            "/nonexistent/c.key",
        ])
        .env_remove("SCM_PROXY_TLS_PATH")
        .output()
        .expect("running scm-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "scm-proxy started without kernel TLS: {stderr}"
    );
    // The kTLS check comes first, so the (missing) certificates are not what it complains of.
    assert!(
        stderr.contains("--tls-path ktls: kernel TLS is not usable here")
            && stderr.contains("CONFIG_TLS")
            && stderr.contains("--tls-path auto or userspace"),
        "unclear start-up error: {stderr}"
    );
}

/// `--tls-path auto` on this kernel: user space, said at start-up and counted per connection,
/// with no hand-off attempted.
async fn without_kernel_tls_auto_counts_every_connection_as_userspace() {
    let stack = Stack::start(StackOptions::default())
        .await
        .expect("starting the stack");
    let session = login(&stack, "phone-host").await;
    let mut s = session.open("echo").await.expect("open");
    echo_once(&mut s, b"user space").await;
    let m = |k: &'static str| {
        let stack = &stack;
        async move { stack.metric(k).await.unwrap() }
    };
    assert_eq!(m("scm_proxy_tls_path_info{path=\"userspace\"}").await, 1.0);
    assert_eq!(
        m("scm_proxy_tls_connections_total{path=\"userspace\"}").await,
        1.0
    );
    assert_eq!(
        m("scm_proxy_tls_connections_total{path=\"ktls\"}").await,
        0.0
    );
    assert_eq!(m("scm_proxy_ktls_handoffs_total{result=\"ok\"}").await, 0.0);
    let log = stack.proxy_log();
    assert!(
        log.contains("tls_path=\"userspace\"") && log.contains("CONFIG_TLS"),
        "the start-up line must say why: {log}"
    );
    assert!(log.contains("relay=\"copy\""), "{log}");
}

async fn login(stack: &Stack, device: &str) -> Session {
    let d = stack
        .enroll("alice", device, "1.0.0")
        .await
        .expect("enrollment");
    Session::login(&d, PASSWORD).await.expect("login")
}

async fn metric(f: &Fixture, series: &str) -> f64 {
    f.stack.metric(series).await.expect("reading the metrics")
}

/// The kernel's kTLS counters (`/proc/net/tls_stat`), by name.
fn tls_stat() -> std::collections::HashMap<String, u64> {
    std::fs::read_to_string("/proc/net/tls_stat")
        .expect("/proc/net/tls_stat (the tls module is loaded)")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace)?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Deterministic bytes that no short period hides in (xorshift64).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a: a checksum to print and compare (the bytes are compared whole too).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sends `payload` through an echo tunnel while reading it back, half-closes, and returns what
/// came back up to the proxy's clean end of stream.
async fn echo_all<S>(stream: S, payload: Arc<Vec<u8>>) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let p = payload.clone();
    let writer = tokio::spawn(async move {
        for chunk in p.chunks(100_000) {
            w.write_all(chunk).await.expect("device write");
        }
        // close_notify, then the TCP half-close: the proxy must pass it on and keep sending.
        w.shutdown().await.expect("device shutdown");
    });
    let mut got = Vec::with_capacity(payload.len());
    r.read_to_end(&mut got)
        .await
        .expect("read to a clean end (the proxy's close_notify)");
    writer.await.expect("writer");
    got
}

async fn tunnel_splices_large_transfers_both_ways_checksummed(f: &Fixture) {
    assert_eq!(
        metric(f, "scm_proxy_tls_path_info{path=\"ktls\"}").await,
        1.0
    );
    let ktls0 = metric(f, "scm_proxy_tls_connections_total{path=\"ktls\"}").await;
    let ok0 = metric(f, "scm_proxy_ktls_handoffs_total{result=\"ok\"}").await;
    let cn0 = metric(f, "scm_proxy_ktls_records_total{kind=\"close_notify\"}").await;
    let up0 = metric(f, "scm_proxy_bytes_total{direction=\"to_backend\"}").await;
    let down0 = metric(f, "scm_proxy_bytes_total{direction=\"to_device\"}").await;
    let stat0 = tls_stat();

    let stream = f
        .session
        .open("echo")
        .await
        .expect("opening the echo tunnel");
    let payload = Arc::new(pattern(16 << 20, 17));
    let got = echo_all(stream, payload.clone()).await;
    assert_eq!(got.len(), payload.len(), "bytes lost or added");
    assert_eq!(fnv(&got), fnv(&payload), "checksum differs");
    assert!(got == *payload, "contents differ");
    println!("  16 MiB each way, fnv1a {:016x}", fnv(&got));
    // Diagnostic, not a bound: how often a stalled wait needed the splice relay's backstop.
    println!(
        "  splice backstops that moved bytes: {}",
        metric(f, "scm_proxy_splice_backstops_total").await
    );

    assert_eq!(
        metric(f, "scm_proxy_tls_connections_total{path=\"ktls\"}").await,
        ktls0 + 1.0
    );
    assert_eq!(
        metric(f, "scm_proxy_ktls_handoffs_total{result=\"ok\"}").await,
        ok0 + 1.0
    );
    assert_eq!(
        metric(f, "scm_proxy_ktls_records_total{kind=\"close_notify\"}").await,
        cn0 + 1.0,
        "the device's close_notify is its end of stream"
    );
    let up = metric(f, "scm_proxy_bytes_total{direction=\"to_backend\"}").await - up0;
    let down = metric(f, "scm_proxy_bytes_total{direction=\"to_device\"}").await - down0;
    assert_eq!(up, payload.len() as f64);
    assert_eq!(down, payload.len() as f64);
    let stat = tls_stat();
    for k in ["TlsTxSw", "TlsRxSw"] {
        assert!(
            stat[k] > stat0[k],
            "{k}: the kernel took no TLS session ({} -> {})",
            stat0[k],
            stat[k]
        );
    }
    assert_eq!(stat["TlsDecryptError"], stat0["TlsDecryptError"]);
    assert!(
        f.stack.proxy_log().contains("relay=\"splice\""),
        "the tunnel did not take the splice relay"
    );
}

async fn http_mode_runs_on_ktls(f: &Fixture) {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::body::Bytes;
    let ktls0 = metric(f, "scm_proxy_tls_connections_total{path=\"ktls\"}").await;
    let stream = f.session.open("web").await.expect("opening web");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("http handshake");
    tokio::spawn(conn);
    // Three requests on one keep-alive connection.
    for i in 0..3 {
        sender
            .ready()
            .await
            .expect("the connection takes another request");
        let req = hyper::Request::get(format!("/ktls/{i}"))
            .header("host", "web")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.expect("http request");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).expect("json answer");
        assert!(seen.to_string().contains(&format!("/ktls/{i}")), "{seen}");
        assert!(seen.to_string().contains("alice"), "{seen}");
    }
    assert_eq!(
        metric(f, "scm_proxy_tls_connections_total{path=\"ktls\"}").await,
        ktls0 + 1.0
    );
}

/// A device connection of its own: `suites` offered, secrets extractable, preamble sent and
/// answered OK. The CorkStream lets the device side go to kernel TLS too.
async fn connect(
    f: &Fixture,
    session: &Session,
    suites: Vec<SupportedCipherSuite>,
    resource: &str,
) -> tokio_rustls::client::TlsStream<CorkStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in scm_device::tls::load_ca(&f.stack.certs.join("ca.pem")).expect("ca") {
        roots.add(c).unwrap();
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = suites;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.enable_secret_extraction = true;
    let tcp = TcpStream::connect(f.stack.proxy_addr)
        .await
        .expect("connect");
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, CorkStream::new(tcp))
        .await
        .expect("TLS handshake with the proxy");
    let exporter = tls
        .get_ref()
        .1
        .export_keying_material(
            [0u8; scm_proto::BINDING_EXPORTER_LEN],
            scm_proto::BINDING_EXPORTER_LABEL,
            None,
        )
        .unwrap();
    let frame = session.preamble(resource, &exporter).encode().unwrap();
    tls.write_all(&frame).await.unwrap();
    tls.flush().await.unwrap();
    let reply = scm_device::session::read_reply(&mut tls)
        .await
        .expect("reply");
    assert_eq!(reply.status, Status::Ok, "{}", reply.reason);
    tls
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, payload: &[u8]) {
    s.write_all(payload).await.expect("write");
    s.flush().await.expect("flush");
    let mut got = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("echo within 10 s")
        .expect("echo read");
    assert_eq!(got, payload);
}

/// What the device reads once the proxy has ended the connection: no data, within 10 s.
async fn expect_end<S: AsyncRead + Unpin>(s: &mut S, what: &str) {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: the proxy left the connection hanging"));
    match r {
        Ok(0) => println!("  {what}: device read end of stream"),
        Err(e) => println!("  {what}: device read error: {e}"),
        Ok(n) => panic!("{what}: {n} bytes came back after it: {:?}", &buf[..n]),
    }
}

/// Linux 6.1 cannot take new receive keys: the proxy must stop at the KeyUpdate record (never
/// decrypt the next record with stale keys), tell the device, count it, and keep serving.
async fn a_key_update_from_the_device_ends_the_connection_cleanly(f: &Fixture) {
    let ku0 = metric(f, "scm_proxy_ktls_records_total{kind=\"key_update\"}").await;
    let stat0 = tls_stat();
    let mut s = connect(
        f,
        &f.session,
        vec![suites::TLS13_AES_128_GCM_SHA256],
        "echo",
    )
    .await;
    echo(&mut s, b"before the key update").await;
    s.get_mut()
        .1
        .refresh_traffic_keys()
        .expect("queue a KeyUpdate");
    s.write_all(b"after the key update").await.unwrap();
    s.flush().await.unwrap();
    expect_end(&mut s, "KeyUpdate").await;
    assert_eq!(
        metric(f, "scm_proxy_ktls_records_total{kind=\"key_update\"}").await,
        ku0 + 1.0
    );
    assert_eq!(
        tls_stat()["TlsDecryptError"],
        stat0["TlsDecryptError"],
        "the proxy read past the KeyUpdate with stale keys"
    );
    assert!(
        f.stack.proxy_log().contains("KeyUpdate"),
        "no log line says why"
    );
    // The proxy is unharmed: the next connection works.
    let mut again = f.session.open("echo").await.expect("reconnect");
    echo_once(&mut again, b"fresh keys").await;
}

/// The device's side goes to kernel TLS too, so it can send a real encrypted alert record.
async fn an_alert_from_the_device_ends_the_connection_and_is_counted(f: &Fixture) {
    use std::os::fd::AsRawFd as _;
    let al0 = metric(f, "scm_proxy_ktls_records_total{kind=\"alert\"}").await;
    let s = connect(
        f,
        &f.session,
        vec![suites::TLS13_AES_256_GCM_SHA384],
        "echo",
    )
    .await;
    let mut k = ktls::config_ktls_client(s).await.expect("device-side kTLS");
    echo(&mut k, b"both ends in the kernel").await;
    send_alert(k.as_raw_fd(), [2, 40]); // fatal handshake_failure
    expect_end(&mut k, "fatal alert").await;
    assert_eq!(
        metric(f, "scm_proxy_ktls_records_total{kind=\"alert\"}").await,
        al0 + 1.0
    );
    let mut again = f.session.open("echo").await.expect("reconnect");
    echo_once(&mut again, b"still serving").await;
}

/// Sends one alert record through the device socket's kernel TLS (TLS_SET_RECORD_TYPE).
fn send_alert(fd: i32, alert: [u8; 2]) {
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: alert.as_ptr().cast_mut().cast(),
        iov_len: alert.len(),
    };
    // SAFETY: all zeroes is a valid empty msghdr; it then points to `iov` over `alert` and to
    // `control` (32 bytes, >= CMSG_SPACE(1)), which hold one SOL_TLS header written in bounds;
    // all outlive the sendmsg call, which only reads them.
    let rc = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(c) = 21; // alert
        libc::sendmsg(fd, &msg, 0)
    };
    assert_eq!(
        rc,
        2,
        "sending the alert: {}",
        std::io::Error::last_os_error()
    );
}

async fn revocation_cuts_a_ktls_tunnel(f: &Fixture) {
    let rv0 = metric(f, "scm_proxy_revoked_connections_total").await;
    let session = login(&f.stack, "phone-revoked").await;
    let mut s = session.open("echo").await.expect("open");
    echo_once(&mut s, b"before revocation").await;
    f.stack
        .admin(&["sessions", "revoke", &session.tag().0])
        .expect("revoke");
    expect_end(&mut s, "revocation").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(f, "scm_proxy_revoked_connections_total").await < rv0 + 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "revocation not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The splice relay keeps the user-space relay's idle timeout (8 s on this stack).
async fn an_idle_splice_tunnel_is_closed(f: &Fixture) {
    let mut s = f.session.open("echo").await.expect("open");
    echo_once(&mut s, b"then silence").await;
    let opened = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("an idle tunnel must be closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let after = opened.elapsed();
    println!("  idle tunnel closed after {after:?}");
    assert!(
        after >= Duration::from_secs(7),
        "closed too early: {after:?}"
    );
    // The proxy closes the socket before it logs why: give the line a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !f.stack.proxy_log().contains("closed: idle timeout") {
        assert!(
            std::time::Instant::now() < deadline,
            "no `closed: idle timeout` line"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_cipher_the_kernel_lacks_goes_on_in_userspace(f: &Fixture) {
    let log = f.stack.proxy_log();
    let Some(line) = log
        .lines()
        .find(|l| l.contains("record encryption path chosen"))
    else {
        panic!("no start-up line about the encryption path:\n{log}");
    };
    if line.contains("ChaCha20-Poly1305") {
        scm_netns::skip::skip(
            "a_cipher_the_kernel_lacks_goes_on_in_userspace",
            "a kernel without the ChaCha20-Poly1305 kTLS cipher (the guest run)",
            "this kernel takes every suite the proxy negotiates",
        );
        return;
    }
    let fb0 = metric(
        f,
        "scm_proxy_ktls_handoffs_total{result=\"fallback_cipher\"}",
    )
    .await;
    let us0 = metric(f, "scm_proxy_tls_connections_total{path=\"userspace\"}").await;
    let mut s = connect(
        f,
        &f.session,
        vec![suites::TLS13_CHACHA20_POLY1305_SHA256],
        "echo",
    )
    .await;
    let payload = pattern(1 << 20, 5);
    echo(&mut s, &payload).await;
    assert_eq!(
        metric(
            f,
            "scm_proxy_ktls_handoffs_total{result=\"fallback_cipher\"}"
        )
        .await,
        fb0 + 1.0
    );
    assert_eq!(
        metric(f, "scm_proxy_tls_connections_total{path=\"userspace\"}").await,
        us0 + 1.0
    );
    assert!(
        f.stack.proxy_log().contains("goes on in user-space rustls"),
        "no log line for the fallback"
    );
}
