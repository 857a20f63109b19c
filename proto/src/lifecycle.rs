//! What a long-running scm process tells its service manager and its own parts about where it is
//! in its life: the sd_notify(3) reports of a `Type=notify` systemd unit (ready, reloading,
//! stopping, a status line), and the drain flag that listeners, the readiness check and the
//! stop path share.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every report is a no-op, so the same binary runs the
//! same way from a shell, a test or a unit.
//!
//! [`accept`] is the accept helper of every TCP listener (it backs off instead of spinning when
//! descriptors run out, and counts it); [`reload`] (with feature `tls`) the server certificate
//! a SIGHUP swaps.

pub mod accept;
#[cfg(feature = "tls")]
pub mod reload;

pub use accept::{Acceptor, accept_backoffs};

use tokio::sync::watch;

/// sd_notify(3) reports. Each returns the socket error, if any, for the caller to log: a report
/// that cannot be sent is never a reason to stop serving.
pub mod notify {
    use sd_notify::NotifyState;

    /// `READY=1` with a status line: every listener is bound and the process serves. systemd
    /// starts the units ordered after this one only now.
    pub fn ready(status: &str) -> std::io::Result<()> {
        sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)])
    }

    /// `RELOADING=1` with the monotonic clock (what `Type=notify-reload` needs): a reload began.
    /// Send [`ready`] when it is over, whether it succeeded or was refused.
    pub fn reloading() -> std::io::Result<()> {
        sd_notify::notify(
            false,
            &[NotifyState::Reloading, NotifyState::monotonic_usec_now()?],
        )
    }

    /// `STOPPING=1` with a status line: the process drains and will exit.
    pub fn stopping(status: &str) -> std::io::Result<()> {
        sd_notify::notify(false, &[NotifyState::Stopping, NotifyState::Status(status)])
    }

    /// `STATUS=...`: the line `systemctl status` shows.
    pub fn status(status: &str) -> std::io::Result<()> {
        sd_notify::notify(false, &[NotifyState::Status(status)])
    }

    /// The environment variable a child process must not inherit, so that only the main
    /// process (the one systemd watches) reports: a supervisor removes it from its workers.
    pub const SOCKET_ENV: &str = "NOTIFY_SOCKET";
}

/// Set once, when the process begins to drain (a stop signal): listeners stop accepting, the
/// readiness check answers "not ready", and open connections get until the drain timeout.
/// Clones share one flag.
#[derive(Debug, Clone)]
pub struct Drain {
    tx: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(false),
        }
    }

    /// Sets the flag (idempotent) and wakes every [`Drain::wait`].
    pub fn begin(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the process is draining.
    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the flag is set (at once if it already is).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so `wait_for` cannot see it closed.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_wakes_every_waiter_and_stays_set() {
        let drain = Drain::new();
        assert!(!drain.is_draining());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let d = drain.clone();
                tokio::spawn(async move { d.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        drain.begin();
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("a waiter woke")
                .unwrap();
        }
        assert!(drain.is_draining());
        drain.begin();
        assert!(drain.is_draining());
        // A wait after the fact resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), drain.wait())
            .await
            .expect("a late waiter resolves at once");
    }
}
