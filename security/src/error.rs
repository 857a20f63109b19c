//! Errors: [`ApiError`] is what every HTTP handler returns (a status and a stable code, rendered as
//! the proto's `ErrorBody`); [`Error`] is the crate's internal failure type with context.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use scm_proto::api::ErrorBody;

/// An error answer of the HTTP APIs: status, stable snake_case code, human message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Explanation for humans.
    pub message: String,
}

impl ApiError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 with a code.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 403 with a code.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 404 with a code.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409 with a code.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 500 `internal`: the details go to the log, not to the client.
    pub fn internal(err: &dyn std::error::Error) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_owned(),
            message: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::NotFound(what) => ApiError::not_found("not_found", format!("{what} not found")),
            Error::Conflict(what) => ApiError::conflict("conflict", what),
            Error::Invalid(what) => ApiError::bad_request("invalid_field", what),
            Error::ReadOnly(what) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "read_only_standby",
                format!(
                    "this Security server's database is a read-only standby ({what}): \
                     enroll and make admin changes at the primary, or promote this standby"
                ),
            ),
            Error::NoSyncStandby(why) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_sync_standby",
                format!(
                    "enrollment needs a synchronous standby (--require-sync-commit) and {why}; \
                     nothing was enrolled"
                ),
            ),
            Error::SyncTimeout(after) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sync_commit_timeout",
                format!(
                    "no synchronous standby confirmed the enrollment within {after:?}; \
                     enroll again once the standby is back"
                ),
            ),
            Error::HashQueueFull(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many password checks are waiting; try again in a moment",
            ),
            other => ApiError::internal(&other),
        }
    }
}

/// Internal failures, each with enough context to explain a log line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database operation failed.
    #[error("database: {context}: {source}")]
    Db {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Migrations failed.
    #[error("database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Key material is malformed or a ciphertext does not decrypt.
    #[error("key material: {0}")]
    Crypto(String),
    /// TLS configuration is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The LDAP directory failed.
    #[error("LDAP: {0}")]
    Ldap(String),
    /// A record does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A record conflicts with an existing one.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A value is not acceptable.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Password hashing failed.
    #[error("password hashing: {0}")]
    Hash(String),
    /// Too many password checks are already waiting for a hashing slot.
    #[error("password checks: {0} are waiting already")]
    HashQueueFull(usize),
    /// A write reached a database that is a read-only hot standby.
    #[error("database is a read-only standby: {0}")]
    ReadOnly(&'static str),
    /// Synchronous commit is required but no synchronous standby is there.
    #[error("no synchronous standby: {0}")]
    NoSyncStandby(String),
    /// Synchronous commit did not complete in time.
    #[error("synchronous commit not confirmed within {0:?}")]
    SyncTimeout(std::time::Duration),
    /// A backup snapshot is unusable or a backup/restore step failed.
    #[error("backup: {0}")]
    Backup(String),
}

impl Error {
    /// Wraps an I/O error with the path involved.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// Attaches context to sqlx results.
pub trait DbContext<T> {
    /// Names what was being done when the database failed.
    fn db(self, context: &'static str) -> Result<T, Error>;
}

impl<T> DbContext<T> for Result<T, sqlx::Error> {
    fn db(self, context: &'static str) -> Result<T, Error> {
        self.map_err(|source| {
            // SQLSTATE 25006 read_only_sql_transaction: a hot standby refused a write.
            let read_only = matches!(&source, sqlx::Error::Database(d)
                if d.code().is_some_and(|c| c == "25006"));
            if read_only {
                Error::ReadOnly(context)
            } else {
                Error::Db { context, source }
            }
        })
    }
}
