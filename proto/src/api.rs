//! JSON messages of the Security server's HTTPS APIs. Binary values are standard base64 strings,
//! times are Unix seconds. Paths are the constants below; `docs/protocol.md` has the whole table.
//!
//! Every error answer has the body [`ErrorBody`] with a stable snake_case [`ErrorBody::code`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crypto::session_tag;
use crate::redact::{Redacted, optional};

/// Device API: enroll a (device, app) for a user with valid credentials.
pub const PATH_ENROLL: &str = "/v1/enroll";
/// Device API: get a fresh single-use login challenge.
pub const PATH_CHALLENGE: &str = "/v1/challenge";
/// Device API: log in with credentials and a proof of the shared key.
pub const PATH_LOGIN: &str = "/v1/login";
/// Device API: end the session named by the bearer token.
pub const PATH_LOGOUT: &str = "/v1/logout";
/// Device API: `GET /v1/apps/{app_id}/update?platform=..&version=..`.
pub const PATH_APPS: &str = "/v1/apps";
/// Proxies' API: validate a session.
pub const PATH_PROXY_VALIDATE: &str = "/v1/proxy/validate";
/// Proxies' API: newline-delimited JSON stream of [`ProxyEvent`]s.
pub const PATH_PROXY_REVOCATIONS: &str = "/v1/proxy/revocations";
/// Proxies' API: the resource catalog.
pub const PATH_PROXY_RESOURCES: &str = "/v1/proxy/resources";
/// Proxies' API: the app policy (minimum and revoked versions).
pub const PATH_PROXY_APPS: &str = "/v1/proxy/apps";
/// Header carrying the package's SHA-256 (hex) on downloads.
pub const HEADER_SHA256: &str = "x-scm-sha256";

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `bad_mac`, `challenge_expired`, `locked_out`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// `POST /v1/enroll`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// `user` or `user@site`.
    pub username: String,
    /// The user's password (checked against the directory, never stored in clear).
    pub password: String,
    /// The device's id.
    pub device_id: String,
    /// The app being enrolled on that device.
    pub app_id: String,
    /// Required when the server runs with activation codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_code: Option<String>,
}

/// Answer to [`EnrollRequest`]: the only time the shared key travels, inside TLS.
#[derive(Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// Id of the new key, sent back at every login.
    pub key_id: String,
    /// The 256-bit shared key, base64.
    pub shared_key: String,
}

/// Answer to `POST /v1/challenge`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// Names the challenge in the login that uses it.
    pub challenge_id: String,
    /// 32 random bytes, base64.
    pub server_nonce: String,
    /// Seconds until the challenge can no longer be used.
    pub expires_in_secs: u64,
}

/// `POST /v1/login`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// `user` or `user@site`.
    pub username: String,
    /// The user's password.
    pub password: String,
    /// The enrolled key's id.
    pub key_id: String,
    /// The device id the key was enrolled for.
    pub device_id: String,
    /// The app id the key was enrolled for.
    pub app_id: String,
    /// The app version the device runs.
    pub app_version: String,
    /// From [`ChallengeResponse`]; each challenge serves one login attempt.
    pub challenge_id: String,
    /// 32 fresh random bytes from the device, base64.
    pub client_nonce: String,
    /// [`crate::crypto::login_mac`] over the transcript, base64.
    pub mac: String,
}

/// Answer to [`LoginRequest`]. The session key is not in it: the device derives it.
#[derive(Clone, Serialize, Deserialize)]
pub struct LoginResponse {
    /// The new session's id (secret).
    pub session_id: String,
    /// The canonical user name.
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The user's site.
    pub site: String,
    /// Proxies of that site, in order of preference (`host:port`).
    pub proxy_urls: Vec<String>,
    /// Seconds of inactivity after which the session ends.
    pub idle_timeout_secs: u64,
    /// When the session ends regardless of activity.
    pub absolute_expires_at: u64,
}

/// Answer to `GET /v1/apps/{app_id}/update?platform=..&version=..`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateCheckResponse {
    /// Whether a newer, non-revoked release exists for this platform.
    pub update_available: bool,
    /// Whether the version asked about may still be used (not below minimum, not revoked).
    pub current_allowed: bool,
    /// The lowest version allowed, if the app has a minimum.
    pub min_version: Option<String>,
    /// The newest non-revoked release for the platform.
    pub latest: Option<AppRelease>,
}

/// One published package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRelease {
    /// App id.
    pub app_id: String,
    /// Version.
    pub version: String,
    /// Platform, e.g. `android`, `ios`.
    pub platform: String,
    /// SHA-256 of the package, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Path of the download on the Security server.
    pub download_path: String,
}

/// `POST /v1/proxy/validate`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateRequest {
    /// The session id from the device's preamble.
    pub session_id: String,
    /// Proof that the device holds the session key on the connection the proxy is admitting.
    /// With it the Security server counts the validation as activity only if the proof holds
    /// (answering `403 binding_failed` otherwise, the session's idle timer untouched); without it
    /// (a proxy revalidating a session whose connections it already bound) it counts as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<BindingProof>,
}

/// The channel-binding transcript of one device connection and the MAC its preamble carried, so
/// the Security server can check [`crate::crypto::binding_mac`] itself before it touches the
/// session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingProof {
    /// The connection's 32-byte TLS exporter ([`crate::BINDING_EXPORTER_LABEL`]), base64.
    pub exporter: String,
    /// The preamble's app id.
    pub app_id: String,
    /// The preamble's app version.
    pub app_version: String,
    /// The preamble's device id.
    pub device_id: String,
    /// The preamble's resource.
    pub resource: String,
    /// The preamble's 32-byte binding MAC, base64.
    pub mac: String,
}

/// Answer to [`ValidateRequest`] for a live session.
#[derive(Clone, Serialize, Deserialize)]
pub struct ValidateResponse {
    /// Non-secret tag of the session, for the proxy's logs and revocations.
    pub session_tag: String,
    /// Canonical user name.
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The session key, base64 (travels only on the authenticated proxy channel).
    pub session_key: String,
    /// App context the session was created for.
    pub app_id: String,
    /// App version at login.
    pub app_version: String,
    /// Device id at login.
    pub device_id: String,
    /// The user's site.
    pub site: String,
    /// Seconds of inactivity after which the session ends.
    pub idle_timeout_secs: u64,
    /// When the session ends regardless of activity.
    pub absolute_expires_at: u64,
    /// Names of the resources the user's groups allow.
    pub allowed_resources: Vec<String>,
}

/// How a proxy reaches a back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceMode {
    /// Raw bytes both ways after the preamble.
    Tcp,
    /// HTTP/1.1 reverse proxy with identity headers.
    Http,
}

/// A catalog entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Name devices ask for.
    pub name: String,
    /// Back end `host:port`.
    pub address: String,
    /// Relay mode.
    pub mode: ResourceMode,
    /// Groups allowed to use it (empty: nobody).
    pub allowed_groups: Vec<String>,
}

/// Update policy of one app, enforced by the proxies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPolicy {
    /// App id.
    pub app_id: String,
    /// Lowest allowed version, if any.
    pub min_version: Option<String>,
    /// Versions that may not be used.
    pub revoked_versions: Vec<String>,
}

/// One line of the revocation stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProxyEvent {
    /// A session ended (logout, admin revocation, expiry, device key revoked).
    Revoked {
        /// The session's tag.
        session_tag: String,
        /// Why, e.g. `logout`, `admin`, `expired`, `key_revoked`.
        reason: String,
    },
    /// The resource catalog or app policy changed: fetch them again.
    CatalogChanged,
    /// Sent every few seconds so a proxy notices a dead stream.
    Heartbeat {
        /// Server time.
        at: u64,
    },
}

/// Proxies' API: a signed identity assertion (a short-lived ES256 JWT) for a live session and
/// one resource it may reach, which the proxy passes to the resource's http back end.
pub const PATH_PROXY_ASSERTION: &str = "/v1/proxy/assertion";
/// Device API: the public keys that verify identity assertions, a JWK Set (RFC 7517).
pub const PATH_JWKS: &str = "/.well-known/jwks.json";
/// Header carrying the identity assertion to an http back end (`Authorization` is left to the
/// device's own use).
pub const HEADER_ASSERTION: &str = "x-scm-assertion";

/// `POST /v1/proxy/assertion`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionRequest {
    /// The session id from the device's preamble.
    pub session_id: String,
    /// The resource the assertion is for: its name becomes the token's audience (`aud`).
    pub resource: String,
}

/// Answer to [`AssertionRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssertionResponse {
    /// The compact JWS (`header.claims.signature`, base64url without padding).
    pub token: String,
    /// Its `exp` claim: Unix seconds after which back ends refuse it.
    pub expires_at: u64,
    /// Seconds from signing to `exp`, so a proxy can cache it without trusting its own clock.
    pub expires_in: u64,
    /// Its `kid`: the JWK in the Security server's JWK Set that verifies it.
    pub kid: String,
}

// `Debug` of the messages that carry a password, a key, a MAC or a session id: those fields print
// `<redacted>` (a session id also shows its loggable tag), everything else as derived. Fields
// added later stay hidden until listed here (`finish_non_exhaustive`).

impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("username", &self.username)
            .field("password", &Redacted)
            .field("device_id", &self.device_id)
            .field("app_id", &self.app_id)
            .field("activation_code", &optional(&self.activation_code))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for EnrollResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollResponse")
            .field("key_id", &self.key_id)
            .field("shared_key", &Redacted)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .field("password", &Redacted)
            .field("key_id", &self.key_id)
            .field("device_id", &self.device_id)
            .field("app_id", &self.app_id)
            .field("app_version", &self.app_version)
            .field("challenge_id", &self.challenge_id)
            .field("client_nonce", &self.client_nonce)
            .field("mac", &Redacted)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for LoginResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginResponse")
            .field("session_id", &Redacted)
            .field("session_tag", &session_tag(&self.session_id))
            .field("user", &self.user)
            .field("groups", &self.groups)
            .field("site", &self.site)
            .field("proxy_urls", &self.proxy_urls)
            .field("idle_timeout_secs", &self.idle_timeout_secs)
            .field("absolute_expires_at", &self.absolute_expires_at)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ValidateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateRequest")
            .field("session_id", &Redacted)
            .field("session_tag", &session_tag(&self.session_id))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ValidateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateResponse")
            .field("session_tag", &self.session_tag)
            .field("user", &self.user)
            .field("groups", &self.groups)
            .field("session_key", &Redacted)
            .field("app_id", &self.app_id)
            .field("app_version", &self.app_version)
            .field("device_id", &self.device_id)
            .field("site", &self.site)
            .field("idle_timeout_secs", &self.idle_timeout_secs)
            .field("absolute_expires_at", &self.absolute_expires_at)
            .field("allowed_resources", &self.allowed_resources)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AssertionRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionRequest")
            .field("session_id", &Redacted)
            .field("session_tag", &session_tag(&self.session_id))
            .field("resource", &self.resource)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cret-Zq9";

    #[test]
    fn debug_never_shows_secrets() {
        let printed = [
            format!(
                "{:?}",
                EnrollRequest {
                    username: "alice".into(),
                    password: SECRET.into(),
                    device_id: "phone".into(),
                    app_id: "mail".into(),
                    activation_code: Some(format!("{SECRET}-code")),
                }
            ),
            format!(
                "{:?}",
                EnrollResponse {
                    key_id: "k_1".into(),
                    shared_key: SECRET.into(),
                }
            ),
            format!(
                "{:?}",
                LoginRequest {
                    username: "alice".into(),
                    password: SECRET.into(),
                    key_id: "k_1".into(),
                    device_id: "phone".into(),
                    app_id: "mail".into(),
                    app_version: "1.0".into(),
                    challenge_id: "c".into(),
                    client_nonce: "bm9uY2U=".into(),
                    mac: format!("{SECRET}-mac"),
                }
            ),
            format!(
                "{:?}",
                LoginResponse {
                    session_id: SECRET.into(),
                    user: "alice".into(),
                    groups: vec!["staff".into()],
                    site: "main".into(),
                    proxy_urls: vec!["proxy:8443".into()],
                    idle_timeout_secs: 60,
                    absolute_expires_at: 1,
                }
            ),
            format!(
                "{:?}",
                ValidateRequest {
                    session_id: SECRET.into(),
                    binding: None,
                }
            ),
            format!(
                "{:?}",
                ValidateResponse {
                    session_tag: "tag".into(),
                    user: "alice".into(),
                    groups: vec![],
                    session_key: SECRET.into(),
                    app_id: "mail".into(),
                    app_version: "1.0".into(),
                    device_id: "phone".into(),
                    site: "main".into(),
                    idle_timeout_secs: 60,
                    absolute_expires_at: 1,
                    allowed_resources: vec![],
                }
            ),
        ];
        for p in &printed {
            assert!(!p.contains(SECRET), "{p}");
            assert!(p.contains("<redacted>"), "{p}");
        }
        // What is not secret stays visible.
        assert!(printed[0].contains("alice") && printed[2].contains("k_1"));
        assert!(printed[3].contains(&session_tag(SECRET).0));
    }
}
