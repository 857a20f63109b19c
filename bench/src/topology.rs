//! The benchmark's network: three namespaces (client, proxy under test, back end) joined by two
//! veth pairs, each made inside the namespaces so the root namespace gets no interface, address or
//! route. Removed on drop, and leftovers of a killed run are removed at the next start.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Prefix of every namespace this program makes.
const PREFIX: &str = "scmb-";

/// The three namespaces and their addresses.
#[derive(Debug)]
pub struct Topology {
    /// Client namespace.
    pub cli: String,
    /// Proxy-under-test namespace.
    pub dut: String,
    /// Back end + Security server namespace.
    pub be: String,
}

/// The proxy under test's address on the client side.
pub const DUT_ADDR: &str = "10.212.1.2";
/// The client's address.
pub const CLI_ADDR: &str = "10.212.1.1";
/// The proxy under test's address on the back-end side.
pub const DUT_BE_ADDR: &str = "10.212.2.1";
/// The back end's (and Security server's) address.
pub const BE_ADDR: &str = "10.212.2.2";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes namespaces left by runs whose process no longer exists.
pub fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let owner_alive = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !owner_alive {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Topology {
    /// Creates the namespaces, the veth pairs and the addresses, and tunes the client for many
    /// short connections.
    pub fn create() -> Result<Self> {
        remove_stale();
        let pid = std::process::id();
        let t = Self {
            cli: format!("{PREFIX}{pid}-cli"),
            dut: format!("{PREFIX}{pid}-dut"),
            be: format!("{PREFIX}{pid}-be"),
        };
        // From here Drop removes whatever part exists.
        for ns in [&t.cli, &t.dut, &t.be] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let links = [
            (&t.cli, "c0", CLI_ADDR, &t.dut, "d0", DUT_ADDR),
            (&t.dut, "d1", DUT_BE_ADDR, &t.be, "b0", BE_ADDR),
        ];
        for (a, va, addr_a, b, vb, addr_b) in links {
            ip(&[
                "-n", a, "link", "add", va, "type", "veth", "peer", "name", vb, "netns", b,
            ])?;
            ip(&["-n", a, "addr", "add", &format!("{addr_a}/24"), "dev", va])?;
            ip(&["-n", b, "addr", "add", &format!("{addr_b}/24"), "dev", vb])?;
            ip(&["-n", a, "link", "set", va, "up"])?;
            ip(&["-n", b, "link", "set", vb, "up"])?;
        }
        // Per-namespace sysctls: many ports and fast reuse for the new-connections test, a long
        // accept queue for the servers.
        for (ns, key, value) in [
            (&t.cli, "net.ipv4.ip_local_port_range", "1024 65000"),
            (&t.cli, "net.ipv4.tcp_tw_reuse", "1"),
            (&t.dut, "net.core.somaxconn", "8192"),
            (&t.be, "net.core.somaxconn", "8192"),
        ] {
            let ok = t
                .exec(ns, "sysctl")
                .args(["-q", "-w", &format!("{key}={value}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                bail!("setting {key} in {ns} failed");
            }
        }
        Ok(t)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// A command inside `ns`, pinned to `cpus` (a taskset list like `0` or `1`).
    pub fn pinned(&self, ns: &str, cpus: &str, program: &str) -> Command {
        let mut c = self.exec(ns, "taskset");
        c.args(["-c", cpus, program]);
        c
    }
}

impl Topology {
    /// Like [`Topology::pinned`], but entering only the network namespace (`nsenter`), so the
    /// program keeps this mount namespace's /sys/fs/bpf (`ip netns exec` mounts a fresh /sys).
    pub fn pinned_with_bpffs(&self, ns: &str, cpus: &str, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .args(["taskset", "-c", cpus, program]);
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.cli, &self.dut, &self.be] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
