//! Helpers shared by the XDP integration tests: the root gate and throw-away network namespaces
//! (the workspace's `scm-netns` with these tests' addresses).
//!
//! Each test binary includes this module and uses part of it.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::time::{Duration, Instant};

/// Whether a test that needs root may run. Outside root it skips with a loud message; under
/// `CI=true` (CI runs as root) a missing privilege is a failure, never a silent skip.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    scm_netns::skip::skip(
        test,
        "root",
        "BPF and network namespaces; run the tests as root",
    );
    false
}

/// Runs `ip` with `args` and returns its output, panicking with its stderr when it fails.
pub fn ip(args: &[&str]) -> String {
    scm_netns::ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// IPv4 address of `va` (namespace a) and `vb` (namespace b). The /30 exists only inside the two
/// namespaces, so traffic never leaves them.
pub const A_V4: &str = "10.211.0.1";
/// See [`A_V4`].
pub const B_V4: &str = "10.211.0.2";
/// IPv6 (ULA) address of `va`.
pub const A_V6: &str = "fd00:211::1";
/// IPv6 (ULA) address of `vb`.
pub const B_V6: &str = "fd00:211::2";

/// Two network namespaces joined by a veth pair `va` (in `a`) -- `vb` (in `b`), created inside
/// the namespaces so the root namespace is never touched: the workspace's one namespace helper
/// ([`scm_netns::NetnsPair`]) with these tests' addresses. Dropping it deletes both namespaces,
/// which also destroys the veth pair, whether the test passed or panicked.
pub struct NetnsPair(scm_netns::NetnsPair);

/// `pair.a` and `pair.b` are the namespaces (usable wherever their name is).
impl std::ops::Deref for NetnsPair {
    type Target = scm_netns::NetnsPair;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl NetnsPair {
    /// Creates the pair with [`A_V4`]/[`B_V4`] and [`A_V6`]/[`B_V6`] configured and all links up.
    pub fn create() -> Self {
        let a = [&*format!("{A_V4}/30"), &*format!("{A_V6}/64")];
        let b = [&*format!("{B_V4}/30"), &*format!("{B_V6}/64")];
        Self(
            scm_netns::NetnsPair::create("scm-t-", &a, &b)
                .unwrap_or_else(|e| panic!("creating a namespace pair: {e}")),
        )
    }

    /// `ip -n <ns> link show <dev>`, as text.
    pub fn link_show(&self, ns: &str, dev: &str) -> String {
        ip(&["-n", ns, "link", "show", dev])
    }

    /// Waits (up to 5 s) until `dev` in `ns` has no XDP program. The kernel drops an XDP link
    /// when the last reference to its file closes, and a process another test thread is
    /// spawning holds a copy of every descriptor until its `exec`: so the program can leave a
    /// moment after `detach()` (or the owner's death) returned, and a test that looks at once
    /// sees it still there or the peer's TSO still off.
    pub fn wait_until_no_xdp(&self, ns: &str, dev: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.link_show(ns, dev).contains("xdp") {
            assert!(
                Instant::now() < deadline,
                "XDP still attached to {dev} 5 s after {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `f` on a fresh thread that has joined network namespace `ns`; sockets it creates and
/// interface names it resolves belong to that namespace. Other threads are unaffected.
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    scm_netns::in_netns(ns, f).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends raw Ethernet frames out of `dev` in namespace `ns` through an `AF_PACKET` socket, so
/// frames no socket API would build (bogus headers, VLAN tags) reach the peer's XDP program.
pub fn inject_frames(ns: &str, dev: &str, frames: &[Vec<u8>]) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    in_netns(ns, || {
        let if_index =
            nix::net::if_::if_nametoindex(dev).unwrap_or_else(|e| panic!("no {dev} in {ns}: {e}"));
        // Protocol 0: this socket only sends, it never receives.
        // SAFETY: socket(2) has no memory preconditions; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for frame in frames {
            // SAFETY: sockaddr_ll is plain old data, valid when zeroed.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = if_index as i32;
            addr.sll_halen = 6;
            if let Some(dst) = frame.get(..6) {
                addr.sll_addr[..6].copy_from_slice(dst);
            }
            // SAFETY: the buffer and the address are valid for the lengths passed, and the
            // kernel only reads them during the call.
            let sent = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                sent,
                frame.len() as isize,
                "sending a {}-byte frame on {dev}: {}",
                frame.len(),
                std::io::Error::last_os_error()
            );
        }
    });
}
