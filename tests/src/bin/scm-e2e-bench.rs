//! `scm-e2e-bench`: measures the data path on this machine and prints the figures side by side with
//! a peer (the same work straight to the back end, without scm): MB/s through a tunnel,
//! requests/s through http mode, and new connections/s (TLS handshake + preamble + cached session
//! check + back-end connect). Starts its own Security server and proxy like the tests do.
//!
//! `SCM_E2E_PROFILE=release cargo run --release -p scm-e2e --bin scm-e2e-bench`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use scm_device::Session;
use scm_e2e::{Stack, StackOptions};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Benchmark scm's proxy against direct connections to the same back ends.
#[derive(Debug, Parser)]
#[command(name = "scm-e2e-bench")]
struct Cli {
    /// Megabytes pushed through the tunnel (each way).
    #[arg(long, default_value_t = 256)]
    megabytes: u64,
    /// Seconds for each rate measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients for the rate measurements.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

async fn throughput<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, total: u64) -> f64 {
    let (mut r, mut w) = tokio::io::split(stream);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min((total - sent) as usize);
            w.write_all(&chunk[..n]).await.expect("write");
            sent += n as u64;
        }
        w.flush().await.expect("flush");
        w
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < total {
        let n = r.read(&mut buf).await.expect("read");
        assert!(n > 0, "echo closed early");
        got += n as u64;
    }
    let _w = writer.await.expect("writer");
    total as f64 / 1e6 / start.elapsed().as_secs_f64()
}

async fn rate<F, Fut>(seconds: u64, concurrency: usize, job: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = u64> + Send,
{
    let job = Arc::new(job);
    let count = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (job, count) = (job.clone(), count.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    count.fetch_add(job().await, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn http_requests<S>(stream: S, until: Instant) -> u64
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut n = 0;
    while Instant::now() < until {
        let req = hyper::Request::get("/bench")
            .header("host", "web")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert!(resp.status().is_success());
        resp.into_body().collect().await.expect("body");
        n += 1;
    }
    n
}

async fn ping<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> u64 {
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("read");
    1
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    eprintln!("starting scm-security and scm-proxy (building them if needed)...");
    let stack = Stack::start(StackOptions::default()).await?;
    let device = stack.enroll("alice", "bench-phone", "1.0.0").await?;
    let session = Session::login(&device, scm_e2e::stack::PASSWORD).await?;
    let total = cli.megabytes * 1_000_000;
    let (secs, conc) = (cli.seconds, cli.concurrency);

    let through = throughput(session.open("echo").await?, total).await;
    let direct = throughput(TcpStream::connect(stack.echo).await?, total).await;
    let mut rows = vec![("tunnel throughput, MB/s each way", through, direct)];

    let until = || Instant::now() + Duration::from_secs(secs);
    let s = session.clone();
    let through = {
        let stop = until();
        let tasks: Vec<_> = (0..conc)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    http_requests(s.open("web").await.expect("open"), stop).await
                })
            })
            .collect();
        let start = Instant::now();
        let mut n = 0;
        for t in tasks {
            n += t.await?;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let http = stack.http;
    let direct = {
        let stop = until();
        let tasks: Vec<_> = (0..conc)
            .map(|_| {
                tokio::spawn(async move {
                    http_requests(TcpStream::connect(http).await.expect("connect"), stop).await
                })
            })
            .collect();
        let start = Instant::now();
        let mut n = 0;
        for t in tasks {
            n += t.await?;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    rows.push(("http mode, requests/s (keep-alive)", through, direct));

    let s = session.clone();
    let through = rate(secs, conc, move || {
        let s = s.clone();
        async move { ping(s.open("echo").await.expect("open")).await }
    })
    .await;
    let echo = stack.echo;
    let direct = rate(secs, conc, move || async move {
        ping(TcpStream::connect(echo).await.expect("connect")).await
    })
    .await;
    rows.push((
        "new connections/s (TLS+preamble+1-byte echo)",
        through,
        direct,
    ));

    println!(
        "\n{:<48} {:>14} {:>14}",
        "measure", "through scm", "direct (peer)"
    );
    for (what, a, b) in rows {
        println!("{what:<48} {a:>14.1} {b:>14.1}");
    }
    println!(
        "\n{} MB each way; {conc} concurrent clients for {secs} s per rate; proxy tls_path {}",
        cli.megabytes,
        if stack.metrics().await?.contains("path=\"ktls\"} 1") {
            "ktls"
        } else {
            "userspace"
        }
    );
    Ok(())
}
