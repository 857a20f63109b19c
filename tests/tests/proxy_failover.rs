//! A site with two proxy URLs, end to end: the device's connections go to the first; when it
//! cannot be reached they go to the second (no failed open: the device moves on by itself), the
//! connections already open on the second stay up when the first comes back, and within the
//! failback interval new connections go to the first again.
//!
//! One real `scm-proxy` serves both URLs: the first is a cuttable relay in front of it
//! (`scm_e2e::link::Link`: while cut, connections are accepted and closed at once, as a broken
//! path looks to the client), the second the proxy's own address. Which URL served a connection
//! is read off the connection's peer address.

use std::time::Duration;

use scm_device::{ProxyStream, Session};
use scm_e2e::ha::echo_once;
use scm_e2e::link::Link;
use scm_e2e::stack::PASSWORD;
use scm_e2e::{Stack, StackOptions};

/// The failback interval given to the session.
const FAILBACK: Duration = Duration::from_millis(500);

fn peer(stream: &ProxyStream) -> std::net::SocketAddr {
    stream.get_ref().0.peer_addr().expect("peer address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_fail_over_to_the_next_proxy_and_come_back_to_the_first() {
    let stack = Stack::start(StackOptions::default()).await.expect("stack");
    let first = Link::start(stack.proxy_addr).await.expect("relay");
    let (first_url, second_url) = (first.addr().to_string(), stack.proxy_addr.to_string());
    stack
        .admin(&[
            "sites",
            "set",
            "main",
            "--proxy-url",
            &first_url,
            "--proxy-url",
            &second_url,
        ])
        .expect("two proxies for the site");
    let device = stack.enroll("alice", "phone-1", "1.0.0").await.unwrap();
    let session = Session::login(&device, PASSWORD)
        .await
        .unwrap()
        .with_proxy_failback(FAILBACK);
    assert_eq!(session.proxies(), [first_url.clone(), second_url.clone()]);

    // Both up: the first serves.
    let mut s = session.open("echo").await.expect("open through the first");
    assert_eq!(peer(&s), first.addr());
    echo_once(&mut s, b"via the first").await;
    drop(s);

    // The first unreachable: every open succeeds, through the second.
    first.cut();
    let mut on_second = Vec::new();
    for i in 0..3 {
        let mut s = session
            .open("echo")
            .await
            .unwrap_or_else(|e| panic!("open {i} with the first proxy cut: {e}"));
        assert_eq!(peer(&s), stack.proxy_addr, "open {i}");
        echo_once(&mut s, format!("via the second {i}").as_bytes()).await;
        on_second.push(s);
    }
    assert_eq!(session.current_proxy(), Some(second_url.as_str()));

    // The first back: after the failback interval, new connections go to it again, and those
    // open on the second are untouched.
    first.restore();
    tokio::time::sleep(FAILBACK + Duration::from_millis(100)).await;
    let mut s = session
        .open("echo")
        .await
        .expect("open after the first came back");
    assert_eq!(peer(&s), first.addr(), "back to the first proxy");
    echo_once(&mut s, b"via the first again").await;
    assert_eq!(session.current_proxy(), Some(first_url.as_str()));
    for (i, s) in on_second.iter_mut().enumerate() {
        echo_once(s, format!("still on the second {i}").as_bytes()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_final_and_no_proxy_reachable_says_how_many_were_tried() {
    let stack = Stack::start(StackOptions::default()).await.expect("stack");
    let first = Link::start(stack.proxy_addr).await.expect("relay");
    let second = Link::start(stack.proxy_addr).await.expect("relay");
    let urls = [first.addr().to_string(), second.addr().to_string()];
    stack
        .admin(&[
            "sites",
            "set",
            "main",
            "--proxy-url",
            &urls[0],
            "--proxy-url",
            &urls[1],
        ])
        .expect("two proxies for the site");
    let device = stack.enroll("alice", "phone-1", "1.0.0").await.unwrap();
    let session = Session::login(&device, PASSWORD).await.unwrap();

    // A resource the user may not reach: the first proxy's refusal is the answer; the second is
    // not asked (it would refuse too) and the first stays current.
    let refused = session.open("secret").await.expect_err("refused");
    assert!(
        matches!(refused, scm_device::DeviceError::ProxyRefused { .. }),
        "{refused}"
    );
    assert_eq!(session.current_proxy(), Some(urls[0].as_str()));

    first.cut();
    second.cut();
    let err = session.open("echo").await.expect_err("nothing reachable");
    match err {
        scm_device::DeviceError::ProxyUnreachable { tried, .. } => assert_eq!(tried, 2),
        other => panic!("expected ProxyUnreachable, got {other}"),
    }
}
