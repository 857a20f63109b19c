//! The supervisor's error type, and the lock helper every part of it uses.

use std::{io, sync::Mutex};

use crate::xdp::XdpError;

/// What can go wrong in the supervisor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// Loading, attaching or updating the eBPF programs and maps.
    #[error(transparent)]
    Steer(#[from] XdpError),
    /// A system call or file operation.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A bad flag value.
    #[error("{0}")]
    Config(String),
}

pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// A poisoned lock is taken anyway: the state it guards stays usable after a panic elsewhere.
pub(super) fn lock<T>(s: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}
