//! The CLI's state file: the enrollment (with the shared key) and the current session, as JSON,
//! written with mode 0600 through a temporary file so a crash never leaves half a file.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::device::Enrollment;
use crate::error::DeviceError;
use crate::session::SavedSession;

/// Everything the CLI keeps between commands. Its `Debug` shows no secret: the enrollment hides
/// the shared key and the session its id and key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// The enrollment.
    pub enrollment: Enrollment,
    /// The current session, if logged in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SavedSession>,
}

impl State {
    /// Reads the state file.
    pub fn load(path: &Path) -> Result<Self, DeviceError> {
        let text = std::fs::read(path).map_err(|source| DeviceError::File {
            what: "state file",
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| DeviceError::BadFile {
            what: "state file",
            path: path.to_owned(),
            why: e.to_string(),
        })
    }

    /// Writes the state file, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), DeviceError> {
        let err = |source| DeviceError::File {
            what: "state file",
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| DeviceError::BadFile {
            what: "state file",
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        f.write_all(&json).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceConfig;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn debug_shows_no_secret() {
        let key = scm_proto::crypto::SharedKey::generate();
        let id = scm_proto::crypto::SessionId::generate();
        let session_key = scm_proto::crypto::SessionKey::generate();
        let state = State {
            enrollment: Enrollment {
                config: DeviceConfig {
                    security_urls: vec!["https://127.0.0.1:8443".into()],
                    ca_file: "ca.pem".into(),
                    device_id: "phone".into(),
                    app_id: "mail".into(),
                    app_version: "1.0".into(),
                    platform: "android".into(),
                },
                username: "alice".into(),
                key_id: "k".into(),
                shared_key: key.to_b64(),
            },
            session: Some(SavedSession {
                session_key: session_key.to_b64(),
                login: scm_proto::api::LoginResponse {
                    session_id: id.expose().to_owned(),
                    user: "alice".into(),
                    groups: vec!["staff".into()],
                    site: "main".into(),
                    proxy_urls: vec!["127.0.0.1:9443".into()],
                    idle_timeout_secs: 900,
                    absolute_expires_at: 1,
                },
            }),
        };
        let printed = format!("{state:?}");
        for secret in [key.to_b64(), id.expose().to_owned(), session_key.to_b64()] {
            assert!(!printed.contains(&secret), "{printed} shows {secret}");
        }
        assert!(printed.contains(&id.tag().0) && printed.contains("127.0.0.1:9443"));
    }

    #[test]
    fn saved_owner_only_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("scm-device-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let state = State {
            enrollment: Enrollment {
                config: DeviceConfig {
                    security_urls: vec!["https://127.0.0.1:8443".into()],
                    ca_file: "ca.pem".into(),
                    device_id: "phone".into(),
                    app_id: "mail".into(),
                    app_version: "1.0".into(),
                    platform: "android".into(),
                },
                username: "alice".into(),
                key_id: "k".into(),
                shared_key: "a2V5".into(),
            },
            session: None,
        };
        state.save(&path).unwrap();
        state.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = State::load(&path).unwrap();
        assert_eq!(back.enrollment.username, "alice");
        assert_eq!(back.enrollment.config.device_id, "phone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
