//! `cargo xtask vm` and the guest half of `cargo xtask test`: commands inside Debian 12's 6.1
//! cloud kernel under qemu ([`scm_guest`]), for what this host's kernel lacks (kernel TLS).
//!
//! The guest is emulated (TCG): use it to prove function on that kernel, never to measure speed.

use std::ffi::OsStr;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use scm_guest::{Guest, KTLS_MODULES};

use crate::cmd;

/// `cargo xtask vm --help`.
pub const LONG_ABOUT: &str = "Run one command inside Debian 12's 6.1 cloud kernel under qemu: the kernel this \
host lacks (kernel TLS, IPVS, netem). The guest boots from a fresh initramfs holding busybox, the \
modules asked for (with their dependencies) and the host files asked for at the same paths (with \
their ldd libraries); the command runs as root in /, on loopback only, and its exit code becomes \
this command's. The kernel is fetched once into $SCM_GUEST_CACHE (default \
$XDG_CACHE_HOME/scm-guest or ~/.cache/scm-guest). A boot takes about 5 s.\n\n\
Examples:\n  cargo xtask vm -- uname -r\n  cargo xtask vm --ktls -- cat /proc/sys/net/ipv4/tcp_available_ulp\n  \
cargo xtask vm -- target/debug/scm-proxy --help\n\n\
The command is a busybox applet, a host tool found on PATH, or a host file by path (each packed \
at its absolute path); it runs in /, so give its arguments as absolute paths. Timings inside the guest are emulation, not performance figures.";

/// Options of `cargo xtask vm`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// A kernel module to load first (repeatable), e.g. `tls`, `veth`; dependencies are loaded too.
    #[arg(
        long = "module",
        short = 'm',
        value_name = "NAME",
        env = "SCM_VM_MODULES",
        value_delimiter = ','
    )]
    modules: Vec<String>,
    /// Load every module kernel TLS needs (tls and the AES-GCM and ChaCha20-Poly1305 helpers).
    #[arg(long, env = "SCM_VM_KTLS")]
    ktls: bool,
    /// A host file or directory to pack at the same absolute path, with its ldd libraries (repeatable).
    #[arg(
        long = "file",
        short = 'f',
        value_name = "PATH",
        env = "SCM_VM_FILES",
        value_delimiter = ','
    )]
    files: Vec<PathBuf>,
    /// An environment variable for the command, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048, env = "SCM_VM_MEMORY_MIB")]
    memory_mib: u32,
    /// Host-side bound on the whole run, boot included, in seconds; qemu is killed after it.
    #[arg(long, default_value_t = 300, env = "SCM_VM_TIMEOUT_SECS")]
    timeout_secs: u64,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v))
            if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!(
            "{s:?} is not KEY=VALUE with a KEY of letters, digits and _"
        )),
    }
}

/// The guest as `args` asks for it.
fn guest(args: &VmArgs) -> Result<Guest> {
    let mut guest = Guest::new()
        .context("cannot start the guest (`cargo xtask setup` installs qemu, busybox, cpio and fetches the kernel)")?
        .memory_mib(args.memory_mib)
        .timeout(Duration::from_secs(args.timeout_secs));
    if args.ktls {
        guest = guest.modules(KTLS_MODULES);
    }
    for m in &args.modules {
        guest = guest.module(m);
    }
    for f in &args.files {
        let f = std::path::absolute(f).with_context(|| format!("resolving {}", f.display()))?;
        guest = guest.file(f);
    }
    for (k, v) in &args.env {
        guest = guest.env(k, v);
    }
    Ok(guest)
}

/// Runs the command in the guest, prints its output, and returns its exit code.
pub fn run(args: &VmArgs) -> Result<i32> {
    let mut guest = guest(args)?;
    let mut argv: Vec<String> = args.command.clone();
    if argv[0].contains('/') {
        // A host file by path: packed at its absolute path (the guest runs in /).
        let abs =
            std::path::absolute(&argv[0]).with_context(|| format!("resolving {}", argv[0]))?;
        if !abs.is_file() {
            bail!("{} is not a file on this host", abs.display());
        }
        argv[0] = abs.to_string_lossy().into_owned();
        guest = guest.file(&abs);
    } else if !busybox_has(&argv[0])
        && let Some(host) = which(&argv[0])
    {
        // A host tool that busybox lacks (`setpriv`, say): packed at its own path.
        guest = guest.file(&host);
    }
    eprintln!(
        "vm: booting {} (qemu, emulated; about 5 s)",
        guest.kernel_release()
    );
    let words: Vec<&OsStr> = argv.iter().map(OsStr::new).collect();
    let run = guest.run(&words)?;
    print!("{}", run.output);
    eprintln!(
        "vm: {} exited {} on {}",
        argv[0], run.exit_code, run.kernel_release
    );
    Ok(run.exit_code)
}

fn busybox_has(applet: &str) -> bool {
    cmd::output(Command::new("busybox").arg("--list"))
        .is_some_and(|l| l.lines().any(|a| a == applet))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// scm-proxy's data-plane test binaries, run in the guest by `cargo xtask test`.
pub const DATA_PLANE_TESTS: &[&str] = &[
    "xdp_fixtures",
    "steer_fixtures",
    "xdp_netns",
    "steer_netns",
    "supervisor_netns",
];

/// Host tools the data-plane tests start (iproute2 for namespaces, setpriv for the
/// unprivileged-start test).
const GUEST_TOOLS: &[&str] = &["ip", "setpriv"];

/// Builds scm-proxy's data-plane test binaries and runs them all in one guest boot on Debian's
/// 6.1 kernel. Each binary's libtest summary is printed as the guest printed it (the real counts).
pub fn data_plane_tests(test_args: &[String], cpus: u32) -> Result<()> {
    let (tests, proxy) = build_data_plane_tests()?;
    let mut guest = Guest::new()
        .context("the guest kernel harness (`cargo xtask setup` installs qemu, busybox, cpio and fetches the kernel)")?
        .memory_mib(2048)
        .cpus(cpus)
        .timeout(Duration::from_secs(1200))
        .modules(&["veth"])
        .env("RUST_BACKTRACE", "1")
        .stream_output(true)
        .file(&proxy);
    if scm_netns::skip::ci() {
        guest = guest.env("CI", "true");
    }
    for tool in GUEST_TOOLS {
        let host =
            which(tool).with_context(|| format!("{tool} is not on PATH (`cargo xtask setup`)"))?;
        guest = guest.file(host);
    }
    let mut script = String::from("rc=0\n");
    for (name, exe) in &tests {
        guest = guest.file(exe);
        let extra: Vec<String> = test_args.iter().map(|a| shell_quote(a)).collect();
        script.push_str(&format!(
            "echo '== guest: {name}'\n{} {} || {{ echo '== guest: {name} FAILED'; rc=1; }}\n",
            shell_quote(&exe.to_string_lossy()),
            extra.join(" ")
        ));
    }
    script.push_str("exit $rc\n");
    eprintln!(
        "test: running {} in one boot of {} (qemu, emulated)",
        DATA_PLANE_TESTS.join(", "),
        guest.kernel_release()
    );
    // The output streams to stderr as the guest writes it (a run takes minutes).
    let run = guest.run(&[OsStr::new("sh"), OsStr::new("-c"), OsStr::new(&script)])?;
    if run.exit_code != 0 {
        bail!(
            "scm-proxy's data-plane tests failed in the guest kernel {} (exit {})",
            run.kernel_release,
            run.exit_code
        );
    }
    eprintln!(
        "test: scm-proxy's data-plane tests passed in the guest kernel {}",
        run.kernel_release
    );
    Ok(())
}

/// `cargo test --no-run` for the data-plane tests; their executables and scm-proxy's.
fn build_data_plane_tests() -> Result<(Vec<(String, PathBuf)>, PathBuf)> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args([
        "test",
        "--locked",
        "--no-run",
        "--message-format=json",
        "-p",
        "scm-proxy",
    ]);
    for t in DATA_PLANE_TESTS {
        c.args(["--test", t]);
    }
    c.current_dir(cmd::root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("+ {c:?}");
    let mut child = c.spawn().context("starting cargo test --no-run")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut tests = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's messages")?;
        if let Some((name, exe)) = test_executable(&line)
            && DATA_PLANE_TESTS.contains(&name.as_str())
        {
            tests.push((name, exe));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building scm-proxy's data-plane tests failed: {status}");
    }
    tests.sort_by_key(|(n, _)| DATA_PLANE_TESTS.iter().position(|t| t == n));
    let found: Vec<&str> = tests.iter().map(|(n, _)| n.as_str()).collect();
    for t in DATA_PLANE_TESTS {
        if !found.contains(t) {
            bail!("cargo built no test binary named {t} (was it renamed? update DATA_PLANE_TESTS)");
        }
    }
    // The tests start scm-proxy by env!("CARGO_BIN_EXE_scm-proxy"): the debug build's path.
    let proxy = cmd::target_dir().join("debug/scm-proxy");
    if !proxy.is_file() {
        bail!("{} was not built by cargo test", proxy.display());
    }
    Ok((tests, proxy))
}

/// A test target's name and executable from one line of cargo's JSON messages.
fn test_executable(line: &str) -> Option<(String, PathBuf)> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let target = msg.get("target")?;
    let is_test = target.get("kind")?.as_array()?.iter().any(|k| k == "test");
    let exe = msg.get("executable")?.as_str()?;
    let name = target.get("name")?.as_str()?;
    is_test.then(|| (name.to_owned(), PathBuf::from(exe)))
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_artifact_line_gives_its_name_and_executable() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"xdp_netns","kind":["test"]},"executable":"/t/debug/deps/xdp_netns-1"}"#;
        assert_eq!(
            test_executable(line),
            Some((
                "xdp_netns".into(),
                PathBuf::from("/t/debug/deps/xdp_netns-1")
            ))
        );
        let bin = r#"{"reason":"compiler-artifact","target":{"name":"scm-proxy","kind":["bin"]},"executable":"/t/debug/scm-proxy"}"#;
        assert_eq!(test_executable(bin), None);
        assert_eq!(test_executable("not json"), None);
    }

    #[test]
    fn env_flags_must_be_key_value() {
        assert_eq!(parse_env("A_1=x=y"), Ok(("A_1".into(), "x=y".into())));
        assert!(parse_env("no-equals").is_err());
        assert!(parse_env("BAD-KEY=1").is_err());
    }
}
