//! App updates: ask the Security server whether a newer release exists for this app, platform
//! and version, and download a release, checking its SHA-256 before keeping it.

use std::path::Path;

use scm_proto::api::{AppRelease, HEADER_SHA256, PATH_APPS, UpdateCheckResponse};
use sha2::{Digest as _, Sha256};

use crate::device::Device;
use crate::error::DeviceError;

impl Device {
    /// `GET /v1/apps/{app}/update?platform=..&version=..`. `bearer` is the session id if logged in.
    pub async fn update_check(
        &self,
        bearer: Option<&str>,
    ) -> Result<UpdateCheckResponse, DeviceError> {
        let c = &self.enrollment.config;
        let path = format!(
            "{PATH_APPS}/{}/update?platform={}&version={}",
            c.app_id, c.platform, c.app_version
        );
        self.api.get("update check", &path, bearer).await
    }

    /// Downloads `release` to `out`, writing nothing if its SHA-256 differs from the
    /// published one. Returns the number of bytes.
    pub async fn update_fetch(
        &self,
        release: &AppRelease,
        out: &Path,
        bearer: Option<&str>,
    ) -> Result<u64, DeviceError> {
        let path = &release.download_path;
        let resp = self
            .api
            .send(|c, base| {
                let r = c.get(format!("{base}{path}"));
                match bearer {
                    Some(t) => r.bearer_auth(t),
                    None => r,
                }
            })
            .await?;
        if !resp.status().is_success() {
            return Err(crate::api::refused("download", resp).await);
        }
        let header_sha = resp
            .headers()
            .get(HEADER_SHA256)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        let body = resp.bytes().await.map_err(|e| DeviceError::BadAnswer {
            what: "download",
            why: crate::api::chain(&e),
        })?;
        let got = hex::encode(Sha256::digest(&body));
        let expected = release.sha256.to_ascii_lowercase();
        if got != expected || header_sha.as_ref().is_some_and(|h| *h != expected) {
            return Err(DeviceError::Checksum { expected, got });
        }
        std::fs::write(out, &body).map_err(|source| DeviceError::File {
            what: "package",
            path: out.to_owned(),
            source,
        })?;
        Ok(body.len() as u64)
    }
}
