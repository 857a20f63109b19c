//! Marks a source "verified" for the shield's SYN-flood mode once the kernel has completed a
//! TCP handshake with it: each worker writes the peer of every connection it accepts into the
//! pinned `SCM_VERIFIED` map.
//!
//! Why here and not in XDP: XDP sees only the device's segments, never the sequence number
//! our SYN+ACK carried, so an ACK it sees proves nothing (an off-path spoofer can send one for
//! any address). The kernel's TCP stack checks that the final ACK acknowledges our SYN+ACK (or
//! carries a valid SYN cookie) before a socket reaches the accept queue, so an accepted
//! connection is proof that its source address answers. docs/data-plane.md has the choice
//! against a sock_ops program.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use proxy_common::steer::{SourceKey, SteerConfig, VERIFIED_MAP};

use super::{monotonic_ns, open_pinned_config, source_key};

/// How long a worker keeps using the IPv6 prefix length it read from the configuration map
/// before reading it again (a new supervisor may change it).
const PREFIX_REFRESH: Duration = Duration::from_secs(1);

/// The pinned verified-sources map, as a worker writes it.
pub struct VerifiedSources {
    verified: HashMap<MapData, SourceKey, u64>,
    config: Array<MapData, SteerConfig>,
    prefix: Option<(u32, Instant)>,
}

impl fmt::Debug for VerifiedSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedSources")
            .field("prefix", &self.prefix.map(|(p, _)| p))
            .finish_non_exhaustive()
    }
}

impl VerifiedSources {
    /// Opens the maps the supervisor pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            verified: HashMap::try_from(Map::LruHashMap(MapData::from_pin(
                pin_dir.join(VERIFIED_MAP),
            )?))?,
            config: open_pinned_config(pin_dir)?,
            prefix: None,
        })
    }

    /// Records that the kernel completed a handshake with `peer` (its prefix) just now.
    pub fn handshake_completed(&mut self, peer: IpAddr) -> Result<(), MapError> {
        let prefix = match self.prefix {
            Some((p, at)) if at.elapsed() < PREFIX_REFRESH => p,
            _ => {
                let p = self.config.get(&0, 0)?.v6_prefix();
                self.prefix = Some((p, Instant::now()));
                p
            }
        };
        self.verified
            .insert(source_key(peer, prefix), monotonic_ns(), 0)
    }
}

static HOOK: OnceLock<Mutex<VerifiedSources>> = OnceLock::new();
static FAILED: AtomicBool = AtomicBool::new(false);

/// Makes [`accepted`] write into `sources` from now on (a worker calls this once at start).
/// Returns false if a hook was installed already.
pub fn install(sources: VerifiedSources) -> bool {
    HOOK.set(Mutex::new(sources)).is_ok()
}

/// The proxy's accept loop calls this for every accepted connection. Without an installed hook
/// (a single process, no steering) it does nothing.
pub fn accepted(peer: SocketAddr) {
    let Some(hook) = HOOK.get() else {
        return;
    };
    let mut sources = hook.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = sources.handshake_completed(peer.ip())
        && !FAILED.swap(true, Ordering::Relaxed)
    {
        // Once: the same failure would repeat on every connection.
        tracing::warn!(
            error = %e,
            "cannot mark accepted sources as verified; in SYN-flood mode devices will be \
             refused (said once)"
        );
    }
}
