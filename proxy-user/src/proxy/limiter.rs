//! The single-process proxy's per-source failure limit: repeated authentication failures
//! (`session_invalid`, `binding_failed`) and garbled preambles from one source, IPv6 sources
//! aggregated to a prefix, block that source for a while; its connections are then answered
//! `rate_limited` (status 10) without asking the Security server anything. Under a supervisor
//! the workers feed the XDP blocklist instead (`steer/auth_failures.rs`), with the same flags.
//!
//! The table is bounded: when it is full, entries whose window and block have both ended are
//! swept (at most once a second); if it is still full, failures from sources not yet in it are
//! not counted (and counted in a metric) rather than evicting anyone, so a flood of addresses
//! cannot push a blocked source out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most sources the table tracks at once.
pub(super) const MAX_SOURCES: usize = 100_000;

/// When a source is blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Failures within `window` that block a source; 0 turns the limit off.
    pub threshold: u32,
    /// The counting window.
    pub window: Duration,
    /// How long a block lasts.
    pub block_for: Duration,
    /// IPv6 sources are counted per prefix of this many bits (IPv4 per address).
    pub ipv6_prefix: u8,
}

/// The key a source is counted under: an IPv4 address, or an IPv6 address with the bits past
/// the prefix cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SourceKey(IpAddr);

impl SourceKey {
    /// The key of `addr` under a `/ipv6_prefix` aggregation (IPv4-mapped IPv6 counts as IPv4).
    pub(super) fn new(addr: IpAddr, ipv6_prefix: u8) -> Self {
        Self(proxy_common::steer::source_prefix(
            addr,
            u32::from(ipv6_prefix),
        ))
    }
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

struct Entry {
    window_start: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<SourceKey, Entry>,
    last_sweep: Option<Instant>,
}

/// What [`SourceLimiter::failure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "`Counted::Counted` reads as meant: counted, and nothing more"
)]
pub(super) enum Counted {
    /// Counted; the source is not blocked.
    Counted,
    /// This failure blocked the source.
    Blocked,
    /// The table is full of live entries: not counted.
    TableFull,
    /// The limit is off.
    Off,
}

/// Failure counts and blocks per source.
pub(super) struct SourceLimiter {
    policy: FailurePolicy,
    max: usize,
    inner: Mutex<Inner>,
}

impl SourceLimiter {
    /// An empty table under `policy`, holding at most `max` sources.
    pub(super) fn new(policy: FailurePolicy, max: usize) -> Self {
        Self {
            policy,
            max,
            inner: Mutex::default(),
        }
    }

    /// The policy.
    pub(super) fn policy(&self) -> FailurePolicy {
        self.policy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Only counters behind it: a panic elsewhere leaves them usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key `addr` is counted under.
    pub(super) fn key(&self, addr: IpAddr) -> SourceKey {
        SourceKey::new(addr, self.policy.ipv6_prefix)
    }

    /// How much longer `addr`'s source stays blocked, if it is.
    pub(super) fn blocked(&self, addr: IpAddr) -> Option<Duration> {
        if self.policy.threshold == 0 {
            return None;
        }
        let now = Instant::now();
        let inner = self.lock();
        let until = inner.map.get(&self.key(addr))?.blocked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Counts one failure from `addr`.
    pub(super) fn failure(&self, addr: IpAddr) -> Counted {
        let p = self.policy;
        if p.threshold == 0 {
            return Counted::Off;
        }
        let key = self.key(addr);
        let now = Instant::now();
        let mut inner = self.lock();
        if !inner.map.contains_key(&key) && inner.map.len() >= self.max {
            let due = inner
                .last_sweep
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
            if due {
                inner.last_sweep = Some(now);
                inner.map.retain(|_, e| {
                    now.duration_since(e.window_start) < p.window
                        || e.blocked_until.is_some_and(|u| u > now)
                });
            }
            if inner.map.len() >= self.max {
                return Counted::TableFull;
            }
        }
        let e = inner.map.entry(key).or_insert(Entry {
            window_start: now,
            count: 0,
            blocked_until: None,
        });
        if e.blocked_until.is_some_and(|u| u > now) {
            return Counted::Blocked;
        }
        if now.duration_since(e.window_start) >= p.window {
            e.window_start = now;
            e.count = 0;
            e.blocked_until = None;
        }
        e.count += 1;
        if e.count >= p.threshold {
            e.blocked_until = Some(now + p.block_for);
            // The next window starts when the block ends.
            e.window_start = now + p.block_for;
            e.count = 0;
            return Counted::Blocked;
        }
        Counted::Counted
    }

    /// Sources tracked.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no source is tracked.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(threshold: u32) -> FailurePolicy {
        FailurePolicy {
            threshold,
            window: Duration::from_secs(60),
            block_for: Duration::from_millis(200),
            ipv6_prefix: 64,
        }
    }

    #[test]
    fn blocks_at_the_threshold_then_lets_go() {
        let l = SourceLimiter::new(policy(3), 10);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(l.failure(a), Counted::Counted);
        assert_eq!(l.failure(a), Counted::Counted);
        assert!(l.blocked(a).is_none());
        assert_eq!(l.failure(a), Counted::Blocked);
        assert!(l.blocked(a).is_some());
        assert!(l.blocked(b).is_none(), "another address is not blocked");
        std::thread::sleep(Duration::from_millis(250));
        assert!(l.blocked(a).is_none(), "the block ends");
        assert_eq!(l.failure(a), Counted::Counted, "and counting starts over");
    }

    #[test]
    fn ipv6_sources_aggregate_by_prefix() {
        let l = SourceLimiter::new(policy(2), 10);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.failure(a);
        assert_eq!(l.failure(same64), Counted::Blocked);
        assert!(l.blocked(a).is_some());
        assert!(l.blocked(other64).is_none());
        assert_eq!(
            SourceKey::new("2001:db8::1".parse().unwrap(), 0).to_string(),
            "::"
        );
        assert_eq!(
            SourceKey::new("2001:db8::1".parse().unwrap(), 128).to_string(),
            "2001:db8::1"
        );
        assert_eq!(
            SourceKey::new("::ffff:192.0.2.7".parse().unwrap(), 64).to_string(),
            "192.0.2.7"
        );
    }

    #[test]
    fn the_table_is_bounded_and_keeps_blocked_sources() {
        let mut p = policy(2);
        p.window = Duration::from_millis(100);
        p.block_for = Duration::from_secs(60);
        let l = SourceLimiter::new(p, 3);
        let ip = |i: u8| IpAddr::from([198, 51, 100, i]);
        l.failure(ip(1));
        assert_eq!(l.failure(ip(1)), Counted::Blocked);
        l.failure(ip(2));
        l.failure(ip(3));
        assert_eq!(l.failure(ip(4)), Counted::TableFull);
        assert_eq!(l.len(), 3);
        // Not swept again within a second of the last sweep.
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(l.failure(ip(4)), Counted::TableFull);
        std::thread::sleep(Duration::from_millis(1000));
        // Windows of 2 and 3 are over: swept; 1 is still blocked and stays.
        assert_eq!(l.failure(ip(4)), Counted::Counted);
        assert!(l.blocked(ip(1)).is_some());
        assert!(l.len() <= 3);
    }

    #[test]
    fn zero_threshold_is_off() {
        let l = SourceLimiter::new(policy(0), 10);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(l.failure(a), Counted::Off);
        }
        assert!(l.blocked(a).is_none());
        assert!(l.is_empty());
    }
}
