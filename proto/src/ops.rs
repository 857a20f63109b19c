//! Every daemon's ops listener (`--metrics-listen`, plain HTTP): `GET /metrics` (OpenMetrics
//! text from one prometheus-client registry), `GET /ready` (the daemon's own checks, each
//! named, plus "not draining"), `GET /live` (the runtime answers), `GET /status` (a JSON
//! summary where the daemon has one); the process metrics every daemon exports; the log flags.
//!
//! One module for all three processes, so that their endpoints, content types, check output
//! and log flags cannot drift apart.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

use crate::lifecycle::Drain;

pub mod logs;

/// The content type of `GET /metrics` (what prometheus-client's text encoder writes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long one readiness check may take before it counts as failed: a probe must not hang.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A boxed future, as the ops listener stores its callbacks.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A readiness check: `Ok(detail)` when it passes, `Err(reason)` when it fails.
pub type CheckFn = Arc<dyn Fn() -> BoxFuture<Result<String, String>> + Send + Sync>;
type TextFn = Arc<dyn Fn() -> BoxFuture<String> + Send + Sync>;
type JsonFn = Arc<dyn Fn() -> BoxFuture<serde_json::Value> + Send + Sync>;

/// What one readiness check found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// The check's name (e.g. `store`, `listener:device`, `not_draining`).
    pub check: String,
    /// Whether it passed.
    pub ok: bool,
    /// What it saw, or why it failed.
    pub detail: String,
}

/// The body of `GET /ready`.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Whether every check passed.
    pub ready: bool,
    /// The checks that failed, by name (empty when ready).
    pub failing: Vec<String>,
    /// Every check, in order.
    pub checks: Vec<CheckResult>,
}

/// What the ops listener serves; built once in a daemon's wiring.
#[derive(Clone)]
pub struct Ops {
    metrics: TextFn,
    checks: Vec<(String, CheckFn)>,
    status: Option<JsonFn>,
    drain: Drain,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field(
                "checks",
                &self.checks.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Ops {
    /// An ops listener whose `/metrics` is `registry`'s text and whose `/ready` fails while
    /// `drain` is set (a stop signal was received).
    pub fn new(registry: Arc<Registry>, drain: Drain) -> Self {
        Self::with_metrics(drain, move || {
            let r = registry.clone();
            Box::pin(async move { encode(&r) })
        })
    }

    /// Same, with `/metrics` produced by `metrics` (the supervisor merges its workers' pages).
    pub fn with_metrics(
        drain: Drain,
        metrics: impl Fn() -> BoxFuture<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            metrics: Arc::new(metrics),
            checks: Vec::new(),
            status: None,
            drain,
        }
    }

    /// Adds a readiness check named `name`.
    pub fn check<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.checks
            .push((name.into(), Arc::new(move || Box::pin(f()) as BoxFuture<_>)));
        self
    }

    /// Adds `GET /status`, a JSON summary of the daemon.
    pub fn status<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = serde_json::Value> + Send + 'static,
    {
        self.status = Some(Arc::new(move || Box::pin(f()) as BoxFuture<_>));
        self
    }

    /// Runs every check (concurrently, each bounded by [`CHECK_TIMEOUT`]).
    pub async fn readiness(&self) -> Readiness {
        let mut checks = vec![CheckResult {
            check: "not_draining".into(),
            ok: !self.drain.is_draining(),
            detail: if self.drain.is_draining() {
                "draining after a stop signal".into()
            } else {
                "serving".into()
            },
        }];
        // Each check on its own task, all at once: a slow one costs its own timeout only.
        let runs: Vec<_> = self
            .checks
            .iter()
            .map(|(name, f)| {
                let fut = f();
                (
                    name.clone(),
                    tokio::spawn(async move { tokio::time::timeout(CHECK_TIMEOUT, fut).await }),
                )
            })
            .collect();
        for (name, run) in runs {
            let (ok, detail) = match run.await {
                Ok(Ok(Ok(d))) => (true, d),
                Ok(Ok(Err(e))) => (false, e),
                Ok(Err(_)) => (false, format!("no answer within {CHECK_TIMEOUT:?}")),
                Err(e) => (false, format!("the check failed: {e}")),
            };
            checks.push(CheckResult {
                check: name,
                ok,
                detail,
            });
        }
        let failing: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.check.clone())
            .collect();
        Readiness {
            ready: failing.is_empty(),
            failing,
            checks,
        }
    }

    /// Serves the ops endpoints on `listener` until the process ends.
    pub async fn serve(self, listener: TcpListener) {
        let ops = Arc::new(self);
        // Out of descriptors (EMFILE) and the like, the shared helper backs off and counts it.
        let mut acceptor = crate::lifecycle::Acceptor::new(listener, "ops");
        loop {
            let (tcp, _) = acceptor.accept().await;
            let ops = ops.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let ops = ops.clone();
                    async move { Ok::<_, std::convert::Infallible>(ops.answer(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }

    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let reply = |code: StatusCode, ctype: &str, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = code;
            if let Ok(v) = ctype.parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        };
        const JSON: &str = "application/json";
        if req.method() != hyper::Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET\n".into(),
            );
        }
        match req.uri().path() {
            "/metrics" => reply(StatusCode::OK, METRICS_CONTENT_TYPE, (self.metrics)().await),
            "/ready" => {
                let r = self.readiness().await;
                let code = if r.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::to_string_pretty(&r).unwrap_or_default() + "\n";
                reply(code, JSON, body)
            }
            "/live" => {
                // A spawned task that runs proves the scheduler still runs tasks, not only
                // this connection's.
                let ran = tokio::time::timeout(CHECK_TIMEOUT, tokio::spawn(async {})).await;
                match ran {
                    Ok(Ok(())) => reply(StatusCode::OK, "text/plain", "live\n".into()),
                    _ => reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "the runtime did not run a task in time\n".into(),
                    ),
                }
            }
            "/status" => match &self.status {
                Some(f) => {
                    let v = f().await;
                    let body = serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
                    reply(StatusCode::OK, JSON, body)
                }
                None => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "no /status on this daemon\n".into(),
                ),
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /metrics, /ready, /live or /status\n".into(),
            ),
        }
    }
}

/// The OpenMetrics text of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a metric that fails to encode would be our bug.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    out
}

/// A daemon's registry: the process metrics (standard `process_` names, no prefix) and
/// `<prefix>_build_info{version, rev}`. Register the component's own metrics in
/// `registry.sub_registry_with_prefix(prefix)`.
pub fn registry(prefix: &str, version: &'static str, rev: Option<&'static str>) -> Registry {
    let mut root = Registry::default();
    // The process metrics carry no component prefix: their standard names are what every
    // Prometheus dashboard expects.
    root.register_collector(Box::new(ProcessCollector));
    let component = root.sub_registry_with_prefix(prefix);
    component.register_collector(Box::new(AcceptBackoffs));
    component.register(
        "build",
        "The build of this binary: its version and git revision (unknown when built outside git).",
        Info::new(vec![
            ("version", version.to_string()),
            ("rev", rev.unwrap_or("unknown").to_string()),
        ]),
    );
    root
}

/// `<prefix>_accept_backoffs_total`: the times any of the process's accept loops backed off for
/// want of descriptors, socket buffers or memory (`lifecycle::accept_backoffs`), read at each
/// scrape.
#[derive(Debug)]
struct AcceptBackoffs;

impl Collector for AcceptBackoffs {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let n = ConstCounter::new(crate::lifecycle::accept_backoffs());
        n.encode(enc.encode_descriptor(
            "accept_backoffs",
            "Accept loops' back-offs for want of descriptors, socket buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
            None,
            n.metric_type(),
        )?)
    }
}

/// `process_*` metrics from /proc/self, read at each scrape (the Prometheus client convention).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let tps = procfs::ticks_per_second() as f64;
        let page = procfs::page_size();
        if let Ok(stat) = me.stat() {
            let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / tps);
            cpu.encode(enc.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent by this process.",
                Some(&Unit::Seconds),
                cpu.metric_type(),
            )?)?;
            let rss = ConstGauge::new((stat.rss * page) as i64);
            rss.encode(enc.encode_descriptor(
                "process_resident_memory",
                "Resident memory of this process.",
                Some(&Unit::Bytes),
                rss.metric_type(),
            )?)?;
            let vsz = ConstGauge::new(stat.vsize as i64);
            vsz.encode(enc.encode_descriptor(
                "process_virtual_memory",
                "Virtual memory of this process.",
                Some(&Unit::Bytes),
                vsz.metric_type(),
            )?)?;
            if let Ok(boot) = procfs::boot_time_secs() {
                let start = ConstGauge::new(boot as f64 + stat.starttime as f64 / tps);
                start.encode(enc.encode_descriptor(
                    "process_start_time",
                    "Start time of this process since the Unix epoch.",
                    Some(&Unit::Seconds),
                    start.metric_type(),
                )?)?;
            }
        }
        if let Ok(n) = me.fd_count() {
            let fds = ConstGauge::new(n as i64);
            fds.encode(enc.encode_descriptor(
                "process_open_fds",
                "Open file descriptors of this process.",
                None,
                fds.metric_type(),
            )?)?;
        }
        if let Ok(limits) = me.limits()
            && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
        {
            let m = ConstGauge::new(max as i64);
            m.encode(enc.encode_descriptor(
                "process_max_fds",
                "The limit on open file descriptors of this process (RLIMIT_NOFILE, soft).",
                None,
                m.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// A readiness check of a bound listener: the kernel's TCP table holds a socket in LISTEN on
/// `addr` and that socket is one of this process's descriptors. Read from /proc, not by
/// connecting: a probe's connect-and-close would count as a failed TLS handshake (in the
/// metrics, and against the loopback source's failure limit) every few seconds.
pub async fn listener_bound(addr: SocketAddr) -> Result<String, String> {
    tokio::task::spawn_blocking(move || listening_here(addr))
        .await
        .map_err(|e| format!("reading the socket tables: {e}"))?
}

fn listening_here(addr: SocketAddr) -> Result<String, String> {
    let mine: std::collections::HashSet<u64> = procfs::process::Process::myself()
        .and_then(|p| p.fd())
        .map_err(|e| format!("reading /proc/self/fd: {e}"))?
        .filter_map(Result::ok)
        .filter_map(|fd| match fd.target {
            procfs::process::FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    let table = match addr {
        SocketAddr::V4(_) => procfs::net::tcp(),
        SocketAddr::V6(_) => procfs::net::tcp6(),
    }
    .map_err(|e| format!("reading the TCP table: {e}"))?;
    let found = table.iter().find(|e| {
        e.state == procfs::net::TcpState::Listen
            && e.local_address.port() == addr.port()
            && e.local_address.ip() == addr.ip()
            && mine.contains(&e.inode)
    });
    match found {
        Some(e) => Ok(format!("listening on {addr} (socket inode {})", e.inode)),
        None => Err(format!("no socket of this process listens on {addr}")),
    }
}

/// What a plain-HTTP GET on an ops listener answered.
#[derive(Debug)]
pub struct Got {
    /// The HTTP status code.
    pub status: u16,
    /// The body.
    pub body: String,
}

/// A GET of `path` on the ops listener at `addr` (the supervisor scrapes its workers with it;
/// `scm-proxy status` asks a running daemon), bounded by `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Got> {
    let fetch = async {
        let tcp = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(io::Error::other)?;
        let resp = send.send_request(req).await.map_err(io::Error::other)?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok(Got {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{addr}{path}: no answer within {timeout:?}"),
        )
    })?
}

/// Merges metric pages: `own` first, then each `(worker, page)` with a `worker="<worker>"`
/// label added to its samples, one family's samples kept together as OpenMetrics requires, and
/// one `# EOF`. This is how the supervisor serves its workers' metrics on its own port.
pub fn merge_pages(own: &str, workers: &[(String, String)]) -> String {
    // Family name -> (metadata lines, sample lines), in first-seen order.
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let mut add = |page: &str, worker: Option<&str>| {
        let mut current: Option<usize> = None;
        for line in page.lines() {
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (_, name) = (parts.next(), parts.next().unwrap_or_default());
                let i = match families.iter().position(|f| f.0 == name) {
                    Some(i) => i,
                    None => {
                        families.push((name.to_string(), Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                let meta = &mut families[i].1;
                // Each family's HELP/TYPE/UNIT once, from the first page that has it.
                if !meta.iter().any(|m| m == line)
                    && !meta
                        .iter()
                        .any(|m| m.split(' ').nth(1) == line.split(' ').nth(1))
                {
                    meta.push(line.to_string());
                }
                current = Some(i);
                continue;
            }
            let Some(i) = current else { continue };
            let sample = match worker {
                Some(w) => with_label(line, "worker", w),
                None => line.to_string(),
            };
            families[i].2.push(sample);
        }
    };
    add(own, None);
    for (w, page) in workers {
        add(page, Some(w));
    }
    let mut out = String::new();
    for (_, meta, samples) in families {
        for l in meta.iter().chain(samples.iter()) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

/// `line` (one sample) with `key="value"` as its first label.
fn with_label(line: &str, key: &str, value: &str) -> String {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let (name, rest) = line.split_at(end);
    match rest.strip_prefix('{') {
        Some(r) if r.starts_with('}') => format!("{name}{{{key}=\"{value}\"{r}"),
        Some(r) => format!("{name}{{{key}=\"{value}\",{r}"),
        None => format!("{name}{{{key}=\"{value}\"}}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn merged_pages_label_workers_and_keep_families_together() {
        let own = "# HELP a_x An x.\n# TYPE a_x counter\na_x_total 1\n# EOF\n";
        let w = "# HELP a_x An x.\n# TYPE a_x counter\na_x_total{k=\"v\"} 2\n# HELP b Bee.\n# TYPE b gauge\nb 3\n# EOF\n";
        let m = merge_pages(own, &[("0".into(), w.into()), ("1".into(), w.into())]);
        assert_eq!(
            m,
            "# HELP a_x An x.\n# TYPE a_x counter\na_x_total 1\na_x_total{worker=\"0\",k=\"v\"} 2\n\
             a_x_total{worker=\"1\",k=\"v\"} 2\n# HELP b Bee.\n# TYPE b gauge\nb{worker=\"0\"} 3\n\
             b{worker=\"1\"} 3\n# EOF\n"
        );
    }

    #[test]
    fn common_metrics_follow_the_conventions() {
        let mut root = registry("scm_test", "1.2.3", None);
        root.sub_registry_with_prefix("scm_test").register(
            "events",
            "Events.",
            Counter::<u64>::default(),
        );
        let page = encode(&root);
        for want in [
            "scm_test_build_info{version=\"1.2.3\",rev=\"unknown\"} 1",
            "scm_test_events_total 0",
            "\nprocess_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "\nprocess_open_fds ",
            "\nprocess_start_time_seconds ",
        ] {
            assert!(page.contains(want), "{want:?} missing from\n{page}");
        }
    }

    #[tokio::test]
    async fn ready_names_the_failing_check_and_draining() {
        let drain = Drain::new();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bound = l.local_addr().unwrap();
        let ops = Ops::new(Arc::new(Registry::default()), drain.clone())
            .check("listener", move || listener_bound(bound))
            .check("good", || async { Ok("fine".to_string()) })
            .check("bad", || async { Err("gone".to_string()) });
        let r = ops.readiness().await;
        assert!(!r.ready);
        assert_eq!(r.failing, vec!["bad".to_string()]);
        drop(l);
        let r = ops.readiness().await;
        assert_eq!(r.failing, vec!["listener".to_string(), "bad".to_string()]);
        drain.begin();
        let r = ops.readiness().await;
        assert_eq!(
            r.failing,
            vec![
                "not_draining".to_string(),
                "listener".to_string(),
                "bad".to_string()
            ]
        );
    }
}
