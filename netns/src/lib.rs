//! Throw-away network namespaces, removed again on drop (also when their owner panics): the one
//! helper behind the XDP demo (`cargo xtask demo xdp`), the benchmark's topology and the proxy's
//! namespace tests.
//!
//! Everything is made inside the namespaces (a veth is created in one and its peer moved into the
//! other), so the root namespace never gets an interface, address or route and test traffic cannot
//! leave them. Names are `<prefix><pid>-<n>-<role>`: parallel runs do not collide, and
//! [`remove_stale`] removes what a killed run (whose drop never ran) left behind.
//!
//! [`skip`] holds the workspace's one rule for a test whose requirement is missing: a visible
//! skip, or a failure under CI.
//!
//! It drives `ip` (iproute2) and needs root. It depends on nothing heavier than `libc`, so xtask
//! can use it without building the workspace's libraries.
#![warn(unreachable_pub)]

pub mod skip;

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Why a namespace could not be made, configured or entered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// Network namespaces need root.
    #[error("network namespaces need root (effective uid is {uid}): run this as root")]
    NotRoot {
        /// The effective uid this process has.
        uid: u32,
    },
    /// `ip` could not be started.
    #[error("running `ip {args}` failed (is iproute2 installed?): {source}")]
    Spawn {
        /// The arguments given to `ip`.
        args: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// `ip` ran and refused.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments given to `ip`.
        args: String,
        /// What `ip` said.
        stderr: String,
    },
    /// A sysctl inside a namespace could not be set.
    #[error("setting {key}={value} in namespace {ns} failed")]
    Sysctl {
        /// The namespace.
        ns: String,
        /// The sysctl.
        key: String,
        /// The value asked for.
        value: String,
    },
    /// The calling thread could not join a namespace.
    #[error("entering network namespace {ns}: {source}")]
    Enter {
        /// The namespace.
        ns: String,
        /// The error from opening `/run/netns/<ns>` or from setns(2).
        #[source]
        source: std::io::Error,
    },
}

/// Whether this process runs as root (namespaces, veths and XDP need it).
pub fn is_root() -> bool {
    effective_uid() == 0
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Fails with [`NetnsError::NotRoot`] unless this process is root.
pub fn require_root() -> Result<(), NetnsError> {
    match effective_uid() {
        0 => Ok(()),
        uid => Err(NetnsError::NotRoot { uid }),
    }
}

/// Runs `ip` with `args` and returns its standard output.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command that runs `program` inside namespace `ns` (`ip netns exec`, which also mounts a
/// fresh /sys for it).
pub fn exec(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh name base, `<prefix><pid>-<n>`, unique within this process and among live processes.
pub fn unique_base(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{n}", std::process::id())
}

/// Removes the namespaces named `<prefix><pid>-…` whose process `pid` no longer exists: what a
/// killed run left behind. Namespaces of live processes (parallel runs) are left alone.
pub fn remove_stale(prefix: &str) {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(prefix) else {
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

/// Runs `f` on a fresh thread that has joined network namespace `ns`: sockets it creates and
/// interface names it resolves belong to that namespace. Other threads are unaffected, and a
/// panic in `f` is passed on to the caller.
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> Result<R, NetnsError> {
    let enter = |source| NetnsError::Enter {
        ns: ns.to_owned(),
        source,
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = File::open(format!("/run/netns/{ns}")).map_err(enter)?;
                // SAFETY: setns(2) reads only the descriptor, which `file` keeps open for the
                // call; it moves only this thread, which ends when `f` returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(enter(std::io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// One network namespace with its loopback up, deleted when dropped (with everything in it: a
/// veth whose one end is deleted goes with it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` and brings its loopback up.
    pub fn create(name: impl Into<String>) -> Result<Self, NetnsError> {
        require_root()?;
        let name = name.into();
        ip(&["netns", "add", &name])?;
        // From here on Drop removes it, whatever fails next.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` and `/run/netns/` know it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <this> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` in this namespace (see [`exec`]).
    pub fn exec(&self, program: &str) -> Command {
        exec(&self.name, program)
    }

    /// Sets a per-namespace sysctl (`net.*`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let ok = self
            .exec("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Ok(())
        } else {
            Err(NetnsError::Sysctl {
                ns: self.name.clone(),
                key: key.to_owned(),
                value: value.to_owned(),
            })
        }
    }

    /// `ip -n <this> link show <dev>`, as text.
    pub fn link_show(&self, dev: &str) -> Result<String, NetnsError> {
        self.ip(&["link", "show", "dev", dev])
    }
}

/// Names are what the callers pass to `ip` and `/run/netns/`: a `&Netns` goes where a `&str` does.
impl std::ops::Deref for Netns {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// One end of a veth: its namespace, its name and its addresses (CIDR; IPv6 ones are added
/// `nodad`, so they are usable at once instead of after duplicate address detection).
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    /// The namespace the end lives in.
    pub ns: &'a Netns,
    /// The interface name.
    pub dev: &'a str,
    /// Its addresses, e.g. `10.211.0.1/30`, `fd00:211::1/64`.
    pub addrs: &'a [&'a str],
}

/// Joins two namespaces with a veth: created in `a`'s namespace with its peer moved straight into
/// `b`'s, addressed, and both ends up.
pub fn veth(a: End<'_>, b: End<'_>) -> Result<(), NetnsError> {
    a.ns.ip(&[
        "link", "add", a.dev, "type", "veth", "peer", "name", b.dev, "netns", b.ns,
    ])?;
    for end in [a, b] {
        for addr in end.addrs {
            let mut args = vec!["addr", "add", addr, "dev", end.dev];
            if addr.contains(':') {
                args.push("nodad");
            }
            end.ns.ip(&args)?;
        }
        end.ns.ip(&["link", "set", end.dev, "up"])?;
    }
    Ok(())
}

/// Two namespaces `a` and `b` joined by a veth `va` (in `a`) — `vb` (in `b`). Dropping it deletes
/// both namespaces, and with them the veth, whether its owner returned or panicked.
#[derive(Debug)]
pub struct NetnsPair {
    /// The namespace holding [`NetnsPair::VA`] (the client side).
    pub a: Netns,
    /// The namespace holding [`NetnsPair::VB`] (the side a program is attached in).
    pub b: Netns,
}

impl NetnsPair {
    /// The interface in `a`.
    pub const VA: &'static str = "va";
    /// The interface in `b`.
    pub const VB: &'static str = "vb";

    /// Creates `<base>-a` and `<base>-b` (base from [`unique_base`]) with the given addresses on
    /// `va` and `vb`, after removing what killed runs with the same prefix left behind.
    pub fn create(prefix: &str, a_addrs: &[&str], b_addrs: &[&str]) -> Result<Self, NetnsError> {
        require_root()?;
        remove_stale(prefix);
        let base = unique_base(prefix);
        let pair = Self {
            a: Netns::create(format!("{base}-a"))?,
            b: Netns::create(format!("{base}-b"))?,
        };
        veth(
            End {
                ns: &pair.a,
                dev: Self::VA,
                addrs: a_addrs,
            },
            End {
                ns: &pair.b,
                dev: Self::VB,
                addrs: b_addrs,
            },
        )?;
        Ok(pair)
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Outside root this skips loudly; under CI (which runs as root) it fails instead.
    fn root(test: &str) -> bool {
        if is_root() {
            return true;
        }
        crate::skip::skip(test, "root", "network namespaces; run the tests as root");
        false
    }

    fn exists(name: &str) -> bool {
        ip(&["netns", "list"])
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }

    #[test]
    fn a_pair_is_joined_and_removed_on_drop() {
        if !root("a_pair_is_joined_and_removed_on_drop") {
            return;
        }
        let pair = NetnsPair::create(
            "scm-nt-ok-",
            &["10.213.0.1/30"],
            &["10.213.0.2/30", "fd00:213::2/64"],
        )
        .unwrap();
        let (a, b) = (pair.a.name().to_owned(), pair.b.name().to_owned());
        assert!(exists(&a) && exists(&b));
        assert!(pair.b.link_show("vb").unwrap().contains("UP"));
        // The address exists inside b and nowhere else.
        in_netns(&pair.b, || std::net::TcpListener::bind("10.213.0.2:0"))
            .unwrap()
            .unwrap();
        assert!(std::net::TcpListener::bind("10.213.0.2:0").is_err());
        let reached = pair
            .a
            .exec("ping")
            .args(["-c", "1", "-W", "2", "10.213.0.2"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(reached.success(), "a cannot reach b over the veth");
        drop(pair);
        assert!(!exists(&a) && !exists(&b));
    }

    #[test]
    fn namespaces_are_removed_when_the_owner_panics() {
        if !root("namespaces_are_removed_when_the_owner_panics") {
            return;
        }
        let mut names = Vec::new();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let pair =
                NetnsPair::create("scm-nt-panic-", &["10.214.0.1/30"], &["10.214.0.2/30"]).unwrap();
            names = vec![pair.a.name().to_owned(), pair.b.name().to_owned()];
            assert!(names.iter().all(|n| exists(n)));
            panic!("the test using the pair fails");
        }));
        assert!(outcome.is_err());
        assert_eq!(names.len(), 2);
        for n in &names {
            assert!(!exists(n), "{n} outlived a panic");
        }
    }

    #[test]
    fn a_failed_step_leaves_no_namespace_behind() {
        if !root("a_failed_step_leaves_no_namespace_behind") {
            return;
        }
        let prefix = "scm-nt-fail-";
        let err = NetnsPair::create(prefix, &["not-an-address"], &[]).unwrap_err();
        assert!(matches!(err, NetnsError::Ip { .. }), "{err}");
        assert!(err.to_string().contains("not-an-address"), "{err}");
        let mine = format!("{prefix}{}-", std::process::id());
        let left = ip(&["netns", "list"]).unwrap();
        assert!(!left.contains(&mine), "left behind: {left}");
    }

    #[test]
    fn stale_namespaces_of_dead_processes_are_removed() {
        if !root("stale_namespaces_of_dead_processes_are_removed") {
            return;
        }
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = format!("scm-nt-stale-{dead}-0-a");
        let live = Netns::create(unique_base("scm-nt-stale-")).unwrap();
        ip(&["netns", "add", &stale]).unwrap();
        remove_stale("scm-nt-stale-");
        let gone = !exists(&stale);
        let _ = ip(&["netns", "del", &stale]);
        assert!(gone, "the dead run's namespace is still there");
        assert!(
            exists(live.name()),
            "a live process's namespace was removed"
        );
    }
}
