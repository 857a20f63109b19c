//! What the steering and the shield share between the kernel programs and user space: the map
//! names, the `repr(C)` key and value types, the flow hash, and the counters' layout.
//!
//! The flow hash lives here so that the XDP program, the sk_lookup program and the host tests
//! compute the very same value for a connection.

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
/// sources still admitted while SYN-flood mode is on.
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
    /// [`FLOW_ACKED`] once a non-SYN segment of the flow was seen.
    pub flags: u32,
}

/// [`FlowEntry::flags`]: the device answered our SYN+ACK, so its address is not spoofed.
pub const FLOW_ACKED: u32 = 1;

/// A source address, key of the shield's maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// Address; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
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
}

impl SteerStat {
    /// Number of counters.
    pub const COUNT: u32 = 15;

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

    /// The source of the flow, key of the shield's maps.
    #[inline(always)]
    pub const fn source(&self) -> SourceKey {
        SourceKey {
            addr: self.src,
            family: self.family,
        }
    }
}

/// Maps a v4 address into the 16-byte key form.
#[inline(always)]
pub const fn v4_key(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
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
        assert_eq!(size_of::<SteerConfig>(), 32);
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
