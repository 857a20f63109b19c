//! "Preferred order with failback" over a list of Security servers, shared by the device client
//! and the proxy so both move between servers the same way:
//!
//! - calls go to the current server first, then to the others in list order after it;
//! - a call that succeeds elsewhere makes that server current (a fail-over);
//! - while the current server is not the first (preferred) one, the first is tried ahead of the
//!   current one at most once per failback interval; when it answers it becomes current again
//!   (a failback);
//! - when every server fails nothing changes: the next call starts from the same server.
//!
//! Pure state, no I/O and no dependencies: callers do the calls, then report which server
//! answered. Times are passed in (`*_at`) so tests can drive the clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a client away from its first server tries it again, unless configured otherwise.
pub const DEFAULT_FAILBACK: Duration = Duration::from_secs(10);

/// Which way a change of server went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchKind {
    /// Away from a server that failed.
    Failover,
    /// Back to the first (preferred) server.
    Failback,
}

/// A change of the current server, for the caller to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// Index of the server that was current.
    pub from: usize,
    /// Index of the server that is current now.
    pub to: usize,
    /// Fail-over or failback.
    pub kind: SwitchKind,
}

/// The servers to try for one call, in order, and which server was current when it was planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The current server when the plan was made (pass it back to [`Failover::succeeded`]).
    pub from: usize,
    /// Indices to try, in order; every server appears exactly once.
    pub order: Vec<usize>,
}

#[derive(Debug)]
struct State {
    current: usize,
    /// When the first server may be tried again ahead of the current one.
    next_probe: Option<Instant>,
}

/// The shared state of one client's list of servers.
#[derive(Debug)]
pub struct Failover {
    len: usize,
    failback: Duration,
    state: Mutex<State>,
}

impl Failover {
    /// State for `len` servers (at least one is assumed), starting on the first, trying the first
    /// again every `failback` while away from it.
    pub fn new(len: usize, failback: Duration) -> Self {
        Self {
            len: len.max(1),
            failback,
            state: Mutex::new(State {
                current: 0,
                next_probe: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two plain fields, valid after any panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: there is at least one server.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The failback interval.
    pub fn failback(&self) -> Duration {
        self.failback
    }

    /// Index of the current server.
    pub fn current(&self) -> usize {
        self.lock().current
    }

    /// The order for a call made now.
    pub fn plan(&self) -> Plan {
        self.plan_at(Instant::now())
    }

    /// The order for a call made at `now`: the first server ahead when away from it and its
    /// retry is due (which schedules the next retry), then the current one and those after it.
    pub fn plan_at(&self, now: Instant) -> Plan {
        let mut st = self.lock();
        let from = st.current;
        let mut order = Vec::with_capacity(self.len);
        if from != 0 && st.next_probe.is_none_or(|t| now >= t) {
            st.next_probe = Some(now + self.failback);
            order.push(0);
        }
        for i in 0..self.len {
            let idx = (from + i) % self.len;
            if !order.contains(&idx) {
                order.push(idx);
            }
        }
        Plan { from, order }
    }

    /// Whether the first server's retry is due at `now` (the caller is away from it). Marks the
    /// retry as taken when it is, like [`Failover::plan_at`] does.
    pub fn failback_due_at(&self, now: Instant) -> bool {
        let mut st = self.lock();
        if st.current == 0 || st.next_probe.is_some_and(|t| now < t) {
            return false;
        }
        st.next_probe = Some(now + self.failback);
        true
    }

    /// Reports that server `idx` answered a call planned while `from` was current. Returns the
    /// switch when this makes `idx` current. A stale report (another call already moved the
    /// current server since `from`) changes nothing, so concurrent calls cannot flap.
    pub fn succeeded(&self, from: usize, idx: usize) -> Option<Switch> {
        self.succeeded_at(from, idx, Instant::now())
    }

    /// [`Failover::succeeded`] at a given time.
    pub fn succeeded_at(&self, from: usize, idx: usize, now: Instant) -> Option<Switch> {
        let mut st = self.lock();
        if idx == from || st.current != from || idx >= self.len {
            return None;
        }
        st.current = idx;
        let kind = if idx == 0 {
            st.next_probe = None;
            SwitchKind::Failback
        } else {
            if from == 0 {
                st.next_probe = Some(now + self.failback);
            }
            SwitchKind::Failover
        };
        Some(Switch {
            from,
            to: idx,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FB: Duration = Duration::from_secs(10);

    #[test]
    fn starts_on_the_first_and_tries_in_list_order() {
        let f = Failover::new(3, FB);
        let p = f.plan();
        assert_eq!(
            p,
            Plan {
                from: 0,
                order: vec![0, 1, 2]
            }
        );
        // The first answers: nothing changes.
        assert_eq!(f.succeeded(p.from, 0), None);
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn moves_on_and_sticks() {
        let t0 = Instant::now();
        let f = Failover::new(3, FB);
        let p = f.plan_at(t0);
        // 0 failed, 1 answered.
        assert_eq!(
            f.succeeded_at(p.from, 1, t0),
            Some(Switch {
                from: 0,
                to: 1,
                kind: SwitchKind::Failover
            })
        );
        // Before the failback interval: the current one first, the first one last.
        let p = f.plan_at(t0 + Duration::from_secs(1));
        assert_eq!(
            p,
            Plan {
                from: 1,
                order: vec![1, 2, 0]
            }
        );
        assert_eq!(f.succeeded_at(p.from, 1, t0), None);
        // 1 fails too, 2 answers: still a fail-over, and the failback clock keeps running.
        assert_eq!(
            f.succeeded_at(p.from, 2, t0 + Duration::from_secs(2)),
            Some(Switch {
                from: 1,
                to: 2,
                kind: SwitchKind::Failover
            })
        );
        assert_eq!(f.plan_at(t0 + Duration::from_secs(3)).order, vec![2, 0, 1]);
        assert_eq!(f.plan_at(t0 + FB).order, vec![0, 2, 1]);
    }

    #[test]
    fn tries_the_first_again_at_most_once_per_interval_and_goes_back() {
        let t0 = Instant::now();
        let f = Failover::new(2, FB);
        let p = f.plan_at(t0);
        f.succeeded_at(p.from, 1, t0);
        // Due at t0 + FB: the first goes ahead, once.
        let probe = f.plan_at(t0 + FB);
        assert_eq!(probe.order, vec![0, 1]);
        // A concurrent call at the same moment does not retry it again.
        assert_eq!(f.plan_at(t0 + FB).order, vec![1, 0]);
        // The retry failed (1 answered): no switch, next retry one interval later.
        assert_eq!(f.succeeded_at(probe.from, 1, t0 + FB), None);
        assert_eq!(f.plan_at(t0 + FB + FB / 2).order, vec![1, 0]);
        let probe = f.plan_at(t0 + FB * 2);
        assert_eq!(probe.order, vec![0, 1]);
        // This time it answers: failback.
        assert_eq!(
            f.succeeded_at(probe.from, 0, t0 + FB * 2),
            Some(Switch {
                from: 1,
                to: 0,
                kind: SwitchKind::Failback
            })
        );
        assert_eq!(f.current(), 0);
        assert_eq!(f.plan_at(t0 + FB * 2).order, vec![0, 1]);
    }

    #[test]
    fn failback_due_follows_the_same_clock() {
        let t0 = Instant::now();
        let f = Failover::new(2, FB);
        assert!(!f.failback_due_at(t0), "on the first: nothing to retry");
        f.succeeded_at(0, 1, t0);
        assert!(!f.failback_due_at(t0 + FB / 2));
        assert!(f.failback_due_at(t0 + FB));
        assert!(!f.failback_due_at(t0 + FB), "taken once per interval");
        // plan_at shares the schedule.
        assert_eq!(f.plan_at(t0 + FB + FB / 2).order, vec![1, 0]);
        assert!(f.failback_due_at(t0 + FB * 2));
        assert_eq!(
            f.succeeded_at(1, 0, t0 + FB * 2).map(|s| s.kind),
            Some(SwitchKind::Failback)
        );
        assert!(!f.failback_due_at(t0 + FB * 10));
    }

    #[test]
    fn all_down_changes_nothing() {
        let t0 = Instant::now();
        let f = Failover::new(3, FB);
        // Every server fails: nobody reports success; the next call starts where this one did.
        let p = f.plan_at(t0);
        assert_eq!(p.order, vec![0, 1, 2]);
        assert_eq!(f.current(), 0);
        assert_eq!(f.plan_at(t0).order, vec![0, 1, 2]);
        // Away from the first, all down: same server next time, with the retry still scheduled.
        f.succeeded_at(0, 2, t0);
        let p = f.plan_at(t0 + Duration::from_secs(1));
        assert_eq!(p.order, vec![2, 0, 1]);
        assert_eq!(f.current(), 2);
        assert_eq!(f.plan_at(t0 + FB).order, vec![0, 2, 1]);
    }

    #[test]
    fn stale_reports_do_not_flap() {
        let t0 = Instant::now();
        let f = Failover::new(2, FB);
        f.succeeded_at(0, 1, t0);
        // Two calls planned while on 1; one retries the first and fails back...
        let probe = f.plan_at(t0 + FB);
        let other = f.plan_at(t0 + FB);
        assert_eq!(
            f.succeeded_at(probe.from, 0, t0 + FB).map(|s| s.to),
            Some(0)
        );
        // ...the other, answered by 1, does not move the client back to 1.
        assert_eq!(f.succeeded_at(other.from, 1, t0 + FB), None);
        assert_eq!(f.current(), 0);
        // Out-of-range indices are ignored.
        assert_eq!(f.succeeded(0, 7), None);
    }

    #[test]
    fn a_single_server_is_always_current() {
        let f = Failover::new(1, Duration::ZERO);
        assert_eq!(f.plan().order, vec![0]);
        assert!(!f.failback_due_at(Instant::now()));
        assert_eq!(Failover::new(0, FB).plan().order, vec![0]);
    }
}
