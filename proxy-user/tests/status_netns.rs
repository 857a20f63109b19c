//! The supervisor's ops listener and `scm-proxy status`, against a real `scm-proxy serve
//! --workers 2` in namespace `b` with XDP on `vb` and sk_lookup: `/ready` 200 with the programs
//! attached and the workers healthy, `/live`; `scm-proxy status` (text and `--json`) shows the
//! workers with the pids the kernel's worker map holds, their open connections (read from each
//! worker's own page), the programs and pins, the map fill levels and the TLS path; the merged
//! `/metrics` carries every worker's page under a `worker` label and every metric that
//! docs/operations.md and the dashboard attribute to the supervisor; the workers log JSON as
//! the supervisor was told to; with every worker gone (SIGKILLed, and unable to restart: their
//! key removed) `/ready` answers 503 naming `healthy_worker`; `status` against an address where
//! nothing listens fails clearly.
//!
//! Needs root and `ip`; see `support::require_root`.

mod support;

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use scm_proxy::steer::{SteerOptions, Steering};
use support::{B_V4, NetnsPair, in_netns, require_root};

const OPS: &str = "127.0.0.1:19200";

struct Harness {
    pair: NetnsPair,
    dir: PathBuf,
    pin_dir: PathBuf,
    supervisor: Option<Child>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut c) = self.supervisor.take() {
            // SIGTERM: the supervisor stops its workers and removes its pins.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Steering::unpin(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Harness {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("scm-status-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec![B_V4.to_owned()]).unwrap();
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/scm-status-test-{}",
            std::process::id()
        ));
        let _ = Steering::unpin(&pin_dir);
        let mut h = Self {
            pair: NetnsPair::create(),
            dir,
            pin_dir,
            supervisor: None,
        };
        let p = |n: &str| h.dir.join(n).display().to_string();
        let log = std::fs::File::create(h.dir.join("supervisor.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scm-proxy"));
        cmd.args(["--log-json", "serve", "--listen", &format!("{B_V4}:443")])
            .args(["--tls-cert", &p("cert.pem"), "--tls-key", &p("key.pem")])
            // Nothing needs a Security server here: the workers' readiness says so, the
            // supervisor's does not depend on it.
            .args(["--security-url", "https://127.0.0.1:1"])
            .args(["--security-ca", &p("cert.pem")])
            .args([
                "--client-cert",
                &p("cert.pem"),
                "--client-key",
                &p("key.pem"),
            ])
            .args(["--metrics-listen", OPS, "--workers", "2"])
            .args(["--steer-iface", "vb", "--xdp-mode", "generic"])
            .arg("--pin-dir")
            .arg(&h.pin_dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log);
        h.supervisor = Some(in_netns(&h.pair.b, || cmd.spawn()).expect("starting scm-proxy serve"));
        h
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("supervisor.log")).unwrap_or_default()
    }

    /// GET `path` on the supervisor's ops listener (from inside `b`): (status, body).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        in_netns(&self.pair.b, || {
            let mut s =
                TcpStream::connect_timeout(&OPS.parse().unwrap(), Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: ops\r\n\r\n").as_bytes())
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let code = out.split(' ').nth(1)?.parse().ok()?;
            Some((code, out.split_once("\r\n\r\n")?.1.to_string()))
        })
    }

    /// Waits until `/ready` answers `code`; its JSON body.
    fn wait_ready(&self, code: u16, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Some((c, body)) = self.get("/ready") {
                let v: serde_json::Value = serde_json::from_str(&body).expect("/ready JSON");
                if c == code {
                    return v;
                }
                last = Some(v);
            }
            assert!(
                Instant::now() < deadline,
                "/ready never answered {code}: {last:?}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `scm-proxy status ARGS` run inside `b`: (success, stdout, stderr).
    fn status(&self, args: &[&str]) -> (bool, String, String) {
        let out = in_netns(&self.pair.b, || {
            Command::new(env!("CARGO_BIN_EXE_scm-proxy"))
                .arg("status")
                .args(args)
                .output()
        })
        .expect("running scm-proxy status");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The metrics docs/operations.md attributes to `who`, as queries name them.
fn documented(who: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let text = std::fs::read_to_string(path).unwrap();
    let section = text
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a Metrics section");
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            cells[4]
                .split(',')
                .any(|b| b.trim() == who)
                .then(|| cells[1].trim_matches('`').to_string())
        })
        .collect()
}

fn sample_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn supervisor_ready_status_and_merged_metrics() {
    if !require_root("supervisor_ready_status_and_merged_metrics") {
        return;
    }
    let h = Harness::start();
    let v = h.wait_ready(200, Duration::from_secs(60));
    let checks: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        checks,
        ["not_draining", "ebpf_attached", "healthy_worker"],
        "{v:#}"
    );
    assert_eq!(h.get("/live").map(|r| r.0), Some(200));

    // status, as JSON: the worker map's pids, each worker's own page read. /ready holds with
    // one healthy worker; the second may still be starting.
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let (ok, out, err) = h.status(&["--metrics-listen", OPS, "--json"]);
        assert!(ok, "status --json failed: {err}");
        let s: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        let healthy = s["workers"].as_array().is_some_and(|w| {
            w.iter()
                .all(|w| w["state"] == "healthy" && w["open_connections"].is_u64())
        });
        if healthy {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "workers not all healthy: {s:#}\n{}",
            h.log()
        );
        thread::sleep(Duration::from_millis(200));
    };
    let maps = Steering::load(&SteerOptions {
        pin_dir: Some(h.pin_dir.clone()),
        ..SteerOptions::default()
    })
    .expect("opening the pinned maps");
    let slots = maps.workers()[..2].to_vec();
    let workers = s["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{s:#}");
    for (w, slot) in workers.iter().zip(&slots) {
        assert_eq!(w["state"], "healthy", "{s:#}");
        assert_eq!(w["pid"], slot.pid, "{s:#}");
        assert!(slot.pid > 0);
        assert_eq!(
            w["open_connections"], 0,
            "a worker's own gauge, read from its page: {s:#}"
        );
    }
    assert_eq!(s["programs"]["sk_lookup"], true, "{s:#}");
    assert_eq!(s["programs"]["xdp"]["iface"], "vb", "{s:#}");
    let pins: Vec<&str> = s["pins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        pins.iter().any(|p| p.ends_with("link-sk-lookup")),
        "{pins:?}"
    );
    assert!(pins.iter().any(|p| p.ends_with("link-xdp")), "{pins:?}");
    assert!(s["maps"]["flows"].is_u64(), "{s:#}");
    assert_eq!(s["maps"]["sockmap_sockets"], 2, "{s:#}");
    assert_eq!(s["maps"]["blocklist"], 0, "{s:#}");
    assert!(s["maps"]["verified_sources"].is_u64(), "{s:#}");
    assert!(
        ["ktls", "userspace"].contains(&s["tls_path"].as_str().unwrap_or_default()),
        "{s:#}"
    );
    assert!(
        s["counters"].as_object().is_some_and(|c| !c.is_empty()),
        "{s:#}"
    );

    // status, as text.
    let (ok, out, err) = h.status(&["--metrics-listen", OPS]);
    assert!(ok, "status failed: {err}");
    assert!(out.contains("role: supervisor"), "{out}");
    for slot in &slots {
        assert!(
            out.contains(&slot.pid.to_string()),
            "pid {} missing:\n{out}",
            slot.pid
        );
    }
    assert_eq!(out.matches("healthy").count(), 2, "{out}");
    assert!(
        out.contains("sk_lookup attached") && out.contains("xdp on vb"),
        "{out}"
    );

    // Nothing listening: a clear error.
    let (ok, _, err) = h.status(&["--metrics-listen", "127.0.0.1:1"]);
    assert!(!ok);
    assert!(err.contains("nothing answers at 127.0.0.1:1"), "{err}");

    // The merged page: each worker's metrics under its label, the supervisor's own, the docs'
    // supervisor list and the dashboard's supervisor names all there.
    let (_, page) = h.get("/metrics").expect("/metrics");
    for w in 0..2 {
        for m in [
            "scm_proxy_connections_total",
            "process_resident_memory_bytes",
            "scm_proxy_build_info",
        ] {
            assert!(
                page.contains(&format!("{m}{{worker=\"{w}\"")),
                "{m} of worker {w}:\n{page}"
            );
        }
    }
    assert_eq!(page.matches("# EOF").count(), 1);
    let names = sample_names(&page);
    let supervisor = documented("supervisor");
    let missing: Vec<_> = supervisor.iter().filter(|n| !names.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "documented for the supervisor, not exported: {missing:?}"
    );
    let proxy_or_sup: BTreeSet<String> = documented("proxy").union(&supervisor).cloned().collect();
    for fam in page.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = fam.split_once(' ').unwrap();
        let q = match kind {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.to_string(),
        };
        assert!(
            proxy_or_sup.contains(&q),
            "{q} exported but not in docs/operations.md"
        );
    }
    let dash = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/scm-dashboard.json"),
    )
    .unwrap();
    for n in &supervisor {
        if dash.contains(n.as_str()) {
            assert!(names.contains(n), "the dashboard uses {n}, not exported");
        }
    }
    let xdp_frames: f64 = page
        .lines()
        .filter(|l| l.starts_with("scm_proxy_xdp_packets_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(xdp_frames >= 0.0);

    // The workers log JSON too: they run with the supervisor's flags.
    let log = h.log();
    let serving = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))
        })
        .filter(|l| l["fields"]["message"] == "scm-proxy serving")
        .count();
    assert_eq!(serving, 2, "each worker's start line, as JSON:\n{log}");

    // Every worker gone and unable to come back: 503 naming healthy_worker.
    std::fs::remove_file(h.dir.join("key.pem")).unwrap();
    for slot in &slots {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(slot.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let v = h.wait_ready(503, Duration::from_secs(30));
    assert_eq!(v["failing"], serde_json::json!(["healthy_worker"]), "{v:#}");
    assert_eq!(h.get("/live").map(|r| r.0), Some(200));
}
