//! What the scheduling logic needs of a SQL database, and nothing more: run
//! a statement, run a query, run a batch, all inside the one transaction a
//! [`Datastore`](super::Datastore) method is. SQLite and PostgreSQL each
//! implement [`Sql`] in a few lines, so the logic in [`super::logic`] is
//! written once for both.
//!
//! The SQL dialect is the intersection of the two: placeholders `?1`, `?2`
//! (PostgreSQL's adapter turns them into `$1`, `$2`), `true`/`false`,
//! `on conflict` upserts, `returning id`, `with recursive`, partial indexes,
//! `cast(... as bigint)` where PostgreSQL would otherwise answer `numeric`.
//! Values cross the boundary as [`Value`]: integers, text, bytes, booleans.
//! Rows are read whole: every query the logic runs is bounded (by a key, a
//! `limit`, or the size of the active queue), so nothing streams.

use super::DatastoreError;

/// A parameter or a column value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    /// SQLite stores it as 0 or 1; PostgreSQL as `boolean`.
    Bool(bool),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Bytes(v.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// A statement's parameters: `args![a, b]` is `&[Value::from(a), Value::from(b)]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => {
        &[$($crate::coordinator::datastore::sql::Value::from($v)),*][..]
    };
}
pub(crate) use args;

/// A value read from a column; a value of the wrong kind is `Corrupt`.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromValue for bool {
    fn from_value(v: &Value) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            Value::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Option<String> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Vec<u8>> {
        match v {
            Value::Bytes(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Option<T>> {
        match v {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One row of a query's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `i` as a `T`.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, DatastoreError> {
        let v = self.0.get(i).ok_or_else(|| {
            DatastoreError::Corrupt(format!(
                "a row of {} columns has no column {i}",
                self.0.len()
            ))
        })?;
        T::from_value(v).ok_or_else(|| {
            DatastoreError::Corrupt(format!(
                "column {i} holds {v:?}, not a {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A whole row read at once, as a tuple of its columns.
pub trait FromRow: Sized {
    fn from_row(r: &Row) -> Result<Self, DatastoreError>;
}

macro_rules! tuple_from_row {
    ($($t:ident $i:tt),*) => {
        impl<$($t: FromValue),*> FromRow for ($($t,)*) {
            fn from_row(r: &Row) -> Result<Self, DatastoreError> {
                Ok(($(r.get::<$t>($i)?,)*))
            }
        }
    };
}
tuple_from_row!(A 0, B 1);
tuple_from_row!(A 0, B 1, C 2);
tuple_from_row!(A 0, B 1, C 2, D 3);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5);

impl Row {
    /// The row as a tuple: `let (id, name): (i64, String) = row.to()?`.
    pub fn to<T: FromRow>(&self) -> Result<T, DatastoreError> {
        T::from_row(self)
    }
}

/// One open transaction.
pub trait Sql {
    /// Runs one statement; returns how many rows it changed.
    fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, DatastoreError>;
    /// Runs one query; returns its rows.
    fn query(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DatastoreError>;
    /// Runs statements separated by `;`, without parameters (migrations).
    fn batch(&self, sql: &str) -> Result<(), DatastoreError>;
}

impl dyn Sql + '_ {
    /// The first row of a query, if any.
    pub fn query_opt(&self, sql: &str, args: &[Value]) -> Result<Option<Row>, DatastoreError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row of a query that always answers one (an aggregate).
    pub fn query_one(&self, sql: &str, args: &[Value]) -> Result<Row, DatastoreError> {
        self.query_opt(sql, args)?
            .ok_or_else(|| DatastoreError::Corrupt(format!("no row from: {sql}")))
    }

    /// Every row as a tuple.
    pub fn rows<T: FromRow>(&self, sql: &str, args: &[Value]) -> Result<Vec<T>, DatastoreError> {
        self.query(sql, args)?.iter().map(Row::to).collect()
    }

    /// Column 0 of every row.
    pub fn column<T: FromValue>(
        &self,
        sql: &str,
        args: &[Value],
    ) -> Result<Vec<T>, DatastoreError> {
        self.query(sql, args)?.iter().map(|r| r.get(0)).collect()
    }
}

/// A database that runs closures as transactions: the one thing each
/// backend provides. A closure that fails rolls everything back.
pub trait Transactions: Send + Sync {
    /// Runs `f` in a transaction that may write; writers are serialised
    /// (across processes too), so `f` may read, check and write.
    fn write<T>(
        &self,
        f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError>;
    /// Runs `f` in a read-only transaction that sees one state.
    fn read<T>(
        &self,
        f: impl FnOnce(&dyn Sql) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_of_the_wrong_kind_is_corrupt_not_a_panic() {
        let row = Row(vec![Value::Text("x".into()), Value::Null, Value::Int(1)]);
        assert!(matches!(row.get::<i64>(0), Err(DatastoreError::Corrupt(_))));
        assert_eq!(row.get::<Option<i64>>(1).unwrap(), None);
        assert!(row.get::<bool>(2).unwrap());
        assert!(matches!(row.get::<i64>(3), Err(DatastoreError::Corrupt(_))));
    }
}
