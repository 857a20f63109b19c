//! What an instance keeps in its data directory (`--data-dir`) and where: the SQLite database,
//! the app packages folder, the master key and admin token files and the backup folder (each
//! of the last three movable by a flag), and the start-up check of their modes.

use std::path::{Path, PathBuf};

/// The master key and admin token paths of a data directory, with flags' overrides.
pub fn secret_paths(
    data_dir: &Path,
    master: Option<&PathBuf>,
    token: Option<&PathBuf>,
) -> (PathBuf, PathBuf) {
    (
        master
            .cloned()
            .unwrap_or_else(|| data_dir.join("master.key")),
        token
            .cloned()
            .unwrap_or_else(|| data_dir.join("admin.token")),
    )
}

/// The folder of scheduled backups: `--backup-dir`, or `backups` in the data directory.
pub fn backup_dir(data_dir: &Path, flag: Option<&PathBuf>) -> PathBuf {
    flag.cloned().unwrap_or_else(|| data_dir.join("backups"))
}

/// Warns (see [`crate::fsmode::warn_if_loose`]) about every existing path of an instance whose mode is looser
/// than what the server creates: the data, packages and backup folders, the SQLite database and
/// its WAL files, and the admin token. Returns how many it warned about.
pub fn warn_loose_paths(data_dir: &Path, backup_dir: &Path, admin_token: &Path) -> usize {
    let apps = crate::packages::dir(data_dir);
    let db = data_dir.join("scm.db");
    let wal = data_dir.join("scm.db-wal");
    let shm = data_dir.join("scm.db-shm");
    [
        (data_dir, "the data folder"),
        (apps.as_path(), "the app packages folder"),
        (backup_dir, "the backup folder"),
        (db.as_path(), "the SQLite database"),
        (wal.as_path(), "the SQLite write-ahead log"),
        (shm.as_path(), "the SQLite shared-memory file"),
        (admin_token, "the admin token file"),
    ]
    .into_iter()
    .filter(|(p, what)| crate::fsmode::warn_if_loose(p, what))
    .count()
}
