//! The connection behind the [`Store`] facade: the engine, the pool, connecting,
//! and the row-reading helpers every entity module shares.

use crate::error::{DbContext as _, Error};
use sqlx::any::{AnyPoolOptions, AnyQueryResult, AnyRow};
use sqlx::{AnyPool, Row as _};
use std::path::Path;

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
    pub(super) pool: AnyPool,
    pub(super) backend: Backend,
    /// When set, enrollments wait this long at most for a synchronous standby (PostgreSQL).
    pub(super) sync_commit: Option<std::time::Duration>,
}

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---- helpers the entity modules share ----

pub(super) fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

pub(super) fn parse_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

pub(super) fn get<'r, T>(row: &'r AnyRow, col: &'static str) -> Result<T, Error>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(col).db(col)
}

/// A JSON list column.
pub(super) fn get_list(row: &AnyRow, col: &'static str) -> Result<Vec<String>, Error> {
    Ok(parse_list(&get::<String>(row, col)?))
}

/// `NotFound(what())` when a write that names one row matched none.
pub(super) fn found(done: AnyQueryResult, what: impl FnOnce() -> String) -> Result<(), Error> {
    if done.rows_affected() == 0 {
        return Err(Error::NotFound(what()));
    }
    Ok(())
}

impl Store {
    /// Connects to the database at `url`, creating a SQLite file if needed (mode 0600); the
    /// facade's [`Store::open`] then checks the schema.
    pub(super) async fn connect(url: &str) -> Result<Self, Error> {
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
        Ok(Self {
            pool,
            backend,
            sync_commit: None,
        })
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

    /// The rows of `select` (a SELECT up to its table), only those whose `col` equals the
    /// filter's value when it has one, in `order`.
    pub(super) async fn fetch_where(
        &self,
        select: &str,
        (col, value): (&str, Option<&str>),
        order: &str,
        context: &'static str,
    ) -> Result<Vec<AnyRow>, Error> {
        match value {
            Some(v) => {
                sqlx::query(&format!("{select} WHERE {col} = $1 ORDER BY {order}"))
                    .bind(v)
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                sqlx::query(&format!("{select} ORDER BY {order}"))
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .db(context)
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
