//! The proxies' API, served only to clients with a certificate from the configured CA (not
//! revoked by `--client-crl`) that is on the proxy allow-list (`--proxy-allow`): session
//! validation (limited to the proxy's sites), the revocation stream (NDJSON), the resource
//! catalog and the app policy.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderValue, header};
use axum::middleware;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use scm_proto::BINDING_EXPORTER_LEN;
use scm_proto::api::{
    AppPolicy, BindingProof, PATH_PROXY_APPS, PATH_PROXY_RESOURCES, PATH_PROXY_REVOCATIONS,
    PATH_PROXY_VALIDATE, ProxyEvent, Resource, ValidateRequest, ValidateResponse,
};
use scm_proto::crypto;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiJson, method_not_allowed, not_found};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::proxyauth::{AdmittedProxy, AllowList};
use crate::sessions::{Lookup, Session};
use crate::state::Shared;

/// The proxies' API routes behind the proxy allow-list (an empty one admits any certificate from
/// `--client-ca`): every request, known route or not, is checked against it first.
pub(crate) fn router(state: Shared, allow: Arc<AllowList>) -> Router {
    Router::new()
        .route(PATH_PROXY_VALIDATE, post(validate))
        .route(PATH_PROXY_REVOCATIONS, get(revocations))
        .route(PATH_PROXY_RESOURCES, get(resources))
        .route(PATH_PROXY_APPS, get(apps))
        .route(scm_proto::api::PATH_PROXY_ASSERTION, post(assertion))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            allow,
            crate::proxyauth::require_allowed,
        ))
        .with_state(state)
}

async fn validate(
    State(st): State<Shared>,
    proxy: Option<Extension<AdmittedProxy>>,
    ApiJson(req): ApiJson<ValidateRequest>,
) -> Result<Json<ValidateResponse>, ApiError> {
    let _timer = crate::timings::Timer::start(&st.metrics.validation_seconds);
    // Peek before validating: validation counts as activity, which a proxy of another site
    // must not cause.
    let s = st.sessions.peek(&req.session_id).ok();
    if let (Some(Extension(p)), Some(s)) = (&proxy, &s)
        && !p.serves(&s.site)
    {
        tracing::warn!(proxy = %p.identity, site = %s.site, "proxy asked for a session of a site it does not serve");
        return Err(ApiError::forbidden(
            "wrong_site",
            format!(
                "this proxy ({}) does not serve the session's site",
                p.identity
            ),
        ));
    }
    let lookup_error = |l| match l {
        Lookup::Unknown => ApiError::not_found("unknown_session", "no such live session"),
        Lookup::Expired => ApiError::not_found("session_expired", "the session has expired"),
    };
    let s = match &req.binding {
        // A proxy admitting a new connection: the validation counts as activity only once the
        // device's binding MAC verifies, so a session id with a wrong MAC cannot keep it alive.
        Some(proof) => {
            let proof = DecodedProof::new(proof)?;
            st.sessions
                .validate_bound(&req.session_id, |s| proof.holds(s, &req.session_id))
                .map_err(lookup_error)?
                .ok_or_else(|| {
                    ApiError::forbidden(
                        "binding_failed",
                        "the binding MAC does not match this session and connection",
                    )
                })?
        }
        // A revalidation of a session whose connections the proxy already bound.
        None => st
            .sessions
            .validate(&req.session_id)
            .map_err(lookup_error)?,
    };
    let allowed_resources = st
        .resources()
        .iter()
        .filter(|r| r.allowed_groups.iter().any(|g| s.groups.contains(g)))
        .map(|r| r.name.clone())
        .collect();
    Ok(Json(ValidateResponse {
        session_tag: s.tag.0.clone(),
        user: s.user.clone(),
        groups: s.groups.clone(),
        session_key: crypto::b64(s.key.as_bytes()),
        app_id: s.app_id.clone(),
        app_version: s.app_version.clone(),
        device_id: s.device_id.clone(),
        site: s.site.clone(),
        idle_timeout_secs: st.sessions.idle_timeout().as_secs(),
        absolute_expires_at: s.absolute_expires_ms / 1000,
        allowed_resources,
    }))
}

/// A [`BindingProof`] with its binary fields decoded (so a malformed one is refused before the
/// session is looked up).
struct DecodedProof<'a> {
    exporter: [u8; BINDING_EXPORTER_LEN],
    mac: [u8; 32],
    fields: &'a BindingProof,
}

impl<'a> DecodedProof<'a> {
    fn new(p: &'a BindingProof) -> Result<Self, ApiError> {
        let bad = |e: crypto::KeyError| ApiError::bad_request("bad_binding_proof", e.to_string());
        Ok(Self {
            exporter: crypto::decode_fixed("binding.exporter", &p.exporter).map_err(bad)?,
            mac: crypto::decode_fixed("binding.mac", &p.mac).map_err(bad)?,
            fields: p,
        })
    }

    /// Whether the MAC was made with this session's key over this transcript (constant time).
    fn holds(&self, s: &Session, session_id: &str) -> bool {
        let t = crypto::BindingTranscript {
            exporter: &self.exporter,
            session_id,
            app_id: &self.fields.app_id,
            app_version: &self.fields.app_version,
            device_id: &self.fields.device_id,
            resource: &self.fields.resource,
        };
        crypto::verify_binding_mac(&s.key, &t, &self.mac)
    }
}

fn line(ev: &ProxyEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Newline-delimited [`ProxyEvent`]s: a heartbeat at once (so a subscriber knows it is live),
/// every revocation as it happens, and a heartbeat every interval. A subscriber too slow to keep
/// up is disconnected, so it reconnects and drops its cache rather than miss a revocation. The
/// stream ends when the server drains (SIGTERM), so the proxy moves to another Security server
/// instead of holding the drain open until its timeout.
async fn revocations(
    State(st): State<Shared>,
    drain: Option<Extension<scm_proto::lifecycle::Drain>>,
) -> Response {
    let rx = st.sessions.subscribe();
    let mut tick = tokio::time::interval(st.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let drain = drain.map(|Extension(d)| d).unwrap_or_default();
    let stream = futures_util::stream::unfold(
        (rx, tick, drain),
        |(mut rx, mut tick, drain)| async move {
            let ev = tokio::select! {
                () = drain.wait() => return None,
                r = rx.recv() => match r {
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "revocation subscriber lagged; closing its stream");
                        return None;
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = tick.tick() => ProxyEvent::Heartbeat { at: now_ms() / 1000 },
            };
            Some((Ok::<_, Infallible>(line(&ev)), (rx, tick, drain)))
        },
    );
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn resources(State(st): State<Shared>) -> Json<Vec<Resource>> {
    Json(st.resources().as_ref().clone())
}

async fn apps(State(st): State<Shared>) -> Result<Json<Vec<AppPolicy>>, ApiError> {
    Ok(Json(st.store.policies().await?))
}

/// A signed identity assertion of a live session for one resource its groups allow; does not
/// count as activity (the proxy asks on behalf of requests its validation already counted).
async fn assertion(
    State(st): State<Shared>,
    ApiJson(req): ApiJson<scm_proto::api::AssertionRequest>,
) -> Result<Json<scm_proto::api::AssertionResponse>, ApiError> {
    let s = st.sessions.peek(&req.session_id).map_err(|l| match l {
        Lookup::Unknown => ApiError::not_found("unknown_session", "no such live session"),
        Lookup::Expired => ApiError::not_found("session_expired", "the session has expired"),
    })?;
    let catalog = st.resources();
    let Some(r) = catalog.iter().find(|r| r.name == req.resource) else {
        return Err(ApiError::not_found(
            "unknown_resource",
            "no resource of that name in the catalog",
        ));
    };
    if !r.allowed_groups.iter().any(|g| s.groups.contains(g)) {
        return Err(ApiError::forbidden(
            "resource_refused",
            format!("the session's groups do not allow resource {}", r.name),
        ));
    }
    let signed = st.assertions.sign(&s, &r.name).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "assertion_unavailable",
            e.to_string(),
        )
    })?;
    Ok(Json(scm_proto::api::AssertionResponse {
        token: signed.token,
        expires_at: signed.expires_at.max(0) as u64,
        expires_in: signed.expires_in.max(0) as u64,
        kid: signed.kid,
    }))
}
