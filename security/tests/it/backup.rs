//! Backup and restore: a snapshot restored onto a new instance (new database, new data dir,
//! the real `scm-security restore` binary) lets the old devices log in without re-enrollment;
//! corrupt, truncated, tampered, newer-schema snapshots, a wrong master key and a non-empty
//! target are refused with clear errors; the manifest's MAC refuses an edited manifest, and even
//! under a valid MAC (or `--allow-unauthenticated`) a name that would leave the data folder or a
//! row the admin API would refuse is refused, with nothing written outside the data folder; the
//! scheduler keeps N snapshots, exports its figures on the metrics endpoint, and reports a full
//! or read-only backup folder as failures.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use scm_security::backup;
use serde_json::json;

use crate::support::{Db, Device, Server, certs, eventually, plain_http, send, skip};

const BIN: &str = env!("CARGO_BIN_EXE_scm-security");

fn scm(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run scm-security")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes a master key file the way an operator must: mode 0600.
fn write_key(path: &Path, bytes: &[u8]) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

/// Runs `scm-security restore` and expects a failure mentioning `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = scm(args);
    assert!(!out.status.success(), "restore {args:?} should fail");
    let err = stderr(&out);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

async fn publish(srv: &Server, version: &str, body: Vec<u8>) {
    let (s, r) = send(
        srv.admin
            .put(format!(
                "{}/v1/admin/apps/mail/android/{version}",
                srv.admin_url
            ))
            .bearer_auth(&srv.token)
            .body(body),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
}

/// A server with users, enrolled devices (one revoked), a resource and an app package.
async fn populated(db: Db) -> (Server, Vec<Device>, String) {
    let srv = Server::start(db, &["--backup-interval", "0"]).await;
    srv.add_user("alice", "pw-alice", &["staff"]).await;
    srv.add_user("bob", "pw-bob", &["dev"]).await;
    srv.admin_ok(
        Method::PUT,
        "/resources/echo",
        Some(json!({"address": "127.0.0.1:7000", "mode": "tcp", "allowed_groups": ["staff"]})),
    )
    .await;
    let mut devs = Vec::new();
    for (u, p, d) in [
        ("alice", "pw-alice", "a1"),
        ("alice", "pw-alice", "a2"),
        ("bob", "pw-bob", "b1"),
    ] {
        devs.push(Device::enroll(&srv, u, p, d).await);
    }
    let revoked = Device::enroll(&srv, "bob", "pw-bob", "b-lost").await;
    srv.admin_ok(
        Method::POST,
        &format!("/keys/{}/revoke", revoked.key_id),
        None,
    )
    .await;
    publish(&srv, "1.0", vec![7u8; 4096]).await;
    (srv, devs, revoked.key_id)
}

async fn backup_restore_new_instance(db: Db) {
    let (mut srv, devs, revoked) = populated(db.clone()).await;
    let snap = tempfile::tempdir().unwrap();
    let out = snap.path().join("snap");
    // The real binary, while the server runs.
    let data = srv.dir.path().join("data");
    let mut args = vec![
        "backup".to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if let Db::Postgres(url) = &db {
        args.extend(["--database-url".into(), url.clone()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = scm(&argv);
    assert!(o.status.success(), "backup: {}", stderr(&o));
    let m = backup::verify(&out).expect("snapshot verifies").0;
    assert_eq!(m.rows("users"), 2);
    assert_eq!(m.rows("device_keys"), 4);
    assert_eq!(m.files.len(), 1);
    assert!(m.rows("audit_log") > 0);

    // Keys stay sealed in the snapshot.
    let dump = std::fs::read_to_string(out.join("device_keys.ndjson")).unwrap();
    for d in &devs {
        assert!(
            !dump.contains(&d.key.to_b64()),
            "plaintext key in the snapshot"
        );
        assert!(!dump.contains(&hex::encode(d.key.as_bytes())));
    }

    // Destroy the server, its data dir and its database; keep only the master key's copy.
    let master = std::fs::read(data.join("master.key")).unwrap();
    srv.stop().await;
    let old_dir = srv.dir.path().to_owned();
    drop(srv);
    assert!(!old_dir.exists());
    let target_db = match &db {
        Db::Sqlite => Db::Sqlite,
        Db::Postgres(url) => {
            drop_database(url).await;
            crate::pg::fresh_db().await.expect("second database")
        }
    };

    // A new instance: certificates, the master key, then restore with the real binary.
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let new_data = dir.path().join("data");
    let mut args = vec![
        "restore".to_string(),
        "--from".into(),
        out.display().to_string(),
        "--data-dir".into(),
        new_data.display().to_string(),
    ];
    if let Db::Postgres(url) = &target_db {
        args.extend(["--database-url".into(), url.clone()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&argv, "master.key does not exist");
    std::fs::create_dir_all(&new_data).unwrap();
    write_key(&new_data.join("master.key"), &master);
    let o = scm(&argv);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    // Restoring twice is refused: the target is no longer empty.
    refused(&argv, "the target database is not empty");

    let srv = Server::start_in(dir, target_db, &["--backup-interval", "0"]).await;
    for d in &devs {
        let l = d.login(&srv).await;
        let (s, v) = srv.validate(&l.resp.session_id).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    // The revoked key stays revoked, the catalog and the package came along.
    let k = srv.state().store.key(&revoked).await.unwrap().unwrap();
    assert!(k.revoked_at.is_some());
    assert_eq!(srv.state().store.resources().await.unwrap().len(), 1);
    let (s, _) = send(srv.device.get(format!(
        "{}/v1/apps/mail/download/android/1.0",
        srv.device_url
    )))
    .await;
    assert_eq!(s, StatusCode::OK);
    // New audit entries continue after the restored ones.
    let before = m.rows("audit_log") as i64;
    srv.add_user("carol", "pw", &[]).await;
    let log = srv.state().store.audit_log(1).await.unwrap();
    assert!(log[0].id > before, "audit id {} after {before}", log[0].id);
}

async fn drop_database(url: &str) {
    use sqlx::Connection as _;
    let (base, name) = url.rsplit_once('/').unwrap();
    let mut c = sqlx::PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    sqlx::Executor::execute(
        &mut c,
        format!("DROP DATABASE {name} WITH (FORCE)").as_str(),
    )
    .await
    .expect("drop the old database");
}

crate::both_backends!(backup_restore_new_instance);

/// Copies a snapshot folder.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshots_are_refused() {
    let (srv, _devs, _) = populated(Db::Sqlite).await;
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let data = srv.dir.path().join("data");
    backup::snapshot(&srv.state().store, &srv.state().master, &data, &good)
        .await
        .unwrap();
    // The CLI does not back up a database that is not there (it would create an empty one).
    let none = tmp.path().join("no-such-data");
    let o = scm(&[
        "backup",
        "--data-dir",
        &none.display().to_string(),
        "--out",
        &tmp.path().join("x").display().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no database at"), "{}", stderr(&o));
    assert!(!none.exists());
    // A snapshot never goes into a non-empty folder.
    let err = backup::snapshot(&srv.state().store, &srv.state().master, &data, &good)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not empty"), "{err}");

    let restore_into = |snap: &Path, master: &[u8]| {
        let d = tmp.path().join(format!("target-{}", rand_name()));
        std::fs::create_dir_all(&d).unwrap();
        write_key(&d.join("master.key"), master);
        let args = [
            "restore".to_string(),
            "--from".into(),
            snap.display().to_string(),
            "--data-dir".into(),
            d.display().to_string(),
        ];
        (args, d)
    };
    let master = std::fs::read(data.join("master.key")).unwrap();
    let case = |name: &str, edit: &dyn Fn(&Path)| {
        let p = tmp.path().join(name);
        copy_dir(&good, &p);
        edit(&p);
        p
    };

    let truncated = case("truncated", &|p| {
        let f = p.join("device_keys.ndjson");
        let b = std::fs::read(&f).unwrap();
        std::fs::write(&f, &b[..b.len() / 2]).unwrap();
    });
    let tampered = case("tampered", &|p| {
        let f = p.join("users.ndjson");
        let mut b = std::fs::read(&f).unwrap();
        let i = b.iter().position(|c| *c == b'[').unwrap() + 2;
        b[i] ^= 0x01;
        std::fs::write(&f, &b).unwrap();
    });
    let no_manifest = case("unfinished", &|p| {
        std::fs::remove_file(p.join("manifest.json")).unwrap()
    });
    // What a newer scm-security would write: authenticated, with a newer schema.
    let newer = case("newer", &|p| {
        edit_manifest(p, |m| m["schema_version"] = json!(99_999_999_999_999i64));
        remac(p, &srv.state().master);
    });
    let garbage = case("garbage", &|p| {
        std::fs::write(p.join("manifest.json"), b"{\"format\":").unwrap()
    });
    let package = case("package", &|p| {
        let apps = p.join("apps");
        let f = std::fs::read_dir(&apps)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(&f, vec![8u8; 4096]).unwrap();
    });

    for (snap, needle) in [
        (&truncated, "the snapshot is truncated or corrupt"),
        (&tampered, "corrupt or was tampered with"),
        (&no_manifest, "not a finished snapshot"),
        (&newer, "newer than this scm-security's"),
        (&garbage, "corrupt manifest"),
        (&package, "corrupt or was tampered with"),
    ] {
        let (args, d) = restore_into(snap, &master);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&argv, needle);
        // Nothing was created: the check comes before the database.
        assert!(!d.join("scm.db").exists(), "{}", snap.display());
    }

    // Another master key does not open the snapshot's keys: refused before any write.
    let other = scm_security::master_key::new_master_key_text();
    let (args, d) = restore_into(&good, other.as_bytes());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&argv, "the master key does not open the snapshot's key");
    let store = scm_security::store::Store::open(&scm_security::store::Store::sqlite_url(&d))
        .await
        .unwrap();
    assert_eq!(store.count("device_keys").await.unwrap(), 0);
    store.close().await;

    // A populated instance is not a restore target.
    let err = backup::restore(&srv.state().store, &srv.state().master, &data, &good)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}

fn rand_name() -> String {
    hex::encode(scm_proto::crypto::random_bytes::<4>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_keeps_n_and_exports_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("backups");
    let d = dir.display().to_string();
    let srv = Server::start(
        Db::Sqlite,
        &[
            "--backup-dir",
            &d,
            "--backup-interval",
            "300ms",
            "--backup-keep",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    srv.add_user("alice", "pw", &[]).await;
    let dev = Device::enroll(&srv, "alice", "pw", "d1").await;
    let stats = srv.state().backup_stats.clone();
    assert!(
        eventually(Duration::from_secs(20), async || stats
            .successes
            .load(Ordering::Relaxed)
            >= 4)
        .await,
        "four scheduled runs"
    );
    let snaps = backup::list(&dir).unwrap();
    assert_eq!(snaps.len(), 2, "--backup-keep 2: {snaps:?}");
    let m = backup::verify(snaps.last().unwrap()).unwrap().0;
    assert_eq!(m.rows("device_keys"), 1);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);

    let addr = srv
        .running
        .as_ref()
        .unwrap()
        .metrics_addr
        .expect("metrics listener");
    let text = plain_http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
            .parse()
            .unwrap()
    };
    assert!(value("scm_security_backup_successes_total") >= 4.0);
    assert_eq!(value("scm_security_backup_failures_total"), 0.0);
    assert!(value("scm_security_backup_last_success_timestamp_seconds") > 1.7e9);
    assert!(value("scm_security_backup_last_duration_seconds") >= 0.0);
    assert_eq!(value("scm_security_database_read_only"), 0.0);
    drop(dev);
}

/// A backup folder that cannot be written counts failures, keeps no partial snapshot, and the
/// server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_backup_folders_fail_loudly() {
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where the folder should be: even root cannot create it.
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let (srv, devs, _) = populated(Db::Sqlite).await;
    let store = &srv.state().store;
    let data = srv.dir.path().join("data");
    let stats = backup::BackupStats::default();
    let sched = |dir: &Path| backup::Schedule {
        dir: dir.to_owned(),
        interval: Duration::from_secs(60),
        keep: 3,
    };
    let err = backup::run_once(
        store,
        &srv.state().master,
        &data,
        &sched(&blocker.join("sub")),
        &stats,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("Not a directory"), "{err}");
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.last_success.load(Ordering::Relaxed), 0);

    // A full file system and a read-only one: tiny tmpfs mounts (root only).
    let full = tmp.path().join("full");
    let ro = tmp.path().join("ro");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    let mount = |opts: &str, at: &Path| {
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !(mount("size=16k", &full) && mount("ro,size=16k", &ro)) {
        skip("tmpfs mounts (root)", "mount -t tmpfs failed");
        return;
    }
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _u1 = Umount(&full);
    let _u2 = Umount(&ro);
    publish(&srv, "2.0", vec![9u8; 64 * 1024]).await;

    let err = backup::run_once(store, &srv.state().master, &data, &sched(&full), &stats)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert!(backup::list(&full).unwrap().is_empty());
    // The partial folder was removed, so the space is free again.
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 0);

    let err = backup::run_once(store, &srv.state().master, &data, &sched(&ro), &stats)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Read-only file system"), "{err}");
    assert_eq!(stats.failures.load(Ordering::Relaxed), 3);
    let text = scm_security::metrics::render_with(srv.state(), &stats);
    assert!(
        text.contains("scm_security_backup_failures_total 3"),
        "{text}"
    );

    // The server still works.
    devs[0].login(&srv).await;
}

/// A SQLite instance's snapshot restores into PostgreSQL (the way to move engines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_snapshot_restores_into_postgres() {
    let Some(Db::Postgres(url)) = crate::pg::fresh_db().await else {
        return;
    };
    let (mut srv, devs, _) = populated(Db::Sqlite).await;
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("snap");
    let data = srv.dir.path().join("data");
    backup::snapshot(&srv.state().store, &srv.state().master, &data, &snap)
        .await
        .unwrap();
    let master = std::fs::read(data.join("master.key")).unwrap();
    srv.stop().await;

    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let new_data = dir.path().join("data");
    std::fs::create_dir_all(&new_data).unwrap();
    write_key(&new_data.join("master.key"), &master);
    let o = scm(&[
        "restore",
        "--from",
        &snap.display().to_string(),
        "--data-dir",
        &new_data.display().to_string(),
        "--database-url",
        &url,
    ]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let srv = Server::start_in(dir, Db::Postgres(url), &["--backup-interval", "0"]).await;
    for d in &devs {
        d.login(&srv).await;
    }
}

/// Edits a snapshot's manifest.json (leaving its MAC stale).
fn edit_manifest(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = p.join(backup::MANIFEST);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Authenticates the snapshot's current manifest under `master`: what a writer holding the
/// master key (a buggy or newer scm-security) would produce.
fn remac(p: &Path, master: &scm_security::master_key::MasterKey) {
    let text = std::fs::read(p.join(backup::MANIFEST)).unwrap();
    let mac = backup::MacFile {
        alg: backup::MAC_ALG.into(),
        key_id: master.backup_key_id(),
        mac: hex::encode(master.backup_mac(&text)),
    };
    std::fs::write(p.join(backup::MAC_FILE), serde_json::to_vec(&mac).unwrap()).unwrap();
}

/// Edits a table's rows and updates its manifest entry (rows, size, sha256) to match, as an
/// attacker who can write the backup folder would.
fn edit_table(p: &Path, table: &str, f: impl FnOnce(&mut Vec<serde_json::Value>)) {
    let file = p.join(format!("{table}.ndjson"));
    let mut rows: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    f(&mut rows);
    let mut buf = Vec::new();
    for r in &rows {
        serde_json::to_writer(&mut buf, r).unwrap();
        buf.push(b'\n');
    }
    std::fs::write(&file, &buf).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&buf));
    edit_manifest(p, |m| {
        let t = m["tables"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|t| t["table"] == table)
            .unwrap();
        t["rows"] = json!(rows.len());
        t["bytes"] = json!(buf.len());
        t["sha256"] = json!(sha);
    });
}

/// Every way of tampering with a snapshot is refused by the real `restore` binary, before the
/// database, with nothing written outside the data folder; a name that leaves the packages
/// folder and a row the admin API would refuse are refused even under a valid MAC and under
/// --allow-unauthenticated; an old snapshot without a MAC needs that flag; the good snapshot
/// then restores into the same (still empty) target and the old devices log in.
async fn tampered_snapshots_are_refused(db: Db) {
    let (mut srv, devs, _) = populated(db.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let data = srv.dir.path().join("data");
    let good = tmp.path().join("good");
    let master = srv.state().master.clone();
    backup::snapshot(&srv.state().store, &master, &data, &good)
        .await
        .unwrap();
    assert!(good.join(backup::MAC_FILE).exists());
    let master_bytes = std::fs::read(data.join("master.key")).unwrap();

    // Files the attacker wants written or served: outside every data folder.
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let victim = outside.join("planted");
    let secret = outside.join("secret");
    // 47 bytes: the size the forged release rows claim.
    std::fs::write(&secret, b"not a package: the server must never serve this").unwrap();

    let case = |name: &str, edit: &dyn Fn(&Path)| {
        let p = tmp.path().join(name);
        copy_dir(&good, &p);
        edit(&p);
        p
    };
    // `apps//<absolute path>`: the old check let it through and the restore wrote there.
    let plant = |p: &Path| {
        let body = b"planted by a tampered backup".to_vec();
        let rel = format!("apps/{}", victim.display());
        let inside = p.join(rel.replace("//", "/"));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::write(&inside, &body).unwrap();
        edit_manifest(p, |m| {
            m["files"].as_array_mut().unwrap().push(json!({
                "file": rel,
                "bytes": body.len(),
                "sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body)),
            }))
        });
    };
    let traversal_macd = case("traversal-macd", &|p| {
        plant(p);
        remac(p, &master);
    });
    let traversal_unauth = case("traversal-unauth", &|p| {
        plant(p);
        std::fs::remove_file(p.join(backup::MAC_FILE)).unwrap();
    });
    // A release whose sha256 is an absolute path: after restore the download endpoint served
    // that file.
    let abs_row = |p: &Path| {
        edit_table(p, "app_releases", |rows| {
            rows.push(json!([
                "mail",
                "android",
                "9.9",
                secret.display().to_string(),
                47,
                1
            ]))
        })
    };
    let abs_sha_macd = case("abs-sha-macd", &|p| {
        abs_row(p);
        remac(p, &master);
    });
    let abs_sha_unauth = case("abs-sha-unauth", &|p| {
        abs_row(p);
        std::fs::remove_file(p.join(backup::MAC_FILE)).unwrap();
    });
    let abs_sha = case("abs-sha", &|p| abs_row(p));
    // A row edited with the manifest updated to match: only the MAC catches it.
    let edited_row = case("edited-row", &|p| {
        edit_table(p, "users", |rows| {
            rows[0][4] = json!("[\"staff\",\"admins\"]");
        })
    });
    let edited_manifest = case("edited-manifest", &|p| {
        edit_manifest(p, |m| m["created_at"] = json!(1));
    });
    let swapped_mac = case("swapped-mac", &|p| {
        // The MAC of another manifest under the same key.
        std::fs::write(
            p.join(backup::MAC_FILE),
            serde_json::to_vec(&backup::MacFile {
                alg: backup::MAC_ALG.into(),
                key_id: master.backup_key_id(),
                mac: hex::encode(master.backup_mac(b"another manifest")),
            })
            .unwrap(),
        )
        .unwrap();
    });
    let old = case("old-without-mac", &|p| {
        std::fs::remove_file(p.join(backup::MAC_FILE)).unwrap()
    });

    // One target for every attempt: refusals must leave it empty.
    let target_db = match &db {
        Db::Sqlite => Db::Sqlite,
        Db::Postgres(_) => crate::pg::fresh_db().await.expect("second database"),
    };
    let target = tempfile::tempdir().unwrap();
    certs(target.path());
    let target_data = target.path().join("data");
    std::fs::create_dir_all(&target_data).unwrap();
    write_key(&target_data.join("master.key"), &master_bytes);
    let argv = |snap: &Path, extra: &[&str]| {
        let mut a = vec![
            "restore".to_string(),
            "--from".into(),
            snap.display().to_string(),
            "--data-dir".into(),
            target_data.display().to_string(),
        ];
        if let Db::Postgres(url) = &target_db {
            a.extend(["--database-url".into(), url.clone()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let wrong_key_dir = tmp.path().join("wrong-key");
    std::fs::create_dir_all(&wrong_key_dir).unwrap();
    let wrong_key = wrong_key_dir.join("master.key");
    write_key(
        &wrong_key,
        scm_security::master_key::new_master_key_text().as_bytes(),
    );
    let wrong = wrong_key.display().to_string();
    let refusals: Vec<(&Path, Vec<&str>, &str)> = vec![
        (
            &traversal_macd,
            vec![],
            "names a file outside the snapshot's packages",
        ),
        (
            &traversal_unauth,
            vec!["--allow-unauthenticated"],
            "names a file outside the snapshot's packages",
        ),
        (
            &traversal_unauth,
            vec![],
            "the snapshot is not authenticated",
        ),
        (&abs_sha_macd, vec![], "is not 64 lowercase hex digits"),
        (
            &abs_sha_unauth,
            vec!["--allow-unauthenticated"],
            "is not 64 lowercase hex digits",
        ),
        (&abs_sha, vec![], "the MAC does not verify"),
        (&edited_row, vec![], "the MAC does not verify"),
        (&edited_manifest, vec![], "the MAC does not verify"),
        (&swapped_mac, vec![], "the MAC does not verify"),
        (&old, vec![], "--allow-unauthenticated"),
        (
            &good,
            vec!["--master-key-file", &wrong],
            "the master key does not open the snapshot's keys",
        ),
    ];
    for (snap, extra, needle) in refusals {
        let a = argv(snap, &extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        refused(&a, needle);
        assert!(
            !victim.exists(),
            "{}: wrote outside the data folder",
            snap.display()
        );
        if matches!(target_db, Db::Sqlite) {
            assert!(
                !target_data.join("scm.db").exists(),
                "{}: the database was created before the checks",
                snap.display()
            );
        }
        assert_eq!(
            std::fs::read_dir(&target_data).unwrap().count(),
            1,
            "{}: only master.key in the target",
            snap.display()
        );
    }
    assert!(!victim.exists());

    // Defence in depth: a release row naming an absolute path (however it got into the
    // database) is not served by the download endpoint.
    srv.state()
        .store
        .insert_release(&scm_proto::api::AppRelease {
            app_id: "mail".into(),
            platform: "android".into(),
            version: "9.9".into(),
            sha256: secret.display().to_string(),
            size: 47,
            download_path: String::new(),
        })
        .await
        .unwrap();
    let resp = srv
        .device
        .get(format!(
            "{}/v1/apps/mail/download/android/9.9",
            srv.device_url
        ))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.bytes().await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        !body.windows(12).any(|w| w == b"not a packag"),
        "served a file outside the packages folder"
    );
    srv.stop().await;
    drop(srv);

    // The good snapshot restores into the same target: the refusals left it empty.
    let a = argv(&good, &[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = scm(&a);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let srv = Server::start_in(target, target_db, &["--backup-interval", "0"]).await;
    for d in &devs {
        d.login(&srv).await;
    }
    let (s, _) = send(srv.device.get(format!(
        "{}/v1/apps/mail/download/android/1.0",
        srv.device_url
    )))
    .await;
    assert_eq!(s, StatusCode::OK);
}

crate::both_backends!(tampered_snapshots_are_refused);

/// An old snapshot (no manifest.mac) restores with --allow-unauthenticated, and its devices log
/// in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_snapshots_restore_with_the_explicit_flag() {
    let (mut srv, devs, _) = populated(Db::Sqlite).await;
    let tmp = tempfile::tempdir().unwrap();
    let data = srv.dir.path().join("data");
    let snap = tmp.path().join("old");
    backup::snapshot(&srv.state().store, &srv.state().master, &data, &snap)
        .await
        .unwrap();
    std::fs::remove_file(snap.join(backup::MAC_FILE)).unwrap();
    let master = std::fs::read(data.join("master.key")).unwrap();
    srv.stop().await;
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let new_data = dir.path().join("data");
    std::fs::create_dir_all(&new_data).unwrap();
    write_key(&new_data.join("master.key"), &master);
    let base = [
        "restore".to_string(),
        "--from".into(),
        snap.display().to_string(),
        "--data-dir".into(),
        new_data.display().to_string(),
    ];
    let argv: Vec<&str> = base.iter().map(String::as_str).collect();
    refused(&argv, "restore it with --allow-unauthenticated only if");
    let mut with_flag = argv.clone();
    with_flag.push("--allow-unauthenticated");
    let o = scm(&with_flag);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let srv = Server::start_in(dir, Db::Sqlite, &["--backup-interval", "0"]).await;
    for d in &devs {
        d.login(&srv).await;
    }
}

/// Snapshots, the database and packages are private: folders 0700, files 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private() {
    use scm_security::fsmode::mode;
    let (srv, _devs, _) = populated(Db::Sqlite).await;
    let data = srv.dir.path().join("data");
    let tmp = tempfile::tempdir().unwrap();
    let backups = tmp.path().join("backups");
    let stats = backup::BackupStats::default();
    let sched = backup::Schedule {
        dir: backups.clone(),
        interval: Duration::from_secs(60),
        keep: 3,
    };
    let snap = backup::run_once(
        &srv.state().store,
        &srv.state().master,
        &data,
        &sched,
        &stats,
    )
    .await
    .unwrap();
    for d in [
        &data,
        &data.join("apps"),
        &backups,
        &snap,
        &snap.join("apps"),
    ] {
        assert_eq!(mode(d), Some(0o700), "{}", d.display());
    }
    let mut files = vec![
        data.join("scm.db"),
        data.join("scm.db-wal"),
        data.join("scm.db-shm"),
        data.join("master.key"),
        data.join("admin.token"),
    ];
    for dir in [data.join("apps"), snap.clone(), snap.join("apps")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 8, "{files:?}");
    for f in &files {
        assert_eq!(mode(f), Some(0o600), "{}", f.display());
    }
}

/// A master key file that others may read stops `serve` with a clear error, not a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loose_master_key_stops_the_server() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("master.key"),
        scm_security::master_key::new_master_key_text(),
    )
    .unwrap();
    std::fs::set_permissions(
        data.join("master.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let args = crate::support::serve_args(dir.path(), &c, &Db::Sqlite, &[]);
    let err = scm_security::server::start(&args)
        .await
        .expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("mode 0644, looser than 0600") && msg.contains("chmod 600"),
        "{msg}"
    );
    // Nothing else was started: no database file.
    assert!(!data.join("scm.db").exists());
}
