//! scm's Security server: the user directory (local and LDAP), device enrollment with shared keys
//! sealed at rest, in-memory sessions, app distribution, the resource and site catalogs, and the
//! three HTTPS APIs (device, proxies' with mutual TLS, admin). `docs/security-server.md` is the
//! manual.

// Items of private modules say `pub(crate)`: what `pub` marks is the crate's surface.
#![warn(unreachable_pub)]

pub mod admin_token;
mod admin_types;
pub mod api;
mod app_policy;
mod assertion;
mod audit_throttle;
pub mod backup;
pub mod challenges;
pub mod cli;
mod clock;
pub mod config;
pub mod data_dir;
pub mod devcerts;
#[allow(
    unreachable_pub,
    reason = "directory.rs belongs to another change of issue 13; its crate-only items become pub(crate) there"
)]
mod directory;
pub mod error;
pub mod fsmode;
#[doc(hidden)]
pub mod fuzz;
mod ha;
mod ldap_sync;
pub mod limits;
pub mod master_key;
pub mod metrics;
mod packages;
mod proxyauth;
pub mod secrets;
pub mod server;
pub mod sessions;
mod sites;
pub mod state;
pub mod store;
pub mod timings;
pub mod tls;

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod redaction_tests;
#[cfg(test)]
mod tls_reload_tests;
