//! `scm-security admin ...`: a client of the admin API printing tables (or `--json`).

use std::io::BufRead as _;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use scm_proto::api::{AppPolicy, AppRelease, ErrorBody, Resource, ResourceMode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::admin_types::{
    ADMIN_PREFIX, ActivationCode, ActivationCodeRequest, AppsListing, NewUser, PolicyUpdate,
    ResourceBody, RevokeResult, SessionInfo, SiteBody, UpdateUser,
};
use crate::config::{
    AdminArgs, AdminCommand, AppsCmd, DevicesCmd, KeysCmd, LdapCmd, ModeArg, ResourcesCmd,
    SessionsCmd, SitesCmd, UsersCmd,
};
use crate::error::Error;
use crate::store::{AuditRow, KeyRow, SiteRow, UserRow};

/// A failure of an admin command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Local setup (files, TLS).
    #[error(transparent)]
    Setup(#[from] Error),
    /// The request did not get an answer.
    #[error("{url}: {source}")]
    Http {
        /// URL asked.
        url: String,
        /// Transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The server refused.
    #[error("server answered {status}: {code}: {message}")]
    Refused {
        /// Status.
        status: StatusCode,
        /// Stable code.
        code: String,
        /// Explanation.
        message: String,
    },
    /// Bad local input.
    #[error("{0}")]
    Input(String),
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(args: &AdminArgs) -> Result<Self, CliError> {
        let tls = crate::tls::client_config(&args.ca, None)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| CliError::Http {
                url: args.url.clone(),
                source: e,
            })?;
        Ok(Self {
            http,
            base: format!("{}{ADMIN_PREFIX}", args.url.trim_end_matches('/')),
            token: crate::admin_token::read_token_file(&args.token_file)?,
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<reqwest::Body>,
        json: bool,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header(
                    reqwest::header::CONTENT_TYPE,
                    if json {
                        "application/json"
                    } else {
                        "application/octet-stream"
                    },
                )
                .body(b);
        }
        let resp = req.send().await.map_err(|e| CliError::Http {
            url: url.clone(),
            source: e,
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CliError::Http { url, source: e })?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.code, b.message),
                Err(_) => (
                    "unknown".into(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ),
            };
            return Err(CliError::Refused {
                status,
                code,
                message,
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| CliError::Input(format!("bad answer: {e}")))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(Value, T), CliError> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(reqwest::Body::from))
            .transpose()
            .map_err(|e| CliError::Input(e.to_string()))?;
        let v = self.send(method, path, body, true).await?;
        let t = serde_json::from_value(v.clone())
            .map_err(|e| CliError::Input(format!("unexpected answer: {e}")))?;
        Ok((v, t))
    }
}

fn read_password() -> Result<String, CliError> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::Input(format!("reading the password from stdin: {e}")))?;
    let pw = line.trim_end_matches(['\r', '\n']).to_owned();
    if pw.is_empty() {
        return Err(CliError::Input("empty password on stdin".into()));
    }
    Ok(pw)
}

/// Formats rows as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let fmt_row = |cells: Vec<String>| {
        let line: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        line.join("  ").trim_end().to_owned()
    };
    let mut out = fmt_row(headers.iter().map(|h| h.to_uppercase()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&fmt_row(r.clone()));
        out.push('\n');
    }
    out
}

fn time(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    let secs_ago = crate::store::unix_now() - t;
    format!("{t} ({secs_ago}s ago)")
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn users_table(v: &[UserRow]) -> String {
    table(
        &["name", "source", "site", "groups"],
        &v.iter()
            .map(|u| {
                vec![
                    u.name.clone(),
                    u.source.clone(),
                    u.site.clone(),
                    u.groups.join(","),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

fn keys_table(v: &[KeyRow]) -> String {
    table(
        &["key id", "user", "device", "app", "created", "revoked"],
        &v.iter()
            .map(|k| {
                vec![
                    k.key_id.clone(),
                    k.user_name.clone(),
                    k.device_id.clone(),
                    k.app_id.clone(),
                    time(k.created_at),
                    k.revoked_at.map_or("no".into(), time),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

fn revoke_text(r: &RevokeResult) -> String {
    format!(
        "ended {} session(s); revoked key(s): {}\n",
        r.sessions,
        if r.keys.is_empty() {
            "none".into()
        } else {
            r.keys.join(", ")
        }
    )
}

fn resource_table(v: &[Resource]) -> String {
    table(
        &["name", "address", "mode", "groups"],
        &v.iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.address.clone(),
                    match r.mode {
                        ResourceMode::Tcp => "tcp".into(),
                        ResourceMode::Http => "http".into(),
                    },
                    r.allowed_groups.join(","),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

fn release_table(v: &[AppRelease]) -> String {
    table(
        &["app", "platform", "version", "size", "sha256"],
        &v.iter()
            .map(|r| {
                vec![
                    r.app_id.clone(),
                    r.platform.clone(),
                    r.version.clone(),
                    r.size.to_string(),
                    r.sha256.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

fn policy_table(v: &[AppPolicy]) -> String {
    table(
        &["app", "min version", "revoked versions"],
        &v.iter()
            .map(|p| {
                vec![
                    p.app_id.clone(),
                    p.min_version.clone().unwrap_or_else(|| "-".into()),
                    p.revoked_versions.join(","),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

/// Runs one admin command; returns what to print.
pub async fn run(args: &AdminArgs) -> Result<String, CliError> {
    let c = Client::new(args)?;
    let none: Option<&()> = None;
    let (json, text): (Value, String) = match &args.command {
        AdminCommand::Users(cmd) => match cmd {
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
        },
        AdminCommand::Devices(cmd) => match cmd {
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
        },
        AdminCommand::Keys(cmd) => match cmd {
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
        },
        AdminCommand::Sessions(cmd) => match cmd {
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
        },
        AdminCommand::Apps(cmd) => match cmd {
            AppsCmd::List => {
                let (v, a): (_, AppsListing) = c.call(Method::GET, "/apps", none).await?;
                (
                    v,
                    format!(
                        "{}\n{}",
                        release_table(&a.releases),
                        policy_table(&a.policies)
                    ),
                )
            }
            AppsCmd::Publish {
                app_id,
                version,
                platform,
                file,
            } => {
                let f = tokio::fs::File::open(file)
                    .await
                    .map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
                let v = c
                    .send(
                        Method::PUT,
                        &format!("/apps/{}/{}/{}", enc(app_id), enc(platform), enc(version)),
                        Some(body),
                        false,
                    )
                    .await?;
                let r: AppRelease = serde_json::from_value(v.clone())
                    .map_err(|e| CliError::Input(format!("unexpected answer: {e}")))?;
                (v, release_table(&[r]))
            }
            AppsCmd::Policy {
                app_id,
                min_version,
                revoke,
                unrevoke,
            } => {
                let clear = min_version.as_deref() == Some("none");
                let body = PolicyUpdate {
                    min_version: min_version.clone().filter(|_| !clear),
                    clear_min_version: clear,
                    revoke: revoke.clone(),
                    unrevoke: unrevoke.clone(),
                };
                let (v, p): (_, AppPolicy) = c
                    .call(
                        Method::PUT,
                        &format!("/apps/{}/policy", enc(app_id)),
                        Some(&body),
                    )
                    .await?;
                (v, policy_table(&[p]))
            }
        },
        AdminCommand::Resources(cmd) => match cmd {
            ResourcesCmd::List => {
                let (v, r): (_, Vec<Resource>) = c.call(Method::GET, "/resources", none).await?;
                (v, resource_table(&r))
            }
            ResourcesCmd::Set {
                name,
                address,
                mode,
                groups,
            } => {
                let body = ResourceBody {
                    address: address.clone(),
                    mode: match mode {
                        ModeArg::Tcp => ResourceMode::Tcp,
                        ModeArg::Http => ResourceMode::Http,
                    },
                    allowed_groups: groups.clone(),
                };
                let (v, r): (_, Resource) = c
                    .call(
                        Method::PUT,
                        &format!("/resources/{}", enc(name)),
                        Some(&body),
                    )
                    .await?;
                (v, resource_table(&[r]))
            }
            ResourcesCmd::Delete { name } => {
                c.send(
                    Method::DELETE,
                    &format!("/resources/{}", enc(name)),
                    None,
                    true,
                )
                .await?;
                (Value::Null, format!("deleted resource {name}\n"))
            }
        },
        AdminCommand::Sites(cmd) => match cmd {
            SitesCmd::List => {
                let (v, s): (_, Vec<SiteRow>) = c.call(Method::GET, "/sites", none).await?;
                let rows = s
                    .iter()
                    .map(|s| vec![s.name.clone(), s.proxy_urls.join(",")])
                    .collect::<Vec<_>>();
                (v, table(&["name", "proxy urls"], &rows))
            }
            SitesCmd::Set { name, proxy_urls } => {
                let body = SiteBody {
                    proxy_urls: proxy_urls.clone(),
                };
                let (v, s): (_, SiteRow) = c
                    .call(Method::PUT, &format!("/sites/{}", enc(name)), Some(&body))
                    .await?;
                (
                    v,
                    table(
                        &["name", "proxy urls"],
                        &[vec![s.name, s.proxy_urls.join(",")]],
                    ),
                )
            }
            SitesCmd::Delete { name } => {
                c.send(Method::DELETE, &format!("/sites/{}", enc(name)), None, true)
                    .await?;
                (Value::Null, format!("deleted site {name}\n"))
            }
        },
        AdminCommand::Audit { limit } => {
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
            (
                v,
                table(
                    &["id", "at", "kind", "actor", "subject", "source", "detail"],
                    &rows,
                ),
            )
        }
        AdminCommand::Ldap(LdapCmd::Sync) => {
            let (v, r): (_, crate::directory::SyncReport) =
                c.call(Method::POST, "/ldap/sync", none).await?;
            (
                v,
                format!(
                    "synced {} user(s), {} group(s); removed {:?}; skipped {:?}\n",
                    r.users, r.groups, r.removed, r.skipped
                ),
            )
        }
    };
    if args.json {
        Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        ))
    } else {
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }
}
