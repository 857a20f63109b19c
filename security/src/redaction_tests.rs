//! `{:?}` of every Security server type that carries a password, a key, a session id or a hash
//! shows none of them, so no log line, panic message or test failure can leak one.

use std::time::Duration;

use scm_proto::crypto::{SharedKey, random_bytes};

use crate::admin_types::{ActivationCode, NewUser, UpdateUser};
use crate::master_key::MasterKey;
use crate::secrets::Secret;
use crate::sessions::{NewSession, Sessions};
use crate::store::{KeyRow, UserRow};

const SECRET: &str = "s3cret-Zq9";

fn assert_hidden(printed: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!printed.contains(s), "{printed} shows {s}");
    }
}

#[test]
fn rows_hide_the_password_hash_and_the_sealed_key() {
    let hash = format!("$argon2id$v=19$m=19456,t=2,p=1${SECRET}");
    let user = UserRow {
        name: "alice".into(),
        source: "local".into(),
        password_hash: Some(hash.clone()),
        ldap_dn: None,
        groups: vec!["staff".into()],
        site: "main".into(),
        created_at: 1,
    };
    let printed = format!("{user:?}");
    assert_hidden(&printed, &[&hash, SECRET, "argon2id"]);
    assert!(printed.contains("alice") && printed.contains("Some(<redacted>)"));

    let mk = MasterKey::from_bytes(&random_bytes());
    let sealed = mk.seal("k_1", &SharedKey::generate()).unwrap();
    let row = KeyRow {
        key_id: "k_1".into(),
        user_name: "alice".into(),
        device_id: "phone".into(),
        app_id: "mail".into(),
        sealed_key: sealed.0.clone(),
        created_at: 1,
        revoked_at: None,
    };
    let as_list = format!("{:?}", sealed.0);
    let as_hex = hex::encode(&sealed.0);
    for printed in [format!("{row:?}"), format!("{sealed:?}")] {
        // Neither the byte list derive(Debug) would print nor any hex of it.
        assert_hidden(&printed, &[&as_list[1..20], &as_hex[..16]]);
        assert!(printed.contains("<redacted>"), "{printed}");
    }
}

#[test]
fn admin_bodies_hide_passwords_and_codes() {
    let printed = [
        format!(
            "{:?}",
            NewUser {
                name: "alice".into(),
                password: SECRET.into(),
                groups: vec![],
                site: None,
            }
        ),
        format!(
            "{:?}",
            UpdateUser {
                password: Some(SECRET.into()),
                ..UpdateUser::default()
            }
        ),
        format!(
            "{:?}",
            ActivationCode {
                user: "alice".into(),
                code: SECRET.into(),
                expires_at: 1,
            }
        ),
        format!("{:?}", Secret(SECRET.into())),
    ];
    for p in &printed {
        assert_hidden(p, &[SECRET]);
    }
}

#[test]
fn sessions_hide_their_id_and_key() {
    let table = Sessions::new(Duration::from_secs(60), Duration::from_secs(600), 10);
    let shared = SharedKey::generate();
    let s = table
        .create(
            &shared,
            &random_bytes(),
            &random_bytes(),
            NewSession {
                user: "alice".into(),
                groups: vec![],
                site: "main".into(),
                device_id: "phone".into(),
                app_id: "mail".into(),
                app_version: "1.0".into(),
                key_id: "k_1".into(),
            },
        )
        .unwrap();
    let printed = format!("{s:?} {table:?}");
    assert_hidden(
        &printed,
        &[
            s.id.expose(),
            &s.key.to_b64(),
            &hex::encode(s.key.as_bytes()),
            &format!("{:?}", s.key.as_bytes()),
            &shared.to_b64(),
        ],
    );
    assert!(printed.contains(&s.tag.0), "{printed}");
}
