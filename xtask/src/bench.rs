//! `cargo xtask bench`: installs what the benchmark drives (nginx with its stream module, wrk,
//! openssl, iproute2), builds scm-bench and the scm binaries in release mode, and runs
//! `scm-bench run`, which writes the side-by-side table and the latency plot to bench/results/.

use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd::{self, is_root, output};

/// Debian packages the benchmark needs, with what for.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "nginx",
        "the peer: TLS termination with auth_request, and the HTTP back end",
    ),
    (
        "libnginx-mod-stream",
        "nginx stream: TLS termination + TCP forward",
    ),
    (
        "wrk",
        "cross-checking scm-bench's requests/s with another client",
    ),
    ("openssl", "the machine's ceilings: openssl speed"),
    (
        "iproute2",
        "the benchmark's network namespaces and veth pairs",
    ),
    (
        "util-linux",
        "taskset, to pin the proxy under test to one CPU",
    ),
    (
        "linux-perf",
        "profiles of the proxies under test (cargo xtask bench --perf)",
    ),
];

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Short trials (about 3 minutes each, after the build): shorter loads, 128 MiB transfers.
    #[arg(long)]
    quick: bool,
    /// Interleaved trials of each side (nginx, scm, nginx, scm, …); the report gives medians
    /// and ranges, and names a winner only where every trial agrees. Below 5 is a first look.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=50))]
    trials: u16,
    /// Measure nginx only (do not build or run the scm binaries).
    #[arg(long)]
    nginx_only: bool,
    /// Also record a perf profile of each proxy under test at max rate (bench/results/perf-*.txt).
    #[arg(long)]
    perf: bool,
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt() -> Result<()> {
    let absent: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if absent.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the benchmark needs {}; as root: apt-get install -y {}",
            absent.join(", "),
            absent.join(" ")
        );
    }
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&absent)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Builds and runs the benchmark.
pub fn run(args: &BenchArgs) -> Result<()> {
    if !is_root() {
        bail!("the benchmark makes network namespaces: run it as root");
    }
    apt()?;
    let release = cmd::target_dir().join("release");
    let mut run = Command::new(release.join("scm-bench"));
    run.arg("run")
        .arg("--out")
        .arg(cmd::root().join("bench/results"))
        .arg("--repo")
        .arg(cmd::root());
    if args.quick {
        run.arg("--quick");
    }
    run.args(["--trials", &args.trials.to_string()]);
    if args.perf {
        run.arg("--perf");
    }
    let bench_only = ["build", "--release", "--locked", "-p", "scm-bench"];
    if args.nginx_only {
        cmd::cargo(&bench_only)?;
    } else {
        // scm-proxy's build script builds the eBPF programs: the same setup the demo needs.
        crate::setup::run(&crate::setup::SetupArgs::default())?;
        // One cargo invocation for all four, so features unify once and a second run rebuilds
        // nothing. The scm side is measured only if its binaries build; the report says so.
        let all = [
            "build",
            "--release",
            "--locked",
            "-p",
            "scm-bench",
            "-p",
            "scm-proxy",
            "-p",
            "scm-security",
            "-p",
            "scm-device",
        ];
        match cmd::cargo(&all) {
            Ok(()) => {
                run.arg("--scm-bin-dir").arg(&release);
            }
            Err(e) => {
                eprintln!("bench: scm binaries did not build ({e:#}); measuring nginx only");
                cmd::cargo(&bench_only)?;
            }
        }
    }
    cmd::run(&mut run)
}
