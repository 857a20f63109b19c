//! The master key: its file, AES-256-GCM sealing of shared keys (and assertion signing keys)
//! under it (the key id is the associated data, so a ciphertext cannot be moved to another row),
//! and the backup manifest's HMAC under a key derived from it.

use std::fs;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac as _};
use scm_proto::crypto::{self, KEY_LEN, SharedKey};
use sha2::Sha256;

use crate::error::Error;

/// Length of an AES-GCM nonce.
const NONCE_LEN: usize = 12;

/// HKDF-SHA256 `info` of the key that authenticates backup manifests. A label of its own, so the
/// MAC key is independent of the sealing key and of anything else derived from the master key.
pub const BACKUP_MAC_INFO: &[u8] = b"scm-security backup manifest hmac-sha256 v1";
/// HKDF-SHA256 `info` of the backup key id: names which master key wrote a snapshot, so a
/// restore under another one is told so instead of "tampered".
pub const BACKUP_KEY_ID_INFO: &[u8] = b"scm-security backup key id v1";

/// The master key sealing every shared key stored in the database.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
    backup_mac_key: [u8; KEY_LEN],
    backup_key_id: [u8; 16],
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
        // HKDF-SHA256, no salt (the input is already a uniformly random key).
        let hk = hkdf::Hkdf::<Sha256>::new(None, bytes);
        let mut backup_mac_key = [0u8; KEY_LEN];
        let mut backup_key_id = [0u8; 16];
        // Both lengths are far below HKDF-SHA256's 255 * 32 byte limit.
        let _ = hk.expand(BACKUP_MAC_INFO, &mut backup_mac_key);
        let _ = hk.expand(BACKUP_KEY_ID_INFO, &mut backup_key_id);
        Self {
            cipher: Aes256Gcm::new(bytes.into()),
            backup_mac_key,
            backup_key_id,
        }
    }

    /// Reads the master key file (base64 of 32 bytes, surrounding whitespace ignored). Refuses a
    /// file that its group or others may access (mode looser than 0600).
    pub fn load(path: &Path) -> Result<Self, Error> {
        crate::fsmode::require_private_file(path, "master key file")?;
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bytes: [u8; KEY_LEN] = crypto::decode_fixed("master key", text.trim())
            .map_err(|e| Error::Crypto(format!("{}: {e}", path.display())))?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Seals `key` for the row named `key_id`.
    pub fn seal(&self, key_id: &str, key: &SharedKey) -> Result<Sealed, Error> {
        self.seal_bytes(key_id, key.as_bytes())
    }

    /// Opens a sealed key of the row named `key_id`; fails if either was tampered with or the
    /// master key is not the one that sealed it.
    pub fn open(&self, key_id: &str, sealed: &[u8]) -> Result<SharedKey, Error> {
        let pt = self.open_as("key", key_id, sealed)?;
        let bytes = <[u8; KEY_LEN]>::try_from(pt.as_slice())
            .map_err(|_| Error::Crypto(format!("sealed key {key_id} has a bad length")))?;
        Ok(SharedKey(bytes))
    }

    fn backup_hmac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        <Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.backup_mac_key)
            .expect("HMAC accepts a 32-byte key")
    }

    /// HMAC-SHA256 of a backup manifest's bytes under the derived backup key.
    pub fn backup_mac(&self, manifest: &[u8]) -> [u8; 32] {
        let mut m = self.backup_hmac();
        m.update(manifest);
        m.finalize().into_bytes().into()
    }

    /// Whether `mac` is the manifest's MAC (compared in constant time).
    pub fn verify_backup_mac(&self, manifest: &[u8], mac: &[u8]) -> bool {
        let mut m = self.backup_hmac();
        m.update(manifest);
        m.verify_slice(mac).is_ok()
    }

    /// Hex id of the backup key (not secret: an HKDF output under its own label).
    pub fn backup_key_id(&self) -> String {
        hex::encode(self.backup_key_id)
    }

    /// Seals a secret of any length (an assertion signing key's PKCS#8) bound to `aad`, in the
    /// same format as [`MasterKey::seal`]. Callers choose `aad`s that cannot equal a device key
    /// id, so a sealed value cannot be moved between the two kinds of row.
    pub fn seal_bytes(&self, aad: &str, secret: &[u8]) -> Result<Sealed, Error> {
        let nonce_bytes: [u8; NONCE_LEN] = crypto::random_bytes();
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce_bytes),
                Payload {
                    msg: secret,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| Error::Crypto("sealing failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ct);
        Ok(Sealed(out))
    }

    /// Opens what [`MasterKey::seal_bytes`] sealed for `aad`.
    pub fn open_bytes(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>, Error> {
        self.open_as("secret", aad, sealed)
    }

    /// Opens `sealed` (nonce ‖ ciphertext) for `aad`; `what` names it in the errors.
    fn open_as(&self, what: &str, aad: &str, sealed: &[u8]) -> Result<Vec<u8>, Error> {
        if sealed.len() < NONCE_LEN {
            return Err(Error::Crypto(format!("sealed {what} {aad} is truncated")));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| {
                Error::Crypto(format!(
                    "sealed {what} {aad} does not open under this master key"
                ))
            })
    }
}

/// A new random master key in its file format.
pub fn new_master_key_text() -> String {
    format!("{}\n", crypto::b64(&crypto::random_bytes::<KEY_LEN>()))
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
    use crate::secrets::{ensure_secret_file, write_secret_file};
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
    fn the_master_key_is_redacted() {
        let mk = MasterKey::from_bytes(&[7; KEY_LEN]);
        assert_eq!(format!("{mk:?}"), "MasterKey(redacted)");
    }

    #[test]
    fn backup_mac_is_keyed_and_labelled() {
        let a = MasterKey::from_bytes(&[1; KEY_LEN]);
        let b = MasterKey::from_bytes(&[2; KEY_LEN]);
        let mac = a.backup_mac(b"manifest");
        assert!(a.verify_backup_mac(b"manifest", &mac));
        assert!(!a.verify_backup_mac(b"manifesT", &mac));
        assert!(!a.verify_backup_mac(b"manifest", &mac[..31]));
        assert!(!b.verify_backup_mac(b"manifest", &mac));
        assert_ne!(a.backup_key_id(), b.backup_key_id());
        // Neither derived value is the master key itself or the other derived value.
        assert_ne!(a.backup_mac_key, [1; KEY_LEN]);
        assert_ne!(&a.backup_mac_key[..16], &a.backup_key_id[..]);
    }

    #[test]
    fn a_loose_master_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        write_secret_file(&p, &new_master_key_text()).unwrap();
        MasterKey::load(&p).unwrap();
        for loose in [0o640, 0o604, 0o644, 0o660] {
            fs::set_permissions(&p, fs::Permissions::from_mode(loose)).unwrap();
            let e = MasterKey::load(&p).unwrap_err().to_string();
            assert!(
                e.contains("looser than 0600") && e.contains("chmod 600"),
                "{e}"
            );
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        MasterKey::load(&p).unwrap();
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
