//! The supervisor's flags (added to `scm-proxy serve`), the environment it hands its workers,
//! and what follows from them: a worker's serve flags, the single-process failure limit and the
//! steering configuration.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use proxy_common::steer::{DEFAULT_V6_PREFIX, MIN_V6_PREFIX, SteerConfig};

use super::error::SupervisorError;
use crate::{
    proxy::{FailurePolicy, ServeArgs, config::parse_duration},
    xdp::AttachMode,
};

pub use crate::worker_env::{WORKER_INDEX_ENV, WORKER_LISTEN_ENV, WORKER_METRICS_ENV};

/// The supervisor's flags (added to `scm-proxy serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct SupervisorArgs {
    /// Run this many worker processes behind eBPF steering (needs root, or CAP_BPF,
    /// CAP_PERFMON and CAP_NET_ADMIN). Without a number: one per CPU. Without the flag:
    /// one process, no steering. Signals to the supervisor: SIGHUP reloads the workers'
    /// certificate in place; SIGUSR2 replaces the workers one by one, each drained first (a
    /// binary upgrade); SIGTERM drains them all and stops.
    #[arg(long, env = "SCM_PROXY_WORKERS", num_args = 0..=1, default_missing_value = "0")]
    pub workers: Option<u32>,

    /// Interface to attach the XDP program to (shield and steering before the stack). Without
    /// it, sk_lookup alone steers (it works on every interface, loopback included).
    #[arg(long, env = "SCM_PROXY_STEER_IFACE")]
    pub steer_iface: Option<String>,

    /// XDP mode on --steer-iface: native, generic or auto (native where the driver has it,
    /// except on a veth: native XDP there turns TSO off on the peer, so auto takes generic).
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
pub fn single_process_limit(args: &SupervisorArgs) -> Option<FailurePolicy> {
    (args.block_after > 0).then_some(FailurePolicy {
        threshold: args.block_after,
        window: args.block_window,
        block_for: args.block_for,
        ipv6_prefix: u8::try_from(args.ipv6_prefix).unwrap_or(128),
    })
}

pub(super) fn steer_config(serve: &ServeArgs, args: &SupervisorArgs) -> SteerConfig {
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
