//! The proxy's start-up: TLS (and kTLS detection), the Security client, the listeners, the
//! control-plane tasks ([`super::control`]) and the accept loop that hands each device
//! connection to [`super::connection`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use scm_proto::crypto::SessionTag;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::cache::{Connections, SessionCache};
use super::config::{ServeArgs, TlsPath};
use super::http::{BackendClient, backend_client};
use super::ktls::KernelCiphers;
use super::limiter::{MAX_SOURCES, SourceLimiter};
use super::metrics::{Metrics, serve_metrics};
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
    let metrics = Arc::new(Metrics::new());
    let (ktls, reason) = match args.tls_path {
        TlsPath::Userspace => (None, "forced by --tls-path userspace"),
        TlsPath::Auto | TlsPath::Ktls => choose_ktls().await,
    };
    if args.tls_path == TlsPath::Ktls && ktls.is_none() {
        return Err(ServeError::KtlsUnavailable { reason });
    }
    let path = if ktls.is_some() { "ktls" } else { "userspace" };
    metrics.tls_path.with_label_values(&[path]).set(1);
    let ciphers = ktls.map_or_else(|| "none".to_owned(), |c| c.names());
    tracing::info!(tls_path = path, reason, kernel_ciphers = %ciphers, "record encryption path chosen");

    let tls = server_config(&args.tls_cert, &args.tls_key, ktls.is_some())?;
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
    // Every listener is bound (a worker has no NOTIFY_SOCKET: its supervisor reports instead).
    if let Err(e) =
        scm_proto::lifecycle::notify::ready(&format!("serving devices on {}", proxy.args.listen))
    {
        tracing::warn!(error = %e, "cannot tell systemd the proxy is ready");
    }

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

async fn shutdown_signal() {
    match scm_proto::shutdown::shutdown_signal().await {
        Ok(signal) => tracing::info!(%signal, "stop signal"),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers");
            std::future::pending().await
        }
    }
}
