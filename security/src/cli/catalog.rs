//! `admin resources ...` and `admin sites ...`: the resource catalog and the sites.

use reqwest::Method;
use scm_proto::api::{Resource, ResourceMode};
use serde_json::Value;

use super::client::{CliError, Client, Output, enc};
use super::table::{resource_table, table};
use crate::admin_types::{ResourceBody, SiteBody};
use crate::config::{ModeArg, ResourcesCmd, SitesCmd};
use crate::store::SiteRow;

/// Runs `admin resources ...`.
pub(super) async fn resources(c: &Client, cmd: &ResourcesCmd) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    Ok(match cmd {
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
    })
}

/// Runs `admin sites ...`.
pub(super) async fn sites(c: &Client, cmd: &SitesCmd) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    Ok(match cmd {
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
    })
}
