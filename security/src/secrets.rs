//! Secrets kept in files of their own (the master key, the admin token): writing them with mode
//! 0600 and never over an existing one, and the [`Secret`] string whose `Debug` never shows it.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use crate::error::Error;

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
        crate::fsmode::create_private_dir(parent)?;
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

/// Creates the file with fresh content if it does not exist; returns whether it created it.
pub fn ensure_secret_file(path: &Path, make: fn() -> String) -> Result<bool, Error> {
    if path.exists() {
        return Ok(false);
    }
    write_secret_file(path, &make())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            format!("{:?}", Secret("hunter2".into())),
            "Secret(redacted)"
        );
    }
}
