//! In-memory state: live sessions (with idle and absolute expiry), single-use login challenges,
//! per-user lockouts and per-source failure limits. Revocations are broadcast to the proxies'
//! revocation streams the moment they happen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use scm_proto::api::ProxyEvent;
use scm_proto::crypto::{self, Nonce, SessionId, SessionKey, SessionTag};
use tokio::sync::broadcast;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every update is a single
    // insert or remove), so poisoning is ignored rather than taking the server down.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One live session.
#[derive(Debug)]
pub struct Session {
    /// The secret id.
    pub id: SessionId,
    /// Its loggable tag.
    pub tag: SessionTag,
    /// The derived session key.
    pub key: SessionKey,
    /// Canonical user name.
    pub user: String,
    /// Groups at login.
    pub groups: Vec<String>,
    /// Site.
    pub site: String,
    /// Device id.
    pub device_id: String,
    /// App id.
    pub app_id: String,
    /// App version at login.
    pub app_version: String,
    /// The key id logged in with.
    pub key_id: String,
    /// Creation, ms.
    pub created_ms: u64,
    /// Absolute end, ms.
    pub absolute_expires_ms: u64,
    last_seen_ms: AtomicU64,
}

impl Session {
    /// Last activity, ms.
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }
}

/// What a new session is made of (everything but its id and times).
#[derive(Debug)]
pub struct NewSession {
    /// Canonical user name.
    pub user: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Site.
    pub site: String,
    /// Device id.
    pub device_id: String,
    /// App id.
    pub app_id: String,
    /// App version.
    pub app_version: String,
    /// Key id.
    pub key_id: String,
}

/// Why a session lookup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No such session.
    Unknown,
    /// It existed but has just expired (and is now gone).
    Expired,
}

/// The session table.
#[derive(Debug)]
pub struct Sessions {
    map: RwLock<HashMap<SessionId, Arc<Session>>>,
    events: broadcast::Sender<ProxyEvent>,
    idle: Duration,
    max_life: Duration,
    max: usize,
}

impl Sessions {
    /// An empty table.
    pub fn new(idle: Duration, max_life: Duration, max: usize) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            map: RwLock::new(HashMap::new()),
            events,
            idle,
            max_life,
            max,
        }
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        self.idle
    }

    /// Subscribes to revocations and catalog changes.
    pub fn subscribe(&self) -> broadcast::Receiver<ProxyEvent> {
        self.events.subscribe()
    }

    /// Tells every subscriber something (no subscriber is fine).
    pub fn publish(&self, event: ProxyEvent) {
        let _ = self.events.send(event);
    }

    /// Creates a session; the key is derived from the shared key and both nonces, bound to the
    /// new id. `None` when the table is full.
    pub fn create(
        &self,
        shared: &crypto::SharedKey,
        server_nonce: &Nonce,
        client_nonce: &Nonce,
        new: NewSession,
    ) -> Option<Arc<Session>> {
        let id = SessionId::generate();
        let key = crypto::derive_session_key(shared, server_nonce, client_nonce, &id);
        let now = now_ms();
        let s = Arc::new(Session {
            tag: id.tag(),
            id: id.clone(),
            key,
            user: new.user,
            groups: new.groups,
            site: new.site,
            device_id: new.device_id,
            app_id: new.app_id,
            app_version: new.app_version,
            key_id: new.key_id,
            created_ms: now,
            absolute_expires_ms: now + self.max_life.as_millis() as u64,
            last_seen_ms: AtomicU64::new(now),
        });
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.max {
            return None;
        }
        map.insert(id, s.clone());
        Some(s)
    }

    fn expired(&self, s: &Session, now: u64) -> bool {
        now >= s.absolute_expires_ms || now >= s.last_seen_ms() + self.idle.as_millis() as u64
    }

    /// Looks a session up by its id text, counting it as activity.
    pub fn validate(&self, id_text: &str) -> Result<Arc<Session>, Lookup> {
        let s = self.peek(id_text)?;
        s.last_seen_ms.fetch_max(now_ms(), Ordering::Relaxed);
        Ok(s)
    }

    /// Looks a session up by its id text WITHOUT counting it as activity (ending it if it has
    /// expired): forward-auth and assertions ask on behalf of requests that must not keep a
    /// session alive past its idle timeout; only the device's own logins and validations do.
    pub fn peek(&self, id_text: &str) -> Result<Arc<Session>, Lookup> {
        let id = SessionId::parse(id_text).ok_or(Lookup::Unknown)?;
        let s = {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            map.get(&id).cloned().ok_or(Lookup::Unknown)?
        };
        if self.expired(&s, now_ms()) {
            self.end(id_text, "expired");
            return Err(Lookup::Expired);
        }
        Ok(s)
    }

    /// Like [`Self::validate`], but counts the lookup as activity only when `proof_holds` accepts
    /// the live session (the proxy's channel-binding proof, checked in constant time by the
    /// caller). A session id presented with a wrong proof is answered `Ok(None)` and its idle
    /// timer is left alone, so a stolen id with a made-up MAC cannot keep a session alive.
    pub fn validate_bound(
        &self,
        id_text: &str,
        proof_holds: impl FnOnce(&Session) -> bool,
    ) -> Result<Option<Arc<Session>>, Lookup> {
        let s = self.peek(id_text)?;
        if !proof_holds(&s) {
            return Ok(None);
        }
        s.last_seen_ms.fetch_max(now_ms(), Ordering::Relaxed);
        Ok(Some(s))
    }

    /// Ends the session with this id text; returns it if it was live.
    pub fn end(&self, id_text: &str, reason: &str) -> Option<Arc<Session>> {
        let id = SessionId::parse(id_text)?;
        let s = self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)?;
        self.publish(ProxyEvent::Revoked {
            session_tag: s.tag.0.clone(),
            reason: reason.to_owned(),
        });
        Some(s)
    }

    /// Ends every session matching `pred`, telling the proxies; returns the ended sessions.
    pub fn remove_where(&self, pred: impl Fn(&Session) -> bool, reason: &str) -> Vec<Arc<Session>> {
        let gone: Vec<Arc<Session>> = {
            let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<SessionId> = map
                .values()
                .filter(|s| pred(s))
                .map(|s| s.id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for s in &gone {
            self.publish(ProxyEvent::Revoked {
                session_tag: s.tag.0.clone(),
                reason: reason.to_owned(),
            });
        }
        gone
    }

    /// Ends expired sessions; returns them.
    pub fn sweep(&self) -> Vec<Arc<Session>> {
        let now = now_ms();
        self.remove_where(|s| self.expired(s, now), "expired")
    }

    /// Every live session.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by_key(|s| s.created_ms);
        v
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key a source address is counted under: IPv4 as it is, IPv6 by its first `v6_prefix` bits
/// (one customer usually holds a whole /64, so counting full addresses lets it walk around every
/// limit). An IPv4 address written in IPv6 form counts as the IPv4 address; a prefix above 128
/// keeps the whole address.
pub fn source_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    // One implementation with the XDP shield's map keys, so user space and the data plane
    // count a source alike.
    proxy_common::steer::source_prefix(ip, u32::from(v6_prefix))
}

/// Why a challenge could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeError {
    /// Never issued by this server, forged, or already used.
    Unknown,
    /// Issued but past its expiry.
    Expired,
    /// The set of used challenges is full of unexpired entries: try again shortly.
    Busy,
}

/// Bytes of a challenge id: expiry (ms, big endian) ‖ 16 random bytes ‖ 16-byte MAC tag.
const CHALLENGE_ID_LEN: usize = 8 + 16 + 16;

/// Stateless login challenges. The id carries its own expiry and a MAC under a per-process key,
/// and the server nonce is derived from it, so issuing one stores nothing: no number of
/// challenge requests can fill a table. Single use is kept by a set of the ids already used,
/// each held only until its expiry; that set is bounded (`max_used`) and filled only by login
/// attempts, which the per-source limits already throttle.
pub struct Challenges {
    key: [u8; 32],
    used: Mutex<HashMap<[u8; 16], u64>>,
    ttl: Duration,
    max_used: usize,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("key", &"<redacted>")
            .field("used", &self.used_len())
            .field("ttl", &self.ttl)
            .field("max_used", &self.max_used)
            .finish()
    }
}

impl Challenges {
    /// Challenges valid for `ttl`, remembering at most `max_used` used ones at a time.
    pub fn new(ttl: Duration, max_used: usize) -> Self {
        Self {
            key: crypto::random_bytes::<32>(),
            used: Mutex::new(HashMap::new()),
            ttl,
            max_used: max_used.max(1),
        }
    }

    /// The time to live of a challenge.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn tag(&self, label: &[u8], body: &[u8]) -> [u8; 32] {
        use hmac::Mac as _;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        m.update(label);
        m.update(body);
        m.finalize().into_bytes().into()
    }

    /// Issues a challenge: (id, server nonce). Stores nothing.
    pub fn issue(&self) -> (String, Nonce) {
        let expires = now_ms() + self.ttl.as_millis() as u64;
        let mut id = [0u8; CHALLENGE_ID_LEN];
        id[..8].copy_from_slice(&expires.to_be_bytes());
        id[8..24].copy_from_slice(&crypto::random_bytes::<16>());
        let tag = self.tag(b"scm-challenge-id-v1", &id[..24]);
        id[24..].copy_from_slice(&tag[..16]);
        let nonce = self.tag(b"scm-challenge-nonce-v1", &id[..24]);
        (URL_SAFE_NO_PAD.encode(id), nonce)
    }

    /// Uses a challenge up: whatever happens next, it cannot serve again.
    pub fn take(&self, id_text: &str) -> Result<Nonce, ChallengeError> {
        let id = URL_SAFE_NO_PAD
            .decode(id_text)
            .map_err(|_| ChallengeError::Unknown)?;
        if id.len() != CHALLENGE_ID_LEN {
            return Err(ChallengeError::Unknown);
        }
        let tag = self.tag(b"scm-challenge-id-v1", &id[..24]);
        if !crypto::ct_eq(&tag[..16], &id[24..]) {
            return Err(ChallengeError::Unknown);
        }
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&id[..8]);
        let expires = u64::from_be_bytes(exp);
        let now = now_ms();
        if now >= expires {
            return Err(ChallengeError::Expired);
        }
        let mut rand = [0u8; 16];
        rand.copy_from_slice(&id[8..24]);
        {
            let mut used = lock(&self.used);
            if used.contains_key(&rand) {
                return Err(ChallengeError::Unknown);
            }
            if used.len() >= self.max_used {
                used.retain(|_, exp| *exp > now);
                if used.len() >= self.max_used {
                    return Err(ChallengeError::Busy);
                }
            }
            used.insert(rand, expires);
        }
        Ok(self.tag(b"scm-challenge-nonce-v1", &id[..24]))
    }

    /// Used challenges remembered now.
    pub fn used_len(&self) -> usize {
        lock(&self.used).len()
    }

    /// Forgets used challenges that have expired (they would be refused as expired anyway).
    pub fn sweep(&self) {
        let now = now_ms();
        lock(&self.used).retain(|_, exp| *exp > now);
    }
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

    fn new_session(user: &str) -> NewSession {
        NewSession {
            user: user.into(),
            groups: vec![],
            site: "main".into(),
            device_id: "d".into(),
            app_id: "a".into(),
            app_version: "1".into(),
            key_id: "k".into(),
        }
    }

    #[test]
    fn sessions_validate_end_and_broadcast() {
        let t = Sessions::new(Duration::from_secs(60), Duration::from_secs(600), 2);
        let mut rx = t.subscribe();
        let k = crypto::SharedKey::generate();
        let s = t.create(&k, &[1; 32], &[2; 32], new_session("a")).unwrap();
        assert_eq!(
            s.key,
            crypto::derive_session_key(&k, &[1; 32], &[2; 32], &s.id)
        );
        assert!(t.validate(s.id.expose()).is_ok());
        assert_eq!(t.validate("nope").unwrap_err(), Lookup::Unknown);
        t.create(&k, &[1; 32], &[2; 32], new_session("b")).unwrap();
        assert!(
            t.create(&k, &[1; 32], &[2; 32], new_session("c")).is_none(),
            "cap"
        );
        assert!(t.end(s.id.expose(), "logout").is_some());
        assert_eq!(
            rx.try_recv().unwrap(),
            ProxyEvent::Revoked {
                session_tag: s.tag.0.clone(),
                reason: "logout".into()
            }
        );
        assert_eq!(t.validate(s.id.expose()).unwrap_err(), Lookup::Unknown);
        assert!(t.end(s.id.expose(), "logout").is_none());
    }

    #[test]
    fn idle_expiry() {
        let t = Sessions::new(Duration::from_millis(0), Duration::from_secs(600), 10);
        let s = t
            .create(
                &crypto::SharedKey::generate(),
                &[1; 32],
                &[2; 32],
                new_session("a"),
            )
            .unwrap();
        assert_eq!(t.validate(s.id.expose()).unwrap_err(), Lookup::Expired);
        assert!(t.is_empty());
    }

    #[test]
    fn challenges_are_stateless_single_use_and_expire() {
        let c = Challenges::new(Duration::from_secs(60), 2);
        let (id, nonce) = c.issue();
        assert!(id.len() <= 64, "fits the login's challenge_id limit: {id}");
        assert_eq!(c.used_len(), 0, "issuing stores nothing");
        for _ in 0..10_000 {
            let _ = c.issue();
        }
        assert_eq!(c.used_len(), 0);
        assert_eq!(c.take(&id), Ok(nonce));
        assert_eq!(c.take(&id), Err(ChallengeError::Unknown), "single use");
        // Forged or edited ids are unknown.
        assert_eq!(c.take("nope"), Err(ChallengeError::Unknown));
        let mut bytes = URL_SAFE_NO_PAD.decode(&id).unwrap();
        bytes[12] ^= 1;
        assert_eq!(
            c.take(&URL_SAFE_NO_PAD.encode(&bytes)),
            Err(ChallengeError::Unknown)
        );
        // Another server's (another key's) challenge is unknown here.
        let other = Challenges::new(Duration::from_secs(60), 2);
        assert_eq!(c.take(&other.issue().0), Err(ChallengeError::Unknown));
        // The used set is bounded: full of unexpired entries, a login is told to retry.
        let (a, _) = c.issue();
        assert!(c.take(&a).is_ok());
        let (b, _) = c.issue();
        assert_eq!(c.take(&b), Err(ChallengeError::Busy));
        let c = Challenges::new(Duration::from_millis(0), 2);
        let (id, _) = c.issue();
        assert_eq!(c.take(&id), Err(ChallengeError::Expired));
    }

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
