//! `cargo xtask`: the project's tasks, so that a fresh machine needs nothing but this repository.
//!
//! Every task that needs the eBPF toolchain or system packages runs `setup` first; `setup` is
//! idempotent and takes a second when everything is already there.

mod bench;
mod cmd;
mod demo;
mod fuzz;
mod netns;
mod package;
mod setup;
mod vm;
mod workflow;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// scm developer tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what builds and tests need: apt packages, nightly rust-src, bpf-linker linked
    /// against the nightly toolchain's own LLVM, a mounted bpffs. Idempotent.
    Setup(setup::SetupArgs),
    /// Check formatting, run clippy with -D warnings on user space and on the eBPF crate, and
    /// check the dependency graph with cargo deny (licences, bans and duplicates, sources).
    Lint,
    /// Run setup, then every test of the workspace (the README's test command), then
    /// scm-proxy's data-plane tests again inside Debian 12's 6.1 kernel (one qemu boot).
    ///
    /// Arguments after `--` go to the host's `cargo test`, e.g. `cargo xtask test -- -p scm-proto`.
    /// The guest run proves the eBPF data plane on the kernel Debian 12 ships; where qemu or the
    /// kernel package is missing it is skipped with a banner (a failure under CI=true or CI=1).
    Test {
        /// Skip the guest-kernel run of the data-plane tests.
        #[arg(long, env = "SCM_TEST_NO_GUEST", conflicts_with = "guest_only")]
        no_guest: bool,
        /// Only the guest-kernel run of the data-plane tests (no host `cargo test`).
        #[arg(long, env = "SCM_TEST_GUEST_ONLY")]
        guest_only: bool,
        /// Arguments for the test binaries inside the guest (libtest's: a name filter,
        /// `--test-threads=1`, ...), repeatable.
        #[arg(long = "guest-arg", value_name = "ARG", allow_hyphen_values = true)]
        guest_args: Vec<String>,
        /// vCPUs of the guest (each is a host thread of emulation).
        #[arg(long, default_value_t = 2, env = "SCM_TEST_GUEST_CPUS")]
        guest_cpus: u32,
        /// Extra arguments for `cargo test`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Run one command inside Debian 12's 6.1 cloud kernel under qemu: see `cargo xtask vm --help`.
    #[command(long_about = vm::LONG_ABOUT)]
    Vm(vm::VmArgs),
    /// Run the demo (the README's first command): see `cargo xtask demo --help`.
    Demo(demo::DemoArgs),
    /// Benchmark scm-proxy against nginx side by side: see `cargo xtask bench --help`.
    Bench(bench::BenchArgs),
    /// Run one cargo-fuzz target on nightly for a while: see `cargo xtask fuzz --help`.
    Fuzz(fuzz::FuzzArgs),
    /// Build the scm-security, scm-proxy and scm-device .deb packages (units, env files, man
    /// pages, completions): see `cargo xtask package --help`.
    Package(package::PackageArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup(args) => setup::run(&args),
        Task::Lint => lint(),
        Task::Test {
            no_guest,
            guest_only,
            guest_args,
            guest_cpus,
            cargo_args,
        } => test(&cargo_args, !no_guest, guest_only, &guest_args, guest_cpus),
        Task::Vm(args) => {
            let code = vm::run(&args)?;
            std::process::exit(code)
        }
        Task::Demo(args) => {
            // The setup's and the builds' output go to a log, the terminal gets a few lines.
            cmd::quiet_into(&demo::log_dir().join("demo.log"))?;
            setup::run(&setup::SetupArgs::default())?;
            demo::run(&args)
        }
        Task::Bench(args) => bench::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Package(args) => package::run(&args).map(drop),
    }
}

fn lint() -> Result<()> {
    setup::run(&setup::SetupArgs::default())?;
    cmd::cargo(&["fmt", "--all", "--check"])?;
    cmd::cargo(&[
        "clippy",
        "--locked",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cmd::cargo_ebpf_clippy()?;
    // The dependency graph: licences, banned crates and duplicate versions (each exception is
    // explained in deny.toml), sources. Advisories need RustSec's database: `.ci/run` checks
    // them where a copy is cached.
    setup::ensure_cargo_deny()?;
    cmd::cargo(&["deny", "--locked", "check", "licenses", "bans", "sources"])?;
    Ok(())
}

fn test(
    extra: &[String],
    guest: bool,
    guest_only: bool,
    guest_args: &[String],
    guest_cpus: u32,
) -> Result<()> {
    setup::run(&setup::SetupArgs::default())?;
    if !guest_only {
        let mut args: Vec<&str> = vec!["test", "--locked"];
        args.extend(extra.iter().map(String::as_str));
        cmd::cargo(&args)?;
    }
    if !guest {
        eprintln!("test: --no-guest: the data-plane tests did not run in the guest kernel");
        return Ok(());
    }
    match vm::data_plane_tests(guest_args, guest_cpus) {
        Err(e)
            if e.downcast_ref::<scm_guest::GuestError>()
                .is_some_and(scm_guest::GuestError::is_unavailable) =>
        {
            scm_netns::skip::skip(
                "cargo xtask test (guest kernel)",
                "qemu, busybox, cpio and Debian's kernel package",
                &format!("{e:#}; `cargo xtask setup` installs them"),
            );
            Ok(())
        }
        other => other,
    }
}
