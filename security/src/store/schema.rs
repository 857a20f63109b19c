//! The schema: each engine's migrations (`migrations/sqlite`, `migrations/postgres`), the version
//! a database is at, and the tables and columns the migrations made, read back from the database
//! itself so that other copies of the schema (the backup's table list) can be checked against it.

use sqlx::Row as _;

use super::db::{Backend, Store, get};
use crate::error::{DbContext as _, Error};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The newest schema version this build knows (its last migration).
pub fn latest_schema_version() -> i64 {
    let v = |m: &sqlx::migrate::Migrator| m.iter().map(|m| m.version).max().unwrap_or(0);
    v(&SQLITE_MIGRATIONS).max(v(&POSTGRES_MIGRATIONS))
}

/// What a column holds, the same for both engines (SQLite's `BLOB` is PostgreSQL's `BYTEA`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ColumnType {
    /// `TEXT`.
    Text,
    /// `BIGINT` (or SQLite's `INTEGER` row id, PostgreSQL's `BIGSERIAL`).
    Integer,
    /// `BLOB` / `BYTEA`.
    Blob,
    /// Any other declared type, as the engine names it.
    Other(String),
}

impl ColumnType {
    fn from_declared(ty: &str) -> Self {
        match ty.to_ascii_lowercase().as_str() {
            "text" => Self::Text,
            "bigint" | "integer" => Self::Integer,
            "blob" | "bytea" => Self::Blob,
            _ => Self::Other(ty.to_owned()),
        }
    }
}

/// One column of one of scm's tables, as the database reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Column {
    /// Its table.
    pub table: String,
    /// Its name.
    pub name: String,
    /// Its type.
    pub ty: ColumnType,
    /// Whether it accepts NULL.
    pub nullable: bool,
}

impl Store {
    /// Applies this engine's migrations that the database lacks.
    pub(super) async fn migrate(&self) -> Result<(), Error> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
        }
        Ok(())
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

    /// Every column of every table the migrations made (not sqlx's own `_sqlx_migrations`, nor
    /// SQLite's internal tables), sorted by table and column name.
    pub async fn columns(&self) -> Result<Vec<Column>, Error> {
        // SQLite does not count a TEXT primary key as NOT NULL; scm never stores NULL there.
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT m.name AS t, p.name AS c, p.type AS ty, \
                 CASE WHEN p.\"notnull\" = 0 AND p.pk = 0 THEN 1 ELSE 0 END AS nullable \
                 FROM sqlite_master m JOIN pragma_table_info(m.name) p \
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
                 AND m.name <> '_sqlx_migrations'"
            }
            Backend::Postgres => {
                "SELECT table_name::TEXT AS t, column_name::TEXT AS c, data_type::TEXT AS ty, \
                 (CASE WHEN is_nullable = 'YES' THEN 1 ELSE 0 END)::BIGINT AS nullable \
                 FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name <> '_sqlx_migrations'"
            }
        };
        let rows = sqlx::query(sql)
            .fetch_all(&self.pool)
            .await
            .db("reading the schema")?;
        let mut cols = rows
            .iter()
            .map(|r| {
                Ok(Column {
                    table: get(r, "t")?,
                    name: get(r, "c")?,
                    ty: ColumnType::from_declared(&get::<String>(r, "ty")?),
                    nullable: get::<i64>(r, "nullable")? != 0,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        cols.sort();
        Ok(cols)
    }
}
