//! Helpers shared by the end-to-end tests: an echo round trip through a tunnel, and a second
//! Security server holding a restored copy of the first one's key store (for failover and
//! failback tests).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use scm_device::ProxyStream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::stack::binaries;

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `payload` through a tunnel to the echo back end and checks it comes back within 5 s.
pub async fn echo_once(stream: &mut ProxyStream, payload: &[u8]) {
    stream.write_all(payload).await.expect("write");
    stream.flush().await.expect("flush");
    let mut got = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .expect("echo within 5 s")
        .expect("echo read");
    assert_eq!(got, payload);
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

/// Makes `dir/data-b` a copy of the key store in `dir/data` the way an operator would: a
/// `scm-security backup` restored with `scm-security restore`, with the same master key file.
pub fn restore_copy(dir: &Path) {
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
}

/// Starts a second Security server on `dir/data-b` (device API, proxies' API and admin API on
/// `addrs`) and waits for its three listeners; its log is `dir/security-b.log`.
pub async fn second_security(dir: &Path, certs: &Path, addrs: [SocketAddr; 3]) -> Proc {
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
