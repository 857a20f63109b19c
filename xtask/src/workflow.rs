//! The workflow demo: the seeds' six steps with real processes on 127.0.0.1.
//!
//! A Security server on a fresh SQLite file, a proxy with mutual TLS to it, a tcp echo and an http
//! back end, then a device that enrolls, logs in, tunnels, sends an HTTP request, checks and fetches
//! an update and logs out. Every command is printed before it runs, so the demo doubles as a
//! walk-through of the operator's and the device's command lines.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

// Ports away from the defaults, so a demo can run beside a developer's own servers.
const DEVICE_API: &str = "127.0.0.1:28443";
const PROXY_API: &str = "127.0.0.1:28444";
const ADMIN_API: &str = "127.0.0.1:28445";
const PROXY: &str = "127.0.0.1:29443";
const PROXY_METRICS: &str = "127.0.0.1:29100";
const ECHO: &str = "127.0.0.1:27001";
const HTTP: &str = "127.0.0.1:27002";
const TUNNEL: &str = "127.0.0.1:27000";
const PASSWORD: &str = "demo-Passw0rd!";

/// A started child that is killed on drop, with its log file (kept after the demo).
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(name: &'static str, logs: &Path, cmd: &mut Command) -> Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let file = fs::File::create(&log)?;
        println!("  $ {}", show(cmd));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child, log })
    }

    /// Waits until `addr` accepts TCP connections, failing with the log if the child exits.
    fn wait_listening(&mut self, addr: &str) -> Result<()> {
        let addr: SocketAddr = addr.parse()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {addr}:\n{}",
                    self.name,
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            sleep(Duration::from_millis(100));
        }
        bail!("{} did not listen on {addr} within 30 s", self.name)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command line as a person would type it (binaries by name, not by path).
fn show(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| {
            let a = a.to_string_lossy();
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect();
    format!("{prog} {}", args.join(" "))
}

/// Runs a command to completion, printing it and its output indented.
fn step(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    println!("  $ {}", show(cmd));
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in text
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("    {line}");
    }
    ensure!(out.status.success(), "{} failed: {}", show(cmd), out.status);
    Ok(text)
}

fn header(text: &str) {
    println!("\n== {text}");
}

/// Runs the workflow demo; each process's output goes to a file in `logs`.
pub fn run(logs: &Path) -> Result<()> {
    cmd::build(
        &["scm-security", "scm-proxy", "scm-device", "scm-e2e"],
        &["scm-security", "scm-proxy", "scm-device", "scm-backend"],
    )?;
    let bin = cmd::target_dir().join("debug");
    let dir = cmd::target_dir().join(format!("demo-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let result = workflow(&bin, &dir, logs);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn workflow(bin: &Path, dir: &Path, logs: &Path) -> Result<()> {
    let security = |args: &[&str]| {
        let mut c = Command::new(bin.join("scm-security"));
        c.args(args).current_dir(dir);
        c
    };
    let admin = |args: &[&str]| {
        let mut c = Command::new(bin.join("scm-security"));
        c.args(["admin", "--url", &format!("https://{ADMIN_API}")])
            .args(["--ca", "certs/ca.pem", "--token-file", "data/admin.token"])
            .args(args)
            .current_dir(dir);
        c
    };
    let device = |args: &[&str]| {
        let mut c = Command::new(bin.join("scm-device"));
        c.args(["--state", "alice-phone.json"])
            .args(args)
            .env("SCM_DEVICE_PASSWORD", PASSWORD)
            .current_dir(dir);
        c
    };

    header("operator: certificates, Security server on embedded SQLite, catalog, app");
    step(&mut security(&["dev-certs", "--out", "certs"]), None)?;
    step(&mut security(&["init", "--data-dir", "data"]), None)?;
    let mut sec = Service::start(
        "scm-security",
        logs,
        &mut security(&[
            "serve",
            "--data-dir",
            "data",
            "--tls-cert",
            "certs/security.pem",
            "--tls-key",
            "certs/security.key",
            "--client-ca",
            "certs/ca.pem",
            "--listen",
            DEVICE_API,
            "--proxy-listen",
            PROXY_API,
            "--admin-listen",
            ADMIN_API,
        ]),
    )?;
    for addr in [DEVICE_API, PROXY_API, ADMIN_API] {
        sec.wait_listening(addr)?;
    }
    step(
        &mut admin(&[
            "users",
            "add",
            "alice",
            "--groups",
            "staff",
            "--password-stdin",
        ]),
        Some(&format!("{PASSWORD}\n")),
    )?;
    step(
        &mut admin(&[
            "resources",
            "set",
            "echo",
            "--address",
            ECHO,
            "--mode",
            "tcp",
            "--groups",
            "staff",
        ]),
        None,
    )?;
    step(
        &mut admin(&[
            "resources",
            "set",
            "web",
            "--address",
            HTTP,
            "--mode",
            "http",
            "--groups",
            "staff",
        ]),
        None,
    )?;
    step(
        &mut admin(&["sites", "set", "main", "--proxy-url", PROXY]),
        None,
    )?;
    for (version, bytes) in [("1.0.0", 40_000usize), ("1.1.0", 50_000)] {
        let file = format!("mail-{version}.apk");
        let body: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(dir.join(&file), body)?;
        step(
            &mut admin(&["apps", "publish", "mail", version, "android", &file]),
            None,
        )?;
    }

    header("back ends: a tcp echo and an http server");
    let mut backend = Service::start(
        "scm-backend",
        logs,
        Command::new(bin.join("scm-backend")).args(["--echo", ECHO, "--http", HTTP]),
    )?;
    backend.wait_listening(ECHO)?;
    backend.wait_listening(HTTP)?;

    header("proxy: device TLS, mutual TLS to the Security server");
    let mut proxy = Service::start(
        "scm-proxy",
        logs,
        Command::new(bin.join("scm-proxy"))
            .args(["serve", "--listen", PROXY])
            .args([
                "--tls-cert",
                "certs/proxy.pem",
                "--tls-key",
                "certs/proxy.key",
            ])
            .args([
                "--security-url",
                &format!("https://{PROXY_API}"),
                "--security-ca",
                "certs/ca.pem",
            ])
            .args([
                "--client-cert",
                "certs/proxy-client.pem",
                "--client-key",
                "certs/proxy-client.key",
            ])
            .args(["--metrics-listen", PROXY_METRICS])
            .current_dir(dir),
    )?;
    proxy.wait_listening(PROXY)?;
    proxy.wait_listening(PROXY_METRICS)?;
    let start = Instant::now();
    while scrape()?.value("scm_proxy_revocation_stream_up") < 1.0 {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the proxy's revocation stream to the Security server did not come up within 10 s \
             (scm_proxy_revocation_stream_up stayed 0); its log: {}",
            proxy.log.display()
        );
        sleep(Duration::from_millis(50));
    }
    let m = scrape()?;
    let path = m.labels_at_one("scm_proxy_tls_path_info", "path");
    ensure!(
        path.len() == 1,
        "scm_proxy_tls_path_info should name one path, named {path:?}"
    );
    println!(
        "    proxy up: revocation stream connected; records encrypted on the {} path \
         (scm_proxy_tls_path_info)",
        path[0]
    );

    header("device: enrollment (TLS to the Security server; it issues the 256-bit shared key)");
    let enrolled = step(
        &mut device(&[
            "enroll",
            "--security-url",
            &format!("https://{DEVICE_API}"),
            "--ca",
            "certs/ca.pem",
            "--user",
            "alice",
            "--device-id",
            "phone-1",
            "--app-id",
            "mail",
            "--app-version",
            "1.0.0",
            "--platform",
            "android",
        ]),
        None,
    )?;
    ensure!(
        enrolled.starts_with("enrolled alice"),
        "enroll printed {enrolled:?}"
    );

    header(
        "steps 1-2: device -> Security server over TLS; login = password + MAC over a challenge",
    );
    let login = step(&mut device(&["login"]), None)?;
    ensure!(
        login.starts_with("logged in as alice"),
        "login printed {login:?}"
    );

    header("steps 3-6: a tunnel to resource 'echo' through the proxy");
    let before = scrape()?;
    let mut tunnel = Service::start(
        "scm-device-tunnel",
        logs,
        &mut device(&["tunnel", "-L", &format!("{TUNNEL}:echo")]),
    )?;
    tunnel.wait_listening(TUNNEL)?;
    let mut conn = TcpStream::connect(TUNNEL)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let msg = b"hello intranet, through scm\n";
    conn.write_all(msg)?;
    let mut echoed = vec![0u8; msg.len()];
    conn.read_exact(&mut echoed)?;
    ensure!(
        echoed == msg,
        "the echo back end returned {:?}",
        String::from_utf8_lossy(&echoed)
    );
    drop(conn);
    drop(tunnel);
    // The proxy counts a connection's bytes as they move and its close when the relay ends.
    let start = Instant::now();
    let after = loop {
        let m = scrape()?;
        if m.value("scm_proxy_connections_open") == 0.0 || start.elapsed() > Duration::from_secs(5)
        {
            break m;
        }
        sleep(Duration::from_millis(20));
    };
    let moved = |key: &str| after.value(key) - before.value(key);
    let handshakes = moved("scm_proxy_handshakes_total{result=\"ok\"}");
    let on_path = moved(&format!(
        "scm_proxy_tls_connections_total{{path=\"{}\"}}",
        path[0]
    ));
    let ok_replies = moved("scm_proxy_replies_total{status=\"ok\"}");
    let valid = moved("scm_proxy_validations_total{result=\"valid\"}");
    let up = moved("scm_proxy_bytes_total{direction=\"to_backend\"}");
    let down = moved("scm_proxy_bytes_total{direction=\"to_device\"}");
    ensure!(
        handshakes >= 1.0 && on_path >= 1.0 && ok_replies >= 1.0,
        "the proxy's counters did not move as a tunnel should move them: handshakes ok +{handshakes}, \
         {} path +{on_path}, preamble replies ok +{ok_replies}",
        path[0]
    );
    ensure!(
        valid >= 1.0,
        "the proxy served the tunnel without asking the Security server (validations valid +{valid})"
    );
    ensure!(
        up >= msg.len() as f64 && down >= msg.len() as f64,
        "the proxy relayed {up} bytes to the back end and {down} back; the message was {} bytes",
        msg.len()
    );
    println!(
        "    step 3: device -> proxy: TLS handshakes +{handshakes}, records on the {} path, \
         preamble accepted (scm_proxy_replies_total{{status=\"ok\"}} +{ok_replies})",
        path[0]
    );
    println!(
        "    steps 4-5: proxy -> Security server over mutual TLS: session validated \
         (scm_proxy_validations_total{{result=\"valid\"}} +{valid})"
    );
    println!(
        "    step 6: proxy <-> back end: {up} bytes up, {down} bytes down; the echo came back as {:?}",
        String::from_utf8_lossy(&echoed).trim()
    );

    header("http resource 'web': identity headers added by the proxy, session material stripped");
    let seen = step(&mut device(&["get", "http://web/hello"]), None)?;
    let seen: serde_json::Value = serde_json::from_str(&seen)
        .with_context(|| format!("the http back end's reply is not its JSON echo: {seen:?}"))?;
    let headers = seen["headers"]
        .as_object()
        .context("the http back end's echo has no headers")?;
    let user = headers.get("x-scm-user").and_then(|v| v.as_str());
    ensure!(
        user == Some("alice"),
        "the back end saw x-scm-user {user:?}, not alice"
    );
    let state = fs::read_to_string(dir.join("alice-phone.json"))?;
    let state: serde_json::Value = serde_json::from_str(&state)?;
    let session_id = state["session"]["session_id"]
        .as_str()
        .context("the device state has no session id")?;
    ensure!(
        !headers
            .values()
            .any(|v| v.as_str().is_some_and(|v| v.contains(session_id))),
        "a header the back end saw carries the session id"
    );
    let identity: Vec<String> = headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-scm-"))
        .map(|(k, v)| match v.as_str().unwrap_or_default() {
            // The signed assertion is a long JWT: its size says enough here.
            long if long.len() > 40 => format!("{k} ({} bytes)", long.len()),
            short => format!("{k}: {short}"),
        })
        .collect();
    println!(
        "    the back end received {} {} with {}; no header carried the session id",
        seen["method"].as_str().unwrap_or("?"),
        seen["path"].as_str().unwrap_or("?"),
        identity.join(", ")
    );

    header("app update: check, then fetch with sha256 verification");
    step(&mut device(&["update", "check"]), None)?;
    step(
        &mut device(&["update", "fetch", "--out", "mail-update.apk"]),
        None,
    )?;
    ensure!(
        fs::read(dir.join("mail-update.apk"))? == fs::read(dir.join("mail-1.1.0.apk"))?,
        "the fetched update differs from the published mail 1.1.0"
    );
    println!("    mail-update.apk is byte for byte the published mail 1.1.0");

    header("logout: the Security server revokes the session and tells every proxy");
    let revocations = |m: &Scrape| m.value("scm_proxy_revocations_total");
    let before = revocations(&scrape()?);
    step(&mut device(&["logout"]), None)?;
    // The revocation travels over the proxy's stream; it must arrive within a second.
    let start = Instant::now();
    loop {
        let now = revocations(&scrape()?);
        if now > before {
            println!(
                "    the proxy heard it after {} ms (scm_proxy_revocations_total {before} -> {now})",
                start.elapsed().as_millis()
            );
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(1),
            "the revocation did not reach the proxy within 1 s (scm_proxy_revocations_total \
             stayed {before})"
        );
        sleep(Duration::from_millis(10));
    }

    header("proxy metrics (excerpt)");
    let m = scrape()?;
    for name in [
        "scm_proxy_connections_total",
        "scm_proxy_cache_hits_total",
        "scm_proxy_replies_total",
        "scm_proxy_bytes_total",
    ] {
        for (key, value) in m.samples(name) {
            println!("    {key} {value}");
        }
    }
    drop(proxy);
    drop(backend);
    drop(sec);
    println!("\ndemo: workflow done; every process stopped");
    Ok(())
}

/// One scrape of the proxy's `/metrics`: each sample's name with its labels, and its value.
struct Scrape(std::collections::BTreeMap<String, f64>);

impl Scrape {
    /// The sample `key` (`name` or `name{label="value"}`), 0 when absent (a counter not yet
    /// incremented has no sample).
    fn value(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    /// The samples of metric `name`, in order.
    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a String, f64)> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(k, v)| (k, *v))
    }

    /// The values of label `label` on the samples of `name` that read 1 (an info-style gauge).
    fn labels_at_one(&self, name: &str, label: &str) -> Vec<String> {
        let prefix = format!("{label}=\"");
        self.samples(name)
            .filter(|(_, v)| *v == 1.0)
            .filter_map(|(k, _)| {
                let rest = &k[k.find(&prefix)? + prefix.len()..];
                Some(rest[..rest.find('"')?].to_owned())
            })
            .collect()
    }
}

/// Scrapes the proxy's Prometheus endpoint.
fn scrape() -> Result<Scrape> {
    let mut s = TcpStream::connect(PROXY_METRICS)
        .with_context(|| format!("connecting to the proxy's metrics at {PROXY_METRICS}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {PROXY_METRICS}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("the metrics reply has no body")?;
    let mut samples = std::collections::BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("a metrics line without a value: {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("a metrics line with a bad value: {line:?}"))?;
        samples.insert(key.to_owned(), value);
    }
    Ok(Scrape(samples))
}
