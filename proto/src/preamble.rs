//! The preamble: the one binary frame a device sends a proxy right after the TLS handshake, and
//! the proxy's one-frame reply. Parsing is a plain function over bytes, so it is unit-tested here
//! and fuzzed later. [`Preamble::sign`] and [`Preamble::verify`] are the one place the binding
//! MAC is put on a preamble and checked, for the device and the proxy alike.
//!
//! ```text
//! preamble = version:u8 (=1) | body_len:u16be (<= MAX_BODY_LEN) | body
//! body     = str8 session_id | str8 app_id | str8 app_version | str8 device_id | str8 resource
//!          | mac:[u8; 32]
//! str8     = len:u8 | bytes (visible ASCII 0x21..=0x7e, len within the field's limit)
//! reply    = version:u8 (=1) | status:u8 | reason_len:u16be (<= MAX_REASON_LEN) | reason (UTF-8)
//! ```

use crate::crypto::{BindingTranscript, MacBytes, SessionKey, binding_mac, verify_binding_mac};

/// The only preamble version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body: version and body length.
pub const HEADER_LEN: usize = 3;
/// Largest body accepted; anything longer is refused before it is read.
pub const MAX_BODY_LEN: usize = 512;
/// Largest reason text in a reply.
pub const MAX_REASON_LEN: usize = 512;
/// Bytes before the reason in a reply.
pub const REPLY_HEADER_LEN: usize = 4;

const MAC_LEN: usize = 32;

/// Per-field length limits, in bytes.
const LIMITS: [(&str, usize); 5] = [
    ("session id", 64),
    ("app id", 64),
    ("app version", 32),
    ("device id", 128),
    ("resource", 128),
];

/// Why a preamble was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PreambleError {
    /// The version byte is not one this build speaks.
    #[error("unsupported preamble version {0} (this proxy speaks version {VERSION})")]
    Version(u8),
    /// The declared body is larger than [`MAX_BODY_LEN`].
    #[error("preamble body of {0} bytes exceeds the limit of {MAX_BODY_LEN}")]
    TooLong(usize),
    /// The frame ended before a field did.
    #[error("preamble truncated in {0}")]
    Truncated(&'static str),
    /// A string field is empty, too long, or has bytes outside visible ASCII.
    #[error("preamble field {field} is invalid: {why}")]
    BadField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Bytes remain after the MAC.
    #[error("preamble has {0} bytes after the MAC")]
    Trailing(usize),
}

/// The fields of a device's preamble.
#[derive(Clone, PartialEq, Eq)]
pub struct Preamble {
    /// The session id from login (secret: never logged).
    pub session_id: String,
    /// The app the connection belongs to.
    pub app_id: String,
    /// That app's version on the device.
    pub app_version: String,
    /// The device id.
    pub device_id: String,
    /// The resource name from the catalog.
    pub resource: String,
    /// HMAC(session key, binding transcript): set by [`Preamble::sign`], checked by
    /// [`Preamble::verify`].
    pub mac: MacBytes,
}

impl std::fmt::Debug for Preamble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preamble")
            .field("session", &crate::crypto::session_tag(&self.session_id))
            .field("app_id", &self.app_id)
            .field("app_version", &self.app_version)
            .field("device_id", &self.device_id)
            .field("resource", &self.resource)
            .finish_non_exhaustive()
    }
}

/// Reads the header and says how many body bytes follow, refusing a bad version or a body over
/// the limit before any of it is read.
pub fn body_len(header: &[u8; HEADER_LEN]) -> Result<usize, PreambleError> {
    if header[0] != VERSION {
        return Err(PreambleError::Version(header[0]));
    }
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    if len > MAX_BODY_LEN {
        return Err(PreambleError::TooLong(len));
    }
    if len == 0 {
        return Err(PreambleError::Truncated("body"));
    }
    Ok(len)
}

fn check_text(field: &'static str, limit: usize, bytes: &[u8]) -> Result<(), PreambleError> {
    if bytes.is_empty() {
        return Err(PreambleError::BadField {
            field,
            why: "empty",
        });
    }
    if bytes.len() > limit {
        return Err(PreambleError::BadField {
            field,
            why: "too long",
        });
    }
    if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(PreambleError::BadField {
            field,
            why: "not visible ASCII",
        });
    }
    Ok(())
}

impl Preamble {
    /// What the binding MAC covers: this TLS connection's exporter and every field of this
    /// preamble, so none of them can be swapped.
    pub fn transcript<'a>(&'a self, exporter: &'a [u8]) -> BindingTranscript<'a> {
        BindingTranscript {
            exporter,
            session_id: &self.session_id,
            app_id: &self.app_id,
            app_version: &self.app_version,
            device_id: &self.device_id,
            resource: &self.resource,
        }
    }

    /// Puts the binding MAC on this preamble: made with the session key over the exporter of the
    /// TLS connection it will travel on (the device's side).
    pub fn sign(&mut self, key: &SessionKey, exporter: &[u8]) {
        self.mac = binding_mac(key, &self.transcript(exporter));
    }

    /// [`Preamble::sign`], by value.
    #[must_use]
    pub fn signed(mut self, key: &SessionKey, exporter: &[u8]) -> Self {
        self.sign(key, exporter);
        self
    }

    /// Whether the MAC was made with `key` over this connection's `exporter` and these fields
    /// (the proxy's side). The comparison is constant-time, so a forger learns nothing from how
    /// long a refusal takes.
    pub fn verify(&self, key: &SessionKey, exporter: &[u8]) -> bool {
        verify_binding_mac(key, &self.transcript(exporter), &self.mac)
    }

    /// Decodes a body (the bytes after the header).
    pub fn decode_body(body: &[u8]) -> Result<Self, PreambleError> {
        let mut rest = body;
        let mut fields: [String; 5] = Default::default();
        for ((name, limit), slot) in LIMITS.iter().zip(fields.iter_mut()) {
            let (&len, tail) = rest.split_first().ok_or(PreambleError::Truncated(name))?;
            let len = usize::from(len);
            if tail.len() < len {
                return Err(PreambleError::Truncated(name));
            }
            let (text, tail) = tail.split_at(len);
            check_text(name, *limit, text)?;
            // check_text admitted only ASCII, so this cannot fail.
            *slot = String::from_utf8_lossy(text).into_owned();
            rest = tail;
        }
        if rest.len() < MAC_LEN {
            return Err(PreambleError::Truncated("mac"));
        }
        let (mac, tail) = rest.split_at(MAC_LEN);
        if !tail.is_empty() {
            return Err(PreambleError::Trailing(tail.len()));
        }
        let [session_id, app_id, app_version, device_id, resource] = fields;
        Ok(Self {
            session_id,
            app_id,
            app_version,
            device_id,
            resource,
            mac: mac
                .try_into()
                .map_err(|_| PreambleError::Truncated("mac"))?,
        })
    }

    /// Decodes a whole frame, header included.
    pub fn decode(frame: &[u8]) -> Result<Self, PreambleError> {
        let header: &[u8; HEADER_LEN] = frame
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(PreambleError::Truncated("header"))?;
        let len = body_len(header)?;
        let body = &frame[HEADER_LEN..];
        if body.len() < len {
            return Err(PreambleError::Truncated("body"));
        }
        if body.len() > len {
            return Err(PreambleError::Trailing(body.len() - len));
        }
        Self::decode_body(body)
    }

    /// Encodes the frame, checking every field as the decoder will.
    pub fn encode(&self) -> Result<Vec<u8>, PreambleError> {
        let texts = [
            &self.session_id,
            &self.app_id,
            &self.app_version,
            &self.device_id,
            &self.resource,
        ];
        let mut body = Vec::with_capacity(MAX_BODY_LEN);
        for ((name, limit), text) in LIMITS.iter().zip(texts) {
            check_text(name, *limit, text.as_bytes())?;
            body.push(text.len() as u8);
            body.extend_from_slice(text.as_bytes());
        }
        body.extend_from_slice(&self.mac);
        if body.len() > MAX_BODY_LEN {
            return Err(PreambleError::TooLong(body.len()));
        }
        let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
        frame.push(VERSION);
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        Ok(frame)
    }
}

/// The outcome a proxy reports in its reply. The numbers are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum Status {
    /// Accepted: relaying starts right after the reply.
    Ok = 0,
    /// The preamble could not be parsed, was too large, or came too slowly.
    BadPreamble = 1,
    /// The session is unknown, expired, logged out or revoked.
    SessionInvalid = 2,
    /// The binding MAC does not match this TLS connection.
    BindingFailed = 3,
    /// The app context does not match the session, or the app version is not allowed.
    AppRefused = 4,
    /// The resource does not exist.
    UnknownResource = 5,
    /// The user's groups do not allow this resource.
    Forbidden = 6,
    /// The back end could not be reached.
    BackendUnavailable = 7,
    /// No Security server answered the validation.
    SecurityUnavailable = 8,
    /// The proxy failed in a way that is not the device's fault.
    Internal = 9,
    /// This source is sending too many bad preambles or connections.
    RateLimited = 10,
}

impl Status {
    const ALL: [Status; 11] = [
        Status::Ok,
        Status::BadPreamble,
        Status::SessionInvalid,
        Status::BindingFailed,
        Status::AppRefused,
        Status::UnknownResource,
        Status::Forbidden,
        Status::BackendUnavailable,
        Status::SecurityUnavailable,
        Status::Internal,
        Status::RateLimited,
    ];

    /// The status for a byte read off the wire.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u8 == b)
    }

    /// A stable snake_case name for logs and metrics labels.
    pub fn code(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadPreamble => "bad_preamble",
            Status::SessionInvalid => "session_invalid",
            Status::BindingFailed => "binding_failed",
            Status::AppRefused => "app_refused",
            Status::UnknownResource => "unknown_resource",
            Status::Forbidden => "forbidden",
            Status::BackendUnavailable => "backend_unavailable",
            Status::SecurityUnavailable => "security_unavailable",
            Status::Internal => "internal",
            Status::RateLimited => "rate_limited",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// Why a reply could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// The version byte is not one this build speaks.
    #[error("unsupported reply version {0}")]
    Version(u8),
    /// The status byte is unknown.
    #[error("unknown reply status {0}")]
    UnknownStatus(u8),
    /// The reason is over the limit.
    #[error("reply reason of {0} bytes exceeds the limit of {MAX_REASON_LEN}")]
    TooLong(usize),
}

/// The proxy's reply to a preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The outcome.
    pub status: Status,
    /// A human-readable reason (empty on success).
    pub reason: String,
}

impl Reply {
    /// Encodes the reply, cutting the reason at the limit on a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut reason = self.reason.as_str();
        while reason.len() > MAX_REASON_LEN {
            let mut cut = MAX_REASON_LEN;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason = &reason[..cut];
        }
        let mut out = Vec::with_capacity(REPLY_HEADER_LEN + reason.len());
        out.push(VERSION);
        out.push(self.status as u8);
        out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
        out
    }

    /// Reads the reply header: the status and how many reason bytes follow.
    pub fn decode_header(header: &[u8; REPLY_HEADER_LEN]) -> Result<(Status, usize), ReplyError> {
        if header[0] != VERSION {
            return Err(ReplyError::Version(header[0]));
        }
        let status = Status::from_u8(header[1]).ok_or(ReplyError::UnknownStatus(header[1]))?;
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if len > MAX_REASON_LEN {
            return Err(ReplyError::TooLong(len));
        }
        Ok((status, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Preamble {
        Preamble {
            session_id: "A".repeat(43),
            app_id: "mail".into(),
            app_version: "1.4.2".into(),
            device_id: "phone-1".into(),
            resource: "intranet".into(),
            mac: [7; 32],
        }
    }

    #[test]
    fn round_trip() {
        let frame = sample().encode().unwrap();
        assert_eq!(Preamble::decode(&frame).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_refused() {
        let frame = sample().encode().unwrap();
        for cut in 0..frame.len() {
            assert!(Preamble::decode(&frame[..cut]).is_err(), "cut at {cut}");
        }
        let body = &frame[HEADER_LEN..];
        for cut in 0..body.len() {
            assert!(matches!(
                Preamble::decode_body(&body[..cut]),
                Err(PreambleError::Truncated(_))
            ));
        }
    }

    #[test]
    fn header_checks_come_first() {
        assert_eq!(body_len(&[2, 0, 10]), Err(PreambleError::Version(2)));
        assert_eq!(
            body_len(&[1, 0xff, 0xff]),
            Err(PreambleError::TooLong(65535))
        );
        assert_eq!(body_len(&[1, 0, 0]), Err(PreambleError::Truncated("body")));
        assert_eq!(body_len(&[1, 0, 80]), Ok(80));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut p = sample();
        p.resource = "bad resource".into();
        assert_eq!(
            p.encode(),
            Err(PreambleError::BadField {
                field: "resource",
                why: "not visible ASCII"
            })
        );
        let mut p = sample();
        p.app_id = String::new();
        assert!(matches!(
            p.encode(),
            Err(PreambleError::BadField {
                field: "app id",
                ..
            })
        ));
        let mut p = sample();
        p.app_version = "1".repeat(33);
        assert!(matches!(
            p.encode(),
            Err(PreambleError::BadField {
                why: "too long",
                ..
            })
        ));
        let mut frame = sample().encode().unwrap();
        frame.push(0);
        frame[2] += 1;
        assert_eq!(Preamble::decode(&frame), Err(PreambleError::Trailing(1)));
    }

    #[test]
    fn sign_then_verify_is_tied_to_key_connection_and_every_field() {
        let key = SessionKey([9; 32]);
        let p = sample().signed(&key, &[1; 32]);
        assert_ne!(p.mac, sample().mac);
        assert!(p.verify(&key, &[1; 32]));
        assert!(!p.verify(&key, &[2; 32]), "another connection");
        assert!(!p.verify(&SessionKey([8; 32]), &[1; 32]), "another key");
        let swaps: [fn(&mut Preamble); 5] = [
            |p| p.session_id.push('B'),
            |p| p.app_id.push('x'),
            |p| p.app_version.push('1'),
            |p| p.device_id.push('2'),
            |p| p.resource.push('s'),
        ];
        for swap in swaps {
            let mut q = p.clone();
            swap(&mut q);
            assert!(!q.verify(&key, &[1; 32]), "{q:?}");
        }
        // What is signed survives the wire.
        let back = Preamble::decode(&p.encode().unwrap()).unwrap();
        assert!(back.verify(&key, &[1; 32]));
    }

    #[test]
    fn debug_never_shows_the_session_id() {
        assert!(!format!("{:?}", sample()).contains(&"A".repeat(43)));
    }

    #[test]
    fn reply_round_trip_and_limits() {
        let r = Reply {
            status: Status::Forbidden,
            reason: "é".repeat(400),
        };
        let bytes = r.encode();
        let (status, len) = Reply::decode_header(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(status, Status::Forbidden);
        assert!(len <= MAX_REASON_LEN);
        assert!(std::str::from_utf8(&bytes[4..]).is_ok());
        assert_eq!(
            Reply::decode_header(&[1, 99, 0, 0]),
            Err(ReplyError::UnknownStatus(99))
        );
        for s in Status::ALL {
            assert_eq!(Status::from_u8(s as u8), Some(s));
        }
    }
}
