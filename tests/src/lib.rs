//! Harness for scm's end-to-end tests, demo and benchmarks: builds and starts the real
//! `scm-security` and `scm-proxy` binaries on 127.0.0.1 with generated certificates and a fresh
//! SQLite data directory, runs small real back ends (TCP echo, HTTP that echoes what it got), and
//! enrolls devices with the real device library.

pub mod backend;
pub mod ha;
pub mod hosts;
pub mod link;
pub mod stack;

pub use stack::{Stack, StackOptions};
