//! Worker management: start a worker and put its socket in the sockmap, adopt the workers a
//! previous supervisor left, restart the dead, replace them one by one (a rolling restart,
//! driven by events so the supervisor's loop never waits on it), stop them all.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener},
    os::fd::OwnedFd,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use proxy_common::steer::WorkerState;
use rustix::process::Signal;
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{info, warn};

use super::{
    args::{SupervisorArgs, WORKER_INDEX_ENV, WORKER_LISTEN_ENV, WORKER_METRICS_ENV},
    error::{SupervisorError, io_err, lock},
    process::{listening_fd, pidfd_getfd, pidfd_open, process_runs, same_binary, signal_pid},
};
use crate::{proxy::ServeArgs, steer::Steering};

fn free_loopback_port() -> io::Result<u16> {
    Ok(StdListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

pub(super) struct Worker {
    pub(super) pid: u32,
    /// Our own children, to reap; adopted workers (from a previous supervisor) have none.
    pub(super) child: Option<Child>,
    pub(super) started: Instant,
    /// Bumped on every start, so a stale exit event is recognised.
    pub(super) generation: u64,
}

pub(super) enum Event {
    Exited {
        index: u32,
        generation: u64,
    },
    Restart {
        index: u32,
    },
    /// A worker a rolling restart stopped is still there after its drain timeout and a margin.
    DrainOverdue {
        index: u32,
        generation: u64,
    },
}

/// Beyond --drain-timeout, how long a stopped worker gets to exit before it is killed.
const EXIT_MARGIN: Duration = Duration::from_secs(10);

pub(super) struct Supervisor {
    pub(super) serve: ServeArgs,
    pub(super) args: SupervisorArgs,
    pub(super) steering: Arc<Mutex<Steering>>,
    pub(super) workers: Vec<Option<Worker>>,
    pub(super) count: u32,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) generation: u64,
    pub(super) restarts: Arc<Mutex<Vec<u64>>>,
    /// The slot a rolling restart is replacing now, if one runs.
    pub(super) rolling: Option<u32>,
}

impl Supervisor {
    /// Starts the worker in slot `index` and waits until its socket is in the sockmap.
    pub(super) async fn start_worker(&mut self, index: u32) -> Result<(), SupervisorError> {
        let port = free_loopback_port().map_err(io_err("finding a free loopback port"))?;
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let exe = std::env::current_exe().map_err(io_err("finding this executable"))?;
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1))
            .env(WORKER_INDEX_ENV, index.to_string())
            .env(WORKER_LISTEN_ENV, listen.to_string())
            .env_remove(WORKER_METRICS_ENV)
            // Only the supervisor reports to systemd (the unit's main process).
            .env_remove(scm_proto::lifecycle::notify::SOCKET_ENV);
        if let Some(m) = self.serve.metrics_listen {
            let addr = super::metrics::worker_ops_addr(m, index).ok_or_else(|| {
                SupervisorError::Config(format!("--metrics-listen {m}: no room for worker ports"))
            })?;
            cmd.env(WORKER_METRICS_ENV, addr.to_string());
        }
        let mut child = cmd.spawn().map_err(io_err(format!(
            "starting worker {index} ({})",
            exe.display()
        )))?;
        let pid = child.id();
        let pidfd = pidfd_open(pid).map_err(io_err(format!("pidfd_open of worker {index}")))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let fd = loop {
            if let Some(fd) = listening_fd(pid, port) {
                break fd;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SupervisorError::Config(format!(
                    "worker {index} (pid {pid}) exited before listening: {status}"
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SupervisorError::Config(format!(
                    "worker {index} (pid {pid}) did not listen on {listen} within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let socket = pidfd_getfd(&pidfd, fd)
            .map_err(io_err(format!("pidfd_getfd of worker {index}'s listener")))?;
        {
            let mut st = lock(&self.steering);
            st.register_socket(index, &socket)?;
            // Our duplicate closes here: the socket lives as long as the worker does.
            drop(socket);
            st.set_worker(index, WorkerState::Healthy, pid)?;
        }
        self.generation += 1;
        self.watch(index, pidfd, self.generation)?;
        info!(worker = index, pid, %listen, "worker serving");
        self.workers[index as usize] = Some(Worker {
            pid,
            child: Some(child),
            started: Instant::now(),
            generation: self.generation,
        });
        Ok(())
    }

    /// Reports the exit of the process behind `pidfd` as an event.
    fn watch(&self, index: u32, pidfd: OwnedFd, generation: u64) -> Result<(), SupervisorError> {
        // SAFETY: the AsyncFd owns the pidfd until it is dropped, so the registered
        // descriptor stays open and the same for the registration's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(|e| io_err("watching a worker's pidfd")(io::Error::from(e)))?;
        let events = self.events.clone();
        tokio::spawn(async move {
            // A pidfd turns readable when its process exits.
            let _ = fd.readable().await;
            let _ = events.send(Event::Exited { index, generation });
        });
        Ok(())
    }

    /// Adopts the workers a previous supervisor left running (their pids are in the worker
    /// map); returns the slots adopted.
    pub(super) fn adopt_workers(&mut self) -> Result<Vec<u32>, SupervisorError> {
        let slots: Vec<_> = lock(&self.steering).workers().to_vec();
        let mut adopted = Vec::new();
        for (index, slot) in slots.iter().enumerate() {
            let index = index as u32;
            if !slot.is_alive() || slot.pid == 0 {
                continue;
            }
            let alive = same_binary(slot.pid) && process_runs(slot.pid);
            match pidfd_open(slot.pid).ok().filter(|_| alive) {
                Some(pidfd) if index < self.count => {
                    self.generation += 1;
                    self.watch(index, pidfd, self.generation)?;
                    self.workers[index as usize] = Some(Worker {
                        pid: slot.pid,
                        child: None,
                        started: Instant::now(),
                        generation: self.generation,
                    });
                    if !slot.is_healthy() {
                        lock(&self.steering).set_worker(index, WorkerState::Healthy, slot.pid)?;
                    }
                    info!(worker = index, pid = slot.pid, "adopted a running worker");
                    adopted.push(index);
                }
                Some(_) => {
                    // Beyond the new worker count: drain it away.
                    info!(
                        worker = index,
                        pid = slot.pid,
                        "stopping a worker beyond --workers"
                    );
                    lock(&self.steering).set_worker(index, WorkerState::Absent, 0)?;
                    signal_pid(slot.pid, Signal::TERM);
                }
                None => {
                    lock(&self.steering).set_worker(index, WorkerState::Absent, 0)?;
                }
            }
        }
        Ok(adopted)
    }

    pub(super) fn on_exit(&mut self, index: u32, generation: u64) -> Result<(), SupervisorError> {
        let Some(w) = self.workers.get_mut(index as usize).and_then(Option::take) else {
            return Ok(());
        };
        if w.generation != generation {
            self.workers[index as usize] = Some(w);
            return Ok(());
        }
        let status = w.child.map(|mut c| c.wait());
        if self.rolling == Some(index) {
            // The rolling restart stopped it: replace it at once, then move on (in `restart`).
            lock(&self.steering).set_worker(index, WorkerState::Absent, 0)?;
            info!(worker = index, pid = w.pid, ?status, "drained and stopped");
            let _ = self.events.send(Event::Restart { index });
            return Ok(());
        }
        warn!(
            worker = index,
            pid = w.pid,
            ?status,
            "worker exited; restarting it"
        );
        lock(&self.steering).set_worker(index, WorkerState::Absent, 0)?;
        lock(&self.restarts)[index as usize] += 1;
        // Back off when a worker dies right after starting (a crash loop), not otherwise.
        let delay = if w.started.elapsed() < Duration::from_secs(2) {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::Restart { index });
        });
        Ok(())
    }

    pub(super) async fn restart(&mut self, index: u32) -> Result<(), SupervisorError> {
        if self.workers[index as usize].is_some() {
            return Ok(());
        }
        if let Err(e) = self.start_worker(index).await {
            warn!(worker = index, "restart failed: {e}; trying again in 1 s");
            let events = self.events.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = events.send(Event::Restart { index });
            });
            return Ok(());
        }
        if self.rolling == Some(index) {
            self.roll_from(index + 1)?;
        }
        Ok(())
    }

    /// SIGHUP: checks the certificate and key files; a good pair: every worker is sent SIGHUP
    /// and reloads it in place; a bad one is refused here, and no worker is touched.
    pub(super) fn reload(&self) {
        let _ = scm_proto::lifecycle::notify::reloading();
        let (cert, key) = (&self.serve.tls_cert, &self.serve.tls_key);
        info!(
            cert = %cert.display(),
            key = %key.display(),
            "SIGHUP: checking the new certificate and key before the workers reload them"
        );
        match scm_proto::lifecycle::reload::certified_key(cert, key) {
            Err(e) => tracing::error!(
                error = %e,
                "reload refused: the workers keep the certificate and key in force"
            ),
            Ok(_) => {
                let pids: Vec<u32> = self.workers.iter().flatten().map(|w| w.pid).collect();
                for pid in &pids {
                    signal_pid(*pid, Signal::HUP);
                }
                info!(?pids, "the workers reload the certificate and key in place");
            }
        }
        let _ = scm_proto::lifecycle::notify::ready("supervising the workers");
    }

    /// Starts a rolling restart (SIGUSR2): one worker at a time is drained (the steering sends
    /// it no new connection, and SIGTERM makes it close its listener and finish its open
    /// connections, up to --drain-timeout), and replaced by a new process of the binary on disk,
    /// then the next. Each step is driven by an event (the worker's exit, its replacement
    /// serving), so stop signals and other workers' exits are handled while it runs.
    pub(super) fn begin_rolling(&mut self) -> Result<(), SupervisorError> {
        if let Some(index) = self.rolling {
            info!(
                worker = index,
                "a rolling restart is already replacing the workers; this one is not started"
            );
            return Ok(());
        }
        info!("rolling restart: replacing the workers one by one");
        self.roll_from(0)
    }

    /// Stops the first worker at `start` or above for the rolling restart; ends it when none.
    fn roll_from(&mut self, start: u32) -> Result<(), SupervisorError> {
        let next = (start..self.count).find(|i| self.workers[*i as usize].is_some());
        let Some(index) = next else {
            self.rolling = None;
            info!("rolling restart done");
            return Ok(());
        };
        self.rolling = Some(index);
        let Some(w) = self.workers[index as usize].as_ref() else {
            return Ok(());
        };
        let (pid, generation) = (w.pid, w.generation);
        lock(&self.steering).set_worker(index, WorkerState::Draining, pid)?;
        info!(worker = index, pid, "draining");
        signal_pid(pid, Signal::TERM);
        let events = self.events.clone();
        let overdue = self.serve.drain_timeout + EXIT_MARGIN;
        tokio::spawn(async move {
            tokio::time::sleep(overdue).await;
            let _ = events.send(Event::DrainOverdue { index, generation });
        });
        Ok(())
    }

    /// A worker stopped by the rolling restart outlived its drain timeout: it is killed (its
    /// exit then moves the rolling restart on).
    pub(super) fn drain_overdue(&mut self, index: u32, generation: u64) {
        if let Some(w) = self.workers[index as usize]
            .as_ref()
            .filter(|w| w.generation == generation)
        {
            warn!(
                worker = index,
                pid = w.pid,
                "still running after --drain-timeout and a margin; killing it"
            );
            signal_pid(w.pid, Signal::KILL);
        }
    }

    /// Stops every worker: each drains (up to --drain-timeout) at the same time; one that is
    /// still there after that and a margin is killed.
    pub(super) async fn stop_all(&mut self) {
        for (index, w) in self.workers.iter_mut().enumerate() {
            if let Some(w) = w.as_mut() {
                let _ = lock(&self.steering).set_worker(index as u32, WorkerState::Absent, 0);
                signal_pid(w.pid, Signal::TERM);
            }
        }
        // One deadline for all: they drain at the same time.
        let deadline = Instant::now() + self.serve.drain_timeout + EXIT_MARGIN;
        for w in self.workers.iter_mut().flatten() {
            let left = deadline.saturating_duration_since(Instant::now());
            if !wait_gone(w.pid, w.child.as_mut(), left).await {
                warn!(pid = w.pid, "a worker outlived --drain-timeout; killing it");
                signal_pid(w.pid, Signal::KILL);
                wait_gone(w.pid, w.child.as_mut(), Duration::from_secs(5)).await;
            }
        }
    }
}

/// Waits until process `pid` is gone (reaping it when it is our child).
async fn wait_gone(pid: u32, mut child: Option<&mut Child>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let gone = match child.as_deref_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_)) | Err(_)),
            None => !process_runs(pid),
        };
        if gone {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
