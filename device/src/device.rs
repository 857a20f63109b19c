//! Enrollment and the enrolled identity: which Security servers, which CA, which user, device and
//! app, and the shared key the Security server issued for them. Logging in is
//! [`crate::session`]'s business (it adds `Device::login`), so this module knows nothing of
//! sessions.

use std::path::PathBuf;
use std::sync::Arc;

use scm_proto::api::{EnrollRequest, EnrollResponse, PATH_ENROLL};
use scm_proto::crypto::SharedKey;
use serde::{Deserialize, Serialize};

use crate::api::SecurityApi;
use crate::error::DeviceError;

/// What a device needs to know before enrolling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Security server base URLs, in order of preference.
    pub security_urls: Vec<String>,
    /// PEM file of the CA that signs the Security server's and the proxies' certificates.
    pub ca_file: PathBuf,
    /// This device's id.
    pub device_id: String,
    /// The app being enrolled.
    pub app_id: String,
    /// The version of the app on the device.
    pub app_version: String,
    /// The platform, for updates (e.g. `android`).
    pub platform: String,
}

/// An enrolled (user, device, app): the config plus the key the Security server issued.
#[derive(Clone, Serialize, Deserialize)]
pub struct Enrollment {
    /// The device's config.
    #[serde(flatten)]
    pub config: DeviceConfig,
    /// The user name as typed at enrollment (`user` or `user@site`).
    pub username: String,
    /// The key's id.
    pub key_id: String,
    /// The shared key, base64.
    pub shared_key: String,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("config", &self.config)
            .field("username", &self.username)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// An enrolled device, ready to log in.
#[derive(Debug, Clone)]
pub struct Device {
    pub(crate) enrollment: Enrollment,
    pub(crate) shared_key: SharedKey,
    pub(crate) api: SecurityApi,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

impl Device {
    /// Enrolls with the user's credentials; the shared key comes back inside TLS, once.
    pub async fn enroll(
        config: DeviceConfig,
        username: &str,
        password: &str,
        activation_code: Option<String>,
    ) -> Result<Self, DeviceError> {
        let tls = crate::tls::client_config(&crate::tls::load_ca(&config.ca_file)?)?;
        let api = SecurityApi::new(config.security_urls.clone(), &tls)?;
        let req = EnrollRequest {
            username: username.to_owned(),
            password: password.to_owned(),
            device_id: config.device_id.clone(),
            app_id: config.app_id.clone(),
            activation_code,
        };
        let resp: EnrollResponse = api.post("enrollment", PATH_ENROLL, &req, None).await?;
        let shared_key = SharedKey::from_b64(&resp.shared_key)?;
        Ok(Self {
            enrollment: Enrollment {
                config,
                username: username.to_owned(),
                key_id: resp.key_id,
                shared_key: resp.shared_key,
            },
            shared_key,
            api,
            tls,
        })
    }

    /// Rebuilds a device from a saved enrollment.
    pub fn from_enrollment(enrollment: Enrollment) -> Result<Self, DeviceError> {
        let tls = crate::tls::client_config(&crate::tls::load_ca(&enrollment.config.ca_file)?)?;
        let api = SecurityApi::new(enrollment.config.security_urls.clone(), &tls)?;
        Ok(Self {
            shared_key: SharedKey::from_b64(&enrollment.shared_key)?,
            enrollment,
            api,
            tls,
        })
    }

    /// The saved form (holds the shared key: store it with care).
    pub fn enrollment(&self) -> &Enrollment {
        &self.enrollment
    }

    /// A copy of this device reporting another app version (after an update).
    pub fn with_app_version(&self, version: &str) -> Self {
        let mut d = self.clone();
        d.enrollment.config.app_version = version.to_owned();
        d
    }

    /// The same device trying its first Security URL again every `failback` while away from it
    /// (default [`scm_proto::failover::DEFAULT_FAILBACK`]); a long-lived app keeps one [`Device`]
    /// and so comes back to its preferred Security server once that server answers again.
    pub fn with_security_failback(mut self, failback: std::time::Duration) -> Self {
        self.api = self.api.with_failback(failback);
        self
    }

    /// The Security API client.
    pub fn api(&self) -> &SecurityApi {
        &self.api
    }

    // `Device::login` lives in `session.rs`: a session is built from a device, never the other
    // way round, so this module does not import that one.
}
