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

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use scm_e2e::hosts::{
    BACKEND_PORT, ControlPlane, DeviceTunnel, Lan, RemoveOnDrop, connect, echo, kill_host, spread,
    start_backend, start_proxy, wait_tcp, which,
};
use scm_e2e::stack::{Proc, tail};
use scm_netns::skip;

const VIP: &str = "10.77.0.2";
const DEVICE: &str = "10.77.0.10";
const PROXIES: [&str; 3] = ["10.77.0.11", "10.77.0.12", "10.77.0.13"];
const ROLES: [&str; 3] = ["p1", "p2", "p3"];
const SECURITY: &str = "10.77.0.20";
const BACKEND: &str = "10.77.0.30";
/// HAProxy's check interval; a host is out after `FALL` failed checks in a row.
const CHECK_INTERVAL: Duration = Duration::from_millis(300);
const FALL: u32 = 2;

/// When a device connection was made, and which host served it (or why it failed).
type Attempt = (Instant, Result<String, String>);

/// One proxy host's `scm-proxy serve --workers 2`, behind the balancer.
fn proxy_host(lan: &Lan, i: usize, cp: &ControlPlane, dir: &Path, pins: &Path) -> Proc {
    let pin_dir = pins.join(ROLES[i]).to_string_lossy().into_owned();
    std::fs::create_dir_all(pins).unwrap();
    let listen = format!("{}:9443", PROXIES[i]);
    // --conn-rate 0: every connection comes from the balancer's address, which the XDP
    // shield's per-source connection rate would throttle.
    let extra = [
        "--proxy-protocol-from",
        VIP,
        "--conn-rate",
        "0",
        "--workers",
        "2",
        "--pin-dir",
        &pin_dir,
    ];
    let mut p = start_proxy(lan, ROLES[i], &listen, cp, &extra, dir).expect("scm-proxy");
    wait_tcp(lan.ns(ROLES[i]), &listen, &mut p).expect("the proxy host listens");
    p
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
    let dir = tempfile::Builder::new()
        .prefix("scm-farm-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        d.file_name().unwrap().to_string_lossy()
    ));
    let _unpin = RemoveOnDrop(pins.clone());
    let lan = Lan::create(
        "scm-farm-",
        &[
            ("device", DEVICE),
            ("lb", VIP),
            ("p1", PROXIES[0]),
            ("p2", PROXIES[1]),
            ("p3", PROXIES[2]),
            ("security", SECURITY),
            ("backend", BACKEND),
        ],
    )
    .expect("the hosts");
    let mut sans = vec![VIP];
    sans.extend(PROXIES);
    let backend = format!("{BACKEND}:{BACKEND_PORT}");
    let cp = ControlPlane::start(
        &lan,
        "security",
        SECURITY,
        &sans,
        &format!("{VIP}:9443"),
        &backend,
        d,
    )
    .expect("the Security host");
    start_backend(lan.ns("backend"), BACKEND).expect("the back end");

    // Three proxy hosts and the balancer.
    let mut proxies: Vec<Proc> = (0..3).map(|i| proxy_host(&lan, i, &cp, d, &pins)).collect();
    let cfg = haproxy_config(d);
    let mut hap = lan.ns("lb").exec(&haproxy.to_string_lossy());
    hap.args(["-f", &cfg.to_string_lossy(), "-db"]);
    let mut balancer = Proc::spawn("haproxy", &mut hap, d.join("haproxy.log")).unwrap();
    wait_tcp(lan.ns("lb"), &format!("{VIP}:9443"), &mut balancer).unwrap();

    // The device host: enrolled, logged in, a local tunnel to `whoami` through the VIP.
    let tunnel = DeviceTunnel::start(&lan, "device", &cp, d).expect("the device host");
    let device = tunnel.ns.as_str();

    // 1. The spread: 150 new connections, a third each within ±15%.
    let n = 150;
    let served = spread(device, n);
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
        let (stop, log, device) = (stop.clone(), log.clone(), device.to_owned());
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
    proxies[1] = proxy_host(&lan, 1, &cp, d, &pins);
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
    drop(cp);
}
