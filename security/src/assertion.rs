//! Signed identity assertions: short-lived ES256 JWTs (RFC 7519 over a compact RFC 7515 JWS)
//! that tell an http back end who is calling — user, groups, device, app, site — for one
//! resource, its audience. The P-256 signing keys live in the database sealed under the master
//! key, are rotated every `--assertion-key-rotation`, and are published as a JWK Set (RFC 7517)
//! at `GET /.well-known/jwks.json` on the device listener.
//!
//! Key life: a new key is stored `prepublish` before it starts signing, so that every instance
//! on the same database has it in its JWK Set (they reload the keys every check interval) before
//! the first token it signs reaches a back end. A key replaced by a newer one stays published
//! until the newer one has been signing for a token lifetime (every token the old key signed has
//! expired by then), and is then deleted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::AssertionArgs;
use crate::error::Error;
use crate::master_key::MasterKey;
use crate::sessions::Session;
use crate::store::{AssertionKeyRow, Store, unix_now};

/// Associated-data prefix of a sealed signing key; device key ids never contain a ':'.
const AAD_PREFIX: &str = "assertion-key:";
/// Longest token lifetime accepted by `--assertion-ttl`.
const MAX_TTL: Duration = Duration::from_secs(3600);
/// Shortest rotation period accepted by `--assertion-key-rotation`.
const MIN_ROTATION: Duration = Duration::from_secs(2);

/// Why no assertion could be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssertionError {
    /// No key is active yet (a read-only standby whose primary never made one).
    #[error(
        "no identity assertion signing key is active (a read-only standby gets its keys from \
         the primary)"
    )]
    NoKey,
    /// The session ends before a token could be of use.
    #[error("the session has reached its absolute expiry")]
    SessionEnding,
    /// The signature could not be made.
    #[error("signing the identity assertion failed")]
    Sign,
}

/// The assertion settings, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    ttl_secs: i64,
    rotation_secs: i64,
    issuer: String,
}

impl Settings {
    /// Checks the flags.
    pub fn from_args(a: &AssertionArgs) -> Result<Self, Error> {
        if a.assertion_ttl < Duration::from_secs(1) || a.assertion_ttl > MAX_TTL {
            return Err(Error::Invalid(format!(
                "--assertion-ttl must be between 1s and {}s, not {:?}",
                MAX_TTL.as_secs(),
                a.assertion_ttl
            )));
        }
        if a.assertion_key_rotation < MIN_ROTATION {
            return Err(Error::Invalid(format!(
                "--assertion-key-rotation must be at least {}s, not {:?}",
                MIN_ROTATION.as_secs(),
                a.assertion_key_rotation
            )));
        }
        let issuer = a.assertion_issuer.trim();
        if issuer.is_empty() || issuer.len() > 255 || issuer.chars().any(char::is_control) {
            return Err(Error::Invalid(
                "--assertion-issuer must be 1..=255 printable characters".into(),
            ));
        }
        Ok(Self {
            ttl_secs: a.assertion_ttl.as_secs() as i64,
            rotation_secs: a.assertion_key_rotation.as_secs() as i64,
            issuer: issuer.to_owned(),
        })
    }

    /// How often the keys are reloaded from the database (and rotated when due).
    pub fn check_interval(&self) -> Duration {
        (Duration::from_secs(self.rotation_secs as u64) / 8)
            .clamp(Duration::from_millis(250), Duration::from_secs(60))
    }

    /// Seconds a new key is published before it signs: two reload intervals.
    fn prepublish_secs(&self) -> i64 {
        (self.check_interval() * 2).as_secs_f64().ceil() as i64
    }
}

/// One public key of the JWK Set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Always `EC`.
    pub kty: String,
    /// Always `P-256`.
    pub crv: String,
    /// The point's x coordinate, base64url without padding.
    pub x: String,
    /// The point's y coordinate, base64url without padding.
    pub y: String,
    /// Key id, as in each token's header.
    pub kid: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub use_: String,
    /// Always `ES256`.
    pub alg: String,
}

/// The JWK Set served at `/.well-known/jwks.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// The published keys, oldest first.
    pub keys: Vec<Jwk>,
}

/// A signed assertion.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The compact JWS.
    pub token: String,
    /// Its `exp`.
    pub expires_at: i64,
    /// Seconds from now to `exp`.
    pub expires_in: i64,
    /// The signing key's id.
    pub kid: String,
}

struct LoadedKey {
    kid: String,
    pair: EcdsaKeyPair,
    jwk: Jwk,
    active_from: i64,
}

/// The claims of an identity assertion, as docs/protocol.md lists them.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: String,
    groups: &'a [String],
    device: &'a str,
    app: &'a str,
    app_version: &'a str,
    site: &'a str,
}

/// The signing keys (loaded from the database) and the settings.
pub struct Assertions {
    settings: Settings,
    master: MasterKey,
    /// Oldest first by `active_from`; replaced whole on each reload.
    keys: RwLock<Arc<Vec<Arc<LoadedKey>>>>,
    read_only_warned: AtomicBool,
}

impl std::fmt::Debug for Assertions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assertions")
            .field("settings", &self.settings)
            .field("keys", &self.snapshot().len())
            .finish_non_exhaustive()
    }
}

fn crypto_err(what: &str) -> Error {
    Error::Crypto(format!("identity assertion key: {what}"))
}

impl Assertions {
    /// No keys yet: call [`Assertions::refresh`] before serving.
    pub fn new(settings: Settings, master: MasterKey) -> Self {
        Self {
            settings,
            master,
            keys: RwLock::default(),
            read_only_warned: AtomicBool::new(false),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn snapshot(&self) -> Arc<Vec<Arc<LoadedKey>>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rotates and retires keys when due (unless the database is a read-only standby), then
    /// reloads every stored key.
    pub async fn refresh(&self, store: &Store) -> Result<(), Error> {
        let now = unix_now();
        let mut rows = store.assertion_keys().await?;
        match self.maintain(store, &rows, now).await {
            Ok(false) => {}
            Ok(true) => rows = store.assertion_keys().await?,
            Err(Error::ReadOnly(_)) => {
                if !self.read_only_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "identity assertion keys cannot be rotated on a read-only standby; \
                         signing with the newest key the primary made"
                    );
                }
            }
            Err(e) => return Err(e),
        }
        let old = self.snapshot();
        let mut loaded = Vec::with_capacity(rows.len());
        for row in &rows {
            match old.iter().find(|k| k.kid == row.kid) {
                Some(k) => loaded.push(k.clone()),
                None => loaded.push(Arc::new(self.open(row)?)),
            }
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        Ok(())
    }

    /// Stores a new key when the newest one is due to be replaced and deletes keys whose every
    /// token has expired; returns whether anything changed.
    async fn maintain(
        &self,
        store: &Store,
        rows: &[AssertionKeyRow],
        now: i64,
    ) -> Result<bool, Error> {
        let s = &self.settings;
        let prepublish = s.prepublish_secs();
        let mut changed = false;
        let due = match rows.iter().map(|r| r.active_from).max() {
            // The very first key signs at once: nobody can hold a token yet.
            None => Some(now),
            Some(newest) if newest + s.rotation_secs - prepublish <= now => Some(now + prepublish),
            Some(_) => None,
        };
        if let Some(active_from) = due {
            let row = self.new_key(now, active_from)?;
            store.insert_assertion_key(&row).await?;
            tracing::info!(kid = %row.kid, active_from, "new identity assertion signing key");
            changed = true;
        }
        for pair in rows.windows(2) {
            let (old, next) = (&pair[0], &pair[1]);
            if now > retire_at(next.active_from, s.ttl_secs) {
                store.delete_assertion_key(&old.kid).await?;
                tracing::info!(kid = %old.kid, "retired identity assertion signing key deleted: every token it signed has expired");
                changed = true;
            }
        }
        Ok(changed)
    }

    fn new_key(&self, now: i64, active_from: i64) -> Result<AssertionKeyRow, Error> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| crypto_err("generating a P-256 key failed"))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| crypto_err("encoding the key failed"))?;
        let kid = B64URL.encode(scm_proto::crypto::random_bytes::<12>());
        let sealed = self
            .master
            .seal_bytes(&format!("{AAD_PREFIX}{kid}"), pkcs8.as_ref())?;
        Ok(AssertionKeyRow {
            kid,
            sealed_key: sealed.0,
            created_at: now,
            active_from,
        })
    }

    fn open(&self, row: &AssertionKeyRow) -> Result<LoadedKey, Error> {
        let pkcs8 = self
            .master
            .open_bytes(&format!("{AAD_PREFIX}{}", row.kid), &row.sealed_key)?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
            .map_err(|e| crypto_err(&format!("stored key {} is not P-256: {e}", row.kid)))?;
        // Uncompressed SEC1 point: 0x04 || x || y, 32 bytes each.
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err(crypto_err("unexpected public key encoding"));
        }
        let jwk = Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: B64URL.encode(&point[1..33]),
            y: B64URL.encode(&point[33..]),
            kid: row.kid.clone(),
            use_: "sig".into(),
            alg: "ES256".into(),
        };
        Ok(LoadedKey {
            kid: row.kid.clone(),
            pair,
            jwk,
            active_from: row.active_from,
        })
    }

    /// The keys a verifier may meet at `now`: the signing one, any prepublished one, and
    /// retired ones whose tokens may still be live.
    pub fn jwks(&self, now: i64) -> JwkSet {
        let keys = self.snapshot();
        let ttl = self.settings.ttl_secs;
        let keys = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                keys.get(i + 1)
                    .is_none_or(|next| now <= retire_at(next.active_from, ttl))
            })
            .map(|(_, k)| k.jwk.clone())
            .collect();
        JwkSet { keys }
    }

    /// Signs an assertion of `s` for `audience` (a resource name) with the active key.
    pub fn sign(&self, s: &Session, audience: &str) -> Result<Signed, AssertionError> {
        let now = unix_now();
        let keys = self.snapshot();
        let key = keys
            .iter()
            .rev()
            .find(|k| k.active_from <= now)
            .ok_or(AssertionError::NoKey)?;
        // A token never outlives its session.
        let exp = (now + self.settings.ttl_secs).min((s.absolute_expires_ms / 1000) as i64);
        if exp <= now {
            return Err(AssertionError::SessionEnding);
        }
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": key.kid});
        let claims = Claims {
            iss: &self.settings.issuer,
            sub: &s.user,
            aud: audience,
            iat: now,
            nbf: now,
            exp,
            jti: hex::encode(scm_proto::crypto::random_bytes::<16>()),
            groups: &s.groups,
            device: &s.device_id,
            app: &s.app_id,
            app_version: &s.app_version,
            site: &s.site,
        };
        let header = serde_json::to_vec(&header).map_err(|_| AssertionError::Sign)?;
        let claims = serde_json::to_vec(&claims).map_err(|_| AssertionError::Sign)?;
        let mut token = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
        let sig = key
            .pair
            .sign(&SystemRandom::new(), token.as_bytes())
            .map_err(|_| AssertionError::Sign)?;
        token.push('.');
        token.push_str(&B64URL.encode(sig.as_ref()));
        Ok(Signed {
            token,
            expires_at: exp,
            expires_in: exp - now,
            kid: key.kid.clone(),
        })
    }
}

/// The last second at which a key replaced by one active from `next_active_from` is published:
/// its last token was signed before then and lives at most `ttl` (the second covers rounding).
fn retire_at(next_active_from: i64, ttl: i64) -> i64 {
    next_active_from + ttl + 1
}

/// Reloads (and rotates) the signing keys every check interval.
pub(crate) async fn rotator(assertions: Arc<Assertions>, store: Store, stop: CancellationToken) {
    let mut tick = tokio::time::interval(assertions.settings().check_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = assertions.refresh(&store).await {
            tracing::warn!(error = %e, "reloading the identity assertion keys failed; keeping the loaded ones");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ttl: u64, rotation: u64) -> Settings {
        Settings::from_args(&AssertionArgs {
            assertion_ttl: Duration::from_secs(ttl),
            assertion_key_rotation: Duration::from_secs(rotation),
            assertion_issuer: "scm-security".into(),
        })
        .unwrap()
    }

    #[test]
    fn flags_are_checked() {
        let ok = AssertionArgs {
            assertion_ttl: Duration::from_secs(60),
            assertion_key_rotation: Duration::from_secs(86_400),
            assertion_issuer: "scm".into(),
        };
        assert!(Settings::from_args(&ok).is_ok());
        for bad in [
            AssertionArgs {
                assertion_ttl: Duration::ZERO,
                ..ok.clone()
            },
            AssertionArgs {
                assertion_ttl: Duration::from_secs(7200),
                ..ok.clone()
            },
            AssertionArgs {
                assertion_key_rotation: Duration::from_secs(1),
                ..ok.clone()
            },
            AssertionArgs {
                assertion_issuer: " ".into(),
                ..ok.clone()
            },
        ] {
            assert!(Settings::from_args(&bad).is_err(), "{bad:?}");
        }
        // A day's rotation reloads every minute and publishes two minutes ahead.
        let s = settings(60, 86_400);
        assert_eq!(s.check_interval(), Duration::from_secs(60));
        assert_eq!(s.prepublish_secs(), 120);
        assert_eq!(settings(1, 2).check_interval(), Duration::from_millis(250));
    }
}
