//! App update policies: per app, the oldest version still allowed and the versions revoked.

use scm_proto::api::AppPolicy;
use sqlx::any::AnyRow;

use super::db::{Store, get, get_list, json_list};
use crate::error::{DbContext as _, Error};

fn policy_from(app_id: String, row: &AnyRow) -> Result<AppPolicy, Error> {
    Ok(AppPolicy {
        app_id,
        min_version: get(row, "min_version")?,
        revoked_versions: get_list(row, "revoked_versions_json")?,
    })
}

impl Store {
    /// The update policy of every app that has one.
    pub async fn policies(&self) -> Result<Vec<AppPolicy>, Error> {
        let rows = sqlx::query(
            "SELECT app_id, min_version, revoked_versions_json FROM app_policies ORDER BY app_id",
        )
        .fetch_all(&self.pool)
        .await
        .db("listing app policies")?;
        rows.iter()
            .map(|r| policy_from(get(r, "app_id")?, r))
            .collect()
    }

    /// The policy of one app (empty if none was set).
    pub async fn policy(&self, app_id: &str) -> Result<AppPolicy, Error> {
        let row = sqlx::query(
            "SELECT min_version, revoked_versions_json FROM app_policies WHERE app_id = $1",
        )
        .bind(app_id)
        .fetch_optional(&self.pool)
        .await
        .db("reading an app policy")?;
        match row {
            Some(r) => policy_from(app_id.to_owned(), &r),
            None => Ok(AppPolicy {
                app_id: app_id.to_owned(),
                min_version: None,
                revoked_versions: Vec::new(),
            }),
        }
    }

    /// Writes an app's policy.
    pub async fn set_policy(&self, p: &AppPolicy) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO app_policies (app_id, min_version, revoked_versions_json) \
             VALUES ($1, $2, $3) ON CONFLICT (app_id) DO UPDATE SET \
             min_version = excluded.min_version, \
             revoked_versions_json = excluded.revoked_versions_json",
        )
        .bind(&p.app_id)
        .bind(p.min_version.clone())
        .bind(json_list(&p.revoked_versions))
        .execute(&self.pool)
        .await
        .db("writing an app policy")?;
        Ok(())
    }
}
