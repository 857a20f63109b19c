//! tcp mode: bytes both ways between the device and the back end, each direction's end of
//! stream passed on as a half-close, the whole relay closed when idle too long or when the
//! session is revoked.
//!
//! An idle connection holds no relay buffer. Each read lands in one scratch buffer per worker
//! thread and is written on from there at once; only bytes the other side cannot take yet are
//! kept, in a buffer taken from a small per-thread pool, and that buffer goes back to the pool as
//! soon as the reading side has nothing more to give. Ten thousand idle devices thus cost no
//! relay memory at all, where two 16 KiB buffers each used to cost 320 MiB.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use super::metrics::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    /// The most bytes one read takes (clamped to [`MIN_BUFFER`]..=[`MAX_BUFFER`]).
    pub buffer_size: usize,
    /// Close after this long without a byte either way.
    pub idle_timeout: Duration,
}

/// The smallest read size a relay uses.
pub(super) const MIN_BUFFER: usize = 1024;
/// The largest read size a relay uses: the scratch buffer each worker thread keeps.
pub(super) const MAX_BUFFER: usize = 64 * 1024;
/// Spill buffers a worker thread keeps for reuse; more are freed.
const POOL_KEEP: usize = 16;

thread_local! {
    /// Where every read lands first; its bytes are written on before the poll returns.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_BUFFER].into_boxed_slice());
    /// Spill buffers not in use, all of the size the pumps on this thread asked for last.
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A spill buffer of `size` bytes: one from this thread's pool, or a new one.
fn take_spill(size: usize) -> Box<[u8]> {
    let pooled = POOL.with(|p| {
        let mut p = p.borrow_mut();
        // Buffers of another size (a changed setting) are freed on the way.
        while let Some(b) = p.pop() {
            if b.len() == size {
                return Some(b);
            }
        }
        None
    });
    pooled.unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
}

/// Gives a spill buffer back to this thread's pool, or frees it when the pool is full.
fn give_spill(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_KEEP {
            p.push(buf);
        }
    });
}

/// One direction of a relay: what it read and could not write on yet.
struct Pump {
    size: usize,
    /// Holds `pending` bytes still to write; `None` while nothing waits.
    spill: Option<Box<[u8]>>,
    pending: std::ops::Range<usize>,
    /// Bytes were written since the last flush.
    dirty: bool,
    /// The reading side ended; the writing side is being shut down.
    eof: bool,
    last: Arc<AtomicU64>,
    start: Instant,
    counter: IntCounter,
}

impl Drop for Pump {
    fn drop(&mut self) {
        if let Some(b) = self.spill.take() {
            give_spill(b);
        }
    }
}

impl Pump {
    /// Writes `pending` out of the spill buffer; `Ready(Ok)` once nothing waits.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
    ) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let Some(buf) = self.spill.as_deref() else {
                self.pending = 0..0;
                break;
            };
            let n = ready!(Pin::new(&mut *to).poll_write(cx, &buf[self.pending.clone()]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.start += n;
            self.dirty = true;
            self.counter.inc_by(n as u64);
        }
        self.pending = 0..0;
        Poll::Ready(Ok(()))
    }

    /// Goes idle: flushes what was written, and gives the spill buffer back.
    fn poll_idle<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
    ) -> Poll<io::Result<()>> {
        if let Some(b) = self.spill.take() {
            give_spill(b);
        }
        if self.dirty {
            ready!(Pin::new(&mut *to).poll_flush(cx))?;
            self.dirty = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Moves bytes until the reading side ends (then shuts the writing side down) or fails.
    fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.eof {
                // Pass the half-close on; the other direction keeps going.
                return Pin::new(&mut *to).poll_shutdown(cx);
            }
            ready!(self.poll_drain(cx, to))?;
            if let Some(spill) = self.spill.as_deref_mut() {
                // Busy: read straight into the spill buffer, which is ours until we go idle.
                let mut rb = ReadBuf::new(spill);
                match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        ready!(self.poll_idle(cx, to))?;
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => r?,
                }
                let n = rb.filled().len();
                self.got(n);
                self.pending = 0..n;
                continue;
            }
            match self.poll_through_scratch(cx, from, to) {
                Poll::Pending => {
                    ready!(self.poll_idle(cx, to))?;
                    return Poll::Pending;
                }
                Poll::Ready(r) => r?,
            }
        }
    }

    /// Reads into the thread's scratch buffer and writes what it got on at once; bytes the
    /// writer does not take go to a spill buffer. `Pending` only when the read is.
    fn poll_through_scratch<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                // Re-entered from inside a read or write on this thread (no stream does that
                // today): take a spill buffer instead, correct if slower.
                self.spill = Some(take_spill(self.size));
                return Poll::Ready(Ok(()));
            };
            let mut rb = ReadBuf::new(&mut scratch[..self.size]);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut rb))?;
            let data = rb.filled();
            self.got(data.len());
            let mut off = 0;
            while off < data.len() {
                match Pin::new(&mut *to).poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        off += n;
                        self.dirty = true;
                        self.counter.inc_by(n as u64);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Back-pressure: keep the rest; the writer's waker is registered.
                        let rest = data.len() - off;
                        let mut spill = take_spill(self.size);
                        spill[..rest].copy_from_slice(&data[off..]);
                        self.spill = Some(spill);
                        self.pending = 0..rest;
                        break;
                    }
                }
            }
            Poll::Ready(Ok(()))
        })
    }

    /// Notes a read of `n` bytes (zero: end of stream).
    fn got(&mut self, n: usize) {
        if n == 0 {
            self.eof = true;
        } else {
            self.last
                .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}

impl Pump {
    fn new(buffer_size: usize, last: Arc<AtomicU64>, start: Instant, counter: IntCounter) -> Self {
        Self {
            size: buffer_size.clamp(MIN_BUFFER, MAX_BUFFER),
            spill: None,
            pending: 0..0,
            dirty: false,
            eof: false,
            last,
            start,
            counter,
        }
    }
}

/// Relays between `device` and `backend` until both directions end, one fails, the idle timeout
/// passes, or `cancel` fires. `up` and `down` count bytes to the back end and to the device.
///
/// Both directions are polled from this one future, each borrowing the two streams in turn, so
/// the streams are not split: no shared, locked halves on the heap beside this future, and
/// one copy of each stream per connection.
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
    let mut device = std::pin::pin!(device);
    let mut backend = std::pin::pin!(backend);
    let mut to_backend = Pump::new(opts.buffer_size, last.clone(), start, up);
    let mut to_device = Pump::new(opts.buffer_size, last.clone(), start, down);
    let (mut up_done, mut down_done) = (false, false);
    let both = poll_fn(|cx| {
        if !up_done {
            match to_backend.poll_pump(cx, &mut device, &mut backend) {
                Poll::Ready(Ok(())) => up_done = true,
                Poll::Ready(Err(_)) => return Poll::Ready(RelayEnd::Error),
                Poll::Pending => {}
            }
        }
        if !down_done {
            match to_device.poll_pump(cx, &mut backend, &mut device) {
                Poll::Ready(Ok(())) => down_done = true,
                Poll::Ready(Err(_)) => return Poll::Ready(RelayEnd::Error),
                Poll::Pending => {}
            }
        }
        if up_done && down_done {
            Poll::Ready(RelayEnd::Done)
        } else {
            Poll::Pending
        }
    });
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
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// Counts the bytes each thread holds on the heap, so a test on a current-thread runtime
    /// sees exactly what its relays keep.
    struct Counting;

    thread_local! {
        static HELD: Cell<i64> = const { Cell::new(0) };
    }

    fn note(delta: i64) {
        // `try_with`: allocations while a thread's locals are torn down are not counted.
        let _ = HELD.try_with(|h| h.set(h.get() + delta));
    }

    // SAFETY: every call is passed on to the system allocator unchanged; the counting only
    // touches a const-initialised thread-local Cell, which never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as i64);
            // SAFETY: the caller's layout contract is passed on as is.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as i64);
            // SAFETY: as in `alloc`.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            note(-(layout.size() as i64));
            // SAFETY: `ptr` came from this allocator, that is from System, with `layout`.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size as i64 - layout.size() as i64);
            // SAFETY: as in `dealloc`, and the caller guarantees `new_size` is valid.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    fn held() -> i64 {
        HELD.with(Cell::get)
    }

    /// Idle relays, after bytes went both ways through each, hold no relay buffer: what each
    /// keeps is its task and bookkeeping, far below the 2 x 16 KiB it used to allocate up front.
    #[test]
    fn idle_relays_hold_no_buffers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (up, down) = counters();
            let cancel = CancellationToken::new();
            let mut ends = Vec::new();
            let open = |n: usize| {
                let mut pairs = Vec::new();
                for _ in 0..n {
                    let (dev, dev_proxy) = duplex(64 * 1024);
                    let (back_proxy, back) = duplex(64 * 1024);
                    pairs.push((dev, dev_proxy, back_proxy, back));
                }
                pairs
            };
            async fn exercise(
                pairs: Vec<(
                    tokio::io::DuplexStream,
                    tokio::io::DuplexStream,
                    tokio::io::DuplexStream,
                    tokio::io::DuplexStream,
                )>,
                cancel: &CancellationToken,
                up: &IntCounter,
                down: &IntCounter,
                ends: &mut Vec<(tokio::io::DuplexStream, tokio::io::DuplexStream)>,
            ) {
                for (mut dev, dev_proxy, back_proxy, mut back) in pairs {
                    let (cancel, up, down) = (cancel.clone(), up.clone(), down.clone());
                    tokio::spawn(async move {
                        // The proxy's default read size (--buffer-size).
                        let o = RelayOptions {
                            buffer_size: 16 * 1024,
                            idle_timeout: Duration::from_secs(60),
                        };
                        relay(dev_proxy, back_proxy, o, &cancel, up, down).await
                    });
                    let mut got = [0u8; 5];
                    dev.write_all(b"hello").await.unwrap();
                    back.read_exact(&mut got).await.unwrap();
                    assert_eq!(&got, b"hello");
                    back.write_all(b"world").await.unwrap();
                    dev.read_exact(&mut got).await.unwrap();
                    assert_eq!(&got, b"world");
                    ends.push((dev, back));
                }
                // Let every pump see its read side go quiet.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The first relay on a thread sets up the thread's scratch buffer and the runtime's
            // own structures; those are per thread, not per connection.
            let warm = open(2);
            exercise(warm, &cancel, &up, &down, &mut ends).await;
            const N: usize = 50;
            let pairs = open(N);
            let before = held();
            exercise(pairs, &cancel, &up, &down, &mut ends).await;
            let per_relay = (held() - before) / N as i64;
            eprintln!("heap held per idle relay: {per_relay} bytes");
            assert!(
                per_relay < 4096,
                "an idle relay holds {per_relay} bytes of heap (relay buffers must be released)"
            );
            assert_eq!(up.get(), 5 * (N as u64 + 2));
            assert_eq!(down.get(), 5 * (N as u64 + 2));
            cancel.cancel();
        });
    }

    /// Both directions at once, more than any buffer holds, against slow readers on both
    /// ends, so every path (scratch, spill, reuse from the pool) carries bytes; checksummed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_both_ways_under_back_pressure() {
        let (dev, dev_proxy) = duplex(1000);
        let (back_proxy, back) = duplex(700);
        let (up, down) = counters();
        let cancel = CancellationToken::new();
        let relay = tokio::spawn({
            let (up, down) = (up.clone(), down.clone());
            async move { relay(dev_proxy, back_proxy, opts(5000), &cancel, up, down).await }
        });
        let pattern = |seed: u32, n: usize| -> Vec<u8> {
            (0..n as u32)
                .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
                .collect()
        };
        let (to_back, to_dev) = (pattern(1, 3_000_000), pattern(2, 2_000_000));
        let (dr, mut dw) = tokio::io::split(dev);
        let (br, mut bw) = tokio::io::split(back);
        let (a, b) = (to_back.clone(), to_dev.clone());
        let w1 = tokio::spawn(async move {
            for chunk in a.chunks(7919) {
                dw.write_all(chunk).await.unwrap();
            }
            dw.shutdown().await.unwrap();
        });
        let w2 = tokio::spawn(async move {
            for chunk in b.chunks(30_011) {
                bw.write_all(chunk).await.unwrap();
            }
            bw.shutdown().await.unwrap();
        });
        async fn slow_read(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
            let mut out = Vec::new();
            let mut buf = [0u8; 333];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    return out;
                }
                out.extend_from_slice(&buf[..n]);
                if out.len() % 97 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        let (got_back, got_dev) = tokio::join!(slow_read(br), slow_read(dr));
        w1.await.unwrap();
        w2.await.unwrap();
        assert!(got_back == to_back, "device to back end corrupted");
        assert!(got_dev == to_dev, "back end to device corrupted");
        assert_eq!(relay.await.unwrap(), RelayEnd::Done);
        assert_eq!(up.get(), 3_000_000);
        assert_eq!(down.get(), 2_000_000);
    }

    fn counters() -> (IntCounter, IntCounter) {
        (IntCounter::default(), IntCounter::default())
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
