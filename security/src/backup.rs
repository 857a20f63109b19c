//! Backup and restore: a consistent snapshot of the database as one NDJSON file per table plus
//! the app packages, described by a manifest (time, schema version, row counts, sha256 of every
//! file) that is authenticated with an HMAC under a key derived from the master key; the
//! restore that checks all of it (the MAC, every file, every row's fields as the admin API
//! would) before writing into a fresh instance; and the scheduler that `serve` runs (interval,
//! retention, metrics, loud failures).
//!
//! A snapshot is data from outside the running server: a backup folder may sit on a share that
//! others can write. So nothing in it is trusted before the MAC verifies, and even then every
//! name that becomes a path is checked to be `apps/<64 hex>`, so a restore writes only inside
//! the data folder and the download endpoint serves only packages.
//!
//! The snapshot is taken through sqlx inside one read transaction (SQLite: a WAL read
//! transaction; PostgreSQL: `REPEATABLE READ READ ONLY`), so it is consistent without locking
//! writers out, works on a hot standby, needs no `pg_dump` of a matching major version, and
//! restores into either engine. Shared keys stay sealed: the snapshot holds no usable key
//! without the master key file, which is backed up apart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::TryStreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::Row as _;
use sqlx::any::AnyRow;
use tokio_util::sync::CancellationToken;

use crate::error::{DbContext as _, Error};
use crate::fsmode::{create_private_dir, create_private_file};
use crate::master_key::MasterKey;
use crate::store::schema::{Column, ColumnType};
use crate::store::{Backend, Store, latest_schema_version, unix_now};

/// Name of the manifest file inside a snapshot folder.
pub const MANIFEST: &str = "manifest.json";
/// Name of the file holding the manifest's MAC.
pub const MAC_FILE: &str = "manifest.mac";
/// `alg` field of every MAC file.
pub const MAC_ALG: &str = "HMAC-SHA256(HKDF-SHA256(master key, info=\"scm-security backup manifest hmac-sha256 v1\"), manifest.json)";
/// Largest text field a restored row may carry (audit details, LDAP DNs).
const MAX_TEXT: usize = 64 * 1024;
/// `format` field of every manifest.
pub const FORMAT: &str = "scm-security-backup";
/// Version of the snapshot layout.
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of the snapshot folders the scheduler writes.
pub const SNAPSHOT_PREFIX: &str = "scm-backup-";

/// Rows per INSERT statement during a restore.
const BATCH: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    OptText,
    Int,
    OptInt,
    Blob,
}

impl Kind {
    /// The column type and nullability a column of this kind has in the database.
    fn column(self) -> (ColumnType, bool) {
        match self {
            Kind::Text => (ColumnType::Text, false),
            Kind::OptText => (ColumnType::Text, true),
            Kind::Int => (ColumnType::Integer, false),
            Kind::OptInt => (ColumnType::Integer, true),
            Kind::Blob => (ColumnType::Blob, false),
        }
    }
}

/// Every table and column, in restore order: every table of `migrations/` but those in
/// [`NOT_BACKED_UP`]. [`schema_mismatches`] compares it with a migrated database, and the tests
/// run it on both engines, so a migration that adds a table or column fails them until it is
/// added here (with its checks in `check_row`) or excluded there.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "sites",
        &[
            ("name", Kind::Text),
            ("proxy_urls", Kind::Text),
            ("created_at", Kind::Int),
        ],
    ),
    (
        "users",
        &[
            ("name", Kind::Text),
            ("source", Kind::Text),
            ("password_hash", Kind::OptText),
            ("ldap_dn", Kind::OptText),
            ("groups_json", Kind::Text),
            ("site", Kind::Text),
            ("created_at", Kind::Int),
        ],
    ),
    (
        "device_keys",
        &[
            ("key_id", Kind::Text),
            ("user_name", Kind::Text),
            ("device_id", Kind::Text),
            ("app_id", Kind::Text),
            ("sealed_key", Kind::Blob),
            ("created_at", Kind::Int),
            ("revoked_at", Kind::OptInt),
        ],
    ),
    (
        "activation_codes",
        &[
            ("code_hash", Kind::Text),
            ("user_name", Kind::Text),
            ("expires_at", Kind::Int),
            ("used_at", Kind::OptInt),
        ],
    ),
    (
        "app_releases",
        &[
            ("app_id", Kind::Text),
            ("platform", Kind::Text),
            ("version", Kind::Text),
            ("sha256", Kind::Text),
            ("size", Kind::Int),
            ("published_at", Kind::Int),
        ],
    ),
    (
        "app_policies",
        &[
            ("app_id", Kind::Text),
            ("min_version", Kind::OptText),
            ("revoked_versions_json", Kind::Text),
        ],
    ),
    (
        "resources",
        &[
            ("name", Kind::Text),
            ("address", Kind::Text),
            ("mode", Kind::Text),
            ("allowed_groups_json", Kind::Text),
        ],
    ),
    (
        "audit_log",
        &[
            ("id", Kind::Int),
            ("at", Kind::Int),
            ("kind", Kind::Text),
            ("actor", Kind::Text),
            ("subject", Kind::Text),
            ("source", Kind::Text),
            ("detail", Kind::Text),
        ],
    ),
];

/// The tables of the schema that snapshots leave out, each with the reason (also in
/// `docs/operations.md`).
pub const NOT_BACKED_UP: &[(&str, &str)] = &[(
    "assertion_keys",
    "identity assertion signing keys are short-lived: each signs for one \
     --assertion-key-rotation and its tokens expire one --assertion-ttl (an hour at most) later, \
     so a restored instance loses nothing by making a fresh key on its first refresh and \
     publishing it in its JWK Set; a snapshot then never holds a key that signs for the back \
     ends, a restore never brings back keys already retired, and snapshots of layout version 1, \
     which have no such table, still restore",
)];

/// Every column a snapshot holds, as [`Store::columns`] would report it, sorted the same way.
pub fn backed_up_columns() -> Vec<Column> {
    let mut cols: Vec<Column> = TABLES
        .iter()
        .flat_map(|(table, cols)| {
            cols.iter().map(|(name, kind)| {
                let (ty, nullable) = kind.column();
                Column {
                    table: (*table).to_owned(),
                    name: (*name).to_owned(),
                    ty,
                    nullable,
                }
            })
        })
        .collect();
    cols.sort();
    cols
}

/// Where the backup's table list and the schema of `store` (migrated) disagree, one line each:
/// a column of the database that snapshots do not hold (and whose table is not in
/// [`NOT_BACKED_UP`]), a column they hold that the database lacks or types otherwise, an
/// exclusion of a table the database does not have or that is backed up after all. Empty when
/// they agree.
pub async fn schema_mismatches(store: &Store) -> Result<Vec<String>, Error> {
    let excluded = |t: &str| NOT_BACKED_UP.iter().any(|(x, _)| *x == t);
    let live = store.columns().await?;
    let ours = backed_up_columns();
    let mut out = Vec::new();
    for (table, _) in NOT_BACKED_UP {
        if !live.iter().any(|c| c.table == *table) {
            out.push(format!(
                "{table} is in NOT_BACKED_UP but the database has no such table"
            ));
        }
        if ours.iter().any(|c| c.table == *table) {
            out.push(format!(
                "{table} is in NOT_BACKED_UP and in the backup's table list"
            ));
        }
    }
    for c in live.iter().filter(|c| !excluded(&c.table)) {
        match ours.iter().find(|o| o.table == c.table && o.name == c.name) {
            None => out.push(format!(
                "{}.{} ({:?}, nullable: {}) is not in the backup's table list: add it to TABLES \
                 (and its checks to check_row), or its table to NOT_BACKED_UP with the reason",
                c.table, c.name, c.ty, c.nullable
            )),
            Some(o) if o != c => out.push(format!(
                "{}.{} is {:?} (nullable: {}) in the database but {:?} (nullable: {}) in the \
                 backup's table list",
                c.table, c.name, c.ty, c.nullable, o.ty, o.nullable
            )),
            Some(_) => {}
        }
    }
    for o in &ours {
        if !live.iter().any(|c| c.table == o.table && c.name == o.name) {
            out.push(format!(
                "{}.{} is in the backup's table list but not in the database",
                o.table, o.name
            ));
        }
    }
    Ok(out)
}

/// The manifest of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Unix seconds when the snapshot was taken.
    pub created_at: i64,
    /// Version of the scm-security that wrote it.
    pub scm_version: String,
    /// `sqlite` or `postgres`.
    pub source_backend: String,
    /// Newest migration applied to the source database.
    pub schema_version: i64,
    /// One entry per table.
    pub tables: Vec<TableEntry>,
    /// App package files.
    pub files: Vec<FileEntry>,
}

/// A table's file in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TableEntry {
    /// Table name.
    pub table: String,
    /// File name inside the snapshot (NDJSON, one JSON array per row).
    pub file: String,
    /// Rows.
    pub rows: u64,
    /// File size.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

/// Any other file in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path inside the snapshot.
    pub file: String,
    /// File size.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

/// `manifest.mac`: the HMAC of the exact bytes of `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MacFile {
    /// Always [`MAC_ALG`].
    pub alg: String,
    /// Hex id of the backup key ([`MasterKey::backup_key_id`]): which master key wrote it.
    pub key_id: String,
    /// Hex HMAC-SHA256 of `manifest.json`.
    pub mac: String,
}

/// What a restore does with a snapshot that has no `manifest.mac` (written before snapshots
/// were authenticated, or with the file removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unauthenticated {
    /// Refuse it (the default).
    #[default]
    Refuse,
    /// Restore it anyway (`--allow-unauthenticated`), still checking every file and row.
    Allow,
}

impl Manifest {
    /// Rows of one table.
    pub fn rows(&self, table: &str) -> u64 {
        self.tables
            .iter()
            .find(|t| t.table == table)
            .map_or(0, |t| t.rows)
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Backup(msg.into())
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::io(path, e)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn cell(row: &AnyRow, col: &'static str, kind: Kind) -> Result<serde_json::Value, Error> {
    use serde_json::Value;
    Ok(match kind {
        Kind::Text => Value::String(row.try_get(col).db("reading a row")?),
        Kind::OptText => row
            .try_get::<Option<String>, _>(col)
            .db("reading a row")?
            .map_or(Value::Null, Value::String),
        Kind::Int => Value::from(row.try_get::<i64, _>(col).db("reading a row")?),
        Kind::OptInt => row
            .try_get::<Option<i64>, _>(col)
            .db("reading a row")?
            .map_or(Value::Null, Value::from),
        Kind::Blob => {
            Value::String(B64.encode(row.try_get::<Vec<u8>, _>(col).db("reading a row")?))
        }
    })
}

async fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    // std::fs on the blocking pool: every write error (ENOSPC, EROFS) surfaces here, where
    // tokio's buffered file could report it late. Mode 0600: a snapshot holds password hashes.
    let (path, bytes) = (path.to_owned(), bytes.to_vec());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut f = create_private_file(&path)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io(&path, e))
    })
    .await
    .map_err(|e| bad(format!("writing a snapshot file: {e}")))?
}

/// Writes a consistent snapshot of `store` (and the app packages under `data_dir`) into `out`,
/// which must be missing or empty, authenticated under `master`. The MAC and then the manifest
/// are written last, so a folder without a manifest is an unfinished snapshot.
pub async fn snapshot(
    store: &Store,
    master: &MasterKey,
    data_dir: &Path,
    out: &Path,
) -> Result<Manifest, Error> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| io(out, e))?;
        if entries.next().is_some() {
            return Err(bad(format!(
                "{} is not empty: a snapshot goes into a new folder",
                out.display()
            )));
        }
    }
    create_private_dir(&out.join("apps"))?;

    let mut tx = store.pool().begin().await.db("beginning the snapshot")?;
    if store.backend() == Backend::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .db("starting a snapshot transaction")?;
    }
    let schema_version: i64 = sqlx::query(
        "SELECT COALESCE(MAX(version), 0) AS v FROM _sqlx_migrations WHERE success = TRUE",
    )
    .fetch_one(&mut *tx)
    .await
    .db("reading the schema version")?
    .try_get("v")
    .db("reading the schema version")?;

    let mut tables = Vec::new();
    let mut packages: Vec<String> = Vec::new();
    for (table, cols) in TABLES {
        let names: Vec<&str> = cols.iter().map(|(c, _)| *c).collect();
        let order = names[0];
        let sql = format!("SELECT {} FROM {table} ORDER BY {order}", names.join(", "));
        let mut buf = Vec::new();
        let mut rows = 0u64;
        let mut stream = sqlx::query(&sql).fetch(&mut *tx);
        while let Some(row) = stream.try_next().await.db("reading a table")? {
            let mut cells = Vec::with_capacity(cols.len());
            for (c, k) in *cols {
                cells.push(cell(&row, c, *k)?);
            }
            if *table == "app_releases" {
                packages.push(row.try_get("sha256").db("reading a release")?);
            }
            serde_json::to_writer(&mut buf, &cells).map_err(|e| bad(e.to_string()))?;
            buf.push(b'\n');
            rows += 1;
        }
        drop(stream);
        let file = format!("{table}.ndjson");
        write_file(&out.join(&file), &buf).await?;
        tables.push(TableEntry {
            table: (*table).to_owned(),
            file,
            rows,
            bytes: buf.len() as u64,
            sha256: sha256_hex(&buf),
        });
    }
    tx.rollback().await.db("ending the snapshot")?;

    // Packages are content-addressed (named by their sha256), so copying them after the read
    // transaction still matches the rows.
    packages.sort();
    packages.dedup();
    let mut files = Vec::new();
    for sha in packages {
        let src = crate::packages::dir(data_dir).join(&sha);
        let bytes = tokio::fs::read(&src).await.map_err(|e| io(&src, e))?;
        let rel = format!("apps/{sha}");
        write_file(&out.join(&rel), &bytes).await?;
        files.push(FileEntry {
            file: rel,
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        });
    }

    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        created_at: unix_now(),
        scm_version: env!("CARGO_PKG_VERSION").into(),
        source_backend: match store.backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
        .into(),
        schema_version,
        tables,
        files,
    };
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| bad(e.to_string()))?;
    let mac = MacFile {
        alg: MAC_ALG.into(),
        key_id: master.backup_key_id(),
        mac: hex::encode(master.backup_mac(&text)),
    };
    let mac_text = serde_json::to_vec_pretty(&mac).map_err(|e| bad(e.to_string()))?;
    write_file(&out.join(MAC_FILE), &mac_text).await?;
    write_file(&out.join(MANIFEST), &text).await?;
    sync_dir(out);
    Ok(manifest)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Whether `text` is a lowercase hex SHA-256, the only name a package file has.
pub fn is_sha256_hex(text: &str) -> bool {
    crate::packages::is_sha256_hex(text)
}

/// Checks the manifest's MAC under `master`. A missing MAC file is refused unless `unauth` is
/// [`Unauthenticated::Allow`]; a MAC file that is there is always checked.
fn authenticate(
    dir: &Path,
    manifest: &[u8],
    master: &MasterKey,
    unauth: Unauthenticated,
) -> Result<(), Error> {
    let path = dir.join(MAC_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match unauth {
                Unauthenticated::Allow => {
                    tracing::warn!(
                        snapshot = %dir.display(),
                        "the snapshot has no {MAC_FILE}: restoring it unauthenticated \
                         (--allow-unauthenticated); its files and rows are still checked"
                    );
                    Ok(())
                }
                Unauthenticated::Refuse => Err(bad(format!(
                    "{}: missing: the snapshot is not authenticated (written by an scm-security \
                     that did not authenticate backups yet, or the MAC file was removed), so a \
                     restore cannot tell whether it was tampered with; restore it with \
                     --allow-unauthenticated only if you trust where it was kept",
                    path.display()
                ))),
            };
        }
        Err(e) => return Err(io(&path, e)),
    };
    let m: MacFile = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("{}: corrupt MAC file: {e}", path.display())))?;
    if m.alg != MAC_ALG {
        return Err(bad(format!(
            "{}: unknown MAC algorithm {:?} (this scm-security knows {MAC_ALG:?})",
            path.display(),
            m.alg
        )));
    }
    if !scm_proto::crypto::ct_eq(m.key_id.as_bytes(), master.backup_key_id().as_bytes()) {
        return Err(bad(format!(
            "the master key does not open the snapshot's keys: the snapshot was authenticated \
             under backup key id {}, this master key's is {}; restore needs the master key \
             file of the instance that was backed up",
            m.key_id,
            master.backup_key_id()
        )));
    }
    let mac = hex::decode(&m.mac)
        .map_err(|e| bad(format!("{}: the MAC is not hex: {e}", path.display())))?;
    if !master.verify_backup_mac(manifest, &mac) {
        // A manifest that does not even parse was damaged rather than edited: say so.
        if let Err(e) = serde_json::from_slice::<Manifest>(manifest) {
            return Err(bad(format!(
                "{}: corrupt manifest: {e} (and its MAC does not verify)",
                dir.join(MANIFEST).display()
            )));
        }
        return Err(bad(format!(
            "{}: the MAC does not verify: manifest.json was edited after the backup (the \
             snapshot was tampered with) or {MAC_FILE} belongs to another snapshot",
            dir.join(MANIFEST).display()
        )));
    }
    Ok(())
}

/// Reads and checks a snapshot folder without a key: the manifest, the format and schema
/// version, the name, size and sha256 of every file. Returns the manifest and the files'
/// contents by name. It does not check the MAC: [`verify_authenticated`] and [`restore`] do.
pub fn verify(dir: &Path) -> Result<(Manifest, Files), Error> {
    check(dir, None)
}

/// [`verify`], after checking the manifest's MAC under `master` (see [`Unauthenticated`]).
pub fn verify_authenticated(
    dir: &Path,
    master: &MasterKey,
    unauth: Unauthenticated,
) -> Result<(Manifest, Files), Error> {
    check(dir, Some((master, unauth)))
}

fn check(
    dir: &Path,
    auth: Option<(&MasterKey, Unauthenticated)>,
) -> Result<(Manifest, Files), Error> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read(&mpath).map_err(|e| {
        bad(format!(
            "{}: {e}: not a finished snapshot (the manifest is written last)",
            mpath.display()
        ))
    })?;
    if let Some((master, unauth)) = auth {
        authenticate(dir, &text, master, unauth)?;
    }
    let m = parse_manifest(&text, &mpath.display().to_string())?;
    let mut contents = Vec::new();
    let entries = m
        .tables
        .iter()
        .map(|t| (&t.file, t.bytes, &t.sha256))
        .chain(m.files.iter().map(|f| (&f.file, f.bytes, &f.sha256)));
    for (file, bytes, sha) in entries {
        let path = dir.join(file);
        let data = std::fs::read(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        if data.len() as u64 != bytes {
            return Err(bad(format!(
                "{}: {} bytes where the manifest says {bytes}: the snapshot is truncated or corrupt",
                path.display(),
                data.len()
            )));
        }
        if sha256_hex(&data) != *sha {
            return Err(bad(format!(
                "{}: sha256 does not match the manifest: the snapshot is corrupt or was tampered with",
                path.display()
            )));
        }
        contents.push((file.clone(), data));
    }
    Ok((m, contents))
}

/// Parses and checks a snapshot's manifest (`shown` names it in errors): its format and
/// schema version, and that every file it names is one this code writes, so that no name can
/// point outside the snapshot. The files themselves are checked by [`verify`]. Pure: the fuzz
/// target `backup_manifest` runs it on arbitrary bytes.
pub fn parse_manifest(text: &[u8], shown: &str) -> Result<Manifest, Error> {
    let m: Manifest =
        serde_json::from_slice(text).map_err(|e| bad(format!("{shown}: corrupt manifest: {e}")))?;
    if m.format != FORMAT || m.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "{shown}: format {:?} version {} is not {FORMAT} version {FORMAT_VERSION}",
            m.format, m.format_version
        )));
    }
    let ours = latest_schema_version();
    if m.schema_version > ours {
        return Err(bad(format!(
            "the snapshot has schema version {}, newer than this scm-security's {ours} (it was \
             written by scm-security {}): restore it with that version or a newer one",
            m.schema_version, m.scm_version
        )));
    }
    if m.schema_version < ours {
        return Err(bad(format!(
            "the snapshot has schema version {}, older than this scm-security's {ours}: restore \
             it with scm-security {} and upgrade afterwards",
            m.schema_version, m.scm_version
        )));
    }
    // Every name is one this code writes: `<table>.ndjson` for each known table exactly once,
    // `apps/<sha256>` for packages. Anything else could name a path outside the snapshot.
    for (table, _) in TABLES {
        match m.tables.iter().filter(|t| t.table == *table).count() {
            0 => return Err(bad(format!("the manifest lists no file for table {table}"))),
            1 => {}
            n => return Err(bad(format!("the manifest lists table {table} {n} times"))),
        }
    }
    for t in &m.tables {
        if !TABLES.iter().any(|(name, _)| *name == t.table) {
            return Err(bad(format!(
                "the manifest lists an unknown table {:?}",
                t.table
            )));
        }
        if t.file != format!("{}.ndjson", t.table) {
            return Err(bad(format!(
                "the manifest names file {:?} for table {}, not {}.ndjson: refused (a snapshot \
                 only holds files it names itself)",
                t.file, t.table, t.table
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for f in &m.files {
        let sha = f.file.strip_prefix("apps/").unwrap_or_default();
        if !is_sha256_hex(sha) {
            return Err(bad(format!(
                "the manifest names a file outside the snapshot's packages: {:?} (a package is \
                 apps/ and 64 lowercase hex digits)",
                f.file
            )));
        }
        if f.sha256 != sha {
            return Err(bad(format!(
                "the manifest says {} has sha256 {}: a package is named by its own sha256",
                f.file, f.sha256
            )));
        }
        if !seen.insert(sha) {
            return Err(bad(format!("the manifest lists {} twice", f.file)));
        }
    }
    Ok(m)
}

/// Parses the rows of table `table`'s snapshot file (`<table>.ndjson`) as a restore does: each
/// line a JSON array fitting the table's columns and passing the admin API's checks. The number
/// of rows. Pure: the fuzz target `backup_rows` runs it on arbitrary bytes.
pub fn parse_table_rows(table: &str, data: &[u8]) -> Result<usize, Error> {
    let (_, cols) = TABLES
        .iter()
        .find(|(name, _)| *name == table)
        .ok_or_else(|| bad(format!("no table {table:?} in a snapshot")))?;
    Ok(parse_rows(table, cols, data)?.len())
}

/// The tables a snapshot holds, in restore order.
pub fn table_names() -> impl Iterator<Item = &'static str> {
    TABLES.iter().map(|(name, _)| *name)
}

type Cell = serde_json::Value;

/// A snapshot's files (name inside the snapshot, contents), as checked by [`verify`].
pub type Files = Vec<(String, Vec<u8>)>;

fn parse_rows(table: &str, cols: &[(&str, Kind)], data: &[u8]) -> Result<Vec<Vec<Cell>>, Error> {
    let mut rows = Vec::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let cells: Vec<Cell> = serde_json::from_slice(line)
            .map_err(|e| bad(format!("{table}.ndjson line {}: {e}", i + 1)))?;
        let ok = cells.len() == cols.len()
            && cells.iter().zip(cols).all(|(c, (_, k))| match k {
                Kind::Text | Kind::Blob => c.is_string(),
                Kind::OptText => c.is_string() || c.is_null(),
                Kind::Int => c.is_i64(),
                Kind::OptInt => c.is_i64() || c.is_null(),
            });
        if !ok {
            return Err(bad(format!(
                "{table}.ndjson line {}: the row does not fit the table's columns",
                i + 1
            )));
        }
        check_row(table, &cells).map_err(|why| {
            bad(format!(
                "{table}.ndjson line {}: {why}: refused (a restore accepts only what the admin \
                 API would)",
                i + 1
            ))
        })?;
        rows.push(cells);
    }
    Ok(rows)
}

/// A text cell (the types were checked by [`parse_rows`]).
fn text(c: &Cell) -> &str {
    c.as_str().unwrap_or_default()
}

/// An identifier as the device API checks it: visible ASCII, 1..=max bytes.
fn visible(what: &str, c: &Cell, max: usize) -> Result<(), String> {
    let t = text(c);
    if t.is_empty() || t.len() > max || !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(format!(
            "{what} {t:?} is not 1..={max} visible ASCII characters"
        ));
    }
    Ok(())
}

fn name(what: &str, c: &Cell, max: usize) -> Result<(), String> {
    crate::store::check_name(what, text(c), max).map_err(|e| format!("{e} (got {:?})", text(c)))
}

fn version(what: &str, t: &str) -> Result<(), String> {
    scm_proto::version::AppVersion::parse(t)
        .map(|_| ())
        .map_err(|e| format!("{what} {t:?}: {e}"))
}

fn free_text(what: &str, c: &Cell) -> Result<(), String> {
    let t = text(c);
    if t.len() > MAX_TEXT || t.chars().any(|ch| ch.is_control() && ch != '\t') {
        return Err(format!(
            "{what} is over {MAX_TEXT} bytes or holds control characters"
        ));
    }
    Ok(())
}

/// A JSON list of strings, each passing `each`, at most `max` of them.
fn json_list(
    what: &str,
    c: &Cell,
    max: usize,
    each: impl Fn(&str) -> Result<(), String>,
) -> Result<(), String> {
    let items: Vec<String> = serde_json::from_str(text(c))
        .map_err(|e| format!("{what} is not a JSON list of strings: {e}"))?;
    if items.len() > max {
        return Err(format!("{what} has {} entries, over {max}", items.len()));
    }
    items.iter().try_for_each(|i| each(i))
}

fn time(what: &str, c: &Cell) -> Result<(), String> {
    match c.as_i64() {
        Some(t) if t < 0 => Err(format!("{what} {t} is negative")),
        _ => Ok(()),
    }
}

/// Checks one row's fields the way the admin and device APIs check what they store, so a
/// restored row is one the server could have written itself. Column order is [`TABLES`]'.
fn check_row(table: &str, r: &[Cell]) -> Result<(), String> {
    let group = |g: &str| crate::store::check_name("group", g, 64).map_err(|e| e.to_string());
    match table {
        "sites" => {
            name("site name", &r[0], 64)?;
            json_list("proxy_urls", &r[1], 64, |u| {
                crate::store::check_host_port("proxy URL", u).map_err(|e| e.to_string())
            })?;
            time("created_at", &r[2])
        }
        "users" => {
            name("user name", &r[0], 64)?;
            let hash = r[2].as_str();
            let dn = r[3].as_str();
            match text(&r[1]) {
                "local" => {
                    if dn.is_some() {
                        return Err("a local user has an LDAP DN".into());
                    }
                    if let Some(h) = hash {
                        // The API only ever stores argon2id PHC strings.
                        let ok = h.starts_with("$argon2id$")
                            && argon2::password_hash::PasswordHash::new(h).is_ok();
                        if !ok {
                            return Err("password_hash is not an argon2id PHC string".into());
                        }
                    }
                }
                "ldap" => {
                    if hash.is_some() {
                        return Err("an LDAP user has a password hash".into());
                    }
                    match &r[3] {
                        Cell::String(_) => free_text("ldap_dn", &r[3])?,
                        _ => return Err("an LDAP user has no DN".into()),
                    }
                }
                other => return Err(format!("source {other:?} is not local or ldap")),
            }
            json_list("groups", &r[4], 1024, group)?;
            name("site", &r[5], 64)?;
            time("created_at", &r[6])
        }
        "device_keys" => {
            visible("key_id", &r[0], 64)?;
            name("user name", &r[1], 64)?;
            visible("device_id", &r[2], 128)?;
            visible("app_id", &r[3], 64)?;
            B64.decode(text(&r[4]))
                .map_err(|e| format!("sealed_key is not base64: {e}"))?;
            time("created_at", &r[5])?;
            time("revoked_at", &r[6])
        }
        "activation_codes" => {
            if !is_sha256_hex(text(&r[0])) {
                return Err("code_hash is not 64 lowercase hex digits".into());
            }
            name("user name", &r[1], 64)?;
            time("expires_at", &r[2])?;
            time("used_at", &r[3])
        }
        "app_releases" => {
            name("app id", &r[0], 64)?;
            name("platform", &r[1], 32)?;
            version("version", text(&r[2]))?;
            if !is_sha256_hex(text(&r[3])) {
                return Err(format!(
                    "sha256 {:?} is not 64 lowercase hex digits (it names the package file)",
                    text(&r[3])
                ));
            }
            match r[4].as_i64() {
                Some(n) if n > 0 => {}
                _ => return Err("size must be above 0".into()),
            }
            time("published_at", &r[5])
        }
        "app_policies" => {
            name("app id", &r[0], 64)?;
            if let Some(v) = r[1].as_str() {
                version("min_version", v)?;
            }
            json_list("revoked_versions", &r[2], 4096, |v| {
                version("revoked version", v)
            })
        }
        "resources" => {
            name("resource name", &r[0], 128)?;
            crate::store::check_host_port("address", text(&r[1])).map_err(|e| e.to_string())?;
            crate::store::parse_mode(text(&r[2])).map_err(|e| e.to_string())?;
            json_list("allowed_groups", &r[3], 1024, group)
        }
        "audit_log" => {
            match r[0].as_i64() {
                Some(n) if n > 0 => {}
                _ => return Err("id must be above 0".into()),
            }
            time("at", &r[1])?;
            for (what, c) in [
                ("kind", &r[2]),
                ("actor", &r[3]),
                ("subject", &r[4]),
                ("source", &r[5]),
                ("detail", &r[6]),
            ] {
                // Any text the server logged (it may quote what a client sent), bounded.
                if text(c).len() > MAX_TEXT {
                    return Err(format!("{what} is over {MAX_TEXT} bytes"));
                }
            }
            Ok(())
        }
        other => Err(format!("unknown table {other}")),
    }
}

/// Every release's package must be in the snapshot with the release's size, and every package
/// in the snapshot must belong to a release.
fn check_packages(m: &Manifest, releases: &[Vec<Cell>]) -> Result<(), Error> {
    for r in releases {
        let (sha, size) = (text(&r[3]), r[4].as_i64().unwrap_or_default());
        let f = m.files.iter().find(|f| f.sha256 == sha).ok_or_else(|| {
            bad(format!(
                "release {}: its package apps/{sha} is not in the snapshot",
                text(&r[2])
            ))
        })?;
        if f.bytes != size as u64 {
            return Err(bad(format!(
                "release {} says {size} bytes, its package apps/{sha} has {}",
                text(&r[2]),
                f.bytes
            )));
        }
    }
    for f in &m.files {
        if !releases.iter().any(|r| text(&r[3]) == f.sha256) {
            return Err(bad(format!("{}: no release names this package", f.file)));
        }
    }
    Ok(())
}

/// Restores the snapshot in `from` into `store` (which must be empty) and the app packages into
/// `data_dir`, after checking the snapshot's MAC under `master`, every file and row, and that
/// `master` opens every sealed key in it. A snapshot without a MAC is refused.
pub async fn restore(
    store: &Store,
    master: &MasterKey,
    data_dir: &Path,
    from: &Path,
) -> Result<Manifest, Error> {
    restore_with(store, master, data_dir, from, Unauthenticated::Refuse).await
}

/// One table of a checked snapshot: its name, columns and rows.
type ParsedTable = (
    &'static str,
    &'static [(&'static str, Kind)],
    Vec<Vec<Cell>>,
);

/// A snapshot that passed every check of a restore short of the target database.
#[derive(Debug)]
pub struct Checked {
    /// Its manifest.
    pub manifest: Manifest,
    contents: Files,
    parsed: Vec<ParsedTable>,
}

/// Every check a restore makes before touching the target: the MAC under `master` (see
/// [`Unauthenticated`]), every file's name, size and sha256, every row's fields, the packages
/// against the releases, and that `master` opens every sealed key. Run it before creating a
/// database, so a refused snapshot leaves nothing behind.
pub fn check_restorable(
    from: &Path,
    master: &MasterKey,
    unauth: Unauthenticated,
) -> Result<Checked, Error> {
    let (m, contents) = verify_authenticated(from, master, unauth)?;
    let file = |name: &str| {
        contents
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, d)| d.as_slice())
            .ok_or_else(|| bad(format!("{name} missing")))
    };
    let mut parsed = Vec::new();
    for (table, cols) in TABLES {
        let entry = m
            .tables
            .iter()
            .find(|t| t.table == *table)
            .ok_or_else(|| bad(format!("no entry for {table}")))?;
        let rows = parse_rows(table, cols, file(&entry.file)?)?;
        if rows.len() as u64 != entry.rows {
            return Err(bad(format!(
                "{}: {} rows where the manifest says {}",
                entry.file,
                rows.len(),
                entry.rows
            )));
        }
        parsed.push((*table, *cols, rows));
    }
    if let Some((_, _, releases)) = parsed.iter().find(|(t, _, _)| *t == "app_releases") {
        check_packages(&m, releases)?;
    }
    // Every sealed key must open under this master key, or the restored devices could not log in.
    for (table, _, rows) in &parsed {
        if *table != "device_keys" {
            continue;
        }
        for r in rows {
            let key_id = r[0].as_str().unwrap_or_default();
            let sealed = B64
                .decode(r[4].as_str().unwrap_or_default())
                .map_err(|e| bad(format!("device_keys: key {key_id}: {e}")))?;
            master.open(key_id, &sealed).map_err(|_| {
                bad(format!(
                    "the master key does not open the snapshot's key {key_id}: restore needs \
                     the master key file of the instance that was backed up"
                ))
            })?;
        }
    }
    Ok(Checked {
        manifest: m,
        contents,
        parsed,
    })
}

/// [`restore`], choosing what to do with a snapshot that has no MAC.
pub async fn restore_with(
    store: &Store,
    master: &MasterKey,
    data_dir: &Path,
    from: &Path,
    unauth: Unauthenticated,
) -> Result<Manifest, Error> {
    let Checked {
        manifest: m,
        contents,
        parsed,
    } = check_restorable(from, master, unauth)?;
    let file = |name: &str| {
        contents
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, d)| d.as_slice())
            .ok_or_else(|| bad(format!("{name} missing")))
    };
    let mut not_empty = Vec::new();
    for (table, _) in TABLES {
        let n = store.count(table).await?;
        if n > 0 {
            not_empty.push(format!("{table}: {n} rows"));
        }
    }
    if !not_empty.is_empty() {
        return Err(bad(format!(
            "the target database is not empty ({}): restore only into a fresh instance",
            not_empty.join(", ")
        )));
    }

    let mut tx = store.pool().begin().await.db("beginning the restore")?;
    for (table, cols, rows) in &parsed {
        let names: Vec<&str> = cols.iter().map(|(c, _)| *c).collect();
        for chunk in rows.chunks(BATCH) {
            let mut sql = format!("INSERT INTO {table} ({}) VALUES ", names.join(", "));
            let mut n = 0;
            for (i, _) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push('(');
                for j in 0..cols.len() {
                    n += 1;
                    if j > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!("${n}"));
                }
                sql.push(')');
            }
            let mut q = sqlx::query(&sql);
            for r in chunk {
                for (c, (_, k)) in r.iter().zip(cols.iter()) {
                    q = match k {
                        Kind::Text => q.bind(c.as_str().unwrap_or_default().to_owned()),
                        Kind::OptText => q.bind(c.as_str().map(str::to_owned)),
                        Kind::Int => q.bind(c.as_i64().unwrap_or_default()),
                        Kind::OptInt => q.bind(c.as_i64()),
                        Kind::Blob => q.bind(
                            B64.decode(c.as_str().unwrap_or_default())
                                .map_err(|e| bad(format!("{table}: bad base64: {e}")))?,
                        ),
                    };
                }
            }
            q.execute(&mut *tx).await.db("restoring rows")?;
        }
    }
    if store.backend() == Backend::Postgres {
        // Explicit ids do not advance the audit log's sequence.
        sqlx::query(
            "SELECT setval(pg_get_serial_sequence('audit_log', 'id'), \
             COALESCE((SELECT MAX(id) FROM audit_log), 0) + 1, false) AS v",
        )
        .fetch_one(&mut *tx)
        .await
        .db("advancing the audit log sequence")?;
    }
    tx.commit().await.db("committing the restore")?;

    let apps = crate::packages::dir(data_dir);
    create_private_dir(&apps)?;
    for f in &m.files {
        // `verify` checked the name is apps/<64 hex>: one plain file name inside `apps`.
        let sha = f.file.strip_prefix("apps/").unwrap_or_default();
        if !is_sha256_hex(sha) {
            return Err(bad(format!("{}: not a package name", f.file)));
        }
        let dst = apps.join(sha);
        let tmp = apps.join(format!("restore-{sha}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        {
            use std::io::Write as _;
            let mut out = create_private_file(&tmp)?;
            out.write_all(file(&f.file)?)
                .and_then(|()| out.sync_all())
                .map_err(|e| io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| io(&dst, e))?;
    }
    sync_dir(&apps);
    Ok(m)
}

/// What the scheduler reports, exported as metrics.
#[derive(Debug, Default)]
pub struct BackupStats {
    /// Unix seconds of the last successful run (0: none yet).
    pub last_success: AtomicI64,
    /// Duration of the last run, in milliseconds.
    pub last_duration_ms: AtomicU64,
    /// Runs that succeeded.
    pub successes: AtomicU64,
    /// Runs that failed.
    pub failures: AtomicU64,
    /// Unix seconds of the last failed run (0: none).
    pub last_failure: AtomicI64,
}

/// Settings of the backup scheduler.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Folder holding the snapshots.
    pub dir: PathBuf,
    /// Time between runs.
    pub interval: Duration,
    /// Snapshots kept (older ones are deleted after a successful run).
    pub keep: usize,
}

/// One scheduled run: a snapshot into a hidden folder, renamed into place when complete, then
/// pruning. Returns the snapshot folder.
pub async fn run_once(
    store: &Store,
    master: &MasterKey,
    data_dir: &Path,
    sched: &Schedule,
    stats: &BackupStats,
) -> Result<PathBuf, Error> {
    let started = Instant::now();
    let result = async {
        create_private_dir(&sched.dir)?;
        let stamp = format!(
            "{}{}-{:03}",
            SNAPSHOT_PREFIX,
            unix_now(),
            u16::from_le_bytes(scm_proto::crypto::random_bytes::<2>()) % 1000
        );
        let tmp = sched.dir.join(format!(".partial-{stamp}"));
        let done = sched.dir.join(&stamp);
        if let Err(e) = snapshot(store, master, data_dir, &tmp).await {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &done).map_err(|e| io(&done, e))?;
        sync_dir(&sched.dir);
        prune(&sched.dir, sched.keep)?;
        Ok(done)
    }
    .await;
    stats
        .last_duration_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    match &result {
        Ok(_) => {
            stats.successes.fetch_add(1, Ordering::Relaxed);
            stats.last_success.store(unix_now(), Ordering::Relaxed);
        }
        Err(_) => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            stats.last_failure.store(unix_now(), Ordering::Relaxed);
        }
    }
    result
}

/// Deletes all but the newest `keep` snapshots (and leftovers of interrupted runs).
fn prune(dir: &Path, keep: usize) -> Result<(), Error> {
    let mut snaps = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let e = e.map_err(|e| io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(SNAPSHOT_PREFIX) {
            snaps.push(name);
        } else if name.starts_with(".partial-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    // Names sort by time: the prefix, then Unix seconds of the same width for centuries.
    snaps.sort();
    let excess = snaps.len().saturating_sub(keep.max(1));
    for name in &snaps[..excess] {
        let p = dir.join(name);
        std::fs::remove_dir_all(&p).map_err(|e| io(&p, e))?;
    }
    Ok(())
}

/// The snapshots in a backup folder, oldest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(SNAPSHOT_PREFIX))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Runs [`run_once`] every `interval` until `stop`; every run is logged, a failure as an error.
pub async fn scheduler(
    store: Store,
    master: MasterKey,
    data_dir: PathBuf,
    sched: Schedule,
    stats: Arc<BackupStats>,
    stop: CancellationToken,
) {
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + sched.interval, sched.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match run_once(&store, &master, &data_dir, &sched, &stats).await {
            Ok(p) => tracing::info!(
                snapshot = %p.display(),
                ms = stats.last_duration_ms.load(Ordering::Relaxed),
                "backup done"
            ),
            Err(e) => tracing::error!(
                error = %e,
                dir = %sched.dir.display(),
                failures = stats.failures.load(Ordering::Relaxed),
                "BACKUP FAILED: no new snapshot was written"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_must_fit_their_table() {
        let cols = TABLES.iter().find(|(t, _)| *t == "device_keys").unwrap().1;
        let good = br#"["k1","alice","d","mail","AAAA",1,null]"#;
        assert_eq!(parse_rows("device_keys", cols, good).unwrap().len(), 1);
        for bad in [
            &br#"["k1","alice","d","mail","AAAA",1]"#[..],
            br#"["k1","alice","d","mail","AAAA","1",null]"#,
            br#"["k1",null,"d","mail","AAAA",1,null]"#,
            br#"{"key_id":"k1"}"#,
            br#"["k1","alice""#,
        ] {
            assert!(parse_rows("device_keys", cols, bad).is_err(), "{bad:?}");
        }
    }

    /// The SQLite half of the agreement test; `tests/it/schema.rs` runs it on PostgreSQL and
    /// compares the engines.
    #[tokio::test]
    async fn the_table_list_matches_the_sqlite_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
        let wrong = schema_mismatches(&store).await.unwrap();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // The check sees a column the backup lacks.
        sqlx::query("ALTER TABLE users ADD COLUMN nickname TEXT")
            .execute(store.pool())
            .await
            .unwrap();
        let wrong = schema_mismatches(&store).await.unwrap();
        assert_eq!(wrong.len(), 1, "{wrong:?}");
        assert!(wrong[0].starts_with("users.nickname (Text, nullable: true) is not in"));
        store.close().await;
    }

    #[test]
    fn prune_keeps_the_newest_and_clears_partials() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "scm-backup-1764000000-001",
            "scm-backup-1764000300-002",
            "scm-backup-1764000600-003",
            ".partial-scm-backup-1764000900-004",
        ] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
        }
        prune(dir.path(), 2).unwrap();
        let left: Vec<String> = list(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            ["scm-backup-1764000300-002", "scm-backup-1764000600-003"]
        );
        assert!(
            !dir.path()
                .join(".partial-scm-backup-1764000900-004")
                .exists()
        );
    }
}
