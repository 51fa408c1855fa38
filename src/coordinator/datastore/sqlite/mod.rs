//! The SQLite datastore: one file, one connection behind a mutex (the
//! server calls it from tokio's blocking pool, and SQLite serialises
//! writers anyway).
//!
//! Durability: WAL with `synchronous = FULL`, so a transaction that
//! returned is on disk and survives kill -9 and power loss; every
//! [`Datastore`](super::Datastore) method is one transaction (`BEGIN IMMEDIATE` when it
//! writes, so no read-check-write races another process), and an error
//! rolls all of it back.
//!
//! The scheduling itself is [`logic`](super::logic), shared with
//! PostgreSQL; this module is the connection, its transactions and the
//! SQLite [`schema`].

pub mod schema;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, TransactionBehavior};

use super::logic::Store;
use super::sql::{Row, Sql, Transactions, Value};
use super::{DatastoreError, RetryPolicy};

/// How long a call waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// How many prepared statements the connection keeps.
const STATEMENT_CACHE: usize = 128;

/// The coordinator's datastore in SQLite.
pub type SqliteDatastore = Store<Sqlite>;

/// One SQLite connection behind a mutex.
pub struct Sqlite {
    conn: Mutex<Connection>,
}

impl SqliteDatastore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date; refuses one written by a newer sandoff.
    pub fn open(path: &Path, retry: RetryPolicy) -> Result<SqliteDatastore, DatastoreError> {
        let conn = Connection::open(path).map_err(|source| DatastoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let mode: String = conn.query_row("pragma journal_mode = wal", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "datastore: WAL refused; using this journal mode");
        }
        SqliteDatastore::over(conn, retry)
    }

    /// A datastore that lives in memory, for tests.
    pub fn open_in_memory(retry: RetryPolicy) -> Result<SqliteDatastore, DatastoreError> {
        SqliteDatastore::over(Connection::open_in_memory()?, retry)
    }

    fn over(conn: Connection, retry: RetryPolicy) -> Result<SqliteDatastore, DatastoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Every statement of the logic goes through the cache (rusqlite's
        // default keeps 16); they are a few dozen.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // FULL: in WAL mode NORMAL may lose the last transactions on power
        // loss, and a lost result would be built again (or a lost submission
        // never built).
        conn.execute_batch("pragma synchronous = full; pragma foreign_keys = on;")?;
        let backend = Sqlite {
            conn: Mutex::new(conn),
        };
        super::logic::schema::migrate(&backend, schema::MIGRATIONS)?;
        Ok(Store { backend, retry })
    }

    /// Runs `f` on the connection, for tests that set up or inspect rows
    /// directly.
    #[cfg(test)]
    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> T {
        f(&mut self.backend.lock())
    }
}

impl Sqlite {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock left no half-done transaction
        // (rusqlite rolls back on drop), so the connection is still usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn run<T>(
        &self,
        behavior: TransactionBehavior,
        f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(behavior)?;
        let out = f(&Tx(&tx))?;
        tx.commit()?;
        Ok(out)
    }
}

impl Transactions for Sqlite {
    /// One `BEGIN IMMEDIATE` transaction (the write lock first, so no other
    /// process reads, checks and writes in between), committed only if `f`
    /// succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        self.run(TransactionBehavior::Immediate, f)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        self.run(TransactionBehavior::Deferred, f)
    }
}

/// An open SQLite transaction as [`Sql`]; statements are cached by the
/// connection.
struct Tx<'a>(&'a rusqlite::Transaction<'a>);

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

impl Sql for Tx<'_> {
    fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, DatastoreError> {
        let n = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(args))?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn query(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DatastoreError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(columns);
            for i in 0..columns {
                row.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::Int(n),
                    ValueRef::Text(t) => Value::Text(
                        std::str::from_utf8(t)
                            .map_err(|e| {
                                DatastoreError::Corrupt(format!("{sql}: column {i}: {e}"))
                            })?
                            .to_owned(),
                    ),
                    ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
                    ValueRef::Real(x) => {
                        return Err(DatastoreError::Corrupt(format!(
                            "{sql}: column {i} holds the real {x}"
                        )))
                    }
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn batch(&self, sql: &str) -> Result<(), DatastoreError> {
        Ok(self.0.execute_batch(sql)?)
    }
}
