//! Integration tests of scm-security: real servers on loopback ports with real TLS, on SQLite
//! and on a real PostgreSQL (each case in `flows` runs on both), a real slapd for LDAP, and the
//! real binary for the admin CLI; a real nginx runs in front of forward-auth.

mod admin_cli;
mod assertion;
mod backup;
mod bad_input;
mod flows;
mod forward_auth;
mod hardening;
mod ldap;
mod ldap_tests;
mod pg;
mod proxy_mtls;
mod replication;
mod schema;
mod support;

/// Runs an `async fn(Db)` case once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::support::Db::Sqlite).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(db) = $crate::pg::fresh_db().await {
                        super::$name(db).await;
                    }
                }
            }
        )*
    };
}
