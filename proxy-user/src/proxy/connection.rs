//! The life of one device connection: TLS handshake (kTLS where the kernel has it), preamble,
//! admission (session, binding, app and resource policy), refusal or relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scm_proto::api::{BindingProof, Resource, ResourceMode};
use scm_proto::crypto::SessionId;
use scm_proto::preamble::{Preamble, Status};
use scm_proto::{BINDING_EXPORTER_LABEL, BINDING_EXPORTER_LEN};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::cache::{ConnGuard, SessionInfo};
use super::http::{HttpContext, Identity, serve_http};
use super::ktls::{Handoff, KtlsStream};
use super::limiter::Counted;
use super::metrics::Metrics;
use super::policy::{Refusal, check_app, check_binding, check_resource};
use super::preamble::{ReadError, read_preamble, write_reply};
use super::refusals::{AuthFailure, AuthFailureKind};
use super::relay::{RelayEnd, RelayOptions, relay};
use super::security_client::Validation;
use super::server::Proxy;
use super::splice::splice_relay;

struct OpenGuard(Arc<Metrics>);

/// A device connection after the handshake, on whichever path its records take.
pub(super) enum DeviceStream {
    /// User-space rustls (`--tls-path userspace`, or a kernel without TLS).
    Rustls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// User-space rustls after a kTLS hand-off was not possible for this connection.
    Corked(Box<tokio_rustls::server::TlsStream<ktls::CorkStream<TcpStream>>>),
    /// Kernel TLS.
    Kernel(KtlsStream),
}

impl DeviceStream {
    /// The `path` label of `scm_proxy_tls_connections_total`.
    fn path(&self) -> &'static str {
        match self {
            Self::Kernel(_) => "ktls",
            Self::Rustls(_) | Self::Corked(_) => "userspace",
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            DeviceStream::Rustls($s) => $e,
            DeviceStream::Corked($s) => $e,
            DeviceStream::Kernel($s) => $e,
        }
    };
}

impl AsyncRead for DeviceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for DeviceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Rustls(s) => s.is_write_vectored(),
            Self::Corked(s) => s.is_write_vectored(),
            Self::Kernel(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

impl Proxy {
    pub(super) async fn handle(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr) {
        self.metrics.connections.inc();
        self.metrics.connections_open.inc();
        let _open = OpenGuard(self.metrics.clone());
        let _ = tcp.set_nodelay(true);
        let Some(peer) = self.device_address(&mut tcp, peer).await else {
            return;
        };
        // Every step that ends before the relay (handshake, hand-off, preamble, admission,
        // connect, refusal) and the http server are awaited boxed: a task's future is as large
        // as its largest state, and held for the connection's life, so inline they made every
        // idle tunnel connection carry 11 KiB of futures it had finished with
        // (docs/data-plane.md, memory per connection).
        let Some((stream, exporter)) = Box::pin(self.establish(tcp, peer)).await else {
            return;
        };
        self.metrics
            .tls_connections
            .with_label_values(&[stream.path()])
            .inc();
        if let Some((tunnel, span)) = Box::pin(self.session(stream, exporter, peer)).await {
            tunnel.run(&self).instrument(span).await;
        }
    }

    /// The device's address: `peer` itself, or, from a balancer `--proxy-protocol-from` lists,
    /// what its PROXY header says (`None`: the connection is closed, with the reason logged).
    async fn device_address(&self, tcp: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let from_balancer = self
            .args
            .proxy_protocol_from
            .iter()
            .any(|net| net.contains(&peer.ip()));
        if !from_balancer {
            return Some(peer);
        }
        match super::proxy_header::read(tcp, self.args.handshake_timeout).await {
            Ok(Some(device)) => Some(device),
            Ok(None) => Some(peer),
            Err(e) => {
                self.metrics.error(e.class());
                if matches!(e, super::proxy_header::HeaderError::Closed) {
                    tracing::debug!(balancer = %peer, "{e}");
                } else {
                    tracing::warn!(balancer = %peer, error = %e, "connection from a listed balancer closed");
                }
                None
            }
        }
    }

    /// The TLS handshake, then the kTLS hand-off where the proxy uses kTLS: the device stream on
    /// the path its records will take, with the connection's TLS exporter.
    async fn establish(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<(DeviceStream, [u8; BINDING_EXPORTER_LEN])> {
        if let Some(ciphers) = &self.ktls {
            let tls = self.handshake(ktls::CorkStream::new(tcp), peer).await?;
            let exporter = self.exporter(tls.get_ref().1)?;
            let events = self.metrics.ktls_records.clone();
            match super::ktls::hand_off(tls, ciphers, events).await {
                Ok(Handoff::Kernel(k)) => {
                    self.metrics.ktls_handoffs.with_label_values(&["ok"]).inc();
                    Some((DeviceStream::Kernel(k), exporter))
                }
                Ok(Handoff::Userspace(tls, why)) => {
                    self.metrics
                        .ktls_handoffs
                        .with_label_values(&[why.label()])
                        .inc();
                    tracing::info!(%peer, reason = %why, "kTLS hand-off not possible for this connection; it goes on in user-space rustls");
                    Some((DeviceStream::Corked(tls), exporter))
                }
                Err(e) => {
                    self.metrics
                        .ktls_handoffs
                        .with_label_values(&["failed"])
                        .inc();
                    self.metrics.error("ktls_handoff");
                    tracing::warn!(%peer, error = %e, "kTLS hand-off failed after rustls gave up its keys; connection closed");
                    None
                }
            }
        } else {
            let tls = self.handshake(tcp, peer).await?;
            let exporter = self.exporter(tls.get_ref().1)?;
            Some((DeviceStream::Rustls(Box::new(tls)), exporter))
        }
    }

    async fn handshake<IO>(
        &self,
        io: IO,
        peer: SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.args.handshake_timeout, self.acceptor.accept(io)).await {
            Ok(Ok(s)) => {
                self.metrics.handshakes.with_label_values(&["ok"]).inc();
                Some(s)
            }
            Ok(Err(e)) => {
                self.metrics.handshakes.with_label_values(&["failed"]).inc();
                self.metrics.error("handshake");
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.metrics
                    .handshakes
                    .with_label_values(&["timeout"])
                    .inc();
                self.metrics.error("handshake_timeout");
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        }
    }

    fn exporter(&self, conn: &rustls::ServerConnection) -> Option<[u8; BINDING_EXPORTER_LEN]> {
        match conn.export_keying_material([0u8; BINDING_EXPORTER_LEN], BINDING_EXPORTER_LABEL, None)
        {
            Ok(e) => Some(e),
            Err(e) => {
                self.metrics.error("exporter");
                tracing::warn!(error = %e, "TLS exporter failed");
                None
            }
        }
    }

    async fn refuse<S: AsyncWrite + Unpin>(&self, stream: &mut S, peer: SocketAddr, r: Refusal) {
        self.metrics
            .replies
            .with_label_values(&[r.status.code()])
            .inc();
        tracing::info!(%peer, status = %r.status, reason = %r.reason, "connection refused");
        // The refusals a device with a live session never causes.
        if let Some(kind) = AuthFailureKind::of(r.status) {
            self.count_failure(peer);
            if let Some(sink) = &self.refusals {
                sink.auth_failure(AuthFailure { peer, kind });
            }
        }
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(2), async {
            let _ = write_reply(stream, r.status, &r.reason).await;
            let _ = stream.shutdown().await;
        }))
        .await;
    }

    /// Counts a failure against the peer's source (single-process mode), saying so when it
    /// blocks the source.
    fn count_failure(&self, peer: SocketAddr) {
        let Some(l) = &self.limiter else { return };
        match l.failure(peer.ip()) {
            Counted::Blocked => {
                let p = l.policy();
                tracing::warn!(source = %l.key(peer.ip()), failures = p.threshold, window = ?p.window, block_for = ?p.block_for, "source blocked after repeated failures; its connections get rate_limited");
            }
            Counted::TableFull => {
                self.metrics.error("source_table_full");
                tracing::debug!(%peer, "failure table full; failure not counted");
            }
            Counted::Counted | Counted::Off => {}
        }
    }

    async fn session(
        self: &Arc<Self>,
        mut stream: DeviceStream,
        exporter: [u8; 32],
        peer: SocketAddr,
    ) -> Option<(Tunnel<'_>, tracing::Span)> {
        let started = std::time::Instant::now();
        let preamble = Box::pin(read_preamble(&mut stream, self.args.preamble_timeout)).await;
        self.metrics
            .preamble_seconds
            .observe(started.elapsed().as_secs_f64());
        // A blocked source is answered before anything is checked or asked of the Security
        // server (its preamble is read first so the device reads the reply, not a reset).
        if let Some(left) = self.limiter.as_ref().and_then(|l| l.blocked(peer.ip())) {
            self.metrics.error("rate_limited");
            let r = Refusal::new(
                Status::RateLimited,
                format!(
                    "too many failed attempts from this address; try again in {} s",
                    left.as_secs().max(1)
                ),
            );
            self.refuse(&mut stream, peer, r).await;
            return None;
        }
        let preamble = match preamble {
            Ok(p) => p,
            Err(e) => {
                self.metrics.error(e.class());
                // Garbled bytes count; a device that closed early or was slow does not.
                if matches!(e, ReadError::Invalid(_)) {
                    self.count_failure(peer);
                }
                let r = Refusal::new(Status::BadPreamble, e.to_string());
                self.refuse(&mut stream, peer, r).await;
                return None;
            }
        };
        let Some(id) = SessionId::parse(&preamble.session_id) else {
            let r = Refusal::new(Status::SessionInvalid, "malformed session id");
            self.metrics.error(r.status.code());
            self.refuse(&mut stream, peer, r).await;
            return None;
        };
        let (session, resource) = match Box::pin(self.admit(&id, &preamble, &exporter)).await {
            Ok(ok) => ok,
            Err(r) => {
                self.metrics.error(r.status.code());
                self.refuse(&mut stream, peer, r).await;
                return None;
            }
        };
        let app = format!("{}/{}", preamble.app_id, preamble.app_version);
        drop(preamble);
        let guard = self.conns.register(&session.tag, &id);
        // A revocation may have landed between the validation and the registration.
        if self.cache.is_revoked(&session.tag) {
            let r = Refusal::new(Status::SessionInvalid, "the session has been revoked");
            self.refuse(&mut stream, peer, r).await;
            return None;
        }
        // The absolute expiry is enforced here, whether or not a Security server answers then.
        let _expiry = cut_at_expiry(&session, guard.token.clone());
        let span = tracing::info_span!(
            "conn",
            session = %session.tag,
            user = %session.user,
            resource = %resource.name,
            %peer
        );
        async {
            match resource.mode {
                ResourceMode::Tcp => {
                    let connect = TcpStream::connect(resource.address.as_str());
                    let started = std::time::Instant::now();
                    let connected =
                        Box::pin(tokio::time::timeout(self.args.connect_timeout, connect)).await;
                    self.metrics
                        .backend_connect_seconds
                        .observe(started.elapsed().as_secs_f64());
                    let backend = match connected {
                        Ok(Ok(b)) => b,
                        Ok(Err(e)) => {
                            let r = Refusal::new(
                                Status::BackendUnavailable,
                                format!(
                                    "back end of {} at {} unreachable: {e}",
                                    resource.name, resource.address
                                ),
                            );
                            self.metrics.error("backend_unavailable");
                            self.refuse(&mut stream, peer, r).await;
                            return None;
                        }
                        Err(_) => {
                            let r = Refusal::new(
                                Status::BackendUnavailable,
                                format!(
                                    "back end of {} at {} did not accept within {:?}",
                                    resource.name, resource.address, self.args.connect_timeout
                                ),
                            );
                            self.metrics.error("backend_unavailable");
                            self.refuse(&mut stream, peer, r).await;
                            return None;
                        }
                    };
                    let _ = backend.set_nodelay(true);
                    if !self.accept_reply(&mut stream).await {
                        return None;
                    }
                    let how = if matches!(stream, DeviceStream::Kernel(_)) {
                        "splice"
                    } else {
                        "copy"
                    };
                    tracing::info!(mode = "tcp", relay = how, "relaying");
                    // The relay runs after this future is gone (see `Tunnel`).
                    Some(Tunnel {
                        stream,
                        backend,
                        opts: RelayOptions {
                            buffer_size: self.args.buffer_size,
                            idle_timeout: self.args.idle_timeout,
                        },
                        guard,
                        session,
                        _expiry,
                    })
                }
                ResourceMode::Http => {
                    if !self.accept_reply(&mut stream).await {
                        return None;
                    }
                    tracing::info!(mode = "http", "proxying");
                    let mut ctx = self.http_context(&session, &resource, app, peer, &guard);
                    ctx.assertion = self.assertion_source(&id, &session.tag, &resource.name);
                    let ctx = Arc::new(ctx);
                    if let Err(e) = Box::pin(serve_http(
                        stream,
                        ctx,
                        &guard.token,
                        self.args.idle_timeout,
                        &self.drain,
                    ))
                    .await
                    {
                        tracing::debug!(error = %e, "http connection ended with an error");
                    }
                    if guard.token.is_cancelled() {
                        self.metrics.revoked_connections.inc();
                        if session.expired() {
                            tracing::info!("closed: the session reached its absolute expiry");
                        } else {
                            tracing::info!("closed: session revoked");
                        }
                    }
                    None
                }
            }
        }
        .instrument(span.clone())
        .await
        .map(|t| (t, span))
    }

    async fn accept_reply<S: AsyncWrite + Unpin>(&self, stream: &mut S) -> bool {
        self.metrics
            .replies
            .with_label_values(&[Status::Ok.code()])
            .inc();
        write_reply(stream, Status::Ok, "").await.is_ok()
    }

    fn http_context(
        self: &Arc<Self>,
        session: &Arc<SessionInfo>,
        resource: &Resource,
        app: String,
        peer: SocketAddr,
        guard: &super::cache::ConnGuard<'_>,
    ) -> HttpContext {
        let proxy = self.clone();
        let s = session.clone();
        let name = resource.name.clone();
        let token = guard.token.clone();
        HttpContext {
            resource: resource.name.clone(),
            backend: resource.address.clone(),
            identity: Identity {
                user: session.user.clone(),
                groups: session.groups.clone(),
                device_id: session.device_id.clone(),
                app,
            },
            peer,
            client: self.http_client.clone(),
            check: Box::new(move || {
                if token.is_cancelled() || proxy.cache.is_revoked(&s.tag) || s.expired() {
                    return Err(Refusal::new(
                        Status::SessionInvalid,
                        "the session has ended",
                    ));
                }
                check_resource(&proxy.catalog().resources, &s, &name).map(|_| ())
            }),
            metrics: self.metrics.clone(),
            assertion: None,
        }
    }

    /// Where this connection's requests get their identity assertion: the cache in front of the
    /// Security server (`None` with `--no-identity-assertion`).
    fn assertion_source(
        self: &Arc<Self>,
        id: &SessionId,
        tag: &scm_proto::crypto::SessionTag,
        resource: &str,
    ) -> Option<super::assertion::AssertionFn> {
        if self.args.no_identity_assertion {
            return None;
        }
        let (proxy, id, tag, resource) =
            (self.clone(), id.clone(), tag.clone(), resource.to_owned());
        Some(Box::new(move || {
            let (proxy, id, tag, resource) =
                (proxy.clone(), id.clone(), tag.clone(), resource.clone());
            Box::pin(async move {
                proxy
                    .assertions
                    .get(&proxy.security, &id, &tag, &resource)
                    .await
            })
        }))
    }

    /// Everything between a well-formed preamble and the back end: session, binding, app policy,
    /// resource and group rule. The refusal says which check failed.
    async fn admit(
        &self,
        id: &SessionId,
        p: &Preamble,
        exporter: &[u8],
    ) -> Result<(Arc<SessionInfo>, Resource), Refusal> {
        let session = match self.cache.get(id) {
            Some(s) => {
                self.metrics.cache_hits.inc();
                s
            }
            None => {
                self.metrics.cache_misses.inc();
                // The Security server checks the binding itself before it counts this
                // validation as the session's activity.
                let proof = BindingProof {
                    exporter: scm_proto::crypto::b64(exporter),
                    app_id: p.app_id.clone(),
                    app_version: p.app_version.clone(),
                    device_id: p.device_id.clone(),
                    resource: p.resource.clone(),
                    mac: scm_proto::crypto::b64(&p.mac),
                };
                match self.security.validate(id, Some(proof)).await {
                    Ok(Validation::Valid(s)) => {
                        self.metrics.validations.with_label_values(&["valid"]).inc();
                        if !self.cache.insert(id.clone(), s.clone()) {
                            return Err(Refusal::new(
                                Status::SessionInvalid,
                                "the session has been revoked",
                            ));
                        }
                        s
                    }
                    Ok(Validation::Invalid(body)) => {
                        self.metrics
                            .validations
                            .with_label_values(&["invalid"])
                            .inc();
                        let status = if body.code == "binding_failed" {
                            Status::BindingFailed
                        } else {
                            Status::SessionInvalid
                        };
                        return Err(Refusal::new(
                            status,
                            format!("session refused: {}: {}", body.code, body.message),
                        ));
                    }
                    Err(e) => {
                        self.metrics
                            .validations
                            .with_label_values(&["unavailable"])
                            .inc();
                        tracing::warn!(error = %e, "session validation failed");
                        return Err(Refusal::new(
                            Status::SecurityUnavailable,
                            "no Security server could validate the session; try again",
                        ));
                    }
                }
            }
        };
        if session.expired() {
            return Err(Refusal::new(
                Status::SessionInvalid,
                "the session has expired",
            ));
        }
        check_binding(&session, p, exporter)?;
        let catalog = self.catalog_for(p).await;
        check_app(&catalog.apps, &session, p)?;
        let resource = check_resource(&catalog.resources, &session, &p.resource)?.clone();
        Ok((session, resource))
    }
}

/// Aborts its task when dropped (when the connection it watches ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Cancels `token` (closing the connection) when the session reaches its absolute expiry.
fn cut_at_expiry(session: &SessionInfo, token: CancellationToken) -> AbortOnDrop {
    let left = session.time_left();
    AbortOnDrop(tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(left) => token.cancel(),
            _ = token.cancelled() => {}
        }
    }))
}

/// An admitted tcp-mode connection, ready to relay: all a relay needs and nothing more. The
/// steps before it (handshake, preamble, admission, connect) run in a boxed future that is freed
/// when they end, because a task's future is as large as its largest state and lives as long
/// as the connection: inline they made each idle tunnel connection hold 11 KiB of finished
/// futures.
///
/// The device stream's rustls variants are boxed (over a kilobyte with rustls inside): inline,
/// every future it passes through on its way into the relay would keep a dead copy's room.
pub(super) struct Tunnel<'a> {
    stream: DeviceStream,
    backend: TcpStream,
    opts: RelayOptions,
    guard: ConnGuard<'a>,
    session: Arc<SessionInfo>,
    _expiry: AbortOnDrop,
}

impl Tunnel<'_> {
    /// Relays until the connection ends, and says why it ended.
    async fn run(self, proxy: &Proxy) {
        let up = proxy.metrics.bytes.with_label_values(&["to_backend"]);
        let down = proxy.metrics.bytes.with_label_values(&["to_device"]);
        let token = &self.guard.token;
        let end = match self.stream {
            // The payload stays in the kernel: it decrypts into a pipe, encrypts out of one.
            DeviceStream::Kernel(k) => {
                let backstops = proxy.metrics.splice_backstops.clone();
                splice_relay(k, self.backend, self.opts, token, up, down, backstops).await
            }
            other => relay(other, self.backend, self.opts, token, up, down).await,
        };
        match end {
            RelayEnd::Revoked if self.session.expired() => {
                proxy.metrics.revoked_connections.inc();
                tracing::info!("closed: the session reached its absolute expiry");
            }
            RelayEnd::Revoked => {
                proxy.metrics.revoked_connections.inc();
                tracing::info!("closed: session revoked");
            }
            RelayEnd::Idle => tracing::info!("closed: idle timeout"),
            RelayEnd::Error => {
                proxy.metrics.error("relay");
                tracing::debug!("closed: relay error");
            }
            RelayEnd::Done => tracing::debug!("closed"),
        }
    }
}
