//! The proxy itself: start-up (TLS, kTLS detection, Security client, catalog, revocation stream,
//! metrics), the accept loop, and the life of one device connection from handshake to relay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use scm_proto::api::{BindingProof, ProxyEvent, Resource, ResourceMode};
use scm_proto::crypto::{SessionId, SessionTag};
use scm_proto::preamble::{Preamble, Status};
use scm_proto::{BINDING_EXPORTER_LABEL, BINDING_EXPORTER_LEN};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::cache::{Connections, SessionCache, SessionInfo};
use super::config::{ServeArgs, TlsPath};
use super::http::{BackendClient, HttpContext, Identity, backend_client, serve_http};
use super::limiter::{Counted, MAX_SOURCES, SourceLimiter};
use super::metrics::{Metrics, serve_metrics};
use super::policy::{Catalog, Refusal, check_app, check_binding, check_resource};
use super::preamble::{ReadError, read_preamble, write_reply};
use super::refusals::{AuthFailure, AuthFailureKind, RefusalSink};
use super::relay::{RelayEnd, RelayOptions, relay};
use super::security_client::{
    LineBuffer, RevocationStream, SecurityClient, SecurityError, Validation,
};
use super::tls::{TlsError, kernel_supports_ktls, security_client_config, server_config};

/// Why the proxy could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The Security client could not be built.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `--tls-path ktls` was asked for on a kernel without TLS support.
    #[error(
        "--tls-path ktls: this kernel does not accept the TLS upper-layer protocol (no CONFIG_TLS \
         or the tls module is not loaded); use --tls-path auto or userspace"
    )]
    KtlsUnavailable,
    /// The async runtime could not start.
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
}

/// The state shared by every connection of one proxy process.
pub struct Proxy {
    args: ServeArgs,
    acceptor: TlsAcceptor,
    ktls: bool,
    security: SecurityClient,
    cache: SessionCache,
    conns: Connections,
    catalog: RwLock<Arc<Catalog>>,
    last_refresh: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
    http_client: BackendClient,
    /// Repeated failures per source (single-process mode only).
    limiter: Option<SourceLimiter>,
    /// Consecutive revalidations of each session with open connections that no Security server
    /// answered (for --fail-closed-after).
    unanswered: Mutex<HashMap<SessionTag, u32>>,
    assertions: super::assertion::AssertionCache,
    /// Where refusal decisions go as typed values (a worker's blocklist feed).
    refusals: Option<Arc<dyn RefusalSink>>,
}

/// What a caller of [`serve_with`] plugs into the proxy.
#[derive(Default)]
#[non_exhaustive]
pub struct ServeHooks {
    /// Told of every authentication failure the proxy refuses (under a supervisor: the XDP
    /// blocklist). The proxy's own log line about the refusal is not part of this contract.
    pub refusals: Option<Arc<dyn RefusalSink>>,
}

impl ServeHooks {
    /// Hooks with `sink` told of every authentication failure.
    pub fn with_refusals(sink: Arc<dyn RefusalSink>) -> Self {
        Self {
            refusals: Some(sink),
        }
    }
}

impl std::fmt::Debug for ServeHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeHooks")
            .field("refusals", &self.refusals.is_some())
            .finish()
    }
}

/// Sessions revalidated at once after a revocation stream reopens.
const REVALIDATE_CONCURRENCY: usize = 16;

/// Runs [`serve`] on a new multi-threaded runtime (for a synchronous `main`).
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?
        .block_on(serve(args))
}

/// Starts the proxy and serves until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    serve_with(args, ServeHooks::default()).await
}

/// [`serve`], with `hooks` told of what the proxy decides.
pub async fn serve_with(args: ServeArgs, hooks: ServeHooks) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    let ktls = match args.tls_path {
        TlsPath::Userspace => false,
        TlsPath::Auto => kernel_supports_ktls().await,
        TlsPath::Ktls => kernel_supports_ktls()
            .await
            .then_some(true)
            .ok_or(ServeError::KtlsUnavailable)?,
    };
    let path = if ktls { "ktls" } else { "userspace" };
    metrics.tls_path.with_label_values(&[path]).set(1);
    let reason = match (args.tls_path, ktls) {
        (TlsPath::Userspace, _) => "forced by --tls-path userspace",
        (_, true) => "the kernel accepts the TLS upper-layer protocol",
        (_, false) => "the kernel has no TLS upper-layer protocol (CONFIG_TLS)",
    };
    tracing::info!(tls_path = path, reason, "record encryption path chosen");

    let tls = server_config(&args.tls_cert, &args.tls_key, ktls)?;
    let client_tls =
        security_client_config(&args.security_ca, &args.client_cert, &args.client_key)?;
    let security = SecurityClient::new(
        args.security_urls.clone(),
        client_tls,
        args.security_timeout,
        args.security_failback,
        metrics.clone(),
    )?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Bind {
            what: "device listener",
            addr: args.listen,
            source,
        })?;
    if let Some(addr) = args.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind {
                what: "metrics listener",
                addr,
                source,
            })?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(l, metrics.clone()));
    }
    let proxy = Arc::new(Proxy {
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        ktls,
        security,
        cache: SessionCache::new(args.cache_ttl),
        conns: Connections::default(),
        catalog: RwLock::default(),
        last_refresh: Mutex::new(None),
        http_client: backend_client(args.connect_timeout),
        limiter: args
            .source_limit
            .map(|p| SourceLimiter::new(p, MAX_SOURCES)),
        unanswered: Mutex::default(),
        assertions: Default::default(),
        refusals: hooks.refusals,
        metrics,
        args,
    });
    if let Some(l) = &proxy.limiter {
        let p = l.policy();
        tracing::info!(
            threshold = p.threshold,
            window = ?p.window,
            block_for = ?p.block_for,
            ipv6_prefix = p.ipv6_prefix,
            "repeated failures per source answered rate_limited"
        );
    }
    proxy.refresh_catalog().await;
    tokio::spawn(proxy.clone().revocation_loop());
    tokio::spawn(proxy.clone().catalog_loop());
    tokio::spawn(proxy.clone().revalidate_loop());
    tracing::info!(
        listen = %proxy.args.listen,
        security = ?proxy.args.security_urls,
        "scm-proxy serving"
    );

    let limit = Arc::new(tokio::sync::Semaphore::new(proxy.args.max_connections));
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p,
            _ = &mut stop => break,
        };
        let Ok(permit) = permit else { break };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    proxy.metrics.error("accept");
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        crate::steer::verified::accepted(peer); // the kernel completed its handshake
        let proxy = proxy.clone();
        tokio::spawn(async move {
            proxy.handle(tcp, peer).await;
            drop(permit);
        });
    }
    tracing::info!("shutting down");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

struct OpenGuard(Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

impl Proxy {
    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn refresh_catalog(&self) -> bool {
        *self.last_refresh.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        match tokio::try_join!(self.security.resources(), self.security.apps()) {
            Ok((resources, apps)) => {
                let cat = Catalog::new(resources, apps);
                tracing::debug!(
                    resources = cat.resources.len(),
                    apps = cat.apps.len(),
                    "catalog refreshed"
                );
                *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cat);
                true
            }
            Err(e) => {
                self.metrics.error("catalog");
                tracing::warn!(error = %e, "catalog refresh failed; keeping the last one");
                false
            }
        }
    }

    /// The catalog, fetched again first if it lacks the resource the preamble names (at most once a
    /// second, so unknown names cannot make the proxy hammer the Security server).
    async fn catalog_for(&self, p: &Preamble) -> Arc<Catalog> {
        let cat = self.catalog();
        if cat.resources.contains_key(&p.resource) {
            return cat;
        }
        let recent = self
            .last_refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
        if !recent {
            self.refresh_catalog().await;
        }
        self.catalog()
    }

    /// Validates again, about once a cache TTL, every session that has open connections: this
    /// keeps the session alive at the Security server while its tunnels are in use, and closes
    /// them if the session ended there without a revocation reaching this proxy (a missed event,
    /// a restarted server). While no server answers, connections are left alone, up to
    /// `--fail-closed-after` unanswered revalidations in a row.
    async fn revalidate_loop(self: Arc<Self>) {
        let period = self.args.cache_ttl.max(Duration::from_secs(1));
        loop {
            tokio::time::sleep(period).await;
            self.revalidate_open(false).await;
        }
    }

    /// Revalidates the sessions with open connections (`all`: even those fresh in the cache),
    /// a few at a time, cutting those the Security server no longer knows.
    async fn revalidate_open(&self, all: bool) {
        let open = self.conns.sessions();
        {
            // Counts of sessions whose connections have all closed are not needed any more.
            let mut unanswered = self.unanswered.lock().unwrap_or_else(|e| e.into_inner());
            unanswered.retain(|tag, _| open.iter().any(|(t, _)| t == tag));
        }
        futures_util::stream::iter(open)
            .filter(|(_, id)| std::future::ready(all || self.cache.get(id).is_none()))
            .for_each_concurrent(REVALIDATE_CONCURRENCY, |(tag, id)| async move {
                self.revalidate(tag, id).await;
            })
            .await;
    }

    async fn revalidate(&self, tag: SessionTag, id: SessionId) {
        match self.security.validate(&id, None).await {
            Ok(Validation::Valid(s)) => {
                self.metrics.validations.with_label_values(&["valid"]).inc();
                self.unanswered_reset(&tag);
                self.cache.insert(id, s);
            }
            Ok(Validation::Invalid(body)) => {
                self.metrics
                    .validations
                    .with_label_values(&["invalid"])
                    .inc();
                self.unanswered_reset(&tag);
                self.cache.revoke(&tag);
                let cut = self.conns.cut(&tag);
                tracing::info!(session = %tag, code = %body.code, connections_closed = cut, "session no longer valid at the Security server");
            }
            Err(e) => {
                self.metrics
                    .validations
                    .with_label_values(&["unavailable"])
                    .inc();
                let limit = self.args.fail_closed_after;
                let n = {
                    let mut unanswered = self.unanswered.lock().unwrap_or_else(|e| e.into_inner());
                    let n = unanswered.entry(tag.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                if limit > 0 && n >= limit {
                    self.unanswered_reset(&tag);
                    self.metrics.error("fail_closed");
                    let cut = self.conns.cut(&tag);
                    tracing::warn!(session = %tag, unanswered = n, connections_closed = cut, error = %e, "no Security server answered --fail-closed-after revalidations in a row; closing the session's connections");
                } else {
                    tracing::debug!(session = %tag, unanswered = n, error = %e, "revalidation failed; keeping the connections");
                }
            }
        }
    }

    fn unanswered_reset(&self, tag: &SessionTag) {
        self.unanswered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tag);
    }

    /// What a newly opened revocation stream cannot tell: revocations published while no stream
    /// was open (a cut link, a restarted or another server) are lost, so every cached session is
    /// forgotten (the next preamble validates it again) and every session with open connections
    /// is validated again at once, its connections cut if it has ended.
    fn reconcile_after_reopen(self: &Arc<Self>) {
        let forgotten = self.cache.clear();
        let open = self.conns.sessions().len();
        if forgotten == 0 && open == 0 {
            return;
        }
        tracing::info!(
            forgotten,
            open_sessions = open,
            "revocation stream (re)opened: cache emptied, open sessions revalidated"
        );
        let me = self.clone();
        tokio::spawn(async move { me.revalidate_open(true).await });
    }

    async fn catalog_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.args.catalog_refresh).await;
            self.refresh_catalog().await;
        }
    }

    /// Keeps the revocation stream open (moving across Security servers), applying its events.
    async fn revocation_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.security.revocations().await {
                Ok(stream) => {
                    backoff = Duration::from_millis(100);
                    self.follow_revocations(stream).await;
                    self.metrics.revocation_stream_up.set(0);
                    self.metrics.error("revocation_stream");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the revocation stream");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Reads one revocation stream until it ends, fails or goes silent. While it comes from a
    /// fail-over server, tries to open one at the first server (when the request path is back
    /// there, or every `--security-failback`) and moves over when that works.
    async fn follow_revocations(self: &Arc<Self>, mut stream: RevocationStream) {
        self.metrics.revocation_stream_up.set(1);
        tracing::info!(security = %stream.url, "revocation stream open");
        // Events may have been missed while the stream was down.
        self.reconcile_after_reopen();
        self.refresh_catalog().await;
        let mut lines = LineBuffer::default();
        let mut last_data = tokio::time::Instant::now();
        let check = self
            .args
            .security_failback
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut tick = tokio::time::interval(check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stall_at = last_data + self.args.revocation_stall;
            tokio::select! {
                chunk = tokio::time::timeout_at(stall_at, stream.resp.chunk()) => match chunk {
                    Ok(Ok(Some(chunk))) => {
                        last_data = tokio::time::Instant::now();
                        for line in lines.push(&chunk) {
                            self.apply_event(&line).await;
                        }
                    }
                    Ok(Ok(None)) => {
                        tracing::warn!(security = %stream.url, "revocation stream ended");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(security = %stream.url, error = %e, "revocation stream failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(security = %stream.url, "revocation stream silent; reopening");
                        return;
                    }
                },
                _ = tick.tick(), if stream.idx != 0 => {
                    if !self.security.stream_should_fail_back(stream.idx) {
                        continue;
                    }
                    match self.security.revocations_at_first().await {
                        Ok(first) => {
                            tracing::info!(from = %stream.url, to = %first.url, "revocation stream moved back to the first Security server");
                            // No revocation is lost across the switch: the new stream is open
                            // before the old one is let go, so whatever the first server publishes
                            // from now on arrives on it; and the old stream is still read for a
                            // short overlap, so whatever its server published just before the
                            // switch is applied too. An event seen on both is harmless (revoking
                            // twice is a no-op). Then the catalog is fetched again, as on every
                            // (re)open, for changes made while the stream was elsewhere. The
                            // first server may not know sessions validated at the other one, and
                            // revocations made there from now on never reach this stream: the
                            // cache is emptied and open sessions revalidated here.
                            let old = std::mem::replace(&mut stream, first);
                            let old_lines = std::mem::take(&mut lines);
                            last_data = tokio::time::Instant::now();
                            tokio::spawn(self.clone().drain_revocations(old, old_lines));
                            self.reconcile_after_reopen();
                            self.refresh_catalog().await;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "first Security server still not answering");
                        }
                    }
                }
            }
        }
    }

    /// Applies what a replaced revocation stream still delivers during the overlap, then closes it.
    async fn drain_revocations(self: Arc<Self>, mut old: RevocationStream, mut lines: LineBuffer) {
        const OVERLAP: Duration = Duration::from_secs(2);
        let until = tokio::time::Instant::now() + OVERLAP;
        while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(until, old.resp.chunk()).await {
            for line in lines.push(&chunk) {
                self.apply_event(&line).await;
            }
        }
        tracing::debug!(security = %old.url, "old revocation stream closed after the overlap");
    }

    async fn apply_event(&self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let event: ProxyEvent = match serde_json::from_slice(line) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.error("revocation_event");
                tracing::warn!(error = %e, "unreadable revocation event");
                return;
            }
        };
        match event {
            ProxyEvent::Revoked {
                session_tag,
                reason,
            } => {
                let tag = scm_proto::crypto::SessionTag(session_tag);
                self.metrics.revocations.inc();
                let cached = self.cache.revoke(&tag);
                self.assertions.forget(&tag);
                let cut = self.conns.cut(&tag);
                tracing::info!(session = %tag, %reason, cached, connections_closed = cut, "session revoked");
            }
            ProxyEvent::CatalogChanged => {
                self.refresh_catalog().await;
            }
            ProxyEvent::Heartbeat { .. } => {}
        }
    }

    async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        self.metrics.connections.inc();
        self.metrics.connections_open.inc();
        let _open = OpenGuard(self.metrics.clone());
        let _ = tcp.set_nodelay(true);
        if self.ktls {
            let Some(tls) = self.handshake(ktls::CorkStream::new(tcp), peer).await else {
                return;
            };
            let Some(exporter) = self.exporter(tls.get_ref().1) else {
                return;
            };
            match ktls::config_ktls_server(tls).await {
                Ok(stream) => self.session(stream, exporter, peer).await,
                Err(e) => {
                    self.metrics.error("ktls");
                    tracing::warn!(%peer, error = %e, "handing the connection to kTLS failed");
                }
            }
        } else {
            let Some(tls) = self.handshake(tcp, peer).await else {
                return;
            };
            let Some(exporter) = self.exporter(tls.get_ref().1) else {
                return;
            };
            self.session(tls, exporter, peer).await;
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
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = write_reply(stream, r.status, &r.reason).await;
            let _ = stream.shutdown().await;
        })
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

    async fn session<S>(self: &Arc<Self>, mut stream: S, exporter: [u8; 32], peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let preamble = read_preamble(&mut stream, self.args.preamble_timeout).await;
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
            return;
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
                return;
            }
        };
        let Some(id) = SessionId::parse(&preamble.session_id) else {
            let r = Refusal::new(Status::SessionInvalid, "malformed session id");
            self.metrics.error(r.status.code());
            self.refuse(&mut stream, peer, r).await;
            return;
        };
        let (session, resource) = match self.admit(&id, &preamble, &exporter).await {
            Ok(ok) => ok,
            Err(r) => {
                self.metrics.error(r.status.code());
                self.refuse(&mut stream, peer, r).await;
                return;
            }
        };
        let app = format!("{}/{}", preamble.app_id, preamble.app_version);
        drop(preamble);
        let guard = self.conns.register(&session.tag, &id);
        // A revocation may have landed between the validation and the registration.
        if self.cache.is_revoked(&session.tag) {
            let r = Refusal::new(Status::SessionInvalid, "the session has been revoked");
            self.refuse(&mut stream, peer, r).await;
            return;
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
                    let backend =
                        match tokio::time::timeout(self.args.connect_timeout, connect).await {
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
                                return;
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
                                return;
                            }
                        };
                    let _ = backend.set_nodelay(true);
                    if !self.accept_reply(&mut stream).await {
                        return;
                    }
                    tracing::info!(mode = "tcp", "relaying");
                    let opts = RelayOptions {
                        buffer_size: self.args.buffer_size,
                        idle_timeout: self.args.idle_timeout,
                    };
                    let end = relay(
                        stream,
                        backend,
                        opts,
                        &guard.token,
                        self.metrics.bytes.with_label_values(&["to_backend"]),
                        self.metrics.bytes.with_label_values(&["to_device"]),
                    )
                    .await;
                    match end {
                        RelayEnd::Revoked if session.expired() => {
                            self.metrics.revoked_connections.inc();
                            tracing::info!("closed: the session reached its absolute expiry");
                        }
                        RelayEnd::Revoked => {
                            self.metrics.revoked_connections.inc();
                            tracing::info!("closed: session revoked");
                        }
                        RelayEnd::Idle => tracing::info!("closed: idle timeout"),
                        RelayEnd::Error => {
                            self.metrics.error("relay");
                            tracing::debug!("closed: relay error");
                        }
                        RelayEnd::Done => tracing::debug!("closed"),
                    }
                }
                ResourceMode::Http => {
                    if !self.accept_reply(&mut stream).await {
                        return;
                    }
                    tracing::info!(mode = "http", "proxying");
                    let mut ctx = self.http_context(&session, &resource, app, peer, &guard);
                    ctx.assertion = self.assertion_source(&id, &session.tag, &resource.name);
                    let ctx = Arc::new(ctx);
                    if let Err(e) =
                        serve_http(stream, ctx, &guard.token, self.args.idle_timeout).await
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
                }
            }
        }
        .instrument(span)
        .await;
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
