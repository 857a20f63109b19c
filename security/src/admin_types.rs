//! JSON bodies of the admin API, shared by the server and the `scm-security admin` client.

use serde::{Deserialize, Serialize};

/// Admin API path prefix.
pub(crate) const ADMIN_PREFIX: &str = "/v1/admin";

/// `POST /v1/admin/users`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewUser {
    /// User name.
    pub name: String,
    /// Password.
    pub password: String,
    /// Groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Site (default: the server's default site).
    #[serde(default)]
    pub site: Option<String>,
}

/// `PATCH /v1/admin/users/{name}`.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateUser {
    /// New groups (local users).
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    /// New site.
    #[serde(default)]
    pub site: Option<String>,
    /// New password (local users).
    #[serde(default)]
    pub password: Option<String>,
}

/// `POST /v1/admin/users/{name}/activation-codes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ActivationCodeRequest {
    /// Validity in seconds.
    pub ttl_secs: u64,
}

/// An issued activation code (shown once).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct ActivationCode {
    /// User it is for.
    pub user: String,
    /// The code.
    pub code: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// A live session as admins see it (never its id or key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SessionInfo {
    /// Tag.
    pub tag: String,
    /// User.
    pub user: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Site.
    pub site: String,
    /// Device.
    pub device_id: String,
    /// App.
    pub app_id: String,
    /// App version.
    pub app_version: String,
    /// Key id.
    pub key_id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub last_seen_at: u64,
    /// Unix seconds.
    pub absolute_expires_at: u64,
}

/// What a revocation ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct RevokeResult {
    /// Sessions ended.
    pub sessions: usize,
    /// Keys revoked.
    pub keys: Vec<String>,
}

/// `GET /v1/admin/apps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AppsListing {
    /// Published packages.
    pub releases: Vec<scm_proto::api::AppRelease>,
    /// Policies.
    pub policies: Vec<scm_proto::api::AppPolicy>,
}

/// `PUT /v1/admin/apps/{app_id}/policy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyUpdate {
    /// New minimum version.
    #[serde(default)]
    pub min_version: Option<String>,
    /// Remove the minimum version.
    #[serde(default)]
    pub clear_min_version: bool,
    /// Versions to revoke.
    #[serde(default)]
    pub revoke: Vec<String>,
    /// Versions to un-revoke.
    #[serde(default)]
    pub unrevoke: Vec<String>,
}

/// `PUT /v1/admin/resources/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResourceBody {
    /// Back end host:port.
    pub address: String,
    /// `tcp` or `http`.
    pub mode: scm_proto::api::ResourceMode,
    /// Groups allowed.
    #[serde(default)]
    pub allowed_groups: Vec<String>,
}

/// `PUT /v1/admin/sites/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SiteBody {
    /// Proxies, host:port.
    pub proxy_urls: Vec<String>,
}

// The bodies that carry a password or an activation code print `<redacted>` in their place.

impl std::fmt::Debug for NewUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewUser")
            .field("name", &self.name)
            .field("password", &scm_proto::redact::Redacted)
            .field("groups", &self.groups)
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for UpdateUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateUser")
            .field("groups", &self.groups)
            .field("site", &self.site)
            .field("password", &scm_proto::redact::optional(&self.password))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ActivationCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationCode")
            .field("user", &self.user)
            .field("code", &scm_proto::redact::Redacted)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}
