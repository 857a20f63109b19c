//! scm's device client: what a mobile app does, as a library (used by the CLI, the end-to-end
//! tests, the demo and the benchmarks).
//!
//! ```text
//! let device = Device::enroll(config, "alice", "password").await?;  // once: gets the shared key
//! let session = Session::login(&device, "password").await?;          // proof of the shared key
//! let stream = session.open("intranet").await?;                      // TLS to a proxy + preamble
//! session.logout().await?;
//! ```
//!
//! - [`api`]: the Security server's device API, with fail-over across several URLs.
//! - [`device`]: enrollment and the enrolled identity ([`Device`]).
//! - [`session`]: login, opening connections through a proxy, logout ([`Session`]).
//! - [`http`]: HTTP requests to an http-mode resource through a proxy.
//! - [`tunnel`]: a local listener forwarding to a tcp-mode resource (like `ssh -L`).
//! - [`state`]: the state file the CLI keeps between commands (mode 0600).
//! - [`update`]: "is there an update for me" and the checked download.
#![warn(unreachable_pub)]

pub mod api;
pub mod device;
pub mod error;
pub mod http;
pub mod session;
pub mod state;
pub mod tls;
pub mod tunnel;
pub mod update;

pub use device::{Device, DeviceConfig, Enrollment};
pub use error::DeviceError;
pub use session::{ProxyStream, Session};
