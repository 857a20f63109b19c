//! The proxy's Prometheus metrics and the `/metrics` endpoint that serves them.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::net::TcpListener;

/// Every metric the proxy exports, all prefixed `scm_proxy_`.
#[derive(Clone)]
pub(super) struct Metrics {
    registry: Registry,
    /// Device connections accepted.
    pub connections: IntCounter,
    /// Device connections open now.
    pub connections_open: IntGauge,
    /// TLS handshakes by result (`ok`, `failed`, `timeout`).
    pub handshakes: IntCounterVec,
    /// Validations asked of the Security server by result (`valid`, `invalid`, `unavailable`).
    pub validations: IntCounterVec,
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
    /// 1 for the record-encryption path in use (`ktls` or `userspace`).
    pub tls_path: IntGaugeVec,
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

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(format!("scm_proxy_{name}"), help).expect("valid metric name");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(format!("scm_proxy_{name}"), help), &[label])
        .expect("valid metric name");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    /// A fresh registry holding every metric at zero.
    pub(super) fn new() -> Self {
        let r = Registry::new();
        let connections_open =
            IntGauge::new("scm_proxy_connections_open", "Device connections open now.")
                .expect("valid metric name");
        r.register(Box::new(connections_open.clone()))
            .expect("unique metric");
        let tls_path = IntGaugeVec::new(
            Opts::new(
                "scm_proxy_tls_path",
                "1 for the record-encryption path in use.",
            ),
            &["path"],
        )
        .expect("valid metric name");
        r.register(Box::new(tls_path.clone()))
            .expect("unique metric");
        let revocation_stream_up = IntGauge::new(
            "scm_proxy_revocation_stream_up",
            "1 while the revocation stream from the Security server is connected.",
        )
        .expect("valid metric name");
        r.register(Box::new(revocation_stream_up.clone()))
            .expect("unique metric");
        let security_current = IntGauge::new(
            "scm_proxy_security_current_index",
            "Index (from 0, in --security-url order) of the Security server calls go to first.",
        )
        .expect("valid metric name");
        r.register(Box::new(security_current.clone()))
            .expect("unique metric");
        Self {
            connections: counter(&r, "connections_total", "Device connections accepted."),
            connections_open,
            handshakes: counter_vec(
                &r,
                "handshakes_total",
                "TLS handshakes by result.",
                "result",
            ),
            validations: counter_vec(
                &r,
                "validations_total",
                "Session validations asked of the Security server, by result.",
                "result",
            ),
            cache_hits: counter(&r, "cache_hits_total", "Sessions served from the cache."),
            cache_misses: counter(&r, "cache_misses_total", "Sessions not in the cache."),
            revocations: counter(&r, "revocations_total", "Revocation events received."),
            revoked_connections: counter(
                &r,
                "revoked_connections_total",
                "Connections closed because their session was revoked.",
            ),
            replies: counter_vec(&r, "replies_total", "Preamble replies by status.", "status"),
            bytes: counter_vec(
                &r,
                "bytes_total",
                "Bytes relayed by direction.",
                "direction",
            ),
            errors: counter_vec(&r, "errors_total", "Errors by class.", "class"),
            http_requests: counter_vec(
                &r,
                "http_requests_total",
                "HTTP-mode requests by response status.",
                "code",
            ),
            tls_path,
            tls_connections: counter_vec(
                &r,
                "tls_connections_total",
                "Device connections past the handshake by record-encryption path (ktls, userspace).",
                "path",
            ),
            ktls_handoffs: counter_vec(
                &r,
                "ktls_handoffs_total",
                "Hand-offs of a finished handshake to kernel TLS, by result.",
                "result",
            ),
            ktls_records: counter_vec(
                &r,
                "ktls_records_total",
                "Non-data records (and decryption failures) read on the kTLS path, by kind.",
                "kind",
            ),
            splice_backstops: counter(
                &r,
                "splice_backstops_total",
                "Waits of the kTLS splice relay that the backstop cut short and whose retried splice then moved bytes: a readiness wake-up that never came.",
            ),
            security_failovers: counter(
                &r,
                "security_failovers_total",
                "Switches to another Security server after a failure.",
            ),
            security_failbacks: counter(
                &r,
                "security_failbacks_total",
                "Switches back to the first Security server once it answers again.",
            ),
            security_current,
            revocation_stream_up,
            registry: r,
        }
    }

    /// The metrics in the Prometheus text format.
    pub(super) fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Counts an error of the given class.
    pub(super) fn error(&self, class: &str) {
        self.errors.with_label_values(&[class]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `GET /metrics` (and 404 for anything else) on an already bound listener, forever.
pub(super) async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(metrics.render())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
