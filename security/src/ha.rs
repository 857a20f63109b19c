//! High availability at run time: the database role watcher (is this instance on a read-only hot
//! standby, was it promoted), PostgreSQL streaming-replication health (standbys connected, lag,
//! the standby's WAL receiver); [`crate::metrics`] exports what it sees.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::error::{DbContext as _, Error};
use crate::store::{Backend, Store};

/// What the watcher last saw; -1 means unknown or not applicable.
#[derive(Debug)]
pub struct HaStatus {
    /// 1 on a read-only standby, 0 on a primary or SQLite, -1 when the database did not answer.
    pub read_only: AtomicI64,
    /// Standbys streaming from this primary.
    pub standbys: AtomicI64,
    /// Of those, synchronous ones.
    pub sync_standbys: AtomicI64,
    /// Largest replay lag of a standby, in bytes of WAL.
    pub max_lag_bytes: AtomicI64,
    /// On a standby: 1 if its WAL receiver is streaming from a primary.
    pub receiver_streaming: AtomicI64,
    /// On a standby: seconds since the last replayed transaction's commit on the primary.
    pub replay_delay_secs: AtomicI64,
    /// Failed role checks.
    pub check_failures: AtomicI64,
}

impl Default for HaStatus {
    fn default() -> Self {
        let u = || AtomicI64::new(-1);
        Self {
            read_only: u(),
            standbys: u(),
            sync_standbys: u(),
            max_lag_bytes: u(),
            receiver_streaming: u(),
            replay_delay_secs: u(),
            check_failures: AtomicI64::new(0),
        }
    }
}

/// One look at the database's role and replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observation {
    /// Read-only hot standby.
    pub read_only: bool,
    /// Streaming standbys (primary only, else -1).
    pub standbys: i64,
    /// Synchronous standbys (primary only, else -1).
    pub sync_standbys: i64,
    /// Largest replay lag in bytes (primary only, else -1).
    pub max_lag_bytes: i64,
    /// WAL receiver streaming (standby only, else -1).
    pub receiver_streaming: i64,
    /// Seconds since the last replayed commit (standby only, else -1).
    pub replay_delay_secs: i64,
}

/// Looks at the database once.
pub(crate) async fn observe(store: &Store) -> Result<Observation, Error> {
    let mut o = Observation {
        read_only: false,
        standbys: -1,
        sync_standbys: -1,
        max_lag_bytes: -1,
        receiver_streaming: -1,
        replay_delay_secs: -1,
    };
    if store.backend() != Backend::Postgres {
        return Ok(o);
    }
    o.read_only = store.in_recovery().await?;
    if o.read_only {
        let r = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM pg_stat_wal_receiver WHERE status = 'streaming') AS s, \
             COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::BIGINT, -1) AS d",
        )
        .fetch_one(store.pool())
        .await
        .db("reading the standby's replication status")?;
        o.receiver_streaming = r.try_get("s").db("reading pg_stat_wal_receiver")?;
        o.replay_delay_secs = r.try_get("d").db("reading the replay delay")?;
    } else {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n, \
             COALESCE(SUM(CASE WHEN sync_state IN ('sync', 'quorum') THEN 1 ELSE 0 END), 0)::BIGINT AS s, \
             COALESCE(MAX(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)), 0)::BIGINT AS lag \
             FROM pg_stat_replication",
        )
        .fetch_one(store.pool())
        .await
        .db("reading pg_stat_replication")?;
        o.standbys = r.try_get("n").db("reading pg_stat_replication")?;
        o.sync_standbys = r.try_get("s").db("reading pg_stat_replication")?;
        o.max_lag_bytes = r.try_get("lag").db("reading pg_stat_replication")?;
    }
    Ok(o)
}

impl HaStatus {
    /// Records one whole observation (every gauge, not only the role).
    pub(crate) fn record(&self, o: &Observation) {
        self.read_only
            .store(i64::from(o.read_only), Ordering::Relaxed);
        self.standbys.store(o.standbys, Ordering::Relaxed);
        self.sync_standbys.store(o.sync_standbys, Ordering::Relaxed);
        self.max_lag_bytes.store(o.max_lag_bytes, Ordering::Relaxed);
        self.receiver_streaming
            .store(o.receiver_streaming, Ordering::Relaxed);
        self.replay_delay_secs
            .store(o.replay_delay_secs, Ordering::Relaxed);
    }
}

/// Re-checks the database every `period`, recording what it sees and logging every change of
/// role (promotion) and of replication health (a standby gone, lagging, or back).
pub(crate) async fn watcher(
    store: Store,
    status: Arc<HaStatus>,
    period: Duration,
    lag_warn_bytes: i64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Observation> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let o = match observe(&store).await {
            Ok(o) => o,
            Err(e) => {
                status.read_only.store(-1, Ordering::Relaxed);
                status.check_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "database role check failed");
                continue;
            }
        };
        status.record(&o);
        let Some(prev) = last.replace(o) else {
            continue;
        };
        if prev.read_only && !o.read_only {
            tracing::warn!(
                "the database was promoted to primary: taking enrollments and admin changes"
            );
        } else if !prev.read_only && o.read_only {
            tracing::warn!("the database became a read-only standby: refusing writes");
        }
        if prev.standbys > 0 && o.standbys == 0 {
            tracing::error!(
                "no standby is streaming from this primary any more: live sync is down"
            );
        } else if prev.standbys == 0 && o.standbys > 0 {
            tracing::info!(standbys = o.standbys, "a standby is streaming again");
        }
        if o.max_lag_bytes > lag_warn_bytes && prev.max_lag_bytes <= lag_warn_bytes {
            tracing::warn!(lag_bytes = o.max_lag_bytes, "a standby lags behind");
        }
        if prev.receiver_streaming == 1 && o.receiver_streaming == 0 {
            tracing::error!("this standby lost its primary: its data is no longer kept in sync");
        } else if prev.receiver_streaming == 0 && o.receiver_streaming == 1 {
            tracing::info!("this standby streams from its primary again");
        }
    }
}
