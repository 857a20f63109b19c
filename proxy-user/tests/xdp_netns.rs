//! The XDP ingress program on a real interface: two network namespaces joined by a veth pair,
//! the program attached in native mode to `vb`, real TCP and UDP sent from `va`, and the map's
//! counts checked against what was sent. Also the `scm-proxy xdp attach` binary end to end.
//!
//! Needs root and `ip` (iproute2); see `support::require_root`. All addresses live only inside
//! the namespaces the tests create and delete.

mod support;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Shutdown, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use proxy_common::{Malformed, PacketClass};
use scm_proxy::xdp::{AttachMode, AttachedMode, XdpError, XdpIngress};
use support::{A_V4, A_V6, B_V4, B_V6, NetnsPair, in_netns, require_root};

const ETH: usize = 14;
const IPV4: usize = 20;
const IPV6: usize = 40;
const UDP: usize = 8;

/// Sends `sizes.len()` datagrams from namespace `a` to a socket bound in `b` on `dst` and waits
/// until every one arrived (so the program passed them all). Returns the frame bytes they
/// occupy on the wire as XDP sees them.
fn send_udp(pair: &NetnsPair, src: &str, dst: &str, sizes: &[usize]) -> u64 {
    let receiver = in_netns(&pair.b, || UdpSocket::bind((dst, 0)).expect("bind in b"));
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let to = receiver.local_addr().unwrap();
    let sender = in_netns(&pair.a, || UdpSocket::bind((src, 0)).expect("bind in a"));
    let mut buf = vec![0u8; 65536];
    for (i, &size) in sizes.iter().enumerate() {
        let payload = vec![i as u8; size];
        sender.send_to(&payload, to).expect("send_to");
        // One at a time: a socket buffer overflow must not turn into a miscount.
        let (n, _) = receiver
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of {} to {to} lost: {e}", sizes.len()));
        assert_eq!(n, size);
    }
    let ip = if to.is_ipv4() { IPV4 } else { IPV6 };
    sizes.iter().map(|s| (ETH + ip + UDP + s) as u64).sum()
}

/// Opens `connections` TCP connections from `a` to a listener in `b` on `dst`; each sends
/// `bytes` bytes, half-closes, and waits for the server's reply and close, so the whole
/// exchange has crossed `vb` by the time it returns.
fn send_tcp(pair: &NetnsPair, src: &str, dst: &str, connections: usize, bytes: usize) {
    let listener = in_netns(&pair.b, || {
        TcpListener::bind((dst, 0)).expect("listen in b")
    });
    let to = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        for _ in 0..connections {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("server read");
            assert_eq!(got.len(), bytes);
            s.write_all(b"ok").expect("server write");
        }
    });
    let src: IpAddr = src.parse().unwrap();
    for _ in 0..connections {
        let mut s = in_netns(&pair.a, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect from a")
        });
        assert_eq!(s.local_addr().unwrap().ip(), src);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&vec![0x5a; bytes]).expect("client write");
        s.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).expect("client read");
        assert_eq!(reply, b"ok");
    }
    server.join().expect("server thread");
}

#[test]
fn real_tcp_and_udp_across_a_veth_pair_are_counted() {
    if !require_root("xdp_netns::real_tcp_and_udp_across_a_veth_pair_are_counted") {
        return;
    }
    let pair = NetnsPair::create();
    let mut ingress = XdpIngress::load().expect("loading the XDP program");
    let mode = in_netns(&pair.b, || ingress.attach("vb", AttachMode::Native)).expect("attach");
    assert_eq!(mode, AttachedMode::Native);
    assert!(pair.link_show(&pair.b, "vb").contains("xdp"));
    let before = ingress.counters().unwrap();

    let v4_sizes: Vec<usize> = (0..40).map(|i| 16 + i * 30).collect();
    let v6_sizes: Vec<usize> = (0..20).map(|i| 1 + i * 60).collect();
    let udp_bytes = send_udp(&pair, A_V4, B_V4, &v4_sizes) + send_udp(&pair, A_V6, B_V6, &v6_sizes);
    let (v4_conns, v6_conns, payload) = (4usize, 2usize, 20_000usize);
    send_tcp(&pair, A_V4, B_V4, v4_conns, payload);
    send_tcp(&pair, A_V6, B_V6, v6_conns, payload);

    let moved = ingress.counters().unwrap().since(&before);
    eprintln!("counted on vb while the test ran:\n{moved}");
    let udp = moved.class(PacketClass::Udp);
    assert_eq!(
        udp.packets,
        (v4_sizes.len() + v6_sizes.len()) as u64,
        "{moved}"
    );
    assert_eq!(udp.bytes, udp_bytes, "{moved}");
    let conns = (v4_conns + v6_conns) as u64;
    // One SYN per connection on a lossless veth; the SYN+ACKs travel the other way.
    assert_eq!(moved.class(PacketClass::TcpSyn).packets, conns, "{moved}");
    // At least: the handshake's ACK, one data segment and the FIN per connection, and every
    // payload byte, whatever segmentation the kernel chose.
    let tcp = moved.class(PacketClass::Tcp);
    assert!(tcp.packets >= conns * 3, "{moved}");
    assert!(
        tcp.bytes >= conns * (payload as u64 + (ETH + IPV4 + 20) as u64),
        "{moved}"
    );
    assert_eq!(moved.class(PacketClass::Malformed).packets, 0, "{moved}");
    for reason in Malformed::ALL {
        assert_eq!(moved.malformed(reason), 0, "{moved}");
    }

    // Detached, the program counts nothing more.
    ingress.detach().expect("detach");
    pair.wait_until_no_xdp(&pair.b, "vb", "detach()");
    let after_detach = ingress.counters().unwrap();
    send_udp(&pair, A_V4, B_V4, &[100; 5]);
    assert_eq!(ingress.counters().unwrap(), after_detach);
}

#[test]
fn auto_mode_falls_back_to_generic_where_the_driver_has_no_xdp() {
    if !require_root("xdp_netns::auto_mode_falls_back_to_generic_where_the_driver_has_no_xdp") {
        return;
    }
    let pair = NetnsPair::create();
    let mut ingress = XdpIngress::load().expect("loading the XDP program");
    // The loopback driver has no native XDP.
    let native = in_netns(&pair.b, || ingress.attach("lo", AttachMode::Native));
    assert!(native.is_err(), "native XDP on lo should be refused");
    let mode = in_netns(&pair.b, || ingress.attach("lo", AttachMode::Auto)).expect("auto attach");
    assert_eq!(mode, AttachedMode::Generic);
    assert_eq!(ingress.attached(), Some(("lo", AttachedMode::Generic)));
    assert!(pair.link_show(&pair.b, "lo").contains("xdpgeneric"));
    ingress.detach().expect("detach");
    pair.wait_until_no_xdp(&pair.b, "lo", "detach()");
}

/// Native XDP on a veth turns TSO off on the peer (the kernel's veth driver does, for any
/// program): auto mode must take generic there so the peer keeps sending GSO super-frames, and
/// those reach the multi-buffer program whole and are counted whole.
#[test]
fn auto_mode_on_a_veth_keeps_the_peer_segmenting() {
    if !require_root("xdp_netns::auto_mode_on_a_veth_keeps_the_peer_segmenting") {
        return;
    }
    let pair = NetnsPair::create();
    let tso = |ns: &str| {
        in_netns(ns, || scm_proxy::xdp::tso_enabled("va")).expect("reading va's TSO state")
    };
    assert_eq!(
        in_netns(&pair.b, || scm_proxy::xdp::driver_name("vb")).as_deref(),
        Some("veth")
    );
    assert!(tso(&pair.a), "a fresh veth has TSO on");

    // What native mode does to the peer, so this test notices if a kernel stops doing it.
    let mut ingress = XdpIngress::load().expect("loading the XDP program");
    in_netns(&pair.b, || ingress.attach("vb", AttachMode::Native)).expect("native attach");
    let native_tso = tso(&pair.a);
    ingress.detach().expect("detach");
    pair.wait_until_no_xdp(&pair.b, "vb", "detach()");
    assert!(tso(&pair.a), "detaching gives the peer its TSO back");

    let mode = in_netns(&pair.b, || ingress.attach("vb", AttachMode::Auto)).expect("auto attach");
    assert_eq!(
        mode,
        AttachedMode::Generic,
        "auto mode on a veth (native mode left the peer's TSO {})",
        if native_tso { "on" } else { "off" }
    );
    assert!(pair.link_show(&pair.b, "vb").contains("xdpgeneric"));
    assert!(tso(&pair.a), "generic XDP on vb must leave TSO on va alone");

    let before = ingress.counters().unwrap();
    let (conns, payload) = (2usize, 1_000_000usize);
    send_tcp(&pair, A_V4, B_V4, conns, payload);
    let moved = ingress.counters().unwrap().since(&before);
    eprintln!("counted on vb while the test ran:\n{moved}");
    let tcp = moved.class(PacketClass::Tcp);
    assert!(
        tcp.bytes >= (conns * payload) as u64,
        "every byte is counted, super-frames included: {moved}"
    );
    // With the peer segmenting in software there would be a frame per ~1.4 KB; GSO
    // super-frames make it several times fewer.
    assert!(
        tcp.packets < (conns * payload / 1448 / 2) as u64,
        "the program saw GSO super-frames, not MTU-sized ones: {moved}"
    );
    assert_eq!(moved.class(PacketClass::Malformed).packets, 0, "{moved}");
}

/// A multi-buffer program lets a veth carry jumbo frames with XDP attached natively: the kernel
/// refuses a peer MTU above one page for a program without frags support.
#[test]
fn native_xdp_on_a_veth_allows_a_jumbo_mtu() {
    if !require_root("xdp_netns::native_xdp_on_a_veth_allows_a_jumbo_mtu") {
        return;
    }
    let pair = NetnsPair::create();
    let mut ingress = XdpIngress::load().expect("loading the XDP program");
    let mode = in_netns(&pair.b, || ingress.attach("vb", AttachMode::Native)).expect("attach");
    assert_eq!(mode, AttachedMode::Native);
    for (ns, dev) in [(&pair.a, "va"), (&pair.b, "vb")] {
        let r = scm_netns::ip(&["-n", ns, "link", "set", dev, "mtu", "9000"]);
        assert!(
            r.is_ok(),
            "MTU 9000 on {dev} with native XDP on vb: {}",
            r.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }
    let before = ingress.counters().unwrap();
    let (conns, payload) = (2usize, 200_000usize);
    send_tcp(&pair, A_V4, B_V4, conns, payload);
    let moved = ingress.counters().unwrap().since(&before);
    eprintln!("counted on vb with MTU 9000:\n{moved}");
    let tcp = moved.class(PacketClass::Tcp);
    assert!(tcp.bytes >= (conns * payload) as u64, "{moved}");
    assert_eq!(moved.class(PacketClass::Malformed).packets, 0, "{moved}");
}

#[test]
fn unknown_interface_is_a_clear_error() {
    if !require_root("xdp_netns::unknown_interface_is_a_clear_error") {
        return;
    }
    let pair = NetnsPair::create();
    let mut ingress = XdpIngress::load().expect("loading the XDP program");
    // `va` exists, but in the other namespace.
    let err = in_netns(&pair.b, || ingress.attach("va", AttachMode::Auto)).unwrap_err();
    assert!(matches!(err, XdpError::NoSuchInterface { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("no network interface named \"va\""),
        "{err}"
    );
}

/// Lines the child prints, gathered by a reader thread.
fn spawn_line_reader(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads lines into `seen` until one satisfies `done`, or panics after `timeout`.
fn wait_for(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "timed out waiting for {what}; output so far:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// The packet count of the last `udp` row printed so far.
fn last_udp_packets(lines: &[String]) -> Option<u64> {
    lines.iter().rev().find_map(|l| {
        let mut fields = l.split_whitespace();
        (fields.next() == Some("udp")).then(|| fields.next()?.parse().ok())?
    })
}

#[test]
fn scm_proxy_xdp_attach_reports_counters_and_detaches_on_sigterm() {
    if !require_root("xdp_netns::scm_proxy_xdp_attach_reports_counters_and_detaches_on_sigterm") {
        return;
    }
    let pair = NetnsPair::create();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pair.b, env!("CARGO_BIN_EXE_scm-proxy")])
        .args([
            "xdp",
            "attach",
            "--iface",
            "vb",
            "--mode",
            "native",
            "--interval",
            "0.2",
        ])
        // Debug for scm-proxy turns on the kernel program's own log, forwarded to stderr.
        .env("RUST_LOG", "info,scm_proxy=debug,scm_ebpf=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning scm-proxy");
    // `ip netns exec` execs the command in place, so this pid is scm-proxy's.
    let pid = Pid::from_raw(child.id() as i32);
    let stdout = spawn_line_reader(child.stdout.take().unwrap());
    let stderr = spawn_line_reader(child.stderr.take().unwrap());
    let mut out = Vec::new();
    wait_for(
        &stdout,
        &mut out,
        Duration::from_secs(20),
        "the attach line",
        |l| {
            l.iter()
                .any(|l| l.contains("attached to vb in native mode"))
        },
    );
    assert!(pair.link_show(&pair.b, "vb").contains("xdp"));

    let sent = 25;
    send_udp(&pair, A_V4, B_V4, &vec![64; sent]);
    wait_for(
        &stdout,
        &mut out,
        Duration::from_secs(10),
        "a table with the UDP datagrams",
        |l| last_udp_packets(l) == Some(sent as u64),
    );

    // A malformed frame shows up in the program's log, forwarded through aya-log.
    let bogus = proxy_common::testing::PacketBuilder::ipv4([10, 211, 0, 1], [10, 211, 0, 2])
        .udp(1, 2)
        .ihl(2)
        .build();
    support::inject_frames(&pair.a, "va", &[bogus]);
    let mut log = Vec::new();
    wait_for(
        &stderr,
        &mut log,
        Duration::from_secs(10),
        "the kernel log record",
        |l| l.iter().any(|l| l.contains("malformed frame, reason 4")),
    );

    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "scm-proxy did not exit after SIGTERM; output:\n{}",
                out.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    out.extend(stdout.try_iter());
    let err: Vec<String> = stderr.try_iter().collect();
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{}\nstderr:\n{}",
        out.join("\n"),
        err.join("\n")
    );
    assert!(
        out.iter()
            .any(|l| l == "SIGTERM: scm_ingress detached from vb"),
        "{}",
        out.join("\n")
    );
    assert_eq!(last_udp_packets(&out), Some(sent as u64), "the final table");
    assert!(
        !pair.link_show(&pair.b, "vb").contains("xdp"),
        "still attached after exit"
    );
}

#[test]
fn scm_proxy_without_privileges_says_what_it_needs() {
    if !require_root("xdp_netns::scm_proxy_without_privileges_says_what_it_needs") {
        return;
    }
    // Drop to an unprivileged uid with no capabilities (setpriv, util-linux).
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([
            env!("CARGO_BIN_EXE_scm-proxy"),
            "xdp",
            "attach",
            "--iface",
            "lo",
        ])
        .env("RUST_LOG", "error")
        .output()
        .expect("running setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
    assert!(stderr.contains("uid 65534"), "{stderr}");
}

#[test]
fn crafted_frames_on_the_wire_are_classified() {
    if !require_root("xdp_netns::crafted_frames_on_the_wire_are_classified") {
        return;
    }
    use proxy_common::{
        parse::{TCP_ACK, TCP_SYN},
        testing::PacketBuilder,
    };
    let pair = NetnsPair::create();
    let mut ingress = XdpIngress::load().expect("loading the XDP program");
    in_netns(&pair.b, || ingress.attach("vb", AttachMode::Native)).expect("attach");
    let (a, b) = ([10, 211, 0, 1], [10, 211, 0, 2]);
    let syn_vlan = PacketBuilder::ipv4(a, b)
        .vlan(42)
        .tcp(1000, 80, TCP_SYN)
        .build();
    let udp_qinq = PacketBuilder::ipv4(a, b)
        .qinq(5, 6)
        .udp(1000, 53)
        .payload(&[7; 30])
        .build();
    let bogus_ihl = PacketBuilder::ipv4(a, b)
        .ihl(3)
        .tcp(1000, 80, TCP_SYN)
        .build();
    let cut_tcp = PacketBuilder::ipv4(a, b)
        .tcp(1000, 80, TCP_ACK)
        .cut_l4(10)
        .build();
    let frames = vec![
        syn_vlan.clone(),
        udp_qinq.clone(),
        bogus_ihl.clone(),
        cut_tcp.clone(),
    ];
    let before = ingress.counters().unwrap();
    support::inject_frames(&pair.a, "va", &[frames.clone(), frames].concat());

    // The frames cross the veth asynchronously; wait until all eight have been counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    let moved = loop {
        let moved = ingress.counters().unwrap().since(&before);
        if moved.class(PacketClass::Malformed).packets >= 4 || Instant::now() > deadline {
            break moved;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let syn = moved.class(PacketClass::TcpSyn);
    assert_eq!(
        (syn.packets, syn.bytes),
        (2, 2 * syn_vlan.len() as u64),
        "{moved}"
    );
    let udp = moved.class(PacketClass::Udp);
    assert_eq!(
        (udp.packets, udp.bytes),
        (2, 2 * udp_qinq.len() as u64),
        "{moved}"
    );
    let bad = moved.class(PacketClass::Malformed);
    let bad_bytes = 2 * (bogus_ihl.len() + cut_tcp.len()) as u64;
    assert_eq!((bad.packets, bad.bytes), (4, bad_bytes), "{moved}");
    assert_eq!(
        moved.malformed(Malformed::Ipv4BadHeaderLength),
        2,
        "{moved}"
    );
    assert_eq!(moved.malformed(Malformed::TcpTruncated), 2, "{moved}");
    assert_eq!(moved.class(PacketClass::Tcp).packets, 0, "{moved}");
}

#[test]
fn sigkilled_scm_proxy_leaves_no_program_behind() {
    if !require_root("xdp_netns::sigkilled_scm_proxy_leaves_no_program_behind") {
        return;
    }
    // The attachment is a BPF link owned by the process: the kernel detaches when it dies,
    // even without the SIGTERM path running.
    let pair = NetnsPair::create();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pair.b, env!("CARGO_BIN_EXE_scm-proxy")])
        .args([
            "xdp",
            "attach",
            "--iface",
            "vb",
            "--mode",
            "native",
            "--interval",
            "5",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning scm-proxy");
    let stdout = spawn_line_reader(child.stdout.take().unwrap());
    let mut out = Vec::new();
    wait_for(
        &stdout,
        &mut out,
        Duration::from_secs(20),
        "the attach line",
        |l| {
            l.iter()
                .any(|l| l.contains("attached to vb in native mode"))
        },
    );
    assert!(pair.link_show(&pair.b, "vb").contains("xdp"));
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    pair.wait_until_no_xdp(&pair.b, "vb", "the owner was killed");
}
