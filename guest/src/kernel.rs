//! The guest kernel: Debian bookworm's cloud kernel package, fetched once and kept unpacked in a
//! cache outside any cargo target directory, so `cargo clean` does not throw it away.
//!
//! The versioned package is resolved through the metapackage `linux-image-cloud-amd64` whenever
//! the cache is empty: Debian's security updates renumber it (`6.1.0-NN`) and drop old ones, so a
//! name written down here would stop downloading. The package is fetched with `apt-get download`
//! and unpacked with `dpkg -x`; it is never installed on the host.

use std::fs;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::GuestError;
use crate::host::{is_root, run_tool};

/// The metapackage that always names the current bookworm cloud kernel.
pub const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// An unpacked kernel package in the cache.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// The kernel release (`uname -r` inside the guest), e.g. `6.1.0-57-cloud-amd64`.
    pub(crate) release: String,
    /// The unpacked package's root (holds `boot/` and `lib/modules/<release>/`).
    pub(crate) root: PathBuf,
}

impl Kernel {
    /// The bootable image.
    pub(crate) fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }

    /// `lib/modules/<release>` of the unpacked package.
    pub(crate) fn modules_dir(&self) -> PathBuf {
        self.root.join(format!("lib/modules/{}", self.release))
    }
}

/// Where the kernel cache lives: `$SCM_GUEST_CACHE`, else `$XDG_CACHE_HOME/scm-guest`, else
/// `$HOME/.cache/scm-guest`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SCM_GUEST_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("scm-guest");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/scm-guest")
}

/// The cached kernel, fetched first if the cache holds none. Parallel callers (test binaries
/// run side by side) serialise on a lock file, so one download serves them all.
pub(crate) fn ensure() -> Result<Kernel, GuestError> {
    let cache = cache_dir();
    fs::create_dir_all(&cache)
        .map_err(|e| GuestError::io(format!("creating {}", cache.display()), e))?;
    let _lock = Lock::take(&cache.join(".lock"))?;
    if let Some(kernel) = cached(&cache) {
        return Ok(kernel);
    }
    fetch(&cache)
}

/// The kernel named by the cache's `current` file, if it is there and complete.
pub(crate) fn cached(cache: &Path) -> Option<Kernel> {
    let release = fs::read_to_string(cache.join("current"))
        .ok()?
        .trim()
        .to_owned();
    let kernel = Kernel {
        root: cache.join(&release),
        release,
    };
    (kernel.vmlinuz().is_file() && kernel.modules_dir().join("modules.dep").is_file())
        .then_some(kernel)
}

/// The versioned kernel package the metapackage depends on, e.g. `linux-image-6.1.0-57-cloud-amd64`.
fn resolve() -> Result<Option<String>, GuestError> {
    let out = Command::new("apt-cache")
        .args(["depends", METAPACKAGE])
        .stderr(Stdio::null())
        .output()
        .map_err(|_| GuestError::Unavailable {
            what:
                "apt-cache (the guest kernel comes from Debian's archive; this needs a Debian host)"
                    .into(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_owned))
}

fn fetch(cache: &Path) -> Result<Kernel, GuestError> {
    let mut package = resolve()?;
    if package.is_none() && is_root() {
        // Empty or stale lists (a fresh container): refresh once, as `cargo xtask setup` does.
        let _ = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdin(Stdio::null())
            .status();
        package = resolve()?;
    }
    let package = package.ok_or_else(|| GuestError::Unavailable {
        what: format!(
            "the Debian package {METAPACKAGE} in apt's lists (run `apt-get update`, or `cargo xtask setup`)"
        ),
    })?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    let staging = cache.join(format!(".fetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)
        .map_err(|e| GuestError::io(format!("creating {}", staging.display()), e))?;
    let result = unpack(&package, &release, &staging);
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result?;
    let root = cache.join(&release);
    let _ = fs::remove_dir_all(&root);
    fs::rename(staging.join("root"), &root).map_err(|e| {
        GuestError::io(
            format!("moving the unpacked kernel to {}", root.display()),
            e,
        )
    })?;
    let _ = fs::remove_dir_all(&staging);
    fs::write(cache.join("current"), format!("{release}\n"))
        .map_err(|e| GuestError::io(format!("writing {}", cache.join("current").display()), e))?;
    cached(cache).ok_or_else(|| GuestError::Kernel {
        why: format!(
            "{package} unpacked into {} lacks boot/vmlinuz-{release} or modules.dep",
            root.display()
        ),
    })
}

/// Downloads `package` into `staging`, unpacks it to `staging/root`, writes `modules.dep` (the
/// package ships none) and deletes the `.deb`.
fn unpack(package: &str, release: &str, staging: &Path) -> Result<(), GuestError> {
    eprintln!(
        "scm-guest: fetching the guest kernel {package} (apt-get download; not installed on this host)"
    );
    let out = Command::new("apt-get")
        .args(["download", "-qq", package])
        .current_dir(staging)
        .stdin(Stdio::null())
        .output()
        .map_err(|_| GuestError::Unavailable {
            what: "apt-get".into(),
        })?;
    let deb = fs::read_dir(staging)
        .map_err(|e| GuestError::io(format!("reading {}", staging.display()), e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"));
    let Some(deb) = deb else {
        return Err(GuestError::Unavailable {
            what: format!(
                "the kernel package {package} (apt-get download failed: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    };
    let root = staging.join("root");
    run_tool(
        Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        "dpkg -x",
    )?;
    let _ = fs::remove_file(&deb);
    // Docs are not needed to boot.
    let _ = fs::remove_dir_all(root.join("usr/share"));
    run_tool(
        Command::new("busybox")
            .arg("depmod")
            .arg("-b")
            .arg(&root)
            .arg(release),
        "busybox depmod",
    )?;
    Ok(())
}

/// An exclusive `flock` on a file, released when dropped (and by the kernel if we die).
struct Lock(fs::File);

impl Lock {
    fn take(path: &Path) -> Result<Self, GuestError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| GuestError::io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on a file descriptor this function owns for the call's duration.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(GuestError::io(
                format!("locking {}", path.display()),
                io::Error::last_os_error(),
            ));
        }
        Ok(Self(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor this guard owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
