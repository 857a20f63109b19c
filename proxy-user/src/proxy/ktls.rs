//! Kernel TLS (kTLS): the per-connection hand-off of a finished rustls handshake to the kernel,
//! with a fallback to user-space rustls while one is still possible, and the device stream the
//! proxy uses afterwards, which reads the kernel's non-data records (close_notify, alerts,
//! KeyUpdate) itself instead of the `ktls` crate's stream.
//!
//! Order matters: everything that can fail without harm is checked BEFORE rustls gives up its
//! traffic secrets (the negotiated cipher suite against what the kernel accepted at start-up,
//! then `TCP_ULP` "tls" on this very socket, which leaves a plain TCP socket when refused). A
//! failure there keeps the connection in rustls. After the secrets are out, rustls cannot carry
//! on: a failure closes the connection, with a reason in the log and a metric.
//!
//! Why not `ktls::KtlsStream`: on a close_notify it also stops writing (the back end's answer to
//! a device's half-close would be lost, where rustls and the user-space relay keep it), it
//! ignores a KeyUpdate (the kernel of Debian 12, 6.1, cannot take new receive keys, so the next
//! record would fail to decrypt), and it panics on records it does not expect.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use super::metrics::IntCounterVec;
use ktls::CorkStream;
use rustls::SupportedCipherSuite;
use rustls::crypto::aws_lc_rs::cipher_suite as suites;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// TLS record content types (RFC 8446, 5.1) as the kernel reports them.
const RECORD_ALERT: u8 = 21;
const RECORD_HANDSHAKE: u8 = 22;
const RECORD_DATA: u8 = 23;
/// Handshake message type of a TLS 1.3 KeyUpdate (RFC 8446, 4.6.3).
const KEY_UPDATE: u8 = 24;
/// Alert descriptions the proxy reads or sends.
const CLOSE_NOTIFY: u8 = 0;
const INTERNAL_ERROR: u8 = 80;

/// The TLS 1.3 cipher suites the kernel accepted keys for at start-up (each probed on a
/// throw-away socket: a cipher's module may be missing even where the `tls` module loads).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct KernelCiphers {
    aes_128_gcm: bool,
    aes_256_gcm: bool,
    chacha20_poly1305: bool,
}

impl KernelCiphers {
    /// Asks the kernel, once, which TLS 1.3 ciphers it takes.
    pub(super) async fn probe() -> io::Result<Self> {
        let c = ktls::CompatibleCiphers::new().await?;
        Ok(Self {
            aes_128_gcm: c.tls13.aes_gcm_128,
            aes_256_gcm: c.tls13.aes_gcm_256,
            chacha20_poly1305: c.tls13.chacha20_poly1305,
        })
    }

    /// Whether the kernel takes at least one cipher (otherwise kTLS is of no use).
    pub(super) fn any(&self) -> bool {
        self.aes_128_gcm || self.aes_256_gcm || self.chacha20_poly1305
    }

    /// Whether a connection that negotiated `suite` can be handed to the kernel.
    pub(super) fn accepts(&self, suite: SupportedCipherSuite) -> bool {
        if suite == suites::TLS13_AES_128_GCM_SHA256 {
            self.aes_128_gcm
        } else if suite == suites::TLS13_AES_256_GCM_SHA384 {
            self.aes_256_gcm
        } else if suite == suites::TLS13_CHACHA20_POLY1305_SHA256 {
            self.chacha20_poly1305
        } else {
            false
        }
    }

    /// The accepted ciphers, for the start-up log line.
    pub(super) fn names(&self) -> String {
        let names: Vec<&str> = [
            (self.aes_128_gcm, "AES-128-GCM"),
            (self.aes_256_gcm, "AES-256-GCM"),
            (self.chacha20_poly1305, "ChaCha20-Poly1305"),
        ]
        .into_iter()
        .filter_map(|(ok, n)| ok.then_some(n))
        .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

/// Why a connection stayed in user-space rustls (checked before the secrets left rustls).
#[derive(Debug)]
pub(super) enum Fallback {
    /// The negotiated suite is not one the kernel accepted at start-up.
    Cipher(String),
    /// The kernel refused `TCP_ULP` "tls" on this socket.
    Ulp(io::Error),
}

impl Fallback {
    /// The `result` label of `scm_proxy_ktls_handoffs_total`.
    pub(super) fn label(&self) -> &'static str {
        match self {
            Self::Cipher(_) => "fallback_cipher",
            Self::Ulp(_) => "fallback_ulp",
        }
    }
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cipher(s) => write!(f, "the kernel did not accept keys of {s} at start-up"),
            Self::Ulp(e) => write!(f, "the kernel refused TCP_ULP \"tls\" on this socket: {e}"),
        }
    }
}

/// Why a hand-off failed after rustls gave up its secrets (the connection cannot go on).
#[derive(Debug, thiserror::Error)]
pub(super) enum HandoffError {
    /// Reading the records rustls had already buffered.
    #[error("reading what rustls had buffered before the hand-off: {0}")]
    Drain(#[source] io::Error),
    /// rustls would not export the traffic secrets.
    #[error("rustls did not give up the traffic secrets: {0}")]
    Secrets(#[source] rustls::Error),
    /// The secrets do not fit the kernel's structures.
    #[error("the traffic secrets do not fit the kernel's structures: {0}")]
    Keys(String),
    /// The kernel refused the keys of one direction.
    #[error("the kernel refused the {direction} keys: {source}")]
    SetKeys {
        /// `send` or `receive`.
        direction: &'static str,
        /// The errno.
        source: io::Error,
    },
}

/// The outcome of [`hand_off`] short of a failure.
pub(super) enum Handoff {
    /// The kernel does the records from now on.
    Kernel(KtlsStream),
    /// The connection goes on in rustls; why.
    Userspace(Box<TlsStream<CorkStream<TcpStream>>>, Fallback),
}

/// Hands a finished handshake to the kernel, or says why it stays in rustls.
pub(super) async fn hand_off(
    mut tls: TlsStream<CorkStream<TcpStream>>,
    ciphers: &KernelCiphers,
    events: IntCounterVec,
) -> Result<Handoff, HandoffError> {
    let (io, conn) = tls.get_ref();
    let suite = conn.negotiated_cipher_suite();
    let Some(suite) = suite.filter(|s| ciphers.accepts(*s)) else {
        let name = suite.map_or_else(
            || "no cipher suite".to_owned(),
            |s| format!("{:?}", s.suite()),
        );
        return Ok(Handoff::Userspace(Box::new(tls), Fallback::Cipher(name)));
    };
    // Refused, the socket stays plain TCP (the kernel only switches ops on success), so rustls
    // carries on over it. Accepted, it still passes bytes through until keys are set.
    if let Err(e) = set_ulp(io.io.as_fd()) {
        return Ok(Handoff::Userspace(Box::new(tls), Fallback::Ulp(e)));
    }
    // From here on, the connection is the kernel's or nobody's: draining ends rustls' reading.
    tls.get_mut().0.corked = true;
    let drained = drain(&mut tls).await.map_err(HandoffError::Drain)?;
    let (io, conn) = tls.into_inner();
    let tcp = io.io;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(HandoffError::Secrets)?;
    let tx = ktls::CryptoInfo::from_rustls(suite, secrets.tx)
        .map_err(|e| HandoffError::Keys(e.to_string()))?;
    set_keys(tcp.as_fd(), libc::TLS_TX, &tx).map_err(|source| HandoffError::SetKeys {
        direction: "send",
        source,
    })?;
    let rx = ktls::CryptoInfo::from_rustls(suite, secrets.rx)
        .map_err(|e| HandoffError::Keys(e.to_string()))?;
    set_keys(tcp.as_fd(), libc::TLS_RX, &rx).map_err(|source| HandoffError::SetKeys {
        direction: "receive",
        source,
    })?;
    Ok(Handoff::Kernel(KtlsStream {
        tcp,
        pending: drained,
        pos: 0,
        read_closed: false,
        write_closed: false,
        events,
    }))
}

/// Reads the plaintext rustls already decrypted and lets it finish the record it was in the
/// middle of (the `CorkStream`, corked, ends reads at the next record boundary).
async fn drain(tls: &mut TlsStream<CorkStream<TcpStream>>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // The corked stream's end reads as an unclean EOF to rustls: that is the boundary.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

fn set_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    let ulp = b"tls";
    // SAFETY: `fd` is an open socket for the whole call and the value points to `ulp.len()`
    // readable bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_keys(fd: BorrowedFd<'_>, direction: libc::c_int, info: &ktls::CryptoInfo) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; `info.as_ptr()` points to `info.size()` bytes of the
    // kernel's crypto_info structure, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            direction,
            info.as_ptr(),
            info.size() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads one record's worth (or part of one data record) with its type from a kTLS socket.
/// Without a control buffer the kernel fails the read on a non-data record; with one, it says
/// which type each read returns and never mixes types in one read.
pub(super) fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    // Room for one cmsghdr with a one-byte payload, 8-byte aligned as cmsg(3) requires.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points to one iovec over `buf` (writable, `buf.len()` bytes) and to the
    // control buffer above, all alive for the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut typ = RECORD_DATA;
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer the kernel filled, bounded by
    // msg_controllen; CMSG_DATA of a SOL_TLS/TLS_GET_RECORD_TYPE header holds one byte.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_TLS && (*c).cmsg_type == libc::TLS_GET_RECORD_TYPE {
                typ = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((typ, n as usize))
}

/// Sends one non-data record (an alert) through the kernel, which encrypts it.
pub(super) fn send_control(fd: BorrowedFd<'_>, typ: u8, payload: &[u8]) -> io::Result<()> {
    // Room for one cmsghdr with a one-byte payload, 8-byte aligned.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: all zeroes is a valid empty msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic; the header written by CMSG_FIRSTHDR lies
    // inside `control` (32 bytes >= CMSG_SPACE(1) = 24), and its data byte right after it. The
    // kernel only reads `payload` (sendmsg never writes through msg_iov).
    let n = unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(1) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(c) = typ;
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What a record read off a kTLS socket means to the reader.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Record {
    /// `n` bytes of application data.
    Data(usize),
    /// The device's close_notify: its end of stream (writing back stays possible, as in TLS 1.3
    /// and on the user-space path).
    CloseNotify,
}

/// Reads what a non-data record means, counting it (`scm_proxy_ktls_records_total`) and
/// logging why the connection ends where it does. `bytes` is the record's payload.
pub(super) fn classify(
    fd: BorrowedFd<'_>,
    typ: u8,
    bytes: &[u8],
    events: &IntCounterVec,
) -> io::Result<Record> {
    match (typ, bytes) {
        (RECORD_DATA, b) => Ok(Record::Data(b.len())),
        (RECORD_ALERT, [_, CLOSE_NOTIFY]) => {
            events.with_label_values(&["close_notify"]).inc();
            Ok(Record::CloseNotify)
        }
        (RECORD_ALERT, b) => {
            events.with_label_values(&["alert"]).inc();
            let (level, desc) = (b.first().copied(), b.get(1).copied());
            tracing::info!(?level, description = ?desc, "the device sent a TLS alert; connection closed");
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the device sent TLS alert {desc:?} (level {level:?})"),
            ))
        }
        (RECORD_HANDSHAKE, [KEY_UPDATE, ..]) => {
            events.with_label_values(&["key_update"]).inc();
            // The device encrypts with new keys from the next record on; this kernel cannot be
            // given them (TLS_RX rekeying came after Linux 6.1), and reading on would only fail
            // to decrypt. Say so to the device and end the connection; it reconnects.
            // Logged first: once the alert is out, the device may act on it.
            tracing::warn!(
                "the device sent a TLS KeyUpdate, which kernel TLS cannot follow on receive; \
                 connection closed (the device reconnects with fresh keys)"
            );
            let _ = send_control(fd, RECORD_ALERT, &[2, INTERNAL_ERROR]);
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS KeyUpdate from the device on the kTLS path",
            ))
        }
        (RECORD_HANDSHAKE, b) => {
            events.with_label_values(&["handshake"]).inc();
            tracing::info!(message = ?b.first(), "unexpected TLS handshake message after the handshake; connection closed");
            let _ = send_control(fd, RECORD_ALERT, &[2, 10]);
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected TLS handshake message on the kTLS path",
            ))
        }
        (t, _) => {
            events.with_label_values(&["unexpected"]).inc();
            tracing::info!(
                record_type = t,
                "unexpected TLS record type; connection closed"
            );
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected TLS record type {t} on the kTLS path"),
            ))
        }
    }
}

/// Names a read error of a kTLS socket, counting the kernel's decryption failures.
pub(super) fn read_error(e: io::Error, events: &IntCounterVec) -> io::Error {
    if e.raw_os_error() == Some(libc::EBADMSG) {
        events.with_label_values(&["decrypt_error"]).inc();
        tracing::info!("a record from the device did not decrypt (kernel TLS); connection closed");
        return io::Error::new(
            io::ErrorKind::InvalidData,
            "kernel TLS: record did not decrypt",
        );
    }
    e
}

/// The error for a TCP end of stream without close_notify (as rustls reports it).
pub(super) fn unclean_eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the device closed TCP without a TLS close_notify",
    )
}

/// A device connection whose records the kernel encrypts and decrypts.
pub(super) struct KtlsStream {
    tcp: TcpStream,
    /// Plaintext rustls had decrypted before the hand-off, read before the socket.
    pending: Vec<u8>,
    pos: usize,
    read_closed: bool,
    write_closed: bool,
    events: IntCounterVec,
}

impl KtlsStream {
    /// The socket, the plaintext read before it, and the record counter (for the splice relay).
    pub(super) fn into_parts(self) -> (TcpStream, Vec<u8>, IntCounterVec) {
        let mut pending = self.pending;
        pending.drain(..self.pos);
        (self.tcp, pending, self.events)
    }
}

/// A read buffer too small for a whole control record (alert: 2 bytes, KeyUpdate: 5) goes
/// through one this big instead.
const SMALL_READ: usize = 64;

impl AsyncRead for KtlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.pending.len() {
            let n = buf.remaining().min(this.pending.len() - this.pos);
            buf.put_slice(&this.pending[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.pending.len() {
                this.pending = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if this.read_closed || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let fd = this.tcp.as_fd();
            let mut small = [0u8; SMALL_READ];
            let use_small = buf.remaining() < SMALL_READ;
            let res = this.tcp.try_io(Interest::READABLE, || {
                if use_small {
                    recv_record(fd, &mut small)
                } else {
                    recv_record(fd, buf.initialize_unfilled())
                }
            });
            let (typ, n) = match res {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(read_error(e, &this.events))),
            };
            if typ == RECORD_DATA && n == 0 {
                return Poll::Ready(Err(unclean_eof()));
            }
            let bytes: &[u8] = if use_small {
                &small[..n]
            } else {
                &buf.initialize_unfilled()[..n]
            };
            match classify(fd, typ, bytes, &this.events) {
                Ok(Record::Data(n)) => {
                    if use_small {
                        let fit = n.min(buf.remaining());
                        buf.put_slice(&small[..fit]);
                        this.pending = small[fit..n].to_vec();
                        this.pos = 0;
                    } else {
                        buf.advance(n);
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Record::CloseNotify) => {
                    this.read_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for KtlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // A plain write on a kTLS socket becomes application-data records.
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    /// close_notify, then the TCP half-close: the device may still send (TLS 1.3 half-close).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.write_closed {
            ready!(this.tcp.poll_write_ready(cx))?;
            let fd = this.tcp.as_fd();
            match this.tcp.try_io(Interest::WRITABLE, || {
                send_control(fd, RECORD_ALERT, &[1, CLOSE_NOTIFY])
            }) {
                Ok(()) => this.write_closed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Sends close_notify on a kTLS socket, waiting for room if needed (for the splice relay).
pub(super) async fn close_notify(tcp: &TcpStream) -> io::Result<()> {
    loop {
        tcp.writable().await?;
        match tcp.try_io(Interest::WRITABLE, || {
            send_control(tcp.as_fd(), RECORD_ALERT, &[1, CLOSE_NOTIFY])
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> IntCounterVec {
        IntCounterVec::new("kind")
    }

    /// Any socket: the alerts `classify` sends are best effort, and fail on this one.
    fn socket() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    #[test]
    fn close_notify_ends_the_stream_and_other_alerts_end_the_connection() {
        let (s, ev) = (socket(), events());
        assert_eq!(
            classify(s.as_fd(), RECORD_ALERT, &[1, CLOSE_NOTIFY], &ev).unwrap(),
            Record::CloseNotify
        );
        let e = classify(s.as_fd(), RECORD_ALERT, &[2, 40], &ev).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(e.to_string().contains("40"), "{e}");
        assert_eq!(ev.with_label_values(&["close_notify"]).get(), 1);
        assert_eq!(ev.with_label_values(&["alert"]).get(), 1);
        assert_eq!(
            classify(s.as_fd(), RECORD_DATA, b"abc", &ev).unwrap(),
            Record::Data(3)
        );
    }

    #[test]
    fn a_key_update_ends_the_connection_and_is_counted() {
        let (s, ev) = (socket(), events());
        // KeyUpdate, length 1, update_not_requested.
        let e = classify(s.as_fd(), RECORD_HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], &ev).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert_eq!(ev.with_label_values(&["key_update"]).get(), 1);
        // A NewSessionTicket from a client makes no sense either.
        assert!(classify(s.as_fd(), RECORD_HANDSHAKE, &[4, 0, 0, 0], &ev).is_err());
        assert_eq!(ev.with_label_values(&["handshake"]).get(), 1);
        assert!(classify(s.as_fd(), 20, &[1], &ev).is_err());
        assert_eq!(ev.with_label_values(&["unexpected"]).get(), 1);
    }

    #[test]
    fn only_ciphers_the_kernel_took_are_handed_off() {
        let c = KernelCiphers {
            aes_128_gcm: true,
            aes_256_gcm: true,
            chacha20_poly1305: false,
        };
        assert!(c.accepts(suites::TLS13_AES_128_GCM_SHA256));
        assert!(c.accepts(suites::TLS13_AES_256_GCM_SHA384));
        assert!(!c.accepts(suites::TLS13_CHACHA20_POLY1305_SHA256));
        assert_eq!(c.names(), "AES-128-GCM, AES-256-GCM");
        assert!(!KernelCiphers::default().any());
    }

    #[test]
    fn a_decryption_failure_is_named_and_counted() {
        let ev = events();
        let e = read_error(io::Error::from_raw_os_error(libc::EBADMSG), &ev);
        assert!(e.to_string().contains("did not decrypt"), "{e}");
        assert_eq!(ev.with_label_values(&["decrypt_error"]).get(), 1);
    }
}
