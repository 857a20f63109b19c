//! A packet builder for parser tests, in the style of katran's `PacketBuilder`: start from a
//! valid frame, then break exactly the field a test case is about.
//!
//! Test-only code (feature `testing`); it may allocate and it trusts its caller.

use alloc::vec::Vec;

use crate::parse::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_FRAGMENT, IPPROTO_ICMP,
    IPPROTO_TCP, IPPROTO_UDP,
};

const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

#[derive(Clone, Debug)]
enum Net {
    Raw {
        ethertype: u16,
        body: Vec<u8>,
    },
    Ipv4 {
        src: [u8; 4],
        dst: [u8; 4],
        version: u8,
        options: Vec<u8>,
        ihl: Option<u8>,
        total_len: Option<u16>,
        frag: u16,
    },
    Ipv6 {
        src: [u8; 16],
        dst: [u8; 16],
        version: u8,
        /// (header type, full header bytes without the next-header byte)
        ext: Vec<(u8, Vec<u8>)>,
        payload_len: Option<u16>,
    },
}

#[derive(Clone, Debug)]
enum Transport {
    Raw {
        protocol: u8,
    },
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
        options: Vec<u8>,
        data_offset: Option<u8>,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
        len: Option<u16>,
    },
}

impl Transport {
    fn protocol(&self) -> u8 {
        match self {
            Self::Raw { protocol } => *protocol,
            Self::Tcp { .. } => IPPROTO_TCP,
            Self::Udp { .. } => IPPROTO_UDP,
        }
    }
}

/// Builds an Ethernet frame layer by layer.
#[derive(Clone, Debug)]
pub struct PacketBuilder {
    vlans: Vec<(u16, u16)>,
    net: Net,
    transport: Transport,
    payload: Vec<u8>,
    l4_keep: Option<usize>,
    frame_keep: Option<usize>,
}

impl PacketBuilder {
    fn with_net(net: Net) -> Self {
        Self {
            vlans: Vec::new(),
            net,
            transport: Transport::Raw {
                protocol: IPPROTO_ICMP,
            },
            payload: Vec::new(),
            l4_keep: None,
            frame_keep: None,
        }
    }

    /// An IPv4 datagram carrying ICMP until a transport is chosen.
    pub fn ipv4(src: [u8; 4], dst: [u8; 4]) -> Self {
        Self::with_net(Net::Ipv4 {
            src,
            dst,
            version: 4,
            options: Vec::new(),
            ihl: None,
            total_len: None,
            frag: 0,
        })
    }

    /// An IPv6 datagram carrying ICMP's protocol number until a transport is chosen.
    pub fn ipv6(src: [u8; 16], dst: [u8; 16]) -> Self {
        Self::with_net(Net::Ipv6 {
            src,
            dst,
            version: 6,
            ext: Vec::new(),
            payload_len: None,
        })
    }

    /// A frame with any EtherType and body.
    pub fn ethertype(ethertype: u16, body: &[u8]) -> Self {
        Self::with_net(Net::Raw {
            ethertype,
            body: body.to_vec(),
        })
    }

    /// An ARP request for 10.0.0.2 from 10.0.0.1.
    pub fn arp_request() -> Self {
        let mut body = Vec::new();
        body.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
        body.extend_from_slice(&SRC_MAC);
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&[0; 6]);
        body.extend_from_slice(&[10, 0, 0, 2]);
        Self::ethertype(ETH_P_ARP, &body)
    }

    /// TCP with the given flags (`parse::TCP_SYN`, ...).
    pub fn tcp(mut self, src_port: u16, dst_port: u16, flags: u8) -> Self {
        self.transport = Transport::Tcp {
            src_port,
            dst_port,
            flags,
            options: Vec::new(),
            data_offset: None,
        };
        self
    }

    /// UDP.
    pub fn udp(mut self, src_port: u16, dst_port: u16) -> Self {
        self.transport = Transport::Udp {
            src_port,
            dst_port,
            len: None,
        };
        self
    }

    /// A transport header the parser does not read, by protocol number; no header bytes.
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.transport = Transport::Raw { protocol };
        self
    }

    /// Bytes after the transport header.
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// An 802.1Q tag (outermost first when called repeatedly).
    pub fn vlan(mut self, vid: u16) -> Self {
        self.vlans.push((ETH_P_8021Q, vid));
        self
    }

    /// An 802.1ad service tag followed by an 802.1Q customer tag.
    pub fn qinq(mut self, outer: u16, inner: u16) -> Self {
        self.vlans.push((ETH_P_8021AD, outer));
        self.vlans.push((ETH_P_8021Q, inner));
        self
    }

    /// IPv4 options (a multiple of 4 bytes for a consistent IHL).
    pub fn ipv4_options(mut self, bytes: &[u8]) -> Self {
        if let Net::Ipv4 { options, .. } = &mut self.net {
            *options = bytes.to_vec();
        }
        self
    }

    /// Overrides the IHL field (in 32-bit words).
    pub fn ihl(mut self, words: u8) -> Self {
        if let Net::Ipv4 { ihl, .. } = &mut self.net {
            *ihl = Some(words);
        }
        self
    }

    /// Overrides the IPv4 total length.
    pub fn ipv4_total_len(mut self, len: u16) -> Self {
        if let Net::Ipv4 { total_len, .. } = &mut self.net {
            *total_len = Some(len);
        }
        self
    }

    /// Overrides the IP version nibble.
    pub fn ip_version(mut self, v: u8) -> Self {
        match &mut self.net {
            Net::Ipv4 { version, .. } | Net::Ipv6 { version, .. } => *version = v,
            Net::Raw { .. } => {}
        }
        self
    }

    /// Marks the datagram as a fragment: `offset` in 8-byte units, `more` = MF.
    /// For IPv6 this adds a fragment extension header.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        let field = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
        match &mut self.net {
            Net::Ipv4 { frag, .. } => *frag = field,
            Net::Ipv6 { ext, .. } => {
                let v6 = (offset << 3) | u16::from(more);
                let mut h = Vec::new();
                h.push(0);
                h.extend_from_slice(&v6.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 1]);
                ext.push((IPPROTO_FRAGMENT, h));
            }
            Net::Raw { .. } => {}
        }
        self
    }

    /// Adds an IPv6 extension header of `kind` (hop-by-hop, routing, destination options or AH)
    /// that is `len` bytes long in total (a multiple of 8; of 4 for AH).
    pub fn ipv6_ext(mut self, kind: u8, len: usize) -> Self {
        if let Net::Ipv6 { ext, .. } = &mut self.net {
            let units = if kind == crate::parse::IPPROTO_AH {
                len / 4 - 2
            } else {
                len / 8 - 1
            };
            let mut h = Vec::new();
            h.push(units as u8);
            h.resize(len - 1, 0);
            ext.push((kind, h));
        }
        self
    }

    /// Overrides the IPv6 payload length.
    pub fn ipv6_payload_len(mut self, len: u16) -> Self {
        if let Net::Ipv6 { payload_len, .. } = &mut self.net {
            *payload_len = Some(len);
        }
        self
    }

    /// TCP options (a multiple of 4 bytes for a consistent data offset).
    pub fn tcp_options(mut self, bytes: &[u8]) -> Self {
        if let Transport::Tcp { options, .. } = &mut self.transport {
            *options = bytes.to_vec();
        }
        self
    }

    /// Overrides the TCP data offset (in 32-bit words).
    pub fn tcp_data_offset(mut self, words: u8) -> Self {
        if let Transport::Tcp { data_offset, .. } = &mut self.transport {
            *data_offset = Some(words);
        }
        self
    }

    /// Overrides the UDP length field.
    pub fn udp_len(mut self, len: u16) -> Self {
        if let Transport::Udp { len: l, .. } = &mut self.transport {
            *l = Some(len);
        }
        self
    }

    /// Keeps only the first `n` bytes of the transport segment, with IP lengths that agree:
    /// a consistent datagram whose transport header is cut.
    pub fn cut_l4(mut self, n: usize) -> Self {
        self.l4_keep = Some(n);
        self
    }

    /// Keeps only the first `n` bytes of the finished frame, lengths untouched: a frame cut in
    /// transit.
    pub fn cut_frame(mut self, n: usize) -> Self {
        self.frame_keep = Some(n);
        self
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.transport {
            Transport::Raw { .. } => {}
            Transport::Tcp {
                src_port,
                dst_port,
                flags,
                options,
                data_offset,
            } => {
                let words = data_offset.unwrap_or(((20 + options.len()) / 4) as u8);
                out.extend_from_slice(&src_port.to_be_bytes());
                out.extend_from_slice(&dst_port.to_be_bytes());
                out.extend_from_slice(&1u32.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                out.push(words << 4);
                out.push(*flags);
                out.extend_from_slice(&0xffffu16.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 0]);
                out.extend_from_slice(options);
            }
            Transport::Udp {
                src_port,
                dst_port,
                len,
            } => {
                let len = len.unwrap_or((8 + self.payload.len()) as u16);
                out.extend_from_slice(&src_port.to_be_bytes());
                out.extend_from_slice(&dst_port.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
        }
        out.extend_from_slice(&self.payload);
        if let Some(n) = self.l4_keep {
            out.truncate(n);
        }
        out
    }

    /// The finished frame.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let protocol = self.transport.protocol();
        let mut frame = Vec::new();
        frame.extend_from_slice(&DST_MAC);
        frame.extend_from_slice(&SRC_MAC);
        for (tpid, vid) in &self.vlans {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        match &self.net {
            Net::Raw { ethertype, body } => {
                frame.extend_from_slice(&ethertype.to_be_bytes());
                frame.extend_from_slice(body);
            }
            Net::Ipv4 {
                src,
                dst,
                version,
                options,
                ihl,
                total_len,
                frag,
            } => {
                frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let header_len = 20 + options.len();
                let ihl = ihl.unwrap_or((header_len / 4) as u8);
                let total = total_len.unwrap_or((header_len + l4.len()) as u16);
                let mut h = Vec::new();
                h.push((version << 4) | (ihl & 0x0f));
                h.push(0);
                h.extend_from_slice(&total.to_be_bytes());
                h.extend_from_slice(&0x1234u16.to_be_bytes());
                h.extend_from_slice(&frag.to_be_bytes());
                h.push(64);
                h.push(protocol);
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(src);
                h.extend_from_slice(dst);
                h.extend_from_slice(options);
                let sum = ipv4_checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                frame.extend_from_slice(&h);
                frame.extend_from_slice(&l4);
            }
            Net::Ipv6 {
                src,
                dst,
                version,
                ext,
                payload_len,
            } => {
                frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let ext_len: usize = ext.iter().map(|(_, h)| h.len() + 1).sum();
                let plen = payload_len.unwrap_or((ext_len + l4.len()) as u16);
                let first = ext.first().map_or(protocol, |(kind, _)| *kind);
                frame.extend_from_slice(&[version << 4, 0, 0, 0]);
                frame.extend_from_slice(&plen.to_be_bytes());
                frame.push(first);
                frame.push(64);
                frame.extend_from_slice(src);
                frame.extend_from_slice(dst);
                for (i, (_, h)) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map_or(protocol, |(kind, _)| *kind);
                    frame.push(next);
                    frame.extend_from_slice(h);
                }
                frame.extend_from_slice(&l4);
            }
        }
        if let Some(n) = self.frame_keep {
            frame.truncate(n);
        }
        frame
    }
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
