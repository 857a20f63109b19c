//! `cargo xtask package`: the `scm-security`, `scm-proxy` and `scm-device` .deb packages.
//!
//! Builds the three binaries, has each write its own man pages, shell completions and (for the
//! daemons) the commented `EnvironmentFile` through its hidden `generate` subcommand, so nothing
//! a package ships can drift from the binary's `--help`; then cargo-deb packs them with the
//! systemd units and maintainer scripts of each crate's `debian/` folder.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Options of `cargo xtask package`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Output: one .deb per package in --out (default target/debian), listed at the end.

Each package holds the binary (stripped), its man pages (`man scm-security-serve`), bash, zsh
and fish completions, and for the daemons the systemd unit, /etc/scm/<daemon>.env (every flag's
environment twin, commented, with its help text) and the postinst that makes the system user.
docs/operations.md \"Install on a host\" says what to do with them.

--debug packs the debug build (the test in tests/tests/package.rs does, to spare CI a release
build of about 16 minutes), compressed faster: the package holds the same files, only the
binaries are unoptimised.

Examples:
  cargo xtask package
  cargo xtask package --debug --out /tmp/debs
  sudo apt-get install ./target/debian/scm-security_*.deb")]
pub struct PackageArgs {
    /// Package the debug build instead of the release build (same files, unoptimised binaries).
    #[arg(long, env = "SCM_PACKAGE_DEBUG")]
    debug: bool,
    /// Folder the .deb files are written to (created if missing).
    #[arg(long, env = "SCM_PACKAGE_OUT", value_name = "DIR")]
    out: Option<PathBuf>,
    /// Only these packages (repeatable; default: all three).
    #[arg(long = "package", short = 'p', value_enum)]
    packages: Vec<Package>,
}

/// One package: its cargo package, binary, and the subcommand its unit runs (None: no unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Package {
    #[value(name = "scm-security")]
    Security,
    #[value(name = "scm-proxy")]
    Proxy,
    #[value(name = "scm-device")]
    Device,
}

impl Package {
    const ALL: [Self; 3] = [Self::Security, Self::Proxy, Self::Device];

    /// The cargo package, the binary and the .deb are all named alike.
    fn name(self) -> &'static str {
        match self {
            Self::Security => "scm-security",
            Self::Proxy => "scm-proxy",
            Self::Device => "scm-device",
        }
    }

    /// The variables the package sets in its env file (its paths and listeners), uncommented.
    /// `generate env` refuses a name that is no flag's environment twin.
    fn env_file(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Security => Some(&[
                "SCM_DATA_DIR=/var/lib/scm/security",
                "SCM_TLS_CERT=/etc/scm/security/security.pem",
                "SCM_TLS_KEY=/etc/scm/security/security.key",
                "SCM_CLIENT_CA=/etc/scm/security/ca.pem",
                // Devices and proxies reach it from other hosts; the admin API stays local.
                "SCM_LISTEN=0.0.0.0:8443",
                "SCM_PROXY_API_LISTEN=0.0.0.0:8444",
                "SCM_METRICS_LISTEN=127.0.0.1:9200",
            ]),
            Self::Proxy => Some(&[
                "SCM_PROXY_LISTEN=0.0.0.0:443",
                "SCM_PROXY_TLS_CERT=/etc/scm/proxy/proxy.pem",
                "SCM_PROXY_TLS_KEY=/etc/scm/proxy/proxy.key",
                "SCM_PROXY_SECURITY_CA=/etc/scm/proxy/ca.pem",
                "SCM_PROXY_CLIENT_CERT=/etc/scm/proxy/proxy-client.pem",
                "SCM_PROXY_CLIENT_KEY=/etc/scm/proxy/proxy-client.key",
                "SCM_PROXY_METRICS_LISTEN=127.0.0.1:9100",
                // The unit runs the supervisor: one worker per CPU behind the eBPF steering.
                "SCM_PROXY_WORKERS=0",
            ]),
            Self::Device => None,
        }
    }
}

/// Builds the packages; returns the .deb files.
pub fn run(args: &PackageArgs) -> Result<Vec<PathBuf>> {
    let packages: Vec<Package> = if args.packages.is_empty() {
        Package::ALL.to_vec()
    } else {
        args.packages.clone()
    };
    ensure_cargo_deb()?;
    let (profile, profile_dir) = if args.debug {
        ("dev", "debug")
    } else {
        ("release", "release")
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| cmd::target_dir().join("debian"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let mut build: Vec<&str> = vec!["build", "--locked", "--profile", profile];
    for p in &packages {
        build.extend(["-p", p.name(), "--bin", p.name()]);
    }
    cmd::cargo(&build)?;

    let bin_dir = cmd::target_dir().join(profile_dir);
    let mut debs = Vec::new();
    for p in packages {
        let gen_dir = bin_dir.join("scm-package").join(p.name());
        generate(&bin_dir.join(p.name()), p, &gen_dir)?;
        debs.push(cargo_deb(p, profile, args.debug, &out)?);
    }
    println!("packages in {}:", out.display());
    for d in &debs {
        println!("  {}", d.display());
    }
    Ok(debs)
}

/// Man pages, completions and the env file, written by the binary itself into `dir`, where the
/// crate's `[package.metadata.deb]` assets expect them.
fn generate(bin: &Path, p: Package, dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    let quiet = |args: &[&str]| -> Result<()> {
        let out = Command::new(bin)
            .arg("generate")
            .args(args)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} generate {}: {}\n{}",
                bin.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let d = dir.to_string_lossy();
    quiet(&["man", &format!("{d}/man")])?;
    for shell in ["bash", "zsh", "fish"] {
        quiet(&["completions", shell, &format!("{d}/completions")])?;
    }
    if let Some(set) = p.env_file() {
        let out = format!("{d}/{}.env", p.name());
        let mut args = vec!["env", "serve", "--out", out.as_str()];
        for s in set {
            args.extend(["--set", s]);
        }
        quiet(&args)?;
    }
    let pages = fs::read_dir(dir.join("man"))?.count();
    eprintln!(
        "package: {}: {pages} man pages, bash/zsh/fish completions{}",
        p.name(),
        if p.env_file().is_some() {
            format!(", /etc/scm/{}.env", p.name())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `cargo deb` on the already-built binary; returns the .deb it wrote.
fn cargo_deb(p: Package, profile: &str, fast: bool, out: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.args(["deb", "--no-build", "--strip", "--profile", profile]);
    if fast {
        // A test package: lighter compression, the same files.
        cmd.arg("--fast");
    }
    let output = cmd
        .args(["-p", p.name(), "--output"])
        .arg(out)
        .current_dir(cmd::root())
        .output()
        .context("running cargo deb")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "cargo deb -p {}: {}\n{stdout}{}",
            p.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // cargo-deb prints the path of the package it wrote as its last line.
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb -p {} printed no .deb path: {stdout}", p.name()))?;
    Ok(deb)
}

/// The cargo-deb release the crates' `[package.metadata.deb]` is written for.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Installs cargo-deb if it is missing (about three minutes on two cores, once per machine).
pub fn ensure_cargo_deb() -> Result<()> {
    let have = cmd::output(Command::new("cargo").args(["deb", "--version"]));
    if have
        .as_deref()
        .is_some_and(|v| v.trim() == format!("cargo-deb {CARGO_DEB_VERSION}"))
    {
        return Ok(());
    }
    eprintln!("package: installing cargo-deb {CARGO_DEB_VERSION} (about three minutes)");
    cmd::run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))
}
