//! The directory of users: local users with argon2id password hashes (OWASP parameters) and LDAP
//! users, who authenticate by binding as themselves and whose names and groups are synced
//! periodically into the users table. LDAP runs over TLS (`ldaps://` or StartTLS, trusting
//! `--ldap-ca` or the system roots); plain `ldap://` sends passwords in clear text and needs
//! `--ldap-insecure-plaintext`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use tokio::sync::Semaphore;

use crate::config::LdapArgs;
use crate::error::Error;
use crate::store::{Store, UserRow, unix_now};

/// OWASP's argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
const ARGON2_M_KIB: u32 = 19 * 1024;
const ARGON2_T: u32 = 2;
const ARGON2_P: u32 = 1;
/// Longest password accepted (hashing cost must not grow with attacker input).
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Time limit of every LDAP operation.
const LDAP_TIMEOUT: Duration = Duration::from_secs(10);

fn argon2() -> Argon2<'static> {
    let params = Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None)
        .expect("OWASP argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// LDAP settings taken from the flags.
#[derive(Debug, Clone)]
pub struct LdapConfig {
    /// Server URL.
    pub url: String,
    /// Search DN and password, if not anonymous.
    pub bind: Option<(String, crate::secrets::Secret)>,
    /// User search base.
    pub user_base: String,
    /// User filter.
    pub user_filter: String,
    /// User name attribute.
    pub user_attr: String,
    /// Group search base, if groups are synced.
    pub group_base: Option<String>,
    /// Group filter.
    pub group_filter: String,
    /// Group name attribute.
    pub group_name_attr: String,
    /// Member attribute.
    pub member_attr: String,
    /// Sync interval.
    pub sync_interval: Duration,
    /// Entries per page of the sync's paged searches.
    pub page_size: u16,
    /// Upgrade `ldap://` with StartTLS.
    pub starttls: bool,
    /// TLS settings trusting `--ldap-ca` (None: ldap3's default, the system roots).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A TLS client configuration trusting the CAs in `ca` (on the workspace's one provider).
fn ldap_tls(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, Error> {
    let roots = crate::tls::load_roots(ca)?;
    let config = scm_proto::tls::client_builder()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl LdapConfig {
    /// Builds from the flags; `None` when LDAP is not configured.
    pub fn from_args(a: &LdapArgs) -> Result<Option<Self>, Error> {
        let Some(url) = a.ldap_url.clone() else {
            return Ok(None);
        };
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        let tls = match scheme {
            "ldaps" if a.ldap_starttls => {
                return Err(Error::Invalid(
                    "--ldap-starttls is for ldap:// URLs; ldaps:// is TLS from the start".into(),
                ));
            }
            "ldaps" => true,
            "ldap" if a.ldap_starttls => true,
            "ldap" if a.ldap_insecure_plaintext => {
                tracing::warn!(
                    url = %url,
                    "LDAP without TLS (--ldap-insecure-plaintext): user passwords cross the \
                     network in clear text"
                );
                false
            }
            "ldap" => {
                return Err(Error::Invalid(format!(
                    "--ldap-url {url} is plain LDAP: every user's password would cross the \
                     network in clear text. Use ldaps://, or --ldap-starttls, with --ldap-ca \
                     naming the directory's CA; only on loopback or in a test, allow it with \
                     --ldap-insecure-plaintext"
                )));
            }
            other => {
                return Err(Error::Invalid(format!(
                    "--ldap-url must start with ldaps:// or ldap://, not {other:?}"
                )));
            }
        };
        if a.ldap_ca.is_some() && !tls {
            return Err(Error::Invalid(
                "--ldap-ca needs ldaps:// or --ldap-starttls".into(),
            ));
        }
        let tls_config = a.ldap_ca.as_deref().map(ldap_tls).transpose()?;
        let user_base = a
            .ldap_user_base
            .clone()
            .ok_or_else(|| Error::Invalid("--ldap-url needs --ldap-user-base".into()))?;
        let bind = match (&a.ldap_bind_dn, &a.ldap_bind_password_file) {
            (Some(dn), Some(f)) => {
                let pw = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
                Some((
                    dn.clone(),
                    crate::secrets::Secret(pw.trim_end_matches(['\r', '\n']).to_owned()),
                ))
            }
            (None, None) => None,
            _ => {
                return Err(Error::Invalid(
                    "--ldap-bind-dn and --ldap-bind-password-file go together".into(),
                ));
            }
        };
        Ok(Some(Self {
            url,
            bind,
            user_base,
            user_filter: a.ldap_user_filter.clone(),
            user_attr: a.ldap_user_attr.clone(),
            group_base: a.ldap_group_base.clone(),
            group_filter: a.ldap_group_filter.clone(),
            group_name_attr: a.ldap_group_name_attr.clone(),
            member_attr: a.ldap_member_attr.clone(),
            sync_interval: a.ldap_sync_interval,
            page_size: a.ldap_page_size,
            starttls: a.ldap_starttls,
            tls: tls_config,
        }))
    }
}

/// Result of an LDAP sync.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SyncReport {
    /// Users added or updated.
    pub users: usize,
    /// Distinct groups seen.
    pub groups: usize,
    /// LDAP users removed because they left the directory.
    pub removed: Vec<String>,
    /// Names skipped because a local user has them.
    pub skipped: Vec<String>,
}

/// Users: where they come from and how they authenticate.
#[derive(Debug, Clone)]
pub struct Directory {
    store: Store,
    ldap: Option<LdapConfig>,
    default_site: String,
    hash_slots: Arc<Semaphore>,
    /// Password checks waiting for a slot now, and the most allowed to wait.
    hash_waiting: Arc<std::sync::atomic::AtomicUsize>,
    max_hash_queue: usize,
    dummy_hash: String,
}

/// Why authentication did not succeed.
#[derive(Debug)]
pub enum AuthError {
    /// Wrong name or password.
    BadCredentials,
    /// The directory could not answer.
    Unavailable(Error),
}

impl Directory {
    /// A directory over `store`, with LDAP if configured.
    pub fn new(
        store: Store,
        ldap: Option<LdapConfig>,
        default_site: String,
    ) -> Result<Self, Error> {
        let dummy_hash = hash_blocking("not a real password")?;
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            store,
            ldap,
            default_site,
            hash_slots: Arc::new(Semaphore::new(cpus * 2)),
            hash_waiting: Arc::default(),
            max_hash_queue: usize::MAX,
            dummy_hash,
        })
    }

    /// Bounds the password checks waiting for a hashing slot: beyond `max`, a check is refused
    /// at once ([`Error::HashQueueFull`]) instead of queueing (and holding its memory) unbounded.
    pub fn with_hash_queue(mut self, max: usize) -> Self {
        self.max_hash_queue = max;
        self
    }

    /// Takes a hashing slot, waiting in a bounded queue.
    async fn hash_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
        use std::sync::atomic::Ordering;
        if let Ok(p) = self.hash_slots.try_acquire() {
            return Ok(p);
        }
        let waiting = self.hash_waiting.fetch_add(1, Ordering::AcqRel);
        struct Leave<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _leave = Leave(&self.hash_waiting);
        if waiting >= self.max_hash_queue {
            return Err(Error::HashQueueFull(waiting));
        }
        self.hash_slots
            .acquire()
            .await
            .map_err(|e| Error::Hash(e.to_string()))
    }

    /// The LDAP settings, if any.
    pub fn ldap(&self) -> Option<&LdapConfig> {
        self.ldap.as_ref()
    }

    /// Hashes a password with argon2id (off the async threads, a bounded number at a time).
    pub async fn hash_password(&self, password: &str) -> Result<String, Error> {
        check_password(password)?;
        let _slot = self
            .hash_slots
            .acquire()
            .await
            .map_err(|e| Error::Hash(e.to_string()))?;
        let pw = password.to_owned();
        tokio::task::spawn_blocking(move || hash_blocking(&pw))
            .await
            .map_err(|e| Error::Hash(e.to_string()))?
    }

    async fn verify(&self, hash: String, password: &str) -> Result<bool, Error> {
        let _slot = self.hash_slot().await?;
        let pw = password.to_owned();
        tokio::task::spawn_blocking(move || {
            let parsed = PasswordHash::new(&hash).map_err(|e| Error::Hash(e.to_string()))?;
            Ok(argon2().verify_password(pw.as_bytes(), &parsed).is_ok())
        })
        .await
        .map_err(|e| Error::Hash(e.to_string()))?
    }

    /// Checks a user name and password. Unknown users cost the same hashing work as known ones.
    pub async fn authenticate(&self, name: &str, password: &str) -> Result<UserRow, AuthError> {
        if password.is_empty() || password.len() > MAX_PASSWORD_LEN {
            return Err(AuthError::BadCredentials);
        }
        let user = self
            .store
            .user(name)
            .await
            .map_err(AuthError::Unavailable)?;
        match user {
            Some(u) if u.source == "ldap" => {
                let (Some(cfg), Some(dn)) = (&self.ldap, &u.ldap_dn) else {
                    return Err(AuthError::BadCredentials);
                };
                if ldap_bind(cfg, dn, password)
                    .await
                    .map_err(AuthError::Unavailable)?
                {
                    Ok(u)
                } else {
                    Err(AuthError::BadCredentials)
                }
            }
            Some(u) => {
                let hash = u
                    .password_hash
                    .clone()
                    .unwrap_or_else(|| self.dummy_hash.clone());
                match self.verify(hash, password).await {
                    Ok(true) if u.password_hash.is_some() => Ok(u),
                    Ok(_) => Err(AuthError::BadCredentials),
                    Err(e) => Err(AuthError::Unavailable(e)),
                }
            }
            None => match self.verify(self.dummy_hash.clone(), password).await {
                Err(e @ Error::HashQueueFull(_)) => Err(AuthError::Unavailable(e)),
                _ => Err(AuthError::BadCredentials),
            },
        }
    }

    /// Reads users and groups from LDAP and writes them into the users table.
    pub async fn sync(&self) -> Result<SyncReport, Error> {
        let Some(cfg) = &self.ldap else {
            return Err(Error::Invalid("LDAP is not configured (--ldap-url)".into()));
        };
        let (users, groups) = ldap_read(cfg).await?;
        let mut report = SyncReport {
            groups: groups.values().flatten().collect::<BTreeSet<_>>().len(),
            ..SyncReport::default()
        };
        let existing: HashMap<String, UserRow> = self
            .store
            .users()
            .await?
            .into_iter()
            .map(|u| (u.name.clone(), u))
            .collect();
        for (name, dn) in &users {
            let user_groups: Vec<String> = groups
                .get(&dn.to_ascii_lowercase())
                .map(|g| g.iter().cloned().collect())
                .unwrap_or_default();
            match existing.get(name) {
                Some(u) if u.source != "ldap" => report.skipped.push(name.clone()),
                Some(u) => {
                    let mut u = u.clone();
                    u.ldap_dn = Some(dn.clone());
                    u.groups = user_groups;
                    self.store.update_user(&u).await?;
                    report.users += 1;
                }
                None => {
                    self.store
                        .insert_user(&UserRow {
                            name: name.clone(),
                            source: "ldap".into(),
                            password_hash: None,
                            ldap_dn: Some(dn.clone()),
                            groups: user_groups,
                            site: self.default_site.clone(),
                            created_at: unix_now(),
                        })
                        .await?;
                    report.users += 1;
                }
            }
        }
        for (name, u) in &existing {
            if u.source == "ldap" && !users.contains_key(name) {
                self.store.delete_user(name).await?;
                report.removed.push(name.clone());
            }
        }
        Ok(report)
    }
}

fn hash_blocking(password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Hash(e.to_string()))
}

/// Refuses passwords that are empty or absurdly long.
pub fn check_password(password: &str) -> Result<(), Error> {
    if password.is_empty() || password.len() > MAX_PASSWORD_LEN {
        return Err(Error::Invalid(format!(
            "password must be 1..={MAX_PASSWORD_LEN} bytes"
        )));
    }
    Ok(())
}

fn ldap_err(cfg: &LdapConfig, e: ldap3::LdapError) -> Error {
    Error::Ldap(format!("{}: {e}", cfg.url))
}

async fn ldap_connect(cfg: &LdapConfig) -> Result<ldap3::Ldap, Error> {
    let mut settings = LdapConnSettings::new()
        .set_conn_timeout(LDAP_TIMEOUT)
        .set_starttls(cfg.starttls);
    if let Some(tls) = &cfg.tls {
        settings = settings.set_config(tls.clone());
    }
    let (conn, ldap) = LdapConnAsync::with_settings(settings, &cfg.url)
        .await
        .map_err(|e| ldap_err(cfg, e))?;
    ldap3::drive!(conn);
    Ok(ldap)
}

/// Binds as `dn` with `password`: Ok(true) on success, Ok(false) on invalid credentials.
async fn ldap_bind(cfg: &LdapConfig, dn: &str, password: &str) -> Result<bool, Error> {
    // An empty password would be an unauthenticated bind, which LDAP servers accept.
    if password.is_empty() {
        return Ok(false);
    }
    let mut ldap = ldap_connect(cfg).await?;
    let res = ldap
        .with_timeout(LDAP_TIMEOUT)
        .simple_bind(dn, password)
        .await
        .map_err(|e| ldap_err(cfg, e))?;
    let _ = ldap.unbind().await;
    match res.rc {
        0 => Ok(true),
        // invalidCredentials, or the DN is gone.
        49 | 32 => Ok(false),
        rc => Err(Error::Ldap(format!(
            "{}: bind failed with code {rc}: {}",
            cfg.url, res.text
        ))),
    }
}

/// Searches the subtree at `base` with the simple paged results control (RFC 2696), pages of
/// `cfg.page_size`: a directory answers a plain search with at most its size limit (1000 entries
/// in Active Directory) and then "size limit exceeded"; paged, it returns every entry. Each page
/// is one operation under [`LDAP_TIMEOUT`].
async fn paged_search(
    ldap: &mut ldap3::Ldap,
    cfg: &LdapConfig,
    base: &str,
    filter: &str,
    attrs: Vec<&str>,
) -> Result<Vec<SearchEntry>, Error> {
    let adapters: Vec<Box<dyn Adapter<_, _>>> = vec![
        Box::new(EntriesOnly::new()),
        Box::new(PagedResults::new(i32::from(cfg.page_size))),
    ];
    let mut stream = ldap
        .with_timeout(LDAP_TIMEOUT)
        .streaming_search_with(adapters, base, Scope::Subtree, filter, attrs)
        .await
        .map_err(|e| ldap_err(cfg, e))?;
    let mut entries = Vec::new();
    while let Some(e) = stream.next().await.map_err(|e| ldap_err(cfg, e))? {
        entries.push(SearchEntry::construct(e));
    }
    stream
        .finish()
        .await
        .success()
        .map_err(|e| ldap_err(cfg, e))?;
    Ok(entries)
}

/// Reads (user name → DN) and (lowercased member DN → groups).
async fn ldap_read(
    cfg: &LdapConfig,
) -> Result<(HashMap<String, String>, HashMap<String, BTreeSet<String>>), Error> {
    let mut ldap = ldap_connect(cfg).await?;
    if let Some((dn, pw)) = &cfg.bind {
        ldap.with_timeout(LDAP_TIMEOUT)
            .simple_bind(dn, &pw.0)
            .await
            .and_then(|r| r.success())
            .map_err(|e| ldap_err(cfg, e))?;
    }
    let entries = paged_search(
        &mut ldap,
        cfg,
        &cfg.user_base,
        &cfg.user_filter,
        vec![cfg.user_attr.as_str()],
    )
    .await?;
    let mut users = HashMap::new();
    for e in entries {
        let Some(name) = e.attrs.get(&cfg.user_attr).and_then(|v| v.first()) else {
            continue;
        };
        if crate::store::check_name("user", name, 64).is_err() {
            tracing::warn!(dn = %e.dn, "LDAP user name not usable here; skipped");
            continue;
        }
        users.insert(name.clone(), e.dn);
    }
    let mut groups: HashMap<String, BTreeSet<String>> = HashMap::new();
    if let Some(base) = &cfg.group_base {
        let entries = paged_search(
            &mut ldap,
            cfg,
            base,
            &cfg.group_filter,
            vec![cfg.group_name_attr.as_str(), cfg.member_attr.as_str()],
        )
        .await?;
        for e in entries {
            let Some(group) = e.attrs.get(&cfg.group_name_attr).and_then(|v| v.first()) else {
                continue;
            };
            for member in e.attrs.get(&cfg.member_attr).into_iter().flatten() {
                groups
                    .entry(member.to_ascii_lowercase())
                    .or_default()
                    .insert(group.clone());
            }
        }
    }
    let _ = ldap.unbind().await;
    Ok((users, groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_with_owasp_parameters() {
        let h = hash_blocking("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(argon2().verify_password(b"pw", &parsed).is_ok());
        assert!(argon2().verify_password(b"pW", &parsed).is_err());
        assert!(check_password("").is_err());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_LEN + 1)).is_err());
    }
}
