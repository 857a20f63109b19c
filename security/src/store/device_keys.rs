//! Enrolled device keys, one live key per (user, device, app), sealed under the master key; an
//! enrollment revokes the key it replaces, and the admin revokes one key or a whole device.

use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::db::{Store, get, unix_now};
use crate::error::{DbContext as _, Error};

/// An enrolled (user, device, app) key; the key itself stays sealed.
#[derive(Clone, Serialize, Deserialize)]
pub struct KeyRow {
    /// Key id.
    pub key_id: String,
    /// Owner.
    pub user_name: String,
    /// Device.
    pub device_id: String,
    /// App.
    pub app_id: String,
    /// Sealed shared key.
    #[serde(skip)]
    pub sealed_key: Vec<u8>,
    /// Enrollment time.
    pub created_at: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

const KEY_COLS: &str = "key_id, user_name, device_id, app_id, sealed_key, created_at, revoked_at";

fn key_from(row: &AnyRow) -> Result<KeyRow, Error> {
    Ok(KeyRow {
        key_id: get(row, "key_id")?,
        user_name: get(row, "user_name")?,
        device_id: get(row, "device_id")?,
        app_id: get(row, "app_id")?,
        sealed_key: get(row, "sealed_key")?,
        created_at: get(row, "created_at")?,
        revoked_at: get(row, "revoked_at")?,
    })
}

/// Which live (unrevoked) keys a revocation concerns.
pub(super) enum LiveKeys<'a> {
    /// Every key of a user.
    OfUser(&'a str),
    /// Every key of a device.
    OfDevice(&'a str),
    /// The key of one (user, device, app).
    Of {
        user: &'a str,
        device: &'a str,
        app: &'a str,
    },
}

/// Revokes the live keys `which` names, now, in one statement; returns their ids, sorted.
pub(super) async fn revoke_live(
    conn: &mut AnyConnection,
    which: LiveKeys<'_>,
    context: &'static str,
) -> Result<Vec<String>, Error> {
    let (cond, binds): (&str, Vec<&str>) = match which {
        LiveKeys::OfUser(u) => ("user_name = $2", vec![u]),
        LiveKeys::OfDevice(d) => ("device_id = $2", vec![d]),
        LiveKeys::Of { user, device, app } => (
            "user_name = $2 AND device_id = $3 AND app_id = $4",
            vec![user, device, app],
        ),
    };
    let sql = format!(
        "UPDATE device_keys SET revoked_at = $1 WHERE revoked_at IS NULL AND {cond} \
         RETURNING key_id"
    );
    let mut q = sqlx::query(&sql).bind(unix_now());
    for b in binds {
        q = q.bind(b);
    }
    let mut ids = q
        .fetch_all(&mut *conn)
        .await
        .db(context)?
        .iter()
        .map(|r| get(r, "key_id"))
        .collect::<Result<Vec<String>, _>>()?;
    ids.sort();
    Ok(ids)
}

impl Store {
    /// Stores a new key, revoking earlier keys of the same (user, device, app); returns those.
    pub async fn insert_key(&self, k: &KeyRow) -> Result<Vec<String>, Error> {
        match self.sync_commit {
            None => self.insert_key_tx(k, false).await,
            Some(timeout) => {
                self.with_sync_standby(timeout, self.insert_key_tx(k, true))
                    .await
            }
        }
    }

    async fn insert_key_tx(&self, k: &KeyRow, sync: bool) -> Result<Vec<String>, Error> {
        let mut tx = self.pool.begin().await.db("beginning")?;
        if sync {
            Self::require_remote_apply(&mut tx).await?;
        }
        let old = revoke_live(
            &mut tx,
            LiveKeys::Of {
                user: &k.user_name,
                device: &k.device_id,
                app: &k.app_id,
            },
            "revoking replaced keys",
        )
        .await?;
        sqlx::query(&format!(
            "INSERT INTO device_keys ({KEY_COLS}) VALUES ($1, $2, $3, $4, $5, $6, NULL)"
        ))
        .bind(&k.key_id)
        .bind(&k.user_name)
        .bind(&k.device_id)
        .bind(&k.app_id)
        .bind(k.sealed_key.clone())
        .bind(k.created_at)
        .execute(&mut *tx)
        .await
        .db("storing a key")?;
        tx.commit().await.db("committing")?;
        Ok(old)
    }

    /// One key.
    pub async fn key(&self, key_id: &str) -> Result<Option<KeyRow>, Error> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLS} FROM device_keys WHERE key_id = $1"
        ))
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .db("reading a key")?;
        row.as_ref().map(key_from).transpose()
    }

    /// Keys, optionally of one user.
    pub async fn keys(&self, user: Option<&str>) -> Result<Vec<KeyRow>, Error> {
        let select = format!("SELECT {KEY_COLS} FROM device_keys");
        let rows = self
            .fetch_where(
                &select,
                ("user_name", user),
                "created_at, key_id",
                "listing keys",
            )
            .await?;
        rows.iter().map(key_from).collect()
    }

    /// Any one stored key (to check the master key at start).
    pub async fn any_key(&self) -> Result<Option<KeyRow>, Error> {
        let row = sqlx::query(&format!("SELECT {KEY_COLS} FROM device_keys LIMIT 1"))
            .fetch_optional(&self.pool)
            .await
            .db("reading a key")?;
        row.as_ref().map(key_from).transpose()
    }

    /// Revokes one key; `NotFound` if unknown, `Ok(false)` if it was already revoked.
    pub async fn revoke_key(&self, key_id: &str) -> Result<bool, Error> {
        let Some(k) = self.key(key_id).await? else {
            return Err(Error::NotFound(format!("key {key_id}")));
        };
        if k.revoked_at.is_some() {
            return Ok(false);
        }
        sqlx::query("UPDATE device_keys SET revoked_at = $2 WHERE key_id = $1")
            .bind(key_id)
            .bind(unix_now())
            .execute(&self.pool)
            .await
            .db("revoking a key")?;
        Ok(true)
    }

    /// Revokes every live key of a device; returns their ids.
    pub async fn revoke_device(&self, device_id: &str) -> Result<Vec<String>, Error> {
        let mut conn = self.pool.acquire().await.db("connecting")?;
        revoke_live(
            &mut conn,
            LiveKeys::OfDevice(device_id),
            "revoking a device's keys",
        )
        .await
    }
}

// The sealed key never reaches a log through `{:?}`: it is one master-key leak away from the
// shared key.
impl std::fmt::Debug for KeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRow")
            .field("key_id", &self.key_id)
            .field("user_name", &self.user_name)
            .field("device_id", &self.device_id)
            .field("app_id", &self.app_id)
            .field("sealed_key", &scm_proto::redact::Redacted)
            .field("created_at", &self.created_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}
