//! A real PostgreSQL server for the suite: found under /usr/lib/postgresql/*/bin (or
//! `SCM_PG_BIN`), initialised in a temp dir and run as the `postgres` user when the tests run as
//! root (PostgreSQL refuses root). One server per test process, one fresh database per test; a
//! watchdog shell stops it when the test process is gone. [`replicated_pair`] starts a primary
//! and a hot standby (pg_basebackup -R through a replication slot) for the live-sync tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::Connection as _;

use crate::support::{Db, free_port, skip};

pub struct Pg {
    pub port: u16,
    pub bin: PathBuf,
}

static PG: OnceLock<Result<Pg, String>> = OnceLock::new();

fn find_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SCM_PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A command run as the `postgres` user when we are root.
fn as_pg(prog: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(prog);
        c
    } else {
        Command::new(prog)
    }
}

fn start() -> Result<Pg, String> {
    let bin = find_bin().ok_or("no PostgreSQL found under /usr/lib/postgresql/*/bin (apt install postgresql, or set SCM_PG_BIN)")?;
    let dir = PathBuf::from(format!("/tmp/scm-security-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .map_err(|e| format!("chown: {e}"))?
            .success();
        if !ok {
            return Err("chown to the postgres user failed (does the user exist?)".into());
        }
    }
    let data = dir.join("data");
    let out = as_pg(&bin.join("initdb"))
        .args(["-A", "trust", "-U", "scm", "-E", "UTF8", "--no-sync", "-D"])
        .arg(&data)
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = free_port();
    spawn(
        &bin,
        &dir,
        &data,
        port,
        "-c fsync=off -c synchronous_commit=off -c max_connections=300",
    )?;
    eprintln!("PostgreSQL {} on 127.0.0.1:{port}", bin.display());
    Ok(Pg { port, bin })
}

/// The shared server, or None (after skipping loudly; panics under CI).
pub fn server() -> Option<&'static Pg> {
    match PG.get_or_init(start) {
        Ok(p) => Some(p),
        Err(e) => {
            skip("PostgreSQL", e);
            None
        }
    }
}

/// A fresh empty database on the shared server.
pub async fn fresh_db() -> Option<Db> {
    let pg = server()?;
    let name = format!("t_{}", hex::encode(scm_proto::crypto::random_bytes::<6>()));
    let mut conn =
        sqlx::PgConnection::connect(&format!("postgres://scm@127.0.0.1:{}/postgres", pg.port))
            .await
            .expect("connect to the harness PostgreSQL");
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create database");
    Some(Db::Postgres(format!(
        "postgres://scm@127.0.0.1:{}/{name}",
        pg.port
    )))
}

/// `pg_dump` of a test database, as text.
pub fn dump(url: &str) -> String {
    let pg = server().expect("PostgreSQL running");
    let name = url.rsplit('/').next().expect("database name");
    let out = Command::new(pg.bin.join("pg_dump"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "scm",
            name,
        ])
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `postgres` on `data` (initialised) with `opts`, under a watchdog that stops it and
/// removes `dir` when the test process is gone; waits until it accepts connections.
fn spawn(bin: &Path, dir: &Path, data: &Path, port: u16, opts: &str) -> Result<(), String> {
    let script = format!(
        "{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 {opts} \
         >>{dir}/log 2>&1 & pid=$!; \
         while [ -d /proc/{me} ]; do sleep 0.5; done; kill -INT $pid; wait $pid; rm -rf {dir}",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
        me = std::process::id(),
    );
    let mut sh = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    };
    sh.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    sh.spawn().map_err(|e| format!("starting postgres: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = Command::new(bin.join("pg_isready"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "scm",
                "-q",
            ])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            return Err(format!("postgres did not become ready: {log}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A folder the `postgres` user owns.
fn pg_dir(name: &str) -> Result<PathBuf, String> {
    let dir = PathBuf::from(format!(
        "/tmp/scm-security-pgha-{}-{name}-{}",
        std::process::id(),
        hex::encode(scm_proto::crypto::random_bytes::<3>())
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("chown to the postgres user failed (does the user exist?)".into());
        }
    }
    Ok(dir)
}

/// One cluster of a replicated pair.
pub struct Cluster {
    pub port: u16,
    pub data: PathBuf,
}

impl Cluster {
    /// URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://scm@127.0.0.1:{}/{db}", self.port)
    }

    /// The postmaster's pid.
    pub fn pid(&self) -> i32 {
        let text =
            std::fs::read_to_string(self.data.join("postmaster.pid")).expect("postmaster.pid");
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid")
    }

    /// SIGKILLs the postmaster (its backends follow: they watch for its death).
    pub fn kill9(&self) {
        let ok = Command::new("kill")
            .args(["-KILL", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -KILL postgres");
    }

    /// Runs one SQL statement as the superuser `scm` on database `postgres`.
    pub async fn sql(&self, stmt: &str) {
        let mut c = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect");
        sqlx::Executor::execute(&mut c, stmt)
            .await
            .unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }

    /// One bigint answer.
    pub async fn scalar(&self, db: &str, q: &str) -> Result<i64, sqlx::Error> {
        let mut c = sqlx::PgConnection::connect(&self.url(db)).await?;
        let r: (i64,) = sqlx::query_as(q).fetch_one(&mut c).await?;
        Ok(r.0)
    }
}

/// A primary and a hot standby streaming from it through a physical replication slot, with a
/// database `scm`; both stopped when the test process ends.
pub struct Pair {
    pub primary: Cluster,
    pub standby: Cluster,
}

fn make_pair() -> Result<Pair, String> {
    let bin = find_bin().ok_or("no PostgreSQL found under /usr/lib/postgresql/*/bin (apt install postgresql, or set SCM_PG_BIN)")?;
    let pdir = pg_dir("primary")?;
    let pdata = pdir.join("data");
    let out = as_pg(&bin.join("initdb"))
        .args(["-A", "trust", "-U", "scm", "-E", "UTF8", "--no-sync", "-D"])
        .arg(&pdata)
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let pport = free_port();
    spawn(
        &bin,
        &pdir,
        &pdata,
        pport,
        "-c wal_level=replica -c max_wal_senders=5 -c max_replication_slots=5 \
         -c fsync=off -c max_connections=100 -c wal_sender_timeout=6s",
    )?;
    let sql = |q: &str| {
        let out = Command::new(bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pport.to_string(),
                "-U",
                "scm",
                "-d",
                "postgres",
                "-qAt",
                "-c",
                q,
            ])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{q}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    sql("SELECT pg_create_physical_replication_slot('scm_standby')")?;
    sql("CREATE DATABASE scm")?;
    let sdir = pg_dir("standby")?;
    let sdata = sdir.join("data");
    let out = as_pg(&bin.join("pg_basebackup"))
        .args(["-h", "127.0.0.1", "-p", &pport.to_string(), "-U", "scm"])
        .args([
            "-R",
            "-X",
            "stream",
            "-S",
            "scm_standby",
            "--checkpoint=fast",
            "--no-sync",
            "-D",
        ])
        .arg(&sdata)
        .output()
        .map_err(|e| format!("pg_basebackup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let sport = free_port();
    spawn(
        &bin,
        &sdir,
        &sdata,
        sport,
        "-c hot_standby=on -c fsync=off -c max_connections=100 -c wal_receiver_status_interval=1s",
    )?;
    eprintln!("PostgreSQL primary 127.0.0.1:{pport}, hot standby 127.0.0.1:{sport}");
    Ok(Pair {
        primary: Cluster {
            port: pport,
            data: pdata,
        },
        standby: Cluster {
            port: sport,
            data: sdata,
        },
    })
}

/// A fresh replicated pair, or None (after skipping loudly; panics under CI).
pub async fn replicated_pair() -> Option<Pair> {
    match tokio::task::spawn_blocking(make_pair).await.expect("pair") {
        Ok(p) => {
            // Streaming before anything else happens.
            let ok = crate::support::eventually(Duration::from_secs(30), async || {
                p.primary
                    .scalar(
                        "postgres",
                        "SELECT COUNT(*) FROM pg_stat_replication WHERE state = 'streaming'",
                    )
                    .await
                    .is_ok_and(|n| n == 1)
            })
            .await;
            assert!(ok, "the standby never streamed");
            Some(p)
        }
        Err(e) => {
            skip("PostgreSQL primary and standby", &e);
            None
        }
    }
}
