//! tcp mode on the kTLS path: bytes move between the device socket and the back-end socket with
//! `splice(2)` through a pipe per direction, so the payload never enters user space (the kernel
//! decrypts into the pipe and encrypts out of it). Same contract as [`super::relay`]: each
//! direction's end of stream is passed on as a half-close (towards the device: close_notify,
//! then the TCP half-close), the whole relay ends when idle too long or when the session is
//! revoked, and one failing direction ends both.
//!
//! The kernel refuses to splice a non-data record (EINVAL, the record stays queued): the relay
//! then reads that one record with `recvmsg` and treats it as the user-space path would
//! (close_notify: end of stream; alert or KeyUpdate: the end, counted; see [`super::ktls`]).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::metrics::{IntCounter, IntCounterVec};
use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::ktls::{
    KtlsStream, Record, classify, close_notify, read_error, recv_record, unclean_eof,
};
use super::relay::{RelayEnd, RelayOptions};

/// Most bytes moved per splice: a default pipe's capacity (16 pages).
const CHUNK: usize = 64 * 1024;

/// How long a wait for readiness in the middle of a transfer lasts before the relay tries the
/// splice again anyway. In the guest kernel (6.1) one large echo transfer in about ten stalled
/// with both directions waiting and no byte moving until the idle timeout: a readiness wake-up
/// lost on the kTLS socket, which we could not pin down further. A busy relay's waits are
/// bounded by this, a retry that then moves bytes is counted
/// (`scm_proxy_splice_backstops_total`), and an idle relay waits without a timer.
const BACKSTOP: Duration = Duration::from_millis(200);

/// A relay that moved a byte within this long is busy: its waits get the backstop.
const BUSY_FOR: Duration = Duration::from_secs(1);

/// Whether the wait ended by readiness (`true`: go through `try_io`) or by the backstop
/// (`false`: call the syscall directly, since `try_io` refuses without readiness).
async fn wait(sock: &TcpStream, interest: Interest, busy: bool) -> io::Result<bool> {
    if !busy {
        sock.ready(interest).await?;
        return Ok(true);
    }
    match tokio::time::timeout(BACKSTOP, sock.ready(interest)).await {
        Ok(r) => r.map(|_| true),
        Err(_) => Ok(false),
    }
}

/// Runs `op` on `sock` after [`wait`]: through `try_io` when readiness came (a WouldBlock then
/// clears it), directly when the backstop ended the wait. A direct call that moved bytes is
/// counted in `backstops`.
fn attempt(
    sock: &TcpStream,
    interest: Interest,
    ready: bool,
    backstops: &IntCounter,
    op: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    if ready {
        return sock.try_io(interest, op);
    }
    let r = op();
    if matches!(r, Ok(n) if n > 0) {
        backstops.inc();
    }
    r
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?)
}

fn flags() -> SpliceFlags {
    SpliceFlags::NONBLOCK | SpliceFlags::MOVE
}

/// When the last byte moved, in ms since `start`, shared by both directions (idle timeout).
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// Moves the `left` bytes waiting in the pipe into `to` (bytes are in flight: the wait has the
/// backstop).
async fn drain_pipe(
    pipe: &OwnedFd,
    to: &TcpStream,
    mut left: usize,
    backstops: &IntCounter,
) -> io::Result<()> {
    while left > 0 {
        let ready = wait(to, Interest::WRITABLE, true).await?;
        // Only the socket can be full here (the pipe holds `left` bytes), so a WouldBlock is
        // the socket's and try_io is right to clear its readiness.
        match attempt(to, Interest::WRITABLE, ready, backstops, || {
            Ok(splice(pipe, None, to.as_fd(), None, left, flags())?)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => left -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes plaintext held in user space (what rustls decrypted before the hand-off).
async fn write_plain(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Device to back end: the kernel decrypts into the pipe.
async fn device_to_backend(
    device: &TcpStream,
    backend: &TcpStream,
    pending: Vec<u8>,
    events: &IntCounterVec,
    activity: &Activity,
    counter: &IntCounter,
    backstops: &IntCounter,
) -> io::Result<()> {
    if !pending.is_empty() {
        write_plain(backend, &pending).await?;
        counter.inc_by(pending.len() as u64);
        activity.touch();
    }
    let (pr, pw) = pipe()?;
    loop {
        let busy = activity.idle_for() < BUSY_FOR;
        let ready = wait(device, Interest::READABLE, busy).await?;
        // The pipe is empty here, so a WouldBlock is the socket's.
        let n = match attempt(device, Interest::READABLE, ready, backstops, || {
            Ok(splice(device.as_fd(), None, &pw, None, CHUNK, flags())?)
        }) {
            Ok(0) => return Err(unclean_eof()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // A non-data record is next (it stays queued): read it by itself.
                let mut rec = [0u8; 512];
                let (typ, n) = match device
                    .try_io(Interest::READABLE, || recv_record(device.as_fd(), &mut rec))
                {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(read_error(e, events)),
                };
                if n == 0 {
                    return Err(unclean_eof());
                }
                match classify(device.as_fd(), typ, &rec[..n], events)? {
                    Record::CloseNotify => {
                        // The device's end of stream: pass the half-close on.
                        rustix::net::shutdown(backend, rustix::net::Shutdown::Write)?;
                        return Ok(());
                    }
                    Record::Data(n) => {
                        write_plain(backend, &rec[..n]).await?;
                        counter.inc_by(n as u64);
                        activity.touch();
                        continue;
                    }
                }
            }
            Err(e) => return Err(read_error(e, events)),
        };
        drain_pipe(&pr, backend, n, backstops).await?;
        counter.inc_by(n as u64);
        activity.touch();
    }
}

/// Back end to device: the kernel encrypts out of the pipe.
async fn backend_to_device(
    backend: &TcpStream,
    device: &TcpStream,
    activity: &Activity,
    counter: &IntCounter,
    backstops: &IntCounter,
) -> io::Result<()> {
    let (pr, pw) = pipe()?;
    loop {
        let busy = activity.idle_for() < BUSY_FOR;
        let ready = wait(backend, Interest::READABLE, busy).await?;
        let n = match attempt(backend, Interest::READABLE, ready, backstops, || {
            Ok(splice(backend.as_fd(), None, &pw, None, CHUNK, flags())?)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // The back end's end of stream: close_notify, then the TCP half-close.
            close_notify(device).await?;
            rustix::net::shutdown(device, rustix::net::Shutdown::Write)?;
            return Ok(());
        }
        drain_pipe(&pr, device, n, backstops).await?;
        counter.inc_by(n as u64);
        activity.touch();
    }
}

/// Relays between a kTLS `device` and `backend` with splice(2) until both directions end, one
/// fails, the idle timeout passes, or `cancel` fires. `up` and `down` count bytes to the back end
/// and to the device.
pub(super) async fn splice_relay(
    device: KtlsStream,
    backend: TcpStream,
    opts: RelayOptions,
    cancel: &CancellationToken,
    up: IntCounter,
    down: IntCounter,
    backstops: IntCounter,
) -> RelayEnd {
    let (device, pending, events) = device.into_parts();
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
    });
    let both = async {
        let to_backend = device_to_backend(
            &device, &backend, pending, &events, &activity, &up, &backstops,
        );
        let to_device = backend_to_device(&backend, &device, &activity, &down, &backstops);
        match tokio::try_join!(to_backend, to_device) {
            Ok(_) => RelayEnd::Done,
            Err(e) => {
                tracing::debug!(error = %e, "splice relay ended with an error");
                RelayEnd::Error
            }
        }
    };
    let idle = async {
        let tick = (opts.idle_timeout / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(tick).await;
            if activity.idle_for() >= opts.idle_timeout {
                // What the sockets still hold says whether the relay was idle or stuck.
                tracing::info!(
                    device_queued = queued(&device, libc::FIONREAD),
                    device_unsent = queued(&device, libc::TIOCOUTQ),
                    backend_queued = queued(&backend, libc::FIONREAD),
                    backend_unsent = queued(&backend, libc::TIOCOUTQ),
                    "splice relay idle"
                );
                return RelayEnd::Idle;
            }
        }
    };
    tokio::select! {
        end = both => end,
        end = idle => end,
        _ = cancel.cancelled() => RelayEnd::Revoked,
    }
}

/// Bytes a socket's queue holds (`FIONREAD`: received, not read; `TIOCOUTQ`: not yet
/// acknowledged), or -1 when the kernel does not say.
fn queued(sock: &TcpStream, request: libc::c_ulong) -> i64 {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int through the pointer, which points at `n`, alive for
    // the call; the descriptor is the socket's own.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(sock), request, &mut n) };
    if rc == 0 { i64::from(n) } else { -1 }
}
