//! `scm-proxy`: the command line of scm's proxy.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use scm_proxy::xdp::{AttachMode, LoadOptions, XdpIngress};

/// scm's proxy: terminates devices' TLS, checks their sessions with the Security server and
/// relays to intranet back ends, with an eBPF data plane in front.
///
/// Logs go to stderr, as text or (--log-json) JSON lines; --log-level (or SCM_LOG, else
/// RUST_LOG) sets their levels per module (default: info). At debug the kernel programs' own log
/// records are forwarded too. A supervisor's workers log the way it does.
#[derive(Debug, Parser)]
#[command(name = "scm-proxy", version)]
struct Cli {
    /// `--log-json`, `--log-level`.
    #[command(flatten)]
    log: scm_proto::ops::logs::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve devices: TLS 1.3, preamble, session checks with the Security server, relaying.
    // Boxed: the serve flags dwarf the other variants (clippy::large_enum_variant).
    Serve(Box<ServeCommand>),
    /// The XDP ingress program: attach it to an interface and watch what it counts.
    #[command(subcommand)]
    Xdp(XdpCommand),
    /// Man pages, shell completions, the unit's EnvironmentFile (`cargo xtask package`).
    #[command(hide = true, subcommand)]
    Generate(scm_proto::cli::Generate),
    /// Ask a running supervisor (or single proxy) how it is: workers (slot, state, pid, open
    /// connections), attached programs and pins, map fill levels, counters, the TLS path.
    ///
    /// It reads GET /status on the ops listener (the `serve --metrics-listen` address).
    ///
    /// Example: scm-proxy status --metrics-listen 127.0.0.1:9100
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The ops listener of the running proxy (its `serve --metrics-listen`).
    #[arg(long, env = "SCM_PROXY_METRICS_LISTEN")]
    metrics_listen: std::net::SocketAddr,

    /// Print the JSON as the proxy sent it.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum XdpCommand {
    /// Attach the ingress parser to an interface and print its counters until SIGINT/SIGTERM,
    /// then detach.
    ///
    /// Every frame arriving on the interface is parsed (Ethernet with VLAN tags, IPv4, IPv6,
    /// TCP, UDP) and counted per class: tcp-syn, tcp, udp, other, malformed. Frames all pass
    /// on to the kernel stack; nothing is dropped. Needs root (or CAP_BPF and CAP_NET_ADMIN).
    ///
    /// Example: scm-proxy xdp attach --iface eth0 --interval 5
    Attach(AttachArgs),
}

#[derive(Debug, Args)]
struct AttachArgs {
    /// Interface to attach to, in this process's network namespace (see `ip link`).
    #[arg(long, env = "SCM_XDP_IFACE")]
    iface: String,

    /// native: driver mode, fails if the driver lacks XDP. generic: skb mode, works everywhere,
    /// slower. auto: native, else generic with a warning; generic on a veth, where native XDP
    /// turns TSO off on the peer and halves throughput into it.
    #[arg(long, env = "SCM_XDP_MODE", value_enum, default_value_t = AttachMode::Auto)]
    mode: AttachMode,

    /// Seconds between two counter tables (fractions allowed, e.g. 0.5).
    #[arg(long, env = "SCM_XDP_INTERVAL", default_value = "1", value_parser = parse_interval)]
    interval: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if !(0.05..=86_400.0).contains(&secs) {
        return Err(format!("{secs} s is outside 0.05 s ..= 1 day"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs are only logs: nothing reads them back (the blocklist gets typed refusals).
    cli.log.init().map_err(anyhow::Error::msg)?;
    if let Command::Serve(cmd) = &cli.command {
        // A worker marks the sources of the connections it accepts verified (SYN-flood mode).
        scm_proxy::supervisor::install_verified_hook(&cmd.workers);
    }
    match cli.command {
        Command::Serve(cmd) => serve(*cmd).await,
        Command::Xdp(XdpCommand::Attach(args)) => xdp_attach(args).await,
        Command::Status(args) => {
            let v = scm_proxy::supervisor::status::fetch(args.metrics_listen).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", scm_proxy::supervisor::status::render(&v));
            }
            Ok(())
        }
        Command::Generate(g) => Ok(scm_proto::cli::main(
            <Cli as clap::CommandFactory>::command(),
            &g,
        )?),
    }
}

/// `serve` flags: the proxy's own, and the supervisor's (`--workers` and the steering).
#[derive(Debug, Args)]
struct ServeCommand {
    #[command(flatten)]
    serve: scm_proxy::proxy::ServeArgs,
    #[command(flatten)]
    workers: scm_proxy::supervisor::SupervisorArgs,
}

async fn serve(cmd: ServeCommand) -> anyhow::Result<()> {
    use scm_proxy::supervisor::{Role, role, run, worker_serve_args};
    match role(&cmd.workers)? {
        Role::Single => {
            // No XDP blocklist to feed: the process limits repeated failures per source itself.
            let mut serve = cmd.serve;
            serve.source_limit = scm_proxy::supervisor::single_process_limit(&cmd.workers);
            Ok(scm_proxy::proxy::serve(serve).await?)
        }
        Role::Worker { .. } => {
            // A worker feeds the XDP blocklist with the authentication failures it refuses.
            let hooks = match scm_proxy::supervisor::blocklist_sink(&cmd.workers) {
                Some(sink) => scm_proxy::proxy::ServeHooks::with_refusals(sink),
                None => scm_proxy::proxy::ServeHooks::default(),
            };
            let mut serve = worker_serve_args(cmd.serve)?;
            // Behind a balancer every packet comes from the balancer's address, so the XDP
            // blocklist cannot single out a device: the worker limits the addresses its PROXY
            // headers name itself, as a single process does.
            if !serve.proxy_protocol_from.is_empty() {
                serve.source_limit = scm_proxy::supervisor::single_process_limit(&cmd.workers);
            }
            Ok(scm_proxy::proxy::serve_with(serve, hooks).await?)
        }
        Role::Supervisor { workers } => Ok(run(cmd.serve, cmd.workers, workers).await?),
    }
}

async fn xdp_attach(args: AttachArgs) -> anyhow::Result<()> {
    let kernel_log = tracing::enabled!(tracing::Level::DEBUG);
    let options = LoadOptions {
        kernel_log_level: kernel_log.then_some(aya_log::Level::Debug),
    };
    let mut ingress = XdpIngress::load_with(&options)?;
    if kernel_log {
        ingress.forward_kernel_logs()?;
    }
    // Install the handlers before attaching so that a signal right after attach still detaches.
    let mut stop = scm_proto::shutdown::Shutdown::install()
        .context("installing the SIGTERM/SIGINT handlers")?;
    let mode = ingress.attach(&args.iface, args.mode)?;
    println!(
        "scm_ingress attached to {} in {mode} mode; counters every {:?}; SIGINT or SIGTERM detaches",
        args.iface, args.interval
    );
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    ticker.tick().await;
    let started = tokio::time::Instant::now();
    let signal_name = loop {
        tokio::select! {
            _ = ticker.tick() => {
                let counters = ingress.counters()?;
                println!("\n[{:.1}s] {}\n{counters}", started.elapsed().as_secs_f64(), args.iface);
            }
            signal = stop.recv() => break signal.name(),
        }
    };
    let counters = ingress.counters()?;
    ingress.detach()?;
    println!("\n[final] {}\n{counters}", args.iface);
    println!("{signal_name}: scm_ingress detached from {}", args.iface);
    Ok(())
}
