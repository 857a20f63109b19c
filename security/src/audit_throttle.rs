//! Aggregation of repeated unauthenticated failures in the audit log: an attacker must not be
//! able to write one database row per bad request. The first failure of a kind from a source in
//! a window is written at once; the rest of that window are counted and written as one summary
//! row when the window ends. The table is bounded: past its cap, failures are only counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::now_ms;

/// One (kind, source) window.
#[derive(Debug, Clone)]
struct Window {
    start_ms: u64,
    /// Failures after the first one.
    more: u64,
    /// The last actor named (the user name typed) and detail.
    last_actor: String,
    last_detail: String,
}

/// A summary row to write: `more` further failures of `kind` from `source` since `since_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Audit kind.
    pub kind: String,
    /// Source key.
    pub source: String,
    /// Failures after the first.
    pub more: u64,
    /// The last actor seen.
    pub last_actor: String,
    /// The last detail seen.
    pub last_detail: String,
}

/// What to do with one failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The first of its window: write it.
    Write,
    /// Counted into the window's summary.
    Counted,
}

/// The aggregator.
#[derive(Debug)]
pub struct AuditThrottle {
    map: Mutex<HashMap<(String, IpAddr), Window>>,
    window: Duration,
    max: usize,
    /// Failures not even counted per source because the table was full.
    overflow: Mutex<u64>,
}

impl AuditThrottle {
    /// Windows of `window`, at most `max` (kind, source) pairs at a time.
    pub fn new(window: Duration, max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            window,
            max: max.max(1),
            overflow: Mutex::new(0),
        }
    }

    /// Records one failure of `kind` from `source` (already reduced to its source key).
    pub fn record(&self, kind: &str, source: IpAddr, actor: &str, detail: &str) -> Verdict {
        let now = now_ms();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (kind.to_owned(), source);
        if let Some(w) = map.get_mut(&key) {
            w.more += 1;
            w.last_actor = actor.chars().take(128).collect();
            w.last_detail = detail.chars().take(256).collect();
            return Verdict::Counted;
        }
        if map.len() >= self.max {
            *self.overflow.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            return Verdict::Counted;
        }
        map.insert(
            key,
            Window {
                start_ms: now,
                more: 0,
                last_actor: String::new(),
                last_detail: String::new(),
            },
        );
        Verdict::Write
    }

    /// Ends the windows that are over (all of them with `all`), returning the summaries to write
    /// and the count of failures that overflowed the table.
    pub fn flush(&self, all: bool) -> (Vec<Summary>, u64) {
        let now = now_ms();
        let window = self.window.as_millis() as u64;
        let mut out = Vec::new();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(kind, source), w| {
            if !all && now < w.start_ms + window {
                return true;
            }
            if w.more > 0 {
                out.push(Summary {
                    kind: kind.clone(),
                    source: source.to_string(),
                    more: w.more,
                    last_actor: std::mem::take(&mut w.last_actor),
                    last_detail: std::mem::take(&mut w.last_detail),
                });
            }
            false
        });
        let overflow =
            std::mem::take(&mut *self.overflow.lock().unwrap_or_else(|e| e.into_inner()));
        (out, overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_written_the_rest_summarised() {
        let t = AuditThrottle::new(Duration::from_secs(60), 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(t.record("login_failed", a, "u", "bad_mac"), Verdict::Write);
        for _ in 0..1000 {
            assert_eq!(
                t.record("login_failed", a, "v", "bad_mac"),
                Verdict::Counted
            );
        }
        assert_eq!(t.record("login_failed", b, "u", "x"), Verdict::Write);
        // Full: a third pair is only counted.
        assert_eq!(t.record("enroll_failed", a, "u", "x"), Verdict::Counted);
        assert_eq!(
            t.flush(false),
            (vec![], 1),
            "windows still open; the overflow is told"
        );
        let (rows, overflow) = t.flush(true);
        assert_eq!(overflow, 0);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].more, 1000);
        assert_eq!(rows[0].last_actor, "v");
        assert_eq!(t.record("login_failed", a, "u", "bad_mac"), Verdict::Write);
    }
}
