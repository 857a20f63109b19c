//! The one TCP accept helper every scm listener uses, so that no accept loop ever spins.
//!
//! `accept(2)` fails in two ways that matter. Resource exhaustion (EMFILE, ENFILE, ENOBUFS,
//! ENOMEM) leaves the pending connection in the kernel's queue, so the listener stays readable
//! and a loop that retries at once burns a CPU until a descriptor frees: [`accept`] backs off
//! (10 ms, doubling to 1 s) and counts every back-off in a process-wide counter
//! ([`accept_backoffs`]) that the metrics export. A failure of one connection (ECONNABORTED: the
//! peer reset it while it waited; EPROTO, EPERM by a firewall, ...) says nothing about the next:
//! [`accept`] retries at once. Either way the log gets at most one line per second per listener,
//! with the number of failures it stands for.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The first back-off after a resource failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest back-off: a freed descriptor is used within this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per listener per this long.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Back-offs of every accept loop of this process since it started.
static BACKOFFS: AtomicU64 = AtomicU64::new(0);

/// How many times an accept loop of this process backed off because the process or the system
/// ran out of a resource (descriptors, socket buffers, memory): the metrics export it as a
/// counter.
pub fn accept_backoffs() -> u64 {
    BACKOFFS.load(Ordering::Relaxed)
}

/// What an accept error asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// The process or the system is out of a resource: wait before the next try.
    Resource,
    /// Only this connection failed: try the next one at once.
    Connection,
}

/// Classifies an accept error. Unknown errors count as [`AcceptFailure::Resource`], so that an
/// error nobody foresaw cannot make a loop spin either.
pub fn classify(e: &std::io::Error) -> AcceptFailure {
    match e.raw_os_error() {
        Some(
            libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM,
        ) => AcceptFailure::Resource,
        Some(
            libc_errno::ECONNABORTED
            | libc_errno::ECONNRESET
            | libc_errno::EINTR
            | libc_errno::EAGAIN
            | libc_errno::EPROTO
            | libc_errno::EPERM
            | libc_errno::ENETDOWN
            | libc_errno::ENOPROTOOPT
            | libc_errno::EHOSTDOWN
            | libc_errno::ENONET
            | libc_errno::EHOSTUNREACH
            | libc_errno::EOPNOTSUPP
            | libc_errno::ENETUNREACH
            | libc_errno::ETIMEDOUT,
        ) => AcceptFailure::Connection,
        _ => match e.kind() {
            std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::WouldBlock => AcceptFailure::Connection,
            _ => AcceptFailure::Resource,
        },
    }
}

/// Linux errno values (the same on every Linux architecture scm builds for), so that this crate
/// needs no libc dependency for six numbers.
mod libc_errno {
    pub(super) const EPERM: i32 = 1;
    pub(super) const EINTR: i32 = 4;
    pub(super) const EAGAIN: i32 = 11;
    pub(super) const ENOMEM: i32 = 12;
    pub(super) const ENFILE: i32 = 23;
    pub(super) const EMFILE: i32 = 24;
    pub(super) const ENONET: i32 = 64;
    pub(super) const EPROTO: i32 = 71;
    pub(super) const ENOPROTOOPT: i32 = 92;
    pub(super) const EOPNOTSUPP: i32 = 95;
    pub(super) const ENETDOWN: i32 = 100;
    pub(super) const ENETUNREACH: i32 = 101;
    pub(super) const ECONNABORTED: i32 = 103;
    pub(super) const ECONNRESET: i32 = 104;
    pub(super) const ENOBUFS: i32 = 105;
    pub(super) const ETIMEDOUT: i32 = 110;
    pub(super) const EHOSTDOWN: i32 = 112;
    pub(super) const EHOSTUNREACH: i32 = 113;
}

/// One listener's accept loop state: its name for the log and the rate limit of its log lines.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Acceptor {
    /// Wraps `listener`; `name` is the listener's name in log lines (`device`, `metrics`, ...).
    pub fn new(listener: TcpListener, name: &'static str) -> Self {
        Self {
            listener,
            name,
            last_log: None,
            unlogged: 0,
        }
    }

    /// The listener (for its address).
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// The next connection. Never returns an error: a failed accept is retried (at once, or
    /// after a back-off for resource exhaustion, see the module). Cancel-safe: dropping the
    /// future (a `select!` on a stop signal) loses no connection.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let e = match self.listener.accept().await {
                Ok(c) => return c,
                Err(e) => e,
            };
            let failure = classify(&e);
            self.log(&e, failure, backoff);
            if failure == AcceptFailure::Resource {
                BACKOFFS.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    fn log(&mut self, e: &std::io::Error, failure: AcceptFailure, backoff: Duration) {
        let now = Instant::now();
        if self.last_log.is_some_and(|t| now < t + LOG_EVERY) {
            self.unlogged += 1;
            return;
        }
        let also = std::mem::take(&mut self.unlogged);
        self.last_log = Some(now);
        match failure {
            AcceptFailure::Resource => tracing::warn!(
                listener = self.name,
                error = %e,
                backoff = ?backoff,
                failures_since_last_line = also,
                accept_backoffs = accept_backoffs() + 1,
                "accept failed: out of a resource (descriptors, buffers or memory); backing off \
                 instead of retrying at once"
            ),
            AcceptFailure::Connection => tracing::debug!(
                listener = self.name,
                error = %e,
                failures_since_last_line = also,
                "accept failed for one connection; taking the next"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_back_off_and_connection_errors_do_not() {
        let os = std::io::Error::from_raw_os_error;
        assert_eq!(classify(&os(24)), AcceptFailure::Resource); // EMFILE
        assert_eq!(classify(&os(23)), AcceptFailure::Resource); // ENFILE
        assert_eq!(classify(&os(105)), AcceptFailure::Resource); // ENOBUFS
        assert_eq!(classify(&os(12)), AcceptFailure::Resource); // ENOMEM
        assert_eq!(classify(&os(103)), AcceptFailure::Connection); // ECONNABORTED
        assert_eq!(classify(&os(71)), AcceptFailure::Connection); // EPROTO
        assert_eq!(classify(&os(4)), AcceptFailure::Connection); // EINTR
        // Something nobody foresaw must not spin.
        assert_eq!(classify(&os(5)), AcceptFailure::Resource); // EIO
        assert_eq!(
            std::io::Error::from_raw_os_error(libc_errno::EMFILE).kind(),
            std::io::Error::from_raw_os_error(libc::EMFILE).kind()
        );
        assert_eq!(libc_errno::ECONNABORTED, libc::ECONNABORTED);
        assert_eq!(libc_errno::ENOBUFS, libc::ENOBUFS);
        assert_eq!(libc_errno::ENONET, libc::ENONET);
        assert_eq!(libc_errno::EHOSTDOWN, libc::EHOSTDOWN);
        assert_eq!(libc_errno::ETIMEDOUT, libc::ETIMEDOUT);
    }

    #[tokio::test]
    async fn accepts_connections() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut a = Acceptor::new(l, "test");
        let (c, (s, peer)) = tokio::join!(TcpStream::connect(addr), a.accept());
        assert_eq!(c.unwrap().local_addr().unwrap(), peer);
        assert_eq!(s.peer_addr().unwrap(), peer);
    }
}
