//! scm-bench: one load generator that speaks both plain HTTPS/TLS (for nginx) and scm's preamble
//! (for scm-proxy), the small back ends it talks to, and the pure parts of the measurement
//! (histograms, /proc parsing, the report and the plot). The orchestration lives in the binary.

pub mod backend;
pub mod hist;
pub mod http1;
pub mod load;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod stats;
pub mod trials;
