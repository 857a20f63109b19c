//! Secrets at rest: the master key file, the admin token file, and AES-256-GCM sealing of shared
//! keys under the master key (the key id is the associated data, so a ciphertext cannot be moved
//! to another row).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use scm_proto::crypto::{self, KEY_LEN, SharedKey};

use crate::error::Error;

/// Length of an AES-GCM nonce.
const NONCE_LEN: usize = 12;

/// The master key sealing every shared key stored in the database.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(redacted)")
    }
}

/// A sealed shared key as stored: random nonce followed by ciphertext and tag.
#[derive(Clone)]
pub struct Sealed(pub Vec<u8>);

impl MasterKey {
    /// Builds from raw bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        Self {
            cipher: Aes256Gcm::new(bytes.into()),
        }
    }

    /// Reads the master key file (base64 of 32 bytes, surrounding whitespace ignored).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bytes: [u8; KEY_LEN] = crypto::decode_fixed("master key", text.trim())
            .map_err(|e| Error::Crypto(format!("{}: {e}", path.display())))?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Seals `key` for the row named `key_id`.
    pub fn seal(&self, key_id: &str, key: &SharedKey) -> Result<Sealed, Error> {
        let nonce_bytes: [u8; NONCE_LEN] = crypto::random_bytes();
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce_bytes),
                Payload {
                    msg: key.as_bytes(),
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| Error::Crypto("sealing failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ct);
        Ok(Sealed(out))
    }

    /// Opens a sealed key of the row named `key_id`; fails if either was tampered with or the
    /// master key is not the one that sealed it.
    pub fn open(&self, key_id: &str, sealed: &[u8]) -> Result<SharedKey, Error> {
        if sealed.len() < NONCE_LEN {
            return Err(Error::Crypto(format!("sealed key {key_id} is truncated")));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let pt = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| {
                Error::Crypto(format!(
                    "sealed key {key_id} does not open under this master key"
                ))
            })?;
        let bytes = <[u8; KEY_LEN]>::try_from(pt.as_slice())
            .map_err(|_| Error::Crypto(format!("sealed key {key_id} has a bad length")))?;
        Ok(SharedKey(bytes))
    }
}

/// A secret string (admin token, LDAP bind password) whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// Writes `contents` to a new file with mode 0600, refusing to overwrite.
pub fn write_secret_file(path: &Path, contents: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// A new random master key in its file format.
pub fn new_master_key_text() -> String {
    format!("{}\n", crypto::b64(&crypto::random_bytes::<KEY_LEN>()))
}

/// A new random admin token in its file format.
pub fn new_admin_token_text() -> String {
    format!("{}\n", hex::encode(crypto::random_bytes::<KEY_LEN>()))
}

/// Creates the file with fresh content if it does not exist; returns whether it created it.
pub fn ensure_secret_file(path: &Path, make: fn() -> String) -> Result<bool, Error> {
    if path.exists() {
        return Ok(false);
    }
    write_secret_file(path, &make())?;
    Ok(true)
}

/// Reads a token file, trimmed; refuses an empty one.
pub fn read_token_file(path: &Path) -> Result<String, Error> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let token = text.trim().to_owned();
    if token.len() < 16 {
        return Err(Error::Invalid(format!(
            "{}: token must be at least 16 characters",
            path.display()
        )));
    }
    Ok(token)
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only the length: the bytes are the shared key under the master key.
        write!(
            f,
            "Sealed({} bytes, {})",
            self.0.len(),
            scm_proto::redact::REDACTED
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let mk = MasterKey::from_bytes(&crypto::random_bytes());
        let key = SharedKey::generate();
        let sealed = mk.seal("k1", &key).unwrap();
        assert_eq!(mk.open("k1", &sealed.0).unwrap(), key);
        // The plaintext key does not appear in the sealed bytes.
        assert!(!sealed.0.windows(KEY_LEN).any(|w| w == key.as_bytes()));
        // Bound to the key id.
        assert!(mk.open("k2", &sealed.0).is_err());
        // Any flipped bit fails.
        let mut bad = sealed.0.clone();
        bad[20] ^= 1;
        assert!(mk.open("k1", &bad).is_err());
        assert!(mk.open("k1", &sealed.0[..5]).is_err());
        // Another master key cannot open it.
        let other = MasterKey::from_bytes(&crypto::random_bytes());
        assert!(other.open("k1", &sealed.0).is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            format!("{:?}", Secret("hunter2".into())),
            "Secret(redacted)"
        );
        let mk = MasterKey::from_bytes(&[7; KEY_LEN]);
        assert_eq!(format!("{mk:?}"), "MasterKey(redacted)");
    }

    #[test]
    fn secret_files_are_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/master.key");
        assert!(ensure_secret_file(&p, new_master_key_text).unwrap());
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = fs::read(&p).unwrap();
        assert!(!ensure_secret_file(&p, new_master_key_text).unwrap());
        assert_eq!(fs::read(&p).unwrap(), before);
        assert!(write_secret_file(&p, "x").is_err());
        MasterKey::load(&p).unwrap();
    }
}
