//! In-memory state: live sessions (with idle and absolute expiry), single-use login challenges,
//! per-user lockouts and per-source failure limits. Revocations are broadcast to the proxies'
//! revocation streams the moment they happen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

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
        let id = SessionId::parse(id_text).ok_or(Lookup::Unknown)?;
        let now = now_ms();
        let s = {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            map.get(&id).cloned().ok_or(Lookup::Unknown)?
        };
        if self.expired(&s, now) {
            self.end(id_text, "expired");
            return Err(Lookup::Expired);
        }
        s.last_seen_ms.fetch_max(now, Ordering::Relaxed);
        Ok(s)
    }

    /// The live session with this id text, without counting as activity: identity assertions
    /// are asked for on behalf of requests whose validation already counted.
    pub fn peek(&self, id_text: &str) -> Result<Arc<Session>, Lookup> {
        let id = SessionId::parse(id_text).ok_or(Lookup::Unknown)?;
        let s = {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            map.get(&id).cloned().ok_or(Lookup::Unknown)?
        };
        if self.expired(&s, now_ms()) {
            return Err(Lookup::Expired);
        }
        Ok(s)
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

/// Why a challenge could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeError {
    /// Never issued, or already used.
    Unknown,
    /// Issued but past its expiry.
    Expired,
}

/// Outstanding single-use login challenges.
#[derive(Debug)]
pub struct Challenges {
    map: Mutex<HashMap<String, (Nonce, u64)>>,
    ttl: Duration,
    max: usize,
}

impl Challenges {
    /// Keeps expired challenges this long after expiry so a late login hears `challenge_expired`.
    const GRACE_MS: u64 = 5 * 60 * 1000;

    /// An empty set.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            ttl,
            max,
        }
    }

    /// The time to live of a challenge.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a challenge: (id, server nonce). `None` when too many are outstanding.
    pub fn issue(&self) -> Option<(String, Nonce)> {
        let id = hex::encode(crypto::random_bytes::<16>());
        let nonce: Nonce = crypto::random_bytes();
        let expires = now_ms() + self.ttl.as_millis() as u64;
        let mut map = lock(&self.map);
        if map.len() >= self.max {
            return None;
        }
        map.insert(id.clone(), (nonce, expires));
        Some((id, nonce))
    }

    /// Uses a challenge up: whatever happens next, it cannot serve again.
    pub fn take(&self, id: &str) -> Result<Nonce, ChallengeError> {
        let (nonce, expires) = lock(&self.map).remove(id).ok_or(ChallengeError::Unknown)?;
        if now_ms() >= expires {
            return Err(ChallengeError::Expired);
        }
        Ok(nonce)
    }

    /// Forgets challenges long expired.
    pub fn sweep(&self) {
        let now = now_ms();
        lock(&self.map).retain(|_, (_, exp)| now < *exp + Self::GRACE_MS);
    }
}

/// Per-user failure counters and lockouts.
#[derive(Debug)]
pub struct Lockouts {
    map: Mutex<HashMap<String, (u32, u64)>>,
    threshold: u32,
    duration: Duration,
}

impl Lockouts {
    /// No user locked.
    pub fn new(threshold: u32, duration: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            threshold: threshold.max(1),
            duration,
        }
    }

    /// Whether the user is locked out now.
    pub fn is_locked(&self, user: &str) -> bool {
        lock(&self.map)
            .get(user)
            .is_some_and(|&(_, until)| until > now_ms())
    }

    /// Counts a failure; returns true when this failure locks the user.
    pub fn fail(&self, user: &str) -> bool {
        let mut map = lock(&self.map);
        let now = now_ms();
        let e = map.entry(user.to_owned()).or_insert((0, 0));
        if e.1 != 0 && e.1 <= now {
            // An earlier lockout has run out: start counting afresh.
            *e = (0, 0);
        }
        e.0 += 1;
        if e.0 >= self.threshold && e.1 == 0 {
            e.1 = now + self.duration.as_millis() as u64;
            return true;
        }
        false
    }

    /// Clears the counter after a success or an admin unlock.
    pub fn clear(&self, user: &str) {
        lock(&self.map).remove(user);
    }

    /// Forgets lockouts that ran out.
    pub fn sweep(&self) {
        let now = now_ms();
        lock(&self.map).retain(|_, &mut (_, until)| until == 0 || until > now);
    }
}

/// Per-source-address failure limit over a fixed window.
#[derive(Debug)]
pub struct SourceLimiter {
    map: Mutex<HashMap<IpAddr, (u64, u32)>>,
    limit: u32,
    window: Duration,
}

impl SourceLimiter {
    /// No source limited.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            limit: limit.max(1),
            window,
        }
    }

    /// Whether the source has used up its failures in the current window.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        let now = now_ms();
        lock(&self.map).get(&ip).is_some_and(|&(start, n)| {
            now < start + self.window.as_millis() as u64 && n >= self.limit
        })
    }

    /// Counts a failure from the source.
    pub fn fail(&self, ip: IpAddr) {
        let now = now_ms();
        let window = self.window.as_millis() as u64;
        let mut map = lock(&self.map);
        let e = map.entry(ip).or_insert((now, 0));
        if now >= e.0 + window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    /// Forgets finished windows.
    pub fn sweep(&self) {
        let now = now_ms();
        let window = self.window.as_millis() as u64;
        lock(&self.map).retain(|_, &mut (start, _)| now < start + window);
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
    fn challenges_are_single_use_and_expire() {
        let c = Challenges::new(Duration::from_secs(60), 2);
        let (id, nonce) = c.issue().unwrap();
        assert_eq!(c.take(&id), Ok(nonce));
        assert_eq!(c.take(&id), Err(ChallengeError::Unknown));
        c.issue().unwrap();
        c.issue().unwrap();
        assert!(c.issue().is_none(), "cap");
        let c = Challenges::new(Duration::from_millis(0), 2);
        let (id, _) = c.issue().unwrap();
        assert_eq!(c.take(&id), Err(ChallengeError::Expired));
    }

    #[test]
    fn lockout_after_threshold() {
        let l = Lockouts::new(3, Duration::from_secs(60));
        assert!(!l.fail("a"));
        assert!(!l.fail("a"));
        assert!(!l.is_locked("a"));
        assert!(l.fail("a"));
        assert!(l.is_locked("a"));
        assert!(!l.is_locked("b"));
        l.clear("a");
        assert!(!l.is_locked("a"));
    }

    #[test]
    fn source_limit() {
        let s = SourceLimiter::new(2, Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        s.fail(ip);
        assert!(!s.is_blocked(ip));
        s.fail(ip);
        assert!(s.is_blocked(ip));
        assert!(!s.is_blocked("127.0.0.2".parse().unwrap()));
    }
}
