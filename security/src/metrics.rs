//! The Prometheus text metrics endpoint (`--metrics-listen`, plain HTTP `GET /metrics`): the
//! database role and replication health (as `ha.rs` sees it), the backup scheduler's figures
//! and the live sessions.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backup::BackupStats;
use crate::error::Error;
use crate::ha::HaStatus;
use crate::state::Shared;

/// Renders every metric in Prometheus text format.
pub fn render(ha: &HaStatus, backup: &BackupStats, sessions: usize) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    let g = |a: &AtomicI64| a.load(Ordering::Relaxed).to_string();
    let u = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
    metric(
        "scm_backup_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful scheduled backup (0: none yet).",
        g(&backup.last_success),
    );
    metric(
        "scm_backup_last_failure_timestamp_seconds",
        "gauge",
        "Unix time of the last failed scheduled backup (0: none).",
        g(&backup.last_failure),
    );
    metric(
        "scm_backup_last_duration_seconds",
        "gauge",
        "Duration of the last scheduled backup run.",
        format!(
            "{:.3}",
            backup.last_duration_ms.load(Ordering::Relaxed) as f64 / 1000.0
        ),
    );
    metric(
        "scm_backup_success_total",
        "counter",
        "Scheduled backups that succeeded.",
        u(&backup.successes),
    );
    metric(
        "scm_backup_failures_total",
        "counter",
        "Scheduled backups that failed.",
        u(&backup.failures),
    );
    metric(
        "scm_database_read_only",
        "gauge",
        "1 on a read-only hot standby, 0 on a primary or SQLite, -1 if the database did not answer.",
        g(&ha.read_only),
    );
    metric(
        "scm_database_role_check_failures_total",
        "counter",
        "Database role checks that failed.",
        g(&ha.check_failures),
    );
    metric(
        "scm_replication_standbys",
        "gauge",
        "Standbys streaming from this primary (-1: not a PostgreSQL primary).",
        g(&ha.standbys),
    );
    metric(
        "scm_replication_sync_standbys",
        "gauge",
        "Synchronous standbys streaming from this primary (-1: not a PostgreSQL primary).",
        g(&ha.sync_standbys),
    );
    metric(
        "scm_replication_max_lag_bytes",
        "gauge",
        "Largest replay lag of a standby in WAL bytes (-1: not a PostgreSQL primary).",
        g(&ha.max_lag_bytes),
    );
    metric(
        "scm_standby_receiver_streaming",
        "gauge",
        "On a standby, 1 while its WAL receiver streams from the primary (-1: not a standby).",
        g(&ha.receiver_streaming),
    );
    metric(
        "scm_standby_replay_delay_seconds",
        "gauge",
        "On a standby, seconds since the last replayed commit (-1: not a standby or none yet).",
        g(&ha.replay_delay_secs),
    );
    metric(
        "scm_sessions",
        "gauge",
        "Live sessions held in memory by this instance.",
        sessions.to_string(),
    );
    out
}

/// Serves `GET /metrics` (plain HTTP, Prometheus text) on `listener` until `stop`.
pub async fn serve_metrics(listener: TcpListener, state: Shared, stop: CancellationToken) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let st = state.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render(&st.ha, &st.backup_stats, st.sessions.len()),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "metrics listener failed");
    }
}

/// Binds the metrics listener.
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("listening on {addr} (metrics)"), e))
}
