//! App policy: which versions of an app devices may run (a minimum version and revoked
//! versions, set by an admin), the update answer a device is given, and applying an admin's
//! policy change. Versions compare as [`AppVersion`]s.

use scm_proto::api::{AppPolicy, AppRelease, UpdateCheckResponse};
use scm_proto::version::AppVersion;

use crate::admin_types::PolicyUpdate;
use crate::error::ApiError;

/// Parses a version an admin gave, as a JSON error naming the bad field.
pub(crate) fn parse_version(v: &str) -> Result<AppVersion, ApiError> {
    AppVersion::parse(v).map_err(|e| ApiError::bad_request("invalid_field", e.to_string()))
}

/// Checks every version an admin's change names.
pub(crate) fn check(req: &PolicyUpdate) -> Result<(), ApiError> {
    for v in req
        .min_version
        .iter()
        .chain(&req.revoke)
        .chain(&req.unrevoke)
    {
        parse_version(v)?;
    }
    Ok(())
}

/// Applies an admin's change (checked with [`check`]) to `p`.
pub(crate) fn apply(p: &mut AppPolicy, req: PolicyUpdate) {
    if req.clear_min_version {
        p.min_version = None;
    }
    if let Some(m) = req.min_version {
        p.min_version = Some(m);
    }
    for v in req.revoke {
        if !p.revoked_versions.contains(&v) {
            p.revoked_versions.push(v);
        }
    }
    p.revoked_versions.retain(|v| !req.unrevoke.contains(v));
}

/// Whether `version` may be used under `policy`.
pub(crate) fn allowed(policy: &AppPolicy, version: &AppVersion) -> bool {
    let above_min = policy
        .min_version
        .as_deref()
        .and_then(|m| AppVersion::parse(m).ok())
        .is_none_or(|m| *version >= m);
    let revoked = policy
        .revoked_versions
        .iter()
        .filter_map(|r| AppVersion::parse(r).ok())
        .any(|r| r == *version);
    above_min && !revoked
}

/// The update answer for a device running `current` on `platform`.
pub(crate) fn update_answer(
    releases: &[AppRelease],
    policy: &AppPolicy,
    platform: &str,
    current: &AppVersion,
) -> UpdateCheckResponse {
    let latest = releases
        .iter()
        .filter(|r| r.platform == platform)
        .filter_map(|r| AppVersion::parse(&r.version).ok().map(|v| (v, r)))
        .filter(|(v, _)| allowed(policy, v))
        .max_by(|a, b| a.0.cmp(&b.0));
    UpdateCheckResponse {
        update_available: latest.as_ref().is_some_and(|(v, _)| v > current),
        current_allowed: allowed(policy, current),
        min_version: policy.min_version.clone(),
        latest: latest.map(|(_, r)| r.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(v: &str, p: &str) -> AppRelease {
        AppRelease {
            app_id: "mail".into(),
            version: v.into(),
            platform: p.into(),
            sha256: "00".into(),
            size: 1,
            download_path: String::new(),
        }
    }

    #[test]
    fn update_policy() {
        let rels = [
            rel("1.0", "android"),
            rel("1.2", "android"),
            rel("2.0", "android"),
            rel("3.0", "ios"),
        ];
        let mut policy = AppPolicy {
            app_id: "mail".into(),
            min_version: Some("1.1".into()),
            revoked_versions: vec!["2.0".into()],
        };
        let v = |s| AppVersion::parse(s).unwrap();
        let a = update_answer(&rels, &policy, "android", &v("1.0"));
        assert!(a.update_available && !a.current_allowed);
        assert_eq!(
            a.latest.unwrap().version,
            "1.2",
            "revoked 2.0 is not offered"
        );
        let a = update_answer(&rels, &policy, "android", &v("1.2"));
        assert!(!a.update_available && a.current_allowed);
        assert!(!update_answer(&rels, &policy, "android", &v("2.0")).current_allowed);
        policy.revoked_versions.clear();
        assert_eq!(
            update_answer(&rels, &policy, "android", &v("1.2"))
                .latest
                .unwrap()
                .version,
            "2.0"
        );
        assert!(
            update_answer(&rels, &policy, "web", &v("1"))
                .latest
                .is_none()
        );
    }
}
