//! Per-user lockouts and per-source failure limits: attempts reserved before the password check
//! and counted after it; and the key a source address is counted under.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::{lock, now_ms};

/// The key a source address is counted under: IPv4 as it is, IPv6 by its first `v6_prefix` bits
/// (one customer usually holds a whole /64, so counting full addresses lets it walk around every
/// limit). An IPv4 address written in IPv6 form counts as the IPv4 address; a prefix above 128
/// keeps the whole address.
pub fn source_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    // One implementation with the XDP shield's map keys, so user space and the data plane
    // count a source alike.
    proxy_common::steer::source_prefix(ip, u32::from(v6_prefix))
}

/// The counters of one user or source.
#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    /// Failures counted in the current window.
    failures: u32,
    /// Attempts reserved and not finished yet.
    in_flight: u32,
    /// Start of the current window (ms); failures older than the window are forgotten.
    window_start: u64,
    /// End of the lockout (ms), 0 when not locked.
    locked_until: u64,
}

/// Why an attempt was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Locked out (or blocked) after repeated failures.
    Locked,
    /// As many attempts as failures still allowed are in progress: one of them must finish first.
    InFlight,
}

/// Failure counters keyed by user name or source address. An attempt is *reserved* before the
/// expensive check (argon2) and counted as a failure after it, so concurrent attempts cannot all
/// pass the check: at most `threshold` attempts are checked before the lockout, however many are
/// sent at once. Failures decay: a window with no lockout is forgotten after `window`. The table is
/// bounded: when full, the counters idle longest (never a lockout in force or an attempt in
/// flight) are dropped, half at a time.
#[derive(Debug)]
pub struct Limiter<K> {
    map: Mutex<HashMap<K, Counter>>,
    threshold: u32,
    window: Duration,
    lockout: Duration,
    max_entries: usize,
}

/// A reserved attempt. Call [`Attempt::fail`] or [`Attempt::succeed`]; dropping it without either
/// (an error that says nothing about the credentials) only frees the reservation.
#[derive(Debug)]
#[must_use = "an attempt must be finished as a failure or a success"]
pub struct Attempt<'a, K: std::hash::Hash + Eq + Clone> {
    owner: &'a Limiter<K>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Attempt<'_, K> {
    /// Counts a failure; true when this failure locks the key out.
    pub fn fail(self) -> bool {
        self.owner.finish(&self.key, true)
    }

    /// A success: the key's failures are cleared.
    pub fn succeed(self) {
        self.owner.clear(&self.key);
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Attempt<'_, K> {
    fn drop(&mut self) {
        let mut map = lock(&self.owner.map);
        if let Some(c) = map.get_mut(&self.key) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Limiter<K> {
    /// `threshold` failures within `window` lock a key for `lockout`; at most `max_entries` keys.
    pub fn new(threshold: u32, window: Duration, lockout: Duration, max_entries: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            threshold: threshold.max(1),
            window,
            lockout,
            max_entries: max_entries.max(1),
        }
    }

    fn refresh(&self, c: &mut Counter, now: u64) {
        if c.locked_until != 0 && c.locked_until <= now {
            // An earlier lockout has run out: start counting afresh.
            c.failures = 0;
            c.locked_until = 0;
            c.window_start = now;
        }
        if c.locked_until == 0 && now >= c.window_start + self.window.as_millis() as u64 {
            c.failures = 0;
            c.window_start = now;
        }
    }

    /// Whether the key is locked out now.
    pub fn is_locked(&self, key: &K) -> bool {
        let now = now_ms();
        let mut map = lock(&self.map);
        map.get_mut(key).is_some_and(|c| {
            self.refresh(c, now);
            c.locked_until > now || c.failures >= self.threshold
        })
    }

    /// Reserves an attempt, or says why none is admitted now.
    pub fn reserve(&self, key: &K) -> Result<Attempt<'_, K>, Refused> {
        let now = now_ms();
        let mut map = lock(&self.map);
        if !map.contains_key(key) && map.len() >= self.max_entries {
            self.evict(&mut map, now);
        }
        let c = map.entry(key.clone()).or_insert(Counter {
            window_start: now,
            ..Counter::default()
        });
        self.refresh(c, now);
        if c.locked_until > now || c.failures >= self.threshold {
            return Err(Refused::Locked);
        }
        if c.failures + c.in_flight >= self.threshold {
            return Err(Refused::InFlight);
        }
        c.in_flight += 1;
        Ok(Attempt {
            owner: self,
            key: key.clone(),
        })
    }

    /// Counts one failure without a reservation (a check that costs nothing, e.g. a bad MAC);
    /// true when it locks the key out.
    pub fn fail(&self, key: &K) -> bool {
        let now = now_ms();
        let mut map = lock(&self.map);
        if !map.contains_key(key) && map.len() >= self.max_entries {
            self.evict(&mut map, now);
        }
        let c = map.entry(key.clone()).or_insert(Counter {
            window_start: now,
            ..Counter::default()
        });
        self.refresh(c, now);
        self.count(c, now)
    }

    fn count(&self, c: &mut Counter, now: u64) -> bool {
        c.failures = c.failures.saturating_add(1);
        if c.failures >= self.threshold && c.locked_until == 0 {
            c.locked_until = now + self.lockout.as_millis() as u64;
            return true;
        }
        false
    }

    fn finish(&self, key: &K, failed: bool) -> bool {
        let now = now_ms();
        let mut map = lock(&self.map);
        let Some(c) = map.get_mut(key) else {
            return false;
        };
        // The reservation is released by the attempt's Drop, right after this.
        if failed {
            self.refresh(c, now);
            return self.count(c, now);
        }
        false
    }

    /// Clears the key's counters after a success or an admin unlock (attempts in flight stay
    /// reserved).
    pub fn clear(&self, key: &K) {
        let mut map = lock(&self.map);
        if let Some(c) = map.get_mut(key) {
            let in_flight = c.in_flight;
            *c = Counter {
                in_flight,
                window_start: now_ms(),
                ..Counter::default()
            };
            if in_flight == 0 {
                map.remove(key);
            }
        }
    }

    /// Drops counters that no longer matter, then, if the table is still full, the half of the
    /// rest idle longest (never a lockout in force or an attempt in flight).
    fn evict(&self, map: &mut HashMap<K, Counter>, now: u64) {
        let window = self.window.as_millis() as u64;
        map.retain(|_, c| c.in_flight > 0 || c.locked_until > now || now < c.window_start + window);
        if map.len() < self.max_entries {
            return;
        }
        let mut starts: Vec<u64> = map
            .values()
            .filter(|c| c.in_flight == 0 && c.locked_until <= now)
            .map(|c| c.window_start)
            .collect();
        if starts.is_empty() {
            return;
        }
        let mid = starts.len() / 2;
        let (_, cut, _) = starts.select_nth_unstable(mid);
        let cut = *cut;
        map.retain(|_, c| c.in_flight > 0 || c.locked_until > now || c.window_start > cut);
    }

    /// Forgets counters that no longer matter.
    pub fn sweep(&self) {
        let now = now_ms();
        let window = self.window.as_millis() as u64;
        lock(&self.map).retain(|_, c| {
            c.in_flight > 0 || c.locked_until > now || now < c.window_start + window
        });
    }

    /// Keys counted now.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Whether no key is counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-user failure counters and lockouts.
pub type Lockouts = Limiter<String>;

/// Per-source-address failure limits, keyed by [`source_key`].
#[derive(Debug)]
pub struct SourceLimiter {
    inner: Limiter<IpAddr>,
    v6_prefix: u8,
}

impl SourceLimiter {
    /// `limit` failures per `window` from one source (IPv6 by `/v6_prefix`) block it until the
    /// window passes; at most `max_entries` sources are counted.
    pub fn new(limit: u32, window: Duration, v6_prefix: u8, max_entries: usize) -> Self {
        Self {
            inner: Limiter::new(limit, window, window, max_entries),
            v6_prefix,
        }
    }

    fn key(&self, ip: IpAddr) -> IpAddr {
        source_key(ip, self.v6_prefix)
    }

    /// Whether the source has used up its failures.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.inner.is_locked(&self.key(ip))
    }

    /// Counts a failure from the source.
    pub fn fail(&self, ip: IpAddr) {
        self.inner.fail(&self.key(ip));
    }

    /// Reserves an attempt from the source (see [`Limiter::reserve`]).
    pub fn reserve(&self, ip: IpAddr) -> Result<Attempt<'_, IpAddr>, Refused> {
        self.inner.reserve(&self.key(ip))
    }

    /// Forgets finished windows.
    pub fn sweep(&self) {
        self.inner.sweep();
    }

    /// Sources counted now.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether no source is counted.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn lockout_after_threshold() {
        let l = Lockouts::new(3, Duration::from_secs(60), Duration::from_secs(60), 100);
        let a = "a".to_owned();
        assert!(!l.fail(&a));
        assert!(!l.fail(&a));
        assert!(!l.is_locked(&a));
        assert!(l.fail(&a));
        assert!(l.is_locked(&a));
        assert!(!l.is_locked(&"b".to_owned()));
        assert_eq!(l.reserve(&a).unwrap_err(), Refused::Locked);
        l.clear(&a);
        assert!(!l.is_locked(&a));
    }

    #[test]
    fn reservations_bound_concurrent_checks() {
        let l = Lockouts::new(5, Duration::from_secs(60), Duration::from_secs(60), 100);
        let u = "u".to_owned();
        let held: Vec<_> = (0..5).map(|_| l.reserve(&u).unwrap()).collect();
        assert_eq!(l.reserve(&u).unwrap_err(), Refused::InFlight);
        let mut locked = false;
        for a in held {
            locked |= a.fail();
        }
        assert!(locked);
        assert_eq!(l.reserve(&u).unwrap_err(), Refused::Locked);
        // An attempt dropped without a verdict frees its slot and counts nothing.
        let v = "v".to_owned();
        for _ in 0..20 {
            drop(l.reserve(&v).unwrap());
        }
        assert!(!l.is_locked(&v));
        let ok = l.reserve(&v).unwrap();
        ok.succeed();
        assert!(l.is_empty() || !l.is_locked(&v));
    }

    #[test]
    fn failures_decay_and_the_table_is_bounded() {
        let l = Lockouts::new(3, Duration::from_millis(0), Duration::from_secs(60), 100);
        let u = "u".to_owned();
        for _ in 0..10 {
            assert!(!l.fail(&u), "failures outside the window are forgotten");
        }
        let l = Lockouts::new(2, Duration::from_secs(60), Duration::from_secs(60), 10);
        let victim = "victim".to_owned();
        l.fail(&victim);
        assert!(l.fail(&victim));
        for i in 0..1_000 {
            l.fail(&format!("junk{i}"));
            assert!(l.len() <= 10);
        }
        assert!(l.is_locked(&victim), "a lockout in force is never evicted");
    }

    #[test]
    fn source_limit_by_prefix() {
        let s = SourceLimiter::new(2, Duration::from_secs(60), 64, 100);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        s.fail(ip);
        assert!(!s.is_blocked(ip));
        s.fail(ip);
        assert!(s.is_blocked(ip));
        assert!(!s.is_blocked("127.0.0.2".parse().unwrap()));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        s.fail(a);
        s.fail("2001:db8:1:2:ffff::9".parse().unwrap());
        assert!(
            s.is_blocked("2001:db8:1:2:abcd::1".parse().unwrap()),
            "one /64"
        );
        assert!(!s.is_blocked("2001:db8:1:3::1".parse().unwrap()));
        assert_eq!(
            source_key("::ffff:10.0.0.1".parse().unwrap(), 64),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            source_key("2001:db8::1".parse().unwrap(), 128),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            source_key("2001:db8::1".parse().unwrap(), 0),
            "::".parse::<IpAddr>().unwrap()
        );
    }
}
