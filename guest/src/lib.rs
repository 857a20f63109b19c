//! Runs one command inside Debian 12's 6.1 cloud kernel under qemu and brings back its exit code
//! and output: the kernel this host lacks (kernel TLS, IPVS, netem, ...) for tests and for
//! `cargo xtask vm` / `cargo xtask test`.
//!
//! ```no_run
//! # fn main() -> Result<(), scm_guest::GuestError> {
//! use std::ffi::OsStr;
//! let run = scm_guest::Guest::new()?
//!     .module("tls")
//!     .run(&[OsStr::new("cat"), OsStr::new("/proc/sys/net/ipv4/tcp_available_ulp")])?;
//! assert!(run.output.contains("tls"));
//! # Ok(()) }
//! ```
//!
//! How (each step is a pitfall met on these machines; `/work/shared/ktls-guest.md` has them all):
//! - The kernel is Debian's package, fetched once into a cache outside target/ ([`cache_dir`]).
//! - The root file system is an uncompressed initramfs built per run: busybox, a generated
//!   `/init`, the asked-for modules (with dependencies, loaded in order), the asked-for host files
//!   at the same paths with their `ldd` libraries. It is deleted when the run ends.
//! - qemu uses TCG (`-cpu max`: AES-NI, PCLMUL, AVX2 for the guest) unless `kvm_intel`/`kvm_amd`
//!   is loaded: the nested `kvm_pvm` of these hosts does not boot a stock kernel.
//! - The command's stdout and stderr go to a second serial port, raw, followed by an exit line
//!   tagged with a per-run nonce (nothing the command prints can forge it); the console goes to
//!   the first, and its tail explains a run that ended without one.
//!
//! Nothing here measures speed: an emulated guest is for function only.
#![warn(unreachable_pub)]

mod error;
mod host;
mod initramfs;
mod kernel;

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use error::GuestError;
use error::io_err;
pub use initramfs::GUEST_PATH;
pub use kernel::{METAPACKAGE, cache_dir};

/// Modules the kernel's TLS offload needs for every cipher suite the proxy negotiates
/// (AES-GCM 128/256, ChaCha20-Poly1305), in no particular order: the kernel looks the cipher
/// helpers up at run time, so `modules.dep` does not name them.
pub const KTLS_MODULES: &[&str] = &[
    "tls",
    "gf128mul",
    "ghash-generic",
    "ctr",
    "gcm",
    "cryptd",
    "crypto_simd",
    "aesni-intel",
    "libchacha",
    "chacha_generic",
    "chacha-x86_64",
    "libpoly1305",
    "poly1305_generic",
    "poly1305-x86_64",
    "chacha20poly1305",
];

/// What one guest run gave back.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The command's exit code (128 + N when signal N ended it, as a shell reports it).
    pub exit_code: i32,
    /// The command's stdout and stderr, interleaved as written.
    pub output: String,
    /// `uname -r` inside the guest.
    pub kernel_release: String,
}

/// A guest to run one command in (a builder: each run boots a fresh guest).
#[derive(Debug, Clone)]
pub struct Guest {
    kernel: kernel::Kernel,
    qemu: PathBuf,
    files: Vec<PathBuf>,
    modules: Vec<String>,
    env: Vec<(String, String)>,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    stream: bool,
}

impl Guest {
    /// Checks for qemu, busybox and cpio, and fetches the kernel into the cache if it is not there.
    pub fn new() -> Result<Guest, GuestError> {
        let qemu = initramfs::find_in_path("qemu-system-x86_64").ok_or_else(|| {
            GuestError::Unavailable {
                what:
                    "qemu-system-x86_64 (apt-get install qemu-system-x86, or `cargo xtask setup`)"
                        .into(),
            }
        })?;
        for (tool, package) in [("busybox", "busybox-static"), ("cpio", "cpio")] {
            if initramfs::find_in_path(tool).is_none() {
                return Err(GuestError::Unavailable {
                    what: format!("{tool} (apt-get install {package}, or `cargo xtask setup`)"),
                });
            }
        }
        for (tool, package) in [("dpkg", "dpkg"), ("ldd", "libc-bin")] {
            if initramfs::find_in_path(tool).is_none() {
                return Err(GuestError::Unavailable {
                    what: format!("{tool} (the {package} package of a Debian host)"),
                });
            }
        }
        let kernel = kernel::ensure()?;
        Ok(Guest {
            kernel,
            qemu,
            files: Vec::new(),
            modules: Vec::new(),
            env: Vec::new(),
            memory_mib: 2048,
            cpus: 1,
            timeout: Duration::from_secs(300),
            stream: false,
        })
    }

    /// Packs a host file (or a directory, recursively) at the same absolute path, with its
    /// `ldd` libraries.
    pub fn file(mut self, host_path: impl AsRef<Path>) -> Self {
        self.files.push(host_path.as_ref().to_owned());
        self
    }

    /// Loads a kernel module (e.g. `tls`, `veth`) and the modules it depends on, before the
    /// command runs. A built-in one is accepted and needs nothing.
    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.to_owned());
        self
    }

    /// [`Guest::module`] for each name, e.g. [`KTLS_MODULES`].
    pub fn modules(self, names: &[&str]) -> Self {
        names.iter().fold(self, |g, m| g.module(m))
    }

    /// Sets an environment variable for the command.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Guest memory (default 2048 MiB).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Guest CPUs (default 1: under emulation each costs a host core).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n.max(1);
        self
    }

    /// The host-side bound on the whole run, boot included (default 300 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Also copies the command's output, line by line as the guest writes it, to this process's
    /// stderr (a long run shows where it is; [`GuestRun::output`] still has all of it).
    pub fn stream_output(mut self, on: bool) -> Self {
        self.stream = on;
        self
    }

    /// The guest kernel's release (known before booting, from the cached package).
    pub fn kernel_release(&self) -> &str {
        &self.kernel.release
    }

    /// Boots the guest, runs `argv` in `/` and powers the guest off.
    pub fn run(self, argv: &[&OsStr]) -> Result<GuestRun, GuestError> {
        if argv.is_empty() {
            return Err(GuestError::NoCommand);
        }
        let modules = initramfs::resolve_modules(&self.kernel, &self.modules)?;
        let nonce = nonce();
        let script = init_script(
            &self.kernel.release,
            &modules,
            &self.env,
            argv,
            &nonce,
            host_open_files(),
        );
        let image = initramfs::build(
            &self.kernel,
            &modules,
            &initramfs::Contents {
                files: &self.files,
                init: &script,
            },
        )?;
        let console = image.scratch().join("console.log");
        let out = image.scratch().join("output.log");
        let mut cmd = Command::new(&self.qemu);
        if kvm_usable() {
            cmd.args(["-accel", "kvm", "-cpu", "host"]);
        } else {
            cmd.args(["-accel", "tcg", "-cpu", "max"]);
        }
        cmd.args([
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.cpus.to_string(),
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        .arg("-kernel")
        .arg(self.kernel.vmlinuz())
        .arg("-initrd")
        .arg(image.archive())
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet mitigations=off cryptomgr.notests rdinit=/init",
        ])
        .arg("-serial")
        .arg(serial_file(&console))
        .arg("-serial")
        .arg(serial_file(&out))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        // A file, not a pipe: qemu must never block on a full pipe nobody reads until it exits.
        let qemu_err = image.scratch().join("qemu.err");
        let err_file = fs::File::create(&qemu_err)
            .map_err(|e| io_err(format!("creating {}", qemu_err.display()), e))?;
        cmd.stderr(err_file);
        let mut child = cmd
            .spawn()
            .map_err(|e| io_err(format!("starting {}", self.qemu.display()), e))?;
        let deadline = Instant::now() + self.timeout;
        let mut streamer = self.stream.then(|| Streamer::new(&out, &nonce));
        let status = loop {
            if let Some(s) = streamer.as_mut() {
                s.pump();
            }
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let (_, output, _) = parse(&read_lossy(&out), &nonce);
                    return Err(GuestError::Timeout {
                        timeout: self.timeout,
                        output,
                        console: tail(&read_lossy(&console)),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(io_err("waiting for qemu", e)),
            }
        };
        if let Some(s) = streamer.as_mut() {
            s.pump();
        }
        let stderr = read_lossy(&qemu_err);
        let text = read_lossy(&out);
        let console_text = read_lossy(&console);
        if let Some(why) = setup_failure(&text, &nonce) {
            return Err(GuestError::Setup {
                why,
                console: tail(&console_text),
            });
        }
        let (release, output, exit) = parse(&text, &nonce);
        match exit {
            Some(exit_code) => Ok(GuestRun {
                exit_code,
                output,
                kernel_release: release.unwrap_or_else(|| self.kernel.release.clone()),
            }),
            None => Err(GuestError::NoExit {
                status: format!(
                    "{status}{}",
                    if stderr.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", stderr.trim())
                    }
                ),
                output,
                console: tail(&console_text),
            }),
        }
    }
}

/// Copies complete lines of the output port's file to stderr as they arrive, leaving out the
/// init script's own tagged lines.
struct Streamer {
    path: PathBuf,
    tag: String,
    offset: u64,
    partial: Vec<u8>,
}

impl Streamer {
    fn new(path: &Path, nonce: &str) -> Self {
        Self {
            path: path.to_owned(),
            tag: format!("@@{nonce} "),
            offset: 0,
            partial: Vec::new(),
        }
    }

    fn pump(&mut self) {
        use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut new = Vec::new();
        let Ok(n) = f.read_to_end(&mut new) else {
            return;
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&new);
        let mut err = std::io::stderr().lock();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            if !line.starts_with(self.tag.as_bytes()) {
                let _ = err.write_all(&line);
            }
        }
    }
}

/// The release of the kernel in the cache, if one is there (nothing is fetched).
pub fn cached_kernel_release() -> Option<String> {
    kernel::cached(&cache_dir()).map(|k| k.release)
}

/// Whether this host kernel has kernel TLS: `tls` in `tcp_available_ulp`, after asking for the
/// ULP on a fresh socket (that makes a modular kernel load `tls.ko` on its own, no modprobe).
pub fn host_has_ktls() -> bool {
    // SAFETY: a plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        let name = b"tls";
        // SAFETY: `name` outlives the call and its length is passed; the result (ENOTCONN on an
        // unconnected socket) does not matter, only the module auto-load it triggers.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_TCP,
                libc::TCP_ULP,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            );
            libc::close(fd);
        }
    }
    fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}

/// This process's (soft, hard) open-file limits, capped at the kernel's default `nr_open`: the
/// guest's init starts with the kernel's 1024, and a test that passes on the host must see the
/// host's limits in the guest, not fail on the harness's.
fn host_open_files() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let cap = 1 << 20;
    Some((lim.rlim_cur.min(cap), lim.rlim_max.min(cap)))
}

fn kvm_usable() -> bool {
    Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

fn serial_file(path: &Path) -> OsString {
    let mut s = OsString::from("file:");
    s.push(path);
    s
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A per-run tag for the init script's own lines, so command output cannot be taken for them.
fn nonce() -> String {
    let mut bytes = [0u8; 8];
    // Uniqueness is all that matters; fall back to time and pid if getrandom fails.
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0) as u64
            ^ u64::from(std::process::id());
        bytes = t.to_le_bytes();
    }
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A shell word for busybox sh, quoted so nothing in it is interpreted.
fn quote(word: &[u8]) -> String {
    let text = String::from_utf8_lossy(word);
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn init_script(
    release: &str,
    modules: &[String],
    env: &[(String, String)],
    argv: &[&OsStr],
    nonce: &str,
    open_files: Option<(u64, u64)>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/busybox sh");
    let _ = writeln!(
        s,
        "# Generated by scm-guest for one run; the guest powers off at the end."
    );
    for line in [
        "/bin/busybox mount -t proc proc /proc",
        "/bin/busybox mount -t sysfs sysfs /sys",
        "/bin/busybox mount -t devtmpfs devtmpfs /dev",
        "/bin/busybox --install -s /.busybox",
    ] {
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(s, "export PATH={GUEST_PATH} HOME=/root");
    for line in [
        "mkdir -p /sys/fs/bpf /dev/pts /dev/shm /run/netns",
        "mount -t bpf bpf /sys/fs/bpf",
        "mount -t devpts devpts /dev/pts",
        "mount -t tmpfs tmpfs /dev/shm",
        "mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null",
        "mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null",
        "ip link set lo up",
        // Raw: no newline translation or echo on the channel the output comes back on.
        "stty -F /dev/ttyS1 raw -echo",
        "exec 3>/dev/ttyS1",
    ] {
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(
        s,
        "fail() {{ echo \"@@{nonce} setup-failed: $*\" >&3; exec 3>&-; poweroff -f; }}"
    );
    let _ = writeln!(s, "echo \"@@{nonce} release=$(uname -r)\" >&3");
    for module in modules {
        let path = format!("/lib/modules/{release}/{module}");
        let _ = writeln!(
            s,
            "insmod {} 2>&3 || fail 'insmod {module}'",
            quote(path.as_bytes())
        );
    }
    if let Some((soft, hard)) = open_files {
        let _ = writeln!(
            s,
            "ulimit -H -n {hard} && ulimit -S -n {soft} || fail 'ulimit -n {soft}'"
        );
    }
    let _ = writeln!(s, "cd /");
    for (k, v) in env {
        let _ = writeln!(s, "export {}={}", quote_key(k), quote(v.as_bytes()));
    }
    let words: Vec<String> = argv.iter().map(|a| quote(a.as_bytes())).collect();
    let _ = writeln!(s, "{} </dev/null >&3 2>&3", words.join(" "));
    let _ = writeln!(s, "rc=$?");
    let _ = writeln!(s, "printf '\\n@@{nonce} exit=%s\\n' \"$rc\" >&3");
    // The last close of the port waits until the UART has sent everything.
    let _ = writeln!(s, "exec 3>&-");
    let _ = writeln!(s, "poweroff -f");
    s
}

/// An environment variable name as the shell needs it (anything else would be a syntax error
/// in the generated script; it is replaced by `_` and so visibly wrong in the guest).
fn quote_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn setup_failure(text: &str, nonce: &str) -> Option<String> {
    let tag = format!("@@{nonce} setup-failed: ");
    let at = text.find(&tag)?;
    let why = text[at + tag.len()..]
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    Some(format!("{why}{}", {
        let before = text[..at].trim();
        if before.is_empty() {
            String::new()
        } else {
            format!(" ({before})")
        }
    }))
}

/// Splits the output port's text into the release line, the command's output and its exit code.
fn parse(text: &str, nonce: &str) -> (Option<String>, String, Option<i32>) {
    let release_tag = format!("@@{nonce} release=");
    let (release, body) = match text.find(&release_tag) {
        Some(at) => {
            let rest = &text[at + release_tag.len()..];
            let (line, body) = rest.split_once('\n').unwrap_or((rest, ""));
            (Some(line.trim().to_owned()), body)
        }
        None => (None, text),
    };
    let exit_tag = format!("\n@@{nonce} exit=");
    match body.rfind(&exit_tag) {
        Some(at) => {
            let code = body[at + exit_tag.len()..]
                .lines()
                .next()
                .and_then(|c| c.trim().parse().ok());
            (release, body[..at].to_owned(), code)
        }
        None => (release, body.to_owned(), None),
    }
}

/// Whether this process runs as root (a stale apt list is refreshed only then).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_exit_code_are_split_on_the_nonce_not_on_lookalikes() {
        let text =
            "@@abc release=6.1.0-9-cloud-amd64\nhello\n@@zzz exit=0\nEXIT=1\n\n@@abc exit=7\n";
        let (release, output, exit) = parse(text, "abc");
        assert_eq!(release.as_deref(), Some("6.1.0-9-cloud-amd64"));
        assert_eq!(output, "hello\n@@zzz exit=0\nEXIT=1\n");
        assert_eq!(exit, Some(7));
        assert_eq!(parse("@@abc release=x\npartial", "abc").2, None);
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(quote(b"it's $HOME"), r"'it'\''s $HOME'");
        assert_eq!(quote_key("A-B"), "A_B");
    }
}
