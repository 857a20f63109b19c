//! The one shutdown signal of every long-running scm process: SIGTERM (a service manager's stop)
//! or SIGINT (Ctrl-C), whichever comes first.
//!
//! The handlers are installed by [`Shutdown::install`], before the process reports itself ready,
//! so a stop sent right after start-up is not lost to the default action (which would kill the
//! process without its clean-up).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Which signal asked for the stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM.
    Terminate,
    /// SIGINT.
    Interrupt,
}

impl StopSignal {
    /// The signal's name, `SIGTERM` or `SIGINT`.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Terminate => "SIGTERM",
            StopSignal::Interrupt => "SIGINT",
        }
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The installed SIGTERM and SIGINT handlers.
#[derive(Debug)]
pub struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    /// Installs the handlers (needs a tokio runtime). From now on SIGTERM and SIGINT no longer
    /// end the process by themselves: [`Shutdown::recv`] reports them.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.term.recv() => StopSignal::Terminate,
            _ = self.int.recv() => StopSignal::Interrupt,
        }
    }
}

/// Installs the handlers and waits for the first SIGTERM or SIGINT: for a caller that has
/// nothing to do between the two.
pub async fn shutdown_signal() -> std::io::Result<StopSignal> {
    Ok(Shutdown::install()?.recv().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_the_signal_that_came() {
        let mut s = Shutdown::install().unwrap();
        // SAFETY: raise(3) sends a signal to this process; the handler installed above catches
        // it, so the default action (termination) does not run.
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(s.recv().await, StopSignal::Terminate);
        // SAFETY: as above, for SIGINT.
        unsafe { libc::raise(libc::SIGINT) };
        assert_eq!(s.recv().await, StopSignal::Interrupt);
        assert_eq!(StopSignal::Terminate.to_string(), "SIGTERM");
    }
}
