//! The state every handler and task shares: the database, the master key, the directory, the
//! session, challenge and failure tables, the caches, and the audit helpers over them.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use scm_proto::api::{ProxyEvent, Resource};

use crate::admin_token::AdminToken;
use crate::assertion::Assertions;
use crate::audit_throttle::{AuditThrottle, Verdict};
use crate::backup::BackupStats;
use crate::challenges::Challenges;
use crate::directory::Directory;
use crate::error::Error;
use crate::ha::HaStatus;
use crate::limits::{Lockouts, SourceLimiter};
use crate::master_key::MasterKey;
use crate::sessions::Sessions;
use crate::store::Store;

/// Settings the handlers need, resolved from the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Whether enrollment needs an activation code.
    pub require_activation_code: bool,
    /// Site of new users.
    pub default_site: String,
    /// Revocation stream heartbeat.
    pub heartbeat: Duration,
    /// Largest app package.
    pub max_package_bytes: u64,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct State {
    /// Database.
    pub store: Store,
    /// Master key sealing shared keys.
    pub master: MasterKey,
    /// Users.
    pub directory: Directory,
    /// Live sessions.
    pub sessions: Sessions,
    /// Outstanding challenges.
    pub challenges: Challenges,
    /// Per-user lockouts.
    pub lockouts: Lockouts,
    /// Per-source limits.
    pub limiter: SourceLimiter,
    /// Per-source challenge rate (None: unlimited).
    pub challenge_limiter: Option<SourceLimiter>,
    /// Per-source failures on the admin listener (its own budget: device traffic cannot use it
    /// up, and admin guessing cannot block devices).
    pub admin_limiter: SourceLimiter,
    /// Aggregates repeated unauthenticated failures in the audit log.
    pub audit_throttle: AuditThrottle,
    /// IPv6 prefix length of every per-source key.
    pub source_prefix_v6: u8,
    /// Admin token.
    pub admin_token: AdminToken,
    /// Resolved settings.
    pub settings: Settings,
    /// The resource catalog, cached for validations.
    pub resources: RwLock<Arc<Vec<Resource>>>,
    /// Database role and replication health, as last checked.
    pub ha: Arc<HaStatus>,
    /// The backup scheduler's figures.
    pub backup_stats: Arc<BackupStats>,
    /// Identity assertion signing keys.
    pub assertions: Arc<Assertions>,
    /// The latency histograms the request paths record.
    pub metrics: crate::timings::Metrics,
}

/// Shared state handle.
pub type Shared = Arc<State>;

impl State {
    /// Reloads the cached resource catalog and tells the proxies it changed.
    pub async fn catalog_changed(&self) -> Result<(), Error> {
        let fresh = Arc::new(self.store.resources().await?);
        *self.resources.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.sessions.publish(ProxyEvent::CatalogChanged);
        Ok(())
    }

    /// The cached resource catalog.
    pub fn resources(&self) -> Arc<Vec<Resource>> {
        self.resources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Audits an unauthenticated failure: the first of its kind from a source (IPv6 by prefix)
    /// in a window is written at once, the rest are summarised in one row when the window ends,
    /// so nobody can write a row per bad request.
    pub async fn audit_failure(
        &self,
        kind: &str,
        actor: &str,
        ip: &std::net::IpAddr,
        detail: &str,
    ) {
        let source = crate::limits::source_key(*ip, self.source_prefix_v6);
        if self.audit_throttle.record(kind, source, actor, detail) == Verdict::Write {
            self.audit(kind, actor, actor, &source.to_string(), detail)
                .await;
        }
    }

    /// Writes the summaries of the failure windows that ended (all of them with `all`).
    pub async fn flush_audit_failures(&self, all: bool) {
        let (rows, overflow) = self.audit_throttle.flush(all);
        for r in rows {
            let detail = format!(
                "{} more like this in the window; last: user={} {}",
                r.more, r.last_actor, r.last_detail
            );
            self.audit(&r.kind, "-", &r.last_actor, &r.source, &detail)
                .await;
        }
        if overflow > 0 {
            self.audit(
                "failures_unattributed",
                "-",
                "-",
                "",
                &format!("{overflow} failures from sources beyond the audit table's cap"),
            )
            .await;
        }
    }

    /// Writes an audit entry; a failure is logged, not returned (the action already happened).
    pub async fn audit(&self, kind: &str, actor: &str, subject: &str, source: &str, detail: &str) {
        match self.store.audit(kind, actor, subject, source, detail).await {
            Ok(()) => {}
            // A hot standby serves logins without writing: the entry goes to the log instead.
            Err(Error::ReadOnly(_)) => tracing::warn!(
                kind,
                actor,
                subject,
                source,
                detail,
                "audit entry not stored: the database is a read-only standby"
            ),
            Err(e) => tracing::error!(error = %e, kind, "audit write failed"),
        }
    }
}
