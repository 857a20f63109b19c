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

/// A started child that is killed on drop, with its log file for when it fails.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(name: &'static str, dir: &Path, cmd: &mut Command) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
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

/// Runs the workflow demo.
pub fn run() -> Result<()> {
    cmd::cargo(&[
        "build",
        "--locked",
        "-p",
        "scm-security",
        "-p",
        "scm-proxy",
        "-p",
        "scm-device",
        "-p",
        "scm-e2e",
        "--bin",
        "scm-security",
        "--bin",
        "scm-proxy",
        "--bin",
        "scm-device",
        "--bin",
        "scm-backend",
    ])?;
    let bin = cmd::target_dir().join("debug");
    let dir = cmd::target_dir().join(format!("demo-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let result = workflow(&bin, &dir);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn workflow(bin: &Path, dir: &Path) -> Result<()> {
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
        dir,
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
        dir,
        Command::new(bin.join("scm-backend")).args(["--echo", ECHO, "--http", HTTP]),
    )?;
    backend.wait_listening(ECHO)?;
    backend.wait_listening(HTTP)?;

    header("proxy: device TLS, mutual TLS to the Security server");
    let mut proxy = Service::start(
        "scm-proxy",
        dir,
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
    let tls_path = metric_lines("scm_proxy_tls_path")?;
    println!("    record encryption: {}", tls_path.join(", "));

    header("device: enrollment (TLS to the Security server; it issues the 256-bit shared key)");
    step(
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

    header(
        "steps 1-2: device -> Security server over TLS; login = password + MAC over a challenge",
    );
    step(&mut device(&["login"]), None)?;

    header("steps 3-6: a tunnel to resource 'echo' through the proxy");
    let mut tunnel = Service::start(
        "scm-device-tunnel",
        dir,
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
    let validations = metric_lines("scm_proxy_validations_total")?;
    println!(
        "    step 3: device -> proxy: TLS 1.3, preamble (session id, app context, resource, MAC over the TLS exporter)"
    );
    println!(
        "    step 4: proxy -> Security server over mutual TLS: validate the session ({})",
        validations.join(", ")
    );
    println!(
        "    step 5: Security server -> proxy: valid, user alice, groups, session key; binding, app and group checks pass"
    );
    println!(
        "    step 6: proxy <-> back end: sent and got back {:?}",
        String::from_utf8_lossy(&echoed).trim()
    );
    drop(conn);
    drop(tunnel);

    header("http resource 'web': identity headers added by the proxy, session material stripped");
    step(&mut device(&["get", "http://web/hello"]), None)?;

    header("app update: check, then fetch with sha256 verification");
    step(&mut device(&["update", "check"]), None)?;
    step(
        &mut device(&["update", "fetch", "--out", "mail-update.apk"]),
        None,
    )?;

    header("logout: the Security server revokes the session and tells every proxy");
    step(&mut device(&["logout"]), None)?;
    // The revocation travels over the proxy's stream; it must arrive within a second.
    let start = Instant::now();
    let heard = loop {
        let lines = metric_lines("scm_proxy_revocations_total")?;
        let n: f64 = lines
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if n >= 1.0 || start.elapsed() > Duration::from_secs(2) {
            break lines;
        }
        sleep(Duration::from_millis(20));
    };
    println!(
        "    proxy heard it within {} ms: {}",
        start.elapsed().as_millis(),
        heard.join(", ")
    );

    header("proxy metrics (excerpt)");
    for name in [
        "scm_proxy_connections_total",
        "scm_proxy_cache_hits_total",
        "scm_proxy_replies_total",
        "scm_proxy_bytes_total",
    ] {
        for line in metric_lines(name)? {
            println!("    {line}");
        }
    }
    drop(proxy);
    drop(backend);
    drop(sec);
    println!("\ndemo: workflow done; every process stopped");
    Ok(())
}

/// The sample lines of one metric from the proxy's Prometheus endpoint.
fn metric_lines(name: &str) -> Result<Vec<String>> {
    let mut s = TcpStream::connect(PROXY_METRICS)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {PROXY_METRICS}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}
