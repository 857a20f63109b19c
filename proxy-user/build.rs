//! Builds the kernel programs (`proxy-ebpf`) for `bpfel-unknown-none` with the nightly toolchain
//! and leaves the object in `OUT_DIR`, where `src/xdp.rs` embeds it. The eBPF package is found
//! through `cargo metadata` (as aya-template does), not by a path relative to this crate, so a
//! moved or renamed directory is followed; its release profile (debug info for BTF, one codegen
//! unit) is in the workspace's Cargo.toml.
//!
//! The user-space crate builds on stable; only this nested build needs nightly's `rust-src`
//! (for `-Z build-std=core`) and `bpf-linker`. When either is missing, say how to get it instead
//! of letting the nested cargo fail with a screen of unrelated output.
//!
//! aya-build forwards every line of the nested build (each crate compiled, some 300 lines) as a
//! `cargo:warning`, which cargo prints on every build of this crate, in CI and in the demo. The
//! build script points its stdout at `OUT_DIR/ebpf-build.log` while aya-build runs, then passes
//! cargo the directives it needs (`rerun-if-*`) and keeps the rest in the log: cargo shows the
//! nested output only when the eBPF build failed. The eBPF crate's own warnings are not lost:
//! `cargo xtask lint` runs clippy on it with `-D warnings`.

use std::{
    env,
    fs::File,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use aya_build::Toolchain;
use cargo_metadata::MetadataCommand;

/// The toolchain the eBPF crate is built with; `cargo xtask setup` installs its `rust-src` and
/// links `bpf-linker` against its libLLVM.
const EBPF_TOOLCHAIN: &str = "nightly";

/// The kernel programs' package.
const EBPF_PACKAGE: &str = "proxy-ebpf";

const SETUP_HINT: &str = "run `cargo xtask setup` once on this machine (it installs what the \
eBPF build needs)";

fn main() -> anyhow::Result<()> {
    check_prerequisites()?;
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let metadata = MetadataCommand::new()
        .manifest_path(manifest_dir.join("Cargo.toml"))
        .no_deps()
        .exec()
        .context("running `cargo metadata` to find the eBPF package")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .with_context(|| format!("the workspace has no package {EBPF_PACKAGE}"))?;
    let root_dir = ebpf.manifest_path.parent().with_context(|| {
        format!(
            "{EBPF_PACKAGE}'s manifest {} has no directory",
            ebpf.manifest_path
        )
    })?;
    let package = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    let log = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join("ebpf-build.log");
    let built = with_stdout_to(&log, || {
        aya_build::build_ebpf([package], Toolchain::Custom(EBPF_TOOLCHAIN))
    })
    .with_context(|| format!("redirecting the eBPF build's output to {}", log.display()))?;
    let text = std::fs::read_to_string(&log)
        .with_context(|| format!("reading the eBPF build's log {}", log.display()))?;
    for line in text.lines() {
        // Directives cargo acts on pass through; the forwarded compiler output only on failure.
        if !line.starts_with("cargo:warning=") || built.is_err() {
            println!("{line}");
        }
    }
    built.with_context(|| {
        format!(
            "building the eBPF programs (proxy-ebpf) failed; its compiler output is above and in {}",
            log.display()
        )
    })
}

/// Runs `f` with this process's stdout (fd 1) pointing at a new file `path`, then points it back.
fn with_stdout_to<T>(path: &Path, f: impl FnOnce() -> T) -> io::Result<T> {
    let file = File::create(path)?;
    io::stdout().flush()?;
    let saved = rustix::io::dup(io::stdout())?;
    rustix::stdio::dup2_stdout(&file)?;
    let out = f();
    // Lines `f` printed sit in std's buffer until flushed: they belong to the file.
    let flushed = io::stdout().flush();
    rustix::stdio::dup2_stdout(&saved)?;
    flushed?;
    Ok(out)
}

fn check_prerequisites() -> anyhow::Result<()> {
    if env::var_os("AYA_BUILD_SKIP").is_some() {
        return Ok(());
    }
    let on_path = env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !on_path {
        bail!("bpf-linker is not on PATH; the eBPF programs cannot be linked: {SETUP_HINT}");
    }
    let output = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .with_context(|| {
            format!("running rustup to find the {EBPF_TOOLCHAIN} toolchain: {SETUP_HINT}")
        })?;
    if !output.status.success() {
        bail!(
            "the {EBPF_TOOLCHAIN} toolchain is not installed ({}): {SETUP_HINT}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let core = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core.is_file() {
        bail!(
            "the {EBPF_TOOLCHAIN} toolchain has no rust-src component ({} is missing), which \
             `-Z build-std=core` needs: {SETUP_HINT}",
            core.display()
        );
    }
    Ok(())
}
