//! `admin apps ...`: the published packages, publishing one, and an app's version policy.

use reqwest::Method;
use scm_proto::api::{AppPolicy, AppRelease};

use super::client::{CliError, Client, Output, enc};
use super::table::{policy_table, release_table};
use crate::admin_types::{AppsListing, PolicyUpdate};
use crate::config::AppsCmd;

/// Runs `admin apps ...`.
pub(super) async fn apps(c: &Client, cmd: &AppsCmd) -> Result<Output, CliError> {
    let none: Option<&()> = None;
    Ok(match cmd {
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
    })
}
