//! Steering and shield: the XDP verdict on TCP segments to the service port, and the sk_lookup
//! program that hands each new connection to the worker's listening socket.
//!
//! XDP decides (shield first, then the worker by Maglev) and records the choice in the LRU flow
//! table; sk_lookup, which the kernel runs when a segment needs a *listening* socket (the SYN),
//! delivers the connection to the recorded worker's socket. Where no XDP runs (loopback, a NIC
//! without XDP) sk_lookup makes the same choice from the same maps itself. After the handshake
//! the kernel's established-socket table keeps the flow on its worker.

use aya_ebpf::{
    EbpfContext,
    bindings::{sk_action, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{map, sk_lookup},
    maps::{Array, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, XdpContext},
};
use aya_log_ebpf::debug;
use proxy_common::{
    L3, L4, Malformed, Packet,
    parse::{IPPROTO_TCP, TCP_ACK, TCP_SYN},
    steer::{
        BLOCKLIST_SIZE, FAMILY_V4, FAMILY_V6, FLOW_TABLE_SIZE, FailureWindow, FlowEntry, FlowKey,
        MAGLEV_SIZE, MAX_WORKERS, NO_WORKER, SOURCE_TABLE_SIZE, SYN_WINDOW_NS, SourceKey,
        SteerConfig, SteerStat, SynWindow, WorkerSlot, gcra_admit, hides_service_tcp, v4_key,
    },
};

#[map]
static SCM_STEER_CONFIG: Array<SteerConfig> = Array::with_max_entries(1, 0);
#[map]
static SCM_WORKERS: Array<WorkerSlot> = Array::with_max_entries(MAX_WORKERS, 0);
#[map]
static SCM_MAGLEV: Array<u32> = Array::with_max_entries(MAGLEV_SIZE, 0);
#[map]
static SCM_FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);
#[map]
static SCM_RATE: LruHashMap<SourceKey, u64> = LruHashMap::with_max_entries(SOURCE_TABLE_SIZE, 0);
#[map]
static SCM_BLOCK: LruHashMap<SourceKey, u64> = LruHashMap::with_max_entries(BLOCKLIST_SIZE, 0);
/// Written by the workers after the kernel completed a handshake (see docs/data-plane.md);
/// XDP only reads it.
#[map]
static SCM_VERIFIED: LruHashMap<SourceKey, u64> =
    LruHashMap::with_max_entries(SOURCE_TABLE_SIZE, 0);
/// Filled and read by the workers only (authentication failures); declared here so that it is
/// created, pinned and adopted with the others.
#[map]
static SCM_AUTH_FAILS: LruHashMap<SourceKey, FailureWindow> =
    LruHashMap::with_max_entries(BLOCKLIST_SIZE, 0);
#[map]
static SCM_SYN_WINDOW: PerCpuArray<SynWindow> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SCM_STEER_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SteerStat::COUNT, 0);
#[map]
static SCM_WORKER_FLOWS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_WORKERS, 0);
#[map]
static SCM_SOCKETS: SockMap = SockMap::with_max_entries(MAX_WORKERS, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Maglev slots sk_lookup tries after the chosen worker's socket is gone.
const FALLBACK_TRIES: u32 = 8;

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array, written only by this program on this CPU.
        unsafe { *c = (*c).wrapping_add(1) };
    }
}

#[inline(always)]
fn stat(s: SteerStat) {
    bump(&SCM_STEER_STATS, s.index());
}

#[inline(always)]
fn config() -> SteerConfig {
    SCM_STEER_CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn worker(index: u32) -> WorkerSlot {
    SCM_WORKERS.get(index).copied().unwrap_or_default()
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Reads a value from an LRU/hash map by copy.
#[inline(always)]
fn lru_get<K, V: Copy>(map: &LruHashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: the pointer comes from a successful lookup and is read at once; an entry
    // replaced concurrently yields an old or new value, both valid for these plain types.
    map.get_ptr(key).map(|p| unsafe { *p })
}

/// The worker Maglev gives `key`, if it is healthy.
#[inline(always)]
fn maglev_choice(slot: u32) -> Option<u32> {
    let w = *SCM_MAGLEV.get(slot)?;
    if w != NO_WORKER && worker(w).is_healthy() {
        Some(w)
    } else {
        None
    }
}

#[inline(always)]
fn record_new_flow(key: &FlowKey, w: u32) {
    let _ = SCM_FLOWS.insert(
        key,
        FlowEntry {
            worker: w,
            flags: 0,
        },
        0,
    );
    bump(&SCM_WORKER_FLOWS, w);
}

/// The XDP verdict on a parsed frame. Only TCP to the configured service port is looked at,
/// and what might be such TCP but cannot be judged (fragments, cut-short TCP headers, IPv6
/// chains too long to follow) is dropped; everything else passes as before.
#[inline(always)]
pub fn verdict(ctx: &XdpContext, parsed: &Result<Packet, Malformed>) -> u32 {
    let cfg = config();
    if cfg.service_port == 0 {
        return xdp_action::XDP_PASS;
    }
    if hides_service_tcp(parsed, cfg.service_port) {
        stat(SteerStat::DropUnparsed);
        debug!(ctx, "scm steer: drop_unparsed");
        return xdp_action::XDP_DROP;
    }
    let Ok(packet) = parsed else {
        return xdp_action::XDP_PASS;
    };
    let L4::Tcp {
        src_port,
        dst_port,
        flags,
    } = packet.l4
    else {
        return xdp_action::XDP_PASS;
    };
    if u32::from(dst_port) != cfg.service_port {
        return xdp_action::XDP_PASS;
    }
    let (src, dst, family) = match packet.l3 {
        L3::Ipv4 { src, dst, .. } => (v4_key(src), v4_key(dst), FAMILY_V4),
        L3::Ipv6 { src, dst, .. } => (src, dst, FAMILY_V6),
        L3::NotIp { .. } => return xdp_action::XDP_PASS,
    };
    let key = FlowKey {
        src,
        dst,
        src_port,
        dst_port,
        family,
    };
    stat(SteerStat::Inspected);
    tcp_verdict(ctx, &cfg, &key, flags)
}

/// A decision, to the aya-log ring at debug level (compiled out at load time otherwise).
#[inline(always)]
fn note<C: EbpfContext>(ctx: &C, s: SteerStat, key: &FlowKey, worker: u32) {
    stat(s);
    debug!(
        ctx,
        "scm steer: {} (stat {}) source port {} worker {}",
        s.name(),
        s.index(),
        key.src_port,
        worker
    );
}

#[inline(always)]
fn tcp_verdict(ctx: &XdpContext, cfg: &SteerConfig, key: &FlowKey, flags: u8) -> u32 {
    let now = now();
    // One /64 (by default) is one source for every per-source map: a device given a /64 has
    // 2^64 addresses to walk around per-address limits with.
    let source = key.source(cfg.v6_prefix());
    if let Some(expiry) = lru_get(&SCM_BLOCK, &source) {
        if expiry > now {
            note(ctx, SteerStat::DropBlocklist, key, NO_WORKER);
            return xdp_action::XDP_DROP;
        }
        let _ = SCM_BLOCK.remove(source);
    }
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        established(key);
        return xdp_action::XDP_PASS;
    }
    if let Some(entry) = lru_get(&SCM_FLOWS, key) {
        // A retransmitted SYN, or a client reusing the port of an old connection: either way
        // a healthy worker keeps it. A draining or dead one takes no new connection, so the
        // stale entry goes and the SYN is a new flow.
        if worker(entry.worker).is_healthy() {
            stat(SteerStat::SynRetransmit);
            return xdp_action::XDP_PASS;
        }
        let _ = SCM_FLOWS.remove(key);
    }
    if cfg.syn_threshold != 0 && over_syn_threshold(cfg, now) {
        let verified = lru_get(&SCM_VERIFIED, &source)
            .is_some_and(|seen| now.saturating_sub(seen) <= cfg.verified_ttl_ns);
        if !verified {
            note(ctx, SteerStat::DropSynFlood, key, NO_WORKER);
            return xdp_action::XDP_DROP;
        }
        stat(SteerStat::SynFloodAdmitted);
    }
    if cfg.conn_interval_ns != 0 {
        let tat = lru_get(&SCM_RATE, &source).unwrap_or(0);
        match gcra_admit(tat, now, cfg.conn_interval_ns, cfg.conn_burst_ns) {
            Some(tat) => {
                let _ = SCM_RATE.insert(source, tat, 0);
            }
            None => {
                note(ctx, SteerStat::DropRateLimit, key, NO_WORKER);
                return xdp_action::XDP_DROP;
            }
        }
    }
    match maglev_choice(key.maglev_slot()) {
        Some(w) => {
            record_new_flow(key, w);
            note(ctx, SteerStat::NewFlow, key, w);
        }
        None => stat(SteerStat::NoWorker),
    }
    xdp_action::XDP_PASS
}

/// A non-SYN segment: keep the flow's record (or drop it when its worker is gone).
///
/// An ACK here proves nothing about its source: XDP sees no sequence numbers of ours, so an
/// off-path spoofer can send one for any address. Sources become verified only when a worker
/// accepted a connection the kernel completed (user space writes `SCM_VERIFIED`).
#[inline(always)]
fn established(key: &FlowKey) {
    let Some(entry) = lru_get(&SCM_FLOWS, key) else {
        stat(SteerStat::UnknownFlow);
        return;
    };
    if !worker(entry.worker).is_alive() {
        stat(SteerStat::DeadWorkerFlow);
        let _ = SCM_FLOWS.remove(key);
        return;
    }
    stat(SteerStat::Established);
}

/// Counts this SYN in the CPU's one-second window; whether the window is over the threshold.
#[inline(always)]
fn over_syn_threshold(cfg: &SteerConfig, now: u64) -> bool {
    let Some(w) = SCM_SYN_WINDOW.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU array, written only by this program on this CPU.
    unsafe {
        if now.saturating_sub((*w).start_ns) >= SYN_WINDOW_NS {
            (*w).start_ns = now;
            (*w).count = 0;
        }
        (*w).count = (*w).count.wrapping_add(1);
        (*w).count > u64::from(cfg.syn_threshold)
    }
}

/// Delivers a connection to the service port to a worker's listening socket.
#[sk_lookup]
pub fn scm_lookup(ctx: SkLookupContext) -> u32 {
    match lookup(&ctx) {
        Lookup::Blocked => sk_action::SK_DROP,
        // Let the lookup go on: when no socket was assigned the kernel's own lookup runs.
        Lookup::Pass => sk_action::SK_PASS,
    }
}

enum Lookup {
    Pass,
    /// The source is on the blocklist: where no XDP runs, sk_lookup enforces it.
    Blocked,
}

#[inline(always)]
fn lookup(ctx: &SkLookupContext) -> Lookup {
    let l = ctx.lookup;
    // SAFETY: `l` is the context pointer the kernel passed; each field is read with a load of
    // its own size at its own offset, the only context accesses the verifier allows.
    let (family, protocol, local_port, remote_port) = unsafe {
        (
            (&raw const (*l).family).read_volatile(),
            (&raw const (*l).protocol).read_volatile(),
            (&raw const (*l).local_port).read_volatile(),
            (&raw const (*l).remote_port).read_volatile(),
        )
    };
    let cfg = config();
    if protocol != u32::from(IPPROTO_TCP) || cfg.service_port == 0 || local_port != cfg.service_port
    {
        return Lookup::Pass;
    }
    let mut key = FlowKey {
        src_port: u16::from_be(remote_port),
        dst_port: local_port as u16,
        ..FlowKey::default()
    };
    if family == AF_INET {
        // SAFETY: as above; the addresses are in network byte order in memory.
        let (src, dst) = unsafe {
            (
                (&raw const (*l).remote_ip4).read_volatile(),
                (&raw const (*l).local_ip4).read_volatile(),
            )
        };
        key.src = v4_key(src.to_ne_bytes());
        key.dst = v4_key(dst.to_ne_bytes());
        key.family = FAMILY_V4;
    } else if family == AF_INET6 {
        let mut i = 0;
        while i < 4 {
            // SAFETY: as above, one 4-byte load per word.
            let (s, d) = unsafe {
                (
                    (&raw const (*l).remote_ip6[i]).read_volatile(),
                    (&raw const (*l).local_ip6[i]).read_volatile(),
                )
            };
            let (s, d) = (s.to_ne_bytes(), d.to_ne_bytes());
            let mut j = 0;
            while j < 4 {
                key.src[i * 4 + j] = s[j];
                key.dst[i * 4 + j] = d[j];
                j += 1;
            }
            i += 1;
        }
        key.family = FAMILY_V6;
    } else {
        return Lookup::Pass;
    }

    let source = key.source(cfg.v6_prefix());
    if let Some(expiry) = lru_get(&SCM_BLOCK, &source)
        && expiry > now()
    {
        note(ctx, SteerStat::DropBlocklist, &key, NO_WORKER);
        return Lookup::Blocked;
    }
    let slot = key.maglev_slot();
    // sk_lookup sees only connections being set up, so a recorded worker that is no longer
    // healthy (a port reused after that worker began draining) is not used.
    let (chosen, recorded) = match lru_get(&SCM_FLOWS, &key) {
        Some(entry) if worker(entry.worker).is_healthy() => (entry.worker, true),
        _ => match maglev_choice(slot) {
            Some(w) => {
                record_new_flow(&key, w);
                (w, false)
            }
            // The table still names a worker that just left: fall back along it below.
            None => (NO_WORKER, false),
        },
    };
    if chosen != NO_WORKER && SCM_SOCKETS.redirect_sk_lookup(ctx, chosen, 0).is_ok() {
        stat(if recorded {
            SteerStat::LookupRecorded
        } else {
            SteerStat::LookupComputed
        });
        return Lookup::Pass;
    }
    // The chosen worker's socket is gone (the kernel removes a closed socket from the sockmap
    // at once): take the next healthy worker along the Maglev table that has one.
    let mut i = 1;
    while i <= FALLBACK_TRIES {
        if let Some(w) = maglev_choice((slot + i) % MAGLEV_SIZE)
            && w != chosen
            && SCM_SOCKETS.redirect_sk_lookup(ctx, w, 0).is_ok()
        {
            let _ = SCM_FLOWS.insert(
                key,
                FlowEntry {
                    worker: w,
                    flags: 0,
                },
                0,
            );
            bump(&SCM_WORKER_FLOWS, w);
            note(ctx, SteerStat::LookupFallback, &key, w);
            return Lookup::Pass;
        }
        i += 1;
    }
    note(ctx, SteerStat::LookupNoSocket, &key, NO_WORKER);
    Lookup::Pass
}
