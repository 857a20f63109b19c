//! Persistent state through sqlx's `Any` driver, so one set of queries serves SQLite (the default,
//! a file created on first start) and PostgreSQL. Each backend has its own migrations folder.
//! Times are Unix seconds in BIGINT columns; lists are JSON text.
//!
//! [`Store`] is the facade: this module opens the pool and says which engine it is and whether it
//! is a read-only standby; [`schema`] holds the migrations and reads back what they made; one
//! module per entity adds that entity's queries to [`Store`] (`users`, `sites`, `device_keys`
//! with [`sync_commit`]'s wait for a synchronous standby, `activation_codes`, `releases`,
//! `app_policies`, `resources`, `audit`, `assertion_keys`); [`validate`] checks the names and
//! addresses the APIs store.

mod activation_codes;
mod app_policies;
mod assertion_keys;
mod audit;
mod db;
mod device_keys;
mod releases;
mod resources;
pub mod schema;
mod sites;
mod sync_commit;
mod users;
pub mod validate;

use crate::error::Error;

pub use assertion_keys::AssertionKeyRow;
pub use audit::AuditRow;
pub use db::{Backend, Store, unix_now};
pub use device_keys::KeyRow;
pub use releases::download_path;
pub use schema::latest_schema_version;
pub use sites::SiteRow;
pub use users::UserRow;
pub use validate::{check_host_port, check_name, parse_mode};

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self, Error> {
        let store = Self::connect(url).await?;
        // A hot standby cannot run migrations (they write); its schema comes from the primary.
        if store.in_recovery().await? {
            let have = store.schema_version().await?;
            let want = latest_schema_version();
            if have != want {
                return Err(Error::Invalid(format!(
                    "this database is a read-only standby at schema version {have}, and this \
                     scm-security needs version {want}: start scm-security on the primary first"
                )));
            }
            tracing::warn!(
                "the database is a read-only hot standby: serving logins and validations, \
                 refusing enrollments and admin changes until it is promoted"
            );
            return Ok(store);
        }
        store.migrate().await?;
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_store_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
        store.ensure_site("main").await.unwrap();
        let u = UserRow {
            name: "alice".into(),
            source: "local".into(),
            password_hash: Some("h".into()),
            ldap_dn: None,
            groups: vec!["staff".into()],
            site: "main".into(),
            created_at: 1,
        };
        store.insert_user(&u).await.unwrap();
        assert!(matches!(
            store.insert_user(&u).await,
            Err(Error::Conflict(_))
        ));
        assert_eq!(store.user("alice").await.unwrap(), Some(u));
        assert!(matches!(
            store.delete_site("main").await,
            Err(Error::Conflict(_))
        ));
        let k = KeyRow {
            key_id: "k1".into(),
            user_name: "alice".into(),
            device_id: "d".into(),
            app_id: "a".into(),
            sealed_key: vec![1, 2, 3],
            created_at: 1,
            revoked_at: None,
        };
        assert!(store.insert_key(&k).await.unwrap().is_empty());
        let k2 = KeyRow {
            key_id: "k2".into(),
            ..k
        };
        assert_eq!(store.insert_key(&k2).await.unwrap(), vec!["k1".to_string()]);
        assert!(store.key("k1").await.unwrap().unwrap().revoked_at.is_some());
        store.audit("x", "y", "z", "", "").await.unwrap();
        assert_eq!(store.audit_log(10).await.unwrap().len(), 1);
        // Reopening runs no migration twice.
        drop(store);
        let again = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
        assert_eq!(again.count("users").await.unwrap(), 1);
    }
}
