//! `cargo xtask`: the project's tasks, so that a fresh machine needs nothing but this repository.
//!
//! Every task that needs the eBPF toolchain or system packages runs `setup` first; `setup` is
//! idempotent and takes a second when everything is already there.

mod bench;
mod cmd;
mod demo;
mod netns;
mod setup;
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
    /// Run setup, then every test of the workspace (the README's test command).
    ///
    /// Arguments after `--` go to `cargo test`, e.g. `cargo xtask test -- -p scm-proto`.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Run the demo (the README's first command): see `cargo xtask demo --help`.
    Demo(demo::DemoArgs),
    /// Benchmark scm-proxy against nginx side by side: see `cargo xtask bench --help`.
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup(args) => setup::run(&args),
        Task::Lint => lint(),
        Task::Test { cargo_args } => test(&cargo_args),
        Task::Demo(args) => {
            setup::run(&setup::SetupArgs::default())?;
            demo::run(&args)
        }
        Task::Bench(args) => bench::run(&args),
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

fn test(extra: &[String]) -> Result<()> {
    setup::run(&setup::SetupArgs::default())?;
    let mut args: Vec<&str> = vec!["test", "--locked"];
    args.extend(extra.iter().map(String::as_str));
    cmd::cargo(&args)
}
