//! tcp mode: bytes both ways between the device and the back end through fixed-size buffers,
//! each direction's end of stream passed on as a half-close, the whole relay closed when idle
//! too long or when the session is revoked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RelayEnd {
    /// Both sides finished (each direction reached end of stream).
    Done,
    /// One side failed; the other was dropped.
    Error,
    /// No bytes either way for the idle timeout.
    Idle,
    /// The session was revoked.
    Revoked,
}

/// Relay settings.
#[derive(Debug, Clone, Copy)]
pub(super) struct RelayOptions {
    /// Bytes buffered per direction.
    pub buffer_size: usize,
    /// Close after this long without a byte either way.
    pub idle_timeout: Duration,
}

async fn pump<R, W>(
    mut from: R,
    mut to: W,
    buffer_size: usize,
    last: Arc<AtomicU64>,
    start: Instant,
    counter: IntCounter,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer_size.max(1024)];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the other direction keeps going.
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        counter.inc_by(n as u64);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Relays between `device` and `backend` until both directions end, one fails, the idle timeout
/// passes, or `cancel` fires. `up` and `down` count bytes to the back end and to the device.
pub(super) async fn relay<D, B>(
    device: D,
    backend: B,
    opts: RelayOptions,
    cancel: &CancellationToken,
    up: IntCounter,
    down: IntCounter,
) -> RelayEnd
where
    D: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (dr, dw) = tokio::io::split(device);
    let (br, bw) = tokio::io::split(backend);
    let to_backend = pump(dr, bw, opts.buffer_size, last.clone(), start, up);
    let to_device = pump(br, dw, opts.buffer_size, last.clone(), start, down);
    let both = async {
        match tokio::try_join!(to_backend, to_device) {
            Ok(_) => RelayEnd::Done,
            Err(_) => RelayEnd::Error,
        }
    };
    let idle = async {
        let tick = (opts.idle_timeout / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(tick).await;
            let since =
                (start.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed));
            if Duration::from_millis(since) >= opts.idle_timeout {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn counters() -> (IntCounter, IntCounter) {
        (
            IntCounter::new("up", "up").unwrap(),
            IntCounter::new("down", "down").unwrap(),
        )
    }

    fn opts(idle_ms: u64) -> RelayOptions {
        RelayOptions {
            buffer_size: 1024,
            idle_timeout: Duration::from_millis(idle_ms),
        }
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut dev, dev_proxy) = duplex(64);
        let (back_proxy, mut back) = duplex(64);
        let (up, down) = counters();
        let cancel = CancellationToken::new();
        let relay = tokio::spawn({
            let (up, down) = (up.clone(), down.clone());
            async move { relay(dev_proxy, back_proxy, opts(5000), &cancel, up, down).await }
        });
        // More than the buffers hold, so back-pressure is exercised.
        let payload = vec![7u8; 100_000];
        let p = payload.clone();
        let writer = tokio::spawn(async move {
            dev.write_all(&p).await.unwrap();
            dev.shutdown().await.unwrap();
            let mut back_bytes = Vec::new();
            dev.read_to_end(&mut back_bytes).await.unwrap();
            back_bytes
        });
        let mut got = Vec::new();
        back.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        // The device half-closed; the back end can still answer.
        back.write_all(b"reply").await.unwrap();
        back.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
        assert_eq!(relay.await.unwrap(), RelayEnd::Done);
        assert_eq!(up.get(), 100_000);
        assert_eq!(down.get(), 5);
    }

    #[tokio::test]
    async fn idle_and_revoked() {
        let (_dev, dev_proxy) = duplex(64);
        let (back_proxy, _back) = duplex(64);
        let (up, down) = counters();
        let cancel = CancellationToken::new();
        let end = relay(
            dev_proxy,
            back_proxy,
            opts(50),
            &cancel,
            up.clone(),
            down.clone(),
        )
        .await;
        assert_eq!(end, RelayEnd::Idle);

        let (_dev, dev_proxy) = duplex(64);
        let (back_proxy, _back) = duplex(64);
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c2.cancel();
        });
        let end = relay(dev_proxy, back_proxy, opts(5000), &cancel, up, down).await;
        assert_eq!(end, RelayEnd::Revoked);
    }
}
