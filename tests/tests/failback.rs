//! Failback end to end, with real processes: a device and a real `scm-proxy`, each given two
//! Security URLs, move to the second Security server when the first is SIGKILLed, and come back
//! to the first within the failback interval (plus a margin) once it is restarted — the proxy with
//! no traffic at all (its revocation stream retries the first server), the device on its next
//! call. The proof that both are back: with the second server SIGKILLed too, the device logs in,
//! the proxy validates the session, and a revocation made at the first server reaches the proxy
//! (its revocation stream is there) and cuts the tunnel within a second.
//!
//! The second Security server holds a copy of the first one's key store (`scm-security backup`
//! restored with `scm-security restore`, same master key), as in `ha.rs`; the first restarts on
//! its own data directory and ports.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use scm_device::{Device, Session};
use scm_e2e::ha::{echo_once, restore_copy, second_security};
use scm_e2e::stack::{PASSWORD, free_port};
use scm_e2e::{Stack, StackOptions};
use tokio::io::AsyncReadExt as _;

/// The failback interval given to both the proxy and the device.
const FAILBACK: Duration = Duration::from_secs(2);
/// Slack for process start-up and a loaded machine.
const MARGIN: Duration = Duration::from_secs(6);

/// Waits until a proxy metric equals `value` exactly.
async fn wait_metric_eq(stack: &Stack, series: &str, value: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = stack.metric(series).await.unwrap_or(f64::NAN);
        if v == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {v}, not {value}, after {within:?}; proxy log:\n{}",
            stack.proxy_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_proxy_fail_back_to_the_first_security_server() {
    let port = || SocketAddr::from(([127, 0, 0, 1], free_port()));
    let b = [port(), port(), port()];
    let failback = format!("{}ms", FAILBACK.as_millis());
    let mut stack = Stack::start(StackOptions {
        // The proxy's list: the stack's Security server first, then the second one.
        proxy_args: vec![
            "--security-url".into(),
            format!("https://{}", b[1]),
            "--security-failback".into(),
            failback,
        ],
        ..StackOptions::default()
    })
    .await
    .expect("stack");
    let first_url = format!("https://{}", stack.device_api);
    let second_url = format!("https://{}", b[0]);

    // Enroll with both Security URLs, first the stack's.
    let enrolled = stack.enroll("alice", "phone-1", "1.0.0").await.unwrap();
    let mut e = enrolled.enrollment().clone();
    e.config.security_urls.push(second_url.clone());
    let device = Device::from_enrollment(e)
        .unwrap()
        .with_security_failback(FAILBACK);

    // The second Security server: a restored snapshot of the first, same master key.
    let dir = stack.dir.path().to_owned();
    restore_copy(&dir);
    let second = second_security(&dir, &stack.certs, b).await;
    assert_eq!(
        stack
            .metric("scm_proxy_security_current_index")
            .await
            .unwrap(),
        0.0
    );

    // The first Security server dies: the device logs in at the second with its existing key,
    // and the proxy validates the new session there.
    stack.kill_security();
    let at_second = Session::login(&device, PASSWORD)
        .await
        .expect("login at the second Security server");
    assert_eq!(device.api().current_url(), second_url);
    let mut s = at_second
        .open("echo")
        .await
        .expect("tunnel validated at the second Security server");
    echo_once(&mut s, b"through the second Security server").await;
    drop(s);
    wait_metric_eq(&stack, "scm_proxy_security_current_index", 1.0, MARGIN).await;
    assert!(
        stack
            .metric("scm_proxy_security_failovers_total")
            .await
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        stack
            .metric("scm_proxy_security_failbacks_total")
            .await
            .unwrap(),
        0.0
    );

    // The first one comes back (same data, same ports). With no traffic, the proxy is back on
    // it within the failback interval plus a margin, revocation stream included.
    stack
        .start_security()
        .await
        .expect("restart the first Security server");
    let back = Instant::now();
    wait_metric_eq(
        &stack,
        "scm_proxy_security_current_index",
        0.0,
        FAILBACK + MARGIN,
    )
    .await;
    assert_eq!(
        stack
            .metric("scm_proxy_security_failbacks_total")
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(
        stack
            .metric("scm_proxy_revocation_stream_up")
            .await
            .unwrap(),
        1.0
    );
    let log = stack.proxy_log();
    assert!(
        log.contains("failed back to the first Security server")
            && log.contains("revocation stream moved back to the first Security server"),
        "{log}"
    );

    // The device: its next call after the interval goes to the first server again.
    tokio::time::sleep(FAILBACK.saturating_sub(back.elapsed())).await;
    let at_first = Session::login(&device, PASSWORD)
        .await
        .expect("login after the first Security server is back");
    assert_eq!(device.api().current_url(), first_url);
    assert!(back.elapsed() < FAILBACK + MARGIN);

    // Proof that nothing still depends on the second server: it dies too, and everything works.
    drop(second);
    let mut tunnel = at_first
        .open("echo")
        .await
        .expect("tunnel validated at the first Security server");
    echo_once(&mut tunnel, b"through the first Security server again").await;
    // A revocation made at the first server reaches the proxy over its revocation stream.
    let tag = at_first.tag().0;
    stack.admin(&["sessions", "revoke", &tag]).unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(1), tunnel.read(&mut buf))
        .await
        .expect("the revoked tunnel must be closed within a second");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // And a fresh login still works with the second server gone.
    let again = Session::login(&device, PASSWORD)
        .await
        .expect("login with only the first Security server");
    let mut s = again.open("echo").await.expect("tunnel");
    echo_once(&mut s, b"only the first is left").await;
    assert_eq!(
        stack
            .metric("scm_proxy_security_current_index")
            .await
            .unwrap(),
        0.0
    );
}
