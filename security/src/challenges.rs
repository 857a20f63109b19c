//! Single-use login challenges, stateless to issue.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use scm_proto::crypto::{self, Nonce};

use crate::clock::{lock, now_ms};

/// Why a challenge could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeError {
    /// Never issued by this server, forged, or already used.
    Unknown,
    /// Issued but past its expiry.
    Expired,
    /// The set of used challenges is full of unexpired entries: try again shortly.
    Busy,
}

/// Bytes of a challenge id: expiry (ms, big endian) ‖ 16 random bytes ‖ 16-byte MAC tag.
const CHALLENGE_ID_LEN: usize = 8 + 16 + 16;

/// Stateless login challenges. The id carries its own expiry and a MAC under a per-process key,
/// and the server nonce is derived from it, so issuing one stores nothing: no number of
/// challenge requests can fill a table. Single use is kept by a set of the ids already used,
/// each held only until its expiry; that set is bounded (`max_used`) and filled only by login
/// attempts, which the per-source limits already throttle.
pub struct Challenges {
    key: [u8; 32],
    used: Mutex<HashMap<[u8; 16], u64>>,
    ttl: Duration,
    max_used: usize,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("key", &"<redacted>")
            .field("used", &self.used_len())
            .field("ttl", &self.ttl)
            .field("max_used", &self.max_used)
            .finish()
    }
}

impl Challenges {
    /// Challenges valid for `ttl`, remembering at most `max_used` used ones at a time.
    pub fn new(ttl: Duration, max_used: usize) -> Self {
        Self {
            key: crypto::random_bytes::<32>(),
            used: Mutex::new(HashMap::new()),
            ttl,
            max_used: max_used.max(1),
        }
    }

    /// The time to live of a challenge.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn tag(&self, label: &[u8], body: &[u8]) -> [u8; 32] {
        use hmac::Mac as _;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        m.update(label);
        m.update(body);
        m.finalize().into_bytes().into()
    }

    /// Issues a challenge: (id, server nonce). Stores nothing.
    pub fn issue(&self) -> (String, Nonce) {
        let expires = now_ms() + self.ttl.as_millis() as u64;
        let mut id = [0u8; CHALLENGE_ID_LEN];
        id[..8].copy_from_slice(&expires.to_be_bytes());
        id[8..24].copy_from_slice(&crypto::random_bytes::<16>());
        let tag = self.tag(b"scm-challenge-id-v1", &id[..24]);
        id[24..].copy_from_slice(&tag[..16]);
        let nonce = self.tag(b"scm-challenge-nonce-v1", &id[..24]);
        (URL_SAFE_NO_PAD.encode(id), nonce)
    }

    /// Uses a challenge up: whatever happens next, it cannot serve again.
    pub fn take(&self, id_text: &str) -> Result<Nonce, ChallengeError> {
        let id = URL_SAFE_NO_PAD
            .decode(id_text)
            .map_err(|_| ChallengeError::Unknown)?;
        if id.len() != CHALLENGE_ID_LEN {
            return Err(ChallengeError::Unknown);
        }
        let tag = self.tag(b"scm-challenge-id-v1", &id[..24]);
        if !crypto::ct_eq(&tag[..16], &id[24..]) {
            return Err(ChallengeError::Unknown);
        }
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&id[..8]);
        let expires = u64::from_be_bytes(exp);
        let now = now_ms();
        if now >= expires {
            return Err(ChallengeError::Expired);
        }
        let mut rand = [0u8; 16];
        rand.copy_from_slice(&id[8..24]);
        {
            let mut used = lock(&self.used);
            if used.contains_key(&rand) {
                return Err(ChallengeError::Unknown);
            }
            if used.len() >= self.max_used {
                used.retain(|_, exp| *exp > now);
                if used.len() >= self.max_used {
                    return Err(ChallengeError::Busy);
                }
            }
            used.insert(rand, expires);
        }
        Ok(self.tag(b"scm-challenge-nonce-v1", &id[..24]))
    }

    /// Used challenges remembered now.
    pub fn used_len(&self) -> usize {
        lock(&self.used).len()
    }

    /// Forgets used challenges that have expired (they would be refused as expired anyway).
    pub fn sweep(&self) {
        let now = now_ms();
        lock(&self.used).retain(|_, exp| *exp > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn challenges_are_stateless_single_use_and_expire() {
        let c = Challenges::new(Duration::from_secs(60), 2);
        let (id, nonce) = c.issue();
        assert!(id.len() <= 64, "fits the login's challenge_id limit: {id}");
        assert_eq!(c.used_len(), 0, "issuing stores nothing");
        for _ in 0..10_000 {
            let _ = c.issue();
        }
        assert_eq!(c.used_len(), 0);
        assert_eq!(c.take(&id), Ok(nonce));
        assert_eq!(c.take(&id), Err(ChallengeError::Unknown), "single use");
        // Forged or edited ids are unknown.
        assert_eq!(c.take("nope"), Err(ChallengeError::Unknown));
        let mut bytes = URL_SAFE_NO_PAD.decode(&id).unwrap();
        bytes[12] ^= 1;
        assert_eq!(
            c.take(&URL_SAFE_NO_PAD.encode(&bytes)),
            Err(ChallengeError::Unknown)
        );
        // Another server's (another key's) challenge is unknown here.
        let other = Challenges::new(Duration::from_secs(60), 2);
        assert_eq!(c.take(&other.issue().0), Err(ChallengeError::Unknown));
        // The used set is bounded: full of unexpired entries, a login is told to retry.
        let (a, _) = c.issue();
        assert!(c.take(&a).is_ok());
        let (b, _) = c.issue();
        assert_eq!(c.take(&b), Err(ChallengeError::Busy));
        let c = Challenges::new(Duration::from_millis(0), 2);
        let (id, _) = c.issue();
        assert_eq!(c.take(&id), Err(ChallengeError::Expired));
    }
}
