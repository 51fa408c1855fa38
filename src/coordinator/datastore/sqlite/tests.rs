//! What is SQLite's own: the file's settings and the plans of allocation's
//! queries. The datastore's behaviour is tested against both backends in
//! `tests/it/coordinator_datastore.rs`.

use super::*;
use crate::coordinator::datastore::{open, FEATURE_SETS, READY};

fn policy() -> RetryPolicy {
    RetryPolicy::default()
}

#[test]
fn allocation_uses_the_ready_index_without_sorting() {
    let ds = SqliteDatastore::open_in_memory(policy()).unwrap();
    for (sql, args) in [(READY, vec!["x", "[]", "4"]), (FEATURE_SETS, vec!["x"])] {
        let plan: Vec<String> = ds.with_conn(|c| {
            let mut stmt = c.prepare(&format!("explain query plan {sql}")).unwrap();
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap();
            rows.collect::<Result<_, _>>().unwrap()
        });
        let plan = plan.join("\n");
        assert!(plan.contains("builds_ready"), "{plan}");
        assert!(
            !plan.contains("TEMP B-TREE") && !plan.contains("SCAN builds"),
            "{plan}"
        );
    }
}

#[test]
fn a_file_database_is_durable_wal_with_foreign_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ds = SqliteDatastore::open(&dir.path().join("db.sqlite"), policy()).unwrap();
    let (mode, sync, fk): (String, i64, i64) = ds.with_conn(|c| {
        let q = |sql: &str| {
            c.query_row(sql, [], |r| r.get::<_, rusqlite::types::Value>(0))
                .unwrap()
        };
        let text = |v| match v {
            rusqlite::types::Value::Text(t) => t,
            other => panic!("{other:?}"),
        };
        let int = |v| match v {
            rusqlite::types::Value::Integer(i) => i,
            other => panic!("{other:?}"),
        };
        (
            text(q("pragma journal_mode")),
            int(q("pragma synchronous")),
            int(q("pragma foreign_keys")),
        )
    });
    assert_eq!(
        (mode.as_str(), sync, fk),
        ("wal", 2, 1),
        "wal, synchronous=FULL, foreign keys"
    );
}

#[test]
fn open_accepts_sqlite_and_postgresql_urls_only() {
    assert!(matches!(
        open("mysql://db/x", policy()),
        Err(DatastoreError::Url(_))
    ));
    assert!(matches!(
        open("sqlite://relative.db", policy()),
        Err(DatastoreError::Url(_))
    ));
    assert!(matches!(
        open("sqlite:///nonexistent-dir/x/y.db", policy()),
        Err(DatastoreError::Open { .. })
    ));
    assert!(matches!(
        open("postgresql://db/x?sslmode=require", policy()),
        Err(DatastoreError::PostgresTls { .. })
    ));
    assert!(matches!(
        open("postgres://db:notaport/x", policy()),
        Err(DatastoreError::PostgresUrl { .. })
    ));
}
