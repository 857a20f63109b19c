//! The wait for a synchronous standby (PostgreSQL streaming replication): with
//! `--require-sync-commit`, an enrollment commits with `synchronous_commit = remote_apply`, is
//! refused at once when no synchronous standby is streaming, and fails after the timeout rather
//! than hang.

use std::time::Duration;

use sqlx::{AnyConnection, Row as _};

use super::db::{Backend, Store};
use crate::error::{DbContext as _, Error};

impl Store {
    /// Makes enrollments wait for a synchronous standby (`synchronous_commit = remote_apply`),
    /// at most `timeout`. PostgreSQL only.
    pub fn require_sync_commit(&mut self, timeout: Duration) -> Result<(), Error> {
        if self.backend != Backend::Postgres {
            return Err(Error::Invalid(
                "--require-sync-commit needs PostgreSQL streaming replication (--database-url \
                 postgres://...)"
                    .into(),
            ));
        }
        self.sync_commit = Some(timeout);
        Ok(())
    }

    /// Runs `write` (a transaction that called [`Store::require_remote_apply`]) once a
    /// synchronous standby is streaming, for `timeout` at most.
    pub(super) async fn with_sync_standby<T>(
        &self,
        timeout: Duration,
        write: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        // Refuse at once rather than block: with no synchronous standby connected, PostgreSQL
        // would hold the commit until one comes back.
        let sync: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
        )
        .fetch_one(&self.pool)
        .await
        .db("looking for a synchronous standby")?
        .try_get("n")
        .db("looking for a synchronous standby")?;
        if sync == 0 {
            let names: String = sqlx::query("SHOW synchronous_standby_names")
                .fetch_one(&self.pool)
                .await
                .db("reading synchronous_standby_names")?
                .try_get(0)
                .db("reading synchronous_standby_names")?;
            return Err(Error::NoSyncStandby(if names.trim().is_empty() {
                "the primary has no synchronous_standby_names".into()
            } else {
                format!("no standby named by synchronous_standby_names = '{names}' is streaming")
            }));
        }
        tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| Error::SyncTimeout(timeout))?
    }

    /// Makes the transaction on `tx` commit only once the standby has applied it.
    pub(super) async fn require_remote_apply(tx: &mut AnyConnection) -> Result<(), Error> {
        // remote_apply: the standby has applied the row when we answer, so a failover
        // instance reading the standby finds the key at once.
        sqlx::query("SET LOCAL synchronous_commit = remote_apply")
            .execute(&mut *tx)
            .await
            .db("asking for synchronous commit")?;
        Ok(())
    }
}
