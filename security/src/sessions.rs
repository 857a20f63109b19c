//! In-memory state: live sessions (with idle and absolute expiry). Revocations are broadcast to
//! the proxies' revocation streams the moment they happen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use scm_proto::api::ProxyEvent;
use scm_proto::crypto::{self, Nonce, SessionId, SessionKey, SessionTag};
use tokio::sync::broadcast;

use crate::clock::now_ms;

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
}
