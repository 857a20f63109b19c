//! The admin API (bearer token from the token file): users, devices and keys, sessions, apps,
//! resources, sites, the audit log and LDAP sync. Every change is audited.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use scm_proto::api::{AppPolicy, AppRelease, Resource};
use scm_proto::crypto;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{ApiJson, bearer, method_not_allowed, not_found, path_error, query_error};
use crate::admin_types::{
    ActivationCode, ActivationCodeRequest, AppsListing, NewUser, PolicyUpdate, ResourceBody,
    RevokeResult, SessionInfo, SiteBody, UpdateUser,
};
use crate::error::{ApiError, Error};
use crate::state::Shared;
use crate::store::{AuditRow, KeyRow, SiteRow, UserRow, check_host_port, check_name, unix_now};
use crate::tls::Peer;

type ApiResult<T> = Result<Json<T>, ApiError>;
type P<T> = Result<Path<T>, PathRejection>;

/// The admin API routes, behind the token check.
pub(crate) fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/users", get(list_users).post(add_user))
        .route(
            "/users/{name}",
            axum::routing::patch(update_user).delete(delete_user),
        )
        .route("/users/{name}/unlock", post(unlock_user))
        .route("/users/{name}/activation-codes", post(activation_code))
        .route("/users/{name}/sessions/revoke", post(revoke_user_sessions))
        .route("/keys", get(list_keys))
        .route("/keys/{key_id}/revoke", post(revoke_key))
        .route("/devices/{device_id}/revoke", post(revoke_device))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{tag}/revoke", post(revoke_session))
        .route("/apps", get(list_apps))
        .route("/apps/{app_id}/policy", put(set_policy))
        .route("/apps/{app_id}/{platform}/{version}", put(publish))
        .route("/resources", get(list_resources))
        .route(
            "/resources/{name}",
            put(set_resource).delete(delete_resource),
        )
        .route("/sites", get(list_sites))
        .route("/sites/{name}", put(set_site).delete(delete_site))
        .route("/audit", get(audit))
        .route("/ldap/sync", post(ldap_sync))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest(crate::admin_types::ADMIN_PREFIX, api)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

async fn require_token(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let ip = super::peer_ip(req.extensions());
    if let Err(e) = super::admit(&st.admin_limiter, ip) {
        return e.into_response_();
    }
    let ok = bearer(req.headers()).is_some_and(|t| st.admin_token.matches(t));
    if !ok {
        st.admin_limiter.fail(ip);
        st.audit_failure("admin_auth_failed", "-", &ip, "bad_admin_token")
            .await;
        return ApiError::unauthorized("bad_admin_token", "missing or wrong admin token")
            .into_response_();
    }
    next.run(req).await
}

trait IntoResp {
    fn into_response_(self) -> Response;
}
impl IntoResp for ApiError {
    fn into_response_(self) -> Response {
        axum::response::IntoResponse::into_response(self)
    }
}

fn src(p: &Peer) -> String {
    p.0.ip().to_string()
}

fn check_groups(groups: &[String]) -> Result<(), ApiError> {
    for g in groups {
        check_name("group", g, 64)?;
    }
    Ok(())
}

async fn list_users(State(st): State<Shared>) -> ApiResult<Vec<UserRow>> {
    Ok(Json(st.store.users().await?))
}

async fn add_user(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    ApiJson(req): ApiJson<NewUser>,
) -> Result<(StatusCode, Json<UserRow>), ApiError> {
    check_name("user name", &req.name, 64)?;
    check_groups(&req.groups)?;
    let site = req.site.unwrap_or_else(|| st.settings.default_site.clone());
    crate::sites::require_known(&st.store, &site).await?;
    if st.store.user(&req.name).await?.is_some() {
        return Err(Error::Conflict(format!("user {} already exists", req.name)).into());
    }
    let hash = st.directory.hash_password(&req.password).await?;
    let user = UserRow {
        name: req.name.clone(),
        source: "local".into(),
        password_hash: Some(hash),
        ldap_dn: None,
        groups: req.groups,
        site,
        created_at: unix_now(),
    };
    st.store.insert_user(&user).await?;
    st.audit("admin", "admin", &user.name, &src(&peer), "users add")
        .await;
    Ok((StatusCode::CREATED, Json(user)))
}

async fn update_user(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> ApiResult<UserRow> {
    let Path(name) = name.map_err(path_error)?;
    let mut user = st
        .store
        .user(&name)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_user", format!("no user {name}")))?;
    let local = user.source == "local";
    if let Some(g) = req.groups {
        check_groups(&g)?;
        if !local {
            return Err(ApiError::conflict(
                "ldap_user",
                "LDAP users get their groups from LDAP",
            ));
        }
        user.groups = g;
    }
    if let Some(site) = req.site {
        crate::sites::require_known(&st.store, &site).await?;
        user.site = site;
    }
    if let Some(pw) = req.password {
        if !local {
            return Err(ApiError::conflict(
                "ldap_user",
                "LDAP users change passwords in LDAP",
            ));
        }
        user.password_hash = Some(st.directory.hash_password(&pw).await?);
    }
    st.store.update_user(&user).await?;
    st.audit("admin", "admin", &name, &src(&peer), "users update")
        .await;
    Ok(Json(user))
}

async fn delete_user(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
) -> ApiResult<RevokeResult> {
    let Path(name) = name.map_err(path_error)?;
    let keys: Vec<String> = st
        .store
        .keys(Some(&name))
        .await?
        .into_iter()
        .filter(|k| k.revoked_at.is_none())
        .map(|k| k.key_id)
        .collect();
    if !st.store.delete_user(&name).await? {
        return Err(ApiError::not_found(
            "unknown_user",
            format!("no user {name}"),
        ));
    }
    let sessions = st
        .sessions
        .remove_where(|s| s.user == name, "user_deleted")
        .len();
    st.lockouts.clear(&name);
    st.audit("admin", "admin", &name, &src(&peer), "users delete")
        .await;
    Ok(Json(RevokeResult { sessions, keys }))
}

async fn unlock_user(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
) -> Result<StatusCode, ApiError> {
    let Path(name) = name.map_err(path_error)?;
    if st.store.user(&name).await?.is_none() {
        return Err(ApiError::not_found(
            "unknown_user",
            format!("no user {name}"),
        ));
    }
    st.lockouts.clear(&name);
    st.audit("admin", "admin", &name, &src(&peer), "users unlock")
        .await;
    Ok(StatusCode::NO_CONTENT)
}

async fn activation_code(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
    ApiJson(req): ApiJson<ActivationCodeRequest>,
) -> ApiResult<ActivationCode> {
    let Path(name) = name.map_err(path_error)?;
    if st.store.user(&name).await?.is_none() {
        return Err(ApiError::not_found(
            "unknown_user",
            format!("no user {name}"),
        ));
    }
    if req.ttl_secs == 0 || req.ttl_secs > 90 * 86_400 {
        return Err(ApiError::bad_request(
            "invalid_field",
            "ttl_secs must be 1..=7776000",
        ));
    }
    // 80 bits, in groups people can type.
    let raw = hex::encode(crypto::random_bytes::<10>());
    let code = format!(
        "{}-{}-{}-{}-{}",
        &raw[0..4],
        &raw[4..8],
        &raw[8..12],
        &raw[12..16],
        &raw[16..20]
    );
    let expires_at = unix_now() + req.ttl_secs as i64;
    st.store
        .insert_activation_code(
            &hex::encode(Sha256::digest(code.as_bytes())),
            &name,
            expires_at,
        )
        .await?;
    st.audit(
        "admin",
        "admin",
        &name,
        &src(&peer),
        "users activation-code",
    )
    .await;
    Ok(Json(ActivationCode {
        user: name,
        code,
        expires_at,
    }))
}

async fn revoke_user_sessions(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
) -> ApiResult<RevokeResult> {
    let Path(name) = name.map_err(path_error)?;
    let sessions = st.sessions.remove_where(|s| s.user == name, "admin").len();
    st.audit(
        "session_revoked",
        "admin",
        &name,
        &src(&peer),
        &format!("{sessions} session(s)"),
    )
    .await;
    Ok(Json(RevokeResult {
        sessions,
        keys: vec![],
    }))
}

/// `?user=` filter.
#[derive(Debug, Deserialize)]
struct UserFilter {
    user: Option<String>,
}

async fn list_keys(
    State(st): State<Shared>,
    q: Result<Query<UserFilter>, QueryRejection>,
) -> ApiResult<Vec<KeyRow>> {
    let Query(q) = q.map_err(query_error)?;
    Ok(Json(st.store.keys(q.user.as_deref()).await?))
}

async fn revoke_key(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    key_id: P<String>,
) -> ApiResult<RevokeResult> {
    let Path(key_id) = key_id.map_err(path_error)?;
    match st.store.revoke_key(&key_id).await {
        Err(Error::NotFound(_)) => {
            return Err(ApiError::not_found(
                "unknown_key",
                format!("no key {key_id}"),
            ));
        }
        r => r?,
    };
    let sessions = st
        .sessions
        .remove_where(|s| s.key_id == key_id, "key_revoked")
        .len();
    tracing::info!(%key_id, sessions, "key revoked");
    st.audit(
        "key_revoked",
        "admin",
        &key_id,
        &src(&peer),
        &format!("{sessions} session(s)"),
    )
    .await;
    Ok(Json(RevokeResult {
        sessions,
        keys: vec![key_id],
    }))
}

async fn revoke_device(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    device_id: P<String>,
) -> ApiResult<RevokeResult> {
    let Path(device_id) = device_id.map_err(path_error)?;
    let keys = st.store.revoke_device(&device_id).await?;
    let sessions = st
        .sessions
        .remove_where(|s| s.device_id == device_id, "key_revoked")
        .len();
    if keys.is_empty() && sessions == 0 {
        return Err(ApiError::not_found(
            "unknown_device",
            format!("no live key for device {device_id}"),
        ));
    }
    st.audit(
        "key_revoked",
        "admin",
        &device_id,
        &src(&peer),
        &format!("keys={keys:?}"),
    )
    .await;
    Ok(Json(RevokeResult { sessions, keys }))
}

async fn list_sessions(
    State(st): State<Shared>,
    q: Result<Query<UserFilter>, QueryRejection>,
) -> ApiResult<Vec<SessionInfo>> {
    let Query(q) = q.map_err(query_error)?;
    let list = st
        .sessions
        .list()
        .into_iter()
        .filter(|s| q.user.as_ref().is_none_or(|u| &s.user == u))
        .map(|s| SessionInfo {
            tag: s.tag.0.clone(),
            user: s.user.clone(),
            groups: s.groups.clone(),
            site: s.site.clone(),
            device_id: s.device_id.clone(),
            app_id: s.app_id.clone(),
            app_version: s.app_version.clone(),
            key_id: s.key_id.clone(),
            created_at: s.created_ms / 1000,
            last_seen_at: s.last_seen_ms() / 1000,
            absolute_expires_at: s.absolute_expires_ms / 1000,
        })
        .collect();
    Ok(Json(list))
}

async fn revoke_session(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    tag: P<String>,
) -> ApiResult<RevokeResult> {
    let Path(tag) = tag.map_err(path_error)?;
    let gone = st.sessions.remove_where(|s| s.tag.0 == tag, "admin");
    if gone.is_empty() {
        return Err(ApiError::not_found(
            "unknown_session",
            format!("no live session {tag}"),
        ));
    }
    tracing::info!(session = %tag, "session revoked by admin");
    st.audit("session_revoked", "admin", &tag, &src(&peer), "")
        .await;
    Ok(Json(RevokeResult {
        sessions: gone.len(),
        keys: vec![],
    }))
}

async fn list_apps(State(st): State<Shared>) -> ApiResult<AppsListing> {
    Ok(Json(AppsListing {
        releases: st.store.releases(None).await?,
        policies: st.store.policies().await?,
    }))
}

async fn publish(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    params: P<(String, String, String)>,
    body: Body,
) -> Result<(StatusCode, Json<AppRelease>), ApiError> {
    let Path((app_id, platform, version)) = params.map_err(path_error)?;
    check_name("app id", &app_id, 64)?;
    check_name("platform", &platform, 32)?;
    crate::app_policy::parse_version(&version)?;
    if st
        .store
        .release(&app_id, &platform, &version)
        .await?
        .is_some()
    {
        return Err(ApiError::conflict(
            "already_published",
            format!("{app_id} {version} for {platform} is already published"),
        ));
    }
    let dir = crate::packages::dir(&st.settings.data_dir);
    let (tmp, sha256, size) =
        crate::packages::receive(&dir, body, st.settings.max_package_bytes).await?;
    let rel = AppRelease {
        download_path: crate::store::download_path(&app_id, &platform, &version),
        app_id,
        version,
        platform,
        sha256: sha256.clone(),
        size,
    };
    let stored = async {
        crate::packages::commit(&dir, &tmp, &sha256).await?;
        st.store.insert_release(&rel).await
    }
    .await;
    if let Err(e) = stored {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e.into());
    }
    st.audit(
        "admin",
        "admin",
        &format!("{}/{}/{}", rel.app_id, rel.platform, rel.version),
        &src(&peer),
        &format!("apps publish sha256={sha256} size={size}"),
    )
    .await;
    Ok((StatusCode::CREATED, Json(rel)))
}

async fn set_policy(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    app_id: P<String>,
    ApiJson(req): ApiJson<PolicyUpdate>,
) -> ApiResult<AppPolicy> {
    let Path(app_id) = app_id.map_err(path_error)?;
    check_name("app id", &app_id, 64)?;
    crate::app_policy::check(&req)?;
    let mut p = st.store.policy(&app_id).await?;
    crate::app_policy::apply(&mut p, req);
    st.store.set_policy(&p).await?;
    st.sessions
        .publish(scm_proto::api::ProxyEvent::CatalogChanged);
    st.audit(
        "admin",
        "admin",
        &app_id,
        &src(&peer),
        &format!("apps policy {p:?}"),
    )
    .await;
    Ok(Json(p))
}

async fn list_resources(State(st): State<Shared>) -> ApiResult<Vec<Resource>> {
    Ok(Json(st.store.resources().await?))
}

async fn set_resource(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
    ApiJson(req): ApiJson<ResourceBody>,
) -> ApiResult<Resource> {
    let Path(name) = name.map_err(path_error)?;
    check_name("resource name", &name, 128)?;
    check_host_port("address", &req.address)?;
    check_groups(&req.allowed_groups)?;
    let r = Resource {
        name,
        address: req.address,
        mode: req.mode,
        allowed_groups: req.allowed_groups,
    };
    st.store.upsert_resource(&r).await?;
    st.catalog_changed().await?;
    st.audit("admin", "admin", &r.name, &src(&peer), "resources set")
        .await;
    Ok(Json(r))
}

async fn delete_resource(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
) -> Result<StatusCode, ApiError> {
    let Path(name) = name.map_err(path_error)?;
    match st.store.delete_resource(&name).await {
        Err(Error::NotFound(_)) => {
            return Err(ApiError::not_found(
                "unknown_resource",
                format!("no resource {name}"),
            ));
        }
        r => r?,
    }
    st.catalog_changed().await?;
    st.audit("admin", "admin", &name, &src(&peer), "resources delete")
        .await;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_sites(State(st): State<Shared>) -> ApiResult<Vec<SiteRow>> {
    Ok(Json(st.store.sites().await?))
}

async fn set_site(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
    ApiJson(req): ApiJson<SiteBody>,
) -> ApiResult<SiteRow> {
    let Path(name) = name.map_err(path_error)?;
    let s = crate::sites::row(name, req.proxy_urls)?;
    st.store.upsert_site(&s).await?;
    st.audit(
        "admin",
        "admin",
        &s.name,
        &src(&peer),
        &format!("sites set {:?}", s.proxy_urls),
    )
    .await;
    Ok(Json(s))
}

async fn delete_site(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    name: P<String>,
) -> Result<StatusCode, ApiError> {
    let Path(name) = name.map_err(path_error)?;
    match st.store.delete_site(&name).await {
        Err(Error::NotFound(_)) => {
            return Err(ApiError::not_found(
                "unknown_site",
                format!("no site {name}"),
            ));
        }
        Err(Error::Conflict(m)) => return Err(ApiError::conflict("site_in_use", m)),
        r => r?,
    }
    st.audit("admin", "admin", &name, &src(&peer), "sites delete")
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// `?limit=`.
#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<u32>,
}

async fn audit(
    State(st): State<Shared>,
    q: Result<Query<Limit>, QueryRejection>,
) -> ApiResult<Vec<AuditRow>> {
    let Query(q) = q.map_err(query_error)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 10_000);
    Ok(Json(st.store.audit_log(i64::from(limit)).await?))
}

async fn ldap_sync(State(st): State<Shared>) -> ApiResult<crate::directory::SyncReport> {
    if st.directory.ldap().is_none() {
        return Err(ApiError::conflict(
            "ldap_not_configured",
            "start the server with --ldap-url",
        ));
    }
    crate::ldap_sync::run_ldap_sync(&st, "admin")
        .await
        .map(Json)
        .map_err(|e| match e {
            Error::Ldap(m) => ApiError::new(StatusCode::BAD_GATEWAY, "ldap_unavailable", m),
            other => other.into(),
        })
}
