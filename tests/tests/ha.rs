//! High availability end to end, with real processes: a device and a real `scm-proxy`, each
//! given two Security URLs, keep working when the first Security server is SIGKILLed. The second
//! Security server holds a copy of the first one's key store (a `scm-security backup` restored
//! with `scm-security restore`, with the same master key file), so the device logs in there with
//! its existing shared key — nobody re-enrols — and the proxy validates the new session there.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use scm_device::{Device, ProxyStream, Session};
use scm_e2e::stack::{PASSWORD, binaries, free_port};
use scm_e2e::{Stack, StackOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run scm-security");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn echo_once(stream: &mut ProxyStream, payload: &[u8]) {
    stream.write_all(payload).await.expect("write");
    stream.flush().await.expect("flush");
    let mut got = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .expect("echo within 5 s")
        .expect("echo read");
    assert_eq!(got, payload);
}

/// Starts the second Security server on `data` and waits for its three listeners.
async fn second_security(dir: &Path, certs: &Path, addrs: [SocketAddr; 3]) -> Proc {
    let log = std::fs::File::create(dir.join("security-b.log")).unwrap();
    let child = Command::new(&binaries().security)
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.join("data-b"))
        .arg("--tls-cert")
        .arg(certs.join("security.pem"))
        .arg("--tls-key")
        .arg(certs.join("security.key"))
        .arg("--client-ca")
        .arg(certs.join("ca.pem"))
        .arg("--listen")
        .arg(addrs[0].to_string())
        .arg("--proxy-listen")
        .arg(addrs[1].to_string())
        .arg("--admin-listen")
        .arg(addrs[2].to_string())
        .args(["--heartbeat-interval", "1s", "--backup-interval", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the second scm-security");
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in addrs {
        while tokio::net::TcpStream::connect(a).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "second Security server did not start: {}",
                std::fs::read_to_string(dir.join("security-b.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Proc(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_proxy_fail_over_to_the_second_security_server() {
    let port = || SocketAddr::from(([127, 0, 0, 1], free_port()));
    let b = [port(), port(), port()];
    let mut stack = Stack::start(StackOptions {
        // The proxy's list: the stack's Security server first, then the second one.
        proxy_args: vec!["--security-url".into(), format!("https://{}", b[1])],
        ..StackOptions::default()
    })
    .await
    .expect("stack");

    // Enrol with both Security URLs, first the stack's.
    let enrolled = stack.enroll("alice", "phone-1", "1.0.0").await.unwrap();
    let mut e = enrolled.enrollment().clone();
    e.config.security_urls.push(format!("https://{}", b[0]));
    let device = Device::from_enrollment(e).unwrap();
    let first = Session::login(&device, PASSWORD).await.unwrap();
    let mut s = first.open("echo").await.unwrap();
    echo_once(&mut s, b"through the first Security server").await;
    drop(s);

    // The second Security server: a restored snapshot of the first, same master key.
    let dir = stack.dir.path().to_owned();
    let snap = dir.join("snap");
    run(Command::new(&binaries().security)
        .arg("backup")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--out")
        .arg(&snap));
    std::fs::create_dir_all(dir.join("data-b")).unwrap();
    std::fs::copy(dir.join("data/master.key"), dir.join("data-b/master.key")).unwrap();
    run(Command::new(&binaries().security)
        .arg("restore")
        .arg("--from")
        .arg(&snap)
        .arg("--data-dir")
        .arg(dir.join("data-b")));
    let _b = second_security(&dir, &stack.certs, b).await;

    // The first Security server dies.
    stack.kill_security();
    let failovers_before = stack
        .metric("scm_proxy_security_failovers_total")
        .await
        .unwrap();

    // The device logs in again at the second server with its existing key; the proxy validates
    // the new session there and the tunnel works.
    let again = Session::login(&device, PASSWORD)
        .await
        .expect("login at the second Security server");
    assert_eq!(again.proxies(), first.proxies());
    let mut s = again.open("echo").await.expect("tunnel after failover");
    echo_once(&mut s, b"through the second Security server").await;
    assert!(
        stack
            .metric("scm_proxy_security_failovers_total")
            .await
            .unwrap()
            > failovers_before,
        "the proxy moved to the second Security server"
    );
}
