//! The XDP ingress program from user space: load it (the verifier runs here), attach it to an
//! interface, read its per-CPU counters, run it on test frames, detach it.
//!
//! The object is built by `build.rs` and embedded in the binary, so a deployed proxy carries the
//! exact kernel code it was tested with. Attachment goes through a BPF link where the kernel has
//! them: when this process dies, the kernel detaches the program by itself.

use std::{fmt, io};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError, PerCpuArray},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use aya_log::EbpfLogger;
use proxy_common::{
    ClassCounter, INGRESS_PROGRAM, Malformed, PacketClass,
    counters::{CLASS_STATS_MAP, MALFORMED_STATS_MAP},
};
use tracing::{debug, warn};

/// The eBPF object with every kernel program of the proxy, built for this host's endianness.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/scm-ebpf"));

/// `XDP_ABORTED`: the program failed (it also fires the `xdp:xdp_exception` tracepoint).
pub const XDP_ABORTED: u32 = 0;
/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`: the frame goes on to the kernel stack.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`.
pub const XDP_TX: u32 = 3;
/// `XDP_REDIRECT`.
pub const XDP_REDIRECT: u32 = 4;

/// How to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Driver (native) mode only: the program runs before the kernel allocates an skb. Fails on
    /// interfaces whose driver has no XDP support.
    Native,
    /// Generic (skb) mode: works on every interface, runs later and slower.
    Generic,
    /// Native, and generic with a warning when the driver refuses native mode. On a veth,
    /// generic: native XDP there turns TSO off on the peer and halves throughput into it.
    Auto,
}

/// The mode an attachment ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    /// Driver mode.
    Native,
    /// Generic (skb) mode.
    Generic,
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// What can go wrong with the XDP program. Each variant says what was being done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XdpError {
    /// The kernel refused a BPF operation for lack of privilege.
    #[error(
        "{action}: permission denied (effective uid {uid}); loading and attaching XDP programs \
         needs root, or CAP_BPF plus CAP_NET_ADMIN"
    )]
    PermissionDenied {
        /// What was attempted.
        action: String,
        /// The effective uid of this process.
        uid: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// No interface by that name in the calling thread's network namespace.
    #[error("no network interface named {iface:?} in this network namespace")]
    NoSuchInterface {
        /// The name asked for.
        iface: String,
    },
    /// The verifier rejected the program.
    #[error("the kernel verifier rejected {program}: {source}\n--- verifier log ---\n{log}")]
    Rejected {
        /// Program name.
        program: &'static str,
        /// The error `BPF_PROG_LOAD` returned.
        #[source]
        source: io::Error,
        /// The verifier's log.
        log: String,
    },
    /// The embedded object could not be parsed or its maps created.
    #[error("loading the eBPF object: {0}")]
    Object(#[source] EbpfError),
    /// The object lacks a program or map this code expects: the build is inconsistent.
    #[error("the eBPF object has no {kind} named {name}; rebuild scm-proxy")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// Another program operation failed.
    #[error("{action}: {source}")]
    Program {
        /// What was attempted.
        action: String,
        /// aya's error.
        #[source]
        source: ProgramError,
    },
    /// Reading a map failed.
    #[error("reading map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// Forwarding the program's log records failed.
    #[error("forwarding the eBPF log: {0}")]
    Log(String),
    /// `detach` without `attach`.
    #[error("the XDP program is not attached")]
    NotAttached,
    /// `attach` twice.
    #[error("the XDP program is already attached to {iface}")]
    AlreadyAttached {
        /// Where it is attached.
        iface: String,
    },
}

fn effective_uid() -> u32 {
    nix::unistd::Uid::effective().as_raw()
}

fn is_permission_error(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

/// The first `io::Error` in an error's source chain.
fn io_source<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

fn program_error(action: impl Into<String>, source: ProgramError) -> XdpError {
    let action = action.into();
    match io_source(&source).filter(|io| is_permission_error(io)) {
        Some(io) => XdpError::PermissionDenied {
            action,
            uid: effective_uid(),
            source: io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(libc::EPERM)),
        },
        None => XdpError::Program { action, source },
    }
}

/// Options for [`XdpIngress::load_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// The most verbose level of the program's own log records to emit; `None` compiles them out
    /// at load time (the verifier prunes the dead branches), which is what the fast path wants.
    /// Records reach this process only after [`XdpIngress::forward_kernel_logs`].
    pub kernel_log_level: Option<aya_log::Level>,
}

/// Counters summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressCounters {
    classes: [ClassCounter; PacketClass::COUNT as usize],
    malformed: [u64; Malformed::COUNT as usize],
}

impl IngressCounters {
    /// The counter of one class.
    pub fn class(&self, class: PacketClass) -> ClassCounter {
        self.classes
            .get(class.index() as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Malformed packets of one reason.
    pub fn malformed(&self, reason: Malformed) -> u64 {
        self.malformed
            .get(reason.index() as usize)
            .copied()
            .unwrap_or_default()
    }

    /// All classes together.
    pub fn total(&self) -> ClassCounter {
        self.classes
            .iter()
            .fold(ClassCounter::default(), |acc, c| acc.plus(*c))
    }

    /// What moved since `earlier` (a snapshot of the same maps).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut out = *self;
        for (now, then) in out.classes.iter_mut().zip(earlier.classes.iter()) {
            now.packets = now.packets.saturating_sub(then.packets);
            now.bytes = now.bytes.saturating_sub(then.bytes);
        }
        for (now, then) in out.malformed.iter_mut().zip(earlier.malformed.iter()) {
            *now = now.saturating_sub(*then);
        }
        out
    }
}

impl fmt::Display for IngressCounters {
    /// One line per class (`class packets bytes`), then the malformed reasons that are non-zero.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<10} {:>14} {:>16}", "class", "packets", "bytes")?;
        for class in PacketClass::ALL {
            let c = self.class(class);
            writeln!(f, "{:<10} {:>14} {:>16}", class.name(), c.packets, c.bytes)?;
        }
        let total = self.total();
        write!(
            f,
            "{:<10} {:>14} {:>16}",
            "total", total.packets, total.bytes
        )?;
        for reason in Malformed::ALL {
            let n = self.malformed(reason);
            if n != 0 {
                write!(f, "\n  malformed {:<26} {:>10}", reason.name(), n)?;
            }
        }
        Ok(())
    }
}

/// The outcome of one `BPF_PROG_TEST_RUN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The XDP action the program returned (`XDP_PASS`, ...).
    pub action: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
}

struct Attachment {
    link: XdpLinkId,
    iface: String,
    mode: AttachedMode,
}

/// The loaded XDP ingress program and its maps.
pub struct XdpIngress {
    pub(crate) ebpf: Ebpf,
    attachment: Option<Attachment>,
}

impl fmt::Debug for XdpIngress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpIngress")
            .field("attached", &self.attached())
            .finish_non_exhaustive()
    }
}

impl XdpIngress {
    /// Loads the program with its log compiled out.
    pub fn load() -> Result<Self, XdpError> {
        Self::load_with(&LoadOptions::default())
    }

    /// Creates the maps and loads the program into the kernel, which runs the verifier.
    pub fn load_with(options: &LoadOptions) -> Result<Self, XdpError> {
        Self::load_configured(options, |_| {})
    }

    /// [`Self::load_with`], letting the caller set up the loader first (map sizes, pin paths).
    pub(crate) fn load_configured<'a>(
        options: &LoadOptions,
        configure: impl FnOnce(&mut EbpfLoader<'a>),
    ) -> Result<Self, XdpError> {
        // Static, so the loader may borrow it for any lifetime the caller's pin paths have.
        static LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];
        raise_memlock_limit();
        let level = options.kernel_log_level.map_or(0, |l| l as usize);
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &LEVELS[level.min(5)], true);
        configure(&mut loader);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
            match io_source(&e).filter(|io| is_permission_error(io)) {
                Some(io) => XdpError::PermissionDenied {
                    action: "creating the eBPF maps".into(),
                    uid: effective_uid(),
                    source: io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(libc::EPERM)),
                },
                None => XdpError::Object(e),
            }
        })?;
        let program = program_mut(&mut ebpf)?;
        match program.load() {
            Ok(()) => {}
            Err(ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => {
                // The verifier also answers EACCES when it rejects a program (with a log);
                // only an empty log means the caller lacks the privilege.
                if is_permission_error(&io_error) && verifier_log.to_string().trim().is_empty() {
                    return Err(XdpError::PermissionDenied {
                        action: "loading the XDP program".into(),
                        uid: effective_uid(),
                        source: io_error,
                    });
                }
                return Err(XdpError::Rejected {
                    program: INGRESS_PROGRAM,
                    source: io_error,
                    log: verifier_log.to_string(),
                });
            }
            Err(e) => {
                return Err(program_error("loading the XDP program", e));
            }
        }
        debug!(program = INGRESS_PROGRAM, "XDP program loaded");
        Ok(Self {
            ebpf,
            attachment: None,
        })
    }

    /// Forwards the program's log records to this process's `log`/`tracing` output from a task
    /// on the current tokio runtime. Has effect only with a `kernel_log_level` set at load.
    pub fn forward_kernel_logs(&mut self) -> Result<(), XdpError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| XdpError::Log(format!("no tokio runtime: {e}")))?;
        let logger = EbpfLogger::init(&mut self.ebpf).map_err(|e| XdpError::Log(e.to_string()))?;
        let mut logger = {
            let _guard = runtime.enter();
            // SAFETY: the logger owns its ring buffer's file descriptor for as long as it lives,
            // and the AsyncFd owns the logger, so the fd stays open and the same until the
            // AsyncFd is dropped.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| XdpError::Log(e.to_string()))?
        };
        runtime.spawn(async move {
            loop {
                match logger.readable_mut().await {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!("eBPF log forwarding stopped: {e}");
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// Attaches to `iface`, looked up in the calling thread's network namespace.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode, XdpError> {
        if let Some(a) = &self.attachment {
            return Err(XdpError::AlreadyAttached {
                iface: a.iface.clone(),
            });
        }
        let if_index =
            nix::net::if_::if_nametoindex(iface).map_err(|_| XdpError::NoSuchInterface {
                iface: iface.to_owned(),
            })?;
        let program = program_mut(&mut self.ebpf)?;
        let attach = |program: &mut Xdp, mode: XdpMode, name: &str| {
            program.attach_to_if_index(if_index, mode).map_err(|e| {
                program_error(
                    format!("attaching {INGRESS_PROGRAM} to {iface} in {name} mode"),
                    e,
                )
            })
        };
        let (link, attached) = match mode {
            AttachMode::Native => (
                attach(program, XdpMode::Driver, "native")?,
                AttachedMode::Native,
            ),
            AttachMode::Generic => (
                attach(program, XdpMode::Skb, "generic")?,
                AttachedMode::Generic,
            ),
            // Native XDP on a veth makes the kernel turn TSO off on its peer for as long as a
            // program is attached, whatever the program declares (veth_xdp_set, and
            // veth_fix_features keeps it off): the sending side then cuts every stream into
            // MTU-sized frames in software, each crossing the pair and the program on its own,
            // and GRO glues them together again here. That, not the program's cost, halved the
            // tunnel's upload behind steering. Generic mode leaves the peer alone: its GSO
            // super-frames arrive whole and the program, which declares multi-buffer support,
            // runs once per 64 KB instead of once per 1.5 KB.
            AttachMode::Auto if driver_name(iface).as_deref() == Some("veth") => {
                tracing::info!(
                    iface,
                    "{iface} is a veth: attaching XDP in generic (skb) mode, because native XDP \
                     on a veth turns TSO off on its peer and cuts throughput to it; pass \
                     --xdp-mode native to force driver mode"
                );
                (
                    attach(program, XdpMode::Skb, "generic")?,
                    AttachedMode::Generic,
                )
            }
            AttachMode::Auto => match attach(program, XdpMode::Driver, "native") {
                Ok(link) => (link, AttachedMode::Native),
                Err(e @ XdpError::PermissionDenied { .. }) => return Err(e),
                Err(e) => {
                    warn!(
                        "{iface}: native XDP refused ({e}); falling back to generic (skb) mode, \
                         which sees frames only after the kernel built an skb and is slower"
                    );
                    (
                        attach(program, XdpMode::Skb, "generic")?,
                        AttachedMode::Generic,
                    )
                }
            },
        };
        debug!(iface, mode = %attached, "XDP program attached");
        self.attachment = Some(Attachment {
            link,
            iface: iface.to_owned(),
            mode: attached,
        });
        Ok(attached)
    }

    /// Pins the current attachment's BPF link at `path` (in bpffs), so that the program stays
    /// attached after this process exits, and gives up managing it: dropping `self` no longer
    /// detaches. Only BPF-link attachments can be pinned (native and generic XDP on 5.9+).
    pub fn pin_attachment(&mut self, path: &std::path::Path) -> Result<(), XdpError> {
        let attachment = self.attachment.take().ok_or(XdpError::NotAttached)?;
        let program = program_mut(&mut self.ebpf)?;
        let link = program
            .take_link(attachment.link)
            .map_err(|e| program_error("taking the XDP link", e))?;
        let link = aya::programs::links::FdLink::try_from(link).map_err(|e| {
            XdpError::Log(format!(
                "the XDP attachment on {} is not a BPF link, so it cannot be pinned: {e}",
                attachment.iface
            ))
        })?;
        link.pin(path).map_err(|e| {
            XdpError::Log(format!("pinning the XDP link at {}: {e}", path.display()))
        })?;
        Ok(())
    }

    /// Replaces the program of the XDP link pinned at `path` with this one (BPF_LINK_UPDATE,
    /// atomic: no frame goes unprocessed), so a new supervisor adopts a running attachment.
    pub fn adopt_pinned_attachment(&mut self, path: &std::path::Path) -> Result<(), XdpError> {
        let pinned = aya::programs::links::PinnedLink::from_pin(path).map_err(|e| {
            XdpError::Log(format!(
                "opening the pinned XDP link {}: {e}",
                path.display()
            ))
        })?;
        let link =
            aya::programs::xdp::XdpLink::try_from(aya::programs::links::FdLink::from(pinned))
                .map_err(|e| {
                    XdpError::Log(format!("{} is not an XDP link: {e}", path.display()))
                })?;
        let program = program_mut(&mut self.ebpf)?;
        let id = program
            .attach_to_link(link)
            .map_err(|e| program_error(format!("updating the XDP link {}", path.display()), e))?;
        // Keep the link's fd out of the program's managed set: the pin holds the attachment.
        let _link = program
            .take_link(id)
            .map_err(|e| program_error("taking the XDP link", e))?;
        Ok(())
    }

    /// The interface and mode of the current attachment.
    pub fn attached(&self) -> Option<(&str, AttachedMode)> {
        self.attachment.as_ref().map(|a| (a.iface.as_str(), a.mode))
    }

    /// Detaches from the interface. Dropping an attached `XdpIngress` detaches too.
    pub fn detach(&mut self) -> Result<(), XdpError> {
        let attachment = self.attachment.take().ok_or(XdpError::NotAttached)?;
        let program = program_mut(&mut self.ebpf)?;
        program.detach(attachment.link).map_err(|e| {
            program_error(
                format!("detaching {INGRESS_PROGRAM} from {}", attachment.iface),
                e,
            )
        })?;
        debug!(iface = attachment.iface, "XDP program detached");
        Ok(())
    }

    /// The counters now, summed over CPUs.
    pub fn counters(&self) -> Result<IngressCounters, XdpError> {
        let mut out = IngressCounters::default();
        let classes: PerCpuArray<&MapData, ClassCounter> = self.per_cpu_array(CLASS_STATS_MAP)?;
        for (class, slot) in PacketClass::ALL.iter().zip(out.classes.iter_mut()) {
            let values = classes
                .get(&class.index(), 0)
                .map_err(|source| XdpError::Map {
                    map: CLASS_STATS_MAP,
                    source,
                })?;
            *slot = values
                .iter()
                .fold(ClassCounter::default(), |acc, v| acc.plus(*v));
        }
        let malformed: PerCpuArray<&MapData, u64> = self.per_cpu_array(MALFORMED_STATS_MAP)?;
        for (reason, slot) in Malformed::ALL.iter().zip(out.malformed.iter_mut()) {
            let values = malformed
                .get(&reason.index(), 0)
                .map_err(|source| XdpError::Map {
                    map: MALFORMED_STATS_MAP,
                    source,
                })?;
            *slot = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
        }
        Ok(out)
    }

    /// Runs the program once on `frame` with `BPF_PROG_TEST_RUN`, without any interface: the
    /// counters move as if the frame had arrived.
    pub fn test_run(&self, frame: &[u8]) -> Result<TestRunOutput, XdpError> {
        let program: &Xdp = self
            .ebpf
            .program(INGRESS_PROGRAM)
            .ok_or(XdpError::Missing {
                kind: "program",
                name: INGRESS_PROGRAM,
            })?
            .try_into()
            .map_err(|e| program_error("finding the XDP program", e))?;
        // Room for a program that grows the frame with bpf_xdp_adjust_tail.
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|e| {
                program_error(
                    format!(
                        "BPF_PROG_TEST_RUN of {INGRESS_PROGRAM} on a {}-byte frame",
                        frame.len()
                    ),
                    e,
                )
            })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            action: result.return_value,
            frame: out,
        })
    }

    /// Runs the program `repeat` times on `frame` in one `BPF_PROG_TEST_RUN` (katran's
    /// packet-path benchmark); returns the action and the kernel's mean time per run.
    pub fn test_run_repeat(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), XdpError> {
        let program = self.program()?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|e| program_error(format!("BPF_PROG_TEST_RUN x{repeat}"), e))?;
        Ok((result.return_value, result.duration))
    }

    /// The kernel's run statistics of the program: total run time and run count. Both stay
    /// zero unless `kernel.bpf_stats_enabled` is 1.
    pub fn run_stats(&self) -> Result<(std::time::Duration, u64), XdpError> {
        let info = self
            .program()?
            .info()
            .map_err(|e| program_error("reading the program's info", e))?;
        Ok((info.run_time(), info.run_count()))
    }

    fn program(&self) -> Result<&Xdp, XdpError> {
        self.ebpf
            .program(INGRESS_PROGRAM)
            .ok_or(XdpError::Missing {
                kind: "program",
                name: INGRESS_PROGRAM,
            })?
            .try_into()
            .map_err(|e| program_error("finding the XDP program", e))
    }

    fn per_cpu_array<V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<PerCpuArray<&MapData, V>, XdpError> {
        let map = self
            .ebpf
            .map(name)
            .ok_or(XdpError::Missing { kind: "map", name })?;
        PerCpuArray::try_from(map).map_err(|source| XdpError::Map { map: name, source })
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    ebpf.program_mut(INGRESS_PROGRAM)
        .ok_or(XdpError::Missing {
            kind: "program",
            name: INGRESS_PROGRAM,
        })?
        .try_into()
        .map_err(|e| program_error("finding the XDP program", e))
}

/// `SIOCETHTOOL`: the ethtool ioctl on any socket, in the calling thread's network namespace.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `ETHTOOL_GDRVINFO`: driver name and version.
const ETHTOOL_GDRVINFO: u32 = 0x03;
/// `ETHTOOL_GTSO`: whether TCP segmentation offload is on.
const ETHTOOL_GTSO: u32 = 0x1e;

/// `struct ifreq` with the `ifr_data` member of its union, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Runs one ethtool command on `iface`; `cmd` is the command's struct, whose first field is
/// the command number.
fn ethtool<T>(iface: &str, cmd: &mut T) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let bytes = iface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{iface:?} is not an interface name"),
        ));
    }
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
        .or_else(|_| std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)))?;
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (cmd as *mut T).cast(),
        _pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `req` is a valid, NUL-terminated ifreq whose data pointer points at `cmd`, a
    // live, writable ethtool command struct of the layout the command number in it selects;
    // both outlive the call, and the socket is open.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel driver behind `iface` ("veth", "mlx5_core", ...), in the calling thread's network
/// namespace; `None` when the interface has no ethtool driver information.
pub fn driver_name(iface: &str) -> Option<String> {
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    ethtool(iface, &mut info).ok()?;
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    let name = String::from_utf8_lossy(&info.driver[..end]).into_owned();
    (!name.is_empty()).then_some(name)
}

/// Whether TCP segmentation offload is on for `iface` (`ethtool -k`'s
/// tcp-segmentation-offload), in the calling thread's network namespace.
pub fn tso_enabled(iface: &str) -> io::Result<bool> {
    /// `struct ethtool_value`.
    #[repr(C)]
    struct Value {
        cmd: u32,
        data: u32,
    }
    let mut v = Value {
        cmd: ETHTOOL_GTSO,
        data: 0,
    };
    ethtool(iface, &mut v)?;
    Ok(v.data != 0)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones charge the cgroup and
/// ignore the limit. Raising it needs CAP_SYS_RESOURCE, which containers often lack, so failure
/// is only worth a warning: on a current kernel the load succeeds anyway.
fn raise_memlock_limit() {
    use rustix::process::{Resource, Rlimit, setrlimit};
    // `None` is RLIM_INFINITY.
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    if let Err(e) = setrlimit(Resource::Memlock, unlimited) {
        warn!(
            "raising RLIMIT_MEMLOCK failed ({}); fine on kernels >= 5.11, which account BPF \
             memory by cgroup",
            io::Error::from(e)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(udp: (u64, u64), bad_ihl: u64) -> IngressCounters {
        let mut c = IngressCounters::default();
        c.classes[PacketClass::Udp.index() as usize] = ClassCounter {
            packets: udp.0,
            bytes: udp.1,
        };
        c.classes[PacketClass::Malformed.index() as usize] = ClassCounter {
            packets: bad_ihl,
            bytes: bad_ihl * 60,
        };
        c.malformed[Malformed::Ipv4BadHeaderLength.index() as usize] = bad_ihl;
        c
    }

    #[test]
    fn since_subtracts_every_counter() {
        let moved = counters((10, 1000), 3).since(&counters((4, 400), 1));
        assert_eq!(moved, counters((6, 600), 2));
        assert_eq!(
            moved.total(),
            ClassCounter {
                packets: 8,
                bytes: 720
            }
        );
    }

    #[test]
    fn table_has_one_row_per_class_and_the_nonzero_reasons() {
        let table = counters((10, 1000), 3).to_string();
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0], ["class", "packets", "bytes"]);
        assert_eq!(rows[3], ["udp", "10", "1000"]);
        assert_eq!(rows[5], ["malformed", "3", "180"]);
        assert_eq!(rows[6], ["total", "13", "1180"]);
        assert_eq!(rows[7], ["malformed", "ipv4-bad-header-length", "3"]);
        assert_eq!(rows.len(), 8);
    }
}
