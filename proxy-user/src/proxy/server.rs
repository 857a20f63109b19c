//! The proxy's start-up: TLS (and kTLS detection), the Security client, the listeners, the
//! control-plane tasks ([`super::control`]), the accept loop that hands each device
//! connection to [`super::connection`], and the process's life: SIGHUP reloads the device
//! certificate and key in place, SIGTERM/SIGINT drains (the listener closes, open connections
//! get until `--drain-timeout`, then the process exits 0).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use scm_proto::crypto::SessionTag;
use scm_proto::lifecycle::reload::CertReloader;
use scm_proto::lifecycle::{Acceptor, Drain, notify};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::cache::{Connections, SessionCache};
use super::config::{ServeArgs, TlsPath};
use super::http::{BackendClient, backend_client};
use super::ktls::KernelCiphers;
use super::limiter::{MAX_SOURCES, SourceLimiter};
use super::metrics::{Metrics, TlsInfo, serve_ops};
use super::policy::Catalog;
use super::refusals::RefusalSink;
use super::security_client::{SecurityClient, SecurityError};
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
    /// The SIGTERM/SIGINT/SIGHUP handlers could not be installed.
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// `--tls-path ktls` was asked for on a kernel without TLS support.
    #[error(
        "--tls-path ktls: kernel TLS is not usable here: {reason}; load the tls module \
         (modprobe tls) on a kernel built with CONFIG_TLS, or use --tls-path auto or userspace"
    )]
    KtlsUnavailable {
        /// What the start-up probe found.
        reason: &'static str,
    },
}

/// The state shared by every connection of one proxy process.
pub(super) struct Proxy {
    pub(super) args: ServeArgs,
    pub(super) acceptor: TlsAcceptor,
    /// The ciphers the kernel takes when connections are handed to kTLS; `None`: user space.
    pub(super) ktls: Option<KernelCiphers>,
    pub(super) security: SecurityClient,
    pub(super) cache: SessionCache,
    pub(super) conns: Connections,
    pub(super) catalog: RwLock<Arc<Catalog>>,
    pub(super) last_refresh: Mutex<Option<Instant>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) http_client: BackendClient,
    /// Repeated failures per source (single-process mode only).
    pub(super) limiter: Option<SourceLimiter>,
    /// Consecutive revalidations of each session with open connections that no Security server
    /// answered (for --fail-closed-after).
    pub(super) unanswered: Mutex<HashMap<SessionTag, u32>>,
    pub(super) assertions: super::assertion::AssertionCache,
    /// Where refusal decisions go as typed values (a worker's blocklist feed).
    pub(super) refusals: Option<Arc<dyn RefusalSink>>,
    /// Set when the process drains (SIGTERM/SIGINT): the listener is closed, and the readiness
    /// check answers "draining".
    pub(super) drain: Drain,
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

/// Starts the proxy and serves until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    serve_with(args, ServeHooks::default()).await
}

/// [`serve`], with `hooks` told of what the proxy decides.
pub async fn serve_with(args: ServeArgs, hooks: ServeHooks) -> Result<(), ServeError> {
    let (ktls, reason) = match args.tls_path {
        TlsPath::Userspace => (None, "forced by --tls-path userspace"),
        TlsPath::Auto | TlsPath::Ktls => choose_ktls().await,
    };
    if args.tls_path == TlsPath::Ktls && ktls.is_none() {
        return Err(ServeError::KtlsUnavailable { reason });
    }
    let path = if ktls.is_some() { "ktls" } else { "userspace" };
    let ciphers = ktls.map_or_else(|| "none".to_owned(), |c| c.names());
    let metrics = Arc::new(Metrics::new(&TlsInfo {
        path,
        kernel_ciphers: ciphers.clone(),
    }));
    tracing::info!(tls_path = path, reason, kernel_ciphers = %ciphers, "record encryption path chosen");

    // The stop and reload handlers go in before the listener binds, so a signal sent as soon
    // as the port answers is not lost to its default action (which would kill the process).
    let mut signals = Signals::install()?;
    let drain = Drain::new();
    let cert = CertReloader::load(&args.tls_cert, &args.tls_key)?;
    let tls = server_config(cert.clone(), ktls.is_some())?;
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
        let device = listener.local_addr().map_err(|source| ServeError::Bind {
            what: "device listener",
            addr: args.listen,
            source,
        })?;
        tracing::info!(%addr, "ops listener on http://{addr}/ (metrics, ready, live)");
        tokio::spawn(serve_ops(l, metrics.clone(), device, drain.clone()));
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
        drain: drain.clone(),
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
    // Every listener is bound (a worker has no NOTIFY_SOCKET: its supervisor reports instead).
    if let Err(e) =
        scm_proto::lifecycle::notify::ready(&format!("serving devices on {}", proxy.args.listen))
    {
        tracing::warn!(error = %e, "cannot tell systemd the proxy is ready");
    }

    let max = proxy.args.max_connections;
    let limit = Arc::new(tokio::sync::Semaphore::new(max));
    let mut listener = Acceptor::new(listener, "device");
    let signal = loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p,
            s = signals.next(&cert) => break s,
        };
        let Ok(permit) = permit else {
            return Ok(());
        };
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => c,
            s = signals.next(&cert) => break s,
        };
        crate::steer::verified::accepted(peer); // the kernel completed its handshake
        let proxy = proxy.clone();
        tokio::spawn(async move {
            proxy.handle(tcp, peer).await;
            drop(permit);
        });
    };

    // Draining: close the listening socket first, so new connects are refused at once (under a
    // supervisor the kernel drops it from the sockmap with it), then let the open connections
    // finish, each holding one permit.
    drain.begin();
    drop(listener);
    let open = max - limit.available_permits();
    let _ = notify::stopping("draining: listener closed, open connections finishing");
    tracing::info!(
        %signal,
        open,
        drain_timeout = ?proxy.args.drain_timeout,
        "stop signal: draining; the listener is closed and open connections get until --drain-timeout"
    );
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    match tokio::time::timeout(proxy.args.drain_timeout, limit.acquire_many(all)).await {
        Ok(_) => tracing::info!("drained: every connection finished; exiting"),
        Err(_) => tracing::warn!(
            cut = max - limit.available_permits(),
            "drain timeout: closing the connections still open; exiting"
        ),
    }
    Ok(())
}

/// The signals a serving proxy acts on: SIGTERM/SIGINT (stop: drain) and SIGHUP (reload the
/// certificate and key).
struct Signals {
    stop: scm_proto::shutdown::Shutdown,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ServeError> {
        let stop = scm_proto::shutdown::Shutdown::install().map_err(ServeError::Signals)?;
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(ServeError::Signals)?;
        Ok(Self { stop, hup })
    }

    /// Handles every SIGHUP (a reload of `cert`) until a stop signal comes, and returns it.
    /// Cancel-safe: a reload runs to its end within one poll.
    async fn next(&mut self, cert: &CertReloader) -> scm_proto::shutdown::StopSignal {
        loop {
            tokio::select! {
                s = self.stop.recv() => return s,
                _ = self.hup.recv() => reload(cert),
            }
        }
    }
}

/// SIGHUP: reads the certificate and key again; a good pair is presented from the next
/// handshake on (open connections keep theirs), a bad one is refused and the old pair stays.
fn reload(cert: &CertReloader) {
    let _ = notify::reloading();
    tracing::info!(
        cert = %cert.cert_path().display(),
        key = %cert.key_path().display(),
        "SIGHUP: reloading the device certificate and key"
    );
    match cert.reload() {
        Ok(()) => tracing::info!("reloaded: new handshakes get the new certificate"),
        Err(e) => tracing::error!(
            error = %e,
            "reload refused: the certificate and key in force stay"
        ),
    }
    let _ = notify::ready("serving");
}

/// Whether connections go to kTLS, and why (for the start-up log line or error).
async fn choose_ktls() -> (Option<KernelCiphers>, &'static str) {
    if !kernel_supports_ktls().await {
        return (
            None,
            "the kernel refuses the TLS upper-layer protocol (no CONFIG_TLS, or the tls module \
             is not loaded)",
        );
    }
    match KernelCiphers::probe().await {
        Ok(c) if c.any() => (Some(c), "the kernel accepts the TLS upper-layer protocol"),
        Ok(_) => (
            None,
            "the kernel has the TLS upper-layer protocol but takes no TLS 1.3 cipher (crypto \
             modules missing)",
        ),
        Err(_) => (None, "probing the kernel's TLS ciphers failed"),
    }
}
