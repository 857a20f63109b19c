//! `Debug` output for secrets: what hand-written `Debug` impls print in place of a password, key,
//! session id or hash, so `{:?}` in a log line or a panic message never carries one.

use std::fmt;

/// The text a redacted field prints.
pub const REDACTED: &str = "<redacted>";

/// A stand-in field value whose `Debug` is `<redacted>`:
/// `f.debug_struct("X").field("password", &Redacted)`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// The stand-in for an optional secret: `None`, or `Some(<redacted>)`. Whether a secret is set
/// (a local user has a password hash, an activation code was sent) is not itself secret and helps
/// whoever reads the log.
pub fn optional<T>(value: &Option<T>) -> Option<Redacted> {
    value.as_ref().map(|_| Redacted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_the_marker_only() {
        assert_eq!(format!("{Redacted:?}"), "<redacted>");
        assert_eq!(
            format!("{:?}", optional(&Some("s3cret"))),
            "Some(<redacted>)"
        );
        assert_eq!(format!("{:?}", optional::<String>(&None)), "None");
    }
}
