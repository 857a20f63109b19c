//! The benchmark's network: three namespaces (client, proxy under test, back end) joined by two
//! veth pairs, each made inside the namespaces so the root namespace gets no interface, address or
//! route. Built on the workspace's one namespace helper (`scm-netns`): removed on drop, and
//! leftovers of a killed run are removed at the next start.

use std::process::Command;

use anyhow::{Context as _, Result};
use scm_netns::{End, Netns, veth};

/// Prefix of every namespace this program makes.
const PREFIX: &str = "scmb-";

/// The three namespaces and their addresses. Dropping it deletes them (the workspace's one
/// namespace guard, [`scm_netns::Netns`]), also when the run fails or panics.
#[derive(Debug)]
pub struct Topology {
    /// Client namespace.
    pub cli: Netns,
    /// Proxy-under-test namespace.
    pub dut: Netns,
    /// Back end + Security server namespace.
    pub be: Netns,
}

/// The proxy under test's address on the client side.
pub const DUT_ADDR: &str = "10.212.1.2";
/// The client's address.
pub const CLI_ADDR: &str = "10.212.1.1";
/// The proxy under test's address on the back-end side.
pub const DUT_BE_ADDR: &str = "10.212.2.1";
/// The back end's (and Security server's) address.
pub const BE_ADDR: &str = "10.212.2.2";

/// Removes namespaces left by runs whose process no longer exists.
pub fn remove_stale() {
    scm_netns::remove_stale(PREFIX);
}

impl Topology {
    /// Creates the namespaces, the veth pairs and the addresses, and tunes the client for many
    /// short connections.
    pub fn create() -> Result<Self> {
        remove_stale();
        let base = scm_netns::unique_base(PREFIX);
        let ns = |role: &str| {
            Netns::create(format!("{base}-{role}"))
                .with_context(|| format!("creating the {role} namespace"))
        };
        // Each namespace is removed on drop from the moment it exists.
        let t = Self {
            cli: ns("cli")?,
            dut: ns("dut")?,
            be: ns("be")?,
        };
        let links = [
            (&t.cli, "c0", CLI_ADDR, &t.dut, "d0", DUT_ADDR),
            (&t.dut, "d1", DUT_BE_ADDR, &t.be, "b0", BE_ADDR),
        ];
        for (a, va, addr_a, b, vb, addr_b) in links {
            veth(
                End {
                    ns: a,
                    dev: va,
                    addrs: &[&format!("{addr_a}/24")],
                },
                End {
                    ns: b,
                    dev: vb,
                    addrs: &[&format!("{addr_b}/24")],
                },
            )
            .with_context(|| format!("joining {a} and {b}"))?;
        }
        // Per-namespace sysctls: many ports and fast reuse for the new-connections test, a long
        // accept queue for the servers.
        for (ns, key, value) in [
            (&t.cli, "net.ipv4.ip_local_port_range", "1024 65000"),
            (&t.cli, "net.ipv4.tcp_tw_reuse", "1"),
            (&t.dut, "net.core.somaxconn", "8192"),
            (&t.be, "net.core.somaxconn", "8192"),
        ] {
            ns.sysctl(key, value)?;
        }
        Ok(t)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn exec(&self, ns: &str, program: &str) -> Command {
        scm_netns::exec(ns, program)
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
