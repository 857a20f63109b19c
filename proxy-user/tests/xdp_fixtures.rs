//! The XDP ingress program run on crafted frames with `BPF_PROG_TEST_RUN`, katran style: a table
//! of {description, frame from the packet builder, expected verdict, expected counter}. Each case
//! must return the verdict, leave the frame unchanged, and move exactly one class counter by one
//! packet and the frame's length in bytes (and, when malformed, exactly one reason counter).
//!
//! Needs root; see `support::require_root`.

mod support;

use proxy_common::{
    Malformed, PacketClass,
    parse::{
        IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_HOPOPTS, IPPROTO_ROUTING, TCP_ACK, TCP_PSH, TCP_SYN,
    },
    testing::PacketBuilder,
};
use scm_proxy::xdp::{IngressCounters, XDP_PASS, XdpIngress};

const A4: [u8; 4] = [192, 0, 2, 1];
const B4: [u8; 4] = [192, 0, 2, 2];
const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// One row of the table.
struct Case {
    description: &'static str,
    frame: Vec<u8>,
    action: u32,
    class: PacketClass,
    malformed: Option<Malformed>,
}

fn case(description: &'static str, b: PacketBuilder, class: PacketClass) -> Case {
    Case {
        description,
        frame: b.build(),
        action: XDP_PASS,
        class,
        malformed: None,
    }
}

fn bad(description: &'static str, b: PacketBuilder, reason: Malformed) -> Case {
    Case {
        description,
        frame: b.build(),
        action: XDP_PASS,
        class: PacketClass::Malformed,
        malformed: Some(reason),
    }
}

fn table() -> Vec<Case> {
    use PacketClass::{Other, Tcp, TcpSyn, Udp};
    let v4 = || PacketBuilder::ipv4(A4, B4);
    let v6 = || PacketBuilder::ipv6(A6, B6);
    let mss = [2, 4, 0x05, 0xb4];
    let mut padded = v4().tcp(40000, 443, TCP_ACK).build();
    padded.resize(60, 0);
    vec![
        case(
            "IPv4 TCP SYN",
            v4().tcp(40000, 443, TCP_SYN).tcp_options(&mss),
            TcpSyn,
        ),
        case(
            "IPv4 TCP data",
            v4().tcp(40000, 443, TCP_ACK | TCP_PSH)
                .payload(&[0xab; 200]),
            Tcp,
        ),
        case(
            "IPv4 TCP SYN+ACK",
            v4().tcp(443, 40000, TCP_SYN | TCP_ACK),
            Tcp,
        ),
        case("IPv6 TCP SYN", v6().tcp(40000, 443, TCP_SYN), TcpSyn),
        case(
            "IPv6 TCP data",
            v6().tcp(40000, 443, TCP_ACK).payload(b"GET / HTTP/1.1\r\n"),
            Tcp,
        ),
        case("IPv4 UDP", v4().udp(5353, 53).payload(&[1; 48]), Udp),
        case("IPv6 UDP", v6().udp(5353, 53).payload(&[1; 48]), Udp),
        case(
            "802.1Q-tagged IPv4 TCP SYN",
            v4().vlan(42).tcp(1, 443, TCP_SYN),
            TcpSyn,
        ),
        case("802.1ad QinQ IPv6 UDP", v6().qinq(100, 200).udp(1, 53), Udp),
        Case {
            description: "three VLAN tags: not followed",
            ..case("", v4().qinq(1, 2).vlan(3).tcp(1, 2, TCP_SYN), Other)
        },
        case(
            "IPv4 with options, TCP SYN",
            v4().ipv4_options(&[0x94, 0x04, 0, 0, 0x01, 0x01, 0x01, 0x00])
                .tcp(1, 443, TCP_SYN),
            TcpSyn,
        ),
        case(
            "IPv6 hop-by-hop, routing, AH, destination options, TCP SYN",
            v6().ipv6_ext(IPPROTO_HOPOPTS, 8)
                .ipv6_ext(IPPROTO_ROUTING, 24)
                .ipv6_ext(IPPROTO_AH, 16)
                .ipv6_ext(IPPROTO_DSTOPTS, 8)
                .tcp(1, 443, TCP_SYN),
            TcpSyn,
        ),
        case(
            "IPv4 non-first fragment",
            v4().udp(1, 53).payload(&[0; 64]).fragment(8, false),
            Other,
        ),
        case(
            "IPv4 first fragment",
            v4().udp(1, 53)
                .payload(&[0; 64])
                .udp_len(3000)
                .fragment(0, true),
            Udp,
        ),
        case(
            "IPv6 non-first fragment",
            v6().udp(1, 53).payload(&[0; 64]).fragment(8, true),
            Other,
        ),
        case("ARP request (non-IP)", PacketBuilder::arp_request(), Other),
        case(
            "IPv4 ICMP echo",
            v4().payload(&[8, 0, 0, 0, 0, 1, 0, 1]),
            Other,
        ),
        Case {
            frame: padded,
            ..case("IPv4 TCP ACK with Ethernet padding to 60 bytes", v4(), Tcp)
        },
        bad(
            "truncated Ethernet: 802.1Q tag cut",
            v4().vlan(7).tcp(1, 2, TCP_SYN).cut_frame(16),
            Malformed::VlanTruncated,
        ),
        bad(
            "truncated IPv4 header",
            v4().tcp(1, 2, TCP_SYN).cut_frame(14 + 12),
            Malformed::Ipv4Truncated,
        ),
        bad(
            "IPv4 total length beyond the frame",
            v4().udp(1, 2).payload(&[0; 40]).cut_frame(14 + 20 + 8 + 10),
            Malformed::Ipv4Truncated,
        ),
        bad(
            "truncated IPv6 header",
            v6().udp(1, 2).cut_frame(14 + 30),
            Malformed::Ipv6Truncated,
        ),
        bad(
            "truncated TCP header",
            v4().tcp(1, 2, TCP_SYN).cut_l4(12),
            Malformed::TcpTruncated,
        ),
        bad(
            "TCP options beyond the datagram",
            v6().tcp(1, 2, TCP_SYN).tcp_data_offset(10),
            Malformed::TcpTruncated,
        ),
        bad(
            "TCP data offset below 5",
            v4().tcp(1, 2, TCP_ACK).tcp_data_offset(2),
            Malformed::TcpBadDataOffset,
        ),
        bad(
            "bogus IHL (3)",
            v4().tcp(1, 2, TCP_SYN).ihl(3),
            Malformed::Ipv4BadHeaderLength,
        ),
        bad(
            "IHL longer than the datagram",
            v4().udp(1, 2).ihl(15),
            Malformed::Ipv4BadHeaderLength,
        ),
        bad(
            "IPv4 EtherType, version 6",
            v4().udp(1, 2).ip_version(6),
            Malformed::Ipv4BadVersion,
        ),
        bad(
            "UDP length beyond the datagram",
            v4().udp(1, 2).payload(&[0; 8]).udp_len(100),
            Malformed::UdpBadLength,
        ),
        bad(
            "truncated UDP header",
            v6().udp(1, 2).cut_l4(6),
            Malformed::UdpTruncated,
        ),
    ]
}

/// Checks one case; returns what went wrong, if anything.
fn check(ingress: &XdpIngress, case: &Case) -> Result<(), String> {
    let before = ingress.counters().map_err(|e| e.to_string())?;
    let out = ingress.test_run(&case.frame).map_err(|e| e.to_string())?;
    let moved = ingress
        .counters()
        .map_err(|e| e.to_string())?
        .since(&before);
    let mut problems = Vec::new();
    if out.action != case.action {
        problems.push(format!("verdict {} (expected {})", out.action, case.action));
    }
    if out.frame != case.frame {
        problems.push("the program changed the frame".to_owned());
    }
    let len = case.frame.len() as u64;
    for class in PacketClass::ALL {
        let c = moved.class(class);
        let expected = if class == case.class {
            (1, len)
        } else {
            (0, 0)
        };
        if (c.packets, c.bytes) != expected {
            problems.push(format!(
                "{} moved by {} packets / {} bytes (expected {} / {})",
                class.name(),
                c.packets,
                c.bytes,
                expected.0,
                expected.1
            ));
        }
    }
    for reason in Malformed::ALL {
        let n = moved.malformed(reason);
        let expected = u64::from(case.malformed == Some(reason));
        if n != expected {
            problems.push(format!(
                "malformed {} moved by {n} (expected {expected})",
                reason.name()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[test]
fn fixture_table() {
    if !support::require_root("xdp_fixtures::fixture_table") {
        return;
    }
    let ingress = XdpIngress::load().expect("loading the XDP program");
    let table = table();
    assert!(table.len() >= 12);
    let failures: Vec<String> = table
        .iter()
        .filter_map(|c| {
            check(&ingress, c)
                .err()
                .map(|e| format!("{}: {e}", c.description))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
    // Everything the table sent is in the totals, nothing else.
    let total = ingress.counters().unwrap().total();
    assert_eq!(total.packets, table.len() as u64);
    assert_eq!(
        total.bytes,
        table.iter().map(|c| c.frame.len() as u64).sum::<u64>()
    );
}

#[test]
fn fresh_program_counts_nothing() {
    if !support::require_root("xdp_fixtures::fresh_program_counts_nothing") {
        return;
    }
    let ingress = XdpIngress::load().expect("loading the XDP program");
    assert_eq!(ingress.counters().unwrap(), IngressCounters::default());
    assert_eq!(ingress.attached(), None);
}

#[test]
fn frames_shorter_than_ethernet_never_reach_xdp() {
    if !support::require_root("xdp_fixtures::frames_shorter_than_ethernet_never_reach_xdp") {
        return;
    }
    // The kernel refuses to run XDP on fewer than 14 bytes, so "truncated Ethernet" in the table
    // is a cut VLAN tag; the parser's own < 14 byte rule is covered by proxy-common's unit tests.
    let ingress = XdpIngress::load().expect("loading the XDP program");
    assert!(ingress.test_run(&[0u8; 13]).is_err());
    assert_eq!(ingress.counters().unwrap(), IngressCounters::default());
}

/// Frames longer than a page reach the program as multi-buffer XDP (a linear head plus
/// fragments), as jumbo frames and GRO aggregates do on a NIC or a veth. The program must count
/// the whole frame, judge it by its headers, and read a header that lies past the linear head
/// from the fragment instead of calling the frame truncated.
#[test]
fn multi_buffer_frames() {
    if !support::require_root("xdp_fixtures::multi_buffer_frames") {
        return;
    }
    let ingress = XdpIngress::load().expect("loading the XDP program");
    let jumbo_payload = vec![0x5a; 8900];
    let deep = PacketBuilder::ipv6(A6, B6)
        .ipv6_ext(IPPROTO_DSTOPTS, 2048)
        .ipv6_ext(IPPROTO_DSTOPTS, 2048)
        .tcp(40000, 443, TCP_ACK)
        .payload(&[1; 64]);
    let cases = [
        case(
            "IPv4 TCP, 9 KB jumbo frame",
            PacketBuilder::ipv4(A4, B4)
                .tcp(40000, 443, TCP_ACK | TCP_PSH)
                .payload(&jumbo_payload),
            PacketClass::Tcp,
        ),
        case(
            "IPv6 TCP, 9 KB jumbo frame",
            PacketBuilder::ipv6(A6, B6)
                .tcp(40000, 443, TCP_ACK | TCP_PSH)
                .payload(&jumbo_payload),
            PacketClass::Tcp,
        ),
        // The TCP header starts 4 150 bytes in, past the linear head BPF_PROG_TEST_RUN builds
        // (a page less head- and tailroom), so only a fragment-aware load can read it.
        case(
            "IPv6 TCP whose header lies in a fragment",
            deep,
            PacketClass::Tcp,
        ),
    ];
    assert!(cases.iter().all(|c| c.frame.len() > 4096));
    assert_eq!(
        cases[2].frame.get(14 + 6),
        Some(&IPPROTO_DSTOPTS),
        "the builder put the extension headers first"
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            check(&ingress, c)
                .err()
                .map(|e| format!("{} ({} bytes): {e}", c.description, c.frame.len()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} multi-buffer cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
