//! The audit log: who did what to which subject, from where; appended to, read newest first.

use serde::{Deserialize, Serialize};

use super::db::{Store, get, unix_now};
use crate::error::{DbContext as _, Error};

/// One audit log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRow {
    /// Sequence number.
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    /// e.g. `login`, `login_failed`, `enroll`, `key_revoked`, `admin`.
    pub kind: String,
    /// Who did it (user name, `admin`, `system`).
    pub actor: String,
    /// What it concerned (user, key id, session tag, ...).
    pub subject: String,
    /// Source address, if any.
    pub source: String,
    /// Free text.
    pub detail: String,
}

impl Store {
    /// Appends to the audit log.
    pub async fn audit(
        &self,
        kind: &str,
        actor: &str,
        subject: &str,
        source: &str,
        detail: &str,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO audit_log (at, kind, actor, subject, source, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(unix_now())
        .bind(kind)
        .bind(actor)
        .bind(subject)
        .bind(source)
        .bind(detail)
        .execute(&self.pool)
        .await
        .db("writing the audit log")?;
        Ok(())
    }

    /// The newest `limit` audit entries, newest first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditRow>, Error> {
        let rows = sqlx::query(
            "SELECT id, at, kind, actor, subject, source, detail FROM audit_log \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .db("reading the audit log")?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    id: get(r, "id")?,
                    at: get(r, "at")?,
                    kind: get(r, "kind")?,
                    actor: get(r, "actor")?,
                    subject: get(r, "subject")?,
                    source: get(r, "source")?,
                    detail: get(r, "detail")?,
                })
            })
            .collect()
    }
}
