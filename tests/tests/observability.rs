//! Health, metrics and logs of the real daemons: `scm-security` and `scm-proxy` processes (the
//! standard stack), their ops listeners scraped over HTTP. `/ready` and `/live` answer, `/ready`
//! turns 503 naming its check when the dependency goes (the proxy's Security server SIGKILLed, the
//! Security server's PostgreSQL SIGKILLed), the scraped names follow the conventions, the list in
//! docs/operations.md matches what the daemons export (both ways), every expression of
//! docs/grafana/scm-dashboard.json names an exported metric, `--log-json` writes JSON lines, a
//! module directive in `--log-level` takes effect and a bad one is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scm_e2e::stack::{PASSWORD, binaries, free_port, workspace_root};
use scm_e2e::{Stack, StackOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A plain-HTTP GET: (status, body).
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: ops\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    Ok((status, body))
}

async fn ready(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (code, body) = get(addr, "/ready").await.expect("GET /ready");
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/ready body {body:?}: {e}"));
    (code, v)
}

/// Waits (up to `within`) until `/ready` answers `code`; returns its body.
async fn wait_ready(addr: SocketAddr, code: u16, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (c, v) = ready(addr).await;
        if c == code {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "/ready on {addr} stayed {c} (wanted {code}): {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The families a page declares (`# TYPE name type`).
fn families(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

/// The name a query uses for a family: OpenMetrics declares counters and infos without their
/// `_total` / `_info` suffix, which their samples carry.
fn query_name(family: &str, kind: &str) -> String {
    match kind {
        "counter" => format!("{family}_total"),
        "info" => format!("{family}_info"),
        _ => family.to_string(),
    }
}

/// Every series name in a page's samples.
fn sample_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

/// Checks a scraped page against the conventions: component prefix, `_total` counters,
/// `_seconds` histograms, `_info` infos, build info and process metrics present.
fn check_conventions(page: &str, prefix: &str) {
    let fams = families(page);
    assert!(!fams.is_empty(), "no metric families in:\n{page}");
    assert!(page.trim_end().ends_with("# EOF"), "no # EOF");
    for (name, kind) in &fams {
        assert!(
            name.starts_with(prefix) || name.starts_with("process_"),
            "{name} has neither the {prefix} prefix nor the process_ one"
        );
        let samples: Vec<&str> = page
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let n = l.split(['{', ' ']).next().unwrap_or_default();
                n.strip_prefix(name.as_str()).is_some_and(|rest| {
                    [
                        "", "_total", "_created", "_bucket", "_sum", "_count", "_info",
                    ]
                    .contains(&rest)
                })
            })
            .collect();
        match kind.as_str() {
            "counter" => {
                for s in &samples {
                    let n = s.split(['{', ' ']).next().unwrap_or_default();
                    assert!(
                        n.ends_with("_total") || n.ends_with("_created"),
                        "counter sample {s}"
                    );
                }
            }
            "histogram" => assert!(
                name.ends_with("_seconds"),
                "histogram {name} not in seconds"
            ),
            "info" => assert!(
                samples
                    .iter()
                    .all(|s| s.starts_with(&format!("{name}_info")) && s.ends_with(" 1")),
                "info {name}: {samples:?}"
            ),
            "gauge" => {}
            other => panic!("{name}: unexpected type {other}"),
        }
    }
    assert_eq!(
        fams.get(&format!("{prefix}build")).map(String::as_str),
        Some("info"),
        "{prefix}build_info missing"
    );
    for p in [
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(fams.contains_key(p), "{p} missing");
    }
}

/// One row of the metrics list in docs/operations.md.
#[derive(Debug)]
struct Row {
    name: String,
    kind: String,
    by: Vec<String>,
}

fn doc_rows() -> Vec<Row> {
    let text = std::fs::read_to_string(workspace_root().join("docs/operations.md")).unwrap();
    let section = text
        .split("\n## Metrics\n")
        .nth(1)
        .expect("docs/operations.md has a \"## Metrics\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            Row {
                name: cells[1].trim_matches('`').to_string(),
                kind: cells[2].to_string(),
                by: cells[4].split(',').map(|s| s.trim().to_string()).collect(),
            }
        })
        .collect()
}

/// The docs' list and a daemon's page agree both ways, types included.
fn check_docs(page: &str, daemon: &str) {
    let exported: BTreeMap<String, String> = families(page)
        .into_iter()
        .map(|(n, k)| (query_name(&n, &k), k))
        .collect();
    let rows = doc_rows();
    let documented: BTreeMap<String, String> = rows
        .iter()
        .filter(|r| r.by.iter().any(|b| b == daemon))
        .map(|r| (r.name.clone(), r.kind.clone()))
        .collect();
    let missing: Vec<_> = exported
        .keys()
        .filter(|n| !documented.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "{daemon} exports metrics docs/operations.md does not list for it: {missing:?}"
    );
    let absent: Vec<_> = documented
        .keys()
        .filter(|n| !exported.contains_key(*n))
        .collect();
    assert!(
        absent.is_empty(),
        "docs/operations.md lists metrics {daemon} does not export: {absent:?}"
    );
    for (n, k) in &exported {
        assert_eq!(
            &documented[n], k,
            "{n}: the docs say {}, it is {k}",
            documented[n]
        );
    }
}

/// Every metric name in the dashboard's expressions.
fn dashboard_names() -> BTreeSet<String> {
    let path = workspace_root().join("docs/grafana/scm-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(
        exprs.len() > 20,
        "only {} expressions in the dashboard",
        exprs.len()
    );
    let mut names = BTreeSet::new();
    for e in exprs {
        // Label values and legends are in quotes: not metric names.
        let unquoted: String = e.split('"').step_by(2).collect::<Vec<_>>().join(" ");
        for word in unquoted.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if word.starts_with("scm_") || word.starts_with("process_") {
                names.insert(word.to_string());
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_live_metrics_docs_dashboard_and_logs() {
    let sec_ops = local(free_port());
    let mut stack = Stack::start(StackOptions {
        security_args: vec![
            "--metrics-listen".into(),
            sec_ops.to_string(),
            "--log-json".into(),
            "--log-level".into(),
            "info,scm_security::ha=debug".into(),
        ],
        // Only the serve loop's own module logs at info: the control module's "revocation
        // stream open" line must not appear.
        proxy_args: vec![
            "--log-json".into(),
            "--log-level".into(),
            "warn,scm_proxy::proxy::server=info".into(),
        ],
        ..StackOptions::default()
    })
    .await
    .expect("starting the stack");
    let proxy_ops = stack.metrics_addr;

    // Traffic, so that the latency histograms have samples: a login and a tunnel.
    let d = stack
        .enroll("alice", "phone-1", "1.0.0")
        .await
        .expect("enroll");
    let session = scm_device::Session::login(&d, PASSWORD)
        .await
        .expect("login");
    let mut tunnel = session.open("echo").await.expect("tunnel");
    scm_e2e::ha::echo_once(&mut tunnel, b"ping").await;
    drop(tunnel);
    // An HTTP-mode request, and a refusal (nothing listens behind `dead`).
    let web = session.open("web").await.expect("web");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(web))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", "web")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.expect("request").status(), 200);
    assert!(session.open("dead").await.is_err(), "dead resource reached");

    for (addr, who) in [(sec_ops, "scm-security"), (proxy_ops, "scm-proxy")] {
        let v = wait_ready(addr, 200, Duration::from_secs(10)).await;
        assert_eq!(v["ready"], true, "{who}: {v:#}");
        assert!(v["failing"].as_array().unwrap().is_empty(), "{who}: {v:#}");
        let (code, body) = get(addr, "/live").await.unwrap();
        assert_eq!((code, body.as_str()), (200, "live\n"), "{who} /live");
        let (code, _) = get(addr, "/nothing").await.unwrap();
        assert_eq!(code, 404, "{who}: an unknown path");
    }
    let (_, v) = ready(sec_ops).await;
    let checks: BTreeSet<String> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap().to_string())
        .collect();
    for want in [
        "not_draining",
        "store",
        "listener:device",
        "listener:proxy",
        "listener:admin",
    ] {
        assert!(
            checks.contains(want),
            "scm-security /ready lacks {want}: {v:#}"
        );
    }

    let (_, sec_page) = get(sec_ops, "/metrics").await.unwrap();
    let (_, proxy_page) = get(proxy_ops, "/metrics").await.unwrap();
    check_conventions(&sec_page, "scm_security_");
    check_conventions(&proxy_page, "scm_proxy_");
    for h in [
        "scm_security_login_seconds",
        "scm_security_validation_seconds",
    ] {
        assert!(
            sec_page.contains(&format!("{h}_count 1")) || sec_page.contains(&format!("{h}_count ")),
            "{h}"
        );
    }
    let count = |page: &str, name: &str| -> f64 {
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert!(count(&sec_page, "scm_security_login_seconds_count") >= 1.0);
    assert!(count(&sec_page, "scm_security_validation_seconds_count") >= 1.0);
    assert!(count(&proxy_page, "scm_proxy_validation_seconds_count") >= 1.0);
    assert!(count(&proxy_page, "scm_proxy_preamble_seconds_count") >= 1.0);
    assert!(count(&proxy_page, "scm_proxy_backend_connect_seconds_count") >= 1.0);
    // Readiness probes look at the listeners without connecting to them (the stack's own
    // start-up wait did connect once, and counts).
    let failed = "scm_proxy_handshakes_total{result=\"failed\"}";
    let before = count(&proxy_page, failed);
    for _ in 0..5 {
        ready(proxy_ops).await;
    }
    let (_, after) = get(proxy_ops, "/metrics").await.unwrap();
    assert_eq!(
        count(&after, failed),
        before,
        "a /ready probe counted as a failed handshake"
    );

    // `scm-proxy status` against a single proxy.
    let out = Command::new(&binaries().proxy)
        .args(["status", "--metrics-listen", &proxy_ops.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("role: proxy")
            && (text.contains("tls path: userspace") || text.contains("tls path: ktls")),
        "{text}"
    );
    assert!(text.contains("validations_valid"), "{text}");

    check_docs(&sec_page, "security");
    check_docs(&proxy_page, "proxy");

    // The dashboard: names the two daemons export here, or the supervisor's (documented as
    // such; proxy-user/tests/status_netns.rs checks those against a real supervisor).
    let mut exported = sample_names(&sec_page);
    exported.extend(sample_names(&proxy_page));
    let supervisor: BTreeSet<String> = doc_rows()
        .into_iter()
        .filter(|r| r.by.iter().any(|b| b == "supervisor"))
        .map(|r| r.name)
        .collect();
    let resolves = |n: &str| {
        exported.contains(n)
            || supervisor.contains(n)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                n.strip_suffix(s)
                    .is_some_and(|b| exported.contains(&format!("{b}_count")))
            })
    };
    let unknown: Vec<_> = dashboard_names()
        .into_iter()
        .filter(|n| !resolves(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard names metrics nobody exports: {unknown:?}"
    );

    // Logs: JSON lines, the module directives applied.
    let json_lines = |log: &str, who: &str| -> Vec<serde_json::Value> {
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{who} log line {l:?} is not JSON: {e}"))
            })
            .collect();
        assert!(!lines.is_empty(), "{who} logged nothing");
        for l in &lines {
            assert!(
                l["level"].is_string() && l["target"].is_string(),
                "{who}: {l}"
            );
        }
        lines
    };
    let proxy_lines = json_lines(&stack.proxy_log(), "scm-proxy");
    let messages: Vec<&str> = proxy_lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    assert!(messages.contains(&"scm-proxy serving"), "{messages:?}");
    assert!(
        !messages.contains(&"revocation stream open"),
        "warn,scm_proxy::proxy::server=info let the control module's info line through: {messages:?}"
    );
    let sec_lines = json_lines(&stack.security_log(), "scm-security");
    assert!(
        sec_lines.iter().any(|l| l["level"] == "INFO"),
        "scm-security logged no info line"
    );

    // The proxy's dependency goes: /ready turns 503 naming it, /live stays 200.
    stack.kill_security();
    let v = wait_ready(proxy_ops, 503, Duration::from_secs(20)).await;
    assert_eq!(
        v["failing"],
        serde_json::json!(["security_server"]),
        "{v:#}"
    );
    let (code, _) = get(proxy_ops, "/live").await.unwrap();
    assert_eq!(code, 200);
    // And back when the Security server is.
    stack
        .start_security()
        .await
        .expect("restarting the Security server");
    wait_ready(proxy_ops, 200, Duration::from_secs(20)).await;
}

/// Runs `bin args`, expecting a quick failure; returns its stderr.
fn refused(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running the binary");
    assert!(!out.status.success(), "{} {args:?} started", bin.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_log_directive_is_refused_by_every_daemon() {
    let b = binaries();
    for (bin, args) in [
        (
            &b.proxy,
            vec!["serve", "--log-level", "info,scm_proxy=loud"],
        ),
        (
            &b.proxy,
            vec![
                "xdp",
                "attach",
                "--iface",
                "lo",
                "--log-level",
                "info,scm_proxy=loud",
            ],
        ),
        (
            &b.security,
            vec!["serve", "--log-level", "info,scm_proxy=loud"],
        ),
        (
            &b.device,
            vec!["--log-level", "info,scm_proxy=loud", "logout"],
        ),
    ] {
        let err = refused(bin, &args);
        assert!(
            err.contains("not a list of log directives") && err.contains("--log-level"),
            "{} {args:?}: {err}",
            bin.display()
        );
    }
    // The env twin too.
    let out = Command::new(&b.proxy)
        .args(["serve"])
        .env("SCM_LOG", "info,scm_proxy=loud")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a list of log directives"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_client_logs_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.json");
    let certs = dir.path().join("certs");
    assert!(
        Command::new(&binaries().security)
            .args(["dev-certs", "--out"])
            .arg(&certs)
            .status()
            .unwrap()
            .success()
    );
    // Nothing listens on the port: the client logs its attempts (hyper, rustls at debug) and fails.
    let out = tokio::process::Command::new(&binaries().device)
        .args(["--log-json", "--log-level", "debug", "--state"])
        .arg(&state)
        .args([
            "enroll",
            "--security-url",
            &format!("https://{}", local(free_port())),
        ])
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .args(["--user", "u", "--password", "p", "--device-id", "d"])
        .args([
            "--app-id",
            "mail",
            "--app-version",
            "1.0.0",
            "--platform",
            "android",
        ])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let json: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(
        !json.is_empty(),
        "scm-device --log-json wrote no JSON line:\n{err}"
    );
    assert!(json.iter().all(|l| l["level"].is_string()), "{err}");
}

/// A PostgreSQL of its own (SIGKILLed by the test): `None` after a loud skip (a failure in CI).
struct Postgres {
    dir: PathBuf,
    port: u16,
    /// `postgres` (or `runuser` around it), reaped on drop.
    child: std::process::Child,
}

impl Postgres {
    fn start() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .find(|b| b.join("postgres").exists())
        });
        let Some(bin) = bin else {
            scm_netns::skip::skip(
                "scm-security /ready with its database gone",
                "PostgreSQL",
                "none under /usr/lib/postgresql/*/bin (apt install postgresql)",
            );
            return None;
        };
        let dir = PathBuf::from(format!(
            "/tmp/scm-obs-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let root = nix_is_root();
        let as_pg = |prog: &Path| {
            let mut c = if root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(prog);
                c
            } else {
                Command::new(prog)
            };
            c.stdin(Stdio::null());
            c
        };
        if root {
            assert!(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let data = dir.join("data");
        let out = as_pg(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "scm", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = as_pg(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ])
            .arg("-k")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !Command::new(bin.join("pg_isready"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "scm",
                "-q",
            ])
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(Self { dir, port, child })
    }

    /// SIGKILLs the postmaster (its backends follow); whether the signal was delivered.
    fn kill9(&self) -> bool {
        let Ok(pid) = std::fs::read_to_string(self.dir.join("data/postmaster.pid")) else {
            return false;
        };
        let pid = pid.lines().next().unwrap_or_default().trim().to_string();
        Command::new("kill")
            .args(["-KILL", &pid])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Already killed by the test, or not: a stray postmaster must not outlive it.
        self.kill9();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_ready_fails_on_the_store_when_postgres_is_killed() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = binaries();
    let certs = dir.path().join("certs");
    assert!(
        Command::new(&b.security)
            .args(["dev-certs", "--out"])
            .arg(&certs)
            .status()
            .unwrap()
            .success()
    );
    let ops = local(free_port());
    let admin = local(free_port());
    let p = |x: PathBuf| x.display().to_string();
    let log = std::fs::File::create(dir.path().join("security.log")).unwrap();
    let mut child = Command::new(&b.security)
        .args(["serve", "--data-dir", &p(dir.path().join("data"))])
        .args([
            "--database-url",
            &format!("postgres://scm@127.0.0.1:{}/postgres", pg.port),
        ])
        .args([
            "--tls-cert",
            &p(certs.join("security.pem")),
            "--tls-key",
            &p(certs.join("security.key")),
        ])
        .args(["--client-ca", &p(certs.join("ca.pem"))])
        .args(["--listen", &local(free_port()).to_string()])
        .args(["--proxy-listen", &local(free_port()).to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args([
            "--metrics-listen",
            &ops.to_string(),
            "--backup-interval",
            "0",
        ])
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(ops).await.is_err() {
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "scm-security did not start: {}",
            std::fs::read_to_string(dir.path().join("security.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = wait_ready(ops, 200, Duration::from_secs(10)).await;
    assert_eq!(v["ready"], true, "{v:#}");
    assert!(pg.kill9(), "kill -KILL of the postmaster");
    let v = wait_ready(ops, 503, Duration::from_secs(20)).await;
    assert_eq!(v["failing"], serde_json::json!(["store"]), "{v:#}");
    let (code, _) = get(ops, "/live").await.unwrap();
    assert_eq!(code, 200, "/live follows the process, not its database");
    let _ = child.kill();
    let _ = child.wait();
}
