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

use crate::counters::PacketClass;
use crate::packet::PacketBytes;

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
mod tests;
