//! The supervisor's `/metrics` page: the eBPF programs' counters and the workers' states.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use proxy_common::{PacketClass, steer::SteerStat};

use super::error::lock;
use crate::steer::Steering;

/// The metrics page: the kernel's counters and the workers' states.
fn render_metrics(st: &Steering, count: u32, restarts: &[u64]) -> String {
    let mut out = String::new();
    if let Ok(c) = st.counters() {
        out.push_str("# HELP scm_proxy_steer_events_total Steering and shield events counted by the eBPF programs (per-CPU counters, summed).\n# TYPE scm_proxy_steer_events_total counter\n");
        for s in SteerStat::ALL {
            let _ = writeln!(
                out,
                "scm_proxy_steer_events_total{{event=\"{}\"}} {}",
                s.name(),
                c.get(s)
            );
        }
        out.push_str("# HELP scm_proxy_steer_worker_new_flows_total New connections steered to each worker.\n# TYPE scm_proxy_steer_worker_new_flows_total counter\n");
        for w in 0..count as usize {
            let _ = writeln!(
                out,
                "scm_proxy_steer_worker_new_flows_total{{worker=\"{w}\"}} {}",
                c.worker_flows.get(w).copied().unwrap_or(0)
            );
        }
    }
    if let Ok(c) = st.ingress().counters() {
        out.push_str("# HELP scm_proxy_xdp_packets_total Frames seen by the XDP ingress program, by class.\n# TYPE scm_proxy_xdp_packets_total counter\n");
        for class in PacketClass::ALL {
            let _ = writeln!(
                out,
                "scm_proxy_xdp_packets_total{{class=\"{}\"}} {}",
                class.name(),
                c.class(class).packets
            );
        }
    }
    out.push_str("# HELP scm_proxy_worker_state Worker slot state: 0 absent, 1 healthy, 2 draining.\n# TYPE scm_proxy_worker_state gauge\n");
    for (w, slot) in st.workers().iter().enumerate().take(count as usize) {
        let _ = writeln!(
            out,
            "scm_proxy_worker_state{{worker=\"{w}\"}} {}",
            slot.state
        );
    }
    out.push_str("# HELP scm_proxy_worker_restarts_total Workers restarted after dying.\n# TYPE scm_proxy_worker_restarts_total counter\n");
    for (w, n) in restarts.iter().enumerate().take(count as usize) {
        let _ = writeln!(out, "scm_proxy_worker_restarts_total{{worker=\"{w}\"}} {n}");
    }
    out
}

pub(super) async fn serve_metrics(
    listener: tokio::net::TcpListener,
    steering: Arc<Mutex<Steering>>,
    restarts: Arc<Mutex<Vec<u64>>>,
    count: u32,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (steering, restarts) = (steering.clone(), restarts.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = if req.uri().path() == "/metrics" {
                        let r = restarts.lock().map(|r| r.clone()).unwrap_or_default();
                        Some(render_metrics(&lock(&steering), count, &r))
                    } else {
                        None
                    };
                    async move {
                        match body {
                            Some(b) => hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(b))),
                            None => hyper::Response::builder()
                                .status(hyper::StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n"))),
                        }
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}
