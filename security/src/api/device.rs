//! The device API: challenge, enroll, login, logout, app update check and download.

use std::net::IpAddr;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use scm_proto::api::{
    ChallengeResponse, EnrollRequest, EnrollResponse, LoginRequest, LoginResponse, PATH_CHALLENGE,
    PATH_ENROLL, PATH_LOGIN, PATH_LOGOUT, UpdateCheckResponse,
};
use scm_proto::crypto::{self, LoginTranscript, Nonce, SharedKey};
use scm_proto::version::AppVersion;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{
    ApiJson, admit, bearer, method_not_allowed, not_found, path_error, query_error, rate_limited,
};
use crate::challenges::ChallengeError;
use crate::directory::AuthError;
use crate::error::ApiError;
use crate::limits::{Attempt, Refused};
use crate::sessions::NewSession;
use crate::state::Shared;
use crate::store::{KeyRow, UserRow, unix_now};
use crate::tls::Peer;

/// The device API's routes.
pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route(PATH_CHALLENGE, post(challenge))
        .route(PATH_ENROLL, post(enroll))
        .route(PATH_LOGIN, post(login))
        .route(PATH_LOGOUT, post(logout))
        .route("/v1/apps/{app_id}/update", get(update_check))
        .route(
            "/v1/apps/{app_id}/download/{platform}/{version}",
            get(download),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(scm_proto::api::PATH_JWKS, get(jwks))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// `GET /.well-known/jwks.json`: the JWK Set. Caches may keep it one reload interval, shorter
/// than the time a new key is published before it signs.
async fn jwks(State(st): State<Shared>) -> Response {
    let set = st.assertions.jwks(unix_now());
    let mut resp = axum::Json(set).into_response();
    let max_age = st.assertions.settings().check_interval().as_secs();
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("public, max-age={max_age}")) {
        resp.headers_mut()
            .insert(axum::http::header::CACHE_CONTROL, v);
    }
    resp
}

/// Checks an identifier the preamble will carry: visible ASCII within the preamble's limit.
fn check_field(what: &'static str, text: &str, max: usize) -> Result<(), ApiError> {
    if text.is_empty() || text.len() > max || !text.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("{what} must be 1..={max} visible ASCII characters"),
        ));
    }
    Ok(())
}

/// Splits `user` or `user@site`.
fn split_user(text: &str) -> Result<(&str, Option<&str>), ApiError> {
    let (name, site) = match text.split_once('@') {
        Some((n, s)) => (n, Some(s)),
        None => (text, None),
    };
    let bad = |_| ApiError::bad_request("invalid_field", "username must be user or user@site");
    crate::store::check_name("username", name, 64).map_err(bad)?;
    if let Some(s) = site {
        crate::store::check_name("site", s, 64).map_err(bad)?;
    }
    Ok((name, site))
}

fn locked_out() -> ApiError {
    ApiError::forbidden(
        "locked_out",
        "this user is locked out after repeated failures; try again later or ask an admin",
    )
}

fn unavailable(e: crate::error::Error) -> ApiError {
    if matches!(e, crate::error::Error::HashQueueFull(_)) {
        tracing::warn!(error = %e, "password check refused: the hashing queue is full");
        return e.into();
    }
    tracing::error!(error = %e, "directory unavailable");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "directory_unavailable",
        "the user directory cannot be reached",
    )
}

fn attempts_in_flight() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "attempts_in_flight",
        "as many attempts as failures still allowed are in progress; try again in a moment",
    )
}

/// Reserves a password check for the source and the user before any hashing, so concurrent
/// attempts cannot all be checked: at most the remaining allowance is in flight at once.
fn reserve<'a>(
    st: &'a Shared,
    name: &str,
    ip: IpAddr,
) -> Result<(Attempt<'a, IpAddr>, Attempt<'a, String>), ApiError> {
    let src = st.limiter.reserve(ip).map_err(|r| match r {
        Refused::Locked => rate_limited(),
        Refused::InFlight => attempts_in_flight(),
    })?;
    let user = st.lockouts.reserve(&name.to_owned()).map_err(|r| match r {
        Refused::Locked => locked_out(),
        Refused::InFlight => attempts_in_flight(),
    })?;
    Ok((src, user))
}

/// Counts a failure of a reserved check against the user and the source, and audits it.
async fn failed_check(
    st: &Shared,
    kind: &str,
    user: &str,
    ip: IpAddr,
    (src, attempt): (Attempt<'_, IpAddr>, Attempt<'_, String>),
    err: ApiError,
) -> ApiError {
    src.fail();
    if attempt.fail() {
        tracing::warn!(user, "user locked out");
        st.audit("lockout", user, user, &ip.to_string(), "too many failures")
            .await;
    }
    st.audit_failure(kind, user, &ip, err.code).await;
    err
}

/// Counts a failure against the user and the source (no reservation), and audits it.
async fn failure(st: &Shared, kind: &str, user: &str, ip: IpAddr, err: ApiError) -> ApiError {
    st.limiter.fail(ip);
    if st.lockouts.fail(&user.to_owned()) {
        tracing::warn!(user, "user locked out");
        st.audit("lockout", user, user, &ip.to_string(), "too many failures")
            .await;
    }
    st.audit_failure(kind, user, &ip, err.code).await;
    err
}

/// A failure before any proof of the device key (unknown key, bad MAC): it says nothing about
/// the user, whose name anyone can type, so it counts against the source only.
async fn source_failure(
    st: &Shared,
    kind: &str,
    user: &str,
    ip: IpAddr,
    err: ApiError,
) -> ApiError {
    st.limiter.fail(ip);
    st.audit_failure(kind, user, &ip, err.code).await;
    err
}

async fn challenge(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<ChallengeResponse>, ApiError> {
    let ip = peer.0.ip();
    admit(&st.limiter, ip)?;
    if let Some(l) = &st.challenge_limiter {
        if l.is_blocked(ip) {
            return Err(rate_limited());
        }
        l.fail(ip);
    }
    let (id, nonce) = st.challenges.issue();
    Ok(Json(ChallengeResponse {
        challenge_id: id,
        server_nonce: crypto::b64(&nonce),
        expires_in_secs: st.challenges.ttl().as_secs(),
    }))
}

fn code_hash(code: &str) -> String {
    hex::encode(Sha256::digest(code.trim().as_bytes()))
}

async fn authenticate(
    st: &Shared,
    kind: &str,
    name: &str,
    site: Option<&str>,
    password: &str,
    ip: IpAddr,
) -> Result<UserRow, ApiError> {
    let attempts = reserve(st, name, ip)?;
    let user = match st.directory.authenticate(name, password).await {
        Ok(u) => u,
        Err(AuthError::BadCredentials) => {
            let e = ApiError::unauthorized("bad_credentials", "wrong user name or password");
            return Err(failed_check(st, kind, name, ip, attempts, e).await);
        }
        // Says nothing about the password: the reservations are released uncounted.
        Err(AuthError::Unavailable(e)) => return Err(unavailable(e)),
    };
    if site.is_some_and(|s| s != user.site) {
        let e = ApiError::unauthorized("wrong_site", "the user does not belong to that site");
        return Err(failed_check(st, kind, name, ip, attempts, e).await);
    }
    let (_src, attempt) = attempts;
    attempt.succeed();
    Ok(user)
}

async fn enroll(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let ip = peer.0.ip();
    admit(&st.limiter, ip)?;
    let (name, site) = split_user(&req.username)?;
    check_field("device_id", &req.device_id, 128)?;
    check_field("app_id", &req.app_id, 64)?;
    if st.settings.require_activation_code && req.activation_code.is_none() {
        return Err(ApiError::forbidden(
            "activation_code_required",
            "this server requires an activation code from an admin to enroll",
        ));
    }
    if st.lockouts.is_locked(&name.to_owned()) {
        return Err(locked_out());
    }
    let user = authenticate(&st, "enroll_failed", name, site, &req.password, ip).await?;
    let code = req.activation_code.as_deref().map(code_hash);
    if let Some(h) = &code
        && !st.store.consume_activation_code(h, &user.name).await?
    {
        let e = ApiError::forbidden(
            "bad_activation_code",
            "the activation code is wrong, used or expired",
        );
        return Err(failure(&st, "enroll_failed", name, ip, e).await);
    }
    let key = SharedKey::generate();
    let key_id = format!("k_{}", hex::encode(crypto::random_bytes::<16>()));
    let sealed = st.master.seal(&key_id, &key)?;
    let row = KeyRow {
        key_id: key_id.clone(),
        user_name: user.name.clone(),
        device_id: req.device_id.clone(),
        app_id: req.app_id.clone(),
        sealed_key: sealed.0,
        created_at: unix_now(),
        revoked_at: None,
    };
    let replaced = match st.store.insert_key(&row).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(h) = &code {
                let _ = st.store.release_activation_code(h).await;
            }
            return Err(e.into());
        }
    };
    for old in &replaced {
        st.sessions
            .remove_where(|s| &s.key_id == old, "key_revoked");
    }
    tracing::info!(user = %user.name, device = %req.device_id, app = %req.app_id, %key_id, "enrolled");
    st.audit(
        "enroll",
        &user.name,
        &key_id,
        &ip.to_string(),
        &format!(
            "device={} app={} replaced={:?}",
            req.device_id, req.app_id, replaced
        ),
    )
    .await;
    Ok(Json(EnrollResponse {
        key_id,
        shared_key: key.to_b64(),
    }))
}

fn decode32(what: &'static str, text: &str) -> Result<[u8; 32], ApiError> {
    crypto::decode_fixed::<32>(what, text)
        .map_err(|e| ApiError::bad_request("invalid_field", e.to_string()))
}

async fn login(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let _timer = crate::timings::Timer::start(&st.metrics.login_seconds);
    let ip = peer.0.ip();
    admit(&st.limiter, ip)?;
    // Shape checks first: they change nothing.
    let (name, site) = split_user(&req.username)?;
    check_field("device_id", &req.device_id, 128)?;
    check_field("app_id", &req.app_id, 64)?;
    check_field("app_version", &req.app_version, 32)?;
    check_field("key_id", &req.key_id, 64)?;
    check_field("challenge_id", &req.challenge_id, 64)?;
    let version = AppVersion::parse(&req.app_version)
        .map_err(|e| ApiError::bad_request("invalid_field", e.to_string()))?;
    let client_nonce: Nonce = decode32("client_nonce", &req.client_nonce)?;
    let mac = decode32("mac", &req.mac)?;

    // The challenge is used up whatever happens next: a login cannot be replayed.
    let server_nonce = match st.challenges.take(&req.challenge_id) {
        Ok(n) => n,
        Err(ChallengeError::Unknown) => {
            st.limiter.fail(ip);
            return Err(ApiError::unauthorized(
                "unknown_challenge",
                "the challenge is unknown or already used; get a new one",
            ));
        }
        Err(ChallengeError::Expired) => {
            return Err(ApiError::unauthorized(
                "challenge_expired",
                "the challenge has expired; get a new one",
            ));
        }
        Err(ChallengeError::Busy) => {
            tracing::warn!("login refused: the set of used challenges is full");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many logins in the last challenge lifetime; try again in a moment",
            ));
        }
    };
    if st.lockouts.is_locked(&name.to_owned()) {
        st.audit_failure("login_failed", name, &ip, "locked_out")
            .await;
        return Err(locked_out());
    }

    // Proof of the shared key before any password work.
    let key_row =
        st.store.key(&req.key_id).await?.filter(|k| {
            k.user_name == name && k.device_id == req.device_id && k.app_id == req.app_id
        });
    let Some(key_row) = key_row else {
        let e = ApiError::unauthorized("unknown_key", "no such key for this user, device and app");
        return Err(source_failure(&st, "login_failed", name, ip, e).await);
    };
    if key_row.revoked_at.is_some() {
        let e = ApiError::unauthorized("key_revoked", "this device key was revoked; enroll again");
        return Err(source_failure(&st, "login_failed", name, ip, e).await);
    }
    let shared = st.master.open(&key_row.key_id, &key_row.sealed_key)?;
    let transcript = LoginTranscript {
        challenge_id: &req.challenge_id,
        server_nonce: &server_nonce,
        client_nonce: &client_nonce,
        username: &req.username,
        key_id: &req.key_id,
        device_id: &req.device_id,
        app_id: &req.app_id,
        app_version: &req.app_version,
    };
    if !crypto::verify_login_mac(&shared, &transcript, &mac) {
        let e = ApiError::unauthorized("bad_mac", "the proof of the device key does not verify");
        return Err(source_failure(&st, "login_failed", name, ip, e).await);
    }
    let user = authenticate(&st, "login_failed", name, site, &req.password, ip).await?;

    let policy = st.store.policy(&req.app_id).await?;
    if !crate::app_policy::allowed(&policy, &version) {
        return Err(ApiError::forbidden(
            "app_version_not_allowed",
            format!(
                "{} {} may no longer be used; update the app",
                req.app_id, req.app_version
            ),
        ));
    }
    let proxy_urls = st
        .store
        .site(&user.site)
        .await?
        .map(|s| s.proxy_urls)
        .unwrap_or_default();
    let session = st
        .sessions
        .create(
            &shared,
            &server_nonce,
            &client_nonce,
            NewSession {
                user: user.name.clone(),
                groups: user.groups.clone(),
                site: user.site.clone(),
                device_id: req.device_id.clone(),
                app_id: req.app_id.clone(),
                app_version: req.app_version.clone(),
                key_id: req.key_id.clone(),
            },
        )
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_sessions",
                "the session table is full",
            )
        })?;
    tracing::info!(session = %session.tag, user = %user.name, device = %req.device_id, app = %req.app_id, "login");
    st.audit(
        "login",
        &user.name,
        &session.tag.0,
        &ip.to_string(),
        &format!(
            "device={} app={} version={}",
            req.device_id, req.app_id, req.app_version
        ),
    )
    .await;
    Ok(Json(LoginResponse {
        session_id: session.id.expose().to_owned(),
        user: user.name,
        groups: user.groups,
        site: user.site,
        proxy_urls,
        idle_timeout_secs: st.sessions.idle_timeout().as_secs(),
        absolute_expires_at: session.absolute_expires_ms / 1000,
    }))
}

async fn logout(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Some(token) = bearer(&headers) else {
        return Err(ApiError::unauthorized(
            "missing_token",
            "send the session id as Authorization: Bearer <session id>",
        ));
    };
    let Some(s) = st.sessions.end(token, "logout") else {
        return Err(ApiError::unauthorized(
            "unknown_session",
            "no such live session",
        ));
    };
    tracing::info!(session = %s.tag, user = %s.user, "logout");
    st.audit("logout", &s.user, &s.tag.0, &peer.0.ip().to_string(), "")
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of the update check.
#[derive(Debug, Deserialize)]
struct UpdateQuery {
    platform: String,
    version: String,
}

async fn update_check(
    State(st): State<Shared>,
    app_id: Result<Path<String>, PathRejection>,
    q: Result<Query<UpdateQuery>, QueryRejection>,
) -> Result<Json<UpdateCheckResponse>, ApiError> {
    let Path(app_id) = app_id.map_err(path_error)?;
    let Query(q) = q.map_err(query_error)?;
    check_field("app_id", &app_id, 64)?;
    check_field("platform", &q.platform, 32)?;
    let current = AppVersion::parse(&q.version)
        .map_err(|e| ApiError::bad_request("invalid_field", e.to_string()))?;
    let releases = st.store.releases(Some(&app_id)).await?;
    let policy = st.store.policy(&app_id).await?;
    if releases.is_empty() && policy.min_version.is_none() && policy.revoked_versions.is_empty() {
        return Err(ApiError::not_found(
            "unknown_app",
            format!("no app {app_id} is published"),
        ));
    }
    Ok(Json(crate::app_policy::update_answer(
        &releases,
        &policy,
        &q.platform,
        &current,
    )))
}

async fn download(
    State(st): State<Shared>,
    params: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((app_id, platform, version)) = params.map_err(path_error)?;
    let Some(rel) = st.store.release(&app_id, &platform, &version).await? else {
        return Err(ApiError::not_found(
            "unknown_release",
            format!("{app_id} {version} for {platform} is not published"),
        ));
    };
    match crate::packages::download(&crate::packages::dir(&st.settings.data_dir), &rel, &headers)
        .await
    {
        Ok(r) => Ok(r),
        Err(e) => Ok(e.into_response()),
    }
}
