//! Feeds the XDP blocklist from the proxy's authentication failures: each worker hands every
//! authentication failure it refuses (a typed value, `proxy::refusals`, never a log line) to
//! [`AuthFailures::failure`], which counts the failures per source address in a map shared by
//! all workers (pinned) and blocks a source in the pinned blocklist once it reaches the
//! threshold within the window. An IPv6 source counts as
//! its prefix (`--ipv6-prefix`, read from the pinned configuration so the key is the one XDP
//! computes): one /64 is one source.
//!
//! Authentication failures are the refusals a device with valid credentials never causes:
//! `session_invalid` (an unknown, expired, revoked or malformed session id) and
//! `binding_failed` (a session id used on another TLS connection than its own). A preamble that
//! is cut short or garbled (`bad_preamble`), policy refusals (an app or resource not allowed)
//! and back-end trouble do not count: a device closing a connection early is no attack.

use std::{fmt, net::IpAddr, path::Path, time::Duration};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use proxy_common::steer::{AUTH_FAILS_MAP, BLOCK_MAP, FailureWindow, SourceKey, SteerConfig};

use super::{monotonic_ns, open_pinned_config, source_key};

/// When to block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockPolicy {
    /// Failures within `window` that block a source.
    pub threshold: u32,
    /// The counting window.
    pub window: Duration,
    /// How long a block lasts.
    pub block_for: Duration,
}

/// The shared failure counts and the blocklist, opened from their pins.
pub struct AuthFailures {
    fails: HashMap<MapData, SourceKey, FailureWindow>,
    block: HashMap<MapData, SourceKey, u64>,
    config: Array<MapData, SteerConfig>,
    policy: BlockPolicy,
}

impl fmt::Debug for AuthFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthFailures")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn open(dir: &Path, name: &str) -> Result<HashMap<MapData, SourceKey, u64>, MapError> {
    HashMap::try_from(Map::LruHashMap(MapData::from_pin(dir.join(name))?))
}

impl AuthFailures {
    /// Opens the pinned maps in `pin_dir` (the supervisor created them).
    pub fn open(pin_dir: &Path, policy: BlockPolicy) -> Result<Self, MapError> {
        let fails = HashMap::try_from(Map::LruHashMap(MapData::from_pin(
            pin_dir.join(AUTH_FAILS_MAP),
        )?))?;
        Ok(Self {
            fails,
            block: open(pin_dir, BLOCK_MAP)?,
            config: open_pinned_config(pin_dir)?,
            policy,
        })
    }

    /// When this blocks.
    pub fn policy(&self) -> BlockPolicy {
        self.policy
    }

    /// Counts one authentication failure from `addr`; blocks it when that reaches the
    /// threshold. Returns whether it is now blocked. Workers update the count without a lock
    /// between them: two racing failures may count as one, which only delays a block by one.
    pub fn failure(&mut self, addr: IpAddr) -> Result<bool, MapError> {
        // Read each time: a new supervisor adopting these workers may have changed the prefix.
        let key = source_key(addr, self.config.get(&0, 0)?.v6_prefix());
        let now = monotonic_ns();
        let window = self.policy.window.as_nanos() as u64;
        let mut w = match self.fails.get(&key, 0) {
            Ok(w) if now.saturating_sub(w.start_ns) < window => w,
            Ok(_) | Err(MapError::KeyNotFound) => FailureWindow {
                start_ns: now,
                count: 0,
            },
            Err(e) => return Err(e),
        };
        w.count += 1;
        if w.count >= u64::from(self.policy.threshold) {
            let expiry = now.saturating_add(self.policy.block_for.as_nanos() as u64);
            self.block.insert(key, expiry, 0)?;
            match self.fails.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
            return Ok(true);
        }
        self.fails.insert(key, w, 0)?;
        Ok(false)
    }
}
