//! `admin users ...`: local users, their sites, groups and passwords, lockouts and activation codes.

use reqwest::Method;
use serde_json::Value;

use super::client::{CliError, Client, Output, enc, read_password};
use super::table::{revoke_text, users_table};
use crate::admin_types::{
    ActivationCode, ActivationCodeRequest, NewUser, RevokeResult, UpdateUser,
};
use crate::config::UsersCmd;
use crate::store::UserRow;

/// Runs `admin users ...`.
pub(super) async fn users(c: &Client, cmd: &UsersCmd) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    Ok(match cmd {
        UsersCmd::List => {
            let (v, u): (_, Vec<UserRow>) = c.call(Method::GET, "/users", none).await?;
            (v, users_table(&u))
        }
        UsersCmd::Add {
            name,
            groups,
            site,
            password_stdin: _,
        } => {
            let body = NewUser {
                name: name.clone(),
                password: read_password()?,
                groups: groups.clone(),
                site: site.clone(),
            };
            let (v, u): (_, UserRow) = c.call(Method::POST, "/users", Some(&body)).await?;
            (v, users_table(&[u]))
        }
        UsersCmd::Update {
            name,
            groups,
            site,
            password_stdin,
        } => {
            let body = UpdateUser {
                groups: groups.clone(),
                site: site.clone(),
                password: if *password_stdin {
                    Some(read_password()?)
                } else {
                    None
                },
            };
            let (v, u): (_, UserRow) = c
                .call(Method::PATCH, &format!("/users/{}", enc(name)), Some(&body))
                .await?;
            (v, users_table(&[u]))
        }
        UsersCmd::Delete { name } => {
            let (v, r): (_, RevokeResult) = c
                .call(Method::DELETE, &format!("/users/{}", enc(name)), none)
                .await?;
            (v, format!("deleted user {name}; {}", revoke_text(&r)))
        }
        UsersCmd::Unlock { name } => {
            c.send(
                Method::POST,
                &format!("/users/{}/unlock", enc(name)),
                None,
                true,
            )
            .await?;
            (Value::Null, format!("unlocked {name}\n"))
        }
        UsersCmd::ActivationCode { name, ttl } => {
            let body = ActivationCodeRequest {
                ttl_secs: ttl.as_secs().max(1),
            };
            let (v, a): (_, ActivationCode) = c
                .call(
                    Method::POST,
                    &format!("/users/{}/activation-codes", enc(name)),
                    Some(&body),
                )
                .await?;
            (
                v,
                format!(
                    "activation code for {}: {} (expires at {})\n",
                    a.user, a.code, a.expires_at
                ),
            )
        }
    })
}
