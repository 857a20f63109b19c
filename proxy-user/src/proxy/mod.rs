//! The proxy's data path: device TLS termination, preamble, session validation, policy, relaying.
//!
//! [`server`] starts the proxy and its control plane (`control`: catalog, revalidation,
//! revocation stream); a connection (`connection`) goes through: TLS 1.3 handshake ([`tls`], kTLS where the kernel has it),
//! the preamble ([`preamble`]), the session ([`security_client`] behind [`cache`]), the binding MAC
//! and the app and resource policy ([`policy`]), repeated failures per source ([`limiter`]), then [`relay`] (tcp mode) or [`http`] (http mode).
//! `docs/proxy-and-device.md` describes it in prose.

pub mod assertion;
pub mod cache;
pub mod config;
mod connection;
mod control;
pub mod http;
pub mod limiter;
pub mod metrics;
pub mod policy;
pub mod preamble;
pub mod refusals;
pub mod relay;
pub mod security_client;
pub mod server;
pub mod tls;

#[cfg(test)]
mod redaction_tests;

pub use config::ServeArgs;
pub use refusals::{AuthFailure, AuthFailureKind, RefusalSink};
pub use server::{ServeError, ServeHooks, serve, serve_with};
