//! What the steering and the shield share between the kernel programs and user space: the map
//! names, the `repr(C)` key and value types, the flow hash, and the counters' layout.
//!
//! The flow hash lives here so that the XDP program, the sk_lookup program and the host tests
//! compute the very same value for a connection; so does the source key (an IPv6 source
//! aggregated to its prefix, [`SourceKey::new`]), so that what user space writes into the
//! shield's maps and what XDP looks up agree bit for bit.

use core::net::{IpAddr, Ipv6Addr};

use crate::{
    L3, L4, Malformed, Packet,
    parse::{Fragment, is_ipv6_ext},
};

/// Array (1 entry) of [`SteerConfig`], written by the supervisor.
pub const CONFIG_MAP: &str = "SCM_STEER_CONFIG";
/// Array ([`MAX_WORKERS`] entries) of [`WorkerSlot`]: the worker set the supervisor keeps.
pub const WORKERS_MAP: &str = "SCM_WORKERS";
/// Array ([`MAGLEV_SIZE`] entries) of `u32` worker indices: the Maglev lookup table over the
/// healthy workers, computed in user space. [`NO_WORKER`] where no worker is healthy.
pub const MAGLEV_MAP: &str = "SCM_MAGLEV";
/// LRU hash [`FlowKey`] -> [`FlowEntry`]: which worker each connection went to.
pub const FLOWS_MAP: &str = "SCM_FLOWS";
/// LRU hash [`SourceKey`] -> `u64`: the per-source token bucket of new connections, kept as
/// the theoretical arrival time (GCRA) in `bpf_ktime_get_ns` nanoseconds.
pub const RATE_MAP: &str = "SCM_RATE";
/// LRU hash [`SourceKey`] -> `u64` expiry in `bpf_ktime_get_ns` nanoseconds (CLOCK_MONOTONIC):
/// sources the proxy blocked after repeated authentication failures.
pub const BLOCK_MAP: &str = "SCM_BLOCK";
/// LRU hash [`SourceKey`] -> `u64` last time (ns) the source completed a TCP handshake: the
/// sources still admitted while SYN-flood mode is on. Written by user space only (a worker,
/// after the kernel completed the handshake and handed it the socket); XDP only reads it.
pub const VERIFIED_MAP: &str = "SCM_VERIFIED";
/// Per-CPU array (1 entry) of [`SynWindow`]: SYNs seen in the current one-second window.
pub const SYN_WINDOW_MAP: &str = "SCM_SYN_WINDOW";
/// Per-CPU array of `u64`, indexed by [`SteerStat`].
pub const STEER_STATS_MAP: &str = "SCM_STEER_STATS";
/// Per-CPU array of `u64`, indexed by worker: new flows given to each worker.
pub const WORKER_FLOWS_MAP: &str = "SCM_WORKER_FLOWS";
/// Sockmap ([`MAX_WORKERS`] entries): each worker's listening socket, for the sk_lookup program.
pub const SOCKETS_MAP: &str = "SCM_SOCKETS";

/// LRU hash [`SourceKey`] -> [`FailureWindow`]: authentication failures per source, counted by
/// the workers (user space only; the kernel programs never read it).
pub const AUTH_FAILS_MAP: &str = "SCM_AUTH_FAILS";

/// Every map the supervisor pins, so that a successor adopts them.
pub const PINNED_MAPS: [&str; 12] = [
    AUTH_FAILS_MAP,
    CONFIG_MAP,
    WORKERS_MAP,
    MAGLEV_MAP,
    FLOWS_MAP,
    RATE_MAP,
    BLOCK_MAP,
    VERIFIED_MAP,
    SYN_WINDOW_MAP,
    STEER_STATS_MAP,
    WORKER_FLOWS_MAP,
    SOCKETS_MAP,
];

/// Name of the sk_lookup program inside the eBPF object.
pub const LOOKUP_PROGRAM: &str = "scm_lookup";

/// Most workers a supervisor runs.
pub const MAX_WORKERS: u32 = 64;
/// Size of the Maglev table: a prime well above 100 × [`MAX_WORKERS`] / 2, so that each worker's
/// share of slots is within a few percent of even.
pub const MAGLEV_SIZE: u32 = 4099;
/// "No worker" in the Maglev table and in flow entries.
pub const NO_WORKER: u32 = u32::MAX;
/// Default size of [`FLOWS_MAP`].
pub const FLOW_TABLE_SIZE: u32 = 65_536;
/// Default size of [`RATE_MAP`] and [`VERIFIED_MAP`].
pub const SOURCE_TABLE_SIZE: u32 = 65_536;
/// Default size of [`BLOCK_MAP`].
pub const BLOCKLIST_SIZE: u32 = 16_384;

/// Default prefix length IPv6 sources are aggregated to ([`SteerConfig::v6_prefix_len`]): a
/// /64 is what one subscriber (a phone on a mobile network, a household) is given, and every
/// address in it is the same attacker's for free.
pub const DEFAULT_V6_PREFIX: u32 = 64;
/// Shortest IPv6 source prefix user space accepts: shorter ones lump whole providers together.
pub const MIN_V6_PREFIX: u32 = 32;

/// Address family values used in keys.
pub const FAMILY_V4: u32 = 4;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u32 = 6;

/// Steering and shield settings. `service_port == 0` turns both off (every frame passes
/// untouched, as before steering existed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// TCP port devices connect to, host byte order; 0 = off.
    pub service_port: u32,
    /// SYNs per second per CPU above which SYN-flood mode admits only verified sources; 0 = off.
    pub syn_threshold: u32,
    /// Token bucket: nanoseconds per new connection per source (1e9 / rate); 0 = no limit.
    pub conn_interval_ns: u64,
    /// Token bucket depth expressed in nanoseconds (burst × interval).
    pub conn_burst_ns: u64,
    /// How long a completed handshake keeps a source "verified" for SYN-flood mode.
    pub verified_ttl_ns: u64,
    /// Prefix length IPv6 sources are aggregated to by every per-source map (rate, blocklist,
    /// verified, authentication failures); 0 reads as [`DEFAULT_V6_PREFIX`], above 128 as 128.
    /// IPv4 sources are always whole addresses (/32). Read it through [`Self::v6_prefix`].
    pub v6_prefix_len: u32,
    /// Unused, zero: keeps the struct free of padding.
    pub reserved: u32,
}

impl SteerConfig {
    /// The IPv6 source prefix length in effect, 1..=128 (see [`Self::v6_prefix_len`]).
    #[inline(always)]
    pub const fn v6_prefix(&self) -> u32 {
        match self.v6_prefix_len {
            0 => DEFAULT_V6_PREFIX,
            n if n > 128 => 128,
            n => n,
        }
    }
}

/// The state of a worker slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// No worker (never started, or dead).
    Absent = 0,
    /// Gets new connections.
    Healthy = 1,
    /// Finishes its connections, gets no new ones.
    Draining = 2,
}

/// One entry of [`WORKERS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerSlot {
    /// A [`WorkerState`] discriminant.
    pub state: u32,
    /// The worker's process id (for operators; the kernel does not read it).
    pub pid: u32,
}

impl WorkerSlot {
    /// Whether this slot takes new connections.
    #[inline(always)]
    pub const fn is_healthy(&self) -> bool {
        self.state == WorkerState::Healthy as u32
    }

    /// Whether a worker process exists in this slot (healthy or draining).
    #[inline(always)]
    pub const fn is_alive(&self) -> bool {
        self.state == WorkerState::Healthy as u32 || self.state == WorkerState::Draining as u32
    }
}

/// A TCP connection as seen arriving: the device's address and port, then ours. IPv4 addresses
/// sit in the first four bytes, the rest zero. Ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Remote (device) address.
    pub src: [u8; 16],
    /// Local (proxy) address.
    pub dst: [u8; 16],
    /// Remote port.
    pub src_port: u16,
    /// Local port.
    pub dst_port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
}

/// One entry of [`FLOWS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// Worker index.
    pub worker: u32,
    /// Unused, zero. (It once marked a flow whose first ACK had been seen; an ACK proves
    /// nothing without a sequence check, so nothing is derived from it any more.)
    pub flags: u32,
}

/// A source, key of the shield's maps: an IPv4 address, or an IPv6 address cut to its prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// Address; IPv4 in the first four bytes (rest zero); IPv6 with the bits past the prefix
    /// zero.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
}

/// `addr` with every bit after the first `prefix` cleared (`prefix` ≥ 128: unchanged).
///
/// Byte by byte with constant bounds, so the eBPF verifier sees a fixed, unrolled loop.
#[inline(always)]
pub const fn mask_v6(addr: [u8; 16], prefix: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let start = (i as u32) * 8;
        let keep: u32 = if prefix >= start + 8 {
            0xff
        } else if prefix <= start {
            0
        } else {
            // 1..=7 leading bits of this byte.
            (0xff00u32 >> (prefix - start)) & 0xff
        };
        out[i] = addr[i] & keep as u8;
        i += 1;
    }
    out
}

impl SourceKey {
    /// The key of a source: IPv4 (`addr` in the first four bytes) as is, IPv6 cut to
    /// `v6_prefix` bits ([`SteerConfig::v6_prefix`]). The kernel programs and user space both
    /// build keys only through here.
    #[inline(always)]
    pub const fn new(addr: [u8; 16], family: u32, v6_prefix: u32) -> Self {
        let addr = if family == FAMILY_V6 {
            mask_v6(addr, v6_prefix)
        } else {
            addr
        };
        Self { addr, family }
    }

    /// The key of a source address as user space sees it. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, what a dual-stack socket reports for an IPv4 peer) is the IPv4
    /// address: that is what XDP sees on the wire.
    pub const fn from_ip(ip: IpAddr, v6_prefix: u32) -> Self {
        match canonical_ip(ip) {
            IpAddr::V4(a) => Self::new(v4_key(a.octets()), FAMILY_V4, v6_prefix),
            IpAddr::V6(a) => Self::new(a.octets(), FAMILY_V6, v6_prefix),
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for; any other address as is.
pub const fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(a),
        },
        v4 => v4,
    }
}

/// The source a per-source control should count `ip` as: an IPv4 address as itself, an IPv6
/// address cut to its first `v6_prefix` bits (so `2001:db8:1:2::7` at /64 is `2001:db8:1:2::`).
/// For user-space limiters keyed by `IpAddr` that must agree with the data plane's maps.
pub const fn source_prefix(ip: IpAddr, v6_prefix: u32) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V4(a) => IpAddr::V4(a),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from_octets(mask_v6(a.octets(), v6_prefix))),
    }
}

/// SYNs counted in the current window, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynWindow {
    /// Start of the window (ns).
    pub start_ns: u64,
    /// SYNs since then.
    pub count: u64,
}

/// Authentication failures of one source in the current window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailureWindow {
    /// Start of the window (ns, CLOCK_MONOTONIC).
    pub start_ns: u64,
    /// Failures since then.
    pub count: u64,
}

/// Length of a SYN-rate window.
pub const SYN_WINDOW_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `repr(C)` structs of integer fields laid out without padding (checked by
    // the layout test below), so every bit pattern is a valid value.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SteerConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::WorkerSlot {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SourceKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SynWindow {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FailureWindow {}
}

/// Counters of the steering and the shield, index into [`STEER_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SteerStat {
    /// XDP: TCP segments to the service port.
    Inspected = 0,
    /// XDP: SYNs given a worker (new flows).
    NewFlow = 1,
    /// XDP: segments of a flow in the flow table.
    Established = 2,
    /// XDP: a SYN of a flow already in the table (a retransmission): same worker.
    SynRetransmit = 3,
    /// XDP: a non-SYN segment of a flow not in the table (evicted, or older than the program).
    UnknownFlow = 4,
    /// XDP: a segment of a flow whose worker is gone; the entry is removed.
    DeadWorkerFlow = 5,
    /// XDP or sk_lookup: a new flow found no healthy worker.
    NoWorker = 6,
    /// XDP: dropped, source on the blocklist.
    DropBlocklist = 7,
    /// XDP: dropped, source over its new-connection rate.
    DropRateLimit = 8,
    /// XDP: dropped, SYN-flood mode and the source not verified.
    DropSynFlood = 9,
    /// XDP: SYN-flood mode, admitted because the source is verified.
    SynFloodAdmitted = 10,
    /// sk_lookup: connection handed to the worker XDP recorded.
    LookupRecorded = 11,
    /// sk_lookup: no XDP record (no XDP on this interface, e.g. loopback); worker chosen here.
    LookupComputed = 12,
    /// sk_lookup: the chosen worker had no socket (died); another one was taken.
    LookupFallback = 13,
    /// sk_lookup: no worker socket at all; the kernel's own lookup goes on.
    LookupNoSocket = 14,
    /// XDP: dropped, possibly TCP to the service port that the shield cannot judge: a first
    /// fragment, a cut-short TCP header, an IPv6 header chain longer than the parser follows
    /// ([`hides_service_tcp`]).
    DropUnparsed = 15,
}

impl SteerStat {
    /// Number of counters.
    pub const COUNT: u32 = 16;

    /// Every counter in index order.
    pub const ALL: [SteerStat; Self::COUNT as usize] = [
        Self::Inspected,
        Self::NewFlow,
        Self::Established,
        Self::SynRetransmit,
        Self::UnknownFlow,
        Self::DeadWorkerFlow,
        Self::NoWorker,
        Self::DropBlocklist,
        Self::DropRateLimit,
        Self::DropSynFlood,
        Self::SynFloodAdmitted,
        Self::LookupRecorded,
        Self::LookupComputed,
        Self::LookupFallback,
        Self::LookupNoSocket,
        Self::DropUnparsed,
    ];

    /// Index into [`STEER_STATS_MAP`].
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The name in tables and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Inspected => "inspected",
            Self::NewFlow => "new_flow",
            Self::Established => "established",
            Self::SynRetransmit => "syn_retransmit",
            Self::UnknownFlow => "unknown_flow",
            Self::DeadWorkerFlow => "dead_worker_flow",
            Self::NoWorker => "no_worker",
            Self::DropBlocklist => "drop_blocklist",
            Self::DropRateLimit => "drop_rate_limit",
            Self::DropSynFlood => "drop_syn_flood",
            Self::SynFloodAdmitted => "syn_flood_admitted",
            Self::LookupRecorded => "lookup_recorded",
            Self::LookupComputed => "lookup_computed",
            Self::LookupFallback => "lookup_fallback",
            Self::LookupNoSocket => "lookup_no_socket",
            Self::DropUnparsed => "drop_unparsed",
        }
    }
}

#[inline(always)]
const fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

impl FlowKey {
    /// The flow's hash (murmur3-style mixing of every field, fixed seed): the same in the XDP
    /// program, the sk_lookup program and user space.
    #[inline(always)]
    pub const fn hash(&self) -> u32 {
        let mut h = 0x5c3d_0001u32;
        h = mix(h, word(&self.src, 0));
        h = mix(h, word(&self.src, 4));
        h = mix(h, word(&self.src, 8));
        h = mix(h, word(&self.src, 12));
        h = mix(h, word(&self.dst, 0));
        h = mix(h, word(&self.dst, 4));
        h = mix(h, word(&self.dst, 8));
        h = mix(h, word(&self.dst, 12));
        h = mix(h, ((self.src_port as u32) << 16) | self.dst_port as u32);
        h = mix(h, self.family);
        // fmix32: every input bit reaches every output bit.
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    /// The flow's slot in the Maglev table.
    #[inline(always)]
    pub const fn maglev_slot(&self) -> u32 {
        self.hash() % MAGLEV_SIZE
    }

    /// The source of the flow, key of the shield's maps, IPv6 cut to `v6_prefix` bits.
    #[inline(always)]
    pub const fn source(&self, v6_prefix: u32) -> SourceKey {
        SourceKey::new(self.src, self.family, v6_prefix)
    }
}

/// Maps a v4 address into the 16-byte key form.
#[inline(always)]
pub const fn v4_key(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// Whether a frame the parser read (or gave up on) may be TCP to `service_port` that the
/// shield cannot judge, so XDP drops it instead of letting it around the shield:
///
/// - a TCP header cut short or with a bad data offset (`tcp-truncated`, `tcp-bad-data-offset`):
///   its port cannot be trusted, and in a first fragment the kernel would reassemble it into a
///   whole segment the shield never saw (RFC 1858). Whole datagrams like that the kernel drops
///   anyway, so dropping them here costs nothing;
/// - the first fragment of a TCP datagram to `service_port`: TCP never needs IP fragments
///   (IPv4 sets DF and TCP sizes segments by the MSS; IPv6 routers never fragment), so a
///   fragmented one is an evasion attempt. Later fragments carry no port and pass: without
///   their first fragment the kernel can never reassemble them;
/// - an IPv6 datagram whose extension-header chain is longer than the parser follows
///   ([`crate::parse::MAX_IPV6_EXT_HEADERS`]), unless it is a later fragment: what it carries
///   (and to which port) is unknown, and no legitimate device sends such chains.
#[inline(always)]
pub fn hides_service_tcp(parsed: &Result<Packet, Malformed>, service_port: u32) -> bool {
    let packet = match parsed {
        Err(Malformed::TcpTruncated | Malformed::TcpBadDataOffset) => return true,
        Err(_) => return false,
        Ok(p) => p,
    };
    let fragment = match packet.l3 {
        L3::Ipv4 { fragment, .. } | L3::Ipv6 { fragment, .. } => fragment,
        L3::NotIp { .. } => return false,
    };
    match packet.l4 {
        L4::Tcp { dst_port, .. } => {
            matches!(fragment, Fragment::First) && u32::from(dst_port) == service_port
        }
        L4::Unparsed { protocol } => {
            matches!(packet.l3, L3::Ipv6 { .. })
                && !matches!(fragment, Fragment::Later)
                && is_ipv6_ext(protocol)
        }
        L4::None | L4::Udp { .. } => false,
    }
}

/// The shield's decision for a new connection (a SYN) from one source, given its GCRA state:
/// `Some(new_tat)` to admit (store it), `None` to drop. Shared so the host tests check the same
/// arithmetic the kernel runs.
#[inline(always)]
pub const fn gcra_admit(tat: u64, now: u64, interval: u64, burst: u64) -> Option<u64> {
    let tat = if tat > now { tat } else { now };
    // Admit while the debt after this connection stays within the burst allowance.
    if tat - now + interval > burst {
        return None;
    }
    Some(tat + interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<SteerConfig>(), 40);
        assert_eq!(size_of::<WorkerSlot>(), 8);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowEntry>(), 8);
        assert_eq!(size_of::<SourceKey>(), 20);
        assert_eq!(size_of::<SynWindow>(), 16);
        assert_eq!(size_of::<FailureWindow>(), 16);
    }

    #[test]
    fn stat_indices_are_dense() {
        for (i, s) in SteerStat::ALL.iter().enumerate() {
            assert_eq!(s.index() as usize, i);
        }
    }

    #[test]
    fn hash_depends_on_every_field_and_spreads() {
        let base = FlowKey {
            src: v4_key([10, 0, 0, 1]),
            dst: v4_key([10, 0, 0, 2]),
            src_port: 40000,
            dst_port: 443,
            family: FAMILY_V4,
        };
        let h = base.hash();
        let mut other = base;
        other.src_port += 1;
        assert_ne!(other.hash(), h);
        other = base;
        other.dst[15] = 1;
        assert_ne!(other.hash(), h);
        other = base;
        other.family = FAMILY_V6;
        assert_ne!(other.hash(), h);
        // Consecutive source ports (what one client's connections look like) spread evenly
        // over 4 buckets: each within 10% of a quarter.
        let mut buckets = [0u32; 4];
        for port in 0..8000u16 {
            let k = FlowKey {
                src_port: 30000 + port,
                ..base
            };
            buckets[(k.hash() % 4) as usize] += 1;
        }
        for b in buckets {
            assert!((1800..=2200).contains(&b), "{buckets:?}");
        }
    }

    const V6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11, 0x22, 0x33,
        0x44,
    ];

    #[test]
    fn mask_v6_keeps_exactly_the_prefix() {
        assert_eq!(mask_v6(V6, 128), V6);
        assert_eq!(mask_v6(V6, 200), V6);
        assert_eq!(mask_v6(V6, 0), [0; 16]);
        let mut want = [0u8; 16];
        want[..8].copy_from_slice(&V6[..8]);
        assert_eq!(mask_v6(V6, 64), want);
        // A prefix inside a byte: /60 keeps the high nibble of byte 7 (0x78 -> 0x70).
        want[7] = 0x70;
        assert_eq!(mask_v6(V6, 60), want);
        // /57: one bit of byte 7 (0x78 = 0b0111_1000 -> 0).
        want[7] = 0;
        assert_eq!(mask_v6(V6, 57), want);
        // Every length: the first n bits equal the address's, the rest are zero.
        for n in 0..=128u32 {
            let m = mask_v6(V6, n);
            let (a, b) = (u128::from_be_bytes(V6), u128::from_be_bytes(m));
            let keep = if n == 0 { 0 } else { u128::MAX << (128 - n) };
            assert_eq!(b, a & keep, "/{n}");
        }
    }

    #[test]
    fn source_keys_aggregate_ipv6_only() {
        let mut same = V6;
        same[15] = 0x99;
        same[8] = 0;
        let mut other = V6;
        other[7] ^= 1;
        let k = |a| SourceKey::new(a, FAMILY_V6, 64);
        assert_eq!(k(V6), k(same), "two addresses in one /64 share a key");
        assert_ne!(k(V6), k(other), "another /64 has its own key");
        assert_ne!(
            SourceKey::new(V6, FAMILY_V6, 128),
            SourceKey::new(same, FAMILY_V6, 128)
        );
        // IPv4 stays a whole address whatever the IPv6 prefix.
        let a = SourceKey::new(v4_key([198, 51, 100, 1]), FAMILY_V4, 1);
        let b = SourceKey::new(v4_key([198, 51, 100, 2]), FAMILY_V4, 1);
        assert_ne!(a, b);
        // The flow's source and the user-space key agree.
        let flow = FlowKey {
            src: same,
            dst: V6,
            src_port: 1,
            dst_port: 443,
            family: FAMILY_V6,
        };
        let ip = IpAddr::V6(Ipv6Addr::from(V6));
        assert_eq!(flow.source(64), SourceKey::from_ip(ip, 64));
        assert_eq!(
            source_prefix(ip, 64),
            "2001:db8:1234:5678::".parse::<IpAddr>().unwrap()
        );
        // A v4-mapped address is the IPv4 source XDP sees.
        let mapped: IpAddr = "::ffff:198.51.100.1".parse().unwrap();
        assert_eq!(SourceKey::from_ip(mapped, 64), a);
        assert_eq!(
            source_prefix(mapped, 64),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_config_prefix_defaults_to_64_and_is_clamped() {
        let mut c = SteerConfig::default();
        assert_eq!(c.v6_prefix(), DEFAULT_V6_PREFIX);
        c.v6_prefix_len = 48;
        assert_eq!(c.v6_prefix(), 48);
        c.v6_prefix_len = 1000;
        assert_eq!(c.v6_prefix(), 128);
    }

    #[test]
    fn what_the_shield_cannot_judge_is_dropped() {
        use crate::{
            parse,
            parse::{IPPROTO_DSTOPTS, MAX_IPV6_EXT_HEADERS, TCP_SYN},
            testing::PacketBuilder,
        };
        let a = [198, 51, 100, 1];
        let p = [192, 0, 2, 1];
        let judge = |b: PacketBuilder| hides_service_tcp(&parse(&b.build()[..]), 443);
        let syn = PacketBuilder::ipv4(a, p).tcp(1, 443, TCP_SYN);
        assert!(!judge(syn.clone()), "a whole SYN is judged");
        assert!(judge(syn.clone().fragment(0, true)), "first fragment");
        assert!(!judge(syn.clone().fragment(8, false)), "later fragment");
        assert!(judge(syn.clone().fragment(0, true).cut_l4(8)), "RFC 1858");
        assert!(judge(syn.clone().cut_l4(12)), "cut-short TCP header");
        assert!(judge(syn.clone().tcp_data_offset(4)), "bad data offset");
        let ssh = PacketBuilder::ipv4(a, p).tcp(1, 22, TCP_SYN);
        assert!(!judge(ssh.fragment(0, true)), "another port's fragment");
        let udp = PacketBuilder::ipv4(a, p).udp(1, 443).fragment(0, true);
        assert!(!judge(udp), "UDP");

        let v6 = PacketBuilder::ipv6(V6, V6).tcp(1, 443, TCP_SYN);
        assert!(!judge(v6.clone()));
        assert!(
            !judge(v6.clone().ipv6_ext(IPPROTO_DSTOPTS, 8)),
            "short chain"
        );
        assert!(judge(v6.clone().fragment(0, true)), "IPv6 first fragment");
        let mut long = v6.clone();
        for _ in 0..=MAX_IPV6_EXT_HEADERS {
            long = long.ipv6_ext(IPPROTO_DSTOPTS, 8);
        }
        assert!(judge(long), "a chain longer than the parser follows");
        let mut long_udp = PacketBuilder::ipv6(V6, V6).udp(1, 53);
        for _ in 0..=MAX_IPV6_EXT_HEADERS {
            long_udp = long_udp.ipv6_ext(IPPROTO_DSTOPTS, 8);
        }
        assert!(judge(long_udp), "its transport is unknown too");
        assert!(!judge(v6.fragment(3, false)), "IPv6 later fragment");
    }

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        let interval = 100; // 10 per 1000 ns
        let burst = 3 * interval;
        let mut tat = 0;
        let mut admitted = 0;
        for _ in 0..10 {
            if let Some(t) = gcra_admit(tat, 1000, interval, burst) {
                tat = t;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "a burst of 3 at one instant");
        assert!(gcra_admit(tat, 1000, interval, burst).is_none());
        // One interval later, one more.
        let t = gcra_admit(tat, 1100, interval, burst).expect("refilled");
        assert!(gcra_admit(t, 1100, interval, burst).is_none());
        // Long idle: the full burst again, not more.
        let mut tat = t;
        let mut n = 0;
        while let Some(t) = gcra_admit(tat, 1_000_000, interval, burst) {
            tat = t;
            n += 1;
            assert!(n <= 3);
        }
        assert_eq!(n, 3);
    }
}
