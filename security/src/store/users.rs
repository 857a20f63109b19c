//! Users of the directory (local, with an argon2id hash, or from LDAP, with a bind DN).

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::db::{Store, found, get, get_list, json_list};
use super::device_keys::{LiveKeys, revoke_live};
use crate::error::{DbContext as _, Error};

/// A user of the directory.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    /// User name (without `@site`).
    pub name: String,
    /// `local` or `ldap`.
    pub source: String,
    /// argon2id PHC string for local users.
    #[serde(skip)]
    pub password_hash: Option<String>,
    /// Bind DN for LDAP users.
    pub ldap_dn: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Site.
    pub site: String,
    /// Creation time.
    pub created_at: i64,
}

const USER_COLS: &str = "name, source, password_hash, ldap_dn, groups_json, site, created_at";

fn user_from(row: &AnyRow) -> Result<UserRow, Error> {
    Ok(UserRow {
        name: get(row, "name")?,
        source: get(row, "source")?,
        password_hash: get(row, "password_hash")?,
        ldap_dn: get(row, "ldap_dn")?,
        groups: get_list(row, "groups_json")?,
        site: get(row, "site")?,
        created_at: get(row, "created_at")?,
    })
}

impl Store {
    /// One user.
    pub async fn user(&self, name: &str) -> Result<Option<UserRow>, Error> {
        let row = sqlx::query(&format!("SELECT {USER_COLS} FROM users WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .db("reading a user")?;
        row.as_ref().map(user_from).transpose()
    }

    /// Every user, by name.
    pub async fn users(&self) -> Result<Vec<UserRow>, Error> {
        let rows = sqlx::query(&format!("SELECT {USER_COLS} FROM users ORDER BY name"))
            .fetch_all(&self.pool)
            .await
            .db("listing users")?;
        rows.iter().map(user_from).collect()
    }

    /// Adds a user; a name already taken is a conflict.
    pub async fn insert_user(&self, u: &UserRow) -> Result<(), Error> {
        if self.user(&u.name).await?.is_some() {
            return Err(Error::Conflict(format!("user {} already exists", u.name)));
        }
        sqlx::query(&format!(
            "INSERT INTO users ({USER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&u.name)
        .bind(&u.source)
        .bind(u.password_hash.clone())
        .bind(u.ldap_dn.clone())
        .bind(json_list(&u.groups))
        .bind(&u.site)
        .bind(u.created_at)
        .execute(&self.pool)
        .await
        .db("adding a user")?;
        Ok(())
    }

    /// Rewrites a user's mutable fields.
    pub async fn update_user(&self, u: &UserRow) -> Result<(), Error> {
        let done = sqlx::query(
            "UPDATE users SET password_hash = $2, ldap_dn = $3, groups_json = $4, site = $5 \
             WHERE name = $1",
        )
        .bind(&u.name)
        .bind(u.password_hash.clone())
        .bind(u.ldap_dn.clone())
        .bind(json_list(&u.groups))
        .bind(&u.site)
        .execute(&self.pool)
        .await
        .db("updating a user")?;
        found(done, || format!("user {}", u.name))
    }

    /// Deletes a user and revokes their keys; returns whether the user existed.
    pub async fn delete_user(&self, name: &str) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await.db("beginning")?;
        let done = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .db("deleting a user")?;
        revoke_live(
            &mut tx,
            LiveKeys::OfUser(name),
            "revoking a deleted user's keys",
        )
        .await?;
        tx.commit().await.db("committing")?;
        Ok(done.rows_affected() > 0)
    }
}

// The password hash never reaches a log through `{:?}`: an argon2 hash invites an offline
// guessing attack.
impl std::fmt::Debug for UserRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow")
            .field("name", &self.name)
            .field("source", &self.source)
            .field(
                "password_hash",
                &scm_proto::redact::optional(&self.password_hash),
            )
            .field("ldap_dn", &self.ldap_dn)
            .field("groups", &self.groups)
            .field("site", &self.site)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}
