//! The ingress parser: Ethernet (802.1Q and 802.1ad tags), IPv4 (options, fragments), IPv6 (the
//! common extension headers), TCP and UDP, read through [`PacketBytes`] so it never reads past
//! the frame.
//!
//! The rules, in the order they apply (docs/data-plane.md explains why):
//! - Fewer than 14 bytes, or a VLAN tag cut short, is malformed. At most two tags are followed;
//!   a frame with a third tag is `other`, as is any EtherType that is neither IPv4 nor IPv6.
//! - IPv4: version 4, IHL at least 5, IHL*4 no larger than the total length, and the total length
//!   inside the frame (trailing Ethernet padding is allowed). Non-first fragments carry no
//!   transport header and are `other`; first fragments are parsed like whole datagrams, except
//!   that the UDP length may exceed the fragment.
//! - IPv6: version 6 and the payload length inside the frame. Hop-by-hop, routing, destination
//!   options, fragment and AH headers are skipped, at most [`MAX_IPV6_EXT_HEADERS`] of them;
//!   a longer chain, ESP, "no next header" and non-first fragments are `other`.
//! - TCP: the fixed header and all options (data offset at least 5) inside the IP datagram.
//!   SYN without ACK is `tcp-syn`, every other segment `tcp`.
//! - UDP: the 8-byte header inside the datagram and a length field that fits it.
//! - Any other IP protocol (ICMP, GRE, ...) is `other`.
//!
//! Every offset read at stays below 2^14 and every datagram end below 2^17, so the additions
//! here cannot overflow.

use crate::{PacketBytes, PacketClass};

/// Length of an Ethernet header without tags.
pub const ETH_HLEN: usize = 14;
/// Length of one 802.1Q / 802.1ad tag.
pub const VLAN_HLEN: usize = 4;
/// Tags followed before giving up: one customer tag plus one service tag (QinQ).
pub const MAX_VLAN_TAGS: u8 = 2;
/// IPv6 extension headers skipped before giving up on finding the transport header.
pub const MAX_IPV6_EXT_HEADERS: u8 = 6;

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// TPID of an 802.1Q (customer) VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// TPID of an 802.1ad (service, QinQ outer) VLAN tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IPv6 hop-by-hop options header.
pub const IPPROTO_HOPOPTS: u8 = 0;
/// IPv6 routing header.
pub const IPPROTO_ROUTING: u8 = 43;
/// IPv6 fragment header.
pub const IPPROTO_FRAGMENT: u8 = 44;
/// IPsec encapsulating security payload.
pub const IPPROTO_ESP: u8 = 50;
/// IPsec authentication header.
pub const IPPROTO_AH: u8 = 51;
/// IPv6 "no next header".
pub const IPPROTO_NONE: u8 = 59;
/// IPv6 destination options header.
pub const IPPROTO_DSTOPTS: u8 = 60;

/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP PSH flag.
pub const TCP_PSH: u8 = 0x08;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Every IPv6 extension header is at least 8 bytes long.
const IPV6_EXT_MIN_LEN: usize = 8;

/// Why a packet is malformed. The discriminant is the index into
/// [`crate::counters::MALFORMED_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Shorter than an Ethernet header.
    EthernetTruncated = 0,
    /// An 802.1Q/802.1ad tag cut short.
    VlanTruncated = 1,
    /// Shorter than an IPv4 header, or the total length runs past the frame.
    Ipv4Truncated = 2,
    /// EtherType IPv4 but the version field is not 4.
    Ipv4BadVersion = 3,
    /// IHL below 5, or the header longer than the total length.
    Ipv4BadHeaderLength = 4,
    /// Shorter than an IPv6 header, or the payload length runs past the frame.
    Ipv6Truncated = 5,
    /// EtherType IPv6 but the version field is not 6.
    Ipv6BadVersion = 6,
    /// An extension header runs past the payload.
    Ipv6ExtensionTruncated = 7,
    /// The TCP header or its options run past the datagram.
    TcpTruncated = 8,
    /// TCP data offset below 5.
    TcpBadDataOffset = 9,
    /// The UDP header runs past the datagram.
    UdpTruncated = 10,
    /// UDP length below 8 or beyond the datagram.
    UdpBadLength = 11,
}

impl Malformed {
    /// Number of reasons, the `max_entries` of [`crate::counters::MALFORMED_STATS_MAP`].
    pub const COUNT: u32 = 12;

    /// Every reason, in index order.
    pub const ALL: [Malformed; Self::COUNT as usize] = [
        Self::EthernetTruncated,
        Self::VlanTruncated,
        Self::Ipv4Truncated,
        Self::Ipv4BadVersion,
        Self::Ipv4BadHeaderLength,
        Self::Ipv6Truncated,
        Self::Ipv6BadVersion,
        Self::Ipv6ExtensionTruncated,
        Self::TcpTruncated,
        Self::TcpBadDataOffset,
        Self::UdpTruncated,
        Self::UdpBadLength,
    ];

    /// Index into [`crate::counters::MALFORMED_STATS_MAP`].
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A short name for tables and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EthernetTruncated => "ethernet-truncated",
            Self::VlanTruncated => "vlan-truncated",
            Self::Ipv4Truncated => "ipv4-truncated",
            Self::Ipv4BadVersion => "ipv4-bad-version",
            Self::Ipv4BadHeaderLength => "ipv4-bad-header-length",
            Self::Ipv6Truncated => "ipv6-truncated",
            Self::Ipv6BadVersion => "ipv6-bad-version",
            Self::Ipv6ExtensionTruncated => "ipv6-extension-truncated",
            Self::TcpTruncated => "tcp-truncated",
            Self::TcpBadDataOffset => "tcp-bad-data-offset",
            Self::UdpTruncated => "udp-truncated",
            Self::UdpBadLength => "udp-bad-length",
        }
    }
}

/// Where a datagram sits in a fragmented one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset zero with more fragments to come: carries the transport header.
    First,
    /// Non-zero offset: payload only, no transport header.
    Later,
}

/// The network layer of a parsed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L3 {
    /// Not IP, or behind more VLAN tags than the parser follows.
    NotIp {
        /// The innermost EtherType read.
        ethertype: u16,
    },
    /// IPv4.
    Ipv4 {
        /// Source address.
        src: [u8; 4],
        /// Destination address.
        dst: [u8; 4],
        /// Fragment position.
        fragment: Fragment,
    },
    /// IPv6.
    Ipv6 {
        /// Source address.
        src: [u8; 16],
        /// Destination address.
        dst: [u8; 16],
        /// Fragment position, from a fragment extension header.
        fragment: Fragment,
    },
}

/// The transport layer of a parsed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// No IP, so no transport.
    None,
    /// TCP.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// The flag byte (`TCP_SYN`, `TCP_ACK`, ...).
        flags: u8,
    },
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// A transport header the parser does not read: another protocol, a non-first fragment, or
    /// an IPv6 extension chain longer than it follows.
    Unparsed {
        /// The protocol / next-header value where parsing stopped.
        protocol: u8,
    },
}

/// A well-formed frame, as far as the parser looked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// VLAN tags skipped.
    pub vlan_tags: u8,
    /// Offset of the network header.
    pub l3_offset: u16,
    /// Offset of the transport header (meaningful when `l4` is TCP or UDP).
    pub l4_offset: u16,
    /// Network layer.
    pub l3: L3,
    /// Transport layer.
    pub l4: L4,
}

impl Packet {
    /// The class the counters use.
    #[inline(always)]
    pub const fn class(&self) -> PacketClass {
        match self.l4 {
            L4::Tcp { flags, .. } if flags & (TCP_SYN | TCP_ACK) == TCP_SYN => PacketClass::TcpSyn,
            L4::Tcp { .. } => PacketClass::Tcp,
            L4::Udp { .. } => PacketClass::Udp,
            L4::None | L4::Unparsed { .. } => PacketClass::Other,
        }
    }
}

/// The class of a parse result: its own class when well-formed, else `malformed`.
#[inline(always)]
pub const fn classify(parsed: &Result<Packet, Malformed>) -> PacketClass {
    match parsed {
        Ok(packet) => packet.class(),
        Err(_) => PacketClass::Malformed,
    }
}

#[inline(always)]
const fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

#[inline(always)]
const fn is_vlan_tpid(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// `N` bytes at `offset` that must also lie before `end` (the end of the IP datagram, which can
/// be shorter than the frame).
#[inline(always)]
fn load_within<P: PacketBytes + ?Sized, const N: usize>(
    pkt: &P,
    offset: usize,
    end: usize,
    err: Malformed,
) -> Result<[u8; N], Malformed> {
    if offset + N > end {
        return Err(err);
    }
    pkt.load::<N>(offset).ok_or(err)
}

/// Parses a frame that starts with an Ethernet header.
#[inline(always)]
pub fn parse<P: PacketBytes + ?Sized>(pkt: &P) -> Result<Packet, Malformed> {
    let eth: [u8; ETH_HLEN] = pkt.load(0).ok_or(Malformed::EthernetTruncated)?;
    let mut ethertype = be16(eth[12], eth[13]);
    let mut offset = ETH_HLEN;
    let mut vlan_tags = 0u8;
    while is_vlan_tpid(ethertype) && vlan_tags < MAX_VLAN_TAGS {
        let tag: [u8; VLAN_HLEN] = pkt.load(offset).ok_or(Malformed::VlanTruncated)?;
        ethertype = be16(tag[2], tag[3]);
        offset += VLAN_HLEN;
        vlan_tags += 1;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(pkt, offset, vlan_tags),
        ETH_P_IPV6 => parse_ipv6(pkt, offset, vlan_tags),
        _ => Ok(Packet {
            vlan_tags,
            l3_offset: offset as u16,
            l4_offset: offset as u16,
            l3: L3::NotIp { ethertype },
            l4: L4::None,
        }),
    }
}

#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(
    pkt: &P,
    offset: usize,
    vlan_tags: u8,
) -> Result<Packet, Malformed> {
    let h: [u8; IPV4_MIN_HLEN] = pkt.load(offset).ok_or(Malformed::Ipv4Truncated)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed::Ipv4BadVersion);
    }
    let header_len = usize::from(h[0] & 0x0f) * 4;
    let total_len = usize::from(be16(h[2], h[3]));
    if header_len < IPV4_MIN_HLEN || header_len > total_len {
        return Err(Malformed::Ipv4BadHeaderLength);
    }
    let end = offset + total_len;
    if end > pkt.frame_len() {
        return Err(Malformed::Ipv4Truncated);
    }
    let frag = be16(h[6], h[7]);
    let fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::Whole
    };
    let protocol = h[9];
    let l4_offset = offset + header_len;
    let l4 = if matches!(fragment, Fragment::Later) {
        L4::Unparsed { protocol }
    } else {
        parse_l4(pkt, protocol, l4_offset, end, fragment)?
    };
    Ok(Packet {
        vlan_tags,
        l3_offset: offset as u16,
        l4_offset: l4_offset as u16,
        l3: L3::Ipv4 {
            src: [h[12], h[13], h[14], h[15]],
            dst: [h[16], h[17], h[18], h[19]],
            fragment,
        },
        l4,
    })
}

/// Whether `next` names an IPv6 extension header the parser skips (hop-by-hop, routing,
/// destination options, fragment, AH). A `L4::Unparsed` with such a protocol means the chain
/// was longer than the parser follows.
#[inline(always)]
pub const fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT | IPPROTO_AH
    )
}

#[inline(always)]
fn parse_ipv6<P: PacketBytes + ?Sized>(
    pkt: &P,
    offset: usize,
    vlan_tags: u8,
) -> Result<Packet, Malformed> {
    let h: [u8; IPV6_HLEN] = pkt.load(offset).ok_or(Malformed::Ipv6Truncated)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed::Ipv6BadVersion);
    }
    let end = offset + IPV6_HLEN + usize::from(be16(h[4], h[5]));
    if end > pkt.frame_len() {
        return Err(Malformed::Ipv6Truncated);
    }
    let mut next = h[6];
    let mut l4_offset = offset + IPV6_HLEN;
    let mut fragment = Fragment::Whole;
    let mut skipped = 0u8;
    while is_ipv6_ext(next) && skipped < MAX_IPV6_EXT_HEADERS {
        let ext: [u8; IPV6_EXT_MIN_LEN] =
            load_within(pkt, l4_offset, end, Malformed::Ipv6ExtensionTruncated)?;
        let len = match next {
            IPPROTO_FRAGMENT => {
                let frag = be16(ext[2], ext[3]);
                if frag & 0xfff8 != 0 {
                    fragment = Fragment::Later;
                } else if frag & 0x0001 != 0 {
                    fragment = Fragment::First;
                }
                IPV6_EXT_MIN_LEN
            }
            IPPROTO_AH => (usize::from(ext[1]) + 2) * 4,
            _ => (usize::from(ext[1]) + 1) * 8,
        };
        if l4_offset + len > end {
            return Err(Malformed::Ipv6ExtensionTruncated);
        }
        next = ext[0];
        l4_offset += len;
        skipped += 1;
        if matches!(fragment, Fragment::Later) {
            break;
        }
    }
    let l4 = if matches!(fragment, Fragment::Later) || is_ipv6_ext(next) {
        L4::Unparsed { protocol: next }
    } else {
        parse_l4(pkt, next, l4_offset, end, fragment)?
    };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    Ok(Packet {
        vlan_tags,
        l3_offset: offset as u16,
        l4_offset: l4_offset as u16,
        l3: L3::Ipv6 { src, dst, fragment },
        l4,
    })
}

#[inline(always)]
fn parse_l4<P: PacketBytes + ?Sized>(
    pkt: &P,
    protocol: u8,
    offset: usize,
    end: usize,
    fragment: Fragment,
) -> Result<L4, Malformed> {
    match protocol {
        IPPROTO_TCP => {
            let t: [u8; TCP_MIN_HLEN] = load_within(pkt, offset, end, Malformed::TcpTruncated)?;
            let data_offset = usize::from(t[12] >> 4) * 4;
            if data_offset < TCP_MIN_HLEN {
                return Err(Malformed::TcpBadDataOffset);
            }
            if offset + data_offset > end {
                return Err(Malformed::TcpTruncated);
            }
            Ok(L4::Tcp {
                src_port: be16(t[0], t[1]),
                dst_port: be16(t[2], t[3]),
                flags: t[13],
            })
        }
        IPPROTO_UDP => {
            let u: [u8; UDP_HLEN] = load_within(pkt, offset, end, Malformed::UdpTruncated)?;
            let len = usize::from(be16(u[4], u[5]));
            // A first fragment holds only part of the datagram the length describes.
            let fits = matches!(fragment, Fragment::First) || offset + len <= end;
            if len < UDP_HLEN || !fits {
                return Err(Malformed::UdpBadLength);
            }
            Ok(L4::Udp {
                src_port: be16(u[0], u[1]),
                dst_port: be16(u[2], u[3]),
            })
        }
        _ => Ok(L4::Unparsed { protocol }),
    }
}

#[cfg(test)]
mod tests {
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
}
