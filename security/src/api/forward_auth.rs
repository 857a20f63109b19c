//! Forward authentication for a reverse proxy in front of web back ends (nginx `auth_request`):
//! "whose session is this bearer token?" answered with identity headers. Off unless
//! `--forward-auth-listen` is given; served on a listener of its own that requires a client
//! certificate (only the reverse proxies may ask), rate-limited per source and overall, and never
//! counted as session activity (a session used only through forward-auth still ends at its idle
//! timeout; the device keeps it alive by logging in and opening tunnels).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::any;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{bearer, method_not_allowed, not_found};
use crate::config::ServeArgs;
use crate::error::{ApiError, Error};
use crate::state::Shared;
use crate::tls::Peer;

/// The one endpoint: any method (nginx may forward the original request's method), no body read.
pub const PATH_FORWARD_AUTH: &str = "/v1/auth/forward";

/// Distinct source addresses the limiter tracks at once. The listener only admits holders of a
/// client certificate (a handful of reverse proxies), so this is never reached in honest use; it
/// bounds memory if it were.
const MAX_SOURCES: usize = 4096;

/// Identity headers of a 200 answer (the same names scm-proxy's HTTP mode sets).
pub mod headers {
    /// Canonical user name.
    pub const USER: &str = "x-scm-user";
    /// The user's groups at login, comma-separated.
    pub const GROUPS: &str = "x-scm-groups";
    /// The user's site.
    pub const SITE: &str = "x-scm-site";
    /// The device id.
    pub const DEVICE: &str = "x-scm-device";
    /// App id and version at login, `app/1.2.3`.
    pub const APP: &str = "x-scm-app";
    /// The session's loggable tag (never the id).
    pub const SESSION_TAG: &str = "x-scm-session-tag";
}

/// A token bucket: `rate` tokens a second, holding at most `rate` (one second's burst).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Self {
        Self {
            tokens: rate,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.at = now;
    }

    /// Time until one token is there (zero when one is).
    fn wait(&self, rate: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / rate).max(0.0))
    }
}

/// The forward-auth rate limits: one bucket per source address and one for all sources.
#[derive(Debug)]
pub struct Limits {
    per_source: f64,
    overall: f64,
    inner: Mutex<(Bucket, HashMap<IpAddr, Bucket>)>,
}

impl Limits {
    /// Limits of `per_source` and `overall` requests per second (each at least 1).
    pub fn new(per_source: u32, overall: u32) -> Self {
        let (per_source, overall) = (f64::from(per_source.max(1)), f64::from(overall.max(1)));
        Self {
            per_source,
            overall,
            inner: Mutex::new((Bucket::full(overall, Instant::now()), HashMap::new())),
        }
    }

    /// Takes one request from `ip`'s bucket and the overall one, or neither: `Err(wait)` with the
    /// time until both could serve it.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        // Every update is a few assignments, so a poisoned lock still holds consistent buckets.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (overall, sources) = &mut *guard;
        overall.refill(self.overall, now);
        if !sources.contains_key(&ip) && sources.len() >= MAX_SOURCES {
            // A refilled bucket is the same as a missing one: forget those first.
            let rate = self.per_source;
            sources.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < rate
            });
            if sources.len() >= MAX_SOURCES {
                return Err(Duration::from_secs(1));
            }
        }
        let mine = sources
            .entry(ip)
            .or_insert_with(|| Bucket::full(self.per_source, now));
        mine.refill(self.per_source, now);
        if mine.tokens < 1.0 || overall.tokens < 1.0 {
            return Err(mine.wait(self.per_source).max(overall.wait(self.overall)));
        }
        mine.tokens -= 1.0;
        overall.tokens -= 1.0;
        Ok(())
    }
}

/// What the forward-auth handler shares.
#[derive(Debug)]
struct ForwardAuth {
    state: Shared,
    limits: Limits,
}

/// The forward-auth listener's routes: [`PATH_FORWARD_AUTH`] and nothing else (not even
/// `/healthz`: a reverse proxy has no business with the device API).
pub fn router(state: Shared, limits: Limits) -> Router {
    Router::new()
        .route(PATH_FORWARD_AUTH, any(check))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Arc::new(ForwardAuth { state, limits }))
}

/// The session named by the `Authorization: Bearer` token → 200 with the identity headers and
/// no body, else 401 `unknown_session`; 429 `rate_limited` (with `Retry-After`) over the limits.
/// Never the session key, and never counted as activity.
async fn check(
    State(fa): State<Arc<ForwardAuth>>,
    Extension(peer): Extension<Peer>,
    req: HeaderMap,
) -> Response {
    if let Err(wait) = fa.limits.admit(peer.0.ip(), Instant::now()) {
        tracing::debug!(source = %peer.0.ip(), "forward-auth request over the rate limit");
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many forward-auth requests from this source or from all sources \
             (--forward-auth-rate-per-source, --forward-auth-rate); try again later",
        )
        .into_response();
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    let Some(s) = bearer(&req).and_then(|t| fa.state.sessions.peek(t).ok()) else {
        return ApiError::unauthorized("unknown_session", "no such live session").into_response();
    };
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    let mut put = |name: &'static str, value: &str| {
        // Every value is a name checked at enrollment or login (visible ASCII); one that were not
        // a valid header value is left out rather than sent mangled.
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    put(headers::USER, &s.user);
    put(headers::GROUPS, &s.groups.join(","));
    put(headers::SITE, &s.site);
    put(headers::DEVICE, &s.device_id);
    put(headers::APP, &format!("{}/{}", s.app_id, s.app_version));
    put(headers::SESSION_TAG, &s.tag.0);
    resp
}

/// The forward-auth listener, bound and configured, not yet serving.
#[derive(Debug)]
pub struct Listener {
    /// The address it is bound to.
    pub addr: SocketAddr,
    listener: TcpListener,
    /// Its TLS configuration (a SIGHUP rebuilds it, CA included).
    pub tls: Arc<crate::tls::LiveConfig>,
    router: Router,
}

/// Binds the forward-auth listener when `--forward-auth-listen` asks for one (`None` otherwise),
/// with its mutual-TLS configuration (client certificates from `--forward-auth-client-ca`, else
/// `--client-ca`).
pub async fn bind(
    args: &ServeArgs,
    state: Shared,
    cert: &Arc<scm_proto::lifecycle::reload::CertReloader>,
) -> Result<Option<Listener>, Error> {
    let fa = &args.forward_auth;
    let Some(addr) = fa.forward_auth_listen else {
        return Ok(None);
    };
    let ca = match &fa.forward_auth_client_ca {
        Some(ca) => ca.clone(),
        None => {
            tracing::warn!(
                ca = %args.client_ca.display(),
                "forward-auth trusts the proxies' --client-ca: a reverse proxy's certificate from \
                 it would also open the proxies' API (session keys); give \
                 --forward-auth-client-ca a CA of its own"
            );
            args.client_ca.clone()
        }
    };
    let tls = crate::tls::LiveConfig::mtls(cert.clone(), &ca, &[])?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("listening on {addr} (--forward-auth-listen)"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the forward-auth listener's address", e))?;
    tracing::info!(
        forward_auth = %addr,
        client_ca = %ca.display(),
        per_source = fa.forward_auth_rate_per_source,
        overall = fa.forward_auth_rate,
        "forward-auth listening (mutual TLS; requests/s limits)"
    );
    Ok(Some(Listener {
        addr,
        listener,
        tls,
        router: router(
            state,
            Limits::new(fa.forward_auth_rate_per_source, fa.forward_auth_rate),
        ),
    }))
}

impl Listener {
    /// Serves until `drain` is set (then until its last request ends) or `stop` is cancelled.
    pub async fn serve(
        self,
        limits: crate::tls::ListenerLimits,
        drain: scm_proto::lifecycle::Drain,
        stop: CancellationToken,
    ) {
        crate::tls::serve(
            "forward-auth",
            self.listener,
            self.tls,
            self.router,
            limits,
            drain,
            stop,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn per_source_bucket_refills_at_its_rate() {
        let l = Limits::new(2, 1000);
        let t0 = Instant::now();
        assert!(l.admit(ip(1), t0).is_ok());
        assert!(l.admit(ip(1), t0).is_ok());
        let wait = l.admit(ip(1), t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        // Another source has its own bucket.
        assert!(l.admit(ip(2), t0).is_ok());
        // Half a second later one token is back.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.admit(ip(1), t1).is_ok());
        assert!(l.admit(ip(1), t1).is_err());
    }

    #[test]
    fn overall_bucket_is_shared_and_a_refusal_takes_nothing() {
        let l = Limits::new(10, 3);
        let t0 = Instant::now();
        for n in 1..=3 {
            assert!(l.admit(ip(n), t0).is_ok());
        }
        assert!(l.admit(ip(4), t0).is_err());
        // The refused request took no token from source 4: after the overall bucket refills,
        // source 4 still has its full burst.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            assert!(l.admit(ip(4), t1).is_ok());
        }
    }

    #[test]
    fn source_table_is_bounded() {
        let l = Limits::new(1, u32::MAX);
        let t0 = Instant::now();
        for n in 0..MAX_SOURCES {
            let a = IpAddr::from((n as u128).to_be_bytes());
            assert!(l.admit(a, t0).is_ok());
        }
        // Full of busy sources: a new one waits.
        assert!(l.admit(ip(1), t0).is_err());
        // A second later every bucket has refilled and is forgotten to make room.
        assert!(l.admit(ip(1), t0 + Duration::from_secs(1)).is_ok());
        let len = l.inner.lock().unwrap().1.len();
        assert_eq!(len, 1);
    }
}
