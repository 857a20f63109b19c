//! Wiring: turns `serve` flags into one [`State`] and the running listeners (device, proxies',
//! admin, forward-auth, metrics) and background tasks (expiry sweeper, key rotation, LDAP sync,
//! role watcher, backups) over it, and the process's life: SIGHUP reloads the TLS files,
//! SIGTERM/SIGINT drains (listeners closed, open requests finish up to `--drain-timeout`).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use scm_proto::lifecycle::reload::CertReloader;
use scm_proto::lifecycle::{Drain, notify};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin_token::{self, AdminToken};
use crate::challenges::Challenges;
use crate::config::ServeArgs;
use crate::directory::{Directory, LdapConfig};
use crate::error::Error;
use crate::limits::{Lockouts, SourceLimiter};
use crate::master_key::{self, MasterKey};
use crate::secrets::ensure_secret_file;
use crate::sessions::Sessions;
use crate::state::{Settings, Shared, State};
use crate::store::Store;

/// Used challenges remembered (each until its expiry) before logins are told to retry.
const MAX_USED_CHALLENGES: usize = 500_000;
/// Repeated unauthenticated failures of one kind from one source are summarised per window.
const AUDIT_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Users with failure counters; beyond it the counters idle longest are dropped.
const MAX_LOCKOUT_ENTRIES: usize = 100_000;
/// Sources with failure counters, per limiter; beyond it the counters idle longest are dropped.
const MAX_SOURCE_ENTRIES: usize = 200_000;

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// Device API address.
    pub device_addr: SocketAddr,
    /// Proxies' API address.
    pub proxy_addr: SocketAddr,
    /// Admin API address.
    pub admin_addr: SocketAddr,
    /// Metrics address (`--metrics-listen`).
    pub metrics_addr: Option<SocketAddr>,
    /// Forward-auth address (`--forward-auth-listen`; off without it).
    pub forward_auth_addr: Option<SocketAddr>,
    /// The shared state (tests and benches look inside).
    pub state: Shared,
    /// Set when the server begins to drain (SIGTERM/SIGINT in [`Running::wait`], or
    /// [`Running::drain_and_stop`]): the listeners close and the readiness check answers
    /// "draining".
    pub drain: Drain,
    /// What a reload reads again: the certificate and key, and the listeners' configurations.
    tls: Tls,
    drain_timeout: Duration,
    stop: CancellationToken,
    /// The TLS listeners: each ends once drained.
    listeners: JoinSet<()>,
    /// The SIGTERM/SIGINT and SIGHUP handlers, for [`Running::wait`].
    signals: Option<Signals>,
    tasks: JoinSet<()>,
}

/// The stop (SIGTERM/SIGINT) and reload (SIGHUP) handlers; `None` where one could not be
/// installed (logged).
type Signals = (
    Option<scm_proto::shutdown::Shutdown>,
    Option<tokio::signal::unix::Signal>,
);

fn install_signals() -> Signals {
    let stop = scm_proto::shutdown::Shutdown::install()
        .inspect_err(|e| tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers"))
        .ok();
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .inspect_err(|e| tracing::error!(error = %e, "cannot install the SIGHUP handler"))
        .ok();
    (stop, hup)
}

/// The TLS material of the running listeners.
#[derive(Debug)]
struct Tls {
    cert: Arc<CertReloader>,
    /// Every listener's configuration (the device and admin listeners share one).
    configs: Vec<Arc<crate::tls::LiveConfig>>,
}

impl Running {
    /// Stops every listener and task at once (no drain) and waits for them.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.listeners.join_next().await.is_some() {}
        while self.tasks.join_next().await.is_some() {}
        self.state.flush_audit_failures(true).await;
        self.state.store.close().await;
    }

    /// Drains: sets [`Running::drain`] (every listener closes, open connections are asked to
    /// close after their request in progress), waits up to `--drain-timeout` for them, then
    /// cuts what is left and stops everything.
    pub async fn drain_and_stop(mut self) {
        self.drain.begin();
        let _ = notify::stopping("draining: listeners closed, open requests finishing");
        tracing::info!(
            drain_timeout = ?self.drain_timeout,
            "draining: listeners closed; open requests get until --drain-timeout"
        );
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while self.listeners.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                drain_timeout = ?self.drain_timeout,
                "drain timeout: closing the connections still open"
            );
        }
        self.shutdown().await;
    }

    /// Reads the TLS files again (certificate, key, client CA, CRLs) and serves them from the
    /// next handshake on; a bad file is refused (logged with the file and the reason) and the
    /// files in force stay. Open connections are never touched.
    pub fn reload(&self) -> Result<(), Error> {
        let configs: Vec<&crate::tls::LiveConfig> = self.tls.configs.iter().map(|c| &**c).collect();
        crate::tls::reload(&self.tls.cert, &configs)
    }

    /// Runs until SIGINT or SIGTERM (then drains) or a task ends (they end only on shutdown);
    /// SIGHUP reloads the TLS files. The handlers were installed by [`start`], before any
    /// listener was bound, so a signal sent as soon as a port answers is not lost to its
    /// default action (which would kill the process).
    pub async fn wait(mut self) {
        let (mut stop, mut hup) = self.signals.take().unwrap_or((None, None));
        loop {
            tokio::select! {
                _ = self.tasks.join_next() => break,
                _ = self.listeners.join_next() => break,
                Some(()) = async { hup.as_mut()?.recv().await } => self.on_hup(),
                Some(signal) = async { Some(stop.as_mut()?.recv().await) } => {
                    tracing::info!(%signal, "stop signal; draining");
                    self.drain_and_stop().await;
                    return;
                }
            }
        }
        self.shutdown().await;
    }

    fn on_hup(&self) {
        let _ = notify::reloading();
        tracing::info!(
            cert = %self.tls.cert.cert_path().display(),
            key = %self.tls.cert.key_path().display(),
            "SIGHUP: reloading the TLS certificate, key, client CA and CRLs"
        );
        match self.reload() {
            Ok(()) => tracing::info!("reloaded: new handshakes get the new files"),
            Err(e) => tracing::error!(
                error = %e,
                "reload refused: the certificate, key and CAs in force stay"
            ),
        }
        let _ = notify::ready("serving");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the server described by `args`; returns once every listener is bound.
pub async fn start(args: &ServeArgs) -> Result<Running, Error> {
    if args.session_idle_timeout.is_zero() || args.session_max_lifetime.is_zero() {
        return Err(Error::Invalid("session timeouts must be above zero".into()));
    }
    crate::sites::check_default(&args.default_site)?;
    crate::fsmode::create_private_dir(&args.data_dir)?;
    let (master_path, token_path) = crate::data_dir::secret_paths(
        &args.data_dir,
        args.master_key_file.as_ref(),
        args.admin_token_file.as_ref(),
    );
    if ensure_secret_file(&master_path, master_key::new_master_key_text)? {
        tracing::warn!(path = %master_path.display(), "created a new master key (mode 0600); back it up");
    }
    if ensure_secret_file(&token_path, admin_token::new_admin_token_text)? {
        tracing::warn!(path = %token_path.display(), "created a new admin token (mode 0600)");
    }
    let master = MasterKey::load(&master_path)?;
    let admin_token = AdminToken::load(&token_path)?;

    let cert = crate::tls::load_cert_reloader(&args.tls_cert, &args.tls_key)?;
    let device_tls = crate::tls::LiveConfig::plain(cert.clone())?;
    let proxy_tls = crate::tls::LiveConfig::mtls(cert.clone(), &args.client_ca, &args.client_crl)?;
    let proxy_allow = Arc::new(crate::proxyauth::AllowList::parse(&args.proxy_allow)?);
    if proxy_allow.is_empty() {
        tracing::warn!(
            "no --proxy-allow: every certificate signed by --client-ca may use the proxies' API; \
             name the proxies with --proxy-allow"
        );
    }

    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| Store::sqlite_url(&args.data_dir));
    let mut store = Store::open(&url).await?;
    if args.require_sync_commit {
        store.require_sync_commit(args.sync_commit_timeout)?;
    }
    crate::sites::ensure_default(&store, &args.default_site).await?;
    if let Some(k) = store.any_key().await? {
        master.open(&k.key_id, &k.sealed_key).map_err(|_| {
            Error::Crypto(format!(
                "{} does not open the keys stored in this database: wrong master key file?",
                master_path.display()
            ))
        })?;
    }
    let ldap = LdapConfig::from_args(&args.ldap)?;
    let directory = Directory::new(store.clone(), ldap, args.default_site.clone())?
        .with_hash_queue(args.max_hash_queue);
    let resources = RwLock::new(Arc::new(store.resources().await?));
    let assertions = Arc::new(crate::assertion::Assertions::new(
        crate::assertion::Settings::from_args(&args.assertion)?,
        master.clone(),
    ));
    assertions.refresh(&store).await?;

    let state: Shared = Arc::new(State {
        master,
        directory,
        sessions: Sessions::new(
            args.session_idle_timeout,
            args.session_max_lifetime,
            args.max_sessions,
        ),
        challenges: Challenges::new(args.challenge_ttl, MAX_USED_CHALLENGES),
        lockouts: Lockouts::new(
            args.lockout_threshold,
            args.lockout_window,
            args.lockout_duration,
            MAX_LOCKOUT_ENTRIES,
        ),
        limiter: SourceLimiter::new(
            args.source_failure_limit,
            args.source_window,
            args.source_prefix_v6,
            MAX_SOURCE_ENTRIES,
        ),
        challenge_limiter: (args.challenge_rate_limit > 0).then(|| {
            SourceLimiter::new(
                args.challenge_rate_limit,
                Duration::from_secs(60),
                args.source_prefix_v6,
                MAX_SOURCE_ENTRIES,
            )
        }),
        admin_limiter: SourceLimiter::new(
            args.source_failure_limit,
            args.source_window,
            args.source_prefix_v6,
            MAX_SOURCE_ENTRIES,
        ),
        audit_throttle: crate::audit_throttle::AuditThrottle::new(
            AUDIT_FAILURE_WINDOW,
            MAX_SOURCE_ENTRIES,
        ),
        source_prefix_v6: args.source_prefix_v6,
        admin_token,
        settings: Settings {
            data_dir: args.data_dir.clone(),
            require_activation_code: args.require_activation_code,
            default_site: args.default_site.clone(),
            heartbeat: args.heartbeat_interval,
            max_package_bytes: args.max_package_bytes,
        },
        resources,
        store,
        ha: Arc::new(crate::ha::HaStatus::default()),
        backup_stats: Arc::new(crate::backup::BackupStats::default()),
        assertions,
        metrics: crate::timings::Metrics::default(),
    });
    crate::fsmode::create_private_dir(&crate::packages::dir(&state.settings.data_dir))?;
    crate::data_dir::warn_loose_paths(
        &args.data_dir,
        &crate::data_dir::backup_dir(&args.data_dir, args.backup_dir.as_ref()),
        &token_path,
    );

    let signals = install_signals();
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("listening on {addr}"), e))
    };
    let device_l = bind(args.listen).await?;
    let proxy_l = bind(args.proxy_listen).await?;
    let admin_l = bind(args.admin_listen).await?;
    let local = |l: &TcpListener| {
        l.local_addr()
            .map_err(|e| Error::io("reading a listener's address", e))
    };
    let (device_addr, proxy_addr, admin_addr) =
        (local(&device_l)?, local(&proxy_l)?, local(&admin_l)?);
    let metrics_l = match args.metrics_listen {
        Some(a) => Some(crate::metrics::bind_metrics(a).await?),
        None => None,
    };
    let metrics_addr = metrics_l.as_ref().map(local).transpose()?;

    let limits = crate::tls::ListenerLimits {
        io_timeout: args.io_timeout,
        idle_timeout: args.connection_idle_timeout,
        per_source: args.max_connections_per_source as usize,
        v6_prefix: args.source_prefix_v6,
    };
    let stop = CancellationToken::new();
    // The process's drain flag: SIGTERM sets it (Running::wait), the listeners close on it, and
    // the readiness check reads it (Running::drain).
    let drain = Drain::new();
    let mut listeners = JoinSet::new();
    let mut tasks = JoinSet::new();
    listeners.spawn(crate::tls::serve(
        "device",
        device_l,
        device_tls.clone(),
        crate::api::device::router(state.clone()),
        limits,
        drain.clone(),
        stop.clone(),
    ));
    listeners.spawn(crate::tls::serve(
        "proxy",
        proxy_l,
        proxy_tls.clone(),
        crate::api::proxy::router(state.clone(), proxy_allow),
        limits,
        drain.clone(),
        stop.clone(),
    ));
    listeners.spawn(crate::tls::serve(
        "admin",
        admin_l,
        device_tls.clone(),
        crate::api::admin::router(state.clone()),
        limits,
        drain.clone(),
        stop.clone(),
    ));
    let mut configs = vec![device_tls, proxy_tls];
    // Forward-auth (nginx auth_request): off unless --forward-auth-listen, then on a mutual-TLS
    // listener of its own, rate-limited, never counted as session activity.
    let forward_auth = crate::api::forward_auth::bind(args, state.clone(), &cert).await?;
    let forward_auth_addr = forward_auth.as_ref().map(|f| f.addr);
    if let Some(f) = forward_auth {
        configs.push(f.tls.clone());
        listeners.spawn(f.serve(limits, drain.clone(), stop.clone()));
    }
    tasks.spawn(sweeper(state.clone(), stop.clone()));
    tasks.spawn(crate::assertion::rotator(
        state.assertions.clone(),
        state.store.clone(),
        stop.clone(),
    ));
    if let Some(interval) = state.directory.ldap().map(|l| l.sync_interval) {
        tasks.spawn(crate::ldap_sync::ldap_syncer(
            state.clone(),
            interval,
            stop.clone(),
        ));
    }
    // The first look is synchronous so that metrics are right from the start.
    match crate::ha::observe(&state.store).await {
        Ok(o) => state.ha.record(&o),
        Err(e) => tracing::warn!(error = %e, "database role check failed"),
    }
    tasks.spawn(crate::ha::watcher(
        state.store.clone(),
        state.ha.clone(),
        args.role_check_interval.max(Duration::from_millis(100)),
        args.replication_lag_warn,
        stop.clone(),
    ));
    if !args.backup_interval.is_zero() {
        let sched = crate::backup::Schedule {
            dir: crate::data_dir::backup_dir(&args.data_dir, args.backup_dir.as_ref()),
            interval: args.backup_interval,
            keep: args.backup_keep,
        };
        tracing::info!(dir = %sched.dir.display(), every = ?sched.interval, keep = sched.keep, "scheduled backups");
        tasks.spawn(crate::backup::scheduler(
            state.store.clone(),
            state.master.clone(),
            args.data_dir.clone(),
            sched,
            state.backup_stats.clone(),
            stop.clone(),
        ));
    } else {
        tracing::warn!("scheduled backups are off (--backup-interval 0)");
    }
    if let Some(l) = metrics_l {
        let mut listeners = vec![
            ("device", device_addr),
            ("proxy", proxy_addr),
            ("admin", admin_addr),
        ];
        listeners.extend(forward_auth_addr.map(|a| ("forward_auth", a)));
        tasks.spawn(crate::metrics::serve_ops(
            l,
            state.clone(),
            listeners,
            drain.clone(),
            stop.clone(),
        ));
    }
    tracing::info!(
        metrics = ?metrics_addr,
        device = %device_addr, proxy = %proxy_addr, admin = %admin_addr,
        database = ?state.store.backend(), "scm Security server listening"
    );
    Ok(Running {
        device_addr,
        proxy_addr,
        admin_addr,
        metrics_addr,
        forward_auth_addr,
        state,
        drain,
        tls: Tls { cert, configs },
        drain_timeout: args.drain_timeout,
        stop,
        listeners,
        signals: Some(signals),
        tasks,
    })
}

/// Ends expired sessions (telling the proxies) and forgets stale counters.
async fn sweeper(state: Shared, stop: CancellationToken) {
    let period = (state.sessions.idle_timeout() / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for s in state.sessions.sweep() {
            tracing::info!(session = %s.tag, user = %s.user, "session expired");
        }
        state.challenges.sweep();
        state.flush_audit_failures(false).await;
        state.lockouts.sweep();
        state.limiter.sweep();
        state.admin_limiter.sweep();
        if let Some(l) = &state.challenge_limiter {
            l.sweep();
        }
    }
}
