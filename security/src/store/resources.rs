//! The resource catalog: back ends by name, how a proxy relays to each, and who may reach it.

use scm_proto::api::{Resource, ResourceMode};

use super::db::{Store, found, get, get_list, json_list};
use super::validate::{mode_name, parse_mode};
use crate::error::{DbContext as _, Error};

impl Store {
    /// The resource catalog.
    pub async fn resources(&self) -> Result<Vec<Resource>, Error> {
        let rows = sqlx::query(
            "SELECT name, address, mode, allowed_groups_json FROM resources ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .db("listing resources")?;
        rows.iter()
            .map(|r| {
                Ok(Resource {
                    name: get(r, "name")?,
                    address: get(r, "address")?,
                    // Only the admin API writes this column, through `parse_mode`; anything
                    // else is read as the plainer relay, as it always was.
                    mode: parse_mode(&get::<String>(r, "mode")?).unwrap_or(ResourceMode::Tcp),
                    allowed_groups: get_list(r, "allowed_groups_json")?,
                })
            })
            .collect()
    }

    /// Creates or replaces a resource.
    pub async fn upsert_resource(&self, r: &Resource) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO resources (name, address, mode, allowed_groups_json) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET \
             address = excluded.address, mode = excluded.mode, \
             allowed_groups_json = excluded.allowed_groups_json",
        )
        .bind(&r.name)
        .bind(&r.address)
        .bind(mode_name(r.mode))
        .bind(json_list(&r.allowed_groups))
        .execute(&self.pool)
        .await
        .db("writing a resource")?;
        Ok(())
    }

    /// Deletes a resource.
    pub async fn delete_resource(&self, name: &str) -> Result<(), Error> {
        let done = sqlx::query("DELETE FROM resources WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .db("deleting a resource")?;
        found(done, || format!("resource {name}"))
    }
}
