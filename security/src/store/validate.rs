//! Checks of what the APIs and a restore store: identifiers, `host:port` addresses, resource
//! modes.

use std::str::FromStr as _;

use scm_proto::api::ResourceMode;

use crate::error::Error;

/// Validates a name used as an identifier (user, site, resource, app, platform, device).
pub fn check_name(what: &str, text: &str, max: usize) -> Result<(), Error> {
    let ok = !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} must be 1..={max} characters of letters, digits, '.', '_' or '-'"
        )))
    }
}

/// Parses a resource mode name.
pub fn parse_mode(text: &str) -> Result<ResourceMode, Error> {
    match text {
        "tcp" => Ok(ResourceMode::Tcp),
        "http" => Ok(ResourceMode::Http),
        other => Err(Error::Invalid(format!(
            "mode must be tcp or http, not {other:?}"
        ))),
    }
}

/// The name [`parse_mode`] reads back.
pub(super) fn mode_name(mode: ResourceMode) -> &'static str {
    match mode {
        ResourceMode::Tcp => "tcp",
        ResourceMode::Http => "http",
    }
}

/// Parses a `host:port` proxy or back-end address (host may be a name or an IP).
pub fn check_host_port(what: &str, text: &str) -> Result<(), Error> {
    let bad = || Error::Invalid(format!("{what} must be host:port, got {text:?}"));
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || text.len() > 255 || u16::from_str(port).map_or(true, |p| p == 0) {
        return Err(bad());
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-[]:_".contains(&b))
    {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert!(check_name("user", "alice.b-c_1", 64).is_ok());
        for bad in ["", "a b", "a@b", "a/b", &"x".repeat(65)] {
            assert!(check_name("user", bad, 64).is_err(), "{bad}");
        }
        assert!(check_host_port("a", "10.0.0.1:80").is_ok());
        assert!(check_host_port("a", "[::1]:80").is_ok());
        assert!(check_host_port("a", "host.lan:443").is_ok());
        for bad in ["host", ":80", "h:0", "h:99999", "h :1", "h/x:1"] {
            assert!(check_host_port("a", bad).is_err(), "{bad}");
        }
    }
}
