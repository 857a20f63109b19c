//! The environment a supervisor hands each worker it starts (the worker is this same binary,
//! re-executed): a module of its own, importing nothing, since both the supervisor (which sets
//! them) and the proxy (whose status page says whether it is a worker) read the names.

/// Environment variable that makes a `serve` process a worker: its slot index.
pub const WORKER_INDEX_ENV: &str = "SCM_PROXY_WORKER_INDEX";
/// The loopback address a worker listens on.
pub const WORKER_LISTEN_ENV: &str = "SCM_PROXY_WORKER_LISTEN";
/// The loopback address of a worker's own metrics endpoint.
pub const WORKER_METRICS_ENV: &str = "SCM_PROXY_WORKER_METRICS";
