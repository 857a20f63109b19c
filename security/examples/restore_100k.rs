//! Times a backup and a full restore of N enrolled devices (default 100 000: N users, one sealed
//! key each, N audit entries), on SQLite and, given a PostgreSQL server URL whose user may
//! create databases, on PostgreSQL too.
//!
//! `cargo run --release -p scm-security --example restore_100k -- [N] [postgres://user@host:port]`

use std::time::Instant;

use scm_security::backup;
use scm_security::master_key::MasterKey;
use scm_security::store::Store;

const ROWS_PER_INSERT: usize = 400;

async fn populate(store: &Store, master: &MasterKey, n: usize) -> anyhow::Result<()> {
    store.ensure_site("main").await?;
    // One real argon2id PHC string for everybody: hashing 100k passwords is not what is timed.
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$2nH0dO2cRpYQ0aVQb4lLk7CzZb8JHn4q3l1fzTq9j3U";
    let mut tx = store.pool().begin().await?;
    for start in (0..n).step_by(ROWS_PER_INSERT) {
        let end = (start + ROWS_PER_INSERT).min(n);
        let mut users = String::from(
            "INSERT INTO users (name, source, password_hash, ldap_dn, groups_json, site, created_at) VALUES ",
        );
        let mut keys = String::from(
            "INSERT INTO device_keys (key_id, user_name, device_id, app_id, sealed_key, created_at, revoked_at) VALUES ",
        );
        let mut audit = String::from(
            "INSERT INTO audit_log (at, kind, actor, subject, source, detail) VALUES ",
        );
        for (j, i) in (start..end).enumerate() {
            let sep = if j > 0 { "," } else { "" };
            let b = j * 2;
            users.push_str(&format!(
                "{sep}(${}, 'local', ${}, NULL, '[\"staff\"]', 'main', 1764000000)",
                b + 1,
                b + 2
            ));
            let k = j * 3;
            keys.push_str(&format!(
                "{sep}(${}, ${}, 'device-{i}', 'mail', ${}, 1764000000, NULL)",
                k + 1,
                k + 2,
                k + 3
            ));
            let a = j * 2;
            audit.push_str(&format!(
                "{sep}(1764000000, 'enroll', ${}, ${}, '10.0.0.1', 'device=d app=mail')",
                a + 1,
                a + 2
            ));
        }
        let mut qu = sqlx::query(&users);
        let mut qk = sqlx::query(&keys);
        let mut qa = sqlx::query(&audit);
        for i in start..end {
            let name = format!("user{i:06}");
            let key_id = format!("k_{i:032x}");
            let sealed = master.seal(&key_id, &scm_proto::crypto::SharedKey::generate())?;
            qu = qu.bind(name.clone()).bind(hash);
            qk = qk.bind(key_id.clone()).bind(name.clone()).bind(sealed.0);
            qa = qa.bind(name).bind(key_id);
        }
        qu.execute(&mut *tx).await?;
        qk.execute(&mut *tx).await?;
        qa.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn run(label: &str, src: &Store, dst: &Store, n: usize) -> anyhow::Result<()> {
    let master = MasterKey::from_bytes(&[7u8; 32]);
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    populate(src, &master, n).await?;
    let populate_s = t.elapsed().as_secs_f64();

    let snap = dir.path().join("snap");
    let t = Instant::now();
    let m = backup::snapshot(src, &master, dir.path(), &snap).await?;
    let backup_s = t.elapsed().as_secs_f64();
    let bytes: u64 = m.tables.iter().map(|t| t.bytes).sum();

    let t = Instant::now();
    let r = backup::restore(dst, &master, dir.path(), &snap).await?;
    let restore_s = t.elapsed().as_secs_f64();
    assert_eq!(
        dst.count("device_keys").await? as u64,
        r.rows("device_keys")
    );
    println!(
        "{label:<10} devices {n:>7}  populate {populate_s:>6.1} s  backup {backup_s:>6.1} s  \
         snapshot {:>6.1} MB  restore {restore_s:>6.1} s (checks, {n} key openings, load)",
        bytes as f64 / 1e6
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let pg = args.next();

    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("a"))?;
    std::fs::create_dir_all(dir.path().join("b"))?;
    let src = Store::open(&Store::sqlite_url(&dir.path().join("a"))).await?;
    let dst = Store::open(&Store::sqlite_url(&dir.path().join("b"))).await?;
    run("sqlite", &src, &dst, n).await?;

    if let Some(base) = pg {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&format!("{base}/postgres")).await?;
        let suffix = hex::encode(scm_proto::crypto::random_bytes::<4>());
        for db in ["a", "b"] {
            sqlx::Executor::execute(&mut c, format!("CREATE DATABASE r{db}_{suffix}").as_str())
                .await?;
        }
        let src = Store::open(&format!("{base}/ra_{suffix}")).await?;
        let dst = Store::open(&format!("{base}/rb_{suffix}")).await?;
        run("postgres", &src, &dst, n).await?;
        src.close().await;
        dst.close().await;
        for db in ["a", "b"] {
            sqlx::Executor::execute(&mut c, format!("DROP DATABASE r{db}_{suffix}").as_str())
                .await?;
        }
    }
    Ok(())
}
