//! A proxy farm behind Linux IPVS in direct-routing mode: the director forwards each new
//! connection to a proxy host by rewriting its MAC, the device's own address arrives at the
//! proxy as it is, and the proxy answers the device straight, from the VIP it holds on its
//! loopback (ARP for it silenced). The health checker is the one docs/operations.md documents
//! (a shell loop: a TCP connect to each proxy host, `ipvsadm -e ... -w 0|1`), run as it is.
//!
//! Network namespaces as hosts on one bridge: a device host, the director, two proxy hosts
//! (`scm-proxy serve --workers 1` each), a Security host and a back end. New connections spread
//! over both proxy hosts; the director never sees a reply; every process of one proxy host is
//! SIGKILLed and, within the checker's interval, new connections go to the other; it comes back
//! and gets traffic again.
//!
//! This host's kernel has no IPVS; Debian's has it. Unless the kernel here has IPVS, the binary
//! re-runs itself inside Debian 12's 6.1 kernel under qemu (`scm_guest`) and reports the guest's
//! result as its own (skipping loudly outside CI, failing under CI, when the guest cannot boot).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use scm_e2e::hosts::{
    BACKEND_PORT, ControlPlane, DeviceTunnel, Lan, RemoveOnDrop, connect, echo, kill_host, spread,
    start_backend, start_proxy, wait_tcp, which,
};
use scm_e2e::stack::{Proc, binaries, workspace_root};
use scm_netns::{Netns, in_netns};

/// Set inside the guest: run the test here.
const IN_GUEST: &str = "SCM_IPVS_IN_GUEST";
const NAME: &str = "a_farm_behind_ipvs_direct_routing_spreads_and_survives_a_dead_host";

const VIP: &str = "10.88.0.100";
const DIRECTOR: &str = "10.88.0.2";
const DEVICE: &str = "10.88.0.10";
const PROXIES: [&str; 2] = ["10.88.0.11", "10.88.0.12"];
const ROLES: [&str; 2] = ["rs1", "rs2"];
const SECURITY: &str = "10.88.0.20";
const BACKEND: &str = "10.88.0.30";
/// The tools the test and the documented checker run, copied into the guest.
const TOOLS: &[&str] = &["ip", "ipvsadm", "bash", "timeout", "sleep"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return ExitCode::SUCCESS;
    }
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !NAME.contains(a.as_str()))
    {
        println!("\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out");
        return ExitCode::SUCCESS;
    }
    if !scm_netns::is_root() {
        scm_netns::skip::skip(NAME, "root", "network namespaces, eBPF and IPVS");
        return ExitCode::SUCCESS;
    }
    if std::env::var_os(IN_GUEST).is_some() || host_has_ipvs() {
        let ok = std::panic::catch_unwind(farm_behind_ipvs).is_ok();
        println!("test {NAME} ... {}", if ok { "ok" } else { "FAILED" });
        let (p, f) = if ok { (1, 0) } else { (0, 1) };
        let word = if ok { "ok" } else { "FAILED" };
        println!("\ntest result: {word}. {p} passed; {f} failed; 0 ignored; 0 measured");
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    in_the_guest()
}

/// Whether this kernel has IPVS (its sysctl directory appears once the module is in).
fn host_has_ipvs() -> bool {
    let _ = Command::new("modprobe")
        .arg("ip_vs")
        .stderr(Stdio::null())
        .status();
    Path::new("/proc/sys/net/ipv4/vs").is_dir()
}

fn in_the_guest() -> ExitCode {
    let guest = match scm_guest::Guest::new() {
        Ok(g) => g,
        Err(e) if e.is_unavailable() => {
            scm_netns::skip::skip(
                NAME,
                "qemu, busybox, cpio and the Debian kernel package (cargo xtask setup)",
                &e.to_string(),
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => panic!("the guest kernel cannot be prepared: {e}"),
    };
    let exe = std::env::current_exe().expect("current_exe");
    let bins = binaries();
    let dir = bins
        .proxy
        .parent()
        .expect("the binaries' directory")
        .to_owned();
    let mut guest = guest
        .file(&exe)
        .file(&bins.security)
        .file(&bins.proxy)
        .file(&bins.device)
        .file(workspace_root().join("docs/operations.md"))
        .modules(&["veth", "bridge", "ip_vs", "ip_vs_rr"])
        .env(IN_GUEST, "1")
        .env("SCM_E2E_BIN_DIR", &dir.to_string_lossy())
        .env("RUST_BACKTRACE", "1")
        .memory_mib(2048)
        .cpus(2)
        .timeout(Duration::from_secs(540));
    for tool in TOOLS {
        match which(tool) {
            Some(path) => guest = guest.file(path),
            None => {
                scm_netns::skip::skip(NAME, tool, "`cargo xtask setup` installs it");
                return ExitCode::SUCCESS;
            }
        }
    }
    if scm_netns::skip::ci() {
        guest = guest.env("CI", "true");
    }
    println!(
        "running {NAME} in the guest kernel {}",
        guest.kernel_release()
    );
    let run = guest
        .run(&[exe.as_os_str(), OsStr::new(NAME)])
        .unwrap_or_else(|e| panic!("the guest run failed: {e}"));
    println!(
        "--- guest ({}) ---\n{}",
        run.kernel_release,
        run.output.trim_end()
    );
    println!("--- guest exit code {} ---", run.exit_code);
    if run.exit_code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes a per-namespace sysctl from a thread inside the namespace (`/proc/sys/net` is the
/// reading task's namespace's).
fn sysctl(ns: &Netns, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(ns, || std::fs::write(&path, value))
        .unwrap()
        .unwrap_or_else(|e| panic!("{path} = {value} in {ns}: {e}"));
}

fn ipvsadm(director: &Netns, args: &[&str]) -> String {
    let out = director
        .exec("ipvsadm")
        .args(args)
        .output()
        .expect("ipvsadm");
    assert!(
        out.status.success(),
        "ipvsadm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The health checker docs/operations.md documents, as it is.
fn documented_checker() -> String {
    // The guest has the file at the host's path.
    let doc = workspace_root().join("docs/operations.md");
    let text = std::fs::read_to_string(&doc).expect("docs/operations.md");
    let marker = text
        .find("<!-- ipvs-checker")
        .expect("the ipvs-checker marker in docs/operations.md");
    let rest = &text[marker..];
    let start = rest.find("```sh\n").expect("a sh block after the marker") + 6;
    let len = rest[start..].find("```").expect("the end of the sh block");
    let script = rest[start..start + len].to_owned();
    for must in [VIP, PROXIES[0], PROXIES[1], "ipvsadm -e"] {
        assert!(
            script.contains(must),
            "the documented checker lacks {must:?}:\n{script}"
        );
    }
    script
}

fn farm_behind_ipvs() {
    let dir = tempfile::Builder::new()
        .prefix("scm-ipvs-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        d.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&pins).unwrap();
    let _unpin = RemoveOnDrop(pins.clone());
    let lan = Lan::create(
        "scm-ipvs-",
        &[
            ("device", DEVICE),
            ("director", DIRECTOR),
            ("rs1", PROXIES[0]),
            ("rs2", PROXIES[1]),
            ("security", SECURITY),
            ("backend", BACKEND),
        ],
    )
    .expect("the hosts");
    let backend = format!("{BACKEND}:{BACKEND_PORT}");
    let mut sans = vec![VIP];
    sans.extend(PROXIES);
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

    // The proxy hosts: the VIP on loopback, ARP for it left to the director.
    let proxy_host = |i: usize| -> Proc {
        let ns = lan.ns(ROLES[i]);
        let pin_dir = pins.join(ROLES[i]).to_string_lossy().into_owned();
        let extra = ["--workers", "1", "--pin-dir", &pin_dir];
        let mut p =
            start_proxy(&lan, ROLES[i], &format!("{VIP}:9443"), &cp, &extra, d).expect("scm-proxy");
        wait_tcp(ns, &format!("{}:9443", PROXIES[i]), &mut p).expect("the proxy host listens");
        p
    };
    for role in ROLES {
        let ns = lan.ns(role);
        ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
            .unwrap();
        for (key, value) in [
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.eth0.arp_ignore", "1"),
            ("net.ipv4.conf.eth0.arp_announce", "2"),
        ] {
            sysctl(ns, key, value);
        }
    }
    let mut proxies: Vec<Proc> = (0..2).map(proxy_host).collect();

    // The director: the VIP on its interface, a round-robin service, both hosts in DR mode.
    let director = lan.ns("director");
    director
        .ip(&["addr", "add", &format!("{VIP}/24"), "dev", "eth0"])
        .unwrap();
    let service = format!("{VIP}:9443");
    ipvsadm(director, &["-A", "-t", &service, "-s", "rr"]);
    for ip in PROXIES {
        ipvsadm(
            director,
            &[
                "-a",
                "-t",
                &service,
                "-r",
                &format!("{ip}:9443"),
                "-g",
                "-w",
                "1",
            ],
        );
    }
    let script = d.join("checker.sh");
    std::fs::write(&script, documented_checker()).unwrap();
    let mut checker_cmd = director.exec("bash");
    checker_cmd.arg(&script);
    let _checker = Proc::spawn("ipvs-checker", &mut checker_cmd, d.join("checker.log")).unwrap();

    let tunnel = DeviceTunnel::start(&lan, "device", &cp, d).expect("the device host");
    let device = tunnel.ns.as_str();

    // The spread, and where the replies went.
    let n = 40;
    let served = spread(device, n);
    eprintln!("ipvs: {n} new connections served by {served:?}");
    for ip in PROXIES {
        let share = served.get(ip).copied().unwrap_or(0) as f64 / n as f64;
        assert!(
            (share - 0.5).abs() <= 0.15 / 2.0 + 1e-9,
            "{ip}: {share:.3} of {n}: {served:?}"
        );
    }
    let stats = ipvsadm(director, &["-L", "-n", "--stats"]);
    eprintln!("ipvs: the director's counters:\n{stats}");
    let service_line = stats
        .lines()
        .find(|l| l.contains(&service))
        .expect("the service in ipvsadm --stats");
    let cols: Vec<&str> = service_line.split_whitespace().collect();
    // TCP  VIP:9443  Conns  InPkts  OutPkts  InBytes  OutBytes
    let (in_pkts, out_pkts) = (cols[3], cols[4]);
    assert_ne!(in_pkts, "0", "{service_line}");
    assert_eq!(
        out_pkts, "0",
        "the director saw replies (not direct routing): {service_line}"
    );
    // The proxy saw the device's own address.
    let log = std::fs::read_to_string(d.join("rs1.log")).unwrap();
    assert!(
        log.contains(&format!("peer={DEVICE}:")),
        "rs1's log has no peer={DEVICE}"
    );

    // rs2 dies: within the checker's interval new connections go to rs1 only; rs1's open
    // connections go on.
    let mut open = Vec::new();
    while open.len() < 10 && !PROXIES.iter().all(|ip| open.iter().any(|(h, _)| h == ip)) {
        open.push(connect(device).expect("a long-lived connection"));
    }
    let killed = kill_host(lan.ns("rs2"));
    assert!(
        killed >= 2,
        "rs2 had {killed} processes (a supervisor and a worker expected)"
    );
    let killed_at = Instant::now();
    let mut failures = 0;
    let mut after = 0;
    while killed_at.elapsed() < Duration::from_secs(6) {
        let in_window = killed_at.elapsed() < Duration::from_secs(3);
        match connect(device) {
            Ok((h, _)) if !in_window => {
                assert_eq!(h, PROXIES[0], "rs2 served after the checker's interval");
                after += 1;
            }
            Ok(_) => {}
            Err(e) if in_window => {
                failures += 1;
                eprintln!(
                    "ipvs: a connection failed {:?} after the kill: {e}",
                    killed_at.elapsed()
                );
            }
            Err(e) => panic!(
                "a connection failed {:?} after the kill: {e}",
                killed_at.elapsed()
            ),
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("ipvs: {failures} device connections failed before the checker took rs2 out");
    assert!(after >= 5, "too few connections after the window: {after}");
    for (i, (host, s)) in open.iter_mut().enumerate() {
        if host == PROXIES[0] {
            echo(s, &format!("rs1 still up {i}"));
        }
    }

    // rs2 back: the checker gives it its weight again.
    proxies[1] = proxy_host(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !connect(device).is_ok_and(|(h, _)| h == PROXIES[1]) {
        assert!(
            Instant::now() < deadline,
            "rs2 got no traffic 20 s after it came back"
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(tunnel);
    drop(proxies);
    drop(cp);
}
