//! The proxy's metrics (prometheus-client, every name prefixed `scm_proxy_`) and its ops
//! listener (`/metrics`, `/ready`, `/live`, see `scm_proto::ops`).

use std::net::SocketAddr;
use std::sync::Arc;

use scm_proto::lifecycle::Drain;
use scm_proto::ops::Ops;
use scm_proto::ops::prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
    info::Info,
};
use scm_proto::ops::prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

/// A counter (the name the call sites and the relays' signatures use).
pub(crate) type IntCounter = Counter<u64>;
/// A gauge.
pub(crate) type IntGauge = Gauge<i64>;

type Labels = Vec<(&'static str, String)>;

/// A family of counters keyed by one label's value.
#[derive(Clone, Debug)]
pub(crate) struct IntCounterVec {
    family: Family<Labels, IntCounter>,
    label: &'static str,
}

impl IntCounterVec {
    /// An empty family whose samples carry `label`.
    pub(crate) fn new(label: &'static str) -> Self {
        Self {
            family: Family::default(),
            label,
        }
    }

    /// The counter of one label value (created at zero on first use).
    pub(crate) fn with_label_values(&self, values: &[&str]) -> IntCounter {
        let v = values.first().copied().unwrap_or_default();
        self.family
            .get_or_create(&vec![(self.label, v.to_string())])
            .clone()
    }
}

/// Latency buckets from 0.5 ms to about 16 s (doubling): a cached preamble is sub-millisecond,
/// a validation across a WAN tens of milliseconds, a stuck Security server the timeout.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the proxy exports, all prefixed `scm_proxy_`.
pub(crate) struct Metrics {
    registry: Arc<Registry>,
    /// The record-encryption path chosen at start.
    tls_path: &'static str,
    /// Device connections accepted.
    pub connections: IntCounter,
    /// Device connections open now.
    pub connections_open: IntGauge,
    /// TLS handshakes by result (`ok`, `failed`, `timeout`).
    pub handshakes: IntCounterVec,
    /// Validations asked of the Security server by result (`valid`, `invalid`, `unavailable`).
    pub validations: IntCounterVec,
    /// How long a validation took as this proxy saw it (every Security server tried).
    pub validation_seconds: Histogram,
    /// From the end of the TLS handshake to a whole preamble read.
    pub preamble_seconds: Histogram,
    /// TCP connects to back ends (tunnel mode).
    pub backend_connect_seconds: Histogram,
    /// Preambles whose session came from the cache.
    pub cache_hits: IntCounter,
    /// Preambles whose session had to be validated.
    pub cache_misses: IntCounter,
    /// Revocation events received.
    pub revocations: IntCounter,
    /// Connections closed because their session was revoked.
    pub revoked_connections: IntCounter,
    /// Preamble replies by status.
    pub replies: IntCounterVec,
    /// Bytes relayed by direction (`to_backend`, `to_device`).
    pub bytes: IntCounterVec,
    /// Errors by class.
    pub errors: IntCounterVec,
    /// HTTP-mode requests by status code.
    pub http_requests: IntCounterVec,
    /// Device connections past the handshake by the path their records took (`ktls`,
    /// `userspace`).
    pub tls_connections: IntCounterVec,
    /// kTLS hand-offs by result (`ok`; `fallback_cipher`, `fallback_ulp`: the connection went
    /// on in rustls; `failed`: it was closed after rustls gave up its keys).
    pub ktls_handoffs: IntCounterVec,
    /// Non-data records and record errors on the kTLS path (`close_notify`, `alert`,
    /// `key_update`, `handshake`, `unexpected`, `decrypt_error`).
    pub ktls_records: IntCounterVec,
    /// Splice-relay waits cut short by the backstop that then moved bytes (a readiness
    /// wake-up that did not come).
    pub splice_backstops: IntCounter,
    /// Switches to another Security server after a failure.
    pub security_failovers: IntCounter,
    /// Switches back to the first (preferred) Security server.
    pub security_failbacks: IntCounter,
    /// Index (from 0, in `--security-url` order) of the Security server calls go to first.
    pub security_current: IntGauge,
    /// Whether the revocation stream is connected (1) or not (0).
    pub revocation_stream_up: IntGauge,
}

/// What the proxy chose at start, exported as `scm_proxy_tls_path_info` and
/// `scm_proxy_kernel_tls_info`.
#[derive(Debug, Clone)]
pub(crate) struct TlsInfo {
    /// `ktls` or `userspace`.
    pub path: &'static str,
    /// The TLS 1.3 ciphers the kernel takes (`none` on the userspace path).
    pub kernel_ciphers: String,
}

impl Default for TlsInfo {
    fn default() -> Self {
        Self {
            path: "userspace",
            kernel_ciphers: "none".into(),
        }
    }
}

impl Metrics {
    /// A fresh registry holding every metric at zero, and the TLS path chosen.
    pub(crate) fn new(tls: &TlsInfo) -> Self {
        let mut root = scm_proto::ops::registry(
            "scm_proxy",
            env!("CARGO_PKG_VERSION"),
            option_env!("SCM_GIT_REV"),
        );
        let r = root.sub_registry_with_prefix("scm_proxy");
        r.register(
            "tls_path",
            "The record-encryption path in use (ktls, userspace).",
            Info::new(vec![("path", tls.path.to_string())]),
        );
        r.register(
            "kernel_tls",
            "The TLS 1.3 ciphers the kernel's TLS takes, as probed at start (none: no kernel TLS).",
            Info::new(vec![("ciphers", tls.kernel_ciphers.clone())]),
        );
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = IntCounter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = IntGauge::default();
            r.register(name, help, g.clone());
            g
        };
        // Label values known in advance are created at zero, so that a dashboard's rate() sees
        // the series from the first scrape on.
        let family = |r: &mut Registry, name: &str, help: &str, label, known: &[&str]| {
            let f = IntCounterVec::new(label);
            r.register(name, help, f.family.clone());
            for k in known {
                f.with_label_values(&[k]);
            }
            f
        };
        let histogram = |r: &mut Registry, name: &str, help: &str| {
            let h = latency();
            r.register_with_unit(name, help, Unit::Seconds, h.clone());
            h
        };
        Self {
            connections: counter(r, "connections", "Device connections accepted."),
            connections_open: gauge(r, "connections_open", "Device connections open now."),
            handshakes: family(
                r,
                "handshakes",
                "TLS handshakes by result.",
                "result",
                &["ok", "failed", "timeout"],
            ),
            validations: family(
                r,
                "validations",
                "Session validations asked of the Security server, by result.",
                "result",
                &["valid", "invalid", "unavailable"],
            ),
            validation_seconds: histogram(
                r,
                "validation",
                "Time a session validation took as this proxy saw it (every Security server tried, answer or failure).",
            ),
            preamble_seconds: histogram(
                r,
                "preamble",
                "Time from the end of a device's TLS handshake to its whole preamble read.",
            ),
            backend_connect_seconds: histogram(
                r,
                "backend_connect",
                "Time a TCP connect to a back end took (tunnel resources; refused and timed-out connects included).",
            ),
            cache_hits: counter(r, "cache_hits", "Sessions served from the cache."),
            cache_misses: counter(r, "cache_misses", "Sessions not in the cache."),
            revocations: counter(r, "revocations", "Revocation events received."),
            revoked_connections: counter(
                r,
                "revoked_connections",
                "Connections closed because their session was revoked.",
            ),
            replies: family(r, "replies", "Preamble replies by status.", "status", &[]),
            bytes: family(
                r,
                "bytes",
                "Bytes relayed by direction.",
                "direction",
                &["to_backend", "to_device"],
            ),
            errors: family(r, "errors", "Errors by class.", "class", &[]),
            http_requests: family(
                r,
                "http_requests",
                "HTTP-mode requests by response status.",
                "code",
                &[],
            ),
            tls_connections: family(
                r,
                "tls_connections",
                "Device connections past the handshake by record-encryption path (ktls, userspace).",
                "path",
                &[tls.path],
            ),
            ktls_handoffs: family(
                r,
                "ktls_handoffs",
                "Hand-offs of a finished handshake to kernel TLS, by result.",
                "result",
                &["ok", "fallback_cipher", "fallback_ulp", "failed"],
            ),
            ktls_records: family(
                r,
                "ktls_records",
                "Non-data records (and decryption failures) read on the kTLS path, by kind.",
                "kind",
                &[
                    "close_notify",
                    "alert",
                    "key_update",
                    "handshake",
                    "unexpected",
                    "decrypt_error",
                ],
            ),
            splice_backstops: counter(
                r,
                "splice_backstops",
                "Waits of the kTLS splice relay that the backstop cut short and whose retried splice then moved bytes: a readiness wake-up that never came.",
            ),
            security_failovers: counter(
                r,
                "security_failovers",
                "Switches to another Security server after a failure.",
            ),
            security_failbacks: counter(
                r,
                "security_failbacks",
                "Switches back to the first Security server once it answers again.",
            ),
            security_current: gauge(
                r,
                "security_current_index",
                "Index (from 0, in --security-url order) of the Security server calls go to first.",
            ),
            revocation_stream_up: gauge(
                r,
                "revocation_stream_up",
                "1 while the revocation stream from the Security server is connected.",
            ),
            tls_path: tls.path,
            registry: Arc::new(root),
        }
    }

    /// The metrics in the OpenMetrics text format.
    #[cfg(test)]
    pub(super) fn render(&self) -> String {
        scm_proto::ops::encode(&self.registry)
    }

    /// `GET /status` of one proxy process (a worker's, or a single process's).
    fn status(&self) -> serde_json::Value {
        let by = |name: &str,
                  f: &IntCounterVec,
                  known: &[&str]|
         -> serde_json::Map<String, serde_json::Value> {
            known
                .iter()
                .map(|k| {
                    let n = f.with_label_values(&[k]).get();
                    (format!("{name}_{k}"), serde_json::json!(n))
                })
                .collect()
        };
        let mut counters = serde_json::Map::new();
        counters.insert("connections_total".into(), self.connections.get().into());
        counters.insert("cache_hits".into(), self.cache_hits.get().into());
        counters.insert("cache_misses".into(), self.cache_misses.get().into());
        counters.insert("revocations".into(), self.revocations.get().into());
        counters.extend(by(
            "handshakes",
            &self.handshakes,
            &["ok", "failed", "timeout"],
        ));
        counters.extend(by(
            "validations",
            &self.validations,
            &["valid", "invalid", "unavailable"],
        ));
        serde_json::json!({
            "role": match std::env::var(crate::worker_env::WORKER_INDEX_ENV) {
                Ok(i) => format!("worker {i}"),
                Err(_) => "proxy".to_string(),
            },
            "tls_path": self.tls_path,
            "open_connections": self.connections_open.get(),
            "security_server": if self.revocation_stream_up.get() == 1 { "revocation stream up" } else { "revocation stream down" },
            "security_current_index": self.security_current.get(),
            "counters": counters,
        })
    }

    /// Counts an error of the given class.
    pub(super) fn error(&self, class: &str) {
        self.errors.with_label_values(&[class]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&TlsInfo::default())
    }
}

/// Serves the ops endpoints on an already bound listener, forever. `/ready` checks that the
/// device listener at `device` accepts connections, that a Security server is reachable (the
/// revocation stream is up: it is a long-lived connection to it, reopened within a second of
/// any failure, so a dead Security server shows within one stream timeout), and that the
/// process is not draining.
pub(super) async fn serve_ops(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    device: SocketAddr,
    drain: Drain,
) {
    let up = metrics.revocation_stream_up.clone();
    let m = metrics.clone();
    let ops = Ops::new(metrics.registry.clone(), drain)
        .status(move || {
            let m = m.clone();
            async move { m.status() }
        })
        .check("listener:device", move || {
            scm_proto::ops::listener_bound(device)
        })
        .check("security_server", move || {
            let up = up.get();
            async move {
                if up == 1 {
                    Ok("the revocation stream from a Security server is open".to_string())
                } else {
                    Err("no Security server reachable: the revocation stream is down".to_string())
                }
            }
        });
    ops.serve(listener).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new(&TlsInfo {
            path: "ktls",
            kernel_ciphers: "aes-128-gcm".into(),
        });
        m.connections.inc();
        m.validation_seconds.observe(0.01);
        let page = m.render();
        for want in [
            "scm_proxy_connections_total 1",
            "scm_proxy_tls_path_info{path=\"ktls\"} 1",
            "scm_proxy_kernel_tls_info{ciphers=\"aes-128-gcm\"} 1",
            "scm_proxy_validation_seconds_bucket{le=",
            "scm_proxy_build_info{version=",
            "scm_proxy_handshakes_total{result=\"timeout\"} 0",
            "\nprocess_open_fds ",
        ] {
            assert!(page.contains(want), "{want:?} missing from\n{page}");
        }
    }
}
