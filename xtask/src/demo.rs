//! `cargo xtask demo`: shows what scm does, end to end, on this machine.
//!
//! `workflow`: see [`crate::workflow`]. `xdp`: the ingress XDP program attached to a veth inside a pair of fresh network namespaces,
//! with real TCP, UDP and ICMP traffic sent across and the per-class counters printed live.

use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::cmd;
use crate::netns::NetnsPair;

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Which demo to run.
    #[arg(value_enum, default_value_t = Which::All)]
    which: Which,
    /// Seconds of traffic in the XDP demo.
    #[arg(long, default_value_t = 6)]
    seconds: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Which {
    /// The workflow, then the XDP program.
    All,
    /// The six steps: Security server, proxy, back ends, and a device that enrolls, logs in,
    /// tunnels, sends an HTTP request, updates and logs out.
    Workflow,
    /// The ingress XDP program with live counters, in a namespace pair.
    Xdp,
}

/// Where the demo's logs go: the setup's and the builds' output, and one file per process.
pub fn log_dir() -> std::path::PathBuf {
    cmd::target_dir().join("demo-log")
}

/// Runs the chosen demo. The caller has put [`cmd`] in quiet mode with a log in [`log_dir`].
pub fn run(args: &DemoArgs) -> Result<()> {
    let logs = log_dir();
    let result = match args.which {
        Which::All => crate::workflow::run(&logs).and_then(|()| xdp(args.seconds)),
        Which::Workflow => crate::workflow::run(&logs),
        Which::Xdp => xdp(args.seconds),
    };
    println!(
        "demo: logs in {} (setup and builds: demo.log; one file per process)",
        logs.display()
    );
    result
}

/// Kills a child on drop, so an error anywhere leaves nothing running.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xdp(seconds: u64) -> Result<()> {
    cmd::build(&["scm-proxy"], &["scm-proxy"])?;
    let proxy = cmd::target_dir().join("debug/scm-proxy");
    let pair = NetnsPair::create("demo")?;
    println!(
        "demo: namespaces {} ({} {}) and {} ({} {}) joined by veth",
        pair.a, pair.va, pair.addr_a, pair.b, pair.vb, pair.addr_b
    );
    println!(
        "demo: attaching the ingress XDP program to {} in {}",
        pair.vb, pair.b
    );
    let attach = NetnsPair::exec(&pair.b, &proxy.to_string_lossy())
        .args(["xdp", "attach", "--iface", pair.vb, "--interval", "2"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting scm-proxy xdp attach")?;
    let mut attach = Reaper(attach);
    // Its tables go to the terminal as they come, and are kept to check the final one.
    let out = attach.0.stdout.take().context("xdp attach's stdout")?;
    let printer = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("  {line}");
            lines.push(line);
        }
        lines
    });
    sleep(Duration::from_secs(2));
    if let Some(status) = attach.0.try_wait()? {
        bail!("scm-proxy xdp attach exited early: {status}");
    }

    // A TCP listener and UDP sink in b; ping, TCP and UDP from a.
    let _tcp_sink = Reaper(
        NetnsPair::exec(&pair.b, "nc")
            .args(["-l", "-k", pair.addr_b, "9000"])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let _udp_sink = Reaper(
        NetnsPair::exec(&pair.b, "nc")
            .args(["-u", "-l", "-k", pair.addr_b, "9001"])
            .stdout(Stdio::null())
            .spawn()?,
    );
    sleep(Duration::from_millis(300));
    println!(
        "demo: sending ICMP, TCP and UDP from {} for {seconds} s",
        pair.a
    );
    for _ in 0..seconds {
        let _ = NetnsPair::exec(&pair.a, "ping")
            .args(["-c", "1", "-W", "1", pair.addr_b])
            .stdout(Stdio::null())
            .status();
        for (flags, port) in [(&["-N"][..], "9000"), (&["-u", "-w", "1"][..], "9001")] {
            let mut nc = NetnsPair::exec(&pair.a, "nc")
                .args(flags)
                .args([pair.addr_b, port])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            if let Some(mut stdin) = nc.stdin.take() {
                use std::io::Write as _;
                let _ = stdin.write_all(&[b'x'; 1000]);
            }
            let _ = nc.wait();
        }
        sleep(Duration::from_millis(700));
    }
    sleep(Duration::from_secs(2));
    println!("demo: stopping scm-proxy with SIGINT");
    // SAFETY: kill(2) on the pid of a child we own and have not reaped yet.
    unsafe { libc::kill(attach.0.id() as i32, libc::SIGINT) };
    let status = attach.0.wait()?;
    let lines = printer
        .join()
        .map_err(|_| anyhow::anyhow!("the output printer panicked"))?;
    if pair.xdp_attached_on_b() {
        bail!("the XDP program is still attached after scm-proxy exited");
    }
    if !status.success() {
        bail!("scm-proxy xdp attach exited with {status}");
    }
    let counted = final_counts(&lines)?;
    // ICMP is counted as `other`; each class the demo sent must have been seen.
    for class in ["tcp-syn", "tcp", "udp", "other"] {
        let packets = counted.iter().find(|(c, _)| c == class).map(|(_, n)| *n);
        if packets.unwrap_or(0) == 0 {
            bail!(
                "the final table counted no {class} packets ({packets:?}), yet the demo sent some"
            );
        }
    }
    let summary: Vec<String> = counted.iter().map(|(c, n)| format!("{c} {n}")).collect();
    println!(
        "demo: scm-proxy exited ({status}); program detached after counting {}; removing the namespaces",
        summary.join(", ")
    );
    Ok(())
}

/// The `class packets` pairs of the `[final]` table `scm-proxy xdp attach` printed at exit.
fn final_counts(lines: &[String]) -> Result<Vec<(String, u64)>> {
    let at = lines
        .iter()
        .rposition(|l| l.starts_with("[final]"))
        .context("scm-proxy xdp attach printed no [final] table")?;
    let mut out = Vec::new();
    for line in &lines[at + 2..] {
        let cols: Vec<&str> = line.split_whitespace().collect();
        match cols.as_slice() {
            ["total", ..] => return Ok(out),
            [class, packets, _bytes] => out.push((
                class.to_string(),
                packets
                    .parse()
                    .with_context(|| format!("a bad count in {line:?}"))?,
            )),
            _ => bail!("an unexpected line in the final table: {line:?}"),
        }
    }
    bail!("the final table has no total line")
}
