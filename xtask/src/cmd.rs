//! Running child commands with the command line echoed, so a failure in CI says what failed.
//!
//! In quiet mode ([`quiet_into`], the demo's) a command's line and output go to a log file
//! instead of the terminal, and a failure quotes the log's last lines: the terminal shows what is
//! being done in a few lines, the log holds everything.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// The cargo target directory builds go to.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The cargo that runs us (so the toolchain stays the one rust-toolchain.toml picked).
fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The log file of quiet mode, once [`quiet_into`] set it.
static QUIET_LOG: OnceLock<PathBuf> = OnceLock::new();

/// From now on every [`run`] (and [`cargo`]) appends its command line and output to `log`
/// (created empty here) instead of writing to the terminal.
pub fn quiet_into(log: &Path) -> Result<()> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    File::create(log).with_context(|| format!("creating {}", log.display()))?;
    QUIET_LOG
        .set(log.to_path_buf())
        .map_err(|_| anyhow::anyhow!("quiet mode was already on"))
}

/// The quiet-mode log, if quiet mode is on.
pub fn quiet_log() -> Option<&'static Path> {
    QUIET_LOG.get().map(PathBuf::as_path)
}

/// Runs a command to completion, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let Some(log) = quiet_log() else {
        eprintln!("+ {shown}");
        let status = cmd
            .status()
            .with_context(|| format!("could not start {shown}"))?;
        if !status.success() {
            bail!("{shown} failed: {status}");
        }
        return Ok(());
    };
    let mut file = OpenOptions::new()
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(file, "+ {shown}")?;
    let status = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        bail!(
            "{shown} failed: {status}; its last lines (all of it in {}):\n{tail}",
            log.display()
        );
    }
    Ok(())
}

/// Runs a command and returns its stdout, or `None` if it could not run or failed.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo ARGS` in the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(cargo_bin()).args(args).current_dir(root()))
}

/// `cargo build` of `bins` from `packages`, in one progress line and its time.
pub fn build(packages: &[&str], bins: &[&str]) -> Result<()> {
    let mut args = vec!["build", "--locked"];
    for p in packages {
        args.extend(["-p", p]);
    }
    for b in bins {
        args.extend(["--bin", b]);
    }
    print!("demo: building {} (debug) ... ", bins.join(", "));
    std::io::Write::flush(&mut std::io::stdout())?;
    let start = std::time::Instant::now();
    cargo(&args)?;
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Clippy for the eBPF crate, which only builds with nightly for the BPF target.
pub fn cargo_ebpf_clippy() -> Result<()> {
    run(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--locked",
            "-p",
            "proxy-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ])
        // The host target dir holds stable-built artifacts; keep nightly's apart.
        .env("CARGO_TARGET_DIR", target_dir().join("ebpf-lint"))
        .current_dir(root()))
}

/// Whether this process runs as root.
pub use scm_netns::is_root;
