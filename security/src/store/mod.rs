//! Persistent state through sqlx's `Any` driver, so one set of queries serves SQLite (the default,
//! a file created on first start) and PostgreSQL. Each backend has its own migrations folder.
//! Times are Unix seconds in BIGINT columns; lists are JSON text.

use std::path::Path;
use std::str::FromStr as _;

use scm_proto::api::{AppPolicy, AppRelease, Resource, ResourceMode};
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row as _};

use crate::error::{DbContext as _, Error};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database engine a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// The database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// When set, enrolments wait this long at most for a synchronous standby (PostgreSQL).
    sync_commit: Option<std::time::Duration>,
}

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
    /// Enrolment time.
    pub created_at: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// A site and its proxies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRow {
    /// Site name.
    pub name: String,
    /// Proxies, `host:port`, in order of preference.
    pub proxy_urls: Vec<String>,
}

/// One audit log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRow {
    /// Sequence number.
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    /// e.g. `login`, `login_failed`, `enrol`, `key_revoked`, `admin`.
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

fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn parse_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn get<'r, T>(row: &'r AnyRow, col: &'static str) -> Result<T, Error>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(col).db(col)
}

fn user_from(row: &AnyRow) -> Result<UserRow, Error> {
    Ok(UserRow {
        name: get(row, "name")?,
        source: get(row, "source")?,
        password_hash: get(row, "password_hash")?,
        ldap_dn: get(row, "ldap_dn")?,
        groups: parse_list(&get::<String>(row, "groups_json")?),
        site: get(row, "site")?,
        created_at: get(row, "created_at")?,
    })
}

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

fn release_from(row: &AnyRow) -> Result<AppRelease, Error> {
    let app_id: String = get(row, "app_id")?;
    let platform: String = get(row, "platform")?;
    let version: String = get(row, "version")?;
    Ok(AppRelease {
        download_path: download_path(&app_id, &platform, &version),
        sha256: get(row, "sha256")?,
        size: get::<i64>(row, "size")?.max(0) as u64,
        app_id,
        platform,
        version,
    })
}

/// The device API path of a release's download.
pub fn download_path(app_id: &str, platform: &str, version: &str) -> String {
    format!(
        "{}/{app_id}/download/{platform}/{version}",
        scm_proto::api::PATH_APPS
    )
}

const USER_COLS: &str = "name, source, password_hash, ldap_dn, groups_json, site, created_at";
const KEY_COLS: &str = "key_id, user_name, device_id, app_id, sealed_key, created_at, revoked_at";

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(Error::Invalid(format!(
                "database URL must start with sqlite: or postgres:// (got {:?})",
                url.split(':').next().unwrap_or_default()
            )));
        };
        // A SQLite file is created on first start: here, with mode 0600, before SQLite does it
        // with the umask's mode; SQLite gives its -wal and -shm files the database's mode.
        if backend == Backend::Sqlite {
            create_sqlite_file(url)?;
        }
        let url = if backend == Backend::Sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 16 })
            .connect(&url)
            .await
            .db("connecting")?;
        if backend == Backend::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .db("enabling WAL")?;
        }
        let store = Self {
            pool,
            backend,
            sync_commit: None,
        };
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
                 refusing enrolments and admin changes until it is promoted"
            );
            return Ok(store);
        }
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&store.pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&store.pool).await?,
        }
        Ok(store)
    }

    /// Makes enrolments wait for a synchronous standby (`synchronous_commit = remote_apply`),
    /// at most `timeout`. PostgreSQL only.
    pub fn require_sync_commit(&mut self, timeout: std::time::Duration) -> Result<(), Error> {
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

    /// The pool (backup and replication monitoring run their own queries).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Whether the database is a read-only hot standby (`pg_is_in_recovery()`); never for SQLite.
    pub async fn in_recovery(&self) -> Result<bool, Error> {
        if self.backend != Backend::Postgres {
            return Ok(false);
        }
        sqlx::query("SELECT pg_is_in_recovery() AS r")
            .fetch_one(&self.pool)
            .await
            .db("asking whether the database is a standby")?
            .try_get("r")
            .db("asking whether the database is a standby")
    }

    /// The newest migration applied to this database (0 if none).
    pub async fn schema_version(&self) -> Result<i64, Error> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(version), 0) AS v FROM _sqlx_migrations WHERE success = TRUE",
        )
        .fetch_one(&self.pool)
        .await;
        match row {
            Ok(r) => r.try_get("v").db("reading the schema version"),
            // No migrations table yet: an empty database.
            Err(sqlx::Error::Database(_)) => Ok(0),
            Err(e) => Err(e).db("reading the schema version"),
        }
    }

    /// The SQLite URL of the default database file in `data_dir`.
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!("sqlite://{}?mode=rwc", data_dir.join("scm.db").display())
    }

    /// Which engine this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- users ----

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
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(format!("user {}", u.name)));
        }
        Ok(())
    }

    /// Deletes a user and revokes their keys; returns whether the user existed.
    pub async fn delete_user(&self, name: &str) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await.db("beginning")?;
        let done = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .db("deleting a user")?;
        sqlx::query(
            "UPDATE device_keys SET revoked_at = $2 WHERE user_name = $1 AND revoked_at IS NULL",
        )
        .bind(name)
        .bind(unix_now())
        .execute(&mut *tx)
        .await
        .db("revoking a deleted user's keys")?;
        tx.commit().await.db("committing")?;
        Ok(done.rows_affected() > 0)
    }

    // ---- sites ----

    /// One site.
    pub async fn site(&self, name: &str) -> Result<Option<SiteRow>, Error> {
        let row = sqlx::query("SELECT name, proxy_urls FROM sites WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .db("reading a site")?;
        row.map(|r| {
            Ok(SiteRow {
                name: get(&r, "name")?,
                proxy_urls: parse_list(&get::<String>(&r, "proxy_urls")?),
            })
        })
        .transpose()
    }

    /// Every site.
    pub async fn sites(&self) -> Result<Vec<SiteRow>, Error> {
        let rows = sqlx::query("SELECT name, proxy_urls FROM sites ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .db("listing sites")?;
        rows.iter()
            .map(|r| {
                Ok(SiteRow {
                    name: get(r, "name")?,
                    proxy_urls: parse_list(&get::<String>(r, "proxy_urls")?),
                })
            })
            .collect()
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
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(format!("site {name}")));
        }
        Ok(())
    }

    // ---- device keys ----

    /// Stores a new key, revoking earlier keys of the same (user, device, app); returns those.
    pub async fn insert_key(&self, k: &KeyRow) -> Result<Vec<String>, Error> {
        let Some(timeout) = self.sync_commit else {
            return self.insert_key_tx(k, false).await;
        };
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
        tokio::time::timeout(timeout, self.insert_key_tx(k, true))
            .await
            .map_err(|_| Error::SyncTimeout(timeout))?
    }

    async fn insert_key_tx(&self, k: &KeyRow, sync: bool) -> Result<Vec<String>, Error> {
        let mut tx = self.pool.begin().await.db("beginning")?;
        if sync {
            // remote_apply: the standby has applied the row when we answer, so a failover
            // instance reading the standby finds the key at once.
            sqlx::query("SET LOCAL synchronous_commit = remote_apply")
                .execute(&mut *tx)
                .await
                .db("asking for synchronous commit")?;
        }
        let old: Vec<String> = sqlx::query(
            "SELECT key_id FROM device_keys WHERE user_name = $1 AND device_id = $2 \
             AND app_id = $3 AND revoked_at IS NULL",
        )
        .bind(&k.user_name)
        .bind(&k.device_id)
        .bind(&k.app_id)
        .fetch_all(&mut *tx)
        .await
        .db("finding replaced keys")?
        .iter()
        .map(|r| get(r, "key_id"))
        .collect::<Result<_, _>>()?;
        sqlx::query(
            "UPDATE device_keys SET revoked_at = $4 WHERE user_name = $1 AND device_id = $2 \
             AND app_id = $3 AND revoked_at IS NULL",
        )
        .bind(&k.user_name)
        .bind(&k.device_id)
        .bind(&k.app_id)
        .bind(unix_now())
        .execute(&mut *tx)
        .await
        .db("revoking replaced keys")?;
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
        let rows = match user {
            Some(u) => sqlx::query(&format!(
                "SELECT {KEY_COLS} FROM device_keys WHERE user_name = $1 ORDER BY created_at, key_id"
            ))
            .bind(u)
            .fetch_all(&self.pool)
            .await,
            None => sqlx::query(&format!(
                "SELECT {KEY_COLS} FROM device_keys ORDER BY created_at, key_id"
            ))
            .fetch_all(&self.pool)
            .await,
        }
        .db("listing keys")?;
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
        let ids: Vec<String> = sqlx::query(
            "SELECT key_id FROM device_keys WHERE device_id = $1 AND revoked_at IS NULL",
        )
        .bind(device_id)
        .fetch_all(&self.pool)
        .await
        .db("finding a device's keys")?
        .iter()
        .map(|r| get(r, "key_id"))
        .collect::<Result<_, _>>()?;
        sqlx::query(
            "UPDATE device_keys SET revoked_at = $2 WHERE device_id = $1 AND revoked_at IS NULL",
        )
        .bind(device_id)
        .bind(unix_now())
        .execute(&self.pool)
        .await
        .db("revoking a device's keys")?;
        Ok(ids)
    }

    // ---- activation codes ----

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

    /// Undoes [`Store::consume_activation_code`] when the enrolment it served failed afterwards.
    pub async fn release_activation_code(&self, code_hash: &str) -> Result<(), Error> {
        sqlx::query("UPDATE activation_codes SET used_at = NULL WHERE code_hash = $1")
            .bind(code_hash)
            .execute(&self.pool)
            .await
            .db("releasing an activation code")?;
        Ok(())
    }

    // ---- apps ----

    /// Records a published package; the (app, platform, version) must be new.
    pub async fn insert_release(&self, r: &AppRelease) -> Result<(), Error> {
        if self
            .release(&r.app_id, &r.platform, &r.version)
            .await?
            .is_some()
        {
            return Err(Error::Conflict(format!(
                "{} {} for {} is already published",
                r.app_id, r.version, r.platform
            )));
        }
        sqlx::query(
            "INSERT INTO app_releases (app_id, platform, version, sha256, size, published_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&r.app_id)
        .bind(&r.platform)
        .bind(&r.version)
        .bind(&r.sha256)
        .bind(r.size as i64)
        .bind(unix_now())
        .execute(&self.pool)
        .await
        .db("recording a release")?;
        Ok(())
    }

    /// One release.
    pub async fn release(
        &self,
        app_id: &str,
        platform: &str,
        version: &str,
    ) -> Result<Option<AppRelease>, Error> {
        let row = sqlx::query(
            "SELECT app_id, platform, version, sha256, size FROM app_releases \
             WHERE app_id = $1 AND platform = $2 AND version = $3",
        )
        .bind(app_id)
        .bind(platform)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .db("reading a release")?;
        row.as_ref().map(release_from).transpose()
    }

    /// Releases, optionally of one app.
    pub async fn releases(&self, app_id: Option<&str>) -> Result<Vec<AppRelease>, Error> {
        let q = "SELECT app_id, platform, version, sha256, size FROM app_releases";
        let rows = match app_id {
            Some(a) => {
                sqlx::query(&format!("{q} WHERE app_id = $1 ORDER BY app_id, platform"))
                    .bind(a)
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                sqlx::query(&format!("{q} ORDER BY app_id, platform"))
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .db("listing releases")?;
        rows.iter().map(release_from).collect()
    }

    /// The update policy of every app that has one.
    pub async fn policies(&self) -> Result<Vec<AppPolicy>, Error> {
        let rows = sqlx::query(
            "SELECT app_id, min_version, revoked_versions_json FROM app_policies ORDER BY app_id",
        )
        .fetch_all(&self.pool)
        .await
        .db("listing app policies")?;
        rows.iter()
            .map(|r| {
                Ok(AppPolicy {
                    app_id: get(r, "app_id")?,
                    min_version: get(r, "min_version")?,
                    revoked_versions: parse_list(&get::<String>(r, "revoked_versions_json")?),
                })
            })
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
        Ok(match row {
            Some(r) => AppPolicy {
                app_id: app_id.to_owned(),
                min_version: get(&r, "min_version")?,
                revoked_versions: parse_list(&get::<String>(&r, "revoked_versions_json")?),
            },
            None => AppPolicy {
                app_id: app_id.to_owned(),
                min_version: None,
                revoked_versions: Vec::new(),
            },
        })
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

    // ---- resources ----

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
                let mode: String = get(r, "mode")?;
                Ok(Resource {
                    name: get(r, "name")?,
                    address: get(r, "address")?,
                    mode: if mode == "http" {
                        ResourceMode::Http
                    } else {
                        ResourceMode::Tcp
                    },
                    allowed_groups: parse_list(&get::<String>(r, "allowed_groups_json")?),
                })
            })
            .collect()
    }

    /// Creates or replaces a resource.
    pub async fn upsert_resource(&self, r: &Resource) -> Result<(), Error> {
        let mode = match r.mode {
            ResourceMode::Tcp => "tcp",
            ResourceMode::Http => "http",
        };
        sqlx::query(
            "INSERT INTO resources (name, address, mode, allowed_groups_json) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET \
             address = excluded.address, mode = excluded.mode, \
             allowed_groups_json = excluded.allowed_groups_json",
        )
        .bind(&r.name)
        .bind(&r.address)
        .bind(mode)
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
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(format!("resource {name}")));
        }
        Ok(())
    }

    // ---- audit ----

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

    // ---- identity assertion signing keys ----

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

    /// Rows in a table (tests and diagnostics).
    pub async fn count(&self, table: &'static str) -> Result<i64, Error> {
        sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .db("counting rows")?
            .try_get("n")
            .db("counting rows")
    }
}

/// Creates the database file of a `sqlite:` URL with mode 0600 if it is missing.
fn create_sqlite_file(url: &str) -> Result<(), Error> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default();
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(':') || url.contains("mode=memory") {
        return Ok(());
    }
    let path = Path::new(path);
    if path.exists()
        || !path
            .parent()
            .is_none_or(|p| p.as_os_str().is_empty() || p.is_dir())
    {
        // Exists already, or its folder does not: SQLite reports the latter clearly.
        return Ok(());
    }
    match crate::fsmode::create_private_file(path) {
        Ok(_) => Ok(()),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The newest schema version this build knows (its last migration).
pub fn latest_schema_version() -> i64 {
    let v = |m: &sqlx::migrate::Migrator| m.iter().map(|m| m.version).max().unwrap_or(0);
    v(&SQLITE_MIGRATIONS).max(v(&POSTGRES_MIGRATIONS))
}

/// Validates a name used as an identifier (user, site, resource, app, platform, device).
pub fn check_name(what: &str, text: &str, max: usize) -> Result<(), Error> {
    let ok = !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} must be 1..={max} characters of letters, digits, '.', '_' or '-'"
        )))
    }
}

/// Parses a resource mode name.
pub fn parse_mode(text: &str) -> Result<ResourceMode, Error> {
    match text {
        "tcp" => Ok(ResourceMode::Tcp),
        "http" => Ok(ResourceMode::Http),
        other => Err(Error::Invalid(format!(
            "mode must be tcp or http, not {other:?}"
        ))),
    }
}

/// Parses a `host:port` proxy or back-end address (host may be a name or an IP).
pub fn check_host_port(what: &str, text: &str) -> Result<(), Error> {
    let bad = || Error::Invalid(format!("{what} must be host:port, got {text:?}"));
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || text.len() > 255 || u16::from_str(port).map_or(true, |p| p == 0) {
        return Err(bad());
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-[]:_".contains(&b))
    {
        return Err(bad());
    }
    Ok(())
}

// The password hash and the sealed key never reach a log through `{:?}`: an argon2 hash invites an
// offline guessing attack, and a sealed key is one master-key leak away from the shared key.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert!(check_name("user", "alice.b-c_1", 64).is_ok());
        for bad in ["", "a b", "a@b", "a/b", &"x".repeat(65)] {
            assert!(check_name("user", bad, 64).is_err(), "{bad}");
        }
        assert!(check_host_port("a", "10.0.0.1:80").is_ok());
        assert!(check_host_port("a", "[::1]:80").is_ok());
        assert!(check_host_port("a", "host.lan:443").is_ok());
        for bad in ["host", ":80", "h:0", "h:99999", "h :1", "h/x:1"] {
            assert!(check_host_port("a", bad).is_err(), "{bad}");
        }
    }

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
