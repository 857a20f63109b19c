//! A proxy farm behind HAProxy (TCP mode, PROXY protocol v2), with network namespaces as hosts
//! on one bridge: a device host, a balancer host, three proxy hosts (each a real
//! `scm-proxy serve --workers 2` behind its eBPF steering), a Security host and a back-end host.
//!
//! - New connections spread over the three proxies (each gets its share within ±15%).
//! - Every process of one proxy host is SIGKILLed while devices keep opening connections: the
//!   balancer's health check takes the host out, new connections go to the other two, the
//!   connections open on the other two are untouched, and the failed device connections are
//!   counted and bounded.
//! - The host comes back (its supervisor adopting its pinned programs) and gets traffic again.
//! - The proxies see each device's own address (the PROXY header), never the balancer's.
//!
//! The back end answers each connection with the address it came from (the proxy host that
//! relayed it), then echoes: that is how the test knows which host served a connection.
//! Needs root, iproute2 and haproxy (`cargo xtask setup` installs it); skips loudly outside CI and
//! fails under CI when one is missing.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use scm_e2e::stack::{Proc, binaries, tail};
use scm_netns::{End, Netns, in_netns, skip, veth};

const PREFIX: &str = "scm-farm-";
const VIP: &str = "10.77.0.2";
const DEVICE: &str = "10.77.0.10";
const PROXIES: [&str; 3] = ["10.77.0.11", "10.77.0.12", "10.77.0.13"];
const SECURITY: &str = "10.77.0.20";
const BACKEND: &str = "10.77.0.30";
const PASSWORD: &str = "farm-Passw0rd!";
/// The device's local tunnel port (inside the device host).
const TUNNEL: &str = "127.0.0.1:7100";
/// HAProxy's check interval; a host is out after `FALL` failed checks in a row.
const CHECK_INTERVAL: Duration = Duration::from_millis(300);
const FALL: u32 = 2;

/// The hosts: namespaces on one bridge (in a namespace of its own), addressed in 10.77.0.0/24.
struct Lan {
    hosts: BTreeMap<&'static str, Netns>,
    // Dropped last: the hosts' veth peers live in it.
    _switch: Netns,
}

impl Lan {
    fn create() -> Self {
        scm_netns::remove_stale(PREFIX);
        let base = scm_netns::unique_base(PREFIX);
        let switch = Netns::create(format!("{base}-sw")).expect("switch namespace");
        switch
            .ip(&["link", "add", "br0", "type", "bridge"])
            .expect("bridge");
        switch.ip(&["link", "set", "br0", "up"]).expect("bridge up");
        let mut hosts = BTreeMap::new();
        let all = [
            ("device", DEVICE),
            ("lb", VIP),
            ("p1", PROXIES[0]),
            ("p2", PROXIES[1]),
            ("p3", PROXIES[2]),
            ("security", SECURITY),
            ("backend", BACKEND),
        ];
        for (i, (role, ip)) in all.into_iter().enumerate() {
            let ns = Netns::create(format!("{base}-{role}")).expect("host namespace");
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
            )
            .expect("veth to the switch");
            switch
                .ip(&["link", "set", &port, "master", "br0"])
                .expect("port on the bridge");
            hosts.insert(role, ns);
        }
        Self {
            hosts,
            _switch: switch,
        }
    }

    fn ns(&self, role: &str) -> &Netns {
        &self.hosts[role]
    }
}

/// Waits until `addr` accepts TCP inside namespace `ns`.
fn wait_tcp(ns: &str, addr: &str, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = in_netns(ns, || {
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).is_ok()
        })
        .unwrap();
        if up {
            return;
        }
        proc.check_alive().unwrap();
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr} in {ns}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn run_in(ns: &Netns, program: &Path, args: &[&str], stdin: &str) -> String {
    let mut child = ns
        .exec(&program.to_string_lossy())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The back end: each connection is told the address it came from, then echoed.
fn start_backend(ns: &Netns) {
    let listener = in_netns(ns, || TcpListener::bind((BACKEND, 7000)))
        .unwrap()
        .expect("back end listener");
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
}

/// A device connection through the tunnel: which proxy host served it, and the open stream.
fn connect(device: &str) -> Result<(String, TcpStream), String> {
    let stream = in_netns(device, || TcpStream::connect(TUNNEL))
        .unwrap()
        .map_err(|e| format!("connect to the tunnel: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .map_err(|e| format!("reading the back end's line: {e}"))?;
    if line.is_empty() {
        return Err("closed before the back end answered".into());
    }
    Ok((line.trim().to_owned(), stream))
}

fn echo(stream: &mut TcpStream, what: &str) {
    stream.write_all(what.as_bytes()).expect("write");
    let mut got = vec![0u8; what.len()];
    stream.read_exact(&mut got).expect("echo");
    assert_eq!(got, what.as_bytes());
}

/// When a device connection was made, and which host served it (or why it failed).
type Attempt = (Instant, Result<String, String>);

/// One proxy host's `scm-proxy serve --workers 2`.
fn start_proxy(lan: &Lan, role: &str, ip: &str, dir: &Path, pin_dir: &Path) -> Proc {
    let c = |f: &str| dir.join("certs").join(f).to_string_lossy().into_owned();
    // Spawned from a thread inside the host's namespace rather than with `ip netns exec`,
    // which mounts a fresh /sys without the bpffs the supervisor pins in.
    let mut cmd = std::process::Command::new(&binaries().proxy);
    cmd.args(["serve", "--listen", &format!("{ip}:9443")])
        .args(["--tls-cert", &c("proxy.pem"), "--tls-key", &c("proxy.key")])
        .args(["--security-url", &format!("https://{SECURITY}:8444")])
        .args(["--security-ca", &c("ca.pem")])
        .args(["--client-cert", &c("proxy-client.pem")])
        .args(["--client-key", &c("proxy-client.key")])
        .args(["--proxy-protocol-from", VIP])
        // Every connection comes from the balancer's address: the XDP shield's per-source
        // connection rate would throttle the balancer itself.
        .args(["--conn-rate", "0"])
        .args(["--workers", "2"])
        .arg("--pin-dir")
        .arg(pin_dir);
    std::fs::create_dir_all(pin_dir.parent().unwrap()).unwrap();
    let log = dir.join(format!("{role}.log"));
    in_netns(lan.ns(role), || Proc::spawn("scm-proxy", &mut cmd, log))
        .unwrap()
        .expect("scm-proxy")
}

/// The HAProxy configuration docs/operations.md documents, as it is: the test runs the doc.
fn haproxy_config(dir: &Path) -> PathBuf {
    let doc = scm_e2e::stack::workspace_root().join("docs/operations.md");
    let text = std::fs::read_to_string(&doc).expect("docs/operations.md");
    let marker = text
        .find("<!-- haproxy-farm-config")
        .expect("the haproxy-farm-config marker in docs/operations.md");
    let rest = &text[marker..];
    let start = rest
        .find("```haproxy\n")
        .expect("a haproxy block after the marker")
        + 11;
    let len = rest[start..]
        .find("```")
        .expect("the end of the haproxy block");
    let cfg = &rest[start..start + len];
    // The test's topology is the doc's: its addresses and check timing must be there.
    for must in [
        format!("bind {VIP}:9443"),
        format!("inter {}ms fall {FALL}", CHECK_INTERVAL.as_millis()),
    ]
    .iter()
    .chain(&PROXIES.map(|p| format!("{p}:9443 send-proxy-v2 check")))
    {
        assert!(
            cfg.contains(must.as_str()),
            "the documented config lacks {must:?}:\n{cfg}"
        );
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// SIGKILLs every process in namespace `ns` (the supervisor and its workers).
fn kill_host(ns: &Netns) -> usize {
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

#[test]
fn a_farm_behind_haproxy_spreads_survives_a_dead_host_and_takes_it_back() {
    if !scm_netns::is_root() {
        skip::skip("farm", "root", "network namespaces and eBPF");
        return;
    }
    let Some(haproxy) = which("haproxy") else {
        skip::skip("farm", "haproxy", "`cargo xtask setup` installs it");
        return;
    };
    let bins = binaries();
    let dir = tempfile::Builder::new()
        .prefix("scm-farm-")
        .tempdir()
        .unwrap();
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        dir.path().file_name().unwrap().to_string_lossy()
    ));
    let _unpin = RemoveOnDrop(pins.clone());
    let lan = Lan::create();
    let d = dir.path();
    let admin = |args: &[&str], stdin: &str| {
        let (ca, token) = (d.join("certs/ca.pem"), d.join("data/admin.token"));
        let (ca, token) = (ca.to_string_lossy(), token.to_string_lossy());
        let mut all = vec!["admin", "--url", "https://127.0.0.1:8445", "--ca", &ca];
        all.extend(["--token-file", &token]);
        all.extend_from_slice(args);
        run_in(lan.ns("security"), &binaries().security, &all, stdin);
    };
    // The Security host.
    let certs = d.join("certs").to_string_lossy().into_owned();
    let mut san = vec![
        "dev-certs",
        "--out",
        &certs,
        "--san",
        VIP,
        "--san",
        SECURITY,
    ];
    for p in PROXIES {
        san.extend(["--san", p]);
    }
    run_in(lan.ns("security"), &bins.security, &san, "");
    let data = d.join("data").to_string_lossy().into_owned();
    run_in(
        lan.ns("security"),
        &bins.security,
        &["init", "--data-dir", &data],
        "",
    );
    let c = |f: &str| d.join("certs").join(f).to_string_lossy().into_owned();
    let mut cmd = lan.ns("security").exec(&bins.security.to_string_lossy());
    cmd.args(["serve", "--data-dir", &data])
        .args([
            "--tls-cert",
            &c("security.pem"),
            "--tls-key",
            &c("security.key"),
        ])
        .args(["--client-ca", &c("ca.pem")])
        .args(["--listen", &format!("{SECURITY}:8443")])
        .args(["--proxy-listen", &format!("{SECURITY}:8444")])
        .args(["--admin-listen", "127.0.0.1:8445"]);
    let mut security = Proc::spawn("scm-security", &mut cmd, d.join("security.log")).unwrap();
    wait_tcp(lan.ns("security"), "127.0.0.1:8445", &mut security);
    wait_tcp(
        lan.ns("security"),
        &format!("{SECURITY}:8444"),
        &mut security,
    );
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
    );
    let whoami = format!("{BACKEND}:7000");
    admin(
        &[
            "resources",
            "set",
            "whoami",
            "--address",
            &whoami,
            "--mode",
            "tcp",
            "--groups",
            "staff",
        ],
        "",
    );
    admin(
        &[
            "sites",
            "set",
            "main",
            "--proxy-url",
            &format!("{VIP}:9443"),
        ],
        "",
    );
    start_backend(lan.ns("backend"));

    // Three proxy hosts and the balancer.
    let mut proxies: Vec<Proc> = ["p1", "p2", "p3"]
        .iter()
        .zip(PROXIES)
        .map(|(role, ip)| start_proxy(&lan, role, ip, d, &pins.join(role)))
        .collect();
    for ((role, ip), p) in ["p1", "p2", "p3"].iter().zip(PROXIES).zip(&mut proxies) {
        wait_tcp(lan.ns(role), &format!("{ip}:9443"), p);
    }
    let cfg = haproxy_config(d);
    let mut hap = lan.ns("lb").exec(&haproxy.to_string_lossy());
    hap.args(["-f", &cfg.to_string_lossy(), "-db"]);
    let mut balancer = Proc::spawn("haproxy", &mut hap, d.join("haproxy.log")).unwrap();
    wait_tcp(lan.ns("lb"), &format!("{VIP}:9443"), &mut balancer);

    // The device host: enrolled, logged in, a local tunnel to `whoami` through the VIP.
    let state = d.join("alice.json").to_string_lossy().into_owned();
    let dev = |args: &[&str], stdin: &str| {
        let mut all = vec!["--state", state.as_str()];
        all.extend_from_slice(args);
        run_in(lan.ns("device"), &bins.device, &all, stdin)
    };
    let url = format!("https://{SECURITY}:8443");
    dev(
        &[
            "enroll",
            "--security-url",
            &url,
            "--ca",
            &c("ca.pem"),
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
        ],
        &pw,
    );
    dev(&["login"], &pw);
    let mut tcmd = lan.ns("device").exec(&bins.device.to_string_lossy());
    tcmd.args([
        "--state",
        &state,
        "tunnel",
        "-L",
        &format!("{TUNNEL}:whoami"),
    ]);
    let mut tunnel = Proc::spawn("scm-device", &mut tcmd, d.join("tunnel.log")).unwrap();
    wait_tcp(lan.ns("device"), TUNNEL, &mut tunnel);
    let device = lan.ns("device");

    // 1. The spread: 150 new connections, a third each within ±15%.
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let n = 150;
    for i in 0..n {
        let (host, _s) = connect(device).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        *served.entry(host).or_default() += 1;
    }
    for ip in PROXIES {
        let share = served.get(ip).copied().unwrap_or(0) as f64 / n as f64;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.15 / 3.0 + 1e-9,
            "{ip} served {share:.3} of {n}: {served:?}"
        );
    }
    eprintln!("farm: {n} new connections served by {served:?}");
    // The proxies saw the device host's address, never the balancer's.
    let p1_log = std::fs::read_to_string(d.join("p1.log")).unwrap();
    assert!(
        p1_log.contains(&format!("peer={DEVICE}:")),
        "{}",
        tail(&d.join("p1.log"), 20)
    );
    assert!(!p1_log.contains(&format!("peer={VIP}:")));

    // 2. Long-lived connections on every host, then load while p2 dies.
    let mut open: Vec<(String, TcpStream)> = Vec::new();
    while PROXIES.iter().any(|ip| !open.iter().any(|(h, _)| h == ip)) && open.len() < 30 {
        open.push(connect(device).expect("a long-lived connection"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let load = {
        let (stop, log, device) = (stop.clone(), log.clone(), device.name().to_owned());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = connect(&device).map(|(h, _)| h);
                log.lock().unwrap().push((Instant::now(), r));
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    let killed = kill_host(lan.ns("p2"));
    assert!(
        killed >= 3,
        "p2 had {killed} processes (a supervisor and two workers expected)"
    );
    thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let log = log.lock().unwrap();
    let window = CHECK_INTERVAL * (FALL + 2);
    let failed: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    let after: Vec<_> = log
        .iter()
        .filter(|(t, _)| *t > killed_at + window)
        .collect();
    assert!(
        after.len() > 20,
        "too few connections after the health-check window: {}",
        after.len()
    );
    for (t, r) in &after {
        match r {
            Ok(h) => assert_ne!(
                h,
                PROXIES[1],
                "p2 served at {:?} after the kill",
                t.duration_since(killed_at)
            ),
            Err(e) => panic!(
                "a failed connection {:?} after the kill, past the check window: {e}",
                t.duration_since(killed_at)
            ),
        }
    }
    eprintln!(
        "farm: {} connections during the kill, {} failed (HAProxy retries and redispatches refused connects)",
        log.len(),
        failed.len()
    );
    assert!(
        failed.len() <= 5,
        "{} of {} failed: {failed:?}",
        failed.len(),
        log.len()
    );
    for (i, (host, s)) in open.iter_mut().enumerate() {
        if host != PROXIES[1] {
            echo(s, &format!("still up {i}"));
        }
    }

    // 3. p2 back: its supervisor adopts the pinned programs, the balancer's checks take it in.
    proxies[1] = start_proxy(&lan, "p2", PROXIES[1], d, &pins.join("p2"));
    wait_tcp(
        lan.ns("p2"),
        &format!("{}:9443", PROXIES[1]),
        &mut proxies[1],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if connect(device).is_ok_and(|(h, _)| h == PROXIES[1]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "p2 got no traffic 10 s after it came back"
        );
        thread::sleep(Duration::from_millis(50));
    }
    drop(tunnel);
    drop(balancer);
    drop(proxies);
    drop(security);
}

/// Removes the proxies' pins (whose programs would otherwise stay loaded) however the test ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}
