//! PROXY protocol v2 on the device listener, end to end with a real `scm-proxy`: behind a TCP
//! balancer the proxy sees the device's address (in `x-forwarded-for` and in the per-source
//! limit), not the balancer's; a listed balancer's connection without a header is closed; a
//! header from an address not listed is never believed.
//!
//! The balancer is the test's own relay (`Balancer`): it listens on 127.0.0.1, connects to the
//! proxy from 127.0.0.2 (the address `--proxy-protocol-from` lists) and writes the header HAProxy's
//! `send-proxy-v2` would, naming the device address the test chooses, so that devices with
//! different addresses can share one loopback. A test with HAProxy itself belongs to the farm
//! tests (network namespaces as hosts).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use scm_device::{DeviceError, Session};
use scm_e2e::ha::echo_once;
use scm_e2e::stack::PASSWORD;
use scm_e2e::{Stack, StackOptions};
use scm_proto::preamble::Status;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The balancer's own address, as the proxy sees its connections come from.
const BALANCER_IP: [u8; 4] = [127, 0, 0, 2];

fn header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (source, destination),
    )
    .build()
    .expect("header")
}

async fn from_balancer_ip(target: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((BALANCER_IP, 0))).unwrap();
    sock.connect(target).await.expect("connect from 127.0.0.2")
}

/// A TCP relay that puts a PROXY v2 header naming `device` before each connection's bytes.
struct Balancer {
    addr: SocketAddr,
    device: Arc<Mutex<SocketAddr>>,
}

impl Balancer {
    async fn start(proxy: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let device = Arc::new(Mutex::new("198.51.100.1:40000".parse().unwrap()));
        let claimed = device.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let source = *claimed.lock().unwrap();
                tokio::spawn(async move {
                    let mut up = from_balancer_ip(proxy).await;
                    up.write_all(&header(source, proxy)).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                });
            }
        });
        Self { addr, device }
    }

    /// The device address the next connections are announced with.
    fn announce(&self, device: &str) {
        *self.device.lock().unwrap() = device.parse().unwrap();
    }
}

async fn stack(extra: &[&str]) -> Stack {
    let mut proxy_args = vec!["--proxy-protocol-from".to_owned(), "127.0.0.2".to_owned()];
    proxy_args.extend(extra.iter().map(|s| s.to_string()));
    Stack::start(StackOptions {
        proxy_args,
        ..StackOptions::default()
    })
    .await
    .expect("stack")
}

async fn login_via(stack: &Stack, balancer: &Balancer, device_id: &str) -> Session {
    stack
        .admin(&[
            "sites",
            "set",
            "main",
            "--proxy-url",
            &balancer.addr.to_string(),
        ])
        .unwrap();
    let d = stack.enroll("alice", device_id, "1.0.0").await.unwrap();
    Session::login(&d, PASSWORD).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_balancer_the_back_end_sees_the_device_address() {
    let stack = stack(&[]).await;
    let balancer = Balancer::start(stack.proxy_addr).await;
    let session = login_via(&stack, &balancer, "phone-1").await;
    balancer.announce("203.0.113.9:51234");

    let mut tunnel = session
        .open("echo")
        .await
        .expect("a tunnel through the balancer");
    echo_once(&mut tunnel, b"through the balancer").await;
    let resp = session
        .get("http://web/who")
        .await
        .expect("http through the balancer");
    let seen: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.9", "{seen}");
    // The proxy's log names the device's address for the tunnel, never the balancer's.
    let log = stack.proxy_log();
    assert!(log.contains("peer=203.0.113.9:51234"), "{log}");
    assert!(!log.contains("peer=127.0.0.2"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_source_limit_counts_the_device_address_not_the_balancer() {
    let stack = stack(&["--block-after", "3", "--block-for", "60s"]).await;
    let balancer = Balancer::start(stack.proxy_addr).await;
    let session = login_via(&stack, &balancer, "phone-1").await;
    let via = balancer.addr.to_string();
    let forged = || async {
        let mut conn = session.connect(&via).await.unwrap();
        let mut p = session.preamble("echo", &[0; 32]);
        p.mac = [0x55; 32];
        Session::exchange(&mut conn, &p.encode().unwrap())
            .await
            .unwrap()
            .status
    };

    // Three failures from one device address block that address ...
    balancer.announce("198.51.100.66:1000");
    for i in 0..3 {
        assert_eq!(forged().await, Status::BindingFailed, "forgery {i}");
    }
    match session.open("echo").await {
        Err(DeviceError::ProxyRefused { status, .. }) => assert_eq!(status, Status::RateLimited),
        other => panic!("the blocked address got {other:?}"),
    }
    // ... and only it: another device behind the same balancer is served.
    balancer.announce("198.51.100.77:1000");
    let mut t = session.open("echo").await.expect("another device address");
    echo_once(&mut t, b"not blocked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_balancer_must_send_a_header_and_nobody_else_is_believed() {
    let stack = stack(&[]).await;
    let bad = "scm_proxy_errors_total{class=\"proxy_header_bad\"}";
    let closed = "scm_proxy_errors_total{class=\"proxy_header_closed\"}";

    // From the balancer's address, a ClientHello where the header must be: closed at once.
    let mut direct = from_balancer_ip(stack.proxy_addr).await;
    direct
        .write_all(b"\x16\x03\x01\x00\x05hello")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), direct.read(&mut buf))
        .await
        .expect("closed within 5 s");
    assert_eq!(n.unwrap(), 0, "the proxy closes without a word");
    assert_eq!(stack.metric(bad).await.unwrap(), 1.0);

    // A health check: connect and close.
    drop(from_balancer_ip(stack.proxy_addr).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while stack.metric(closed).await.unwrap() < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no health check counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // From a device address (not listed), a header is just bytes before TLS: the handshake
    // fails, and the address it claimed appears nowhere.
    let failed = "scm_proxy_handshakes_total{result=\"failed\"}";
    let before = stack.metric(failed).await.unwrap();
    let mut spoof = TcpStream::connect(stack.proxy_addr).await.unwrap();
    spoof
        .write_all(&header("192.0.2.200:1".parse().unwrap(), stack.proxy_addr))
        .await
        .unwrap();
    spoof.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), spoof.read(&mut buf)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while stack.metric(failed).await.unwrap() <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spoofed header was not refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!stack.proxy_log().contains("192.0.2.200"));
}
