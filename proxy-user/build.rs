//! Builds the kernel programs (`proxy-ebpf`) for `bpfel-unknown-none` with the nightly toolchain
//! and leaves the object in `OUT_DIR`, where `src/xdp.rs` embeds it.
//!
//! The user-space crate builds on stable; only this nested build needs nightly's `rust-src`
//! (for `-Z build-std=core`) and `bpf-linker`. When either is missing, say how to get it instead
//! of letting the nested cargo fail with a screen of unrelated output.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use aya_build::Toolchain;

/// The toolchain the eBPF crate is built with; `cargo xtask setup` installs its `rust-src` and
/// links `bpf-linker` against its libLLVM.
const EBPF_TOOLCHAIN: &str = "nightly";

const SETUP_HINT: &str = "run `cargo xtask setup` once on this machine (it installs what the \
eBPF build needs)";

fn main() -> anyhow::Result<()> {
    check_prerequisites()?;
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("proxy-user has no parent directory")?
        .join("proxy-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .with_context(|| format!("non-UTF-8 path {}", ebpf_dir.display()))?;
    let package = aya_build::Package {
        name: "proxy-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(EBPF_TOOLCHAIN))
        .context("building the eBPF programs (proxy-ebpf) failed; its compiler output is above")
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
