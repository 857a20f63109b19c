//! A pair of network namespaces joined by a veth pair, removed again on drop.
//!
//! Everything lives inside the two namespaces: the root namespace gets no interface, route or
//! address, so demo traffic cannot leave them.

use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd::{self, output};

/// Two namespaces `a` and `b` with `va` in `a` and `vb` in `b`, addressed from a /30.
#[derive(Debug)]
pub struct NetnsPair {
    /// Name of the first namespace (the client side).
    pub a: String,
    /// Name of the second namespace (the side the program is attached in).
    pub b: String,
    /// Interface in `a`.
    pub va: &'static str,
    /// Interface in `b`.
    pub vb: &'static str,
    /// Address of `va`.
    pub addr_a: &'static str,
    /// Address of `vb`.
    pub addr_b: &'static str,
}

impl NetnsPair {
    /// Creates the pair; names carry `tag` and this process id so parallel runs do not collide.
    pub fn create(tag: &str) -> Result<Self> {
        if !cmd::is_root() {
            bail!("network namespaces need root: run this task as root");
        }
        let pid = std::process::id();
        let pair = Self {
            a: format!("scm-{tag}-{pid}-a"),
            b: format!("scm-{tag}-{pid}-b"),
            va: "va",
            vb: "vb",
            addr_a: "10.211.0.1",
            addr_b: "10.211.0.2",
        };
        // From here on Drop cleans up whatever part was made.
        for ns in [&pair.a, &pair.b] {
            cmd::run(Command::new("ip").args(["netns", "add", ns]))?;
        }
        let steps: [&[&str]; 7] = [
            &[
                "-n", &pair.a, "link", "add", pair.va, "type", "veth", "peer", "name", pair.vb,
                "netns", &pair.b,
            ],
            &[
                "-n",
                &pair.a,
                "addr",
                "add",
                &format!("{}/30", pair.addr_a),
                "dev",
                pair.va,
            ],
            &[
                "-n",
                &pair.b,
                "addr",
                "add",
                &format!("{}/30", pair.addr_b),
                "dev",
                pair.vb,
            ],
            &["-n", &pair.a, "link", "set", pair.va, "up"],
            &["-n", &pair.b, "link", "set", pair.vb, "up"],
            &["-n", &pair.a, "link", "set", "lo", "up"],
            &["-n", &pair.b, "link", "set", "lo", "up"],
        ];
        for step in steps {
            cmd::run(Command::new("ip").args(step))?;
        }
        Ok(pair)
    }

    /// A command that runs inside namespace `ns`.
    pub fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Whether `ip link` in `b` still shows an XDP program on `vb`.
    pub fn xdp_attached_on_b(&self) -> bool {
        output(Command::new("ip").args(["-n", &self.b, "link", "show", "dev", self.vb]))
            .is_some_and(|s| s.contains("xdp"))
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
