//! `scm-proxy serve --workers N`: the supervisor that runs N proxy worker processes behind the
//! eBPF steering, keeps the worker map current, restarts dead workers, and drains on SIGHUP.
//!
//! Each worker is this same binary re-executed with the same arguments and a worker index in
//! its environment; it serves on a loopback port of its own. The supervisor takes a duplicate
//! of the worker's listening socket (pidfd_getfd), puts it in the sockmap the sk_lookup program
//! delivers from, and closes its duplicate, so the socket lives exactly as long as the worker:
//! when a worker dies the kernel drops it from the sockmap at once and new connections go to
//! the others before the supervisor has even noticed. `docs/data-plane.md` has the whole story.

use std::{
    fmt::Write as _,
    fs, io,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use proxy_common::{
    PacketClass,
    steer::{DEFAULT_V6_PREFIX, MAX_WORKERS, MIN_V6_PREFIX, SteerConfig, SteerStat, WorkerState},
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    proxy::{AuthFailure, RefusalSink, ServeArgs, config::parse_duration},
    steer::{
        SteerOptions, Steering,
        auth_failures::{AuthFailures, BlockPolicy},
        verified::{self, VerifiedSources},
    },
    xdp::{AttachMode, XdpError},
};

/// Environment variable that makes a `serve` process a worker: its slot index.
pub const WORKER_INDEX_ENV: &str = "SCM_PROXY_WORKER_INDEX";
/// The loopback address a worker listens on.
pub const WORKER_LISTEN_ENV: &str = "SCM_PROXY_WORKER_LISTEN";
/// The loopback address of a worker's own metrics endpoint.
pub const WORKER_METRICS_ENV: &str = "SCM_PROXY_WORKER_METRICS";

/// The supervisor's flags (added to `scm-proxy serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct SupervisorArgs {
    /// Run this many worker processes behind eBPF steering (needs root, or CAP_BPF,
    /// CAP_NET_ADMIN and CAP_SYS_PTRACE). Without a number: one per CPU. Without the flag:
    /// one process, no steering.
    #[arg(long, env = "SCM_PROXY_WORKERS", num_args = 0..=1, default_missing_value = "0")]
    pub workers: Option<u32>,

    /// Interface to attach the XDP program to (shield and steering before the stack). Without
    /// it, sk_lookup alone steers (it works on every interface, loopback included).
    #[arg(long, env = "SCM_PROXY_STEER_IFACE")]
    pub steer_iface: Option<String>,

    /// XDP mode on --steer-iface: native, generic or auto.
    #[arg(long, env = "SCM_PROXY_XDP_MODE", value_enum, default_value_t = AttachMode::Auto)]
    pub xdp_mode: AttachMode,

    /// bpffs directory where programs and maps are pinned, so a restarted supervisor adopts
    /// them and steering never stops.
    #[arg(long, env = "SCM_PROXY_PIN_DIR", default_value = "/sys/fs/bpf/scm")]
    pub pin_dir: PathBuf,

    /// New connections per second allowed per source (an IPv4 address, or an IPv6 prefix of
    /// --ipv6-prefix bits), a token bucket in XDP; 0: off. The default is sized for carrier
    /// NAT, where hundreds of phones share one public IPv4 address: about 250 phones (a CGNAT
    /// address split into port blocks of 256) each opening a tunnel every 5 s at the busiest
    /// is 50 per second; 100 leaves twice that. A single host flooding handshakes is still
    /// held to about 3% of the handshakes one proxy process does on two CPUs. Lower it where
    /// no device sits behind carrier NAT; raise it for a larger NAT pool (docs/data-plane.md).
    #[arg(long, env = "SCM_PROXY_CONN_RATE", default_value_t = 100)]
    pub conn_rate: u32,

    /// Burst of new connections a source may open at once before --conn-rate applies. The
    /// default lets most of a 250-phone carrier address reconnect at once after a network
    /// flap (200 at once, then --conn-rate per second).
    #[arg(long, env = "SCM_PROXY_CONN_BURST", default_value_t = 200)]
    pub conn_burst: u32,

    /// Prefix length (32 to 128) an IPv6 source is counted as by every per-source control of
    /// the data plane: the XDP rate limit, the blocklist, the authentication-failure counts
    /// and the SYN-flood verified sources. A subscriber (a phone, a household) is given a
    /// whole /64, so counting single addresses would let one device walk around every limit
    /// by changing its address; 128 counts single addresses. IPv4 sources are always single
    /// addresses (/32).
    #[arg(long, env = "SCM_PROXY_IPV6_PREFIX", default_value_t = DEFAULT_V6_PREFIX,
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_V6_PREFIX)..=128))]
    pub ipv6_prefix: u32,

    /// SYNs per second per CPU above which only verified sources may open connections
    /// (SYN-flood mode); 0: off. A source is verified when a worker accepted a connection from
    /// it (the kernel completed the TCP handshake) within --verified-ttl.
    #[arg(long, env = "SCM_PROXY_SYN_THRESHOLD", default_value_t = 0)]
    pub syn_threshold: u32,

    /// How long a completed handshake keeps a source admitted in SYN-flood mode.
    #[arg(long, env = "SCM_PROXY_VERIFIED_TTL", value_parser = parse_duration, default_value = "10m")]
    pub verified_ttl: Duration,

    /// Authentication failures (invalid session, failed channel binding) from one source (an
    /// IPv4 address or an IPv6 prefix, see --ipv6-prefix) within --block-window that block it
    /// for --block-for: under a supervisor, counted over all workers, onto the XDP blocklist; a
    /// single-process proxy (no --workers) counts garbled preambles too and answers the source's
    /// connections `rate_limited`. 0: never.
    #[arg(long, env = "SCM_PROXY_BLOCK_AFTER", default_value_t = 10)]
    pub block_after: u32,

    /// The window --block-after counts in.
    #[arg(long, env = "SCM_PROXY_BLOCK_WINDOW", value_parser = parse_duration, default_value = "60s")]
    pub block_window: Duration,

    /// How long a blocked source stays blocked.
    #[arg(long, env = "SCM_PROXY_BLOCK_FOR", value_parser = parse_duration, default_value = "10m")]
    pub block_for: Duration,

    /// On SIGHUP, how long a draining worker may take to finish its connections before it is
    /// stopped anyway.
    #[arg(long, env = "SCM_PROXY_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "300s")]
    pub drain_timeout: Duration,
}

/// What can go wrong in the supervisor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// Loading, attaching or updating the eBPF programs and maps.
    #[error(transparent)]
    Steer(#[from] XdpError),
    /// A system call or file operation.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A bad flag value.
    #[error("{0}")]
    Config(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// Which role this `serve` process has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `serve` without `--workers`: one process, no steering.
    Single,
    /// A worker started by a supervisor.
    Worker {
        /// Slot index.
        index: u32,
    },
    /// The supervisor of this many workers.
    Supervisor {
        /// Number of workers.
        workers: u32,
    },
}

/// The role of this process, from its flags and environment.
pub fn role(args: &SupervisorArgs) -> Result<Role, SupervisorError> {
    if let Ok(index) = std::env::var(WORKER_INDEX_ENV) {
        let index = index
            .parse()
            .map_err(|e| SupervisorError::Config(format!("{WORKER_INDEX_ENV}={index:?}: {e}")))?;
        return Ok(Role::Worker { index });
    }
    match args.workers {
        None => Ok(Role::Single),
        Some(0) => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            Ok(Role::Supervisor {
                workers: cpus.min(MAX_WORKERS / 2),
            })
        }
        Some(n) if n <= MAX_WORKERS / 2 => Ok(Role::Supervisor { workers: n }),
        Some(n) => Err(SupervisorError::Config(format!(
            "--workers {n}: at most {} (half the worker map, so a rolling restart has room)",
            MAX_WORKERS / 2
        ))),
    }
}

/// The serve flags of a worker: its own loopback listener and metrics endpoint, from the
/// environment the supervisor set.
pub fn worker_serve_args(mut serve: ServeArgs) -> Result<ServeArgs, SupervisorError> {
    let addr = |name: &str| -> Result<Option<SocketAddr>, SupervisorError> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .map(Some)
                .map_err(|e| SupervisorError::Config(format!("{name}={v:?}: {e}"))),
            Err(_) => Ok(None),
        }
    };
    serve.listen = addr(WORKER_LISTEN_ENV)?.ok_or_else(|| {
        SupervisorError::Config(format!(
            "{WORKER_INDEX_ENV} is set but {WORKER_LISTEN_ENV} is not"
        ))
    })?;
    serve.metrics_listen = addr(WORKER_METRICS_ENV)?;
    Ok(serve)
}

/// The per-source failure limit a single-process proxy applies itself (the same --block-*
/// flags a supervisor's workers feed the XDP blocklist with); `None` when --block-after is 0.
pub fn single_process_limit(args: &SupervisorArgs) -> Option<crate::proxy::limiter::FailurePolicy> {
    (args.block_after > 0).then_some(crate::proxy::limiter::FailurePolicy {
        threshold: args.block_after,
        window: args.block_window,
        block_for: args.block_for,
        ipv6_prefix: u8::try_from(args.ipv6_prefix).unwrap_or(128),
    })
}

/// In a worker (and with --block-after set), the sink that puts sources failing
/// authentication repeatedly on the XDP blocklist: the proxy hands it each authentication
/// failure as a typed value. `None` elsewhere, or when the pinned maps cannot be opened (said
/// in the log; the worker serves on without the shield).
pub fn blocklist_sink(args: &SupervisorArgs) -> Option<Arc<dyn RefusalSink>> {
    if std::env::var_os(WORKER_INDEX_ENV).is_none() || args.block_after == 0 {
        return None;
    }
    let policy = BlockPolicy {
        threshold: args.block_after,
        window: args.block_window,
        block_for: args.block_for,
    };
    match AuthFailures::open(&args.pin_dir, policy) {
        Ok(maps) => Some(Arc::new(Blocklist(Mutex::new(maps)))),
        Err(e) => {
            warn!(
                pin_dir = %args.pin_dir.display(),
                error = %e,
                "cannot open the blocklist; authentication failures will not block sources"
            );
            None
        }
    }
}

/// A worker's feed of the pinned blocklist.
#[derive(Debug)]
struct Blocklist(Mutex<AuthFailures>);

impl RefusalSink for Blocklist {
    fn auth_failure(&self, failure: AuthFailure) {
        let mut maps = lock(&self.0);
        let ip = failure.peer.ip();
        match maps.failure(ip) {
            Ok(true) => {
                let p = maps.policy();
                warn!(
                    source = %ip,
                    kind = failure.kind.code(),
                    "{ip} blocked for {:?} after {} authentication failures",
                    p.block_for,
                    p.threshold
                );
            }
            Ok(false) => {}
            Err(e) => warn!(source = %ip, error = %e, "recording an authentication failure"),
        }
    }
}

/// In a worker, makes every accepted connection mark its source verified for the SYN-flood
/// mode (see [`crate::steer::verified`]). Elsewhere nothing. A failure to open the pinned maps
/// is said on stderr (logging is not up yet) and the worker serves on.
pub fn install_verified_hook(args: &SupervisorArgs) {
    if std::env::var_os(WORKER_INDEX_ENV).is_none() {
        return;
    }
    match VerifiedSources::open(&args.pin_dir) {
        Ok(v) => {
            verified::install(v);
        }
        Err(e) => eprintln!(
            "scm-proxy worker: cannot open the verified-sources map in {} ({e}); in SYN-flood              mode this worker's devices will not be recognised",
            args.pin_dir.display()
        ),
    }
}

fn steer_config(serve: &ServeArgs, args: &SupervisorArgs) -> SteerConfig {
    let interval = if args.conn_rate == 0 {
        0
    } else {
        1_000_000_000 / u64::from(args.conn_rate)
    };
    SteerConfig {
        service_port: serve.listen.port().into(),
        syn_threshold: args.syn_threshold,
        conn_interval_ns: interval,
        conn_burst_ns: interval.saturating_mul(u64::from(args.conn_burst.max(1))),
        verified_ttl_ns: args.verified_ttl.as_nanos() as u64,
        v6_prefix_len: args.ipv6_prefix,
        reserved: 0,
    }
}

// ---- processes and their sockets, through /proc and pidfds ----------------------------------

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A duplicate, in this process, of descriptor `target` of the process behind `pidfd`.
fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two descriptors and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One row of /proc/<pid>/net/tcp{,6}: (local port, state, inode).
fn tcp_rows(pid: u32) -> Vec<(u16, u8, u64)> {
    let mut rows = Vec::new();
    for file in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let state = u8::from_str_radix(state, 16).ok();
            if let (Some(port), Some(state), Ok(inode)) = (port, state, inode.parse()) {
                rows.push((port, state, inode));
            }
        }
    }
    rows
}

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;

/// The socket inodes a process holds, with the descriptor numbers.
fn socket_fds(pid: u32) -> Vec<(RawFd, u64)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
            let link = fs::read_link(e.path()).ok()?;
            let inode = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
}

/// The descriptor number of the socket `pid` listens on at `port`, once it does.
fn listening_fd(pid: u32, port: u16) -> Option<RawFd> {
    let inodes: Vec<u64> = tcp_rows(pid)
        .into_iter()
        .filter(|(p, s, _)| *p == port && *s == TCP_LISTEN)
        .map(|(_, _, i)| i)
        .collect();
    socket_fds(pid)
        .into_iter()
        .find(|(_, i)| inodes.contains(i))
        .map(|(fd, _)| fd)
}

/// Device connections a worker holds: its established sockets on the service port (sk_lookup
/// keeps the service port as their local port).
pub fn device_connections(pid: u32, service_port: u16) -> usize {
    let inodes: Vec<u64> = tcp_rows(pid)
        .into_iter()
        .filter(|(p, s, _)| *p == service_port && *s == TCP_ESTABLISHED)
        .map(|(_, _, i)| i)
        .collect();
    socket_fds(pid)
        .iter()
        .filter(|(_, i)| inodes.contains(i))
        .count()
}

fn same_binary(pid: u32) -> bool {
    match (
        fs::read_link(format!("/proc/{pid}/exe")),
        std::env::current_exe(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn free_loopback_port() -> io::Result<u16> {
    Ok(StdListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn signal_pid(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

// ---- the supervisor ------------------------------------------------------------------------

struct Worker {
    pid: u32,
    /// Our own children, to reap; adopted workers (from a previous supervisor) have none.
    child: Option<Child>,
    started: Instant,
    /// Bumped on every start, so a stale exit event is recognised.
    generation: u64,
}

enum Event {
    Exited { index: u32, generation: u64 },
    Restart { index: u32 },
}

struct Supervisor {
    serve: ServeArgs,
    args: SupervisorArgs,
    steering: Arc<Mutex<Steering>>,
    workers: Vec<Option<Worker>>,
    count: u32,
    events: mpsc::UnboundedSender<Event>,
    generation: u64,
    restarts: Arc<Mutex<Vec<u64>>>,
}

fn lock<T>(s: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Supervisor {
    /// Starts the worker in slot `index` and waits until its socket is in the sockmap.
    async fn start_worker(&mut self, index: u32) -> Result<(), SupervisorError> {
        let port = free_loopback_port().map_err(io_err("finding a free loopback port"))?;
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let exe = std::env::current_exe().map_err(io_err("finding this executable"))?;
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1))
            .env(WORKER_INDEX_ENV, index.to_string())
            .env(WORKER_LISTEN_ENV, listen.to_string())
            .env_remove(WORKER_METRICS_ENV);
        if let Some(m) = self.serve.metrics_listen {
            let port = m.port().checked_add(1 + index as u16).ok_or_else(|| {
                SupervisorError::Config(format!("--metrics-listen {m}: no room for worker ports"))
            })?;
            cmd.env(
                WORKER_METRICS_ENV,
                SocketAddr::new(m.ip(), port).to_string(),
            );
        }
        let mut child = cmd.spawn().map_err(io_err(format!(
            "starting worker {index} ({})",
            exe.display()
        )))?;
        let pid = child.id();
        let pidfd = pidfd_open(pid).map_err(io_err(format!("pidfd_open of worker {index}")))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let fd = loop {
            if let Some(fd) = listening_fd(pid, port) {
                break fd;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SupervisorError::Config(format!(
                    "worker {index} (pid {pid}) exited before listening: {status}"
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SupervisorError::Config(format!(
                    "worker {index} (pid {pid}) did not listen on {listen} within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let socket = pidfd_getfd(&pidfd, fd)
            .map_err(io_err(format!("pidfd_getfd of worker {index}'s listener")))?;
        {
            let mut st = lock(&self.steering);
            st.register_socket(index, &socket)?;
            // Our duplicate closes here: the socket lives as long as the worker does.
            drop(socket);
            st.set_worker(index, WorkerState::Healthy, pid)?;
        }
        self.generation += 1;
        self.watch(index, pidfd, self.generation)?;
        info!(worker = index, pid, %listen, "worker serving");
        self.workers[index as usize] = Some(Worker {
            pid,
            child: Some(child),
            started: Instant::now(),
            generation: self.generation,
        });
        Ok(())
    }

    /// Reports the exit of the process behind `pidfd` as an event.
    fn watch(&self, index: u32, pidfd: OwnedFd, generation: u64) -> Result<(), SupervisorError> {
        // SAFETY: the AsyncFd owns the pidfd until it is dropped, so the registered
        // descriptor stays open and the same for the registration's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(|e| io_err("watching a worker's pidfd")(io::Error::from(e)))?;
        let events = self.events.clone();
        tokio::spawn(async move {
            // A pidfd turns readable when its process exits.
            let _ = fd.readable().await;
            let _ = events.send(Event::Exited { index, generation });
        });
        Ok(())
    }

    /// Adopts the workers a previous supervisor left running (their pids are in the worker
    /// map); returns the slots adopted.
    fn adopt_workers(&mut self) -> Result<Vec<u32>, SupervisorError> {
        let slots: Vec<_> = lock(&self.steering).workers().to_vec();
        let mut adopted = Vec::new();
        for (index, slot) in slots.iter().enumerate() {
            let index = index as u32;
            if !slot.is_alive() || slot.pid == 0 {
                continue;
            }
            let alive = same_binary(slot.pid) && process_runs(slot.pid);
            match pidfd_open(slot.pid).ok().filter(|_| alive) {
                Some(pidfd) if index < self.count => {
                    self.generation += 1;
                    self.watch(index, pidfd, self.generation)?;
                    self.workers[index as usize] = Some(Worker {
                        pid: slot.pid,
                        child: None,
                        started: Instant::now(),
                        generation: self.generation,
                    });
                    if !slot.is_healthy() {
                        lock(&self.steering).set_worker(index, WorkerState::Healthy, slot.pid)?;
                    }
                    info!(worker = index, pid = slot.pid, "adopted a running worker");
                    adopted.push(index);
                }
                Some(_) => {
                    // Beyond the new worker count: drain it away.
                    info!(
                        worker = index,
                        pid = slot.pid,
                        "stopping a worker beyond --workers"
                    );
                    lock(&self.steering).set_worker(index, WorkerState::Absent, 0)?;
                    signal_pid(slot.pid, nix::sys::signal::Signal::SIGTERM);
                }
                None => {
                    lock(&self.steering).set_worker(index, WorkerState::Absent, 0)?;
                }
            }
        }
        Ok(adopted)
    }

    fn on_exit(&mut self, index: u32, generation: u64) -> Result<(), SupervisorError> {
        let Some(w) = self.workers.get_mut(index as usize).and_then(Option::take) else {
            return Ok(());
        };
        if w.generation != generation {
            self.workers[index as usize] = Some(w);
            return Ok(());
        }
        let status = w.child.map(|mut c| c.wait());
        warn!(
            worker = index,
            pid = w.pid,
            ?status,
            "worker exited; restarting it"
        );
        lock(&self.steering).set_worker(index, WorkerState::Absent, 0)?;
        lock(&self.restarts)[index as usize] += 1;
        // Back off when a worker dies right after starting (a crash loop), not otherwise.
        let delay = if w.started.elapsed() < Duration::from_secs(2) {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::Restart { index });
        });
        Ok(())
    }

    async fn restart(&mut self, index: u32) {
        if self.workers[index as usize].is_some() {
            return;
        }
        if let Err(e) = self.start_worker(index).await {
            warn!(worker = index, "restart failed: {e}; trying again in 1 s");
            let events = self.events.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = events.send(Event::Restart { index });
            });
        }
    }

    /// Rolling restart: one worker at a time is drained (no new connections; its open ones
    /// finish, up to --drain-timeout), stopped, and started anew.
    async fn rolling_restart(&mut self) -> Result<(), SupervisorError> {
        let service_port = self.serve.listen.port();
        for index in 0..self.count {
            let Some(mut w) = self.workers[index as usize].take() else {
                continue;
            };
            lock(&self.steering).set_worker(index, WorkerState::Draining, w.pid)?;
            info!(worker = index, pid = w.pid, "draining");
            let deadline = Instant::now() + self.args.drain_timeout;
            loop {
                let open = device_connections(w.pid, service_port);
                if open == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    warn!(
                        worker = index,
                        open, "drain timeout; stopping it with connections open"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            signal_pid(w.pid, nix::sys::signal::Signal::SIGTERM);
            let stopped = wait_gone(w.pid, w.child.as_mut(), Duration::from_secs(10)).await;
            if !stopped {
                signal_pid(w.pid, nix::sys::signal::Signal::SIGKILL);
                wait_gone(w.pid, w.child.as_mut(), Duration::from_secs(5)).await;
            }
            lock(&self.steering).set_worker(index, WorkerState::Absent, 0)?;
            info!(worker = index, pid = w.pid, "drained and stopped");
            self.restart(index).await;
        }
        Ok(())
    }

    async fn stop_all(&mut self) {
        for (index, w) in self.workers.iter_mut().enumerate() {
            if let Some(w) = w.as_mut() {
                let _ = lock(&self.steering).set_worker(index as u32, WorkerState::Absent, 0);
                signal_pid(w.pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
        for w in self.workers.iter_mut().flatten() {
            if !wait_gone(w.pid, w.child.as_mut(), Duration::from_secs(10)).await {
                signal_pid(w.pid, nix::sys::signal::Signal::SIGKILL);
                wait_gone(w.pid, w.child.as_mut(), Duration::from_secs(5)).await;
            }
        }
    }
}

/// Whether `pid` runs; a zombie (dead, waiting for a reaper that is not us) does not.
fn process_runs(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Waits until process `pid` is gone (reaping it when it is our child).
async fn wait_gone(pid: u32, mut child: Option<&mut Child>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let gone = match child.as_deref_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_)) | Err(_)),
            None => !process_runs(pid),
        };
        if gone {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The metrics page: the kernel's counters and the workers' states.
fn render_metrics(st: &Steering, count: u32, restarts: &[u64]) -> String {
    let mut out = String::new();
    if let Ok(c) = st.counters() {
        out.push_str("# HELP scm_proxy_steer_events_total Steering and shield events counted by the eBPF programs (per-CPU counters, summed).\n# TYPE scm_proxy_steer_events_total counter\n");
        for s in SteerStat::ALL {
            let _ = writeln!(
                out,
                "scm_proxy_steer_events_total{{event=\"{}\"}} {}",
                s.name(),
                c.get(s)
            );
        }
        out.push_str("# HELP scm_proxy_steer_worker_new_flows_total New connections steered to each worker.\n# TYPE scm_proxy_steer_worker_new_flows_total counter\n");
        for w in 0..count as usize {
            let _ = writeln!(
                out,
                "scm_proxy_steer_worker_new_flows_total{{worker=\"{w}\"}} {}",
                c.worker_flows.get(w).copied().unwrap_or(0)
            );
        }
    }
    if let Ok(c) = st.ingress().counters() {
        out.push_str("# HELP scm_proxy_xdp_packets_total Frames seen by the XDP ingress program, by class.\n# TYPE scm_proxy_xdp_packets_total counter\n");
        for class in PacketClass::ALL {
            let _ = writeln!(
                out,
                "scm_proxy_xdp_packets_total{{class=\"{}\"}} {}",
                class.name(),
                c.class(class).packets
            );
        }
    }
    out.push_str("# HELP scm_proxy_worker_state Worker slot state: 0 absent, 1 healthy, 2 draining.\n# TYPE scm_proxy_worker_state gauge\n");
    for (w, slot) in st.workers().iter().enumerate().take(count as usize) {
        let _ = writeln!(
            out,
            "scm_proxy_worker_state{{worker=\"{w}\"}} {}",
            slot.state
        );
    }
    out.push_str("# HELP scm_proxy_worker_restarts_total Workers restarted after dying.\n# TYPE scm_proxy_worker_restarts_total counter\n");
    for (w, n) in restarts.iter().enumerate().take(count as usize) {
        let _ = writeln!(out, "scm_proxy_worker_restarts_total{{worker=\"{w}\"}} {n}");
    }
    out
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    steering: Arc<Mutex<Steering>>,
    restarts: Arc<Mutex<Vec<u64>>>,
    count: u32,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (steering, restarts) = (steering.clone(), restarts.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = if req.uri().path() == "/metrics" {
                        let r = restarts.lock().map(|r| r.clone()).unwrap_or_default();
                        Some(render_metrics(&lock(&steering), count, &r))
                    } else {
                        None
                    };
                    async move {
                        match body {
                            Some(b) => hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(b))),
                            None => hyper::Response::builder()
                                .status(hyper::StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n"))),
                        }
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Runs the supervisor until SIGTERM or SIGINT: loads (or adopts) the programs and maps, starts
/// (or adopts) `workers` workers, restarts dead ones, drains them one by one on SIGHUP. On
/// SIGTERM/SIGINT it stops the workers and removes the pins; killed any other way it leaves
/// them, and steering goes on until a new supervisor adopts it.
pub async fn run(
    serve: ServeArgs,
    args: SupervisorArgs,
    workers: u32,
) -> Result<(), SupervisorError> {
    let adopting = Steering::is_pinned(&args.pin_dir);
    let kernel_log = tracing::enabled!(tracing::Level::DEBUG);
    let mut steering = Steering::load(&SteerOptions {
        pin_dir: Some(args.pin_dir.clone()),
        kernel_log_level: kernel_log.then_some(aya_log::Level::Debug),
        ..SteerOptions::default()
    })?;
    if kernel_log {
        steering.forward_kernel_logs()?;
    }
    if let Some(iface) = &args.steer_iface {
        match steering.attach_xdp(iface, args.xdp_mode)? {
            Some(mode) => info!(iface, %mode, "XDP attached and pinned"),
            None => info!(iface, "pinned XDP link adopted"),
        }
    }
    let netns = fs::File::open("/proc/self/ns/net").map_err(io_err("opening /proc/self/ns/net"))?;
    steering.attach_sk_lookup(netns.as_fd())?;
    steering.set_config(&steer_config(&serve, &args))?;
    info!(
        pin_dir = %args.pin_dir.display(),
        adopting,
        service_port = serve.listen.port(),
        "steering loaded"
    );

    let steering = Arc::new(Mutex::new(steering));
    let restarts = Arc::new(Mutex::new(vec![0u64; MAX_WORKERS as usize]));
    if let Some(addr) = serve.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(io_err(format!("binding the metrics listener on {addr}")))?;
        info!(%addr, "supervisor metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(
            l,
            steering.clone(),
            restarts.clone(),
            workers,
        ));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        serve,
        args,
        steering,
        workers: (0..MAX_WORKERS).map(|_| None).collect(),
        count: workers,
        events: tx,
        generation: 0,
        restarts,
    };
    let adopted = sup.adopt_workers()?;
    for index in 0..workers {
        if adopted.contains(&index) {
            continue;
        }
        // A worker that cannot start at all (a bad certificate, a port in use) is a
        // configuration error: say so and stop, instead of restarting it forever.
        if let Err(e) = sup.start_worker(index).await {
            sup.stop_all().await;
            if !adopting {
                let _ = Steering::unpin(&sup.args.pin_dir);
            }
            return Err(e);
        }
    }
    info!(
        workers,
        adopted = adopted.len(),
        "supervisor running; SIGHUP drains and restarts the workers one by one"
    );

    let mut hup = signal(SignalKind::hangup()).map_err(io_err("installing the SIGHUP handler"))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(io_err("installing the SIGTERM handler"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(io_err("installing the SIGINT handler"))?;
    loop {
        tokio::select! {
            Some(ev) = rx.recv() => match ev {
                Event::Exited { index, generation } => sup.on_exit(index, generation)?,
                Event::Restart { index } => sup.restart(index).await,
            },
            _ = hup.recv() => {
                info!("SIGHUP: rolling restart");
                sup.rolling_restart().await?;
                info!("rolling restart done");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping the workers and removing the pins");
    sup.stop_all().await;
    Steering::unpin(&sup.args.pin_dir).map_err(io_err("removing the pins"))?;
    Ok(())
}
