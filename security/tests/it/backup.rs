//! Backup and restore: a snapshot restored onto a new instance (new database, new data dir,
//! the real `scm-security restore` binary) lets the old devices log in without re-enrolment;
//! corrupt, truncated, tampered, newer-schema snapshots, a wrong master key and a non-empty
//! target are refused with clear errors; the scheduler keeps N snapshots, exports its figures on
//! the metrics endpoint, and reports a full or read-only backup folder as failures.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use scm_security::backup;
use serde_json::json;

use crate::support::{Db, Device, Server, certs, eventually, send, skip};

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
    std::fs::write(new_data.join("master.key"), &master).unwrap();
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
    backup::snapshot(&srv.state().store, &data, &good)
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
    let err = backup::snapshot(&srv.state().store, &data, &good)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not empty"), "{err}");

    let restore_into = |snap: &Path, master: &[u8]| {
        let d = tmp.path().join(format!("target-{}", rand_name()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("master.key"), master).unwrap();
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
    let newer = case("newer", &|p| {
        let f = p.join("manifest.json");
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        m["schema_version"] = json!(99_999_999_999_999i64);
        std::fs::write(&f, serde_json::to_vec(&m).unwrap()).unwrap();
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
    let other = scm_security::keys::new_master_key_text();
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
    let text = reqwest::get(format!("http://{addr}/metrics"))
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
    assert!(value("scm_backup_success_total") >= 4.0);
    assert_eq!(value("scm_backup_failures_total"), 0.0);
    assert!(value("scm_backup_last_success_timestamp_seconds") > 1.7e9);
    assert!(value("scm_backup_last_duration_seconds") >= 0.0);
    assert_eq!(value("scm_database_read_only"), 0.0);
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
    let err = backup::run_once(store, &data, &sched(&blocker.join("sub")), &stats)
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

    let err = backup::run_once(store, &data, &sched(&full), &stats)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert!(backup::list(&full).unwrap().is_empty());
    // The partial folder was removed, so the space is free again.
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 0);

    let err = backup::run_once(store, &data, &sched(&ro), &stats)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Read-only file system"), "{err}");
    assert_eq!(stats.failures.load(Ordering::Relaxed), 3);
    let text = scm_security::ha::render(&srv.state().ha, &stats, 0);
    assert!(text.contains("scm_backup_failures_total 3"), "{text}");

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
    backup::snapshot(&srv.state().store, &data, &snap)
        .await
        .unwrap();
    let master = std::fs::read(data.join("master.key")).unwrap();
    srv.stop().await;

    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let new_data = dir.path().join("data");
    std::fs::create_dir_all(&new_data).unwrap();
    std::fs::write(new_data.join("master.key"), &master).unwrap();
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
