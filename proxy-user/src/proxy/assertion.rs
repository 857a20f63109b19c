//! Identity assertions for http back ends: the signed, short-lived JWT the Security server makes
//! for a (session, resource), fetched through the proxies' API and reused for the requests of
//! that pair until shortly before it expires, so most requests cost no round trip.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use scm_proto::crypto::{SessionId, SessionTag};

use super::security_client::SecurityClient;

/// Most cached assertions; past it the expired ones go, and if that is not enough all of them
/// (they are fetched again on demand), so the cache stays bounded whatever the devices do.
const MAX_ENTRIES: usize = 65_536;
/// A cached token is not handed out when less than this is left of it (a quarter of its life
/// when that is shorter), so a back end never receives one about to expire in flight.
const MAX_MARGIN: Duration = Duration::from_secs(15);

/// Why a request got no assertion.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub(super) enum AssertionError {
    /// No Security server answered.
    #[error("no Security server could sign the identity assertion: {0}")]
    Unavailable(String),
    /// The Security server refused (session ended, resource not allowed).
    #[error("identity assertion refused: {code}: {message}")]
    Refused {
        /// The stable error code.
        code: String,
        /// Its explanation.
        message: String,
    },
}

/// Gets the assertion of one connection's (session, resource), cached.
pub(super) type AssertionFn = Box<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<HeaderValue, AssertionError>> + Send>>
        + Send
        + Sync,
>;

struct Cached {
    header: HeaderValue,
    /// Monotonic: handed out until then.
    fresh_until: Instant,
}

/// The assertions this proxy holds, by (session tag, resource).
#[derive(Default)]
pub(super) struct AssertionCache {
    map: Mutex<HashMap<(SessionTag, String), Cached>>,
}

impl AssertionCache {
    /// The cached assertion for `(tag, resource)`, or a new one from the Security server.
    pub(super) async fn get(
        &self,
        security: &SecurityClient,
        id: &SessionId,
        tag: &SessionTag,
        resource: &str,
    ) -> Result<HeaderValue, AssertionError> {
        let key = (tag.clone(), resource.to_owned());
        let now = Instant::now();
        if let Some(c) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|c| c.fresh_until > now)
        {
            return Ok(c.header.clone());
        }
        let answer = match security.assertion(id, resource).await {
            Ok(Ok(a)) => a,
            Ok(Err(body)) => {
                return Err(AssertionError::Refused {
                    code: body.code,
                    message: body.message,
                });
            }
            Err(e) => return Err(AssertionError::Unavailable(e.to_string())),
        };
        let header = HeaderValue::from_str(&answer.token).map_err(|_| {
            AssertionError::Unavailable("the Security server's token is not a header value".into())
        })?;
        // The lifetime the Security server gave, measured on this host's monotonic clock, so a
        // skewed wall clock here cannot make the proxy hand out expired tokens.
        let life = Duration::from_secs(answer.expires_in);
        let margin = (life / 4).min(MAX_MARGIN);
        let fresh_until = now + life.saturating_sub(margin);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, c| c.fresh_until > now);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(
            key,
            Cached {
                header: header.clone(),
                fresh_until,
            },
        );
        Ok(header)
    }

    /// Forgets a session's assertions (it was revoked).
    pub(super) fn forget(&self, tag: &SessionTag) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(t, _), _| t != tag);
    }
}
