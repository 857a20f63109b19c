//! The proxy's control plane: the resource and app catalog, the revalidation of sessions with
//! open connections, and the revocation stream from the Security servers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use scm_proto::api::ProxyEvent;
use scm_proto::crypto::{SessionId, SessionTag};
use scm_proto::preamble::Preamble;

use super::policy::Catalog;
use super::security_client::{LineBuffer, RevocationStream, Validation};
use super::server::Proxy;

/// Sessions revalidated at once after a revocation stream reopens.
const REVALIDATE_CONCURRENCY: usize = 16;

impl Proxy {
    pub(super) fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) async fn refresh_catalog(&self) -> bool {
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
    pub(super) async fn catalog_for(&self, p: &Preamble) -> Arc<Catalog> {
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
    pub(super) async fn revalidate_loop(self: Arc<Self>) {
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
    pub(super) fn reconcile_after_reopen(self: &Arc<Self>) {
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

    pub(super) async fn catalog_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.args.catalog_refresh).await;
            self.refresh_catalog().await;
        }
    }

    /// Keeps the revocation stream open (moving across Security servers), applying its events.
    pub(super) async fn revocation_loop(self: Arc<Self>) {
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
        let event: ProxyEvent = match super::security_client::parse_event(line) {
            Ok(Some(e)) => e,
            Ok(None) => return,
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
}
