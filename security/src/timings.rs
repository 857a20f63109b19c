//! The latencies the request paths record (login and validation histograms), apart from the
//! metrics page that reads them with the rest of the state (`metrics.rs`): the state holds
//! these, and the page reads the state, so they cannot live in one module.

use std::time::Instant;

use scm_proto::ops::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The metrics the request paths record (the others are read from the state at each scrape).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Device logins, from the request to the answer (argon2 and the store included).
    pub login_seconds: Histogram,
    /// Proxies' session validations, from the request to the answer.
    pub validation_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        // 0.5 ms to about 16 s, doubling: a cached validation is sub-millisecond, a login with
        // argon2id at OWASP parameters takes tens to hundreds of milliseconds.
        let h = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        Self {
            login_seconds: h(),
            validation_seconds: h(),
        }
    }
}

/// Observes the time from its creation to its drop into a histogram (every way out of a
/// handler, refusals included, is timed).
#[derive(Debug)]
pub struct Timer(Histogram, Instant);

impl Timer {
    /// Starts timing into `h`.
    pub fn start(h: &Histogram) -> Self {
        Self(h.clone(), Instant::now())
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.0.observe(self.1.elapsed().as_secs_f64());
    }
}
