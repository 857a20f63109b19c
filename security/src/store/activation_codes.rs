//! Activation codes: only their SHA-256 is stored; one enrollment uses one up, and a failed
//! enrollment gives it back.

use super::db::{Store, unix_now};
use crate::error::{DbContext as _, Error};

impl Store {
    /// Stores the hash of a new activation code.
    pub async fn insert_activation_code(
        &self,
        code_hash: &str,
        user: &str,
        expires_at: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO activation_codes (code_hash, user_name, expires_at, used_at) \
             VALUES ($1, $2, $3, NULL)",
        )
        .bind(code_hash)
        .bind(user)
        .bind(expires_at)
        .execute(&self.pool)
        .await
        .db("storing an activation code")?;
        Ok(())
    }

    /// Marks a live code of `user` used; returns whether one was.
    pub async fn consume_activation_code(
        &self,
        code_hash: &str,
        user: &str,
    ) -> Result<bool, Error> {
        let now = unix_now();
        let done = sqlx::query(
            "UPDATE activation_codes SET used_at = $3 WHERE code_hash = $1 AND user_name = $2 \
             AND used_at IS NULL AND expires_at > $3",
        )
        .bind(code_hash)
        .bind(user)
        .bind(now)
        .execute(&self.pool)
        .await
        .db("using an activation code")?;
        Ok(done.rows_affected() == 1)
    }

    /// Undoes [`Store::consume_activation_code`] when the enrollment it served failed afterwards.
    pub async fn release_activation_code(&self, code_hash: &str) -> Result<(), Error> {
        sqlx::query("UPDATE activation_codes SET used_at = NULL WHERE code_hash = $1")
            .bind(code_hash)
            .execute(&self.pool)
            .await
            .db("releasing an activation code")?;
        Ok(())
    }
}
