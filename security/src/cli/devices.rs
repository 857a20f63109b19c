//! `admin devices ...`, `admin keys ...` and `admin sessions ...`: enrolled devices, their shared
//! keys, and live sessions.

use reqwest::Method;

use super::client::{CliError, Client, Output, enc};
use super::table::{keys_table, revoke_text, table, time};
use crate::admin_types::{RevokeResult, SessionInfo};
use crate::config::{DevicesCmd, KeysCmd, SessionsCmd};
use crate::store::KeyRow;

/// Runs `admin devices ...`.
pub(super) async fn devices(c: &Client, cmd: &DevicesCmd) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    Ok(match cmd {
        DevicesCmd::List { user } => {
            let path = user
                .as_ref()
                .map_or("/keys".into(), |u| format!("/keys?user={}", enc(u)));
            let (v, k): (_, Vec<KeyRow>) = c.call(Method::GET, &path, none).await?;
            (v, keys_table(&k))
        }
        DevicesCmd::Revoke { device_id } => {
            let (v, r): (_, RevokeResult) = c
                .call(
                    Method::POST,
                    &format!("/devices/{}/revoke", enc(device_id)),
                    none,
                )
                .await?;
            (v, revoke_text(&r))
        }
    })
}

/// Runs `admin keys ...`.
pub(super) async fn keys(c: &Client, cmd: &KeysCmd) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    Ok(match cmd {
        KeysCmd::List { user } => {
            let path = user
                .as_ref()
                .map_or("/keys".into(), |u| format!("/keys?user={}", enc(u)));
            let (v, k): (_, Vec<KeyRow>) = c.call(Method::GET, &path, none).await?;
            (v, keys_table(&k))
        }
        KeysCmd::Revoke { key_id } => {
            let (v, r): (_, RevokeResult) = c
                .call(Method::POST, &format!("/keys/{}/revoke", enc(key_id)), none)
                .await?;
            (v, revoke_text(&r))
        }
    })
}

/// Runs `admin sessions ...`.
pub(super) async fn sessions(c: &Client, cmd: &SessionsCmd) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    Ok(match cmd {
        SessionsCmd::List { user } => {
            let path = user
                .as_ref()
                .map_or("/sessions".into(), |u| format!("/sessions?user={}", enc(u)));
            let (v, s): (_, Vec<SessionInfo>) = c.call(Method::GET, &path, none).await?;
            let rows = s
                .iter()
                .map(|s| {
                    vec![
                        s.tag.clone(),
                        s.user.clone(),
                        s.site.clone(),
                        s.device_id.clone(),
                        format!("{} {}", s.app_id, s.app_version),
                        time(s.last_seen_at as i64),
                        s.absolute_expires_at.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            (
                v,
                table(
                    &[
                        "tag",
                        "user",
                        "site",
                        "device",
                        "app",
                        "last seen",
                        "expires at",
                    ],
                    &rows,
                ),
            )
        }
        SessionsCmd::Revoke { tag } => {
            let (v, r): (_, RevokeResult) = c
                .call(
                    Method::POST,
                    &format!("/sessions/{}/revoke", enc(tag)),
                    none,
                )
                .await?;
            (v, revoke_text(&r))
        }
        SessionsCmd::RevokeUser { user } => {
            let (v, r): (_, RevokeResult) = c
                .call(
                    Method::POST,
                    &format!("/users/{}/sessions/revoke", enc(user)),
                    none,
                )
                .await?;
            (v, revoke_text(&r))
        }
    })
}
