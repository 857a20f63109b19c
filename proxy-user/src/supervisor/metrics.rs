//! The supervisor's ops listener: its own metrics (the eBPF programs' counters, the workers'
//! states) merged with every worker's `/metrics` page under a `worker` label, so that
//! Prometheus scrapes one port per host; `/ready` (programs attached, a healthy worker, not
//! draining) and `/status` (what `scm-proxy status` prints).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use proxy_common::{PacketClass, steer::SteerStat};
use scm_proto::lifecycle::Drain;
use scm_proto::ops::{
    Ops,
    prometheus_client::{
        metrics::{counter::Counter, family::Family, gauge::Gauge},
        registry::Registry,
    },
};
use serde_json::json;

use super::error::lock;
use crate::steer::{LOOKUP_LINK_PIN, Steering, XDP_LINK_PIN};

/// How long the supervisor waits for one worker's page: a stuck worker must not stall the
/// scrape of the others (Prometheus' own scrape timeout is 10 s by default).
const WORKER_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

type Labels = Vec<(&'static str, String)>;

/// What the supervisor's ops listener reads.
#[derive(Clone)]
pub(super) struct SupervisorView {
    pub(super) steering: Arc<Mutex<Steering>>,
    pub(super) restarts: Arc<Mutex<Vec<u64>>>,
    pub(super) count: u32,
    /// The supervisor's `--metrics-listen`: worker `i` serves its ops on port + 1 + i.
    pub(super) ops_addr: SocketAddr,
    pub(super) pin_dir: PathBuf,
    /// `--steer-iface`, when XDP is meant to be attached.
    pub(super) xdp_iface: Option<String>,
}

/// Where worker `index`'s ops listener is (the supervisor hands it this address).
pub(super) fn worker_ops_addr(ops: SocketAddr, index: u32) -> Option<SocketAddr> {
    let port = ops.port().checked_add(1 + index as u16)?;
    Some(SocketAddr::new(ops.ip(), port))
}

/// An address to connect to for a listener bound at `addr` (unspecified: loopback).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

fn state_name(state: u32) -> &'static str {
    match state {
        1 => "healthy",
        2 => "draining",
        _ => "absent",
    }
}

impl SupervisorView {
    /// The supervisor's own page.
    fn own_page(&self) -> String {
        let mut root = scm_proto::ops::registry(
            "scm_proxy",
            env!("CARGO_PKG_VERSION"),
            option_env!("SCM_GIT_REV"),
        );
        let r = root.sub_registry_with_prefix("scm_proxy");
        let st = lock(&self.steering);
        let counters = |r: &mut Registry, name: &str, help: &str, vals: Vec<(Labels, u64)>| {
            let f = Family::<Labels, Counter>::default();
            for (l, v) in vals {
                f.get_or_create(&l).inc_by(v);
            }
            r.register(name, help, f);
        };
        let gauges = |r: &mut Registry, name: &str, help: &str, vals: Vec<(Labels, i64)>| {
            let f = Family::<Labels, Gauge>::default();
            for (l, v) in vals {
                f.get_or_create(&l).set(v);
            }
            r.register(name, help, f);
        };
        let n = self.count as usize;
        if let Ok(c) = st.counters() {
            counters(
                r,
                "steer_events",
                "Steering and shield events counted by the eBPF programs (per-CPU counters, summed).",
                SteerStat::ALL
                    .iter()
                    .map(|s| (vec![("event", s.name().to_string())], c.get(*s)))
                    .collect(),
            );
            counters(
                r,
                "steer_worker_new_flows",
                "New connections steered to each worker.",
                (0..n)
                    .map(|w| {
                        let v = c.worker_flows.get(w).copied().unwrap_or(0);
                        (vec![("worker", w.to_string())], v)
                    })
                    .collect(),
            );
        }
        if let Ok(c) = st.ingress().counters() {
            counters(
                r,
                "xdp_packets",
                "Frames seen by the XDP ingress program, by class.",
                PacketClass::ALL
                    .iter()
                    .map(|k| (vec![("class", k.name().to_string())], c.class(*k).packets))
                    .collect(),
            );
            counters(
                r,
                "xdp_bytes",
                "Bytes (whole frames) seen by the XDP ingress program, by class.",
                PacketClass::ALL
                    .iter()
                    .map(|k| (vec![("class", k.name().to_string())], c.class(*k).bytes))
                    .collect(),
            );
        }
        if let Ok(flows) = st.flow_count() {
            gauges(
                r,
                "steer_flows",
                "Entries in the steering flow table now.",
                vec![(vec![], flows as i64)],
            );
        }
        if let Ok((block, verified)) = st.shield_entries() {
            gauges(
                r,
                "shield_entries",
                "Entries in the shield's maps now: block (sources on the blocklist), verified (sources that completed a handshake).",
                vec![
                    (vec![("map", "block".to_string())], block as i64),
                    (vec![("map", "verified".to_string())], verified as i64),
                ],
            );
        }
        gauges(
            r,
            "worker_state",
            "Worker slot state: 0 absent, 1 healthy, 2 draining.",
            st.workers()
                .iter()
                .enumerate()
                .take(n)
                .map(|(w, s)| (vec![("worker", w.to_string())], s.state as i64))
                .collect(),
        );
        drop(st);
        let restarts = self.restarts.lock().map(|r| r.clone()).unwrap_or_default();
        counters(
            r,
            "worker_restarts",
            "Workers restarted after dying.",
            restarts
                .iter()
                .enumerate()
                .take(n)
                .map(|(w, v)| (vec![("worker", w.to_string())], *v))
                .collect(),
        );
        scm_proto::ops::encode(&root)
    }

    /// Every live worker's page, by slot.
    async fn worker_pages(&self) -> Vec<(u32, String)> {
        let slots: Vec<u32> = {
            let st = lock(&self.steering);
            st.workers()
                .iter()
                .enumerate()
                .take(self.count as usize)
                .filter(|(_, s)| s.state != 0)
                .map(|(i, _)| i as u32)
                .collect()
        };
        let fetches = slots.into_iter().filter_map(|i| {
            let addr = reachable(worker_ops_addr(self.ops_addr, i)?);
            Some(async move {
                match scm_proto::ops::get(addr, "/metrics", WORKER_SCRAPE_TIMEOUT).await {
                    Ok(g) if g.status == 200 => Some((i, g.body)),
                    Ok(g) => {
                        tracing::debug!(worker = i, status = g.status, "worker metrics refused");
                        None
                    }
                    Err(e) => {
                        tracing::debug!(worker = i, error = %e, "worker metrics unreachable");
                        None
                    }
                }
            })
        });
        let handles: Vec<_> = fetches.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            if let Ok(Some(p)) = h.await {
                out.push(p);
            }
        }
        out
    }

    /// The merged page: the supervisor's own metrics, then its workers' under `worker`.
    async fn page(&self) -> String {
        let own = self.own_page();
        let workers: Vec<(String, String)> = self
            .worker_pages()
            .await
            .into_iter()
            .map(|(i, p)| (i.to_string(), p))
            .collect();
        scm_proto::ops::merge_pages(&own, &workers)
    }

    /// The pins present in the pin directory.
    fn pins(&self) -> Vec<String> {
        let mut pins: Vec<String> = std::fs::read_dir(&self.pin_dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| self.pin_dir.join(e.file_name()).display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        pins.sort();
        pins
    }

    /// Programs attached: the sk_lookup link pinned (a pinned link stays attached), and the
    /// XDP link on `--steer-iface` when one is named.
    fn programs(&self) -> Result<String, String> {
        let lookup = self.pin_dir.join(LOOKUP_LINK_PIN);
        if !lookup.exists() {
            return Err(format!(
                "sk_lookup is not attached: no link pinned at {}",
                lookup.display()
            ));
        }
        let mut found = format!("sk_lookup attached ({})", lookup.display());
        if let Some(iface) = &self.xdp_iface {
            let xdp = self.pin_dir.join(XDP_LINK_PIN);
            if !xdp.exists() {
                return Err(format!(
                    "XDP is not attached to {iface}: no link pinned at {}",
                    xdp.display()
                ));
            }
            found.push_str(&format!(", XDP attached to {iface} ({})", xdp.display()));
        }
        Ok(found)
    }

    fn healthy_workers(&self) -> Result<String, String> {
        let st = lock(&self.steering);
        let healthy = st
            .workers()
            .iter()
            .take(self.count as usize)
            .filter(|s| s.is_healthy())
            .count();
        if healthy == 0 {
            Err(format!("no healthy worker (of {})", self.count))
        } else {
            Ok(format!("{healthy} of {} workers healthy", self.count))
        }
    }

    /// `GET /status`: workers, programs and pins, map fill levels, key counters, TLS path.
    async fn status(&self) -> serde_json::Value {
        let pages = self.worker_pages().await;
        let sample = |page: &str, name: &str| -> Option<f64> {
            page.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
        };
        let tls_path = pages.iter().find_map(|(_, p)| {
            let l = p
                .lines()
                .find(|l| l.starts_with("scm_proxy_tls_path_info{"))?;
            let rest = l.split("path=\"").nth(1)?;
            Some(rest.split('"').next()?.to_string())
        });
        let st = lock(&self.steering);
        let workers: Vec<_> = st
            .workers()
            .iter()
            .enumerate()
            .take(self.count as usize)
            .map(|(i, s)| {
                let page = pages.iter().find(|(w, _)| *w as usize == i).map(|(_, p)| p);
                json!({
                    "slot": i,
                    "state": state_name(s.state),
                    "pid": s.pid,
                    "open_connections": page.and_then(|p| sample(p, "scm_proxy_connections_open")).map(|v| v as u64),
                    "connections_total": page.and_then(|p| sample(p, "scm_proxy_connections_total")).map(|v| v as u64),
                })
            })
            .collect();
        let events = st
            .counters()
            .map(|c| {
                SteerStat::ALL
                    .iter()
                    .map(|s| (s.name().to_string(), json!(c.get(*s))))
                    .collect::<serde_json::Map<_, _>>()
            })
            .unwrap_or_default();
        // The XDP link lives pinned (a supervisor that adopted it holds no attachment of its
        // own): the interface is the one this supervisor was told, the mode known only where
        // it attached the program itself.
        let mode = st.ingress().attached().map(|(_, mode)| mode.to_string());
        let xdp_pin = self.pin_dir.join(XDP_LINK_PIN);
        let xdp = self
            .xdp_iface
            .as_ref()
            .filter(|_| xdp_pin.exists())
            .map(|iface| {
                json!({
                    "iface": iface,
                    "mode": mode.unwrap_or_else(|| "pinned".into()),
                    "link": xdp_pin.display().to_string(),
                })
            });
        let flows = st.flow_count().ok();
        let shield = st.shield_entries().ok();
        let sockets = st.workers().iter().filter(|s| s.state != 0).count();
        drop(st);
        json!({
            "role": "supervisor",
            "workers": workers,
            "programs": {
                "sk_lookup": self.pin_dir.join(LOOKUP_LINK_PIN).exists(),
                "xdp": xdp,
                "check": match self.programs() { Ok(s) | Err(s) => s },
            },
            "pins": self.pins(),
            "maps": {
                "flows": flows,
                "sockmap_sockets": sockets,
                "blocklist": shield.map(|s| s.0),
                "verified_sources": shield.map(|s| s.1),
            },
            "counters": events,
            "tls_path": tls_path,
        })
    }
}

/// Serves the supervisor's ops endpoints on `listener`, forever.
pub(super) async fn serve_ops(
    listener: tokio::net::TcpListener,
    view: SupervisorView,
    drain: Drain,
) {
    let v = Arc::new(view);
    let (m, p, h, s) = (v.clone(), v.clone(), v.clone(), v);
    let ops = Ops::with_metrics(drain, move || {
        let m = m.clone();
        Box::pin(async move { m.page().await })
    })
    .check("ebpf_attached", move || {
        let r = p.programs();
        async move { r }
    })
    .check("healthy_worker", move || {
        let r = h.healthy_workers();
        async move { r }
    })
    .status(move || {
        let s = s.clone();
        async move { s.status().await }
    });
    ops.serve(listener).await;
}
