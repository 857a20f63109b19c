//! Key material and the derivations every party computes: the login proof, the session key and the
//! channel-binding MAC. All comparisons of secrets go through [`ct_eq`].
//!
//! Every MAC input is a transcript of length-prefixed fields under a distinct label, so no two
//! messages (and no two kinds of message) can share a byte string.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

type HmacSha256 = Hmac<Sha256>;

/// Length in bytes of shared keys, session keys, nonces and MACs.
pub const KEY_LEN: usize = 32;
/// Length in bytes of a session id before encoding (256 bits from the OS CSPRNG).
pub const SESSION_ID_LEN: usize = 32;

const LOGIN_LABEL: &[u8] = b"scm login proof v1";
const SESSION_KEY_INFO: &[u8] = b"scm session key v1";
const BINDING_LABEL: &[u8] = b"scm channel binding v1";
const TAG_LABEL: &[u8] = b"scm session tag v1";

/// A decoding failure of key material received as text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not valid base64.
    #[error("{what}: not valid base64")]
    Base64 {
        /// Which value was being decoded.
        what: &'static str,
    },
    /// The decoded value has the wrong length.
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        /// Which value was being decoded.
        what: &'static str,
        /// The required length.
        expected: usize,
        /// The length received.
        got: usize,
    },
}

/// Decodes standard base64 into exactly `N` bytes.
pub fn decode_fixed<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N], KeyError> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| KeyError::Base64 { what })?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length {
        what,
        expected: N,
        got: bytes.len(),
    })
}

/// Encodes bytes as standard base64, the encoding of every binary value in the JSON APIs.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Fills an array from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut out);
    out
}

/// Constant-time equality of two byte strings (lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

macro_rules! secret_bytes {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(pub [u8; KEY_LEN]);

        impl $name {
            /// A fresh random value from the OS CSPRNG.
            pub fn generate() -> Self {
                Self(random_bytes())
            }

            /// Decodes the base64 form used on the wire.
            pub fn from_b64(text: &str) -> Result<Self, KeyError> {
                decode_fixed($what, text).map(Self)
            }

            /// The base64 form used on the wire.
            pub fn to_b64(&self) -> String {
                b64(&self.0)
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(redacted)"))
            }
        }
    };
}

secret_bytes!(
    /// The 256-bit key shared by the Security server and one enrolled (user, device, app).
    SharedKey,
    "shared key"
);
secret_bytes!(
    /// The per-session key, derived by both ends and never sent by the device or the server to
    /// anyone but an authenticated proxy.
    SessionKey,
    "session key"
);

/// A 256-bit nonce (server challenge or client nonce).
pub type Nonce = [u8; KEY_LEN];
/// A HMAC-SHA256 output.
pub type MacBytes = [u8; KEY_LEN];

/// A session id: 256 random bits, carried as unpadded base64url text (43 characters).
///
/// Its `Debug` and `Display` never show the id; use [`SessionId::tag`] in logs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// Encoded length of a session id.
    pub const ENCODED_LEN: usize = 43;

    /// A new session id from the OS CSPRNG.
    pub fn generate() -> Self {
        Self(URL_SAFE_NO_PAD.encode(random_bytes::<SESSION_ID_LEN>()))
    }

    /// Accepts a session id received from the outside if it has the exact shape of one.
    pub fn parse(text: &str) -> Option<Self> {
        let ok = text.len() == Self::ENCODED_LEN
            && URL_SAFE_NO_PAD
                .decode(text)
                .is_ok_and(|b| b.len() == SESSION_ID_LEN);
        ok.then(|| Self(text.to_owned()))
    }

    /// The id's text, for the wire only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A non-secret tag naming this session in logs, metrics and the revocation stream.
    pub fn tag(&self) -> SessionTag {
        session_tag(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId(tag {})", self.tag())
    }
}

/// A one-way tag of a session id: the first 16 bytes of SHA-256 over a label and the id, as hex.
/// Safe to log; knowing it does not let anyone use the session.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionTag(pub String);

impl fmt::Display for SessionTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Computes the [`SessionTag`] of a session id's text.
pub fn session_tag(session_id: &str) -> SessionTag {
    let mut h = Sha256::new();
    h.update(TAG_LABEL);
    h.update(session_id.as_bytes());
    SessionTag(hex::encode(&h.finalize()[..16]))
}

/// Appends length-prefixed fields to a MAC so field boundaries are unambiguous.
fn mac_fields(key: &[u8], label: &[u8], fields: &[&[u8]]) -> MacBytes {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for field in std::iter::once(&label).chain(fields.iter()) {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac.finalize().into_bytes().into()
}

/// What a login proof covers: the server's single-use challenge and everything the device claims.
#[derive(Debug, Clone)]
pub struct LoginTranscript<'a> {
    /// Id of the challenge the server issued.
    pub challenge_id: &'a str,
    /// The server's nonce from that challenge.
    pub server_nonce: &'a Nonce,
    /// The device's fresh nonce.
    pub client_nonce: &'a Nonce,
    /// The user name as typed (`user` or `user@site`).
    pub username: &'a str,
    /// The enrolled key's id.
    pub key_id: &'a str,
    /// The device id.
    pub device_id: &'a str,
    /// The app id.
    pub app_id: &'a str,
    /// The app version the device runs.
    pub app_version: &'a str,
}

impl LoginTranscript<'_> {
    fn mac(&self, key: &SharedKey) -> MacBytes {
        mac_fields(
            key.as_bytes(),
            LOGIN_LABEL,
            &[
                self.challenge_id.as_bytes(),
                self.server_nonce,
                self.client_nonce,
                self.username.as_bytes(),
                self.key_id.as_bytes(),
                self.device_id.as_bytes(),
                self.app_id.as_bytes(),
                self.app_version.as_bytes(),
            ],
        )
    }
}

/// The device's proof of possession of its shared key for one login.
pub fn login_mac(key: &SharedKey, transcript: &LoginTranscript<'_>) -> MacBytes {
    transcript.mac(key)
}

/// Checks a login proof in constant time.
pub fn verify_login_mac(key: &SharedKey, transcript: &LoginTranscript<'_>, mac: &[u8]) -> bool {
    ct_eq(&transcript.mac(key), mac)
}

/// Derives the session key: HKDF-SHA256 with the shared key as input keying material, both nonces
/// as salt, and the session id in the info, so each session has its own key.
pub fn derive_session_key(
    key: &SharedKey,
    server_nonce: &Nonce,
    client_nonce: &Nonce,
    session_id: &SessionId,
) -> SessionKey {
    let mut salt = [0u8; 2 * KEY_LEN];
    salt[..KEY_LEN].copy_from_slice(server_nonce);
    salt[KEY_LEN..].copy_from_slice(client_nonce);
    let hk = Hkdf::<Sha256>::new(Some(&salt), key.as_bytes());
    let mut okm = [0u8; KEY_LEN];
    let mut info = Vec::with_capacity(SESSION_KEY_INFO.len() + SessionId::ENCODED_LEN);
    info.extend_from_slice(SESSION_KEY_INFO);
    info.extend_from_slice(session_id.expose().as_bytes());
    hk.expand(&info, &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SessionKey(okm)
}

/// What the channel-binding MAC covers: the TLS exporter of the connection the preamble travels on
/// and every field of the preamble, so nothing in it can be swapped.
#[derive(Clone)]
pub struct BindingTranscript<'a> {
    /// `export_keying_material(BINDING_EXPORTER_LABEL, None)` of this TLS connection.
    pub exporter: &'a [u8],
    /// The session id's text.
    pub session_id: &'a str,
    /// App id.
    pub app_id: &'a str,
    /// App version.
    pub app_version: &'a str,
    /// Device id.
    pub device_id: &'a str,
    /// The resource asked for.
    pub resource: &'a str,
}

/// The binding MAC a device puts in its preamble.
pub fn binding_mac(key: &SessionKey, t: &BindingTranscript<'_>) -> MacBytes {
    mac_fields(
        key.as_bytes(),
        BINDING_LABEL,
        &[
            t.exporter,
            t.session_id.as_bytes(),
            t.app_id.as_bytes(),
            t.app_version.as_bytes(),
            t.device_id.as_bytes(),
            t.resource.as_bytes(),
        ],
    )
}

/// Checks a binding MAC in constant time.
pub fn verify_binding_mac(key: &SessionKey, t: &BindingTranscript<'_>, mac: &[u8]) -> bool {
    ct_eq(&binding_mac(key, t), mac)
}

impl fmt::Debug for BindingTranscript<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The session id is secret: its tag names the session instead.
        f.debug_struct("BindingTranscript")
            .field("exporter", &hex::encode(self.exporter))
            .field("session_id", &crate::redact::Redacted)
            .field("session_tag", &session_tag(self.session_id))
            .field("app_id", &self.app_id)
            .field("app_version", &self.app_version)
            .field("device_id", &self.device_id)
            .field("resource", &self.resource)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(sn: &'a Nonce, cn: &'a Nonce) -> LoginTranscript<'a> {
        LoginTranscript {
            challenge_id: "c1",
            server_nonce: sn,
            client_nonce: cn,
            username: "alice",
            key_id: "k1",
            device_id: "dev",
            app_id: "mail",
            app_version: "1.2.0",
        }
    }

    #[test]
    fn login_mac_verifies_only_with_the_same_key_and_transcript() {
        let key = SharedKey::generate();
        let (sn, cn) = (random_bytes(), random_bytes());
        let mac = login_mac(&key, &transcript(&sn, &cn));
        assert!(verify_login_mac(&key, &transcript(&sn, &cn), &mac));
        assert!(!verify_login_mac(
            &SharedKey::generate(),
            &transcript(&sn, &cn),
            &mac
        ));
        let other_nonce = random_bytes();
        assert!(!verify_login_mac(
            &key,
            &transcript(&other_nonce, &cn),
            &mac
        ));
        let mut t = transcript(&sn, &cn);
        t.username = "mallory";
        assert!(!verify_login_mac(&key, &t, &mac));
        assert!(!verify_login_mac(&key, &transcript(&sn, &cn), &mac[..31]));
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let key = SharedKey::generate();
        let (sn, cn) = (random_bytes(), random_bytes());
        let mut a = transcript(&sn, &cn);
        a.device_id = "ab";
        a.app_id = "c";
        let mut b = transcript(&sn, &cn);
        b.device_id = "a";
        b.app_id = "bc";
        assert_ne!(login_mac(&key, &a), login_mac(&key, &b));
    }

    #[test]
    fn session_key_depends_on_both_nonces_and_the_session() {
        let key = SharedKey::generate();
        let (sn, cn) = (random_bytes(), random_bytes());
        let sid = SessionId::generate();
        let k1 = derive_session_key(&key, &sn, &cn, &sid);
        assert_eq!(k1, derive_session_key(&key, &sn, &cn, &sid));
        assert_ne!(k1, derive_session_key(&key, &cn, &sn, &sid));
        assert_ne!(
            k1,
            derive_session_key(&key, &sn, &cn, &SessionId::generate())
        );
        assert_ne!(k1.as_bytes(), key.as_bytes());
    }

    #[test]
    fn binding_mac_is_tied_to_the_exporter() {
        let key = SessionKey::generate();
        let t = BindingTranscript {
            exporter: &[1; 32],
            session_id: "s",
            app_id: "a",
            app_version: "1",
            device_id: "d",
            resource: "r",
        };
        let mac = binding_mac(&key, &t);
        assert!(verify_binding_mac(&key, &t, &mac));
        let other = BindingTranscript {
            exporter: &[2; 32],
            ..t.clone()
        };
        assert!(!verify_binding_mac(&key, &other, &mac));
        let other = BindingTranscript {
            resource: "admin",
            ..t
        };
        assert!(!verify_binding_mac(&key, &other, &mac));
    }

    #[test]
    fn session_ids_are_random_well_formed_and_never_printed() {
        let a = SessionId::generate();
        assert_eq!(a.expose().len(), SessionId::ENCODED_LEN);
        assert_ne!(a, SessionId::generate());
        assert_eq!(SessionId::parse(a.expose()), Some(a.clone()));
        assert_eq!(SessionId::parse("short"), None);
        assert_eq!(SessionId::parse(&"!".repeat(43)), None);
        assert!(!format!("{a:?}").contains(a.expose()));
        assert_eq!(a.tag(), session_tag(a.expose()));
        assert_eq!(a.tag().0.len(), 32);
    }

    #[test]
    fn binding_transcript_debug_hides_the_session_id() {
        let sid = SessionId::generate();
        let t = BindingTranscript {
            exporter: &[1; 32],
            session_id: sid.expose(),
            app_id: "mail",
            app_version: "1.0",
            device_id: "phone",
            resource: "intranet",
        };
        let printed = format!("{t:?}");
        assert!(!printed.contains(sid.expose()), "{printed}");
        assert!(printed.contains(&sid.tag().0) && printed.contains("intranet"));
        let k = SessionKey::generate();
        assert!(!format!("{k:?}").contains(&hex::encode(k.as_bytes())));
        assert!(!format!("{k:?}").contains(&k.to_b64()));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let k = SharedKey::generate();
        assert_eq!(format!("{k:?}"), "SharedKey(redacted)");
        assert!(SharedKey::from_b64("!!").is_err());
        assert_eq!(
            SharedKey::from_b64(&b64(&[0; 5])),
            Err(KeyError::Length {
                what: "shared key",
                expected: 32,
                got: 5
            })
        );
        assert_eq!(SharedKey::from_b64(&k.to_b64()), Ok(k));
    }
}
