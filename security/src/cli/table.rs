//! The admin CLI's tables: aligned columns, times with their age.

use scm_proto::api::{AppPolicy, AppRelease, Resource, ResourceMode};

use crate::admin_types::RevokeResult;
use crate::store::{KeyRow, UserRow};

/// Formats rows as an aligned table.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
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

pub(super) fn time(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    let secs_ago = crate::store::unix_now() - t;
    format!("{t} ({secs_ago}s ago)")
}

pub(super) fn users_table(v: &[UserRow]) -> String {
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

pub(super) fn keys_table(v: &[KeyRow]) -> String {
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

pub(super) fn revoke_text(r: &RevokeResult) -> String {
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

pub(super) fn resource_table(v: &[Resource]) -> String {
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

pub(super) fn release_table(v: &[AppRelease]) -> String {
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

pub(super) fn policy_table(v: &[AppPolicy]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::enc;

    #[test]
    fn tables_align() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }
}
