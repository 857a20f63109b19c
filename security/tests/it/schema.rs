//! The schema has three copies that must agree: the SQLite migrations, the PostgreSQL
//! migrations, and the backup's table list. Both engines are migrated for real and read back.

use scm_security::backup;
use scm_security::store::Store;

use crate::support::Db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_and_the_backup_agree_on_every_table_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
    let wrong = backup::schema_mismatches(&sqlite).await.unwrap();
    assert!(wrong.is_empty(), "SQLite:\n{}", wrong.join("\n"));

    let Some(Db::Postgres(url)) = crate::pg::fresh_db().await else {
        return;
    };
    let pg = Store::open(&url).await.unwrap();
    let wrong = backup::schema_mismatches(&pg).await.unwrap();
    assert!(wrong.is_empty(), "PostgreSQL:\n{}", wrong.join("\n"));

    // The engines made the same tables and columns, of the same types and nullability.
    let (s, p) = (sqlite.columns().await.unwrap(), pg.columns().await.unwrap());
    let only = |a: &[scm_security::store::schema::Column],
                b: &[scm_security::store::schema::Column]| {
        a.iter()
            .filter(|c| !b.contains(c))
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
    };
    assert!(
        s == p,
        "only in SQLite: {:?}\nonly in PostgreSQL: {:?}",
        only(&s, &p),
        only(&p, &s)
    );
    // And the backup's explicit exclusions are tables both engines have.
    for (table, why) in backup::NOT_BACKED_UP {
        assert!(s.iter().any(|c| c.table == *table), "{table}");
        assert!(!why.is_empty());
    }
    sqlite.close().await;
    pg.close().await;
}
