//! Sites: a user belongs to one, and a site names the proxies its devices use, in order.

use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::db::{Store, found, get, get_list, json_list, unix_now};
use crate::error::{DbContext as _, Error};

/// A site and its proxies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRow {
    /// Site name.
    pub name: String,
    /// Proxies, `host:port`, in order of preference.
    pub proxy_urls: Vec<String>,
}

fn site_from(row: &AnyRow) -> Result<SiteRow, Error> {
    Ok(SiteRow {
        name: get(row, "name")?,
        proxy_urls: get_list(row, "proxy_urls")?,
    })
}

impl Store {
    /// One site.
    pub async fn site(&self, name: &str) -> Result<Option<SiteRow>, Error> {
        let row = sqlx::query("SELECT name, proxy_urls FROM sites WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .db("reading a site")?;
        row.as_ref().map(site_from).transpose()
    }

    /// Every site.
    pub async fn sites(&self) -> Result<Vec<SiteRow>, Error> {
        let rows = sqlx::query("SELECT name, proxy_urls FROM sites ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .db("listing sites")?;
        rows.iter().map(site_from).collect()
    }

    /// Creates or replaces a site.
    pub async fn upsert_site(&self, s: &SiteRow) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO sites (name, proxy_urls, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET proxy_urls = excluded.proxy_urls",
        )
        .bind(&s.name)
        .bind(json_list(&s.proxy_urls))
        .bind(unix_now())
        .execute(&self.pool)
        .await
        .db("writing a site")?;
        Ok(())
    }

    /// Creates a site with no proxies if it does not exist.
    pub async fn ensure_site(&self, name: &str) -> Result<(), Error> {
        if self.site(name).await?.is_some() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO sites (name, proxy_urls, created_at) VALUES ($1, '[]', $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(unix_now())
        .execute(&self.pool)
        .await
        .db("creating the default site")?;
        Ok(())
    }

    /// Deletes a site no user belongs to.
    pub async fn delete_site(&self, name: &str) -> Result<(), Error> {
        let users: i64 = sqlx::query("SELECT COUNT(*) AS n FROM users WHERE site = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .db("counting a site's users")?
            .try_get("n")
            .db("counting a site's users")?;
        if users > 0 {
            return Err(Error::Conflict(format!(
                "site {name} still has {users} user(s)"
            )));
        }
        let done = sqlx::query("DELETE FROM sites WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .db("deleting a site")?;
        found(done, || format!("site {name}"))
    }
}
