//! The Security server's metrics (prometheus-client, every name prefixed `scm_security_`) and
//! its ops listener (`--metrics-listen`, plain HTTP): `/metrics`, `/ready` (the store answers,
//! every listener accepts, not draining), `/live`. The database role and replication health
//! (as `ha.rs` sees it), the backup scheduler's figures, the live sessions, and how long logins
//! and validations take.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use scm_proto::lifecycle::Drain;
use scm_proto::ops::Ops;
use scm_proto::ops::prometheus_client::metrics::{counter::Counter, gauge::Gauge, info::Info};
use scm_proto::ops::prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::state::Shared;

fn gauge(r: &mut Registry, name: &str, help: &str, v: &AtomicI64) {
    let g = Gauge::<i64>::default();
    g.set(v.load(Ordering::Relaxed));
    r.register(name, help, g);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    r.register(name, help, c);
}

/// Renders every metric in the OpenMetrics text format.
pub fn render(st: &Shared) -> String {
    render_with(st, &st.backup_stats)
}

/// [`render`] with the backup figures of `backup` (a scheduler run outside the server's).
pub fn render_with(st: &crate::state::State, backup: &crate::backup::BackupStats) -> String {
    let mut root = scm_proto::ops::registry(
        "scm_security",
        env!("CARGO_PKG_VERSION"),
        option_env!("SCM_GIT_REV"),
    );
    let r = root.sub_registry_with_prefix("scm_security");
    r.register(
        "config",
        "What this instance serves: its default site and its database kind.",
        Info::new(vec![
            ("default_site", st.settings.default_site.clone()),
            (
                "database",
                format!("{:?}", st.store.backend()).to_lowercase(),
            ),
        ]),
    );
    let (b, ha) = (backup, &st.ha);
    gauge(
        r,
        "backup_last_success_timestamp_seconds",
        "Unix time of the last successful scheduled backup (0: none yet).",
        &b.last_success,
    );
    gauge(
        r,
        "backup_last_failure_timestamp_seconds",
        "Unix time of the last failed scheduled backup (0: none).",
        &b.last_failure,
    );
    let d = Gauge::<f64, AtomicU64>::default();
    d.set(b.last_duration_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    r.register(
        "backup_last_duration_seconds",
        "Duration of the last scheduled backup run.",
        d,
    );
    counter(
        r,
        "backup_successes",
        "Scheduled backups that succeeded.",
        b.successes.load(Ordering::Relaxed),
    );
    counter(
        r,
        "backup_failures",
        "Scheduled backups that failed.",
        b.failures.load(Ordering::Relaxed),
    );
    gauge(
        r,
        "database_read_only",
        "1 on a read-only hot standby, 0 on a primary or SQLite, -1 if the database did not answer.",
        &ha.read_only,
    );
    counter(
        r,
        "database_role_check_failures",
        "Database role checks that failed.",
        ha.check_failures.load(Ordering::Relaxed).max(0) as u64,
    );
    gauge(
        r,
        "replication_standbys",
        "Standbys streaming from this primary (-1: not a PostgreSQL primary).",
        &ha.standbys,
    );
    gauge(
        r,
        "replication_sync_standbys",
        "Synchronous standbys streaming from this primary (-1: not a PostgreSQL primary).",
        &ha.sync_standbys,
    );
    gauge(
        r,
        "replication_max_lag_bytes",
        "Largest replay lag of a standby in WAL bytes (-1: not a PostgreSQL primary).",
        &ha.max_lag_bytes,
    );
    gauge(
        r,
        "standby_receiver_streaming",
        "On a standby, 1 while its WAL receiver streams from the primary (-1: not a standby).",
        &ha.receiver_streaming,
    );
    gauge(
        r,
        "standby_replay_delay_seconds",
        "On a standby, seconds since the last replayed commit (-1: not a standby or none yet).",
        &ha.replay_delay_secs,
    );
    gauge(
        r,
        "sessions",
        "Live sessions held in memory by this instance.",
        &AtomicI64::new(st.sessions.len() as i64),
    );
    r.register_with_unit(
        "login",
        "Time a device login took, from the request to the answer (refusals included).",
        Unit::Seconds,
        st.metrics.login_seconds.clone(),
    );
    r.register_with_unit(
        "validation",
        "Time a proxy's session validation took, from the request to the answer.",
        Unit::Seconds,
        st.metrics.validation_seconds.clone(),
    );
    scm_proto::ops::encode(&root)
}

/// The listeners whose readiness `/ready` checks, by name.
pub type Listeners = Vec<(&'static str, SocketAddr)>;

/// Serves the ops endpoints on `listener` until `stop`.
pub async fn serve_ops(
    listener: TcpListener,
    state: Shared,
    listeners: Listeners,
    drain: Drain,
    stop: CancellationToken,
) {
    let st = state.clone();
    let mut ops = Ops::with_metrics(drain, move || {
        let st = st.clone();
        Box::pin(async move { render(&st) })
    })
    .check("store", move || {
        let st = state.clone();
        async move {
            st.store
                .count("users")
                .await
                .map(|_| format!("the {:?} database answered a query", st.store.backend()))
                .map_err(|e| format!("the database did not answer a query: {e}"))
        }
    });
    for (name, addr) in listeners {
        ops = ops.check(format!("listener:{name}"), move || {
            scm_proto::ops::listener_bound(addr)
        });
    }
    tokio::select! {
        () = ops.serve(listener) => {}
        () = stop.cancelled() => {}
    }
}

/// Binds the ops listener.
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        Error::io(
            format!("listening on {addr} (ops: metrics, ready, live)"),
            e,
        )
    })
}
