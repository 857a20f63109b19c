//! `scm-proxy serve --workers N`: the supervisor that runs N proxy worker processes behind the
//! eBPF steering, keeps the worker map current, restarts dead workers, reloads their
//! certificates on SIGHUP, replaces them one by one on SIGUSR2, and drains them on SIGTERM.
//!
//! Each worker is this same binary re-executed with the same arguments and a worker index in
//! its environment; it serves on a loopback port of its own. The supervisor takes a duplicate
//! of the worker's listening socket (pidfd_getfd), puts it in the sockmap the sk_lookup program
//! delivers from, and closes its duplicate, so the socket lives exactly as long as the worker:
//! when a worker dies the kernel drops it from the sockmap at once and new connections go to
//! the others before the supervisor has even noticed. `docs/data-plane.md` has the whole story.
//!
//! `args` holds the flags, `error` the error type, `workers` the worker management, `process` what is read of other
//! processes (procfs, pidfds, signals), `shield` a worker's feeds of the shield maps, and
//! `metrics` the supervisor's ops listener (its metrics and its workers', `/ready`, `/status`).

mod args;
mod error;
mod metrics;
mod process;
mod shield;
pub mod status;
mod workers;

use std::{
    fs,
    os::fd::AsFd,
    sync::{Arc, Mutex},
};

use proxy_common::steer::MAX_WORKERS;
use scm_proto::lifecycle::notify;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::info;

pub use args::{
    SupervisorArgs, WORKER_INDEX_ENV, WORKER_LISTEN_ENV, WORKER_METRICS_ENV, single_process_limit,
    worker_serve_args,
};
pub use error::SupervisorError;
pub use process::device_connections;
pub use shield::{blocklist_sink, install_verified_hook};

use crate::{
    proxy::ServeArgs,
    steer::{SteerOptions, Steering},
};
use args::steer_config;
use error::io_err;
use metrics::{SupervisorView, serve_ops};
use workers::{Event, Supervisor};

/// Which role this `serve` process has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `serve` without `--workers`: one process, no steering.
    Single,
    /// A worker started by a supervisor.
    Worker {
        /// Slot index.
        index: u32,
    },
    /// The supervisor of this many workers.
    Supervisor {
        /// Number of workers.
        workers: u32,
    },
}

/// The role of this process, from its flags and environment.
pub fn role(args: &SupervisorArgs) -> Result<Role, SupervisorError> {
    if let Ok(index) = std::env::var(WORKER_INDEX_ENV) {
        let index = index
            .parse()
            .map_err(|e| SupervisorError::Config(format!("{WORKER_INDEX_ENV}={index:?}: {e}")))?;
        return Ok(Role::Worker { index });
    }
    match args.workers {
        None => Ok(Role::Single),
        Some(0) => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            Ok(Role::Supervisor {
                workers: cpus.min(MAX_WORKERS / 2),
            })
        }
        Some(n) if n <= MAX_WORKERS / 2 => Ok(Role::Supervisor { workers: n }),
        Some(n) => Err(SupervisorError::Config(format!(
            "--workers {n}: at most {} (half the worker map, so a rolling restart has room)",
            MAX_WORKERS / 2
        ))),
    }
}

/// Runs the supervisor until SIGTERM or SIGINT: loads (or adopts) the programs and maps, starts
/// (or adopts) `workers` workers, restarts dead ones. SIGHUP: checks the new certificate and key
/// itself (a bad pair is refused with the reason, the workers untouched), then forwards SIGHUP
/// to every worker, which reloads in place (no connection dropped, no process replaced).
/// SIGUSR2: a rolling restart (each worker drained and replaced by the binary on disk, one at a
/// time, for an upgrade), while signals and worker exits go on being handled. On SIGTERM/SIGINT
/// every worker drains (up to --drain-timeout) and the pins are removed; killed any other way
/// it leaves them, and steering goes on until a new supervisor adopts it.
pub async fn run(
    serve: ServeArgs,
    args: SupervisorArgs,
    workers: u32,
) -> Result<(), SupervisorError> {
    let adopting = Steering::is_pinned(&args.pin_dir);
    let kernel_log = tracing::enabled!(tracing::Level::DEBUG);
    let mut steering = Steering::load(&SteerOptions {
        pin_dir: Some(args.pin_dir.clone()),
        kernel_log_level: kernel_log.then_some(aya_log::Level::Debug),
        ..SteerOptions::default()
    })?;
    if kernel_log {
        steering.forward_kernel_logs()?;
    }
    if let Some(iface) = &args.steer_iface {
        match steering.attach_xdp(iface, args.xdp_mode)? {
            Some(mode) => info!(iface, %mode, "XDP attached and pinned"),
            None => info!(iface, "pinned XDP link adopted"),
        }
    }
    let netns = fs::File::open("/proc/self/ns/net").map_err(io_err("opening /proc/self/ns/net"))?;
    steering.attach_sk_lookup(netns.as_fd())?;
    steering.set_config(&steer_config(&serve, &args))?;
    info!(
        pin_dir = %args.pin_dir.display(),
        adopting,
        service_port = serve.listen.port(),
        "steering loaded"
    );

    let steering = Arc::new(Mutex::new(steering));
    // Set on SIGTERM/SIGINT, before the workers are told to drain; the readiness check reads it.
    let drain = scm_proto::lifecycle::Drain::new();
    let restarts = Arc::new(Mutex::new(vec![0u64; MAX_WORKERS as usize]));
    if let Some(addr) = serve.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(io_err(format!("binding the ops listener on {addr}")))?;
        let addr = l
            .local_addr()
            .map_err(io_err("reading the ops listener's address"))?;
        info!(%addr, "supervisor ops listener on http://{addr}/ (metrics of all workers, ready, live, status)");
        tokio::spawn(serve_ops(
            l,
            SupervisorView {
                steering: steering.clone(),
                restarts: restarts.clone(),
                count: workers,
                ops_addr: addr,
                pin_dir: args.pin_dir.clone(),
                xdp_iface: args.steer_iface.clone(),
            },
            drain.clone(),
        ));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        serve,
        args,
        steering,
        workers: (0..MAX_WORKERS).map(|_| None).collect(),
        count: workers,
        events: tx,
        generation: 0,
        restarts,
        rolling: None,
    };
    // The handlers go in before any worker starts: a signal during start-up is then acted on
    // once the workers run, never the default action (which would orphan them).
    let mut hup = signal(SignalKind::hangup()).map_err(io_err("installing the SIGHUP handler"))?;
    let mut usr2 =
        signal(SignalKind::user_defined2()).map_err(io_err("installing the SIGUSR2 handler"))?;
    let mut stop = scm_proto::shutdown::Shutdown::install()
        .map_err(io_err("installing the SIGTERM/SIGINT handlers"))?;
    let adopted = sup.adopt_workers()?;
    for index in 0..workers {
        if adopted.contains(&index) {
            continue;
        }
        // A worker that cannot start at all (a bad certificate, a port in use) is a
        // configuration error: say so and stop, instead of restarting it forever.
        if let Err(e) = sup.start_worker(index).await {
            sup.stop_all().await;
            if !adopting {
                let _ = Steering::unpin(&sup.args.pin_dir);
            }
            return Err(e);
        }
    }
    info!(
        workers,
        adopted = adopted.len(),
        "supervisor running; SIGHUP reloads the workers' certificates, SIGUSR2 replaces the \
         workers one by one"
    );
    // Programs attached and every worker in the sockmap: the service port answers.
    if let Err(e) = scm_proto::lifecycle::notify::ready(&format!(
        "{workers} workers behind eBPF steering on port {} ({} adopted)",
        sup.serve.listen.port(),
        adopted.len()
    )) {
        tracing::warn!(error = %e, "cannot tell systemd the supervisor is ready");
    }

    loop {
        tokio::select! {
            Some(ev) = rx.recv() => match ev {
                Event::Exited { index, generation } => sup.on_exit(index, generation)?,
                Event::Restart { index } => sup.restart(index).await?,
                Event::DrainOverdue { index, generation } => sup.drain_overdue(index, generation),
            },
            _ = hup.recv() => sup.reload(),
            _ = usr2.recv() => sup.begin_rolling()?,
            signal = stop.recv() => {
                info!(%signal, "stop signal: the workers drain");
                break;
            }
        }
    }
    drain.begin();
    let _ = notify::stopping("draining the workers");
    info!(
        drain_timeout = ?sup.serve.drain_timeout,
        "stopping the workers (each drains) and removing the pins"
    );
    sup.stop_all().await;
    Steering::unpin(&sup.args.pin_dir).map_err(io_err("removing the pins"))?;
    Ok(())
}
