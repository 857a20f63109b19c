//! The proxy's data path: device TLS termination, preamble, session validation, policy, relaying.
//!
//! [`server`] starts the proxy and its control plane (`control`: catalog, revalidation,
//! revocation stream); a connection (`connection`) goes through: TLS 1.3 handshake ([`tls`], kTLS where the kernel has it),
//! the preamble ([`preamble`]), the session ([`security_client`] behind [`cache`]), the binding MAC
//! and the app and resource policy ([`policy`]), repeated failures per source ([`limiter`]), then [`relay`] (tcp mode; `splice` on the kTLS path) or [`http`] (http mode).
//! `docs/proxy-and-device.md` describes it in prose.

mod assertion;
mod cache;
pub mod config;
mod connection;
mod control;
#[doc(hidden)]
pub mod fuzz;
mod http;
mod ktls;
mod limiter;
mod metrics;
mod policy;
mod preamble;
mod proxy_header;
mod refusals;
mod relay;
mod security_client;
mod server;
mod splice;
pub mod tls;

#[cfg(test)]
mod redaction_tests;

// What main.rs, the tests and the supervisor need; the rest is the proxy's own business.
pub use config::ServeArgs;
pub use limiter::FailurePolicy;
pub use refusals::{AuthFailure, AuthFailureKind, RefusalSink};
pub use server::{ServeError, ServeHooks, serve, serve_with};
