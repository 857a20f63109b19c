//! What the proxy remembers between connections: validated sessions (keyed by session id, short
//! TTL, emptied by revocations) and the open connections of each session, so a revocation can
//! close them at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use scm_proto::api::ValidateResponse;
use scm_proto::crypto::{KeyError, SessionId, SessionKey, SessionTag};
use tokio_util::sync::CancellationToken;

/// A live session as the Security server described it.
#[derive(Debug, Clone)]
pub(super) struct SessionInfo {
    /// Non-secret tag, for logs and revocations.
    pub tag: SessionTag,
    /// Canonical user name.
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The key the binding MAC is made with.
    pub session_key: SessionKey,
    /// App id at login.
    pub app_id: String,
    /// App version at login.
    pub app_version: String,
    /// Device id at login.
    pub device_id: String,
    /// The user's site.
    #[allow(
        dead_code,
        reason = "part of the validation answer; nothing in the proxy decides by site yet"
    )]
    pub site: String,
    /// Unix time after which the session is over regardless of activity.
    pub absolute_expires_at: u64,
}

impl SessionInfo {
    /// Builds the session from the validate answer, checking the key material.
    pub(super) fn from_response(r: ValidateResponse) -> Result<Self, KeyError> {
        Ok(Self {
            session_key: SessionKey::from_b64(&r.session_key)?,
            tag: SessionTag(r.session_tag),
            user: r.user,
            groups: r.groups,
            app_id: r.app_id,
            app_version: r.app_version,
            device_id: r.device_id,
            site: r.site,
            absolute_expires_at: r.absolute_expires_at,
        })
    }

    /// Whether the absolute expiry has passed.
    pub(super) fn expired(&self) -> bool {
        self.time_left().is_zero()
    }

    /// Time until the absolute expiry (zero once it has passed), by this host's clock.
    pub(super) fn time_left(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Duration::from_secs(self.absolute_expires_at).saturating_sub(now)
    }
}

struct Entry {
    info: std::sync::Arc<SessionInfo>,
    fetched: Instant,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<SessionId, Entry>,
    // Tags revoked recently, so a validation answered just before a revocation cannot put the
    // session back. Kept for one TTL.
    tombstones: HashMap<SessionTag, Instant>,
}

/// Validated sessions, each served for at most `ttl` after its validation.
pub(super) struct SessionCache {
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl SessionCache {
    /// An empty cache.
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only a map behind: keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached session, if validated less than a TTL ago and not expired.
    pub(super) fn get(&self, id: &SessionId) -> Option<std::sync::Arc<SessionInfo>> {
        let mut inner = self.lock();
        let entry = inner.by_id.get(id)?;
        if entry.fetched.elapsed() < self.ttl && !entry.info.expired() {
            return Some(entry.info.clone());
        }
        inner.by_id.remove(id);
        None
    }

    /// Remembers a freshly validated session. Returns false (and keeps nothing) if the session
    /// was revoked while its validation was in flight.
    pub(super) fn insert(&self, id: SessionId, info: std::sync::Arc<SessionInfo>) -> bool {
        let mut inner = self.lock();
        let ttl = self.ttl;
        inner.tombstones.retain(|_, at| at.elapsed() < ttl);
        if inner.tombstones.contains_key(&info.tag) {
            return false;
        }
        if inner.by_id.len() > 100_000 {
            inner.by_id.retain(|_, e| e.fetched.elapsed() < ttl);
        }
        inner.by_id.insert(
            id,
            Entry {
                info,
                fetched: Instant::now(),
            },
        );
        true
    }

    /// Forgets every cached session (revocation tombstones stay); returns how many there were.
    pub(super) fn clear(&self) -> usize {
        let mut inner = self.lock();
        let n = inner.by_id.len();
        inner.by_id.clear();
        n
    }

    /// Forgets the session with this tag and refuses to cache it again for one TTL.
    pub(super) fn revoke(&self, tag: &SessionTag) -> bool {
        let mut inner = self.lock();
        inner.tombstones.insert(tag.clone(), Instant::now());
        let before = inner.by_id.len();
        inner.by_id.retain(|_, e| &e.info.tag != tag);
        inner.by_id.len() != before
    }

    /// Whether the tag was revoked within the last TTL.
    pub(super) fn is_revoked(&self, tag: &SessionTag) -> bool {
        self.lock()
            .tombstones
            .get(tag)
            .is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Number of cached sessions.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether nothing is cached.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type ConnMap = HashMap<SessionTag, (SessionId, HashMap<u64, CancellationToken>)>;

/// The open connections of each session.
#[derive(Default)]
pub(super) struct Connections {
    next: AtomicU64,
    map: Mutex<ConnMap>,
}

/// A registered connection; dropping it unregisters it.
pub(super) struct ConnGuard<'a> {
    owner: &'a Connections,
    tag: SessionTag,
    id: u64,
    /// Cancelled when the session is revoked.
    pub token: CancellationToken,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection of the session `session` (whose tag is `tag`).
    pub(super) fn register(&self, tag: &SessionTag, session: &SessionId) -> ConnGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.lock()
            .entry(tag.clone())
            .or_insert_with(|| (session.clone(), HashMap::new()))
            .1
            .insert(id, token.clone());
        ConnGuard {
            owner: self,
            tag: tag.clone(),
            id,
            token,
        }
    }

    /// Cancels every open connection of the session; returns how many.
    pub(super) fn cut(&self, tag: &SessionTag) -> usize {
        let Some((_, conns)) = self.lock().remove(tag) else {
            return 0;
        };
        for token in conns.values() {
            token.cancel();
        }
        conns.len()
    }

    /// The sessions that have open connections.
    pub(super) fn sessions(&self) -> Vec<(SessionTag, SessionId)> {
        self.lock()
            .iter()
            .map(|(tag, (id, _))| (tag.clone(), id.clone()))
            .collect()
    }
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.owner.lock();
        if let Some((_, conns)) = map.get_mut(&self.tag) {
            conns.remove(&self.id);
            if conns.is_empty() {
                map.remove(&self.tag);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn info(tag: &str) -> Arc<SessionInfo> {
        Arc::new(SessionInfo {
            tag: SessionTag(tag.into()),
            user: "alice".into(),
            groups: vec!["staff".into()],
            session_key: SessionKey::generate(),
            app_id: "mail".into(),
            app_version: "1.0".into(),
            device_id: "phone".into(),
            site: "main".into(),
            absolute_expires_at: u64::MAX,
        })
    }

    #[test]
    fn ttl_bounds_an_entry() {
        let cache = SessionCache::new(Duration::from_millis(50));
        let id = SessionId::generate();
        assert!(cache.insert(id.clone(), info("t1")));
        assert!(cache.get(&id).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(&id).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn expired_sessions_are_not_served() {
        let cache = SessionCache::new(Duration::from_secs(60));
        let id = SessionId::generate();
        let mut i = (*info("t1")).clone();
        i.absolute_expires_at = 1;
        cache.insert(id.clone(), Arc::new(i));
        assert!(cache.get(&id).is_none());
    }

    #[test]
    fn revocation_empties_and_blocks_reinsertion() {
        let cache = SessionCache::new(Duration::from_secs(60));
        let (a, b) = (SessionId::generate(), SessionId::generate());
        cache.insert(a.clone(), info("ta"));
        cache.insert(b.clone(), info("tb"));
        assert!(cache.revoke(&SessionTag("ta".into())));
        assert!(cache.get(&a).is_none());
        assert!(cache.get(&b).is_some());
        assert!(cache.is_revoked(&SessionTag("ta".into())));
        assert!(!cache.insert(a.clone(), info("ta")));
        assert!(cache.get(&a).is_none());
        assert!(!cache.revoke(&SessionTag("unknown".into())));
        // Clearing forgets b but not a's tombstone.
        assert_eq!(cache.clear(), 1);
        assert!(cache.get(&b).is_none());
        assert!(!cache.insert(a, info("ta")));
        assert!(cache.insert(b.clone(), info("tb")));
    }

    #[test]
    fn time_left_counts_down_to_the_absolute_expiry() {
        let mut i = (*info("t1")).clone();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        i.absolute_expires_at = now + 100;
        assert!(i.time_left() > Duration::from_secs(98) && !i.expired());
        i.absolute_expires_at = now.saturating_sub(1);
        assert_eq!(i.time_left(), Duration::ZERO);
        assert!(i.expired());
    }

    #[test]
    fn cut_cancels_only_that_sessions_connections() {
        let conns = Connections::default();
        let (ta, tb) = (SessionTag("a".into()), SessionTag("b".into()));
        let (sa, sb) = (SessionId::generate(), SessionId::generate());
        let a1 = conns.register(&ta, &sa);
        let a2 = conns.register(&ta, &sa);
        let b1 = conns.register(&tb, &sb);
        assert_eq!(conns.sessions().len(), 2);
        assert_eq!(conns.cut(&ta), 2);
        assert!(a1.token.is_cancelled() && a2.token.is_cancelled());
        assert!(!b1.token.is_cancelled());
        assert_eq!(conns.sessions(), vec![(tb.clone(), sb)]);
        drop(b1);
        assert!(conns.sessions().is_empty());
        assert_eq!(conns.cut(&tb), 0);
        assert_eq!(conns.cut(&ta), 0);
    }
}
