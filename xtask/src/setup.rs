//! `cargo xtask setup`: everything a fresh machine lacks for building and testing scm.
//!
//! Each piece is checked first and installed only when missing, so a second run takes about a
//! second. Without root, missing system pieces are reported with the command that installs them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, is_root, output};

/// Debian packages the tests and the demo use, with what for.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "network namespaces and veth pairs for the eBPF tests and the demo",
    ),
    ("iputils-ping", "ping across test namespaces"),
    ("netcat-openbsd", "plain TCP/UDP traffic in the demo"),
    ("bpftool", "inspecting loaded eBPF programs"),
    (
        "postgresql",
        "the Security server's PostgreSQL backend tests",
    ),
    ("slapd", "a real OpenLDAP directory for the LDAP tests"),
    ("ldap-utils", "loading the test directory into slapd"),
    (
        "nginx",
        "a real nginx auth_request in front of the Security server's forward-auth tests",
    ),
    (
        "python3-jwt",
        "PyJWT: the end-to-end test runs the documented back-end snippet that verifies assertions",
    ),
    ("python3-cryptography", "ES256 for PyJWT"),
    (
        "qemu-system-x86",
        "the guest running Debian 12's 6.1 kernel (kernel TLS; `cargo xtask vm`, the data-plane tests in `cargo xtask test`)",
    ),
    (
        "busybox-static",
        "the guest's /init and its tools (mount, insmod, ip, sh)",
    ),
    ("cpio", "packing the guest's initramfs"),
    (
        "haproxy",
        "the balancer in front of the proxy farm test (TCP mode, PROXY protocol v2)",
    ),
    (
        "ipvsadm",
        "the IPVS direct-routing farm test (run in the guest kernel, which has IPVS)",
    ),
    (
        "dpkg-dev",
        "dpkg-shlibdeps: the shared-library dependencies cargo-deb writes into the .deb files",
    ),
    (
        "debootstrap",
        "the fresh Debian 12 root the package test installs the .deb files into",
    ),
    (
        "systemd-container",
        "systemd-nspawn: the package test boots systemd in that root and starts the units",
    ),
];

/// The bpf-linker release known to build against the nightly toolchain's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-deny release `deny.toml` is written for (built from crates.io: about four minutes on
/// two cores, once per machine).
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Options of `cargo xtask setup`.
#[derive(Debug, Default, clap::Args)]
pub struct SetupArgs {
    /// Only report what is missing; install nothing (exit status 1 if anything is missing).
    #[arg(long)]
    check: bool,
}

/// Runs every setup step, reporting each on one line.
pub fn run(args: &SetupArgs) -> Result<()> {
    let mut missing = Vec::new();
    for (name, step) in [
        ("apt packages", apt as fn(bool) -> Result<Option<String>>),
        ("nightly rust-src", rust_src),
        ("bpf-linker", bpf_linker),
        ("bpffs at /sys/fs/bpf", bpffs),
        ("guest kernel", guest_kernel),
        ("cargo-deb", cargo_deb),
    ] {
        match step(args.check)? {
            None => eprintln!("setup: {name}: ok"),
            Some(what) => {
                eprintln!("setup: {name}: MISSING: {what}");
                missing.push(name);
            }
        }
    }
    kernel_report();
    if !missing.is_empty() {
        bail!("setup: missing {}", missing.join(", "));
    }
    Ok(())
}

fn apt(check: bool) -> Result<Option<String>> {
    let absent: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(pkg, _)| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if absent.is_empty() {
        return Ok(None);
    }
    let why: Vec<String> = APT_PACKAGES
        .iter()
        .filter(|(p, _)| absent.contains(p))
        .map(|(p, w)| format!("{p} ({w})"))
        .collect();
    let install = format!("apt-get update && apt-get install -y {}", absent.join(" "));
    if check {
        return Ok(Some(format!("{}; install with: {install}", why.join(", "))));
    }
    if !is_root() {
        return Ok(Some(format!("{}; run as root: {install}", why.join(", "))));
    }
    eprintln!("setup: installing {}", why.join(", "));
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&absent)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(None)
}

fn rust_src(check: bool) -> Result<Option<String>> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        return Ok(Some(
            "no nightly toolchain (the eBPF crate needs it): rustup toolchain install nightly"
                .into(),
        ));
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == "rust-src") {
        return Ok(None);
    }
    let fix = "rustup component add rust-src --toolchain nightly";
    if check {
        return Ok(Some(format!(
            "needed for -Z build-std=core; install with: {fix}"
        )));
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok(None)
}

/// Where the links to the nightly toolchain's libLLVM live, which bpf-linker is built against.
fn llvm_prefix() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/scm/rust-llvm")
}

/// Installs cargo-deny for `cargo xtask lint` and CI (licences, bans, sources, advisories) if this
/// release is missing. Not a step of `setup`: the demo and the tests do not need it, and building
/// it costs a fresh machine four minutes.
pub fn ensure_cargo_deny() -> Result<()> {
    match cargo_deny(false)? {
        None => Ok(()),
        Some(what) => anyhow::bail!("cargo-deny: {what}"),
    }
}

/// cargo-deb for `cargo xtask package` and the package test (built once per machine).
fn cargo_deb(check: bool) -> Result<Option<String>> {
    let want = format!("cargo-deb {}", crate::package::CARGO_DEB_VERSION);
    let have = output(Command::new("cargo").args(["deb", "--version"]));
    if have.as_deref().map(str::trim) == Some(want.as_str()) {
        return Ok(None);
    }
    if check {
        return Ok(Some(format!(
            "{want} is not installed; `cargo xtask setup` builds it (about three minutes)"
        )));
    }
    crate::package::ensure_cargo_deb()?;
    Ok(None)
}

fn cargo_deny(check: bool) -> Result<Option<String>> {
    let want = format!("cargo-deny {CARGO_DENY_VERSION}");
    let have = output(Command::new("cargo").args(["deny", "--version"]));
    if have.as_deref().map(str::trim) == Some(want.as_str()) {
        return Ok(None);
    }
    if check {
        return Ok(Some(format!(
            "{want} is not installed; `cargo xtask setup` builds it (about four minutes)"
        )));
    }
    eprintln!("setup: building {want} (about four minutes)");
    cmd::run(Command::new("cargo").args([
        "install",
        "cargo-deny",
        "--locked",
        "--version",
        CARGO_DENY_VERSION,
    ]))?;
    Ok(None)
}

fn bpf_linker(check: bool) -> Result<Option<String>> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .map(|s| PathBuf::from(s.trim()))
        .context("cannot ask the nightly toolchain for its sysroot (is nightly installed?)")?;
    let lib = find_libllvm(&sysroot.join("lib")).with_context(|| {
        format!(
            "no libLLVM.so.* in {}: this nightly does not ship the LLVM library bpf-linker needs",
            sysroot.join("lib").display()
        )
    })?;
    let lib_name = lib
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let prefix = llvm_prefix();
    let stamp = prefix.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} against {lib_name}\n");
    let linker_runs = output(Command::new("bpf-linker").arg("--version")).is_some();
    if linker_runs && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(None);
    }
    let major = lib_name
        .strip_prefix("libLLVM.so.")
        .and_then(|v| v.split('.').next())
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()) && !m.is_empty())
        .with_context(|| format!("cannot read the LLVM major version from {lib_name}"))?
        .to_owned();
    if check {
        return Ok(Some(format!(
            "bpf-linker {BPF_LINKER_VERSION} linked against {lib_name} is not installed; \
             `cargo xtask setup` builds it (about a minute)"
        )));
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's {lib_name}"
    );
    let libdir = prefix.join("lib");
    fs::create_dir_all(&libdir).with_context(|| format!("creating {}", libdir.display()))?;
    for link in [libdir.join("libLLVM.so"), libdir.join(&lib_name)] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {} to {}", link.display(), lib.display()))?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    cmd::run(
        Command::new(cargo)
            .args([
                "install",
                "--locked",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            // Outside the workspace, so its rust-toolchain.toml and config don't apply.
            .current_dir(std::env::temp_dir()),
    )?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(None)
}

fn find_libllvm(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
}

fn bpffs(check: bool) -> Result<Option<String>> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(None);
    }
    let fix = "mount -t bpf bpf /sys/fs/bpf";
    if check || !is_root() {
        return Ok(Some(format!(
            "pinned eBPF programs and maps need it; as root: {fix}"
        )));
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(None)
}

/// Debian's bookworm cloud kernel in scm-guest's cache (outside target/, so `cargo clean` keeps
/// it): fetched with `apt-get download`, unpacked, never installed on this host.
fn guest_kernel(check: bool) -> Result<Option<String>> {
    if let Some(release) = scm_guest::cached_kernel_release() {
        eprintln!(
            "setup: guest kernel {release} cached in {}",
            scm_guest::cache_dir().display()
        );
        return Ok(None);
    }
    if check {
        return Ok(Some(format!(
            "no {} in {}; `cargo xtask setup` fetches it (27 MB)",
            scm_guest::METAPACKAGE,
            scm_guest::cache_dir().display()
        )));
    }
    match scm_guest::Guest::new() {
        Ok(g) => {
            eprintln!(
                "setup: guest kernel {} fetched into {}",
                g.kernel_release(),
                scm_guest::cache_dir().display()
            );
            Ok(None)
        }
        Err(e @ scm_guest::GuestError::Unavailable { .. }) => Ok(Some(e.to_string())),
        Err(e) => Err(e).context("fetching the guest kernel"),
    }
}

/// Facts about the kernel that decide which data paths run; informational only.
fn kernel_report() {
    let release = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    eprintln!(
        "setup: kernel {} (BTF {}); kTLS availability is probed by scm-proxy at start-up",
        release.trim(),
        if btf {
            "present"
        } else {
            "ABSENT: CO-RE programs will not load"
        }
    );
}
