//! Why a guest run could not happen or did not finish.

use std::path::PathBuf;
use std::time::Duration;

/// Why a guest run could not happen or did not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestError {
    /// A tool or the kernel package is missing on this host: a test skips on it outside CI.
    #[error("the guest kernel harness needs {what}")]
    Unavailable {
        /// What is missing and how to get it.
        what: String,
    },
    /// A file system step failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A host tool ran and failed.
    #[error("{tool} failed: {why}")]
    Tool {
        /// The tool.
        tool: String,
        /// What it said.
        why: String,
    },
    /// The cached kernel package is not usable.
    #[error("the guest kernel: {why}")]
    Kernel {
        /// What is wrong.
        why: String,
    },
    /// A module asked for is neither a `.ko` of the package nor built in.
    #[error("kernel {release} has no module {name:?} (neither a .ko in the package nor built in)")]
    NoSuchModule {
        /// The name asked for.
        name: String,
        /// The guest kernel's release.
        release: String,
    },
    /// A host file asked for does not exist.
    #[error("{}: cannot pack it into the guest: {source}", path.display())]
    NoSuchFile {
        /// The path.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// `ldd` could not find a library a packed binary needs.
    #[error("{}: a library it needs is missing on this host: {line}", file.display())]
    MissingLibrary {
        /// The binary.
        file: PathBuf,
        /// ldd's line.
        line: String,
    },
    /// An empty command line.
    #[error("no command to run in the guest")]
    NoCommand,
    /// The guest's init could not prepare the command (a module that would not load, say).
    #[error("guest set-up failed: {why}\n--- guest console (tail) ---\n{console}")]
    Setup {
        /// What the init script reported.
        why: String,
        /// The tail of the kernel console.
        console: String,
    },
    /// The run did not end within the host-side bound; qemu was killed.
    #[error(
        "the guest did not finish within {timeout:?}; output so far:\n{output}\n--- guest console (tail) ---\n{console}"
    )]
    Timeout {
        /// The bound.
        timeout: Duration,
        /// The command's output so far.
        output: String,
        /// The tail of the kernel console.
        console: String,
    },
    /// qemu ended without the command's exit line (a kernel panic, a crash of qemu).
    #[error(
        "the guest ended ({status}) without reporting the command's exit code; output:\n{output}\n--- guest console (tail) ---\n{console}"
    )]
    NoExit {
        /// qemu's exit status.
        status: String,
        /// The command's output.
        output: String,
        /// The tail of the kernel console.
        console: String,
    },
}

impl GuestError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this says the host lacks a requirement (a test skips on it outside CI).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

pub(crate) fn io_err(context: impl Into<String>, source: std::io::Error) -> GuestError {
    GuestError::io(context, source)
}
