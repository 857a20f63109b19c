//! The checks between a valid session and a back end: the channel binding, the app context
//! against the app policy and the session, and the resource's group rule. Plain functions over
//! plain data, so each rule has a unit test.

use std::collections::HashMap;

use scm_proto::api::{AppPolicy, Resource};
use scm_proto::preamble::{Preamble, Status};
use scm_proto::version::AppVersion;

use super::cache::SessionInfo;

/// A refused connection: the status and reason sent back in the preamble reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    /// The reply status.
    pub status: Status,
    /// Why, for the device's user (never contains secrets).
    pub reason: String,
}

impl Refusal {
    /// A refusal with a reason.
    pub(super) fn new(status: Status, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// The resource catalog and the app policy, as last fetched from the Security server.
#[derive(Debug, Default, Clone)]
pub(super) struct Catalog {
    /// Resources by name.
    pub resources: HashMap<String, Resource>,
    /// App policies by app id.
    pub apps: HashMap<String, AppPolicy>,
}

impl Catalog {
    /// Indexes lists as the Security server serves them.
    pub(super) fn new(resources: Vec<Resource>, apps: Vec<AppPolicy>) -> Self {
        Self {
            resources: resources.into_iter().map(|r| (r.name.clone(), r)).collect(),
            apps: apps.into_iter().map(|a| (a.app_id.clone(), a)).collect(),
        }
    }
}

/// Checks that the preamble's MAC was made with the session key over this TLS connection's
/// exporter (constant-time comparison). A session id replayed on another connection fails here.
pub(super) fn check_binding(
    session: &SessionInfo,
    preamble: &Preamble,
    exporter: &[u8],
) -> Result<(), Refusal> {
    if preamble.verify(&session.session_key, exporter) {
        Ok(())
    } else {
        Err(Refusal::new(
            Status::BindingFailed,
            "the binding MAC does not match this TLS connection",
        ))
    }
}

/// Checks the app context: the same device, app and app version as at login (so the version the
/// policy is checked against is the one the Security server saw; a device that updated its app
/// logs in again), a well-formed version at or above the app's minimum and not revoked.
pub(super) fn check_app(
    apps: &HashMap<String, AppPolicy>,
    session: &SessionInfo,
    preamble: &Preamble,
) -> Result<(), Refusal> {
    let refuse = |why: String| Err(Refusal::new(Status::AppRefused, why));
    if preamble.device_id != session.device_id {
        return refuse(format!(
            "device {:?} is not the device this session logged in from",
            preamble.device_id
        ));
    }
    if preamble.app_id != session.app_id {
        return refuse(format!(
            "app {:?} is not the app this session logged in with",
            preamble.app_id
        ));
    }
    if preamble.app_version != session.app_version {
        return refuse(format!(
            "app version {:?} is not the version this session logged in with ({:?}): log in \
             again after an app update",
            preamble.app_version, session.app_version
        ));
    }
    let version = match AppVersion::parse(&preamble.app_version) {
        Ok(v) => v,
        Err(e) => return refuse(e.to_string()),
    };
    // The app is known: the Security server enrolled it and logged this session in with it. The
    // policy list only names apps that have a minimum or revoked versions.
    let Some(policy) = apps.get(&preamble.app_id) else {
        return Ok(());
    };
    if let Some(min) = &policy.min_version {
        match AppVersion::parse(min) {
            Ok(min) if version < min => {
                return refuse(format!(
                    "app {} version {version} is below the minimum {min}: update the app",
                    policy.app_id
                ));
            }
            Ok(_) => {}
            // A policy we cannot read must not let everything through.
            Err(e) => return refuse(format!("app policy unreadable: {e}")),
        }
    }
    let revoked = policy
        .revoked_versions
        .iter()
        .any(|r| AppVersion::parse(r).is_ok_and(|r| r == version));
    if revoked {
        return refuse(format!(
            "app {} version {version} has been revoked: update the app",
            policy.app_id
        ));
    }
    Ok(())
}

/// Finds the resource and checks the group rule: the user must be in one of its allowed groups.
pub(super) fn check_resource<'a>(
    resources: &'a HashMap<String, Resource>,
    session: &SessionInfo,
    name: &str,
) -> Result<&'a Resource, Refusal> {
    let Some(resource) = resources.get(name) else {
        return Err(Refusal::new(
            Status::UnknownResource,
            format!("no resource named {name:?}"),
        ));
    };
    let allowed = resource
        .allowed_groups
        .iter()
        .any(|g| session.groups.iter().any(|s| s == g));
    if allowed {
        Ok(resource)
    } else {
        Err(Refusal::new(
            Status::Forbidden,
            format!(
                "user {} is in none of the groups allowed to use {name:?}",
                session.user
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scm_proto::api::ResourceMode;
    use scm_proto::crypto::{SessionKey, SessionTag};

    fn session() -> SessionInfo {
        SessionInfo {
            tag: SessionTag("t".into()),
            user: "alice".into(),
            groups: vec!["staff".into(), "eng".into()],
            session_key: SessionKey::generate(),
            app_id: "mail".into(),
            app_version: "1.4".into(),
            device_id: "phone".into(),
            site: "main".into(),
            absolute_expires_at: u64::MAX,
        }
    }

    fn preamble(s: &SessionInfo, exporter: &[u8]) -> Preamble {
        Preamble {
            session_id: "S".repeat(43),
            app_id: "mail".into(),
            app_version: "1.4".into(),
            device_id: "phone".into(),
            resource: "wiki".into(),
            mac: [0; 32],
        }
        .signed(&s.session_key, exporter)
    }

    fn apps(min: Option<&str>, revoked: &[&str]) -> HashMap<String, AppPolicy> {
        Catalog::new(
            vec![],
            vec![AppPolicy {
                app_id: "mail".into(),
                min_version: min.map(Into::into),
                revoked_versions: revoked.iter().map(|s| s.to_string()).collect(),
            }],
        )
        .apps
    }

    #[test]
    fn binding_is_tied_to_the_connection_and_key() {
        let s = session();
        let p = preamble(&s, &[1; 32]);
        assert!(check_binding(&s, &p, &[1; 32]).is_ok());
        assert_eq!(
            check_binding(&s, &p, &[2; 32]).unwrap_err().status,
            Status::BindingFailed
        );
        let mut other = s.clone();
        other.session_key = SessionKey::generate();
        assert!(check_binding(&other, &p, &[1; 32]).is_err());
        let mut tampered = p.clone();
        tampered.resource = "admin".into();
        assert!(check_binding(&s, &tampered, &[1; 32]).is_err());
    }

    #[test]
    fn app_policy() {
        let s = session();
        let p = preamble(&s, &[0; 32]);
        assert!(check_app(&apps(None, &[]), &s, &p).is_ok());
        assert!(check_app(&apps(Some("1.4.0"), &[]), &s, &p).is_ok());
        let e = check_app(&apps(Some("1.10"), &[]), &s, &p).unwrap_err();
        assert_eq!(e.status, Status::AppRefused);
        assert!(e.reason.contains("below the minimum"), "{}", e.reason);
        let e = check_app(&apps(None, &["1.4.0"]), &s, &p).unwrap_err();
        assert!(e.reason.contains("revoked"));
        assert!(check_app(&HashMap::new(), &s, &p).is_ok());
        assert!(check_app(&apps(Some("garbage"), &[]), &s, &p).is_err());
        let mut q = p.clone();
        q.device_id = "other-phone".into();
        assert!(check_app(&apps(None, &[]), &s, &q).is_err());
        let mut q = p.clone();
        q.app_id = "chat".into();
        assert!(check_app(&apps(None, &[]), &s, &q).is_err());
        let mut q = p.clone();
        q.app_version = "1.x".into();
        assert!(check_app(&apps(None, &[]), &s, &q).is_err());
        // Another version than the login's, even an allowed one, is refused with a reason.
        let mut q = p;
        q.app_version = "1.5".into();
        let e = check_app(&apps(None, &[]), &s, &q).unwrap_err();
        assert_eq!(e.status, Status::AppRefused);
        assert!(e.reason.contains("logged in with"), "{}", e.reason);
    }

    #[test]
    fn group_rule() {
        let s = session();
        let res = |groups: &[&str]| {
            Catalog::new(
                vec![Resource {
                    name: "wiki".into(),
                    address: "127.0.0.1:1".into(),
                    mode: ResourceMode::Http,
                    allowed_groups: groups.iter().map(|g| g.to_string()).collect(),
                }],
                vec![],
            )
            .resources
        };
        assert!(check_resource(&res(&["eng"]), &s, "wiki").is_ok());
        assert_eq!(
            check_resource(&res(&["admins"]), &s, "wiki")
                .unwrap_err()
                .status,
            Status::Forbidden
        );
        assert_eq!(
            check_resource(&res(&[]), &s, "wiki").unwrap_err().status,
            Status::Forbidden
        );
        assert_eq!(
            check_resource(&res(&["eng"]), &s, "nope")
                .unwrap_err()
                .status,
            Status::UnknownResource
        );
    }
}
