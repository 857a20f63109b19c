//! What the supervisor reads of and does to other processes: pidfds (open one, take a duplicate
//! of a descriptor), the sockets a worker holds (procfs), whether a pid still runs the same
//! binary, and signals.

use std::{
    io,
    os::fd::{OwnedFd, RawFd},
};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process},
};
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, Signal};

fn pid_of(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))
}

/// A pidfd for `pid`: it turns readable when the process exits, and lets us take duplicates of
/// its descriptors.
pub(super) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(
        pid_of(pid)?,
        PidfdFlags::empty(),
    )?)
}

/// A duplicate, in this process, of descriptor `target` of the process behind `pidfd`.
pub(super) fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_getfd(
        pidfd,
        target,
        PidfdGetfdFlags::empty(),
    )?)
}

/// The rows of /proc/<pid>/net/tcp{,6}: (local port, state, inode). Unreadable tables (the
/// process is gone) give none.
fn tcp_rows(pid: u32) -> Vec<(u16, TcpState, u64)> {
    let Ok(process) = Process::new(pid as i32) else {
        return Vec::new();
    };
    [process.tcp(), process.tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.local_address.port(), e.state, e.inode))
        .collect()
}

/// The socket inodes a process holds, with the descriptor numbers.
fn socket_fds(pid: u32) -> Vec<(RawFd, u64)> {
    let Ok(fds) = Process::new(pid as i32).and_then(|p| p.fd()) else {
        return Vec::new();
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some((fd.fd, inode)),
            _ => None,
        })
        .collect()
}

/// The descriptor number of the socket `pid` listens on at `port`, once it does.
pub(super) fn listening_fd(pid: u32, port: u16) -> Option<RawFd> {
    let inodes: Vec<u64> = tcp_rows(pid)
        .into_iter()
        .filter(|(p, s, _)| *p == port && *s == TcpState::Listen)
        .map(|(_, _, i)| i)
        .collect();
    socket_fds(pid)
        .into_iter()
        .find(|(_, i)| inodes.contains(i))
        .map(|(fd, _)| fd)
}

/// Device connections a worker holds: its established sockets on the service port (sk_lookup
/// keeps the service port as their local port).
pub fn device_connections(pid: u32, service_port: u16) -> usize {
    let inodes: Vec<u64> = tcp_rows(pid)
        .into_iter()
        .filter(|(p, s, _)| *p == service_port && *s == TcpState::Established)
        .map(|(_, _, i)| i)
        .collect();
    socket_fds(pid)
        .iter()
        .filter(|(_, i)| inodes.contains(i))
        .count()
}

/// Whether `pid` runs this very executable (a pid in the worker map may have been reused).
pub(super) fn same_binary(pid: u32) -> bool {
    match (
        Process::new(pid as i32).and_then(|p| p.exe()),
        std::env::current_exe(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Whether `pid` runs; a zombie (dead, waiting for a reaper that is not us) does not.
pub(super) fn process_runs(pid: u32) -> bool {
    Process::new(pid as i32)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.state != 'Z')
}

/// Sends `sig` to `pid`; a process already gone is no error worth reporting.
pub(super) fn signal_pid(pid: u32, sig: Signal) {
    if let Ok(pid) = pid_of(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}
