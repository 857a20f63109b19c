//! `scm-security admin ...`: a client of the admin API printing tables (or `--json`), one
//! module per group of subcommands.

mod apps;
mod audit;
mod catalog;
mod client;
mod devices;
mod table;
mod users;

pub use client::CliError;

use crate::config::{AdminArgs, AdminCommand, LdapCmd};

/// Runs one admin command; returns what to print.
pub async fn run(args: &AdminArgs) -> Result<String, CliError> {
    let c = client::Client::new(args)?;
    let (json, text) = match &args.command {
        AdminCommand::Users(cmd) => users::users(&c, cmd).await?,
        AdminCommand::Devices(cmd) => devices::devices(&c, cmd).await?,
        AdminCommand::Keys(cmd) => devices::keys(&c, cmd).await?,
        AdminCommand::Sessions(cmd) => devices::sessions(&c, cmd).await?,
        AdminCommand::Apps(cmd) => apps::apps(&c, cmd).await?,
        AdminCommand::Resources(cmd) => catalog::resources(&c, cmd).await?,
        AdminCommand::Sites(cmd) => catalog::sites(&c, cmd).await?,
        AdminCommand::Audit { limit } => audit::audit(&c, *limit).await?,
        AdminCommand::Ldap(LdapCmd::Sync) => audit::ldap_sync(&c).await?,
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
