//! The parser against hand-built frames (`crate::testing`'s builder).

use super::*;
use crate::testing::PacketBuilder;

const A4: [u8; 4] = [10, 211, 0, 1];
const B4: [u8; 4] = [10, 211, 0, 2];
const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn run(b: &PacketBuilder) -> Result<Packet, Malformed> {
    let frame = b.build();
    // Whatever the verdict, every prefix of the frame must parse without reading past it.
    for n in 0..frame.len() {
        let _ = parse(&frame[..n]);
    }
    parse(&frame[..])
}

fn class(b: &PacketBuilder) -> PacketClass {
    classify(&run(b))
}

#[test]
fn ipv4_tcp_syn_is_tcp_syn() {
    let p = run(&PacketBuilder::ipv4(A4, B4).tcp(40000, 443, TCP_SYN)).unwrap();
    assert_eq!(p.class(), PacketClass::TcpSyn);
    assert_eq!(
        p.l3,
        L3::Ipv4 {
            src: A4,
            dst: B4,
            fragment: Fragment::Whole
        }
    );
    assert_eq!(
        p.l4,
        L4::Tcp {
            src_port: 40000,
            dst_port: 443,
            flags: TCP_SYN
        }
    );
    assert_eq!((p.l3_offset, p.l4_offset), (14, 34));
}

#[test]
fn syn_ack_and_data_are_tcp() {
    let b = PacketBuilder::ipv4(A4, B4);
    assert_eq!(
        class(&b.clone().tcp(443, 40000, TCP_SYN | TCP_ACK)),
        PacketClass::Tcp
    );
    assert_eq!(
        class(&b.clone().tcp(1, 2, TCP_ACK | TCP_PSH).payload(b"hello")),
        PacketClass::Tcp
    );
    assert_eq!(class(&b.tcp(1, 2, TCP_RST)), PacketClass::Tcp);
}

#[test]
fn tcp_options_are_skipped_and_must_fit() {
    let b = PacketBuilder::ipv4(A4, B4).tcp(1, 2, TCP_SYN);
    let opts = [2, 4, 0x05, 0xb4, 1, 1, 4, 2];
    assert_eq!(class(&b.clone().tcp_options(&opts)), PacketClass::TcpSyn);
    // Data offset claims 15 words, the datagram ends after 5.
    assert_eq!(
        run(&b.clone().tcp_data_offset(15)),
        Err(Malformed::TcpTruncated)
    );
    assert_eq!(
        run(&b.clone().tcp_data_offset(4)),
        Err(Malformed::TcpBadDataOffset)
    );
    assert_eq!(run(&b.cut_l4(19)), Err(Malformed::TcpTruncated));
}

#[test]
fn udp_v4_and_v6() {
    let p = run(&PacketBuilder::ipv4(A4, B4).udp(5353, 53).payload(&[0; 32])).unwrap();
    assert_eq!(
        p.l4,
        L4::Udp {
            src_port: 5353,
            dst_port: 53
        }
    );
    assert_eq!(p.class(), PacketClass::Udp);
    let p = run(&PacketBuilder::ipv6(A6, B6).udp(1, 2).payload(b"x")).unwrap();
    assert_eq!(p.class(), PacketClass::Udp);
    assert_eq!(
        p.l3,
        L3::Ipv6 {
            src: A6,
            dst: B6,
            fragment: Fragment::Whole
        }
    );
    assert_eq!(p.l4_offset, 54);
}

#[test]
fn udp_length_must_fit() {
    let b = PacketBuilder::ipv4(A4, B4).udp(1, 2).payload(&[0; 10]);
    assert_eq!(run(&b.clone().udp_len(7)), Err(Malformed::UdpBadLength));
    assert_eq!(run(&b.clone().udp_len(19)), Err(Malformed::UdpBadLength));
    assert_eq!(class(&b.clone().udp_len(18)), PacketClass::Udp);
    assert_eq!(run(&b.cut_l4(7)), Err(Malformed::UdpTruncated));
}

#[test]
fn ipv6_tcp_and_extension_headers() {
    let b = PacketBuilder::ipv6(A6, B6).tcp(1, 2, TCP_SYN);
    assert_eq!(class(&b), PacketClass::TcpSyn);
    let chained = b
        .clone()
        .ipv6_ext(IPPROTO_HOPOPTS, 8)
        .ipv6_ext(IPPROTO_ROUTING, 24)
        .ipv6_ext(IPPROTO_AH, 16)
        .ipv6_ext(IPPROTO_DSTOPTS, 16);
    let p = run(&chained).unwrap();
    assert_eq!(p.class(), PacketClass::TcpSyn);
    assert_eq!(p.l4_offset, 14 + 40 + 8 + 24 + 16 + 16);
    let mut long = b.clone();
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        long = long.ipv6_ext(IPPROTO_DSTOPTS, 8);
    }
    assert_eq!(
        run(&long).unwrap().l4,
        L4::Unparsed {
            protocol: IPPROTO_DSTOPTS
        }
    );
    // An extension header longer than the payload.
    let cut = b.ipv6_ext(IPPROTO_DSTOPTS, 8).ipv6_payload_len(4);
    assert_eq!(run(&cut), Err(Malformed::Ipv6ExtensionTruncated));
}

#[test]
fn ipv6_fragments() {
    let b = PacketBuilder::ipv6(A6, B6).udp(1, 2).payload(&[0; 16]);
    let first = run(&b.clone().fragment(0, true)).unwrap();
    assert_eq!(first.class(), PacketClass::Udp);
    assert!(matches!(
        first.l3,
        L3::Ipv6 {
            fragment: Fragment::First,
            ..
        }
    ));
    let later = run(&b.fragment(3, false)).unwrap();
    assert_eq!(later.class(), PacketClass::Other);
    assert!(matches!(
        later.l3,
        L3::Ipv6 {
            fragment: Fragment::Later,
            ..
        }
    ));
}

#[test]
fn ipv6_header_checks() {
    let b = PacketBuilder::ipv6(A6, B6).udp(1, 2);
    assert_eq!(
        run(&b.clone().ip_version(4)),
        Err(Malformed::Ipv6BadVersion)
    );
    assert_eq!(
        run(&b.clone().cut_frame(14 + 39)),
        Err(Malformed::Ipv6Truncated)
    );
    assert_eq!(run(&b.ipv6_payload_len(9)), Err(Malformed::Ipv6Truncated));
    let esp = PacketBuilder::ipv6(A6, B6).protocol(IPPROTO_ESP);
    assert_eq!(class(&esp), PacketClass::Other);
    let none = PacketBuilder::ipv6(A6, B6).protocol(IPPROTO_NONE);
    assert_eq!(class(&none), PacketClass::Other);
}

#[test]
fn vlan_and_qinq_tags_are_followed() {
    let b = PacketBuilder::ipv4(A4, B4).tcp(1, 2, TCP_SYN);
    let p = run(&b.clone().vlan(100)).unwrap();
    assert_eq!(
        (p.vlan_tags, p.l3_offset, p.class()),
        (1, 18, PacketClass::TcpSyn)
    );
    let p = run(&b.clone().qinq(10, 20)).unwrap();
    assert_eq!(
        (p.vlan_tags, p.l3_offset, p.class()),
        (2, 22, PacketClass::TcpSyn)
    );
    let p = run(&b.clone().qinq(10, 20).vlan(30)).unwrap();
    assert_eq!(
        p.l3,
        L3::NotIp {
            ethertype: ETH_P_8021Q
        }
    );
    assert_eq!(p.class(), PacketClass::Other);
    assert_eq!(run(&b.vlan(1).cut_frame(17)), Err(Malformed::VlanTruncated));
}

#[test]
fn ethernet_checks() {
    assert_eq!(parse(&[0u8; 13][..]), Err(Malformed::EthernetTruncated));
    assert_eq!(parse(&[][..]), Err(Malformed::EthernetTruncated));
    let arp = run(&PacketBuilder::arp_request()).unwrap();
    assert_eq!(
        arp.l3,
        L3::NotIp {
            ethertype: ETH_P_ARP
        }
    );
    assert_eq!(arp.class(), PacketClass::Other);
    // An 802.3 length field instead of an EtherType.
    assert_eq!(
        class(&PacketBuilder::ethertype(46, &[0; 46])),
        PacketClass::Other
    );
}

#[test]
fn ipv4_header_checks() {
    let b = PacketBuilder::ipv4(A4, B4).udp(1, 2).payload(&[0; 8]);
    assert_eq!(
        run(&b.clone().ip_version(6)),
        Err(Malformed::Ipv4BadVersion)
    );
    assert_eq!(run(&b.clone().ihl(4)), Err(Malformed::Ipv4BadHeaderLength));
    assert_eq!(run(&b.clone().ihl(0)), Err(Malformed::Ipv4BadHeaderLength));
    // IHL 15 (60 bytes) but the datagram is 36 bytes long.
    assert_eq!(run(&b.clone().ihl(15)), Err(Malformed::Ipv4BadHeaderLength));
    assert_eq!(
        run(&b.clone().ipv4_total_len(37)),
        Err(Malformed::Ipv4Truncated)
    );
    assert_eq!(
        run(&b.clone().cut_frame(14 + 19)),
        Err(Malformed::Ipv4Truncated)
    );
    assert_eq!(run(&b.cut_frame(14 + 30)), Err(Malformed::Ipv4Truncated));
}

#[test]
fn ipv4_options_move_the_transport_header() {
    let opts = [0x94, 0x04, 0, 0, 1, 1, 1, 0];
    let p = run(&PacketBuilder::ipv4(A4, B4)
        .ipv4_options(&opts)
        .tcp(1, 2, TCP_SYN))
    .unwrap();
    assert_eq!(p.l4_offset, 14 + 28);
    assert_eq!(p.class(), PacketClass::TcpSyn);
}

#[test]
fn ethernet_padding_after_the_datagram_is_allowed() {
    let mut frame = PacketBuilder::ipv4(A4, B4).tcp(1, 2, TCP_ACK).build();
    frame.resize(60, 0);
    assert_eq!(classify(&parse(&frame[..])), PacketClass::Tcp);
}

#[test]
fn ipv4_fragments() {
    let b = PacketBuilder::ipv4(A4, B4).udp(1, 2).payload(&[0; 64]);
    let later = run(&b.clone().fragment(8, false)).unwrap();
    assert_eq!(
        later.l4,
        L4::Unparsed {
            protocol: IPPROTO_UDP
        }
    );
    assert_eq!(later.class(), PacketClass::Other);
    // A first fragment whose UDP length covers the whole datagram, not just this fragment.
    let first = run(&b.clone().fragment(0, true).udp_len(1000)).unwrap();
    assert_eq!(first.class(), PacketClass::Udp);
    assert!(matches!(
        first.l3,
        L3::Ipv4 {
            fragment: Fragment::First,
            ..
        }
    ));
    // A tiny first fragment that cuts the TCP header (RFC 1858) is malformed.
    let tiny = PacketBuilder::ipv4(A4, B4)
        .tcp(1, 2, TCP_SYN)
        .fragment(0, true)
        .cut_l4(8);
    assert_eq!(run(&tiny), Err(Malformed::TcpTruncated));
}

#[test]
fn other_ip_protocols_are_other() {
    let icmp = run(&PacketBuilder::ipv4(A4, B4).payload(&[8, 0, 0, 0])).unwrap();
    assert_eq!(
        icmp.l4,
        L4::Unparsed {
            protocol: IPPROTO_ICMP
        }
    );
    assert_eq!(icmp.class(), PacketClass::Other);
}

#[test]
fn mutated_frames_never_panic_and_offsets_stay_inside() {
    // A cheap deterministic fuzzer until the cargo-fuzz target exists: valid frames of every
    // shape with random bytes overwritten, and every prefix of each.
    let seeds = [
        PacketBuilder::ipv4(A4, B4)
            .tcp(1, 2, TCP_SYN)
            .tcp_options(&[1; 8])
            .build(),
        PacketBuilder::ipv4(A4, B4)
            .ipv4_options(&[1; 12])
            .udp(1, 2)
            .payload(&[0; 9])
            .build(),
        PacketBuilder::ipv6(A6, B6)
            .ipv6_ext(IPPROTO_HOPOPTS, 16)
            .tcp(1, 2, 0)
            .build(),
        PacketBuilder::ipv6(A6, B6)
            .fragment(0, true)
            .udp(1, 2)
            .build(),
        PacketBuilder::ipv4(A4, B4).qinq(1, 2).udp(3, 4).build(),
        PacketBuilder::arp_request().vlan(5).build(),
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..20_000usize {
        let mut frame = seeds[round % seeds.len()].clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % frame.len() as u64) as usize;
            frame[i] = next() as u8;
        }
        let cut = (next() % (frame.len() as u64 + 1)) as usize;
        for f in [&frame[..], &frame[..cut]] {
            if let Ok(p) = parse(f) {
                assert!(usize::from(p.l3_offset) <= f.len());
                if matches!(p.l4, L4::Tcp { .. } | L4::Udp { .. }) {
                    assert!(usize::from(p.l4_offset) + 8 <= f.len());
                }
            }
        }
    }
}

#[test]
fn malformed_indices_are_dense_and_in_order() {
    for (i, m) in Malformed::ALL.iter().enumerate() {
        assert_eq!(m.index() as usize, i);
    }
}
