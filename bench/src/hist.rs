//! Latency histograms (microseconds, 3 significant digits) and the open-loop request schedule.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded exactly; slower requests are clamped to it (and still counted).
const HIGHEST_US: u64 = 120_000_000;

/// A latency histogram that can be merged across connections.
#[derive(Debug, Clone)]
pub struct Latency {
    h: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram from 1 µs to 120 s.
    pub fn new() -> Self {
        Self {
            h: Histogram::new_with_bounds(1, HIGHEST_US, 3)
                .expect("1 µs..120 s at 3 digits is a valid histogram"),
        }
    }

    /// Records one request's latency.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.h.saturating_record(us.clamp(1, HIGHEST_US));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.h.add(&other.h);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The latency at quantile `q` (0..=1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.h.value_at_quantile(q)
    }

    /// The figures the report shows.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            mean_us: self.h.mean(),
            p50_us: self.quantile_us(0.50),
            p90_us: self.quantile_us(0.90),
            p99_us: self.quantile_us(0.99),
            p999_us: self.quantile_us(0.999),
            max_us: self.h.max(),
        }
    }
}

/// Percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Requests measured.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest.
    pub max_us: u64,
}

/// When request `k` of connection `conn` (of `conns`) is due, at `rate` requests/s overall.
///
/// Connections take turns, so the whole client sends one request every `1/rate` seconds and each
/// connection one every `conns/rate`: request number `conn + k * conns` in the global sequence.
pub fn due_offset(conn: usize, conns: usize, k: u64, rate: f64) -> Duration {
    let n = conn as f64 + k as f64 * conns as f64;
    Duration::from_secs_f64(n / rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut l = Latency::new();
        for us in 1..=10_000u64 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert_eq!(s.count, 10_000);
        // Three significant digits: within 0.1 % (plus one bucket) of the exact value.
        assert!((4_990..=5_010).contains(&s.p50_us), "{s:?}");
        assert!((9_890..=9_910).contains(&s.p99_us), "{s:?}");
        assert!((9_990..=10_010).contains(&s.max_us), "{s:?}");
        assert!((s.mean_us - 5_000.5).abs() < 10.0, "{s:?}");
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_tail() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for _ in 0..99 {
            a.record(Duration::from_micros(100));
        }
        b.record(Duration::from_millis(50));
        a.merge(&b);
        assert_eq!(a.count(), 100);
        assert!(a.quantile_us(0.5) <= 101);
        assert!(a.summary().max_us >= 49_900);
    }

    #[test]
    fn extremes_are_clamped_not_lost() {
        let mut l = Latency::new();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(3600));
        assert_eq!(l.count(), 2);
        assert!(l.summary().max_us >= HIGHEST_US - HIGHEST_US / 1000);
    }

    #[test]
    fn schedule_interleaves_connections() {
        // 4 connections at 1000/s: connection 1's third request is request 1 + 2*4 = 9 -> 9 ms.
        assert_eq!(due_offset(1, 4, 2, 1000.0), Duration::from_millis(9));
        assert_eq!(due_offset(0, 4, 0, 1000.0), Duration::ZERO);
        // Every global slot is used exactly once.
        let mut slots: Vec<u128> = (0..4)
            .flat_map(|c| (0..5).map(move |k| due_offset(c, 4, k, 1000.0).as_micros()))
            .collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..20).map(|i| i * 1000).collect::<Vec<_>>());
    }
}
