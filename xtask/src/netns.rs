//! The XDP demo's pair of network namespaces: the workspace's one namespace helper
//! ([`scm_netns::NetnsPair`]) with the demo's names and addresses. Removed again on drop.
//!
//! Everything lives inside the two namespaces: the root namespace gets no interface, route or
//! address, so demo traffic cannot leave them.

use std::process::Command;

use anyhow::{Context as _, Result};
use scm_netns::Netns;

/// Two namespaces `a` and `b` with `va` in `a` and `vb` in `b`, addressed from a /30.
#[derive(Debug)]
pub struct NetnsPair {
    /// The first namespace (the client side).
    pub a: Netns,
    /// The second namespace (the side the program is attached in).
    pub b: Netns,
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
    /// Creates the pair; names carry `tag` and this process id so parallel runs do not collide,
    /// and what a killed demo left behind is removed first.
    pub fn create(tag: &str) -> Result<Self> {
        let (addr_a, addr_b) = ("10.211.0.1", "10.211.0.2");
        let scm_netns::NetnsPair { a, b } = scm_netns::NetnsPair::create(
            &format!("scm-{tag}-"),
            &[&format!("{addr_a}/30")],
            &[&format!("{addr_b}/30")],
        )
        .with_context(|| format!("creating the {tag} namespaces"))?;
        Ok(Self {
            a,
            b,
            va: scm_netns::NetnsPair::VA,
            vb: scm_netns::NetnsPair::VB,
            addr_a,
            addr_b,
        })
    }

    /// A command that runs inside namespace `ns`.
    pub fn exec(ns: &str, program: &str) -> Command {
        scm_netns::exec(ns, program)
    }

    /// Whether `ip link` in `b` still shows an XDP program on `vb`.
    pub fn xdp_attached_on_b(&self) -> bool {
        self.b.link_show(self.vb).is_ok_and(|s| s.contains("xdp"))
    }
}
