//! The steering and shield maps from user space: load the programs (XDP ingress and sk_lookup)
//! with their maps, pin them in bpffs so a successor adopts them, keep the worker set and the
//! Maglev table current, fill the blocklist, and read the counters.
//!
//! `docs/data-plane.md` explains the design; `tests/steer_*.rs` prove it.

pub mod auth_failures;
pub mod maglev;
pub mod verified;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockMap},
    programs::{ProgramError, SkLookup, links::FdLink},
};
use proxy_common::steer::{
    BLOCK_MAP, CONFIG_MAP, FAMILY_V4, FAMILY_V6, FLOWS_MAP, FlowEntry, FlowKey, LOOKUP_PROGRAM,
    MAGLEV_MAP, MAGLEV_SIZE, MAX_WORKERS, PINNED_MAPS, RATE_MAP, SOCKETS_MAP, STEER_STATS_MAP,
    SourceKey, SteerConfig, SteerStat, VERIFIED_MAP, WORKER_FLOWS_MAP, WORKERS_MAP, WorkerSlot,
    WorkerState, canonical_ip, v4_key,
};

use crate::xdp::{AttachMode, AttachedMode, LoadOptions, TestRunOutput, XdpError, XdpIngress};

/// Where the XDP link is pinned inside the pin directory.
pub const XDP_LINK_PIN: &str = "link-xdp";
/// Where the sk_lookup link is pinned inside the pin directory.
pub const LOOKUP_LINK_PIN: &str = "link-sk-lookup";

/// How to load.
#[derive(Clone, Debug, Default)]
pub struct SteerOptions {
    /// The kernel programs' log level (see [`LoadOptions`]).
    pub kernel_log_level: Option<aya_log::Level>,
    /// A directory in bpffs (e.g. `/sys/fs/bpf/scm`): maps found there are reused (adopted),
    /// missing ones are created and pinned there. `None`: nothing is pinned.
    pub pin_dir: Option<PathBuf>,
    /// Size of the flow table instead of [`proxy_common::steer::FLOW_TABLE_SIZE`] (tests fill small ones).
    pub flow_table_size: Option<u32>,
    /// Size of the per-source tables instead of [`proxy_common::steer::SOURCE_TABLE_SIZE`].
    pub source_table_size: Option<u32>,
}

/// Counters of the steering and the shield, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SteerCounters {
    stats: [u64; SteerStat::COUNT as usize],
    /// New flows given to each worker.
    pub worker_flows: Vec<u64>,
}

impl SteerCounters {
    /// One counter.
    pub fn get(&self, stat: SteerStat) -> u64 {
        self.stats
            .get(stat.index() as usize)
            .copied()
            .unwrap_or_default()
    }

    /// What moved since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        let mut out = self.clone();
        for (now, then) in out.stats.iter_mut().zip(earlier.stats.iter()) {
            *now = now.saturating_sub(*then);
        }
        for (now, then) in out.worker_flows.iter_mut().zip(earlier.worker_flows.iter()) {
            *now = now.saturating_sub(*then);
        }
        out
    }
}

impl fmt::Display for SteerCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in SteerStat::ALL {
            let n = self.get(s);
            if n != 0 {
                writeln!(f, "{:<20} {n:>12}", s.name())?;
            }
        }
        for (w, n) in self.worker_flows.iter().enumerate() {
            if *n != 0 {
                writeln!(f, "worker {w:<13} {n:>12}")?;
            }
        }
        Ok(())
    }
}

/// The loaded steering programs and their maps.
pub struct Steering {
    ingress: XdpIngress,
    pin_dir: Option<PathBuf>,
    workers: Vec<WorkerSlot>,
}

impl fmt::Debug for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steering")
            .field("pin_dir", &self.pin_dir)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> XdpError {
    move |source| XdpError::Map { map, source }
}

fn other(msg: String) -> XdpError {
    XdpError::Log(msg)
}

impl Steering {
    /// Loads the object (maps from `pin_dir` when pinned there, else new and pinned there) and
    /// both programs (the verifier runs). Nothing is attached yet.
    pub fn load(options: &SteerOptions) -> Result<Self, XdpError> {
        if let Some(dir) = &options.pin_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| other(format!("creating the pin directory {}: {e}", dir.display())))?;
        }
        let pins: Vec<(&'static str, PathBuf)> = match &options.pin_dir {
            Some(dir) => PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        let mut ingress = XdpIngress::load_configured(
            &LoadOptions {
                kernel_log_level: options.kernel_log_level,
            },
            |loader| {
                if let Some(n) = options.flow_table_size {
                    loader.map_max_entries(FLOWS_MAP, n);
                }
                if let Some(n) = options.source_table_size {
                    loader.map_max_entries(RATE_MAP, n);
                    loader.map_max_entries(VERIFIED_MAP, n);
                }
                for (name, path) in &pins {
                    loader.map_pin_path(name, path.as_path());
                }
            },
        )?;
        let lookup = lookup_program(&mut ingress.ebpf)?;
        lookup.load().map_err(|e| match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => XdpError::Rejected {
                program: LOOKUP_PROGRAM,
                source: io_error,
                log: verifier_log.to_string(),
            },
            e => XdpError::Program {
                action: "loading the sk_lookup program".into(),
                source: e,
            },
        })?;
        let mut steering = Self {
            ingress,
            pin_dir: options.pin_dir.clone(),
            workers: vec![WorkerSlot::default(); MAX_WORKERS as usize],
        };
        // An adopted worker map is the truth until the supervisor says otherwise.
        steering.workers = steering.read_workers()?;
        Ok(steering)
    }

    /// Whether a steering instance left its pins in `dir` (a supervisor that died).
    pub fn is_pinned(dir: &Path) -> bool {
        dir.join(XDP_LINK_PIN).exists() || dir.join(CONFIG_MAP).exists()
    }

    /// Removes every pin in `dir`: the programs detach once no process holds their links.
    pub fn unpin(dir: &Path) -> std::io::Result<()> {
        for name in PINNED_MAPS
            .iter()
            .copied()
            .chain([XDP_LINK_PIN, LOOKUP_LINK_PIN])
        {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let _ = std::fs::remove_dir(dir);
        Ok(())
    }

    /// Forwards the programs' aya-log records (see [`XdpIngress::forward_kernel_logs`]).
    pub fn forward_kernel_logs(&mut self) -> Result<(), XdpError> {
        self.ingress.forward_kernel_logs()
    }

    /// The ingress program (counters, test runs).
    pub fn ingress(&self) -> &XdpIngress {
        &self.ingress
    }

    /// Attaches XDP to `iface` (in the calling thread's network namespace). With a pin
    /// directory: when a link is already pinned there, this program replaces the one in it
    /// atomically (adoption); otherwise the new link is pinned.
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<Option<AttachedMode>, XdpError> {
        match &self.pin_dir {
            Some(dir) if dir.join(XDP_LINK_PIN).exists() => {
                self.ingress
                    .adopt_pinned_attachment(&dir.join(XDP_LINK_PIN))?;
                Ok(None)
            }
            Some(dir) => {
                let mode = self.ingress.attach(iface, mode)?;
                self.ingress.pin_attachment(&dir.join(XDP_LINK_PIN))?;
                Ok(Some(mode))
            }
            None => self.ingress.attach(iface, mode).map(Some),
        }
    }

    /// Detaches an XDP attachment this instance made without pinning.
    pub fn detach_xdp(&mut self) -> Result<(), XdpError> {
        self.ingress.detach()
    }

    /// Attaches sk_lookup to the network namespace `netns` (e.g. `/proc/self/ns/net`). With a
    /// pin directory the link is pinned; a link already pinned there is kept (it runs the same
    /// code on the same maps).
    pub fn attach_sk_lookup(&mut self, netns: impl AsFd) -> Result<(), XdpError> {
        if let Some(dir) = &self.pin_dir
            && dir.join(LOOKUP_LINK_PIN).exists()
        {
            return Ok(());
        }
        let pin = self.pin_dir.as_ref().map(|d| d.join(LOOKUP_LINK_PIN));
        let program = lookup_program(&mut self.ingress.ebpf)?;
        let id = program.attach(netns).map_err(|e| XdpError::Program {
            action: "attaching sk_lookup to the network namespace".into(),
            source: e,
        })?;
        if let Some(path) = pin {
            let link = program.take_link(id).map_err(|e| XdpError::Program {
                action: "taking the sk_lookup link".into(),
                source: e,
            })?;
            let link = FdLink::from(link);
            link.pin(&path).map_err(|e| {
                other(format!(
                    "pinning the sk_lookup link at {}: {e}",
                    path.display()
                ))
            })?;
        }
        Ok(())
    }

    /// Writes the configuration.
    pub fn set_config(&mut self, config: &SteerConfig) -> Result<(), XdpError> {
        let mut map: Array<&mut MapData, SteerConfig> = self.map_mut(CONFIG_MAP)?;
        map.set(0, config, 0).map_err(map_error(CONFIG_MAP))
    }

    /// The configuration in the map.
    pub fn config(&self) -> Result<SteerConfig, XdpError> {
        let map: Array<&MapData, SteerConfig> = self.map(CONFIG_MAP)?;
        map.get(&0, 0).map_err(map_error(CONFIG_MAP))
    }

    /// The worker slots as the map has them.
    pub fn read_workers(&self) -> Result<Vec<WorkerSlot>, XdpError> {
        let map: Array<&MapData, WorkerSlot> = self.map(WORKERS_MAP)?;
        (0..MAX_WORKERS)
            .map(|i| map.get(&i, 0).map_err(map_error(WORKERS_MAP)))
            .collect()
    }

    /// Sets one worker's state and pid, then rebuilds the Maglev table over the healthy ones.
    ///
    /// Order matters for the connections arriving meanwhile: the slot changes first, so a
    /// worker leaving is skipped by the programs (they fall back along the table) before the
    /// table is rewritten without it.
    pub fn set_worker(&mut self, index: u32, state: WorkerState, pid: u32) -> Result<(), XdpError> {
        if index >= MAX_WORKERS {
            return Err(other(format!("worker index {index} >= {MAX_WORKERS}")));
        }
        let slot = WorkerSlot {
            state: state as u32,
            pid,
        };
        {
            let mut map: Array<&mut MapData, WorkerSlot> = self.map_mut(WORKERS_MAP)?;
            map.set(index, slot, 0).map_err(map_error(WORKERS_MAP))?;
        }
        if let Some(s) = self.workers.get_mut(index as usize) {
            *s = slot;
        }
        self.rebuild_maglev()
    }

    /// The worker slots this instance last wrote or adopted.
    pub fn workers(&self) -> &[WorkerSlot] {
        &self.workers
    }

    fn rebuild_maglev(&mut self) -> Result<(), XdpError> {
        let healthy: Vec<u32> = self
            .workers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_healthy())
            .map(|(i, _)| i as u32)
            .collect();
        let table = maglev::table(&healthy);
        let current = self.maglev()?;
        let mut map: Array<&mut MapData, u32> = self.map_mut(MAGLEV_MAP)?;
        for (i, (w, old)) in table.iter().zip(current.iter()).enumerate() {
            if w != old {
                map.set(i as u32, w, 0).map_err(map_error(MAGLEV_MAP))?;
            }
        }
        Ok(())
    }

    /// The Maglev table as the map has it.
    pub fn maglev(&self) -> Result<Vec<u32>, XdpError> {
        let map: Array<&MapData, u32> = self.map(MAGLEV_MAP)?;
        (0..MAGLEV_SIZE)
            .map(|i| map.get(&i, 0).map_err(map_error(MAGLEV_MAP)))
            .collect()
    }

    /// Puts a worker's listening socket in the sockmap sk_lookup delivers to. The kernel drops
    /// the entry by itself when the socket closes (the worker died).
    pub fn register_socket(&mut self, index: u32, socket: &impl AsRawFd) -> Result<(), XdpError> {
        let mut map: SockMap<&mut MapData> = self.map_mut(SOCKETS_MAP)?;
        map.set(index, socket, 0).map_err(map_error(SOCKETS_MAP))
    }

    /// Removes a worker's socket from the sockmap (a draining worker keeps its socket open).
    pub fn unregister_socket(&mut self, index: u32) -> Result<(), XdpError> {
        let mut map: SockMap<&mut MapData> = self.map_mut(SOCKETS_MAP)?;
        match map.clear_index(&index) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            // A sockmap answers EINVAL for an empty slot (the socket closed already).
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {
                Ok(())
            }
            Err(e) => Err(map_error(SOCKETS_MAP)(e)),
        }
    }

    /// The key the shield's maps use for `addr` under the configuration in the map (IPv6 cut
    /// to its prefix).
    pub fn source_key(&self, addr: IpAddr) -> Result<SourceKey, XdpError> {
        Ok(source_key(addr, self.config()?.v6_prefix()))
    }

    /// Drops every packet from `addr` (with an IPv6 address: from its whole prefix) to the
    /// service port for `duration`.
    pub fn block(&mut self, addr: IpAddr, duration: Duration) -> Result<(), XdpError> {
        let expiry = monotonic_ns().saturating_add(duration.as_nanos() as u64);
        let key = self.source_key(addr)?;
        let mut map: HashMap<&mut MapData, SourceKey, u64> = self.map_mut(BLOCK_MAP)?;
        map.insert(key, expiry, 0).map_err(map_error(BLOCK_MAP))
    }

    /// Lifts a block.
    pub fn unblock(&mut self, addr: IpAddr) -> Result<(), XdpError> {
        let key = self.source_key(addr)?;
        let mut map: HashMap<&mut MapData, SourceKey, u64> = self.map_mut(BLOCK_MAP)?;
        match map.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(BLOCK_MAP)(e)),
        }
    }

    /// The worker a flow was given, if the flow table has it.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowEntry>, XdpError> {
        let map: HashMap<&MapData, FlowKey, FlowEntry> = self.map(FLOWS_MAP)?;
        match map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(FLOWS_MAP)(e)),
        }
    }

    /// Number of entries in the flow table now.
    pub fn flow_count(&self) -> Result<usize, XdpError> {
        let map: HashMap<&MapData, FlowKey, FlowEntry> = self.map(FLOWS_MAP)?;
        Ok(map.keys().filter(Result::is_ok).count())
    }

    /// Entries in the shield's blocklist and verified-sources maps now (their fill levels, for
    /// `scm-proxy status` and the metrics).
    pub fn shield_entries(&self) -> Result<(usize, usize), XdpError> {
        let block: HashMap<&MapData, SourceKey, u64> = self.map(BLOCK_MAP)?;
        let verified: HashMap<&MapData, SourceKey, u64> = self.map(VERIFIED_MAP)?;
        Ok((
            block.keys().filter(Result::is_ok).count(),
            verified.keys().filter(Result::is_ok).count(),
        ))
    }

    /// Marks `addr` (its prefix) verified now: a connection from it completed the TCP
    /// handshake in the kernel. Workers do this for every connection they accept
    /// ([`verified::VerifiedSources`]); this is the same write for a caller holding the maps.
    pub fn mark_verified(&mut self, addr: IpAddr) -> Result<(), XdpError> {
        let key = self.source_key(addr)?;
        let mut map: HashMap<&mut MapData, SourceKey, u64> = self.map_mut(VERIFIED_MAP)?;
        map.insert(key, monotonic_ns(), 0)
            .map_err(map_error(VERIFIED_MAP))
    }

    /// Whether the shield counts `addr` as verified (it completed a handshake).
    pub fn is_verified(&self, addr: IpAddr) -> Result<bool, XdpError> {
        let key = self.source_key(addr)?;
        let map: HashMap<&MapData, SourceKey, u64> = self.map(VERIFIED_MAP)?;
        match map.get(&key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(map_error(VERIFIED_MAP)(e)),
        }
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<SteerCounters, XdpError> {
        let mut out = SteerCounters {
            worker_flows: vec![0; MAX_WORKERS as usize],
            ..SteerCounters::default()
        };
        let stats: PerCpuArray<&MapData, u64> = self.map(STEER_STATS_MAP)?;
        for (i, slot) in out.stats.iter_mut().enumerate() {
            let v = stats
                .get(&(i as u32), 0)
                .map_err(map_error(STEER_STATS_MAP))?;
            *slot = v.iter().fold(0u64, |a, b| a.wrapping_add(*b));
        }
        let flows: PerCpuArray<&MapData, u64> = self.map(WORKER_FLOWS_MAP)?;
        for (i, slot) in out.worker_flows.iter_mut().enumerate() {
            let v = flows
                .get(&(i as u32), 0)
                .map_err(map_error(WORKER_FLOWS_MAP))?;
            *slot = v.iter().fold(0u64, |a, b| a.wrapping_add(*b));
        }
        Ok(out)
    }

    /// The sk_lookup program's run statistics (total run time, run count); zero unless
    /// `kernel.bpf_stats_enabled` is 1. The XDP program's are `ingress().run_stats()`.
    pub fn lookup_run_stats(&self) -> Result<(Duration, u64), XdpError> {
        let program: &SkLookup = self
            .ingress
            .ebpf
            .program(LOOKUP_PROGRAM)
            .ok_or(XdpError::Missing {
                kind: "program",
                name: LOOKUP_PROGRAM,
            })?
            .try_into()
            .map_err(|e| XdpError::Program {
                action: "finding the sk_lookup program".into(),
                source: e,
            })?;
        let info = program.info().map_err(|e| XdpError::Program {
            action: "reading the sk_lookup program's info".into(),
            source: e,
        })?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Runs the XDP program once on `frame` (BPF_PROG_TEST_RUN).
    pub fn test_run(&self, frame: &[u8]) -> Result<TestRunOutput, XdpError> {
        self.ingress.test_run(frame)
    }

    fn map<'a, M: TryFrom<&'a aya::maps::Map, Error = MapError>>(
        &'a self,
        name: &'static str,
    ) -> Result<M, XdpError> {
        let map = self
            .ingress
            .ebpf
            .map(name)
            .ok_or(XdpError::Missing { kind: "map", name })?;
        M::try_from(map).map_err(map_error(name))
    }

    fn map_mut<'a, M: TryFrom<&'a mut aya::maps::Map, Error = MapError>>(
        &'a mut self,
        name: &'static str,
    ) -> Result<M, XdpError> {
        let map = self
            .ingress
            .ebpf
            .map_mut(name)
            .ok_or(XdpError::Missing { kind: "map", name })?;
        M::try_from(map).map_err(map_error(name))
    }
}

fn lookup_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup, XdpError> {
    ebpf.program_mut(LOOKUP_PROGRAM)
        .ok_or(XdpError::Missing {
            kind: "program",
            name: LOOKUP_PROGRAM,
        })?
        .try_into()
        .map_err(|e| XdpError::Program {
            action: "finding the sk_lookup program".into(),
            source: e,
        })
}

/// The key the shield's maps use for `addr` with IPv6 sources cut to `v6_prefix` bits
/// ([`SteerConfig::v6_prefix`]); the same function the kernel programs key by.
pub fn source_key(addr: IpAddr, v6_prefix: u32) -> SourceKey {
    SourceKey::from_ip(addr, v6_prefix)
}

/// An address in the flow table's 16-byte form, whole (flows are never aggregated).
fn address(addr: IpAddr) -> ([u8; 16], u32) {
    match canonical_ip(addr) {
        IpAddr::V4(a) => (v4_key(a.octets()), FAMILY_V4),
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The key the flow table uses for a connection from `src` to `dst`.
pub fn flow_key(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    let ((s, family), (d, _)) = (address(src.ip()), address(dst.ip()));
    FlowKey {
        src: s,
        dst: d,
        src_port: src.port(),
        dst_port: dst.port(),
        family,
    }
}

/// The configuration map pinned in `dir`, for the workers (which never load the programs).
pub(crate) fn open_pinned_config(dir: &Path) -> Result<Array<MapData, SteerConfig>, MapError> {
    Array::try_from(aya::maps::Map::Array(MapData::from_pin(
        dir.join(CONFIG_MAP),
    )?))
}

/// `bpf_ktime_get_ns`'s clock.
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
