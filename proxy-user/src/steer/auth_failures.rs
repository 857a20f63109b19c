//! Feeds the XDP blocklist from the proxy's authentication failures: a `tracing` layer in each
//! worker that sees the proxy's "connection refused" events, counts the authentication failures
//! per source address in a map shared by all workers (pinned), and blocks a source in the
//! pinned blocklist once it reaches the threshold within the window. An IPv6 source counts as
//! its prefix (`--ipv6-prefix`, read from the pinned configuration so the key is the one XDP
//! computes): one /64 is one source.
//!
//! Authentication failures are the refusals a device with valid credentials never causes:
//! `session_invalid` (an unknown, expired, revoked or malformed session id) and
//! `binding_failed` (a session id used on another TLS connection than its own). A preamble that
//! is cut short or garbled (`bad_preamble`), policy refusals (an app or resource not allowed)
//! and back-end trouble do not count: a device closing a connection early is no attack.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Mutex,
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use proxy_common::steer::{AUTH_FAILS_MAP, BLOCK_MAP, FailureWindow, SourceKey, SteerConfig};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::layer::{Context, Layer};

use super::{monotonic_ns, open_pinned_config, source_key};

/// The refusal codes that count as authentication failures.
pub const AUTH_FAILURE_STATUSES: [&str; 2] = ["session_invalid", "binding_failed"];
/// The proxy's event for a refused connection (target and message), with `peer` and `status`.
const REFUSED_TARGET: &str = "scm_proxy::proxy::server";
const REFUSED_MESSAGE: &str = "connection refused";

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

/// The `tracing` layer a worker installs.
#[derive(Debug)]
pub struct AuthFailureLayer {
    inner: Mutex<AuthFailures>,
}

impl AuthFailureLayer {
    /// A layer over the maps pinned in `pin_dir`.
    pub fn new(pin_dir: &Path, policy: BlockPolicy) -> Result<Self, MapError> {
        Ok(Self {
            inner: Mutex::new(AuthFailures::open(pin_dir, policy)?),
        })
    }
}

#[derive(Default)]
struct Refused {
    message: bool,
    peer: Option<SocketAddr>,
    status: Option<String>,
}

impl Visit for Refused {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text == REFUSED_MESSAGE,
            "peer" => self.peer = text.parse().ok(),
            "status" => self.status = Some(text),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value == REFUSED_MESSAGE,
            "status" => self.status = Some(value.to_owned()),
            "peer" => self.peer = value.parse().ok(),
            _ => {}
        }
    }
}

impl<S: Subscriber> Layer<S> for AuthFailureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != REFUSED_TARGET {
            return;
        }
        let mut r = Refused::default();
        event.record(&mut r);
        let (true, Some(peer), Some(status)) = (r.message, r.peer, r.status) else {
            return;
        };
        if !AUTH_FAILURE_STATUSES.contains(&status.as_str()) {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.failure(peer.ip()) {
            // Not through `tracing`: this runs inside the subscriber.
            Ok(true) => eprintln!(
                "scm-proxy shield: {} blocked for {:?} after {} authentication failures",
                peer.ip(),
                inner.policy.block_for,
                inner.policy.threshold
            ),
            Ok(false) => {}
            Err(e) => eprintln!("scm-proxy shield: recording an authentication failure: {e}"),
        }
    }
}
