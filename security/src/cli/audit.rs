//! `admin audit` and `admin ldap sync`: the audit log, and an LDAP sync now.

use reqwest::Method;

use super::client::{CliError, Client, Output};
use super::table::table;
use crate::store::AuditRow;

/// Runs `admin audit`.
pub(super) async fn audit(c: &Client, limit: u32) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    let (v, a): (_, Vec<AuditRow>) = c
        .call(Method::GET, &format!("/audit?limit={limit}"), none)
        .await?;
    let rows = a
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                e.at.to_string(),
                e.kind.clone(),
                e.actor.clone(),
                e.subject.clone(),
                e.source.clone(),
                e.detail.clone(),
            ]
        })
        .collect::<Vec<_>>();
    Ok((
        v,
        table(
            &["id", "at", "kind", "actor", "subject", "source", "detail"],
            &rows,
        ),
    ))
}

/// Runs `admin ldap sync`.
pub(super) async fn ldap_sync(c: &Client) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    let (v, r): (_, crate::directory::SyncReport) =
        c.call(Method::POST, "/ldap/sync", none).await?;
    Ok((
        v,
        format!(
            "synced {} user(s), {} group(s); removed {:?}; skipped {:?}\n",
            r.users, r.groups, r.removed, r.skipped
        ),
    ))
}
