//! The PostgreSQL datastore, for farms that outgrow one SQLite file: the
//! same [`logic`](super::logic) over a PostgreSQL connection, so both
//! backends behave identically (the same tests run against both).
//!
//! - **URL**: a libpq URI, `postgresql://user@host/db` or `postgres://…`,
//!   a unix-socket directory as `postgresql:///db?host=/run/postgresql`.
//! - **No TLS**: the client has no TLS support; `sslmode=require` is
//!   refused at open (the default, `prefer`, connects without TLS). Use a
//!   local socket or a trusted network.
//! - **One connection** behind a mutex, as for SQLite: the coordinator
//!   serialises its writers anyway (below), and its reads are short, so a
//!   pool would buy little and add a second place where state lives. A
//!   connection that broke (server restart) is replaced at the next call.
//! - **Writers are serialised** across processes: every writing
//!   transaction (READ COMMITTED) first takes one transaction-level
//!   advisory lock, [`WRITE_LOCK`], the equivalent of SQLite's
//!   `BEGIN IMMEDIATE`, so two coordinators (or threads) on one database
//!   cannot race a read-check-write; each statement after the lock sees
//!   every earlier writer's commit. Chosen over SERIALIZABLE with retries:
//!   the logic is not written to be re-run, and writers are short. Reads
//!   run in one REPEATABLE READ, READ ONLY transaction, so they see one
//!   state, without the lock.
//! - **Blocking**: the `postgres` client drives its own small tokio runtime
//!   on the calling thread, so calls must come from a blocking context (the
//!   server calls the datastore from tokio's blocking pool; the CLI before
//!   any runtime). The connection is dropped on a thread of its own, so
//!   dropping the datastore inside async code is safe too.
//! - Durability: a call returns after `COMMIT`, which PostgreSQL makes
//!   durable with its default `synchronous_commit = on`.

pub mod schema;

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::{Mutex, MutexGuard};

use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{Client, Config, IsolationLevel, NoTls, Statement};

use super::logic::Store;
use super::sql::{Row, Sql, Transactions, Value};
use super::{DatastoreError, RetryPolicy};

/// The advisory lock every writing transaction takes first (any constant
/// unlikely to be used by another application on the same database:
/// "sandoff" in ASCII).
pub const WRITE_LOCK: i64 = 0x73_61_6e_64_6f_66_66;

/// The coordinator's datastore in PostgreSQL.
pub type PostgresDatastore = Store<Postgres>;

/// One PostgreSQL connection behind a mutex (see the module docs).
pub struct Postgres {
    conn: Mutex<Conn>,
}

struct Conn {
    config: Config,
    client: Option<Client>,
    /// Prepared statements of `client`, by their SQL.
    statements: HashMap<String, Statement>,
}

impl PostgresDatastore {
    /// Connects to the database `url` names and brings its schema up to
    /// date; refuses one written by a newer sandoff, and TLS.
    pub fn open(url: &str, retry: RetryPolicy) -> Result<PostgresDatastore, DatastoreError> {
        let config = config(url)?;
        let mut conn = Conn {
            config,
            client: None,
            statements: HashMap::new(),
        };
        conn.connect()
            .map_err(|source| DatastoreError::PostgresConnect {
                url: redact(url),
                source,
            })?;
        let backend = Postgres {
            conn: Mutex::new(conn),
        };
        super::logic::schema::migrate(&backend, schema::MIGRATIONS)?;
        Ok(Store { backend, retry })
    }
}

/// Parses a libpq URI and checks it asks for nothing this client cannot do.
fn config(url: &str) -> Result<Config, DatastoreError> {
    // Checked before parsing: the parser knows no `verify-*` and would
    // only say the value is invalid.
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let tls = query.split('&').any(|kv| {
        matches!(
            kv.split_once('='),
            Some(("sslmode", "require" | "verify-ca" | "verify-full"))
        )
    });
    if tls {
        return Err(DatastoreError::PostgresTls { url: redact(url) });
    }
    let config: Config = url.parse().map_err(|source| DatastoreError::PostgresUrl {
        url: redact(url),
        source,
    })?;
    if config.get_ssl_mode() == postgres::config::SslMode::Require {
        return Err(DatastoreError::PostgresTls { url: redact(url) });
    }
    Ok(config)
}

/// `url` with its password (in the authority or as `password=`) hidden,
/// for error messages and logs.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, tail) = rest
        .find(['/', '?'])
        .map_or((rest, ""), |i| rest.split_at(i));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    if scheme.is_empty() {
        format!("{authority}{tail}")
    } else {
        format!("{scheme}://{authority}{tail}")
    }
}

impl Conn {
    /// Makes the connection anew if there is none or it broke.
    fn connect(&mut self) -> Result<(), postgres::Error> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.drop_client();
        }
        if self.client.is_none() {
            self.client = Some(self.config.connect(NoTls)?);
        }
        Ok(())
    }

    fn drop_client(&mut self) {
        self.statements.clear();
        if let Some(client) = self.client.take() {
            // The client owns a tokio runtime, which must not be dropped
            // inside async code: drop it on a thread of its own.
            let _ = std::thread::spawn(move || drop(client)).join();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.lock().drop_client();
    }
}

impl Postgres {
    fn lock(&self) -> MutexGuard<'_, Conn> {
        // A panic while holding the lock left no half-done transaction (an
        // open one rolls back when dropped), so the connection is usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn run<T>(
        &self,
        write: bool,
        f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        let mut guard = self.lock();
        let conn = &mut *guard;
        let out = run_on(conn, write, f);
        if out.is_err() && conn.client.as_ref().is_some_and(Client::is_closed) {
            conn.drop_client();
        }
        out
    }
}

fn run_on<T>(
    conn: &mut Conn,
    write: bool,
    f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
) -> Result<T, DatastoreError> {
    let mut retried = false;
    loop {
        conn.connect()?;
        let Conn {
            client, statements, ..
        } = &mut *conn;
        let client = client.as_mut().expect("connected just above");
        let broke = match begin(client, write) {
            Ok(mut tx) => {
                let out = f(&Tx {
                    tx: RefCell::new(&mut tx),
                    statements: RefCell::new(statements),
                })?;
                tx.commit()?;
                return Ok(out);
            }
            Err(e) => e,
        };
        // A connection that broke since the last call (the server
        // restarted) shows only when used. Nothing of this call ran yet,
        // so it is tried once more on a new connection.
        if retried || !conn.client.as_ref().is_some_and(Client::is_closed) {
            return Err(broke.into());
        }
        tracing::warn!(error = %broke, "datastore: the PostgreSQL connection broke; reconnecting");
        conn.drop_client();
        retried = true;
    }
}

/// Begins a transaction: a writing one takes [`WRITE_LOCK`] first.
fn begin(client: &mut Client, write: bool) -> Result<postgres::Transaction<'_>, postgres::Error> {
    if write {
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()?;
        tx.execute("select pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        Ok(tx)
    } else {
        client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
    }
}

impl Transactions for Postgres {
    fn write<T>(
        &self,
        f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        self.run(true, f)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        self.run(false, f)
    }
}

/// An open PostgreSQL transaction as [`Sql`].
struct Tx<'a, 'c> {
    tx: RefCell<&'a mut postgres::Transaction<'c>>,
    statements: RefCell<&'a mut HashMap<String, Statement>>,
}

/// The logic's `?N` placeholders as PostgreSQL's `$N`.
fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

impl Tx<'_, '_> {
    /// The prepared statement for `sql` (prepared once per connection:
    /// PostgreSQL keeps it across transactions).
    fn prepare(&self, sql: &str) -> Result<Statement, DatastoreError> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let stmt = self.tx.borrow_mut().prepare(&placeholders(sql))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }
}

fn params(args: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

/// A column as a [`Value`], by its PostgreSQL type.
fn column(row: &postgres::Row, i: usize) -> Result<Value, DatastoreError> {
    let ty = row.columns()[i].type_();
    let v = match *ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|n| Value::Int(n.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|n| Value::Int(n.into())),
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(Value::Bool),
        Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        }
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Bytes),
        ref other => {
            return Err(DatastoreError::Corrupt(format!(
                "column {i} of type {other} (no mapping to a value)"
            )))
        }
    };
    Ok(v.unwrap_or(Value::Null))
}

impl Sql for Tx<'_, '_> {
    fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, DatastoreError> {
        let stmt = self.prepare(sql)?;
        Ok(self.tx.borrow_mut().execute(&stmt, &params(args))?)
    }

    fn query(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DatastoreError> {
        let stmt = self.prepare(sql)?;
        let rows = self.tx.borrow_mut().query(&stmt, &params(args))?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| column(r, i))
                    .collect::<Result<_, _>>()
                    .map(Row)
            })
            .collect()
    }

    fn batch(&self, sql: &str) -> Result<(), DatastoreError> {
        Ok(self.tx.borrow_mut().batch_execute(sql)?)
    }
}

/// A value as a parameter of whatever type PostgreSQL inferred for it: the
/// logic's integers fit `bigint` columns and narrower ones alike, and its
/// booleans `boolean` ones.
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(_) | Value::Bool(_) if *ty == Type::BOOL => {
                let b = matches!(
                    self,
                    Value::Bool(true) | Value::Int(1..) | Value::Int(..=-1)
                );
                b.to_sql(ty, out)
            }
            Value::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                _ => Err(format!("an integer for a parameter of type {ty}").into()),
            },
            Value::Bool(b) => i64::from(*b).to_sql(ty, out),
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Bytes(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked in `to_sql`, against the type of the actual parameter.
        true
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollar_numbers() {
        assert_eq!(
            placeholders("select a from t where b = ?1 and c in (?2, ?12)"),
            "select a from t where b = $1 and c in ($2, $12)"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgresql://sandoff:secret@db.example/farm?sslmode=disable"),
            "postgresql://sandoff:***@db.example/farm?sslmode=disable"
        );
        assert_eq!(
            redact("postgres:///farm?host=/run/pg&password=secret&user=x"),
            "postgres:///farm?host=/run/pg&password=***&user=x"
        );
        assert_eq!(redact("postgres://db/farm"), "postgres://db/farm");
    }

    #[test]
    fn tls_is_refused_and_a_bad_url_is_an_error() {
        assert!(matches!(
            config("postgresql://db/farm?sslmode=require"),
            Err(DatastoreError::PostgresTls { .. })
        ));
        assert!(matches!(
            config("postgresql://db/farm?sslmode=verify-full"),
            Err(DatastoreError::PostgresTls { .. })
        ));
        assert!(matches!(
            config("postgresql://db/farm?frobnicate=1"),
            Err(DatastoreError::PostgresUrl { .. })
        ));
        assert!(config("postgresql:///farm?host=/run/postgresql&user=sandoff").is_ok());
    }
}
