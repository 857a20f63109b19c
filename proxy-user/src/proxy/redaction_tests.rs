//! `{:?}` of what the proxy holds about a session (the validate answer, the cached session, the
//! verdict) never shows the session key or the session id: a debug log of any of them is safe.

use std::sync::Arc;

use scm_proto::api::{ValidateRequest, ValidateResponse};
use scm_proto::crypto::{SessionId, SessionKey};

use super::cache::SessionInfo;
use super::security_client::Validation;

#[test]
fn session_state_hides_key_and_id() {
    let id = SessionId::generate();
    let key = SessionKey::generate();
    let answer = ValidateResponse {
        session_tag: id.tag().0,
        user: "alice".into(),
        groups: vec!["staff".into()],
        session_key: key.to_b64(),
        app_id: "mail".into(),
        app_version: "1.0".into(),
        device_id: "phone".into(),
        site: "main".into(),
        idle_timeout_secs: 900,
        absolute_expires_at: u64::MAX,
        allowed_resources: vec!["intranet".into()],
    };
    let printed_answer = format!("{answer:?}");
    let info = Arc::new(SessionInfo::from_response(answer).unwrap());
    let printed = [
        printed_answer,
        format!("{info:?}"),
        format!("{:?}", Validation::Valid(info.clone())),
        format!(
            "{:?}",
            ValidateRequest {
                session_id: id.expose().to_owned(),
                binding: None,
            }
        ),
    ];
    for p in &printed {
        for secret in [
            key.to_b64(),
            key.as_bytes().iter().map(|b| format!("{b:02x}")).collect(),
            format!("{:?}", key.as_bytes()),
            id.expose().to_owned(),
        ] {
            assert!(!p.contains(&secret), "{p} shows {secret}");
        }
        assert!(p.contains(&id.tag().0), "{p}");
    }
}
