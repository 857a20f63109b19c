//! `scm-proxy status`: asks a running supervisor (or single proxy) for `GET /status` on its ops
//! listener and prints it for a person: workers, programs and pins, map fill levels, counters,
//! the active TLS path.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use serde_json::Value;

/// How long `status` waits for the answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What `scm-proxy status` can fail on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// Nothing answered at the address.
    #[error(
        "nothing answers at {addr} ({source}); is `scm-proxy serve --metrics-listen {addr}` running \
         there? Name its ops listener with --metrics-listen (or SCM_PROXY_METRICS_LISTEN)"
    )]
    Unreachable {
        /// The address asked.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something answered, but not with a status.
    #[error("{addr} answered GET /status with HTTP {code}: {body}")]
    Refused {
        /// The address asked.
        addr: SocketAddr,
        /// The HTTP status.
        code: u16,
        /// Its body (first line).
        body: String,
    },
    /// The answer was not the JSON a proxy sends.
    #[error("{addr} answered GET /status with something that is not JSON: {source}")]
    NotJson {
        /// The address asked.
        addr: SocketAddr,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// `GET /status` of the ops listener at `addr`.
pub async fn fetch(addr: SocketAddr) -> Result<Value, StatusError> {
    let got = scm_proto::ops::get(addr, "/status", TIMEOUT)
        .await
        .map_err(|source| StatusError::Unreachable { addr, source })?;
    if got.status != 200 {
        return Err(StatusError::Refused {
            addr,
            code: got.status,
            body: got.body.lines().next().unwrap_or_default().to_string(),
        });
    }
    serde_json::from_str(&got.body).map_err(|source| StatusError::NotJson { addr, source })
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The status as a person reads it.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let role = text(&v["role"]);
    let _ = writeln!(out, "role: {role}");
    let _ = writeln!(out, "tls path: {}", text(&v["tls_path"]));
    if let Some(workers) = v["workers"].as_array() {
        let _ = writeln!(out, "workers:");
        let _ = writeln!(
            out,
            "  {:<5} {:<9} {:>8} {:>6} {:>12}",
            "slot", "state", "pid", "open", "accepted"
        );
        for w in workers {
            let _ = writeln!(
                out,
                "  {:<5} {:<9} {:>8} {:>6} {:>12}",
                text(&w["slot"]),
                text(&w["state"]),
                text(&w["pid"]),
                text(&w["open_connections"]),
                text(&w["connections_total"]),
            );
        }
    }
    if v["programs"].is_object() {
        let p = &v["programs"];
        let _ = writeln!(out, "programs: {}", text(&p["check"]));
        let xdp = &p["xdp"];
        if xdp.is_object() {
            let _ = writeln!(
                out,
                "  xdp on {} ({})",
                text(&xdp["iface"]),
                text(&xdp["mode"])
            );
        }
    }
    if let Some(pins) = v["pins"].as_array() {
        let _ = writeln!(out, "pins:");
        for p in pins {
            let _ = writeln!(out, "  {}", text(p));
        }
    }
    if let Some(maps) = v["maps"].as_object() {
        let _ = writeln!(out, "maps:");
        for (k, n) in maps {
            let _ = writeln!(out, "  {k:<20} {}", text(n));
        }
    }
    if let Some(c) = v["counters"].as_object() {
        let _ = writeln!(out, "counters:");
        for (k, n) in c {
            let _ = writeln!(out, "  {k:<28} {}", text(n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error() {
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = fetch(addr).await.unwrap_err().to_string();
        assert!(
            e.contains("nothing answers at") && e.contains("--metrics-listen"),
            "{e}"
        );
    }
}
