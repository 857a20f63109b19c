//! `scm-bench run`: builds the topology, starts the back ends, the Security server, nginx and
//! scm-proxy, runs every figure against each with the same load generator, and writes the report.
//!
//! Placement on this 2-CPU machine: the proxy under test alone on CPU 0; the client, the back ends
//! and the Security server on CPU 1. The proxy's CPU time comes from /proc/PID/stat, so every
//! figure is also given per proxy CPU-second.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use scm_bench::load::{LoadResult, LoadSpec, Mode, Proto};
use scm_bench::procfs;
use scm_bench::report::{Ceiling, CrossCheck, Curve, CurvePoint, Meta, Report, Row};

use crate::scm::{self, ScmSut};
use crate::sut::{
    self, Certs, Proc, SERVER_NAME, port, tree_cpu_seconds, tree_memory, wait_listening,
};
use crate::topology::{BE_ADDR, DUT_ADDR, Topology};

/// Options of `scm-bench run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Short trials (about 3 minutes each) for a first look: shorter loads, 128 MiB transfers.
    #[arg(long)]
    pub quick: bool,
    /// Where the markdown, JSON and SVG results go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Directory with the scm-proxy and scm-security binaries (release builds); without them the
    /// scm columns say "not run" and the note says why.
    #[arg(long)]
    pub scm_bin_dir: Option<PathBuf>,
    /// The workspace root (for `git rev-parse`).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Record a perf profile of the proxy under test during each max-rate run and write its flat
    /// report to OUT/perf-SYSTEM.txt (needs `perf`, Debian package linux-perf; the last trial's
    /// profile is kept).
    #[arg(long)]
    pub perf: bool,
    /// Interleaved trials: nginx, scm, nginx, scm, … this many times each. The table gives each
    /// figure's median and range and each ratio's median and range over the trials, and names a
    /// winner only where every trial agrees. On a shared machine one run's ratio has swung by
    /// ±30%: fewer than 5 trials is for a first look only.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub trials: u16,
}

/// Sizes of one run.
#[derive(Debug, Clone)]
struct Params {
    secs: f64,
    connections: usize,
    bulk_bytes: u64,
    idle_connections: usize,
    connect_concurrency: usize,
    rate_fractions: Vec<f64>,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                secs: 3.0,
                connections: 50,
                bulk_bytes: 128 << 20,
                // The data-plane goal is memory at 10 000 idle connections: the quick run
                // measures it there too (a few seconds per side).
                idle_connections: 10_000,
                connect_concurrency: 32,
                rate_fractions: vec![0.25, 0.5, 0.8],
            }
        } else {
            Self {
                secs: 10.0,
                connections: 50,
                bulk_bytes: 1 << 30,
                idle_connections: 10_000,
                connect_concurrency: 32,
                rate_fractions: vec![0.1, 0.25, 0.5, 0.65, 0.8, 0.9],
            }
        }
    }
}

/// A listener to load: which process serves it and how to talk to it.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    port: u16,
    proto: Proto,
    authorization: Option<String>,
    /// The resource for scm's tunnel to the bulk back end, where it differs from `proto`'s.
    bulk_proto: Option<Proto>,
    pid: u32,
}

/// What one load measured, with the proxy's CPU time over it.
#[derive(Debug, Clone)]
struct Measured {
    load: LoadResult,
    cpu_secs: f64,
}

impl Measured {
    fn per_cpu_sec(&self) -> Option<f64> {
        (self.cpu_secs > 0.0).then(|| self.load.ok as f64 / self.cpu_secs)
    }
}

struct Bench {
    topo: Topology,
    exe: PathBuf,
    certs: Certs,
    p: Params,
    bar: ProgressBar,
    notes: Vec<String>,
    /// Where perf reports go, when profiling.
    perf_out: Option<PathBuf>,
    /// The trial running and how many there are, for the progress line.
    trial: (usize, usize),
    /// Whether the kernel has TLS, for the kTLS rows.
    ktls: KernelTls,
}

/// Whether this kernel can take TLS records (`tls` in tcp_available_ulp, after asking for the
/// module), which decides whether the kTLS rows are measured.
#[derive(Debug, Clone)]
struct KernelTls {
    available: bool,
    /// What tcp_available_ulp listed.
    ulps: String,
}

impl KernelTls {
    fn detect() -> Self {
        // The module may be there but not loaded; a kernel without it makes this fail quietly.
        let _ = Command::new("modprobe")
            .args(["-q", "tls"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let ulps = fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Self {
            available: ulps.split_whitespace().any(|u| u == "tls"),
            ulps,
        }
    }

    /// Why the kTLS rows are empty, where they are.
    fn missing(&self) -> Option<String> {
        (!self.available).then(|| "not measured: kernel without TLS".to_owned())
    }
}

/// Flag set by SIGINT/SIGTERM so a run stops between steps and cleans up.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_stop() -> Result<()> {
    if STOP.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

impl Bench {
    fn spec(&self, t: &Target, path: &str, mode: Mode) -> LoadSpec {
        LoadSpec {
            addr: SocketAddr::new(DUT_ADDR.parse().expect("constant address"), t.port),
            server_name: SERVER_NAME.to_owned(),
            ca_pem: Some(self.certs.ca.clone()),
            proto: t.proto.clone(),
            path: path.to_owned(),
            authorization: t.authorization.clone(),
            client_identity: None,
            mode,
        }
    }

    /// Runs one load in the client namespace on CPU 1 and reads the proxy's CPU time around it.
    fn load(&self, what: &str, pid: u32, spec: &LoadSpec) -> Result<Measured> {
        check_stop()?;
        self.bar
            .set_message(format!("trial {}/{}: {what}", self.trial.0, self.trial.1));
        let cpu0 = tree_cpu_seconds(pid);
        let out = self
            .topo
            .pinned(&self.topo.cli, "1", &self.exe.to_string_lossy())
            .args(["load", "--spec", &serde_json::to_string(spec)?])
            .stdin(Stdio::null())
            .output()
            .context("running the load generator")?;
        let cpu_secs = tree_cpu_seconds(pid) - cpu0;
        self.bar.inc(1);
        if !out.status.success() {
            bail!(
                "{what}: load generator failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        let load: LoadResult =
            serde_json::from_str(last).with_context(|| format!("{what}: reading {last:?}"))?;
        if load.errors > 0 {
            self.bar.println(format!(
                "  {what}: {} errors (first: {})",
                load.errors,
                load.first_error.as_deref().unwrap_or("?")
            ));
        }
        Ok(Measured { load, cpu_secs })
    }

    fn max(&self, t: &Target) -> Result<Measured> {
        let spec = self.spec(
            t,
            "/1k",
            Mode::Max {
                connections: self.p.connections,
                secs: self.p.secs,
                max_requests: 100_000_000,
            },
        );
        let data = self.work().join("perf.data");
        // nginx's work is in its worker, a child of the pid we started.
        let pids: Vec<String> = std::iter::once(t.pid)
            .chain(procfs::children(t.pid))
            .map(|p| p.to_string())
            .collect();
        let pids = pids.join(",");
        let perf = match &self.perf_out {
            Some(_) => Some(Proc::spawn(
                "perf record",
                Command::new("perf")
                    .args(["record", "-F", "1999", "-p", &pids, "-o"])
                    .arg(&data),
                self.work().join("perf.log"),
            )?),
            None => None,
        };
        let m = self.load(&format!("{}: max requests/s", t.name), t.pid, &spec);
        if let (Some(perf), Some(out)) = (perf, &self.perf_out) {
            // SIGTERM (on drop) makes perf write its data and exit.
            drop(perf);
            self.perf_report(&t.name, &data, out)?;
        }
        let m = m?;
        if m.load.ok == 0 {
            bail!(
                "{}: no request succeeded: {}",
                t.name,
                m.load.first_error.as_deref().unwrap_or("?")
            );
        }
        Ok(m)
    }

    /// Writes the flat profile of one max-rate run.
    fn perf_report(&self, system: &str, data: &Path, out: &Path) -> Result<()> {
        let slug: String = system
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "dso,symbol",
                "--percent-limit",
                "0.7",
                "-i",
            ])
            .arg(data)
            .output()
            .context("running perf report")?;
        fs::create_dir_all(out)?;
        let path = out.join(format!("perf-{}.txt", slug.trim_matches('-')));
        fs::write(&path, &report.stdout)?;
        let _ = fs::remove_file(data);
        Ok(())
    }

    fn at_rate(&self, t: &Target, rate: f64) -> Result<Measured> {
        let spec = self.spec(
            t,
            "/1k",
            Mode::Rate {
                connections: self.p.connections,
                rate,
                secs: self.p.secs,
            },
        );
        self.load(&format!("{}: {rate:.0} requests/s", t.name), t.pid, &spec)
    }

    fn bulk(&self, t: &Target, upload: bool) -> Result<Measured> {
        let mut spec = self.spec(
            t,
            "",
            Mode::Bulk {
                bytes: self.p.bulk_bytes,
                upload,
            },
        );
        if let Some(p) = &t.bulk_proto {
            spec.proto = p.clone();
        }
        let dir = if upload { "up" } else { "down" };
        self.load(&format!("{}: bulk {dir}", t.name), t.pid, &spec)
    }

    fn connects(&self, t: &Target, resume: bool) -> Result<Measured> {
        let spec = self.spec(
            t,
            "/1k",
            Mode::Connect {
                concurrency: self.p.connect_concurrency,
                secs: self.p.secs,
                max_connections: 1_000_000,
                resume,
            },
        );
        let kind = if resume { "resumed" } else { "full handshake" };
        self.load(
            &format!("{}: new connections, {kind}", t.name),
            t.pid,
            &spec,
        )
    }

    /// Opens idle connections, measures the proxy's memory and the kernel's socket memory with
    /// them open, then lets them go. Returns (RSS, PSS, kernel socket) KiB per connection.
    fn idle(&self, t: &Target) -> Result<(f64, f64, f64)> {
        check_stop()?;
        self.bar.set_message(format!(
            "{}: {} idle connections",
            t.name, self.p.idle_connections
        ));
        let mut spec = self.spec(
            t,
            "",
            Mode::Idle {
                connections: self.p.idle_connections,
                hold_secs: 60.0,
            },
        );
        if let Some(p) = &t.bulk_proto {
            spec.proto = p.clone();
        }
        std::thread::sleep(Duration::from_millis(300));
        let mem0 = tree_memory(t.pid);
        let sock0 = self.sockstat()?;
        let mut child = self
            .topo
            .pinned(&self.topo.cli, "1", &self.exe.to_string_lossy())
            .args(["load", "--spec", &serde_json::to_string(&spec)?])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("load stdout")?).lines();
        let ready = lines
            .next()
            .transpose()?
            .context("load generator ended before READY")?;
        let opened: usize = ready
            .strip_prefix("READY ")
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("unexpected line {ready:?}"))?;
        // Let the proxy finish its side (back-end connections) before measuring.
        std::thread::sleep(Duration::from_secs(1));
        let mem1 = tree_memory(t.pid);
        let sock1 = self.sockstat()?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait()?;
        self.bar.inc(1);
        if !status.success() || opened == 0 {
            bail!(
                "{}: idle connections failed ({status}, {opened} opened): {}",
                t.name,
                rest.join(" ")
            );
        }
        if opened < self.p.idle_connections {
            self.bar.println(format!(
                "  {}: only {opened} of {} idle connections opened",
                t.name, self.p.idle_connections
            ));
        }
        let n = opened as f64;
        let page_kib = 4.0;
        Ok((
            (mem1.rss_kib as f64 - mem0.rss_kib as f64) / n,
            (mem1.pss_kib as f64 - mem0.pss_kib as f64) / n,
            (sock1.mem_pages as f64 - sock0.mem_pages as f64) * page_kib / n,
        ))
    }

    fn sockstat(&self) -> Result<procfs::TcpSockstat> {
        let out = self
            .topo
            .exec(&self.topo.dut, "cat")
            .arg("/proc/net/sockstat")
            .output()?;
        Ok(procfs::parse_sockstat(&String::from_utf8_lossy(
            &out.stdout,
        ))?)
    }
}

/// Everything measured for one system, by figure.
#[derive(Debug, Default)]
struct SystemFigures {
    max: Option<Measured>,
    rates: BTreeMap<u64, Measured>,
    bulk_down: Option<Measured>,
    bulk_up: Option<Measured>,
    connect_full: Option<Measured>,
    connect_resumed: Option<Measured>,
    idle: Option<(f64, f64, f64)>,
}

fn note_err<T>(bench: &mut Bench, what: &str, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let line = format!("{what} failed: {e:#}");
            bench.bar.println(format!("  {line}"));
            bench.notes.push(line);
            None
        }
    }
}

/// Runs every figure for one system; `rates` are the offered rates of figure 1.
fn measure_system(
    bench: &mut Bench,
    t: &Target,
    rates: Option<&[f64]>,
    bulk: bool,
    connect: bool,
    idle: bool,
) -> SystemFigures {
    let mut f = SystemFigures {
        max: note_err(bench, &format!("{}: max", t.name), bench.max(t)),
        ..SystemFigures::default()
    };
    for &rate in rates.unwrap_or(&[]) {
        let r = bench.at_rate(t, rate);
        if let Some(m) = note_err(bench, &format!("{}: rate {rate:.0}", t.name), r) {
            f.rates.insert(rate.round() as u64, m);
        }
    }
    if bulk {
        let r = bench.bulk(t, false);
        f.bulk_down = note_err(bench, &format!("{}: bulk down", t.name), r);
        let r = bench.bulk(t, true);
        f.bulk_up = note_err(bench, &format!("{}: bulk up", t.name), r);
    }
    if connect {
        let r = bench.connects(t, false);
        f.connect_full = note_err(bench, &format!("{}: connect", t.name), r);
        let r = bench.connects(t, true);
        f.connect_resumed = note_err(bench, &format!("{}: connect resumed", t.name), r);
    }
    if idle {
        let r = bench.idle(t);
        f.idle = note_err(bench, &format!("{}: idle", t.name), r);
    }
    f
}

fn command_text(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.trim().to_owned()
        })
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

fn meta(args: &RunArgs) -> Meta {
    let dirty = !command_text(
        Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(&args.repo),
    )
    .is_empty();
    let rev = command_text(
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(&args.repo),
    );
    Meta {
        date: command_text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])),
        quick: args.quick,
        cpu_model: procfs::cpu_model().unwrap_or_else(|| "unknown".into()),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: command_text(Command::new("uname").arg("-r")),
        nginx: command_text(Command::new("nginx").arg("-v")),
        openssl: command_text(Command::new("openssl").arg("version")),
        rustc: command_text(Command::new("rustc").arg("-V")),
        scm_rev: if dirty { format!("{rev}-dirty") } else { rev },
        placement:
            "proxy under test alone on CPU 0; client, back ends and Security server on CPU 1".into(),
        notes: Vec::new(),
    }
}

/// `openssl speed -evp aes-128-gcm`'s 16 KiB figure, in MB/s.
pub fn parse_openssl_aes(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.to_ascii_lowercase().starts_with("aes-128-gcm"))?;
    let last = line.split_whitespace().last()?;
    // openssl prints thousands of bytes per second with a `k` suffix.
    Some(last.strip_suffix('k')?.parse::<f64>().ok()? * 1000.0 / 1e6)
}

/// `openssl speed ecdsap256`'s sign/s and verify/s.
pub fn parse_openssl_ecdsa(text: &str) -> Option<(f64, f64)> {
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    match nums.as_slice() {
        [.., sign, verify] => Some((*sign, *verify)),
        _ => None,
    }
}

/// wrk's `Requests/sec:` figure.
pub fn parse_wrk(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

fn ceilings(bench: &mut Bench, report: &mut Report) -> Result<()> {
    let secs = if bench.p.secs < 5.0 { "1" } else { "3" };
    bench.bar.set_message("openssl speed aes-128-gcm");
    let aes = command_text(Command::new("taskset").args([
        "-c",
        "0",
        "openssl",
        "speed",
        "-seconds",
        secs,
        "-bytes",
        "16384",
        "-evp",
        "aes-128-gcm",
    ]));
    bench.bar.inc(1);
    match parse_openssl_aes(&aes) {
        Some(v) => report.ceilings.push(Ceiling {
            what: "openssl speed -evp aes-128-gcm, 16 KiB blocks, one CPU".into(),
            value: v,
            unit: "MB/s".into(),
        }),
        None => bench
            .notes
            .push(format!("could not read openssl speed aes: {aes}")),
    }
    bench.bar.set_message("openssl speed ecdsap256");
    let ecdsa = command_text(Command::new("taskset").args([
        "-c",
        "0",
        "openssl",
        "speed",
        "-seconds",
        secs,
        "ecdsap256",
    ]));
    bench.bar.inc(1);
    match parse_openssl_ecdsa(&ecdsa) {
        Some((sign, verify)) => {
            for (what, v) in [("sign", sign), ("verify", verify)] {
                report.ceilings.push(Ceiling {
                    what: format!("openssl speed ecdsap256 {what}, one CPU"),
                    value: v,
                    unit: "ops/s".into(),
                });
            }
        }
        None => bench
            .notes
            .push(format!("could not read openssl speed ecdsa: {ecdsa}")),
    }
    // Raw TCP over the client-proxy veth: the bulk server in the proxy's namespace on CPU 0.
    let mut server = Proc::spawn(
        "raw tcp bulk server",
        bench
            .topo
            .pinned(&bench.topo.dut, "0", &bench.exe.to_string_lossy())
            .args(["backend", "--listen", &format!("{DUT_ADDR}:9001")]),
        bench.work().join("raw-tcp.log"),
    )?;
    wait_listening(&bench.topo.dut, 9001, &mut server, Duration::from_secs(5))?;
    let t = Target {
        name: "raw TCP over veth".into(),
        port: 9001,
        proto: Proto::Tcp,
        authorization: None,
        bulk_proto: None,
        pid: server.pid(),
    };
    let m = bench.bulk(&t, false)?;
    report.ceilings.push(Ceiling {
        what: format!(
            "raw TCP over veth, one connection, {} MiB",
            bench.p.bulk_bytes >> 20
        ),
        value: m.load.per_sec / 1e6,
        unit: "MB/s".into(),
    });
    Ok(())
}

impl Bench {
    fn work(&self) -> PathBuf {
        self.certs
            .ca
            .parent()
            .map_or_else(std::env::temp_dir, Path::to_path_buf)
    }
}

/// Rows of figure 1 for one pair; `rates` were derived from `nginx`'s max.
fn rows_small(
    rows: &mut Vec<Row>,
    scm_name: &str,
    scm: Option<&SystemFigures>,
    nginx_name: &str,
    nginx: &SystemFigures,
    fractions: &[(f64, f64)],
) {
    let row = |metric: String, unit: &str, s: Option<f64>, n: Option<f64>, higher: bool| {
        Row::single(1, metric, unit, (scm_name, nginx_name), (s, n), higher)
    };
    rows.push(row(
        "max requests/s, 1 KiB keep-alive".into(),
        "req/s",
        scm.and_then(|s| s.max.as_ref()).map(|m| m.load.per_sec),
        nginx.max.as_ref().map(|m| m.load.per_sec),
        true,
    ));
    rows.push(row(
        "requests per proxy CPU-second".into(),
        "req/CPU-s",
        scm.and_then(|s| s.max.as_ref())
            .and_then(Measured::per_cpu_sec),
        nginx.max.as_ref().and_then(Measured::per_cpu_sec),
        true,
    ));
    for &(fraction, rate) in fractions {
        let key = rate.round() as u64;
        let pick = |f: Option<&SystemFigures>, q: fn(&scm_bench::hist::LatencySummary) -> u64| {
            f.and_then(|f| f.rates.get(&key))
                .and_then(|m| m.load.latency.as_ref())
                .map(|l| q(l) as f64 / 1000.0)
        };
        for (label, q) in [
            (
                "p50",
                (|l: &scm_bench::hist::LatencySummary| l.p50_us) as fn(&_) -> u64,
            ),
            ("p99", |l| l.p99_us),
        ] {
            rows.push(row(
                // The rate itself differs between trials (it is a fraction of that trial's
                // nginx max): the label names the fraction so the trials merge, and the notes
                // list each trial's rates.
                format!("{label} latency at {:.0}% of nginx's max", fraction * 100.0),
                "ms",
                pick(scm, q),
                pick(Some(nginx), q),
                false,
            ));
        }
    }
}

fn curve(name: &str, f: &SystemFigures) -> Curve {
    Curve {
        system: name.into(),
        points: f
            .rates
            .iter()
            .filter_map(|(&rate, m)| {
                let l = m.load.latency?;
                Some(CurvePoint {
                    offered: rate as f64,
                    achieved: m.load.per_sec,
                    p50_us: l.p50_us,
                    p99_us: l.p99_us,
                    errors: m.load.errors,
                })
            })
            .collect(),
    }
}

/// Runs the benchmark.
pub fn run(args: &RunArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("scm-bench run makes network namespaces and needs root");
    }
    for tool in ["ip", "taskset", "nginx", "openssl", "ss"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            bail!("{tool} is not installed (cargo xtask bench installs nginx, wrk and openssl)");
        }
    }
    install_signal_handlers();
    let started = Instant::now();
    let p = Params::new(args.quick);
    let work = std::env::temp_dir().join(format!("scm-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = run_in(args, p, &work);
    let _ = fs::remove_dir_all(&work);
    let report = result?;
    fs::create_dir_all(&args.out)?;
    let kind = if args.quick { "quick" } else { "full" };
    let md = scm_bench::report::markdown(&report);
    fs::write(args.out.join(format!("{kind}.md")), &md)?;
    fs::write(
        args.out.join(format!("{kind}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;
    let svg = args.out.join(format!("{kind}-latency.svg"));
    if let Err(e) = scm_bench::plot::latency_vs_rate(&report.curves, &svg) {
        eprintln!("plot: {e}");
    }
    println!("{md}");
    println!(
        "written: {0}/{kind}.md, {0}/{kind}.json, {1} ({2:.0} s)",
        args.out.display(),
        svg.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_in(args: &RunArgs, p: Params, work: &Path) -> Result<Report> {
    let mut report = Report {
        meta: meta(args),
        ..Report::default()
    };
    let mut bench = Bench::new(args, p, work)?;
    let backends = Backends::start(&bench, work)?;
    let scm_env = start_security(&mut bench, args, work);
    let auth = scm_env.as_ref().and_then(|s| s.nginx_auth());
    if scm_env.is_some() && auth.is_none() {
        bench.notes.push(
            "nginx auth_request not measured: scm-security's forward-auth listener did not answer"
                .into(),
        );
    }
    if !bench.ktls.available {
        let ulps = if bench.ktls.ulps.is_empty() {
            "nothing"
        } else {
            &bench.ktls.ulps
        };
        let line = format!(
            "kTLS rows not measured: kernel without TLS (tcp_available_ulp lists {ulps}); no \
             figure from an emulated guest stands in for them"
        );
        bench.notes.push(line);
    }
    let trials = usize::from(args.trials);
    plan_progress(&bench, auth.is_some(), scm_env.is_some(), trials);

    let r = ceilings(&mut bench, &mut report);
    note_err(&mut bench, "machine ceilings", r);

    let mib = bench.p.bulk_bytes >> 20;
    let mut trial_rows = Vec::with_capacity(trials);
    for trial in 1..=trials {
        bench.trial = (trial, trials);
        // nginx first in every trial: scm-proxy is offered the rates of this trial's nginx max,
        // and the two sides of a trial run minutes apart, so their ratio sees one machine.
        let nginx = measure_nginx(
            &mut bench,
            work,
            scm_env.as_ref(),
            auth.as_ref(),
            &mut report,
        )?;
        let scm = match (&scm_env, &args.scm_bin_dir) {
            (Some(sec), Some(dir)) => measure_scm(&mut bench, dir, work, sec, &nginx),
            _ => ScmFigures::default(),
        };
        let mut rows = Vec::new();
        rows_figure1(&mut rows, &nginx, &scm);
        rows_bulk(&mut rows, &nginx, &scm, mib);
        rows_steering(&mut rows, &nginx, &scm, mib);
        rows_connects(&mut rows, &nginx, &scm);
        rows_idle(&mut rows, &nginx, &scm, bench.p.idle_connections);
        rows_steering_overhead(&mut rows, &scm, mib);
        rows_ktls(&mut rows, &bench.ktls, &scm, &nginx, mib);
        trial_rows.push(rows);
        rate_note(&mut bench.notes, trial, &nginx);
        if trial == trials {
            curves(&mut report.curves, &nginx, &scm);
            utilisation_notes(&mut bench.notes, &nginx, &scm);
        }
    }
    bench.bar.finish_and_clear();
    report.rows = scm_bench::trials::merge(&trial_rows);
    report.trials = trials;
    report.goals = scm_bench::trials::check(&goals(mib), &report.rows);
    if trials > 1 {
        bench.notes.push(format!(
            "the latency curves and the utilisation notes are the last trial's ({trials} of {trials})"
        ));
    }
    report.meta.notes = std::mem::take(&mut bench.notes);
    // The back ends stop before the Security server (dropped after them) and the namespaces.
    drop(backends);
    Ok(report)
}

impl Bench {
    /// The run's fixed parts: this binary (re-run in the namespaces), the certificates, the
    /// namespaces and the progress bar.
    fn new(args: &RunArgs, p: Params, work: &Path) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let certs = sut::make_certs(work)?;
        let topo = Topology::create()?;
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .expect("constant template")
                .progress_chars("=> "),
        );
        Ok(Self {
            topo,
            exe,
            certs,
            p,
            bar,
            notes: Vec::new(),
            perf_out: args.perf.then(|| args.out.clone()),
            trial: (0, usize::from(args.trials)),
            ktls: KernelTls::detect(),
        })
    }
}

/// The back ends, on CPU 1: nginx serving /1k and the bulk server. Stopped on drop (the bulk
/// server first).
struct Backends {
    _bulk: Proc,
    _http: Proc,
}

impl Backends {
    fn start(bench: &Bench, work: &Path) -> Result<Self> {
        let be_dir = work.join("backend");
        fs::create_dir_all(&be_dir)?;
        fs::write(work.join("1k.bin"), vec![b'x'; 1024])?;
        fs::copy(work.join("1k.bin"), be_dir.join("1k.bin"))?;
        fs::write(be_dir.join("nginx.conf"), sut::nginx_backend_conf(&be_dir))?;
        let mut http = Proc::spawn(
            "back-end nginx",
            bench
                .topo
                .pinned(&bench.topo.be, "1", "nginx")
                .args(["-p", &be_dir.to_string_lossy(), "-c"])
                .arg(be_dir.join("nginx.conf")),
            work.join("backend-nginx.log"),
        )?;
        wait_listening(
            &bench.topo.be,
            port::BACKEND_HTTP,
            &mut http,
            Duration::from_secs(10),
        )?;
        let mut bulk = Proc::spawn(
            "bulk back end",
            bench
                .topo
                .pinned(&bench.topo.be, "1", &bench.exe.to_string_lossy())
                .args([
                    "backend",
                    "--listen",
                    &format!("{BE_ADDR}:{}", port::BACKEND_BULK),
                ]),
            work.join("backend-bulk.log"),
        )?;
        wait_listening(
            &bench.topo.be,
            port::BACKEND_BULK,
            &mut bulk,
            Duration::from_secs(10),
        )?;
        Ok(Self {
            _bulk: bulk,
            _http: http,
        })
    }
}

/// The Security server and a logged-in device, when the scm binaries are there; a failure is a
/// note in the report (the nginx columns are still measured).
fn start_security(bench: &mut Bench, args: &RunArgs, work: &Path) -> Option<scm::Security> {
    match &args.scm_bin_dir {
        Some(dir) => {
            let r = scm::Security::start(&bench.topo, dir, work);
            note_err(bench, "starting scm-security", r)
        }
        None => {
            bench
                .notes
                .push("scm not measured: no --scm-bin-dir given".into());
            None
        }
    }
}

/// Sets the progress bar's length to the number of steps this run will take.
fn plan_progress(bench: &Bench, nginx_auth: bool, scm: bool, trials: usize) {
    let nginx_http_systems = if nginx_auth { 3 } else { 1 };
    let rates_n = bench.p.rate_fractions.len() as u64;
    let cached_connects = if nginx_auth { 2 } else { 0 };
    let per_trial = nginx_http_systems + 1 + rates_n * 2 // nginx max (http systems, stream), rates
        + 2 + 2 + cached_connects + 1 + 1 // nginx bulk, connects, idle, wrk
        + if scm { 2 + rates_n * 2 + 2 + 2 + 1 + 3 } else { 0 };
    // ceilings: aes, ecdsa, raw TCP
    bench.bar.set_length(3 + per_trial * trials as u64);
}

/// Figure 1's offered rates: fractions of a measured max.
fn offered_rates(p: &Params, max: Option<&Measured>) -> Vec<(f64, f64)> {
    max.map(|m| {
        p.rate_fractions
            .iter()
            .map(|f| (*f, (m.load.per_sec * f).round()))
            .collect()
    })
    .unwrap_or_default()
}

/// What nginx (the peer) measured, and the targets the scm rows are compared with.
struct NginxFigures {
    /// The http peer of scm-proxy's http mode (with auth_request when scm-security offers it).
    http_peer: Target,
    http: SystemFigures,
    /// (fraction, rate) of figure 1, from `http`'s max; scm-proxy http is offered the same.
    http_rates: Vec<(f64, f64)>,
    /// auth_request with nginx's cache, when auth_request is measured.
    cached: Option<(Target, SystemFigures)>,
    /// nginx without auth, beside the auth_request peer.
    plain: Option<(String, SystemFigures)>,
    /// The stream (TCP) peer of scm-proxy's tunnel.
    stream: Target,
    stream_fig: SystemFigures,
    stream_rates: Vec<(f64, f64)>,
    /// nginx stream with OpenSSL's kernel TLS, where the kernel has TLS.
    stream_ktls: Option<SystemFigures>,
}

/// nginx under test, on CPU 0: every figure for its http and stream listeners.
fn measure_nginx(
    bench: &mut Bench,
    work: &Path,
    scm_env: Option<&scm::Security>,
    auth: Option<&sut::AuthUpstream>,
    report: &mut Report,
) -> Result<NginxFigures> {
    let ng_dir = work.join("nginx");
    fs::create_dir_all(&ng_dir)?;
    fs::write(
        ng_dir.join("nginx.conf"),
        sut::nginx_sut_conf(&ng_dir, &bench.certs, auth),
    )?;
    let mut nginx = Proc::spawn(
        "nginx under test",
        bench
            .topo
            .pinned(&bench.topo.dut, "0", "nginx")
            .args(["-p", &ng_dir.to_string_lossy(), "-c"])
            .arg(ng_dir.join("nginx.conf")),
        work.join("nginx.log"),
    )?;
    wait_listening(
        &bench.topo.dut,
        port::NGINX_STREAM_HTTP,
        &mut nginx,
        Duration::from_secs(10),
    )?;
    let npid = nginx.pid();
    let bearer = scm_env.map(|s| format!("Bearer {}", s.session_id()));
    let target = |name: &str, port: u16, auth: bool| Target {
        name: name.into(),
        port,
        proto: Proto::Tls,
        authorization: if auth { bearer.clone() } else { None },
        bulk_proto: None,
        pid: npid,
    };
    let (http_peer, http_cached) = if auth.is_some() {
        (
            target("nginx http + auth_request", port::NGINX_AUTH, true),
            Some(target(
                "nginx http + auth_request + cache",
                port::NGINX_AUTH_CACHE,
                true,
            )),
        )
    } else {
        (
            target("nginx http (no auth)", port::NGINX_PLAIN, false),
            None,
        )
    };
    let plain = target("nginx http (no auth)", port::NGINX_PLAIN, false);
    let stream = Target {
        bulk_proto: None,
        ..target("nginx stream", port::NGINX_STREAM_HTTP, false)
    };

    let (http, http_rates) = measure_nginx_http(bench, &http_peer, report);
    let cached = http_cached.map(|t| {
        let f = measure_system(bench, &t, None, false, true, false);
        (t, f)
    });
    let plain = auth.is_some().then(|| {
        let f = measure_system(bench, &plain, None, false, false, false);
        (plain.name, f)
    });
    let (stream_fig, stream_rates) = measure_nginx_stream(bench, &stream);
    let stream_ktls = bench.ktls.available.then(|| {
        let t = Target {
            name: NGINX_KTLS.into(),
            port: port::NGINX_STREAM_KTLS_HTTP,
            ..stream.clone()
        };
        let mut f = measure_system(bench, &t, None, false, false, false);
        let bulk = Target {
            port: port::NGINX_STREAM_KTLS_BULK,
            ..t
        };
        let r = bench.bulk(&bulk, false);
        f.bulk_down = note_err(bench, "nginx stream kTLS bulk down", r);
        let r = bench.bulk(&bulk, true);
        f.bulk_up = note_err(bench, "nginx stream kTLS bulk up", r);
        f
    });
    drop(nginx);
    Ok(NginxFigures {
        http_peer,
        http,
        http_rates,
        cached,
        plain,
        stream,
        stream_fig,
        stream_rates,
        stream_ktls,
    })
}

/// nginx's http peer: its max (which sets figure 1's rates), wrk's cross-check of that max,
/// the rates, and new connections.
fn measure_nginx_http(
    bench: &mut Bench,
    http_peer: &Target,
    report: &mut Report,
) -> (SystemFigures, Vec<(f64, f64)>) {
    let r = bench.max(http_peer);
    let http_max = note_err(bench, "nginx http max", r);
    let http_rates = offered_rates(&bench.p, http_max.as_ref());
    let mut fig = SystemFigures {
        max: http_max,
        ..SystemFigures::default()
    };
    // Cross-check nginx's max with wrk (OpenSSL client, same connections, duration and CPU),
    // right after our own measurement so both see the same machine.
    let r = wrk_cross_check(bench, http_peer, fig.max.as_ref());
    if let Some(c) = note_err(bench, "wrk cross-check", r) {
        report.cross_checks.push(c);
    }
    for &(_, rate) in &http_rates {
        let r = bench.at_rate(http_peer, rate);
        if let Some(m) = note_err(bench, &format!("{}: rate", http_peer.name), r) {
            fig.rates.insert(rate as u64, m);
        }
    }
    let r = bench.connects(http_peer, false);
    fig.connect_full = note_err(bench, "nginx connect", r);
    let r = bench.connects(http_peer, true);
    fig.connect_resumed = note_err(bench, "nginx connect resumed", r);
    (fig, http_rates)
}

/// nginx's stream peer: its max and rates, the bulk transfers and the idle connections.
fn measure_nginx_stream(bench: &mut Bench, stream: &Target) -> (SystemFigures, Vec<(f64, f64)>) {
    let stream_bulk = Target {
        port: port::NGINX_STREAM_BULK,
        ..stream.clone()
    };
    let r = bench.max(stream);
    let stream_max = note_err(bench, "nginx stream max", r);
    let stream_rates = offered_rates(&bench.p, stream_max.as_ref());
    let mut fig = SystemFigures {
        max: stream_max,
        ..SystemFigures::default()
    };
    for &(_, rate) in &stream_rates {
        let r = bench.at_rate(stream, rate);
        if let Some(m) = note_err(bench, "nginx stream: rate", r) {
            fig.rates.insert(rate as u64, m);
        }
    }
    let r = bench.bulk(&stream_bulk, false);
    fig.bulk_down = note_err(bench, "nginx stream bulk down", r);
    let r = bench.bulk(&stream_bulk, true);
    fig.bulk_up = note_err(bench, "nginx stream bulk up", r);
    let r = bench.idle(&stream_bulk);
    fig.idle = note_err(bench, "nginx stream idle", r);
    (fig, stream_rates)
}

/// What scm-proxy measured, by mode (`None` where it was not run or did not start).
#[derive(Default)]
struct ScmFigures {
    http: Option<SystemFigures>,
    tunnel: Option<SystemFigures>,
    steered: Option<SystemFigures>,
    /// The tunnel with `--tls-path ktls`, where the kernel has TLS.
    ktls: Option<SystemFigures>,
}

/// scm-proxy on CPU 0: http mode and the tunnel at nginx's rates, then the tunnel behind the XDP
/// and sk_lookup steering (one worker, same CPU).
fn measure_scm(
    bench: &mut Bench,
    dir: &Path,
    work: &Path,
    sec: &scm::Security,
    nginx: &NginxFigures,
) -> ScmFigures {
    let mut out = ScmFigures::default();
    let r = ScmSut::start(&bench.topo, dir, work, &bench.certs, sec, None, "userspace");
    let Some(proxy) = note_err(bench, "starting scm-proxy", r) else {
        return out;
    };
    let rates: Vec<f64> = nginx.http_rates.iter().map(|r| r.1).collect();
    let (name, proto) = proxy.http_target();
    let t = Target {
        name,
        port: port::SCM,
        proto,
        authorization: None,
        bulk_proto: None,
        pid: proxy.pid(),
    };
    out.http = Some(measure_system(bench, &t, Some(&rates), false, true, false));
    let rates: Vec<f64> = nginx.stream_rates.iter().map(|r| r.1).collect();
    let (name, proto, bulk_proto) = proxy.tunnel_targets();
    let t = Target {
        name,
        port: port::SCM,
        proto,
        authorization: None,
        bulk_proto: Some(bulk_proto),
        pid: proxy.pid(),
    };
    out.tunnel = Some(measure_system(bench, &t, Some(&rates), true, false, true));
    drop(proxy);
    let pin = PathBuf::from(format!("/sys/fs/bpf/scmb-{}", std::process::id()));
    let r = ScmSut::start(
        &bench.topo,
        dir,
        work,
        &bench.certs,
        sec,
        Some(pin),
        "userspace",
    );
    if let Some(steered) = note_err(bench, "starting scm-proxy with steering", r) {
        let t = Target {
            name: STEERED.into(),
            pid: steered.pid(),
            ..t.clone()
        };
        out.steered = Some(measure_system(bench, &t, None, true, false, false));
    }
    if bench.ktls.available {
        let r = ScmSut::start(&bench.topo, dir, work, &bench.certs, sec, None, "ktls");
        if let Some(k) = note_err(bench, "starting scm-proxy with --tls-path ktls", r) {
            let t = Target {
                name: SCM_KTLS.into(),
                pid: k.pid(),
                ..t
            };
            out.ktls = Some(measure_system(bench, &t, None, true, false, false));
        }
    }
    out
}

/// The scm systems' names in the table.
const SCM_HTTP: &str = "scm-proxy http";
const SCM_TUNNEL: &str = "scm-proxy tunnel";
const STEERED: &str = "scm-proxy tunnel + XDP steering";
const SCM_KTLS: &str = "scm-proxy tunnel, kTLS";
const NGINX_KTLS: &str = "nginx stream, kTLS";

/// The steering overhead: the tunnel behind XDP steering against the same tunnel without it.
fn rows_steering_overhead(rows: &mut Vec<Row>, scm: &ScmFigures, mib: u64) {
    let (sf, tf) = (scm.steered.as_ref(), scm.tunnel.as_ref());
    let systems = (STEERED, SCM_TUNNEL);
    let max = |f: Option<&SystemFigures>| f.and_then(|f| f.max.as_ref()).map(|m| m.load.per_sec);
    let per_cpu = |f: Option<&SystemFigures>| {
        f.and_then(|f| f.max.as_ref())
            .and_then(Measured::per_cpu_sec)
    };
    let down = |f: Option<&SystemFigures>| {
        f.and_then(|f| f.bulk_down.as_ref())
            .map(|m| m.load.per_sec / 1e6)
    };
    let up = |f: Option<&SystemFigures>| {
        f.and_then(|f| f.bulk_up.as_ref())
            .map(|m| m.load.per_sec / 1e6)
    };
    let fig = scm_bench::report::STEERING_FIGURE;
    rows.push(Row::single(
        fig,
        "max requests/s through the tunnel, 1 KiB keep-alive".into(),
        "req/s",
        systems,
        (max(sf), max(tf)),
        true,
    ));
    rows.push(Row::single(
        fig,
        "  per proxy CPU-second".into(),
        "req/CPU-s",
        systems,
        (per_cpu(sf), per_cpu(tf)),
        true,
    ));
    rows.push(Row::single(
        fig,
        format!("bulk {mib} MiB down"),
        "MB/s",
        systems,
        (down(sf), down(tf)),
        true,
    ));
    rows.push(Row::single(
        fig,
        format!("bulk {mib} MiB up"),
        "MB/s",
        systems,
        (up(sf), up(tf)),
        true,
    ));
}

/// The kTLS rows: scm-proxy's tunnel with `--tls-path ktls` against nginx stream with its own
/// kTLS, or the reason they are empty.
fn rows_ktls(
    rows: &mut Vec<Row>,
    ktls: &KernelTls,
    scm: &ScmFigures,
    nginx: &NginxFigures,
    mib: u64,
) {
    let (sf, nf) = (scm.ktls.as_ref(), nginx.stream_ktls.as_ref());
    let systems = (SCM_KTLS, NGINX_KTLS);
    let missing = ktls.missing();
    let mut push = |metric: String, unit: &str, v: (Option<f64>, Option<f64>), higher: bool| {
        let mut r = Row::single(1, metric, unit, systems, v, higher);
        r.missing.clone_from(&missing);
        rows.push(r);
    };
    let max = |f: Option<&SystemFigures>| f.and_then(|f| f.max.as_ref()).map(|m| m.load.per_sec);
    let per_cpu = |f: Option<&SystemFigures>| {
        f.and_then(|f| f.max.as_ref())
            .and_then(Measured::per_cpu_sec)
    };
    push(
        "kTLS: max requests/s through the tunnel, 1 KiB keep-alive".into(),
        "req/s",
        (max(sf), max(nf)),
        true,
    );
    push(
        "kTLS:   per proxy CPU-second".into(),
        "req/CPU-s",
        (per_cpu(sf), per_cpu(nf)),
        true,
    );
    for (dir, pick) in [
        (
            "down",
            (|f: &SystemFigures| f.bulk_down.clone()) as fn(&SystemFigures) -> Option<Measured>,
        ),
        ("up", |f| f.bulk_up.clone()),
    ] {
        let (s, n) = (sf.and_then(pick), nf.and_then(pick));
        push(
            format!("kTLS: bulk {mib} MiB {dir}"),
            "MB/s",
            (
                s.as_ref().map(|m| m.load.per_sec / 1e6),
                n.as_ref().map(|m| m.load.per_sec / 1e6),
            ),
            true,
        );
        push(
            format!("kTLS: proxy CPU per GB, {dir}"),
            "CPU-s/GB",
            (
                s.as_ref().map(|m| m.cpu_secs / gb(m)),
                n.as_ref().map(|m| m.cpu_secs / gb(m)),
            ),
            false,
        );
    }
}

/// Each trial's offered rates (fractions of that trial's nginx max), for reading the latency
/// rows, which merge the trials by fraction.
fn rate_note(notes: &mut Vec<String>, trial: usize, nginx: &NginxFigures) {
    let list = |rates: &[(f64, f64)]| {
        rates
            .iter()
            .map(|(f, r)| format!("{:.0}%: {r:.0}", f * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    notes.push(format!(
        "trial {trial}: requests/s offered at fractions of nginx's max: http {}; tunnel {}",
        list(&nginx.http_rates),
        list(&nginx.stream_rates)
    ));
}

/// The data plane's goals on this machine (the data-plane issue), as bounds on the trials.
fn goals(mib: u64) -> Vec<scm_bench::trials::Goal> {
    use scm_bench::trials::Goal;
    let ratio = |what: &str,
                 figure: u8,
                 metric: &str,
                 systems: (&str, &str),
                 bound: f64,
                 at_least: bool| Goal {
        what: what.into(),
        figure,
        metric: metric.into(),
        scm_system: systems.0.into(),
        peer_system: systems.1.into(),
        bound,
        at_least,
    };
    let steer = scm_bench::report::STEERING_FIGURE;
    vec![
        ratio(
            "http keep-alive requests per proxy CPU-second / nginx + auth_request",
            1,
            "requests per proxy CPU-second",
            (SCM_HTTP, "nginx http + auth_request"),
            2.0,
            true,
        ),
        ratio(
            "tunnel keep-alive requests per proxy CPU-second / nginx stream",
            1,
            "requests per proxy CPU-second",
            (SCM_TUNNEL, "nginx stream"),
            1.3,
            true,
        ),
        ratio(
            "http p99 at 80% of nginx's max / nginx's",
            1,
            "p99 latency at 80%",
            (SCM_HTTP, "nginx http + auth_request"),
            1.0,
            false,
        ),
        ratio(
            "tunnel p99 at 80% of nginx's max / nginx's",
            1,
            "p99 latency at 80%",
            (SCM_TUNNEL, "nginx stream"),
            1.0,
            false,
        ),
        ratio(
            "proxy CPU per GB down / nginx stream",
            2,
            "proxy CPU per GB, down",
            (SCM_TUNNEL, "nginx stream"),
            0.5,
            false,
        ),
        ratio(
            "proxy CPU per GB up / nginx stream",
            2,
            "proxy CPU per GB, up",
            (SCM_TUNNEL, "nginx stream"),
            0.5,
            false,
        ),
        ratio(
            "steering: tunnel requests/s with / without",
            steer,
            "max requests/s",
            (STEERED, SCM_TUNNEL),
            0.97,
            true,
        ),
        ratio(
            "steering: bulk down with / without",
            steer,
            &format!("bulk {mib} MiB down"),
            (STEERED, SCM_TUNNEL),
            0.97,
            true,
        ),
        ratio(
            "steering: bulk up with / without",
            steer,
            &format!("bulk {mib} MiB up"),
            (STEERED, SCM_TUNNEL),
            0.97,
            true,
        ),
        ratio(
            "proxy RSS per idle connection (KiB)",
            4,
            "proxy RSS per idle connection",
            (SCM_TUNNEL, ""),
            16.0,
            false,
        ),
    ]
}

/// Figure 1 (requests and latency at nginx's rates) for each http pair and the tunnel.
fn rows_figure1(rows: &mut Vec<Row>, nginx: &NginxFigures, scm: &ScmFigures) {
    let hf = scm.http.as_ref();
    rows_small(
        rows,
        SCM_HTTP,
        hf,
        &nginx.http_peer.name,
        &nginx.http,
        &nginx.http_rates,
    );
    if let Some((t, f)) = &nginx.cached {
        rows_small(rows, SCM_HTTP, hf, &t.name, f, &[]);
    }
    if let Some((name, f)) = &nginx.plain {
        rows_small(rows, SCM_HTTP, hf, name, f, &[]);
    }
    rows_small(
        rows,
        SCM_TUNNEL,
        scm.tunnel.as_ref(),
        &nginx.stream.name,
        &nginx.stream_fig,
        &nginx.stream_rates,
    );
}

fn gb(m: &Measured) -> f64 {
    m.load.bytes as f64 / 1e9
}

/// Figure 2: bulk throughput through the tunnel and the proxy's CPU per GB, each direction.
fn rows_bulk(rows: &mut Vec<Row>, nginx: &NginxFigures, scm: &ScmFigures, mib: u64) {
    let tf = scm.tunnel.as_ref();
    let systems = (SCM_TUNNEL, nginx.stream.name.as_str());
    for (dir, sget, nget) in [
        (
            "down (back end to device)",
            tf.and_then(|f| f.bulk_down.as_ref()),
            nginx.stream_fig.bulk_down.as_ref(),
        ),
        (
            "up (device to back end)",
            tf.and_then(|f| f.bulk_up.as_ref()),
            nginx.stream_fig.bulk_up.as_ref(),
        ),
    ] {
        rows.push(Row::single(
            2,
            format!("bulk {mib} MiB {dir}"),
            "MB/s",
            systems,
            (
                sget.map(|m| m.load.per_sec / 1e6),
                nget.map(|m| m.load.per_sec / 1e6),
            ),
            true,
        ));
        rows.push(Row::single(
            2,
            format!("proxy CPU per GB, {dir}"),
            "CPU-s/GB",
            systems,
            (
                sget.map(|m| m.cpu_secs / gb(m)),
                nget.map(|m| m.cpu_secs / gb(m)),
            ),
            false,
        ));
    }
}

/// The tunnel behind the XDP steering against nginx stream: max rate and bulk.
fn rows_steering(rows: &mut Vec<Row>, nginx: &NginxFigures, scm: &ScmFigures, mib: u64) {
    let sf = scm.steered.as_ref();
    let stream = &nginx.stream_fig;
    let systems = (STEERED, nginx.stream.name.as_str());
    rows.push(Row::single(
        1,
        "max requests/s through the tunnel, 1 KiB keep-alive".into(),
        "req/s",
        systems,
        (
            sf.and_then(|f| f.max.as_ref()).map(|m| m.load.per_sec),
            stream.max.as_ref().map(|m| m.load.per_sec),
        ),
        true,
    ));
    rows.push(Row::single(
        1,
        "  per proxy CPU-second (supervisor + worker; XDP runs in softirq, not counted)".into(),
        "req/CPU-s",
        systems,
        (
            sf.and_then(|f| f.max.as_ref())
                .and_then(Measured::per_cpu_sec),
            stream.max.as_ref().and_then(Measured::per_cpu_sec),
        ),
        true,
    ));
    for (dir, sget, nget) in [
        (
            "down",
            sf.and_then(|f| f.bulk_down.as_ref()),
            stream.bulk_down.as_ref(),
        ),
        (
            "up",
            sf.and_then(|f| f.bulk_up.as_ref()),
            stream.bulk_up.as_ref(),
        ),
    ] {
        rows.push(Row::single(
            2,
            format!("bulk {mib} MiB {dir}"),
            "MB/s",
            systems,
            (
                sget.map(|m| m.load.per_sec / 1e6),
                nget.map(|m| m.load.per_sec / 1e6),
            ),
            true,
        ));
    }
}

/// Figure 3: new connections (full handshake and resumption offered) against each http peer.
fn rows_connects(rows: &mut Vec<Row>, nginx: &NginxFigures, scm: &ScmFigures) {
    let hf = scm.http.as_ref();
    let mut peers = vec![(nginx.http_peer.name.as_str(), &nginx.http)];
    if let Some((t, f)) = &nginx.cached {
        peers.push((t.name.as_str(), f));
    }
    for (peer, pf) in peers {
        for (label, sget, nget) in [
            (
                "new connections/s, full TLS 1.3 handshake + session check + 1 request",
                hf.and_then(|f| f.connect_full.as_ref()),
                pf.connect_full.as_ref(),
            ),
            (
                "new connections/s, resumption offered + session check + 1 request",
                hf.and_then(|f| f.connect_resumed.as_ref()),
                pf.connect_resumed.as_ref(),
            ),
        ] {
            rows.push(Row::single(
                3,
                label.into(),
                "conn/s",
                (SCM_HTTP, peer),
                (sget.map(|m| m.load.per_sec), nget.map(|m| m.load.per_sec)),
                true,
            ));
            rows.push(Row::single(
                3,
                "  per proxy CPU-second".into(),
                "conn/CPU-s",
                (SCM_HTTP, peer),
                (
                    sget.and_then(Measured::per_cpu_sec),
                    nget.and_then(Measured::per_cpu_sec),
                ),
                true,
            ));
        }
    }
}

/// Figure 4: memory per idle connection through the tunnel and nginx stream.
fn rows_idle(rows: &mut Vec<Row>, nginx: &NginxFigures, scm: &ScmFigures, idle_n: usize) {
    let si = scm.tunnel.as_ref().and_then(|f| f.idle);
    let ni = nginx.stream_fig.idle;
    for (i, label) in [
        "proxy RSS per idle connection",
        "proxy PSS per idle connection",
        "kernel TCP memory per idle connection (system-wide sockstat)",
    ]
    .iter()
    .enumerate()
    {
        let pick = |v: Option<(f64, f64, f64)>| v.map(|t| [t.0, t.1, t.2][i]);
        rows.push(Row::single(
            4,
            format!("{label}, {idle_n} open"),
            "KiB",
            (SCM_TUNNEL, nginx.stream.name.as_str()),
            (pick(si), pick(ni)),
            false,
        ));
    }
}

/// The latency-versus-rate curves of the plot.
fn curves(out: &mut Vec<Curve>, nginx: &NginxFigures, scm: &ScmFigures) {
    out.push(curve(&nginx.http_peer.name, &nginx.http));
    if let Some(f) = &scm.http {
        out.push(curve(SCM_HTTP, f));
    }
    out.push(curve(&nginx.stream.name, &nginx.stream_fig));
    if let Some(f) = &scm.tunnel {
        out.push(curve(SCM_TUNNEL, f));
    }
}

/// Notes that help read the table: how busy each proxy was at max rate, and how many connections
/// of the resumption test resumed.
fn utilisation_notes(notes: &mut Vec<String>, nginx: &NginxFigures, scm: &ScmFigures) {
    let (hf, tf) = (scm.http.as_ref(), scm.tunnel.as_ref());
    // A proxy below 100 % of its CPU at max rate was not the bottleneck: the client on the other
    // CPU was. The per-CPU-second rows compare the proxies themselves.
    for (name, f) in [
        (nginx.http_peer.name.as_str(), Some(&nginx.http)),
        (nginx.stream.name.as_str(), Some(&nginx.stream_fig)),
        (SCM_HTTP, hf),
        (SCM_TUNNEL, tf),
    ] {
        if let Some(m) = f.and_then(|f| f.max.as_ref()) {
            notes.push(format!(
                "{name} used {:.0}% of its CPU at max rate",
                100.0 * m.cpu_secs / m.load.secs
            ));
        }
    }
    for (name, f) in [
        (nginx.http_peer.name.as_str(), Some(&nginx.http)),
        (SCM_HTTP, hf),
    ] {
        if let Some(m) = f.and_then(|f| f.connect_resumed.as_ref()) {
            notes.push(format!(
                "{name}: {} of {} connections in the resumption test resumed a TLS session",
                m.load.resumed, m.load.ok
            ));
        }
    }
}

fn wrk_cross_check(bench: &Bench, t: &Target, ours: Option<&Measured>) -> Result<CrossCheck> {
    let ours = ours.context("no scm-bench figure to compare")?;
    check_stop()?;
    bench.bar.set_message("wrk cross-check");
    let url = format!("https://{DUT_ADDR}:{}/1k", t.port);
    let mut cmd = bench.topo.pinned(&bench.topo.cli, "1", "wrk");
    cmd.args([
        "-t1",
        &format!("-c{}", bench.p.connections),
        &format!("-d{}s", bench.p.secs.ceil() as u64),
    ]);
    if let Some(a) = &t.authorization {
        cmd.args(["-H", &format!("Authorization: {a}")]);
    }
    let out = cmd.arg(&url).output().context("running wrk")?;
    bench.bar.inc(1);
    let text = String::from_utf8_lossy(&out.stdout);
    let theirs =
        parse_wrk(&text).with_context(|| format!("no Requests/sec in wrk output: {text}"))?;
    Ok(CrossCheck {
        what: format!("{}: max requests/s", t.name),
        ours: ours.load.per_sec,
        theirs,
        tool: format!(
            "wrk -t1 -c{} (OpenSSL client, same CPU)",
            bench.p.connections
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openssl_outputs() {
        let aes = "Doing AES-128-GCM for 1s on 16384 size blocks: 250000 AES-128-GCM's in 1.00s\n\
                   version: 3.0.19\n...\ntype          16384 bytes\nAES-128-GCM    4096000.00k\n";
        assert_eq!(parse_openssl_aes(aes), Some(4096.0));
        let ecdsa = "                              sign    verify    sign/s verify/s\n \
                     256 bits ecdsa (nistp256)   0.0000s   0.0001s  41234.5  13456.7\n";
        assert_eq!(parse_openssl_ecdsa(ecdsa), Some((41234.5, 13456.7)));
        assert_eq!(parse_openssl_ecdsa("nothing"), None);
        let wrk = "Running 3s test @ https://x/1k\n  1 threads and 50 connections\n\
                   Requests/sec:  23456.78\nTransfer/sec:      27.53MB\n";
        assert_eq!(parse_wrk(wrk), Some(23456.78));
    }
}
