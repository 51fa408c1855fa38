//! The SQLite datastore: one file, one connection behind a mutex (the
//! server calls it from tokio's blocking pool, and SQLite serialises
//! writers anyway).
//!
//! Durability: WAL with `synchronous = FULL`, so a transaction that
//! returned is on disk and survives kill -9 and power loss; every
//! [`Datastore`] method is one transaction (`BEGIN IMMEDIATE` when it
//! writes, so no read-check-write races another process), and an error
//! rolls all of it back.
//!
//! - [`schema`]: the tables and their migrations.
//! - `rows`: reading and writing rows.
//! - `graph`: effective priorities, critical paths, cascades.
//! - `builds`: submission, listing, cancel, priorities.
//! - `leases`: allocation, leases, results, setbacks.
//! - `events`: the event outbox, hooks' progress, the metrics counters.
//! - `agents`, `tokens`.

mod agents;
mod builds;
mod events;
mod graph;
mod leases;
mod rows;
pub mod schema;
#[cfg(test)]
mod tests;
mod tokens;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{
    Allocation, BuildFilter, Datastore, DatastoreError, Delivery, HookProgress, MetricsSnapshot,
    QueueStats, RetryPolicy,
};
use crate::coordinator::model::{
    AgentId, AgentOffer, AgentRecord, BuildId, BuildRecord, CachedPath, DrvRecord, Event, Expiry,
    NewBuild, Principal, Setback, Submitted, TokenRecord,
};

/// How long a call waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// The coordinator's datastore in SQLite.
pub struct SqliteDatastore {
    conn: Mutex<Connection>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for SqliteDatastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDatastore")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
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

    fn over(mut conn: Connection, retry: RetryPolicy) -> Result<SqliteDatastore, DatastoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // FULL: in WAL mode NORMAL may lose the last transactions on power
        // loss, and a lost result would be built again (or a lost submission
        // never built).
        conn.execute_batch("pragma synchronous = full; pragma foreign_keys = on;")?;
        schema::migrate(&mut conn)?;
        Ok(SqliteDatastore {
            conn: Mutex::new(conn),
            retry,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock left no half-done transaction
        // (rusqlite rolls back on drop), so the connection is still usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction, committed only if it
    /// succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` in one read transaction, so it sees one state.
    fn read<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` on the connection, for tests that set up or inspect rows
    /// directly.
    #[cfg(test)]
    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> T {
        f(&mut self.lock())
    }
}

impl Datastore for SqliteDatastore {
    fn put_derivations(&self, drvs: &[DrvRecord]) -> Result<(), DatastoreError> {
        self.write(|tx| drvs.iter().try_for_each(|d| rows::put_derivation(tx, d)))
    }

    fn derivation(&self, drv: &str) -> Result<Option<DrvRecord>, DatastoreError> {
        self.read(|tx| rows::derivation(tx, drv))
    }

    fn cache_add(&self, paths: &[CachedPath]) -> Result<(), DatastoreError> {
        self.write(|tx| leases::cache_add(tx, paths))
    }

    fn cache_get(&self, path: &str) -> Result<Option<CachedPath>, DatastoreError> {
        self.read(|tx| {
            type Raw = (String, i64, String, Option<String>, String, i64);
            let raw: Option<Raw> = tx
                .prepare_cached(
                    "select nar_hash, nar_size, refs, deriver, url, file_size from cache_paths \
                     where path = ?1",
                )?
                .query_row(params![path], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .optional()?;
            let Some((nar_hash, nar_size, refs, deriver, url, file_size)) = raw else {
                return Ok(None);
            };
            let size = |what: &str, n: i64| {
                u64::try_from(n)
                    .map_err(|_| DatastoreError::Corrupt(format!("{what} {n} of '{path}'")))
            };
            Ok(Some(CachedPath {
                path: path.to_owned(),
                nar_hash,
                nar_size: size("nar size", nar_size)?,
                references: rows::from_json("cache_paths.refs", &refs)?,
                deriver,
                url,
                file_size: size("file size", file_size)?,
            }))
        })
    }

    fn cache_missing(&self, paths: &[String]) -> Result<BTreeSet<String>, DatastoreError> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached("select 1 from cache_paths where path = ?1")?;
            let mut missing = BTreeSet::new();
            for p in paths {
                if !stmt.exists(params![p])? {
                    missing.insert(p.clone());
                }
            }
            Ok(missing)
        })
    }

    fn submit(&self, builds: &[NewBuild], now: i64) -> Result<Vec<Submitted>, DatastoreError> {
        self.write(|tx| {
            let before: i64 =
                tx.query_row("select coalesce(max(id), 0) from builds", [], |r| r.get(0))?;
            let out = builds
                .iter()
                .map(|nb| builds::submit_one(tx, nb, now))
                .collect::<Result<Vec<_>, _>>()?;
            // Ids only grow (autoincrement), so the rows above `before` are
            // exactly the builds this submission created; their events
            // carry them as they stand once all are linked.
            let created = tx
                .prepare("select id from builds where id > ?1 order by id")?
                .query_map(params![before], |r| r.get::<_, i64>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            for id in created {
                let id = rows::build_id(id)?;
                events::build_event(
                    tx,
                    crate::coordinator::model::EventKind::BuildSubmitted,
                    id,
                    now,
                )?;
                events::ended(tx, id, now)?;
            }
            Ok(out)
        })
    }

    fn build(&self, id: BuildId) -> Result<BuildRecord, DatastoreError> {
        self.read(|tx| rows::build(tx, id))
    }

    fn builds(&self, filter: &BuildFilter) -> Result<Vec<BuildRecord>, DatastoreError> {
        self.read(|tx| builds::list(tx, filter))
    }

    fn dependencies(&self, id: BuildId) -> Result<Vec<BuildId>, DatastoreError> {
        self.read(|tx| builds::dependencies(tx, id))
    }

    fn cancel(&self, id: BuildId, now: i64) -> Result<Vec<BuildId>, DatastoreError> {
        self.write(|tx| builds::cancel(tx, id, now))
    }

    fn set_priority(&self, id: BuildId, priority: i64) -> Result<BuildRecord, DatastoreError> {
        self.write(|tx| builds::set_priority(tx, id, priority))
    }

    fn queue_stats(&self) -> Result<QueueStats, DatastoreError> {
        self.read(|tx| builds::stats(tx))
    }

    fn agent_new(&self, id: &AgentId, now: i64) -> Result<(), DatastoreError> {
        self.write(|tx| agents::create(tx, id, now))
    }

    fn agent_set_enabled(&self, id: &AgentId, enabled: bool) -> Result<(), DatastoreError> {
        self.write(|tx| agents::set_enabled(tx, id, enabled))
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, DatastoreError> {
        self.read(|tx| agents::list(tx))
    }

    fn allocate(
        &self,
        agent: &AgentId,
        offer: &AgentOffer,
        lease_secs: i64,
        now: i64,
    ) -> Result<Vec<Allocation>, DatastoreError> {
        self.write(|tx| leases::allocate(tx, agent, offer, lease_secs, now))
    }

    fn leases(&self, agent: &AgentId) -> Result<Vec<Allocation>, DatastoreError> {
        self.read(|tx| leases::leases(tx, agent))
    }

    fn heartbeat(
        &self,
        agent: &AgentId,
        builds: &[BuildId],
        lease_secs: i64,
        now: i64,
    ) -> Result<Vec<BuildId>, DatastoreError> {
        self.write(|tx| leases::heartbeat(tx, agent, builds, lease_secs, now))
    }

    fn start(&self, agent: &AgentId, id: BuildId, now: i64) -> Result<(), DatastoreError> {
        self.write(|tx| leases::start(tx, agent, id, now))
    }

    fn succeed(
        &self,
        agent: &AgentId,
        id: BuildId,
        outputs: &[CachedPath],
        now: i64,
    ) -> Result<(), DatastoreError> {
        self.write(|tx| leases::succeed(tx, agent, id, outputs, now))
    }

    fn setback(
        &self,
        agent: &AgentId,
        id: BuildId,
        setback: &Setback,
        now: i64,
    ) -> Result<BuildRecord, DatastoreError> {
        self.write(|tx| leases::setback(tx, agent, id, setback, &self.retry, now))
    }

    fn expire_leases(&self, now: i64) -> Result<Vec<BuildId>, DatastoreError> {
        self.write(|tx| leases::expire(tx, &self.retry, now))
    }

    fn token_add(
        &self,
        hash: &[u8; 32],
        principal: &Principal,
        expires_at: Expiry,
        now: i64,
    ) -> Result<String, DatastoreError> {
        self.write(|tx| tokens::add(tx, hash, principal, expires_at, now))
    }

    fn token_lookup(&self, hash: &[u8; 32], now: i64) -> Result<Option<Principal>, DatastoreError> {
        self.read(|tx| tokens::lookup(tx, hash, now))
    }

    fn token_revoke(&self, id: &str) -> Result<(), DatastoreError> {
        self.write(|tx| tokens::revoke(tx, id))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, DatastoreError> {
        self.read(|tx| tokens::list(tx))
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, DatastoreError> {
        self.read(|tx| events::after(tx, after, limit))
    }

    fn last_event_id(&self) -> Result<i64, DatastoreError> {
        self.read(|tx| events::last_id(tx))
    }

    fn hook_progress(&self, hook: &str) -> Result<HookProgress, DatastoreError> {
        // A read first: the hooks ask every second, and only a new hook
        // needs the write lock.
        if let Some(p) = self.read(|tx| events::known_progress(tx, hook))? {
            return Ok(p);
        }
        self.write(|tx| events::progress(tx, hook))
    }

    fn hook_attempt(
        &self,
        hook: &str,
        event: i64,
        delivered: bool,
        next_try: i64,
    ) -> Result<Delivery, DatastoreError> {
        self.write(|tx| events::record(tx, hook, event, delivered, next_try))
    }

    fn hook_advance(&self, hook: &str, cursor: i64) -> Result<(), DatastoreError> {
        self.write(|tx| events::advance(tx, hook, cursor))
    }

    fn prune_events(&self, hooks: &[String], keep: i64) -> Result<usize, DatastoreError> {
        self.write(|tx| events::prune(tx, hooks, keep))
    }

    fn metrics(&self) -> Result<MetricsSnapshot, DatastoreError> {
        self.read(|tx| events::metrics(tx))
    }
}
