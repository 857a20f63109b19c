//! The device client's errors, each saying which step failed and against what.

use scm_proto::api::ErrorBody;
use scm_proto::preamble::Status;

/// Anything the device client can fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// A local file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What the file is.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A local file has unusable content.
    #[error("{what} {path}: {why}")]
    BadFile {
        /// What the file is.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS profile could not be set up (the provider refused its versions, or a PEM file).
    #[error("{0}")]
    TlsProfile(#[from] scm_proto::tls::TlsError),
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
    /// No Security server answered.
    #[error("no Security server answered ({tried} tried); last: {last}")]
    SecurityUnavailable {
        /// How many URLs were tried.
        tried: usize,
        /// The last failure.
        last: String,
    },
    /// The Security server refused the request.
    #[error("Security server refused {what}: HTTP {status}: {}: {}", body.code, body.message)]
    Refused {
        /// Which request.
        what: &'static str,
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The Security server answered something unreadable.
    #[error("Security server answered {what} with something unreadable: {why}")]
    BadAnswer {
        /// Which request.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// No proxy could be reached.
    #[error("no proxy reachable ({tried} tried); last: {last}")]
    ProxyUnreachable {
        /// How many proxies were tried.
        tried: usize,
        /// The last failure.
        last: String,
    },
    /// The proxy refused the preamble.
    #[error("proxy refused the connection: {status}: {reason}")]
    ProxyRefused {
        /// The reply status.
        status: Status,
        /// The proxy's reason.
        reason: String,
    },
    /// The proxy connection failed after the handshake.
    #[error("proxy connection: {0}")]
    ProxyIo(std::io::Error),
    /// The proxy's reply could not be parsed.
    #[error("proxy reply: {0}")]
    Reply(#[from] scm_proto::preamble::ReplyError),
    /// A preamble could not be built.
    #[error("preamble: {0}")]
    Preamble(#[from] scm_proto::preamble::PreambleError),
    /// Key material was malformed.
    #[error("key material: {0}")]
    Key(#[from] scm_proto::crypto::KeyError),
    /// An argument is unusable.
    #[error("{0}")]
    Usage(String),
    /// The HTTP exchange through the proxy failed.
    #[error("HTTP through the proxy: {0}")]
    Http(String),
    /// A downloaded package does not match its published checksum.
    #[error("package checksum mismatch: published {expected}, downloaded {got}")]
    Checksum {
        /// The published SHA-256.
        expected: String,
        /// The SHA-256 of what arrived.
        got: String,
    },
}
