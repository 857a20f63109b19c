//! Identity assertion signing keys (`crate::assertion` rotates them), sealed under the master
//! key. Backups leave this table out on purpose (`crate::backup::NOT_BACKED_UP` says why).

use super::db::{Store, get};
use crate::error::{DbContext as _, Error};

/// An identity assertion signing key as stored; the private key stays sealed.
#[derive(Debug, Clone)]
pub struct AssertionKeyRow {
    /// Key id (`kid`).
    pub kid: String,
    /// The PKCS#8 P-256 private key, sealed under the master key.
    pub sealed_key: Vec<u8>,
    /// Creation time.
    pub created_at: i64,
    /// Time from which it signs.
    pub active_from: i64,
}

impl Store {
    /// Every assertion signing key, oldest first (the key stays sealed).
    pub async fn assertion_keys(&self) -> Result<Vec<AssertionKeyRow>, Error> {
        let rows = sqlx::query(
            "SELECT kid, sealed_key, created_at, active_from FROM assertion_keys \
             ORDER BY active_from, kid",
        )
        .fetch_all(&self.pool)
        .await
        .db("listing assertion signing keys")?;
        rows.iter()
            .map(|r| {
                Ok(AssertionKeyRow {
                    kid: get(r, "kid")?,
                    sealed_key: get(r, "sealed_key")?,
                    created_at: get(r, "created_at")?,
                    active_from: get(r, "active_from")?,
                })
            })
            .collect()
    }

    /// Stores a new assertion signing key.
    pub async fn insert_assertion_key(&self, k: &AssertionKeyRow) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO assertion_keys (kid, sealed_key, created_at, active_from) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&k.kid)
        .bind(k.sealed_key.clone())
        .bind(k.created_at)
        .bind(k.active_from)
        .execute(&self.pool)
        .await
        .db("storing an assertion signing key")?;
        Ok(())
    }

    /// Deletes a retired assertion signing key.
    pub async fn delete_assertion_key(&self, kid: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM assertion_keys WHERE kid = $1")
            .bind(kid)
            .execute(&self.pool)
            .await
            .db("deleting a retired assertion signing key")?;
        Ok(())
    }
}
