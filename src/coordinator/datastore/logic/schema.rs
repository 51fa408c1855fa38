//! Applying a backend's schema, an ordered list of migrations.
//!
//! Each backend has its own list ([`sqlite::schema`](super::super::sqlite::schema),
//! [`postgres::schema`](super::super::postgres::schema)) in its own SQL, with
//! the same numbering and meaning: version `n` of either holds the same
//! tables. A database records the number of migrations applied to it in
//! `schema_version`; opening it applies the missing ones, each in its own
//! writing transaction together with the new version number, so a crash
//! mid-way leaves a database at a whole version and two processes opening
//! a new database together apply each migration once. A database with more
//! migrations than this sandoff knows is refused (`SchemaTooNew`) rather
//! than written by code that does not understand it.

use crate::coordinator::datastore::sql::{args, Sql, Transactions};
use crate::coordinator::datastore::DatastoreError;

/// The version a list of migrations brings a database to.
pub fn known_version(migrations: &[&str]) -> i64 {
    i64::try_from(migrations.len()).expect("a handful of migrations fits in i64")
}

/// The version recorded in the database (0 for a new one).
pub fn version(conn: &dyn Sql) -> Result<i64, DatastoreError> {
    let v: Option<i64> = conn
        .query_one("select max(version) from schema_version", &[])?
        .get(0)?;
    Ok(v.unwrap_or(0))
}

/// Brings the database to the last of `migrations`, or refuses a newer one.
pub fn migrate(db: &impl Transactions, migrations: &[&str]) -> Result<(), DatastoreError> {
    let known = known_version(migrations);
    loop {
        // Each step re-reads the version under the write lock.
        let applied = db.write(|tx| {
            tx.batch("create table if not exists schema_version (version bigint not null)")?;
            let found = version(tx)?;
            if found > known {
                return Err(DatastoreError::SchemaTooNew { found, known });
            }
            if found == known {
                return Ok(None);
            }
            let index = usize::try_from(found)
                .map_err(|_| DatastoreError::Corrupt(format!("schema_version holds {found}")))?;
            tx.batch(migrations[index])?;
            tx.execute("delete from schema_version", &[])?;
            tx.execute(
                "insert into schema_version (version) values (?1)",
                args![found + 1],
            )?;
            Ok(Some(found + 1))
        })?;
        match applied {
            Some(version) => tracing::info!(version, "datastore: schema migrated"),
            None => return Ok(()),
        }
    }
}
