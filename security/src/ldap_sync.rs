//! LDAP sync as the server runs it: now and then every `--ldap-sync-interval`, or on the admin
//! API's request; users who left the directory lose their sessions, and each sync is audited.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::directory::SyncReport;
use crate::error::Error;
use crate::state::{Shared, State};

/// Syncs LDAP users and groups now and then every `interval`.
pub(crate) async fn ldap_syncer(state: Shared, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = run_ldap_sync(&state, "system").await {
            tracing::warn!(error = %e, "LDAP sync failed; keeping the previous users and groups");
        }
    }
}

/// One LDAP sync, ending the sessions of users who left the directory.
pub(crate) async fn run_ldap_sync(state: &State, actor: &str) -> Result<SyncReport, Error> {
    let report = state.directory.sync().await?;
    for name in &report.removed {
        state
            .sessions
            .remove_where(|s| &s.user == name, "user_removed");
    }
    tracing::info!(
        users = report.users,
        groups = report.groups,
        removed = report.removed.len(),
        "LDAP sync done"
    );
    state
        .audit(
            "ldap_sync",
            actor,
            "ldap",
            "",
            &format!(
                "users={} groups={} removed={:?} skipped={:?}",
                report.users, report.groups, report.removed, report.skipped
            ),
        )
        .await;
    Ok(report)
}
