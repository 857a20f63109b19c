//! App releases: one row per published (app, platform, version) package, whose file is
//! `DATA_DIR/apps/<sha256>` (`crate::apps`).

use scm_proto::api::AppRelease;
use sqlx::any::AnyRow;

use super::db::{Store, get, unix_now};
use crate::error::{DbContext as _, Error};

const RELEASE_COLS: &str = "app_id, platform, version, sha256, size";

fn release_from(row: &AnyRow) -> Result<AppRelease, Error> {
    let app_id: String = get(row, "app_id")?;
    let platform: String = get(row, "platform")?;
    let version: String = get(row, "version")?;
    Ok(AppRelease {
        download_path: download_path(&app_id, &platform, &version),
        sha256: get(row, "sha256")?,
        size: get::<i64>(row, "size")?.max(0) as u64,
        app_id,
        platform,
        version,
    })
}

/// The device API path of a release's download.
pub fn download_path(app_id: &str, platform: &str, version: &str) -> String {
    format!(
        "{}/{app_id}/download/{platform}/{version}",
        scm_proto::api::PATH_APPS
    )
}

impl Store {
    /// Records a published package; the (app, platform, version) must be new.
    pub async fn insert_release(&self, r: &AppRelease) -> Result<(), Error> {
        if self
            .release(&r.app_id, &r.platform, &r.version)
            .await?
            .is_some()
        {
            return Err(Error::Conflict(format!(
                "{} {} for {} is already published",
                r.app_id, r.version, r.platform
            )));
        }
        sqlx::query(
            "INSERT INTO app_releases (app_id, platform, version, sha256, size, published_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&r.app_id)
        .bind(&r.platform)
        .bind(&r.version)
        .bind(&r.sha256)
        .bind(r.size as i64)
        .bind(unix_now())
        .execute(&self.pool)
        .await
        .db("recording a release")?;
        Ok(())
    }

    /// One release.
    pub async fn release(
        &self,
        app_id: &str,
        platform: &str,
        version: &str,
    ) -> Result<Option<AppRelease>, Error> {
        let row = sqlx::query(&format!(
            "SELECT {RELEASE_COLS} FROM app_releases \
             WHERE app_id = $1 AND platform = $2 AND version = $3"
        ))
        .bind(app_id)
        .bind(platform)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .db("reading a release")?;
        row.as_ref().map(release_from).transpose()
    }

    /// Releases, optionally of one app.
    pub async fn releases(&self, app_id: Option<&str>) -> Result<Vec<AppRelease>, Error> {
        let select = format!("SELECT {RELEASE_COLS} FROM app_releases");
        let rows = self
            .fetch_where(
                &select,
                ("app_id", app_id),
                "app_id, platform",
                "listing releases",
            )
            .await?;
        rows.iter().map(release_from).collect()
    }
}
