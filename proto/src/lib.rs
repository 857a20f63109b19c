//! The wire contract of scm: what the device client, the proxy and the Security server say to each
//! other, and the key derivations all three must compute identically.
//!
//! - [`crypto`]: shared keys, login proof, session key (HKDF), channel-binding MAC, session tags.
//! - [`preamble`]: the binary frame a device sends a proxy after the TLS handshake, and the reply.
//! - [`api`]: the JSON messages of the device API and the proxies' API on the Security server.
//! - [`version`]: app version ordering used by the update and minimum-version policy.
//! - [`failover`]: preferred order with failback over a list of Security servers.
//! - [`redact`]: what `Debug` prints in place of a secret.
//! - [`duration`]: the parser of every duration flag.
//! - `tls` (feature `tls`): the TLS profile — crypto provider, versions, PEM loading.
//! - `shutdown` (feature `shutdown`): the SIGTERM/SIGINT future of every long-running process.
//! - `lifecycle` (feature `shutdown`): the sd_notify reports and the drain flag.
//! - `ops` (feature `ops`): every daemon's ops listener (/metrics, /ready, /live, /status),
//!   process metrics and log flags.
//!
//! `docs/protocol.md` describes the same contract in prose.
#![warn(unreachable_pub)]

pub mod api;
#[cfg(feature = "cli")]
pub mod cli;
pub mod crypto;
pub mod duration;
pub mod failover;
#[cfg(feature = "shutdown")]
pub mod lifecycle;
#[cfg(feature = "ops")]
pub mod ops;
pub mod preamble;
pub mod redact;
#[cfg(feature = "shutdown")]
pub mod shutdown;
#[cfg(feature = "tls")]
pub mod tls;
pub mod version;

/// The TLS exporter label whose output the channel-binding MAC covers (RFC 8446 §7.5).
pub const BINDING_EXPORTER_LABEL: &[u8] = b"EXPORTER-scm-channel-binding-v1";
/// Length of the exporter output the binding MAC covers.
pub const BINDING_EXPORTER_LEN: usize = 32;
