//! Network namespaces as hosts on one bridge, with the real binaries started on them: the
//! topology of the farm tests (`tests/farm.rs` behind HAProxy on this host, `tests/farm_ipvs.rs`
//! behind IPVS in the guest kernel).
//!
//! - [`Lan`]: one namespace per host, each with `eth0` on a bridge that lives in a namespace of
//!   its own, all removed on drop.
//! - [`ControlPlane`]: certificates, a Security server on its host with a user, a `whoami` tcp
//!   resource and the site's proxy URL; [`Backend`]: the `whoami` back end, which answers each
//!   connection with the address it came from (the proxy host that relayed it), then echoes.
//! - [`start_proxy`] a `scm-proxy serve` on a host, [`DeviceTunnel`] an enrolled, logged-in
//!   `scm-device tunnel` on the device host, [`connect`] one device connection through it.
//!
//! Processes that load eBPF are spawned from a thread inside their namespace rather than with
//! `ip netns exec`, which mounts a fresh `/sys` without the bpffs the supervisor pins in.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use scm_netns::{End, Netns, in_netns, veth};

use crate::stack::{Proc, binaries};

/// The password of the test user.
pub const PASSWORD: &str = "farm-Passw0rd!";
/// The device host's local tunnel port.
pub const TUNNEL: &str = "127.0.0.1:7100";
/// The `whoami` back end's port.
pub const BACKEND_PORT: u16 = 7000;

/// Hosts on one bridge, in a /24.
pub struct Lan {
    hosts: BTreeMap<&'static str, Netns>,
    // Dropped last: the hosts' veth peers live in it.
    _switch: Netns,
}

impl Lan {
    /// Creates `hosts` (name, address) under names starting with `prefix` (stale ones of dead
    /// runs removed first).
    pub fn create(prefix: &str, hosts: &[(&'static str, &str)]) -> Result<Self> {
        scm_netns::remove_stale(prefix);
        let base = scm_netns::unique_base(prefix);
        let switch = Netns::create(format!("{base}-sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut made = BTreeMap::new();
        for (i, (role, ip)) in hosts.iter().enumerate() {
            let ns = Netns::create(format!("{base}-{role}"))?;
            let port = format!("s{i}");
            let addr = format!("{ip}/24");
            veth(
                End {
                    ns: &switch,
                    dev: &port,
                    addrs: &[],
                },
                End {
                    ns: &ns,
                    dev: "eth0",
                    addrs: &[&addr],
                },
            )?;
            switch.ip(&["link", "set", &port, "master", "br0"])?;
            made.insert(*role, ns);
        }
        Ok(Self {
            hosts: made,
            _switch: switch,
        })
    }

    /// The host `role`.
    pub fn ns(&self, role: &str) -> &Netns {
        &self.hosts[role]
    }
}

/// Waits (up to 60 s) until `addr` accepts TCP inside namespace `ns`, failing with `proc`'s log
/// if it exits first.
pub fn wait_tcp(ns: &str, addr: &str, proc: &mut Proc) -> Result<()> {
    let target = addr.parse()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = in_netns(ns, || {
            TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
        })?;
        if up {
            return Ok(());
        }
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} in {ns} after 60 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `program args` in `ns` to completion with `stdin`; its stdout.
pub fn run_in(ns: &Netns, program: &Path, args: &[&str], stdin: &str) -> Result<String> {
    let mut child = ns
        .exec(&program.to_string_lossy())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Spawns `cmd` from a thread inside `ns`, its output in `log`.
pub fn spawn_in(ns: &str, name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
    in_netns(ns, || Proc::spawn(name, cmd, log))?
}

/// The Security host: certificates (naming `sans` too), a Security server, the user `alice`
/// (group `staff`), the tcp resource `whoami` at `backend`, and the site `main` with `proxy_url`.
pub struct ControlPlane {
    /// The Security server.
    pub security: Proc,
    /// Where the certificates are.
    pub certs: PathBuf,
    /// The Security server's address (device API on 8443, proxies' API on 8444).
    pub ip: String,
}

impl ControlPlane {
    /// Starts it on host `role` of `lan`, with files under `dir`.
    pub fn start(
        lan: &Lan,
        role: &str,
        ip: &str,
        sans: &[&str],
        proxy_url: &str,
        backend: &str,
        dir: &Path,
    ) -> Result<Self> {
        let bins = binaries();
        let ns = lan.ns(role);
        let certs = dir.join("certs");
        let certs_s = certs.to_string_lossy().into_owned();
        let mut args = vec!["dev-certs", "--out", &certs_s, "--san", ip];
        for s in sans {
            args.extend(["--san", s]);
        }
        run_in(ns, &bins.security, &args, "")?;
        let data = dir.join("data").to_string_lossy().into_owned();
        run_in(ns, &bins.security, &["init", "--data-dir", &data], "")?;
        let c = |f: &str| certs.join(f).to_string_lossy().into_owned();
        let mut cmd = ns.exec(&bins.security.to_string_lossy());
        cmd.args(["serve", "--data-dir", &data])
            .args(["--tls-cert", &c("security.pem")])
            .args(["--tls-key", &c("security.key")])
            .args(["--client-ca", &c("ca.pem")])
            .args(["--listen", &format!("{ip}:8443")])
            .args(["--proxy-listen", &format!("{ip}:8444")])
            .args(["--admin-listen", "127.0.0.1:8445"]);
        let mut security = Proc::spawn("scm-security", &mut cmd, dir.join("security.log"))?;
        wait_tcp(ns, "127.0.0.1:8445", &mut security)?;
        wait_tcp(ns, &format!("{ip}:8444"), &mut security)?;
        let (ca, token) = (c("ca.pem"), dir.join("data/admin.token"));
        let token = token.to_string_lossy();
        let admin = |args: &[&str], stdin: &str| {
            let mut all = vec!["admin", "--url", "https://127.0.0.1:8445", "--ca", &ca];
            all.extend(["--token-file", &token]);
            all.extend_from_slice(args);
            run_in(ns, &bins.security, &all, stdin)
        };
        let pw = format!("{PASSWORD}\n");
        admin(
            &[
                "users",
                "add",
                "alice",
                "--groups",
                "staff",
                "--password-stdin",
            ],
            &pw,
        )?;
        admin(
            &[
                "resources",
                "set",
                "whoami",
                "--address",
                backend,
                "--mode",
                "tcp",
                "--groups",
                "staff",
            ],
            "",
        )?;
        admin(&["sites", "set", "main", "--proxy-url", proxy_url], "")?;
        Ok(Self {
            security,
            certs,
            ip: ip.to_owned(),
        })
    }

    /// A certificate file's path, as a string.
    pub fn cert(&self, file: &str) -> String {
        self.certs.join(file).to_string_lossy().into_owned()
    }
}

/// `scm-proxy serve --listen LISTEN` on host `role` with mutual TLS to `cp`, plus `extra` flags.
pub fn start_proxy(
    lan: &Lan,
    role: &str,
    listen: &str,
    cp: &ControlPlane,
    extra: &[&str],
    dir: &Path,
) -> Result<Proc> {
    let mut cmd = Command::new(&binaries().proxy);
    cmd.args(["serve", "--listen", listen])
        .args(["--tls-cert", &cp.cert("proxy.pem")])
        .args(["--tls-key", &cp.cert("proxy.key")])
        .args(["--security-url", &format!("https://{}:8444", cp.ip)])
        .args(["--security-ca", &cp.cert("ca.pem")])
        .args(["--client-cert", &cp.cert("proxy-client.pem")])
        .args(["--client-key", &cp.cert("proxy-client.key")])
        .args(extra);
    spawn_in(
        lan.ns(role),
        "scm-proxy",
        &mut cmd,
        dir.join(format!("{role}.log")),
    )
}

/// The `whoami` back end on `ip`:[`BACKEND_PORT`] in `ns`, served by threads of this process.
pub fn start_backend(ns: &Netns, ip: &str) -> Result<()> {
    let ip = ip.to_owned();
    let listener = in_netns(ns, move || TcpListener::bind((ip.as_str(), BACKEND_PORT)))??;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let from = conn.peer_addr().map(|a| a.ip().to_string());
                let _ = writeln!(conn, "{}", from.unwrap_or_default());
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// On host `role`: `scm-device` enrolled and logged in as alice at `cp`, and its tunnel from
/// [`TUNNEL`] to `whoami`.
pub struct DeviceTunnel {
    /// The `scm-device tunnel` process.
    pub proc: Proc,
    /// The device host's namespace name.
    pub ns: String,
}

impl DeviceTunnel {
    /// Enrolls, logs in and starts the tunnel.
    pub fn start(lan: &Lan, role: &str, cp: &ControlPlane, dir: &Path) -> Result<Self> {
        let bins = binaries();
        let ns = lan.ns(role);
        let state = dir.join("alice.json").to_string_lossy().into_owned();
        let pw = format!("{PASSWORD}\n");
        let url = format!("https://{}:8443", cp.ip);
        let ca = cp.cert("ca.pem");
        let enroll = [
            "--state",
            &state,
            "enroll",
            "--security-url",
            &url,
            "--ca",
            &ca,
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
        ];
        run_in(ns, &bins.device, &enroll, &pw)?;
        run_in(ns, &bins.device, &["--state", &state, "login"], &pw)?;
        let mut cmd = ns.exec(&bins.device.to_string_lossy());
        cmd.args([
            "--state",
            &state,
            "tunnel",
            "-L",
            &format!("{TUNNEL}:whoami"),
        ]);
        let mut proc = Proc::spawn("scm-device", &mut cmd, dir.join("tunnel.log"))?;
        wait_tcp(ns, TUNNEL, &mut proc)?;
        Ok(Self {
            proc,
            ns: ns.name().to_owned(),
        })
    }
}

/// A device connection through the tunnel on `device_ns`: the proxy host that relayed it (the
/// back end's first line), and the open stream.
pub fn connect(device_ns: &str) -> Result<(String, TcpStream), String> {
    let stream = in_netns(device_ns, || TcpStream::connect(TUNNEL))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect to the tunnel: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.try_clone().map_err(|e| e.to_string())?)
        .read_line(&mut line)
        .map_err(|e| format!("reading the back end's line: {e}"))?;
    if line.is_empty() {
        return Err("closed before the back end answered".into());
    }
    Ok((line.trim().to_owned(), stream))
}

/// Writes `what` and expects it echoed.
pub fn echo(stream: &mut TcpStream, what: &str) {
    stream.write_all(what.as_bytes()).expect("write");
    let mut got = vec![0u8; what.len()];
    stream.read_exact(&mut got).expect("echo");
    assert_eq!(got, what.as_bytes());
}

/// `n` new device connections: how many each proxy host served.
pub fn spread(device_ns: &str, n: usize) -> BTreeMap<String, usize> {
    let mut served = BTreeMap::new();
    for i in 0..n {
        let (host, _s) = connect(device_ns).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        *served.entry(host).or_default() += 1;
    }
    served
}

/// SIGKILLs every process in namespace `ns`; how many there were.
pub fn kill_host(ns: &Netns) -> usize {
    let pids = scm_netns::ip(&["netns", "pids", ns]).unwrap_or_default();
    let pids: Vec<i32> = pids
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for &pid in &pids {
        // SAFETY: kill(2) with a pid `ip netns pids` listed; a pid reused in between could only
        // be another process in this test's own namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    pids.len()
}

/// A directory removed however the test ends (the proxies' pins, whose programs would
/// otherwise stay loaded).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}
