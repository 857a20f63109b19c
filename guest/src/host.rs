//! Host-side helpers: who we run as, and running a host tool.

use std::process::{Command, Stdio};

use crate::error::GuestError;

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a host tool, turning a failure into [`GuestError::Tool`].
pub(crate) fn run_tool(cmd: &mut Command, tool: &str) -> Result<(), GuestError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|_| GuestError::Unavailable {
            what: tool.to_owned(),
        })?;
    if !out.status.success() {
        return Err(GuestError::Tool {
            tool: tool.to_owned(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
