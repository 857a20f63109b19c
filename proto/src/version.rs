//! App versions: dot-separated non-negative integers ("1", "1.4", "2.10.3"), compared numerically
//! with missing parts taken as zero, so "1.10" is newer than "1.9" and "1.0" equals "1".

use std::cmp::Ordering;
use std::fmt;

/// An app version as the catalog and the update policy compare it.
#[derive(Debug, Clone)]
pub struct AppVersion {
    parts: Vec<u64>,
    text: String,
}

/// A version string that is not dot-separated integers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid app version {0:?}: expected dot-separated integers such as 1.4.2 (at most 8 parts)"
)]
pub struct VersionError(pub String);

impl AppVersion {
    /// Parses `text`, refusing empty parts, signs, spaces and more than 8 parts.
    pub fn parse(text: &str) -> Result<Self, VersionError> {
        let bad = || VersionError(text.chars().take(40).collect());
        let parts = text
            .split('.')
            .map(|p| {
                if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                p.parse::<u64>().map_err(|_| bad())
            })
            .collect::<Result<Vec<_>, _>>()?;
        if parts.len() > 8 {
            return Err(bad());
        }
        Ok(Self {
            parts,
            text: text.to_owned(),
        })
    }

    /// The version as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for AppVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for AppVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        (0..n)
            .map(|i| {
                let a = self.parts.get(i).copied().unwrap_or(0);
                let b = other.parts.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for AppVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for AppVersion {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for AppVersion {}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> AppVersion {
        AppVersion::parse(s).unwrap()
    }

    #[test]
    fn numeric_ordering() {
        assert!(v("1.10") > v("1.9"));
        assert!(v("2") > v("1.99.99"));
        assert_eq!(v("1.0"), v("1"));
        assert!(v("1.0.1") > v("1"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "1.",
            ".1",
            "1..2",
            "-1",
            "1.a",
            "1 .2",
            "v1",
            "1.2.3.4.5.6.7.8.9",
            "9999999999",
        ] {
            assert!(AppVersion::parse(bad).is_err(), "{bad}");
        }
    }
}
