//! scm's Security server: the user directory (local and LDAP), device enrolment with shared keys
//! sealed at rest, in-memory sessions, app distribution, the resource and site catalogs, and the
//! three HTTPS APIs (device, proxies' with mutual TLS, admin). `docs/security-server.md` is the
//! manual.

pub mod admin_token;
pub mod admin_types;
pub mod api;
pub mod app_policy;
pub mod assertion;
pub mod audit_throttle;
pub mod backup;
pub mod cli;
pub mod config;
pub mod data_dir;
pub mod devcerts;
pub mod directory;
pub mod error;
pub mod fsmode;
pub mod ha;
pub mod ldap_sync;
pub mod master_key;
pub mod metrics;
pub mod packages;
pub mod proxyauth;
pub mod secrets;
pub mod server;
pub mod sessions;
pub mod sites;
pub mod state;
pub mod store;
pub mod tls;

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod redaction_tests;
