//! The guest's root file system: an uncompressed `newc` initramfs that busybox runs as `/init`.
//!
//! Host files go to the same absolute path (a test that finds a binary by
//! `env!("CARGO_BIN_EXE_...")` finds it there too) with the libraries `ldd` names; big ELF files
//! lose their debug info on the way (a debug test binary is mostly DWARF, and every byte of the
//! image is copied by the emulated kernel at boot). The cloud kernel has no 9p and this host no
//! vhost-vsock, so packing is the only way in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{GuestError, io_err};
use crate::kernel::Kernel;

/// ELF files above this size are copied without debug info.
const STRIP_ABOVE: u64 = 1 << 20;

/// The search path inside the guest; busybox's applets come last, so host tools packed at
/// their own paths (iproute2's `ip`, say) win over busybox's smaller ones.
pub const GUEST_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/.busybox";

/// A staged image: a scratch directory holding the tree and the archive, removed on drop.
#[derive(Debug)]
pub(crate) struct Image {
    scratch: PathBuf,
}

impl Image {
    /// The archive to give qemu's `-initrd`.
    pub(crate) fn archive(&self) -> PathBuf {
        self.scratch.join("initramfs.cpio")
    }

    /// The scratch directory (serial logs go there too).
    pub(crate) fn scratch(&self) -> &Path {
        &self.scratch
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.scratch);
    }
}

/// What goes into the image besides busybox and the init script.
#[derive(Debug)]
pub(crate) struct Contents<'a> {
    /// Host files or directories, packed at the same path.
    pub(crate) files: &'a [PathBuf],
    /// The generated init script.
    pub(crate) init: &'a str,
}

/// Kernel modules in load order (dependencies first), as paths relative to `lib/modules/<release>`.
pub(crate) fn resolve_modules(
    kernel: &Kernel,
    names: &[String],
) -> Result<Vec<String>, GuestError> {
    let dir = kernel.modules_dir();
    let dep_text = fs::read_to_string(dir.join("modules.dep"))
        .map_err(|e| io_err(format!("reading {}", dir.join("modules.dep").display()), e))?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for line in dep_text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        by_name.insert(module_name(module), module.to_owned());
        deps.insert(
            module.to_owned(),
            rest.split_whitespace().map(str::to_owned).collect(),
        );
    }
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in names {
        let key = normalise(name);
        match by_name.get(&key) {
            Some(path) => visit(path, &deps, &mut seen, &mut order),
            None if builtin.contains(&key) => {}
            None => {
                return Err(GuestError::NoSuchModule {
                    name: name.clone(),
                    release: kernel.release.clone(),
                });
            }
        }
    }
    Ok(order)
}

fn visit(
    path: &str,
    deps: &BTreeMap<String, Vec<String>>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(path.to_owned()) {
        return;
    }
    for dep in deps.get(path).into_iter().flatten() {
        visit(dep, deps, seen, order);
    }
    order.push(path.to_owned());
}

/// `kernel/crypto/ghash-generic.ko` -> `ghash_generic`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalise(file.strip_suffix(".ko").unwrap_or(file))
}

fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// Builds the image in a fresh scratch directory under the system's temp dir.
pub(crate) fn build(
    kernel: &Kernel,
    modules: &[String],
    contents: &Contents<'_>,
) -> Result<Image, GuestError> {
    static N: AtomicU32 = AtomicU32::new(0);
    let scratch = std::env::temp_dir().join(format!(
        "scm-guest-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)
        .map_err(|e| io_err(format!("creating {}", scratch.display()), e))?;
    let image = Image { scratch };
    let tree = image.scratch.join("root");
    stage(kernel, modules, contents, &tree)?;
    pack(&tree, &image.archive())?;
    // The archive holds everything now; the tree would only double the disk used.
    let _ = fs::remove_dir_all(&tree);
    Ok(image)
}

fn stage(
    kernel: &Kernel,
    modules: &[String],
    contents: &Contents<'_>,
    tree: &Path,
) -> Result<(), GuestError> {
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "var/tmp",
        "root", ".busybox",
    ] {
        mkdir(&tree.join(dir))?;
    }
    fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777))
        .map_err(|e| io_err("chmod /tmp in the image", e))?;
    let busybox = find_in_path("busybox").ok_or_else(|| GuestError::Unavailable {
        what: "busybox (apt-get install busybox-static)".into(),
    })?;
    copy(&busybox, &tree.join("bin/busybox"))?;
    for (link, to) in [("bin/sh", "busybox"), ("sbin/modprobe", "../bin/busybox")] {
        // The kernel asks /sbin/modprobe for modules it loads at run time (cipher helpers).
        let _ = symlink(to, tree.join(link));
    }
    write(&tree.join("init"), contents.init, 0o755)?;
    write(
        &tree.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost ip6-localhost\n",
        0o644,
    )?;
    write(
        &tree.join("etc/nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files\n",
        0o644,
    )?;
    write(
        &tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    write(&tree.join("etc/group"), "root:x:0:\n", 0o644)?;

    // Modules, and a modules.dep/alias cut down to them for the kernel's own requests.
    let src = kernel.modules_dir();
    let dst = tree.join(format!("lib/modules/{}", kernel.release));
    mkdir(&dst)?;
    let packed: BTreeSet<String> = modules.iter().map(|m| module_name(m)).collect();
    for module in modules {
        let at = dst.join(module);
        if let Some(parent) = at.parent() {
            mkdir(parent)?;
        }
        copy(&src.join(module), &at)?;
    }
    let dep = fs::read_to_string(src.join("modules.dep")).unwrap_or_default();
    let dep: String = dep
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(m, _)| modules.iter().any(|x| x == m))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write(&dst.join("modules.dep"), &dep, 0o644)?;
    let alias = fs::read_to_string(src.join("modules.alias")).unwrap_or_default();
    let alias: String = alias
        .lines()
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .is_some_and(|m| packed.contains(&normalise(m)))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write(&dst.join("modules.alias"), &alias, 0o644)?;
    for extra in ["modules.builtin", "modules.builtin.modinfo"] {
        if src.join(extra).is_file() {
            copy(&src.join(extra), &dst.join(extra))?;
        }
    }

    // Host files and their libraries, each once.
    let mut queue: Vec<PathBuf> = Vec::new();
    for file in contents.files {
        collect(file, &mut queue)?;
    }
    let mut done = BTreeSet::new();
    while let Some(file) = queue.pop() {
        if !done.insert(file.clone()) {
            continue;
        }
        let at = tree.join(file.strip_prefix("/").unwrap_or(&file));
        if is_elf(&file) {
            queue.extend(libraries(&file)?);
        }
        if let Some(parent) = at.parent() {
            mkdir(parent)?;
        }
        let _ = fs::remove_file(&at);
        copy(&file, &at)?;
    }
    Ok(())
}

/// A host path, absolute, with every file under it if it is a directory.
fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), GuestError> {
    let path = std::path::absolute(path)
        .map_err(|e| io_err(format!("resolving {}", path.display()), e))?;
    let meta = fs::metadata(&path).map_err(|e| GuestError::NoSuchFile {
        path: path.clone(),
        source: e,
    })?;
    if meta.is_dir() {
        let entries =
            fs::read_dir(&path).map_err(|e| io_err(format!("reading {}", path.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(format!("reading {}", path.display()), e))?;
            collect(&entry.path(), out)?;
        }
    } else {
        out.push(path);
    }
    Ok(())
}

/// The shared libraries and the interpreter `ldd` lists for an ELF file (none for a static one).
fn libraries(file: &Path) -> Result<Vec<PathBuf>, GuestError> {
    let out = Command::new("ldd")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|_| GuestError::Unavailable {
            what: "ldd (libc-bin)".into(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            return Err(GuestError::MissingLibrary {
                file: file.to_owned(),
                line: line.to_owned(),
            });
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn is_elf(file: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Copies `from` to `to` (following links), without debug info for a big ELF file.
fn copy(from: &Path, to: &Path) -> Result<(), GuestError> {
    let size = fs::metadata(from).map(|m| m.len()).unwrap_or(0);
    if size > STRIP_ABOVE && is_elf(from) {
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(from)
            .arg(to)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if stripped {
            return Ok(());
        }
        // Without binutils the file goes in whole: bigger, not wrong.
    }
    fs::copy(from, to)
        .map(drop)
        .map_err(|e| io_err(format!("copying {} into the image", from.display()), e))
}

fn mkdir(dir: &Path) -> Result<(), GuestError> {
    fs::create_dir_all(dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), GuestError> {
    fs::write(path, text).map_err(|e| io_err(format!("writing {}", path.display()), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(format!("chmod {}", path.display()), e))
}

/// `cpio -o -H newc` of the tree, parents before children, links kept as links.
fn pack(tree: &Path, archive: &Path) -> Result<(), GuestError> {
    let mut list = String::new();
    walk(tree, tree, &mut list)?;
    let out = fs::File::create(archive)
        .map_err(|e| io_err(format!("creating {}", archive.display()), e))?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet", "--owner=0:0"])
        .current_dir(tree)
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|_| GuestError::Unavailable {
            what: "cpio (apt-get install cpio)".into(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin
            .write_all(list.as_bytes())
            .map_err(|e| io_err("feeding cpio its file list", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| io_err("waiting for cpio", e))?;
    if !out.status.success() {
        return Err(GuestError::Tool {
            tool: "cpio".into(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn walk(root: &Path, dir: &Path, list: &mut String) -> Result<(), GuestError> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| io_err(format!("reading {}", dir.display()), e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let _ = writeln!(list, "{}", rel.display());
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            walk(root, &path, list)?;
        }
    }
    Ok(())
}

/// The first `name` on `$PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
