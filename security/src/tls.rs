//! TLS: loading PEM files into rustls configurations (server, server requiring client
//! certificates, client), the listeners' configurations a SIGHUP rebuilds ([`LiveConfig`],
//! [`reload`]), and the accept loop that serves an axum router over TLS with limits on
//! handshake time, header time and concurrent connections, and drains on a stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use scm_proto::lifecycle::reload::CertReloader;
use scm_proto::lifecycle::{Acceptor, Drain};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::error::Error;

/// Concurrent connections per listener.
const MAX_CONNECTIONS: usize = 10_000;

/// The address of the peer of a request's connection, put in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The verified client certificate (DER) of a mutual-TLS connection, put in every request's
/// extensions on such a listener.
#[derive(Debug, Clone)]
pub struct ClientCert(pub Arc<CertificateDer<'static>>);

/// Time a client has for each step (TLS handshake, request headers, request body); put in every
/// request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct IoTimeout(pub Duration);

/// The crypto provider every configuration uses: the workspace's TLS profile.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    scm_proto::tls::provider()
}

/// This crate's error for the TLS profile's: an unreadable file stays an I/O error on its path.
fn tls_error(e: scm_proto::tls::TlsError) -> Error {
    match e {
        scm_proto::tls::TlsError::Read { path, source } => Error::io(path, source),
        other => Error::Tls(other.to_string()),
    }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    scm_proto::tls::load_certs(path).map_err(tls_error)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    scm_proto::tls::load_key(path).map_err(tls_error)
}

/// Reads PEM CA certificates into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    scm_proto::tls::load_roots(path).map_err(tls_error)
}

fn server_builder()
-> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, Error> {
    scm_proto::tls::server_builder(scm_proto::tls::TLS13_AND_12).map_err(tls_error)
}

fn finish(mut cfg: rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A server configuration without client authentication.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, Error> {
    let cfg = server_builder()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
    Ok(finish(cfg))
}

/// Reads the PEM certificate revocation lists in `path` (one file may hold several).
pub fn load_crls(
    path: &Path,
) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>, Error> {
    scm_proto::tls::load_crls(path).map_err(tls_error)
}

/// A client configuration trusting the CA in `ca`, with an optional client certificate.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, Error> {
    let builder = scm_proto::tls::client_builder()
        .map_err(tls_error)?
        .with_root_certificates(load_roots(ca)?);
    let mut cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The server certificate and key every listener presents, reloadable on SIGHUP.
pub fn load_cert_reloader(cert: &Path, key: &Path) -> Result<Arc<CertReloader>, Error> {
    CertReloader::load(cert, key).map_err(tls_error)
}

/// One listener's TLS configuration, replaced whole by a reload. The certificate comes from the
/// shared [`CertReloader`] at every handshake; a mutual-TLS listener's client verifier is built
/// from its CA and CRL files, which a reload reads again.
#[derive(Debug)]
pub struct LiveConfig {
    cert: Arc<CertReloader>,
    /// The client CA file and CRL files of a mutual-TLS listener.
    clients: Option<(PathBuf, Vec<PathBuf>)>,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl LiveConfig {
    /// A listener without client authentication.
    pub fn plain(cert: Arc<CertReloader>) -> Result<Arc<Self>, Error> {
        Self::new(cert, None)
    }

    /// A listener requiring a client certificate signed by a CA in `client_ca` and not revoked
    /// by a CRL in one of the `crls` files.
    pub fn mtls(
        cert: Arc<CertReloader>,
        client_ca: &Path,
        crls: &[PathBuf],
    ) -> Result<Arc<Self>, Error> {
        Self::new(cert, Some((client_ca.to_owned(), crls.to_vec())))
    }

    fn new(
        cert: Arc<CertReloader>,
        clients: Option<(PathBuf, Vec<PathBuf>)>,
    ) -> Result<Arc<Self>, Error> {
        let current = RwLock::new(build_config(&cert, clients.as_ref())?);
        Ok(Arc::new(Self {
            cert,
            clients,
            current,
        }))
    }

    /// The configuration in force (a handshake takes it at its start).
    pub fn get(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Builds the configuration from the files as they are now, without installing it.
    fn rebuild(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        build_config(&self.cert, self.clients.as_ref())
    }

    fn install(&self, cfg: Arc<rustls::ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }
}

fn build_config(
    cert: &Arc<CertReloader>,
    clients: Option<&(PathBuf, Vec<PathBuf>)>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let builder = server_builder()?;
    let cfg = match clients {
        None => builder.with_no_client_auth(),
        Some((ca, crls)) => {
            let mut lists = Vec::new();
            for f in crls {
                lists.extend(load_crls(f)?);
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                    .with_crls(lists)
                    .build()
                    .map_err(|e| Error::Tls(format!("{} with CRLs {crls:?}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    }
    .with_cert_resolver(cert.clone());
    Ok(finish(cfg))
}

/// Reads the certificate, key, client CA and CRL files again and, when every one is good,
/// serves them from the next handshake on, on every listener in `listeners`. Nothing changes on
/// an error (which names the file and the reason); open connections are never touched.
pub fn reload(cert: &CertReloader, listeners: &[&LiveConfig]) -> Result<(), Error> {
    // Everything is read and checked before anything is installed, so a bad file leaves the
    // server exactly as it was.
    let pair = cert.check().map_err(tls_error)?;
    drop(pair);
    let configs = listeners
        .iter()
        .map(|l| l.rebuild())
        .collect::<Result<Vec<_>, _>>()?;
    cert.reload().map_err(tls_error)?;
    for (l, cfg) in listeners.iter().zip(configs) {
        l.install(cfg);
    }
    Ok(())
}

/// The limits of one listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Time for each step: TLS handshake, request headers, request body.
    pub io_timeout: Duration,
    /// A connection with no request or response in progress for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections one source (IPv6 by `v6_prefix`) may hold.
    pub per_source: usize,
    /// IPv6 prefix length of a source.
    pub v6_prefix: u8,
}

impl ListenerLimits {
    /// Limits with only an I/O timeout: idle after a minute, 256 connections per source, /64.
    pub fn with_io_timeout(io_timeout: Duration) -> Self {
        Self {
            io_timeout,
            idle_timeout: Duration::from_secs(60),
            per_source: 256,
            v6_prefix: 64,
        }
    }
}

/// Open connections per source key; an entry leaves the table with its last connection.
#[derive(Debug, Default)]
struct PerSource(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One open connection counted against its source.
struct SourceSlot {
    table: Arc<PerSource>,
    key: std::net::IpAddr,
}

impl PerSource {
    fn take(self: &Arc<Self>, key: std::net::IpAddr, max: usize) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: self.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Requests (and their response bodies) in progress on one connection, and when the last ended.
#[derive(Debug)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::atomic::AtomicU64,
    epoch: tokio::time::Instant,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: 0.into(),
            idle_since: 0.into(),
            epoch: tokio::time::Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(self.clone())
    }

    /// When the connection became idle, or None while something is in progress.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        use std::sync::atomic::Ordering;
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| self.epoch + Duration::from_millis(self.idle_since.load(Ordering::Acquire)))
    }
}

/// A request or response body in progress.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.0.idle_since.store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection busy until it is sent or dropped.
struct TrackedBody {
    inner: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` over TLS on `listener` (the configuration `tls` holds at each handshake):
/// at most `MAX_CONNECTIONS` connections, `limits.per_source` from one source, each closed when
/// idle. When `drain` is set the listener closes (a new connect is refused), every connection
/// is told to close after the request in progress (HTTP/1.1 `Connection: close`, HTTP/2
/// GOAWAY), and this returns once the last one has; `stop` cuts whatever is still open.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<LiveConfig>,
    router: Router,
    limits: ListenerLimits,
    drain: Drain,
    stop: CancellationToken,
) {
    let mut listener = Acceptor::new(listener, name);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source = Arc::new(PerSource::default());
    let io_timeout = limits.io_timeout;
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            () = drain.wait() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            () = drain.wait() => break,
            c = listener.accept() => c,
        };
        let key = crate::limits::source_key(peer.ip(), limits.v6_prefix);
        let Some(source_slot) = per_source.take(key, limits.per_source) else {
            tracing::debug!(listener = name, source = %key, cap = limits.per_source, "connection refused: this source holds its cap of open connections");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.get());
        let router = router.clone();
        let stop = stop.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _source_slot = source_slot;
            let tls = match tokio::time::timeout(io_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                    return;
                }
            };
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| ClientCert(Arc::new(c.clone().into_owned())));
            let activity = Activity::new();
            let act = activity.clone();
            let req_drain = drain.clone();
            let svc =
                tower::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    let busy = act.begin();
                    if let Some(c) = &client_cert {
                        req.extensions_mut().insert(c.clone());
                    }
                    req.extensions_mut().insert(Peer(peer));
                    // A response that never ends by itself (the revocation stream) ends on it.
                    req.extensions_mut().insert(req_drain.clone());
                    req.extensions_mut().insert(IoTimeout(io_timeout));
                    let fut = router.clone().oneshot(req.map(axum::body::Body::new));
                    async move {
                        let resp = fut.await?;
                        Ok::<_, std::convert::Infallible>(
                            resp.map(|inner| {
                                axum::body::Body::new(TrackedBody { inner, _busy: busy })
                            }),
                        )
                    }
                });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(io_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(100)
                .keep_alive_interval(Some(limits.idle_timeout.min(Duration::from_secs(30))))
                .keep_alive_timeout(io_timeout);
            let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            let mut closing = false;
            let mut draining = false;
            loop {
                let deadline = match activity.idle_since() {
                    // A drain lets the request in progress finish: only `stop` cuts it.
                    _ if draining => tokio::time::Instant::now() + limits.idle_timeout,
                    _ if closing => tokio::time::Instant::now() + io_timeout,
                    Some(since) => since + limits.idle_timeout,
                    None => tokio::time::Instant::now() + limits.idle_timeout,
                };
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        if closing {
                            tracing::debug!(listener = name, %peer, "idle connection did not close in time; dropped");
                            return;
                        }
                        let idle = activity
                            .idle_since()
                            .is_some_and(|since| since + limits.idle_timeout <= tokio::time::Instant::now());
                        if idle {
                            tracing::debug!(listener = name, %peer, after = ?limits.idle_timeout, "closing an idle connection");
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                    () = drain.wait(), if !draining => {
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    // Draining: close the listening socket now, so a balancer's next connect fails at once,
    // then wait for the open connections (each holds a slot).
    drop(listener);
    let open = MAX_CONNECTIONS - slots.available_permits();
    tracing::info!(
        listener = name,
        open,
        "draining: listener closed; waiting for the open connections"
    );
    tokio::select! {
        _ = slots.acquire_many(MAX_CONNECTIONS as u32) => {
            tracing::info!(listener = name, "drained: every connection closed");
        }
        () = stop.cancelled() => {
            let left = MAX_CONNECTIONS - slots.available_permits();
            tracing::warn!(listener = name, cut = left, "drain timeout: closing the connections still open");
        }
    }
}
