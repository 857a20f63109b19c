//! The .deb packages on a fresh Debian 12 under a real systemd: the packages `cargo xtask package`
//! builds are installed with apt into a debootstrapped bookworm minbase root, which is booted
//! with `systemd-nspawn --boot` (as /work/shared/packaging-test.md records); the enabled units
//! start at boot, their MainPIDs' capabilities are read from /proc, the proxy's own log and
//! metrics show it loaded and attached its eBPF programs, the demo's workflow runs against the
//! units (enrol, login, tunnel, http, logout, with scm-device from its package), each unit is
//! restarted (and the proxy's supervisor SIGKILLed: the new one adopts its workers), reloaded,
//! its capability set is shown minimal (each capability dropped in turn makes the start fail),
//! and `systemd-analyze security` must give the exposure score docs/operations.md records.
//!
//! Needs root, debootstrap and systemd-nspawn (`cargo xtask setup`); skips loudly without them,
//! and fails under CI. The bookworm root is cached (like the guest's kernel) in
//! `$SCM_PACKAGE_CACHE`, else `$XDG_CACHE_HOME/scm-package`, else `~/.cache/scm-package`, and
//! copied per run. The .deb files are taken from `$SCM_PACKAGE_DEBS` (a folder) or built with
//! `cargo xtask package --debug`.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const TEST: &str = "package: .debs installed and booted under systemd-nspawn";
const PASSWORD: &str = "Pkg-test-Passw0rd!";
/// The capabilities the proxy unit grants, as CapEff bits. Not CAP_NET_BIND_SERVICE: the
/// supervisor serves port 443 through sk_lookup, nothing binds it (this test showed a start
/// without it succeeding, and the workflow below reaches the proxy on 443).
const PROXY_CAPS: &[(&str, u32)] = &[("CAP_BPF", 39), ("CAP_PERFMON", 38), ("CAP_NET_ADMIN", 12)];

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir().join("target"))
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SCM_PACKAGE_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("scm-package");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .join(".cache/scm-package")
}

/// The Debian mirror apt already uses on this host (deb.debian.org where none is found).
fn mirror() -> String {
    let mut text = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            text.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("URIs:")
                .map(|u| u.split_whitespace().next().unwrap_or("").to_owned())
                .or_else(|| {
                    l.strip_prefix("deb ").and_then(|r| {
                        r.split_whitespace()
                            .find(|w| w.starts_with("http"))
                            .map(str::to_owned)
                    })
                })
        })
        .find(|u| u.contains("debian") && !u.contains("security"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// The cached bookworm minbase root with systemd, made once (about a minute).
fn cached_root() -> PathBuf {
    let cache = cache_dir();
    let root = cache.join("bookworm-minbase");
    if root.join("usr/lib/systemd/systemd").exists() || root.join("lib/systemd/systemd").exists() {
        return root;
    }
    fs::create_dir_all(&cache).unwrap();
    let tmp = cache.join(format!("bookworm-minbase.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    eprintln!(
        "package: debootstrap of bookworm minbase into {} (about a minute, once)",
        root.display()
    );
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus",
            "bookworm",
        ])
        .arg(&tmp)
        .arg(mirror()));
    // Complete or absent: a rename, so a killed debootstrap never leaves a half root cached.
    fs::rename(&tmp, &root).unwrap();
    root
}

/// The .deb files: `$SCM_PACKAGE_DEBS`, or `cargo xtask package --debug` into target/.
fn debs() -> Vec<PathBuf> {
    let dir = match std::env::var_os("SCM_PACKAGE_DEBS") {
        Some(d) => PathBuf::from(d),
        None => {
            let out = target_dir().join("package-test-debs");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            run(Command::new(cargo)
                .args([
                    "run", "--locked", "-q", "-p", "xtask", "--", "package", "--debug", "--out",
                ])
                .arg(&out)
                .current_dir(root_dir()));
            out
        }
    };
    let debs: Vec<PathBuf> = ["scm-security", "scm-proxy", "scm-device"]
        .iter()
        .map(|p| {
            fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .flatten()
                .map(|e| e.path())
                .filter(|f| {
                    f.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{p}_")) && n.ends_with(".deb"))
                })
                .max()
                .unwrap_or_else(|| panic!("no {p}_*.deb in {}", dir.display()))
        })
        .collect();
    debs
}

/// A booted container: powered off, its nspawn reaped, its bpffs unmounted and its root removed
/// on drop, whatever happened.
struct Container {
    nspawn: Child,
    init: u32,
    dir: PathBuf,
    bpffs: PathBuf,
    bpffs_mounted: bool,
}

impl Container {
    /// `nsenter` into the container's namespaces (all of them) and run `args`.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.init.to_string(), "-a"]).args(args);
        c
    }

    fn sh_out(&self, script: &str) -> Output {
        self.cmd(&["sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a shell script inside; panics with its output if it fails; returns stdout.
    fn sh(&self, script: &str) -> String {
        self.checked("sh", script)
    }

    /// As [`Container::sh`] with bash, for its /dev/tcp (minbase has no curl or netcat).
    fn bash(&self, script: &str) -> String {
        self.checked("bash", script)
    }

    fn checked(&self, shell: &str, script: &str) -> String {
        let out = self
            .cmd(&[shell, "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "in the container: {script}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn journal(&self, unit: &str) -> String {
        String::from_utf8_lossy(
            &self
                .sh_out(&format!("journalctl -u {unit} -o cat --no-pager"))
                .stdout,
        )
        .into_owned()
    }

    fn main_pid(&self, unit: &str) -> u32 {
        self.sh(&format!("systemctl show -p MainPID --value {unit}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until `unit` is active (running with READY=1 sent, for Type=notify).
    fn wait_active(&self, unit: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = self.sh_out(&format!("systemctl is-active {unit}"));
            let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
            if state == "active" {
                return;
            }
            assert!(
                state != "failed" && Instant::now() < deadline,
                "{unit} is {state}:\n{}",
                self.journal(unit)
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// The `field` line of /proc/PID/status inside.
    fn proc_status(&self, pid: u32, field: &str) -> String {
        let text = self.sh(&format!("cat /proc/{pid}/status"));
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
            .trim()
            .to_owned()
    }

    /// `GET path` on a loopback port inside (bash's /dev/tcp: minbase has no curl).
    fn http_get(&self, port: u16, path: &str) -> String {
        self.bash(&format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; \
             printf 'GET {path} HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3; cat <&3"
        ))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["systemctl", "poweroff"])
            .stdin(Stdio::null())
            .output();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            sleep(Duration::from_millis(100));
        }
        if let Ok(None) = self.nspawn.try_wait() {
            // Only the nspawn this test started, by its pid.
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        if self.bpffs_mounted {
            let _ = Command::new("umount").arg(&self.bpffs).status();
        }
        // Nothing of ours may stay mounted under the root.
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let dir = self.dir.to_string_lossy().into_owned();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if m.starts_with(&dir) {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Copies the cached root, installs the packages with apt (their Depends from the mirror),
/// configures certificates and the proxy's Security URL, and boots it.
fn boot(debs: &[PathBuf]) -> Container {
    let base = cached_root();
    let dir = tempfile::Builder::new()
        .prefix("scm-package-test-")
        .tempdir_in(target_dir())
        .unwrap()
        .keep();
    let bpffs = dir.join("bpffs");
    let root = dir.join("root");
    fs::create_dir_all(&bpffs).unwrap();
    let mut c = Container {
        // Replaced below; `true` exits at once, so a drop before boot reaps nothing real.
        nspawn: Command::new("true").spawn().unwrap(),
        init: 0,
        dir: dir.clone(),
        bpffs: bpffs.clone(),
        bpffs_mounted: false,
    };
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&base)
        .arg(&root));
    fs::create_dir_all(root.join("debs")).unwrap();
    for d in debs {
        fs::copy(d, root.join("debs").join(d.file_name().unwrap())).unwrap();
    }
    // Before boot, from the host side: apt resolves the Depends (procps) from the mirror.
    let chroot = |script: &str| {
        run(Command::new("chroot")
            .arg(&root)
            .args(["sh", "-c", script])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    let install = "apt-get install -y -qq --no-install-recommends /debs/*.deb";
    if Command::new("chroot")
        .arg(&root)
        .args(["sh", "-c", install])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_or(true, |o| !o.status.success())
    {
        chroot(&format!("apt-get update -qq && {install}"));
    }
    // The operator's part (docs/operations.md "Install on a host"): certificates for both
    // daemons, readable by their groups; the proxy's Security URL; two workers; XDP on lo.
    chroot(
        "set -e
         scm-security dev-certs --out /etc/scm/security >/dev/null
         cd /etc/scm/security
         mv proxy.pem proxy.key proxy-client.pem proxy-client.key ../proxy/
         cp ca.pem ../proxy/
         rm ca.key
         chgrp scm-security ./* && chmod 0640 ./*
         chgrp scm-proxy ../proxy/* && chmod 0640 ../proxy/*
         cat >> /etc/scm/scm-proxy.env <<EOF
SCM_PROXY_SECURITY_URLS=https://127.0.0.1:8444
SCM_PROXY_WORKERS=2
SCM_PROXY_STEER_IFACE=lo
EOF",
    );
    // A bpffs of its own, where systemd would have mounted one on a host (nspawn mounts none).
    run(Command::new("mount")
        .args(["-t", "bpf", "bpffs"])
        .arg(&bpffs));
    c.bpffs_mounted = true;
    let backend = env!("CARGO_BIN_EXE_scm-backend");
    let nspawn = Command::new("setsid")
        .arg("systemd-nspawn")
        .args(["-q", "-D"])
        .arg(&root)
        .args(["--register=no", "--keep-unit", "--private-network"])
        // Without these the container silently lacks them (packaging-test.md): nspawn's own
        // seccomp filter refuses bpf() and pidfd_getfd() to services.
        .args([
            "--capability=CAP_BPF,CAP_PERFMON",
            "--system-call-filter=bpf pidfd_getfd",
        ])
        .arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()))
        .arg(format!("--bind-ro={backend}:/usr/local/bin/scm-backend"))
        .args(["--boot", "--console=passive"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("nspawn.log")).unwrap())
        .stderr(fs::File::create(dir.join("nspawn.err")).unwrap())
        .spawn()
        .expect("starting systemd-nspawn");
    let _ = c.nspawn.wait();
    c.nspawn = nspawn;
    // The container's init: a descendant of nspawn in another PID namespace (nspawn's first
    // child is a short-lived helper).
    let host_ns = fs::read_link("/proc/self/ns/pid").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // systemctl answers once the manager's socket exists, in the container's own /run.
    let manager_up = |init: u32| {
        init != 0
            && Command::new("nsenter")
                .args([
                    "-t",
                    &init.to_string(),
                    "-m",
                    "test",
                    "-S",
                    "/run/systemd/private",
                ])
                .status()
                .is_ok_and(|s| s.success())
    };
    while !manager_up(c.init) {
        assert!(
            Instant::now() < deadline,
            "the container did not boot: {}",
            fs::read_to_string(dir.join("nspawn.err")).unwrap_or_default()
        );
        assert!(
            c.nspawn.try_wait().unwrap().is_none(),
            "systemd-nspawn exited: {}",
            fs::read_to_string(dir.join("nspawn.err")).unwrap_or_default()
        );
        let mut queue = vec![c.nspawn.id()];
        while let Some(pid) = queue.pop() {
            // Every thread's children: nspawn may fork from any of its threads.
            let mut children = String::new();
            for task in fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
            {
                children += &fs::read_to_string(task.path().join("children")).unwrap_or_default();
                children.push(' ');
            }
            for child in children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                match fs::read_link(format!("/proc/{child}/ns/pid")) {
                    Ok(ns) if ns != host_ns => c.init = child,
                    _ => queue.push(child),
                }
            }
        }
        sleep(Duration::from_millis(100));
    }
    let _ = c.sh_out("systemctl is-system-running --wait");
    c
}

/// The exposure score docs/operations.md records for `unit` (its "Install on a host" table).
fn documented_exposure(unit: &str) -> String {
    let doc = fs::read_to_string(root_dir().join("docs/operations.md")).unwrap();
    let row = format!("| `{unit}` |");
    let line = doc
        .lines()
        .find(|l| l.starts_with(&row) && l.contains("exposure"))
        .unwrap_or_else(|| panic!("docs/operations.md has no row {row}... with its exposure"));
    line.split('|')
        .map(str::trim)
        .find_map(|cell| cell.strip_prefix("exposure "))
        .unwrap_or_else(|| panic!("no `exposure N.N` cell in {line:?}"))
        .to_owned()
}

/// The sum of every sample of `name` in a Prometheus text answer.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn device(c: &Container, args: &str) -> String {
    c.sh(&format!(
        "SCM_DEVICE_PASSWORD='{PASSWORD}' scm-device --state /root/alice.json {args}"
    ))
}

/// enrol (once), login, a tunnel to the echo back end, an http request, logout.
fn workflow(c: &Container, enrol: bool) {
    if enrol {
        device(
            c,
            "enroll --security-url https://127.0.0.1:8443 --ca /etc/scm/security/ca.pem \
             --user alice --device-id phone-1 --app-id mail --app-version 1.0.0",
        );
    }
    let login = device(c, "login");
    assert!(login.contains("logged in as alice"), "{login}");
    c.sh("systemctl stop scm-tunnel 2>/dev/null; systemctl reset-failed scm-tunnel 2>/dev/null; true");
    c.sh(&format!(
        "systemd-run -q --unit scm-tunnel -E SCM_DEVICE_PASSWORD='{PASSWORD}' \
         scm-device --state /root/alice.json tunnel -L 127.0.0.1:7000:echo"
    ));
    let echoed = c.bash(
        "for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/7000) 2>/dev/null && break; \
           sleep 0.1; done
         exec 3<>/dev/tcp/127.0.0.1/7000
         echo hello-through-scm >&3
         read -t 10 line <&3
         echo \"$line\"",
    );
    assert_eq!(echoed.trim(), "hello-through-scm", "the tunnel's echo");
    c.sh("systemctl stop scm-tunnel");
    let seen = device(c, "get http://web/hello");
    assert!(
        seen.contains("\"x-scm-user\":\"alice\"") && seen.contains("\"path\":\"/hello\""),
        "the http back end saw: {seen}"
    );
    let out = device(c, "logout");
    assert!(out.contains("logged out"), "{out}");
}

#[test]
fn debs_install_boot_harden_and_serve_under_systemd() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        scm_netns::skip::skip(TEST, "root", "run the tests as root (CI does)");
        return;
    }
    for tool in ["debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb"] {
        if !have(tool) {
            scm_netns::skip::skip(TEST, tool, "`cargo xtask setup` installs it");
            return;
        }
    }
    let started = Instant::now();
    let debs = debs();
    let c = boot(&debs);
    eprintln!("package: booted in {:.1}s", started.elapsed().as_secs_f64());

    // The units were enabled by postinst and started at boot; Type=notify: active = READY=1.
    c.wait_active("scm-security");
    c.wait_active("scm-proxy");
    let status = c.sh("systemctl show -p StatusText --value scm-security scm-proxy");
    assert!(status.contains("serving devices on"), "{status}");
    assert!(
        status.contains("2 workers behind eBPF steering"),
        "{status}"
    );

    // Users and capabilities, as the kernel sees them.
    let sec = c.main_pid("scm-security");
    assert_ne!(
        c.proc_status(sec, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(c.proc_status(sec, "CapEff"), "0000000000000000");
    assert_eq!(c.proc_status(sec, "CapBnd"), "0000000000000000");
    assert_eq!(c.proc_status(sec, "NoNewPrivs"), "1");
    assert_eq!(c.proc_status(sec, "Seccomp"), "2");
    let want: u64 = PROXY_CAPS.iter().map(|(_, bit)| 1u64 << bit).sum();
    let proxy = c.main_pid("scm-proxy");
    assert_ne!(
        c.proc_status(proxy, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(c.proc_status(proxy, "CapEff"), format!("{want:016x}"));
    assert_eq!(c.proc_status(proxy, "CapBnd"), format!("{want:016x}"));
    assert_eq!(c.proc_status(proxy, "Seccomp"), "2");
    let data = c.sh("stat -c '%a %U' /var/lib/scm/security");
    assert_eq!(data.trim(), "700 scm-security");

    // The env files list every flag's environment twin that `serve --help` names; the man
    // pages and completions are where man and the shells look.
    for (bin, env) in [
        ("scm-security", "scm-security.env"),
        ("scm-proxy", "scm-proxy.env"),
    ] {
        let help = c.sh(&format!("{bin} serve --help"));
        let file = c.sh(&format!("cat /etc/scm/{env}"));
        let names: Vec<&str> = help
            .split("[env: ")
            .skip(1)
            .filter_map(|r| r.split(['=', ']']).next())
            .collect();
        assert!(
            names.len() > 10,
            "{bin} serve --help names too few variables: {help}"
        );
        for name in names {
            assert!(
                file.lines()
                    .any(|l| l.trim_start_matches('#').starts_with(&format!("{name}="))),
                "/etc/scm/{env} lacks {name}"
            );
        }
    }
    c.sh("set -e
          for f in scm-security.1 scm-security-serve.1 scm-proxy-serve.1 scm-device-enroll.1; do
            test -s /usr/share/man/man1/$f; done
          for b in scm-security scm-proxy scm-device; do
            test -s /usr/share/bash-completion/completions/$b
            test -s /usr/share/zsh/vendor-completions/_$b
            test -s /usr/share/fish/vendor_completions.d/$b.fish; done");

    // The proxy loaded and attached its programs itself (its log, its pins, and below its
    // kernel counters), under the unit's capabilities and syscall filter.
    let log = c.journal("scm-proxy");
    assert!(log.contains("steering loaded"), "{log}");
    assert!(log.contains("XDP attached and pinned"), "{log}");
    for pin in ["link-sk-lookup", "link-xdp", "SCM_SOCKETS"] {
        assert!(
            c.bpffs.join("scm").join(pin).exists(),
            "no pin {pin} in bpffs"
        );
    }

    // The demo's workflow against the units, with scm-device from its package.
    let admin = "scm-security admin --url https://127.0.0.1:8445 --ca /etc/scm/security/ca.pem \
                 --token-file /var/lib/scm/security/admin.token";
    c.sh(&format!(
        "set -e
         echo '{PASSWORD}' | {admin} users add alice --groups staff --password-stdin
         {admin} resources set echo --address 127.0.0.1:7001 --mode tcp --groups staff
         {admin} resources set web --address 127.0.0.1:7002 --mode http --groups staff
         {admin} sites set main --proxy-url 127.0.0.1:443
         systemd-run -q --unit scm-backend /usr/local/bin/scm-backend \
           --echo 127.0.0.1:7001 --http 127.0.0.1:7002"
    ));
    workflow(&c, true);
    let metrics = c.http_get(9100, "/metrics");
    assert!(
        metric_sum(&metrics, "scm_proxy_steer_worker_new_flows_total") >= 2.0,
        "the sk_lookup program steered no connection to a worker:\n{metrics}"
    );
    assert!(
        metric_sum(&metrics, "scm_proxy_xdp_packets_total{class=\"tcp-syn\"") >= 2.0,
        "the XDP program on lo counted no SYN:\n{metrics}"
    );

    // Restarts: each unit comes back and serves; a SIGKILLed supervisor's successor adopts the
    // workers it left (KillMode=process kept them alive).
    for unit in ["scm-security", "scm-proxy"] {
        let before = c.main_pid(unit);
        c.sh(&format!("systemctl restart {unit}"));
        c.wait_active(unit);
        assert_ne!(c.main_pid(unit), before, "{unit} was not restarted");
    }
    c.wait_active("scm-proxy");
    // Every scm-proxy process in the container: the supervisor and its workers.
    let procs = |c: &Container| {
        let mut p: Vec<u32> = c
            .sh("for p in /proc/[0-9]*; do \
                   [ \"$(cat $p/comm 2>/dev/null)\" = scm-proxy ] && echo ${p#/proc/}; done; true")
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        p.sort_unstable();
        p
    };
    let sup = c.main_pid("scm-proxy");
    let workers: Vec<u32> = procs(&c).into_iter().filter(|p| *p != sup).collect();
    assert_eq!(workers.len(), 2, "two workers beside the supervisor");
    for w in &workers {
        assert_eq!(
            c.proc_status(*w, "CapEff"),
            format!("{want:016x}"),
            "worker {w}"
        );
    }
    c.sh("systemctl kill -s KILL --kill-whom=main scm-proxy");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.main_pid("scm-proxy") == sup || c.main_pid("scm-proxy") == 0 {
        assert!(
            Instant::now() < deadline,
            "scm-proxy was not restarted after SIGKILL"
        );
        sleep(Duration::from_millis(100));
    }
    c.wait_active("scm-proxy");
    let status = c.sh("systemctl show -p StatusText --value scm-proxy");
    assert!(status.contains("(2 adopted)"), "{status}");
    let new_sup = c.main_pid("scm-proxy");
    let after: Vec<u32> = procs(&c).into_iter().filter(|p| *p != new_sup).collect();
    assert_eq!(
        after, workers,
        "the restarted supervisor adopted the same workers"
    );
    workflow(&c, false);

    // Reload (ExecReload: SIGHUP): the same process goes on serving.
    for unit in ["scm-security", "scm-proxy"] {
        let before = c.main_pid(unit);
        c.sh(&format!("systemctl reload {unit}"));
        sleep(Duration::from_secs(1));
        c.wait_active(unit);
        assert_eq!(
            c.main_pid(unit),
            before,
            "{unit}: `systemctl reload` replaced the process:\n{}",
            c.journal(unit)
        );
    }
    workflow(&c, false);

    // The capability set is minimal: without any one of them the proxy does not start.
    c.sh("systemctl stop scm-proxy");
    let dropin = "/run/systemd/system/scm-proxy.service.d";
    for (cap, _) in PROXY_CAPS {
        let rest: Vec<&str> = PROXY_CAPS
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| c != cap)
            .collect();
        c.sh(&format!(
            "mkdir -p {dropin} && cat > {dropin}/50-without.conf <<EOF
[Service]
AmbientCapabilities=
AmbientCapabilities={rest}
CapabilityBoundingSet=
CapabilityBoundingSet={rest}
Restart=no
KillMode=control-group
EOF
systemctl daemon-reload",
            rest = rest.join(" ")
        ));
        let out = c.sh_out("systemctl start scm-proxy");
        assert!(
            !out.status.success(),
            "scm-proxy started without {cap}: it is not needed"
        );
        c.sh("systemctl stop scm-proxy; systemctl reset-failed scm-proxy");
    }
    // The syscall filter is minimal too: bpf() and pidfd_getfd() are each needed.
    for (syscall, rest) in [("bpf", "pidfd_getfd"), ("pidfd_getfd", "bpf")] {
        c.sh(&format!(
            "mkdir -p {dropin} && cat > {dropin}/50-without.conf <<EOF
[Service]
SystemCallFilter=
SystemCallFilter=@system-service {rest}
Restart=no
KillMode=control-group
EOF
systemctl daemon-reload"
        ));
        let out = c.sh_out("systemctl start scm-proxy");
        assert!(
            !out.status.success(),
            "scm-proxy started with {syscall}() filtered out: it is not needed"
        );
        c.sh("systemctl stop scm-proxy; systemctl reset-failed scm-proxy");
    }
    c.sh(&format!(
        "rm -r {dropin} && systemctl daemon-reload && systemctl start scm-proxy"
    ));
    c.wait_active("scm-proxy");

    // The exposure scores recorded in docs/operations.md.
    for unit in ["scm-security.service", "scm-proxy.service"] {
        let out = c.sh(&format!("systemd-analyze security --no-pager {unit}"));
        let score = out
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| r.split(": ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no overall exposure in: {out}"))
            .to_owned();
        assert_eq!(
            score,
            documented_exposure(unit),
            "{unit}: systemd-analyze security says {score}; record it in docs/operations.md"
        );
    }
    let mode = fs::metadata(c.dir.join("root/var/lib/scm/security/master.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the master key made by postinst");
    eprintln!("package: done in {:.1}s", started.elapsed().as_secs_f64());
}
