//! `scm-backend`: the demo's and benchmarks' back ends as a process: a TCP echo server and an
//! HTTP server that answers each request with a JSON description of what it received.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;

/// Run a TCP echo back end and an HTTP back end (answers with JSON: method, path, headers).
///
/// Example: scm-backend --echo 127.0.0.1:7001 --http 127.0.0.1:7002
#[derive(Debug, Parser)]
#[command(name = "scm-backend", version)]
struct Cli {
    /// Address of the TCP echo server.
    #[arg(long, env = "SCM_BACKEND_ECHO", default_value = "127.0.0.1:7001")]
    echo: SocketAddr,
    /// Address of the HTTP server.
    #[arg(long, env = "SCM_BACKEND_HTTP", default_value = "127.0.0.1:7002")]
    http: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let echo = tokio::net::TcpListener::bind(cli.echo)
        .await
        .with_context(|| format!("binding {}", cli.echo))?;
    let http = tokio::net::TcpListener::bind(cli.http)
        .await
        .with_context(|| format!("binding {}", cli.http))?;
    println!("echo on {}, http on {}", cli.echo, cli.http);
    tokio::spawn(scm_e2e::backend::serve_echo(echo));
    tokio::spawn(scm_e2e::backend::serve_http(http));
    scm_proto::shutdown::shutdown_signal()
        .await
        .context("installing the SIGTERM/SIGINT handlers")?;
    Ok(())
}
