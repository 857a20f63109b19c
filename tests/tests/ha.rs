//! High availability end to end, with real processes: a device and a real `scm-proxy`, each
//! given two Security URLs, keep working when the first Security server is SIGKILLed. The second
//! Security server holds a copy of the first one's key store (a `scm-security backup` restored
//! with `scm-security restore`, with the same master key file), so the device logs in there with
//! its existing shared key — nobody re-enrolls — and the proxy validates the new session there.

use std::net::SocketAddr;

use scm_device::{Device, Session};
use scm_e2e::ha::{echo_once, restore_copy, second_security};
use scm_e2e::stack::{PASSWORD, free_port};
use scm_e2e::{Stack, StackOptions};

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

    // Enroll with both Security URLs, first the stack's.
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
    restore_copy(&dir);
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
