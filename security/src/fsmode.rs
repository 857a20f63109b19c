//! File modes of what the Security server keeps on disk: folders it creates are 0700, files it
//! creates (database, packages, snapshots) 0600, an existing path with looser modes is reported
//! when the server starts ([`crate::data_dir::warn_loose_paths`]), and the master key file is refused when anyone but its owner may read it.

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use crate::error::Error;

/// Mode of every folder the server creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the server creates.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` and any missing parents with mode 0700 (existing folders are left alone, and
/// reported by [`warn_if_loose`]).
pub fn create_private_dir(path: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(|e| Error::io(path, e))
}

/// Opens a new file for writing with mode 0600, refusing to replace an existing one.
pub fn create_private_file(path: &Path) -> Result<fs::File, Error> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// The permission bits of `path` (None when it does not exist or cannot be read).
pub fn mode(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// The bits that give the group or others any access.
fn loose_bits(mode: u32) -> u32 {
    mode & 0o077
}

/// Logs a warning when `path` exists and its group or others have any access; returns whether
/// it warned. The server keeps running: an operator may share a folder on purpose, but should
/// know that the database and packages are readable there.
pub fn warn_if_loose(path: &Path, what: &str) -> bool {
    let Some(m) = mode(path) else {
        return false;
    };
    if loose_bits(m) == 0 {
        return false;
    }
    let want = if path.is_dir() { DIR_MODE } else { FILE_MODE };
    tracing::warn!(
        path = %path.display(),
        mode = format!("{m:04o}"),
        expected = format!("{want:04o}"),
        "{what} is accessible to other users than its owner; run chmod {want:o} on it"
    );
    true
}

/// Refuses a secret file whose group or others have any access (the master key).
pub fn require_private_file(path: &Path, what: &str) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let m = meta.permissions().mode() & 0o7777;
    if loose_bits(m) != 0 {
        return Err(Error::Invalid(format!(
            "{}: the {what} has mode {m:04o}, looser than 0600: anyone who can read it can open \
             every shared key; run chmod 600 {} (and check who read it)",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_paths_are_private_and_loose_ones_are_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a/b");
        create_private_dir(&d).unwrap();
        assert_eq!(mode(&d), Some(0o700));
        assert_eq!(mode(&tmp.path().join("a")), Some(0o700));
        let f = d.join("f");
        drop(create_private_file(&f).unwrap());
        assert_eq!(mode(&f), Some(0o600));
        assert!(create_private_file(&f).is_err(), "never replaced");
        assert!(!warn_if_loose(&f, "file"));
        assert!(!warn_if_loose(&d, "folder"));
        require_private_file(&f, "master key file").unwrap();

        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(warn_if_loose(&f, "file"));
        assert!(warn_if_loose(&d, "folder"));
        let err = require_private_file(&f, "master key file").unwrap_err();
        assert!(
            err.to_string().contains("mode 0640, looser than 0600"),
            "{err}"
        );
        assert!(!warn_if_loose(&d.join("missing"), "nothing"));
    }
}
