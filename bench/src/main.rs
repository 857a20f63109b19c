//! `scm-bench`: `run` sets up the namespaces and the systems under test and prints the side-by-side
//! table; `load` is the load generator it starts inside the client namespace; `backend` is the bulk
//! back end it starts inside the back-end namespace.

mod orchestrate;
mod scm;
mod sut;
mod topology;

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use scm_bench::load::LoadSpec;

/// Side-by-side benchmark of scm-proxy against nginx.
#[derive(Debug, Parser)]
#[command(name = "scm-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the whole benchmark (needs root: it makes network namespaces).
    Run(orchestrate::RunArgs),
    /// Run one load (JSON spec) and print its result as one JSON line.
    Load {
        /// The load spec, JSON.
        #[arg(long)]
        spec: String,
    },
    /// Render the markdown table and the plot again from a results JSON (next to it).
    Render {
        /// A `quick.json` or `full.json` written by `run`.
        json: std::path::PathBuf,
    },
    /// Serve the bulk protocol (D n / U n) on an address.
    Backend {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run(args) => orchestrate::run(&args),
        Cmd::Load { spec } => {
            let spec: LoadSpec = serde_json::from_str(&spec).context("parsing --spec")?;
            raise_nofile_limit();
            // One thread: the client is pinned to one CPU, and a single-threaded runtime wastes
            // nothing on work stealing.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(scm_bench::load::run(spec))?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::Render { json } => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("reading {}", json.display()))?;
            let report: scm_bench::report::Report = serde_json::from_str(&text)?;
            std::fs::write(
                json.with_extension("md"),
                scm_bench::report::markdown(&report),
            )?;
            let stem = json.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
            let svg = json.with_file_name(format!("{stem}-latency.svg"));
            scm_bench::plot::latency_vs_rate(&report.curves, &svg)?;
            println!(
                "written {} and {}",
                json.with_extension("md").display(),
                svg.display()
            );
            Ok(())
        }
        Cmd::Backend { listen } => {
            raise_nofile_limit();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(scm_bench::backend::serve(listen))
                .with_context(|| format!("bulk back end on {listen}"))
        }
    }
}

/// 10k idle connections need more descriptors than the usual soft limit of 1024.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; the resource id is valid.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur = lim.rlim_max.max(lim.rlim_cur);
        // SAFETY: setrlimit reads the struct we own; raising the soft limit to the hard one is allowed.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}
