//! A real PostgreSQL server for the suite: found under /usr/lib/postgresql/*/bin (or
//! `SCM_PG_BIN`), initialised in a temp dir and run as the `postgres` user when the tests run as
//! root (PostgreSQL refuses root). One server per test process, one fresh database per test; a
//! watchdog shell stops it when the test process is gone.

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
    let script = format!(
        "{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c max_connections=300 >{dir}/log 2>&1 & pid=$!; \
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
    let deadline = Instant::now() + Duration::from_secs(30);
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
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            return Err(format!("postgres did not become ready: {log}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
