//! The scheduling logic, written once over [`Sql`](super::sql::Sql) for every backend:
//! [`Store`] implements [`Datastore`] for any database that can run a
//! closure as a transaction ([`Transactions`]).
//!
//! - [`schema`]: applying a backend's migrations.
//! - `rows`: reading and writing rows (JSON columns, identifiers, states).
//! - `graph`: effective priorities, critical paths, cascades.
//! - `builds`: submission, listing, cancel, priorities.
//! - `leases`: allocation, leases, results, setbacks.
//! - `events`: the event outbox, hooks' progress, the metrics counters.
//! - `agents`, `tokens`.

mod agents;
mod builds;
mod events;
mod graph;
pub mod leases;
mod rows;
pub mod schema;
mod tokens;

use std::collections::BTreeSet;

use super::sql::{args, Transactions};
use super::{
    Allocation, BuildFilter, Datastore, DatastoreError, Delivery, HookProgress, MetricsSnapshot,
    QueueStats, RetryPolicy,
};
use crate::coordinator::model::{
    AgentId, AgentOffer, AgentRecord, BuildId, BuildRecord, CachedPath, DrvRecord, Event, Expiry,
    NewBuild, Principal, Setback, Submitted, TokenRecord,
};

/// The coordinator's datastore over one backend (see
/// [`SqliteDatastore`](super::sqlite::SqliteDatastore) and
/// [`PostgresDatastore`](super::postgres::PostgresDatastore)).
pub struct Store<B> {
    pub(super) backend: B,
    pub(super) retry: RetryPolicy,
}

impl<B> std::fmt::Debug for Store<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &std::any::type_name::<B>())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<B: Transactions> Datastore for Store<B> {
    fn put_derivations(&self, drvs: &[DrvRecord]) -> Result<(), DatastoreError> {
        self.backend
            .write(|tx| drvs.iter().try_for_each(|d| rows::put_derivation(tx, d)))
    }

    fn derivation(&self, drv: &str) -> Result<Option<DrvRecord>, DatastoreError> {
        self.backend.read(|tx| rows::derivation(tx, drv))
    }

    fn cache_add(&self, paths: &[CachedPath]) -> Result<(), DatastoreError> {
        self.backend.write(|tx| leases::cache_add(tx, paths))
    }

    fn cache_get(&self, path: &str) -> Result<Option<CachedPath>, DatastoreError> {
        self.backend.read(|tx| {
            let Some(r) = tx.query_opt(
                "select nar_hash, nar_size, refs, deriver, url, file_size from cache_paths \
                 where path = ?1",
                args![path],
            )?
            else {
                return Ok(None);
            };
            let (nar_hash, nar_size, refs, deriver, url, file_size): (
                String,
                i64,
                String,
                Option<String>,
                String,
                i64,
            ) = r.to()?;
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
        self.backend.read(|tx| {
            let mut missing = BTreeSet::new();
            for p in paths {
                if tx
                    .query_opt("select 1 from cache_paths where path = ?1", args![p])?
                    .is_none()
                {
                    missing.insert(p.clone());
                }
            }
            Ok(missing)
        })
    }

    fn submit(&self, builds: &[NewBuild], now: i64) -> Result<Vec<Submitted>, DatastoreError> {
        self.backend.write(|tx| {
            let before: i64 = tx
                .query_one("select coalesce(max(id), 0) from builds", &[])?
                .get(0)?;
            let out = builds
                .iter()
                .map(|nb| builds::submit_one(tx, nb, now))
                .collect::<Result<Vec<_>, _>>()?;
            // Ids only grow (autoincrement), so the rows above `before` are
            // exactly the builds this submission created; their events
            // carry them as they stand once all are linked.
            let created: Vec<i64> = tx.column(
                "select id from builds where id > ?1 order by id",
                args![before],
            )?;
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
        self.backend.read(|tx| rows::build(tx, id))
    }

    fn builds(&self, filter: &BuildFilter) -> Result<Vec<BuildRecord>, DatastoreError> {
        self.backend.read(|tx| builds::list(tx, filter))
    }

    fn dependencies(&self, id: BuildId) -> Result<Vec<BuildId>, DatastoreError> {
        self.backend.read(|tx| builds::dependencies(tx, id))
    }

    fn cancel(&self, id: BuildId, now: i64) -> Result<Vec<BuildId>, DatastoreError> {
        self.backend.write(|tx| builds::cancel(tx, id, now))
    }

    fn set_priority(&self, id: BuildId, priority: i64) -> Result<BuildRecord, DatastoreError> {
        self.backend
            .write(|tx| builds::set_priority(tx, id, priority))
    }

    fn queue_stats(&self) -> Result<QueueStats, DatastoreError> {
        self.backend.read(|tx| builds::stats(tx))
    }

    fn agent_new(&self, id: &AgentId, now: i64) -> Result<(), DatastoreError> {
        self.backend.write(|tx| agents::create(tx, id, now))
    }

    fn agent_set_enabled(&self, id: &AgentId, enabled: bool) -> Result<(), DatastoreError> {
        self.backend
            .write(|tx| agents::set_enabled(tx, id, enabled))
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, DatastoreError> {
        self.backend.read(|tx| agents::list(tx))
    }

    fn allocate(
        &self,
        agent: &AgentId,
        offer: &AgentOffer,
        lease_secs: i64,
        now: i64,
    ) -> Result<Vec<Allocation>, DatastoreError> {
        self.backend
            .write(|tx| leases::allocate(tx, agent, offer, lease_secs, now))
    }

    fn leases(&self, agent: &AgentId) -> Result<Vec<Allocation>, DatastoreError> {
        self.backend.read(|tx| leases::leases(tx, agent))
    }

    fn heartbeat(
        &self,
        agent: &AgentId,
        builds: &[BuildId],
        lease_secs: i64,
        now: i64,
    ) -> Result<Vec<BuildId>, DatastoreError> {
        self.backend
            .write(|tx| leases::heartbeat(tx, agent, builds, lease_secs, now))
    }

    fn start(&self, agent: &AgentId, id: BuildId, now: i64) -> Result<(), DatastoreError> {
        self.backend.write(|tx| leases::start(tx, agent, id, now))
    }

    fn succeed(
        &self,
        agent: &AgentId,
        id: BuildId,
        outputs: &[CachedPath],
        now: i64,
    ) -> Result<(), DatastoreError> {
        self.backend
            .write(|tx| leases::succeed(tx, agent, id, outputs, now))
    }

    fn setback(
        &self,
        agent: &AgentId,
        id: BuildId,
        setback: &Setback,
        now: i64,
    ) -> Result<BuildRecord, DatastoreError> {
        self.backend
            .write(|tx| leases::setback(tx, agent, id, setback, &self.retry, now))
    }

    fn expire_leases(&self, now: i64) -> Result<Vec<BuildId>, DatastoreError> {
        self.backend
            .write(|tx| leases::expire(tx, &self.retry, now))
    }

    fn token_add(
        &self,
        hash: &[u8; 32],
        principal: &Principal,
        expires_at: Expiry,
        now: i64,
    ) -> Result<String, DatastoreError> {
        self.backend
            .write(|tx| tokens::add(tx, hash, principal, expires_at, now))
    }

    fn token_lookup(&self, hash: &[u8; 32], now: i64) -> Result<Option<Principal>, DatastoreError> {
        self.backend.read(|tx| tokens::lookup(tx, hash, now))
    }

    fn token_revoke(&self, id: &str) -> Result<(), DatastoreError> {
        self.backend.write(|tx| tokens::revoke(tx, id))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, DatastoreError> {
        self.backend.read(|tx| tokens::list(tx))
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, DatastoreError> {
        self.backend.read(|tx| events::after(tx, after, limit))
    }

    fn last_event_id(&self) -> Result<i64, DatastoreError> {
        self.backend.read(|tx| events::last_id(tx))
    }

    fn hook_progress(&self, hook: &str) -> Result<HookProgress, DatastoreError> {
        // A read first: the hooks ask every second, and only a new hook
        // needs the write lock.
        if let Some(p) = self.backend.read(|tx| events::known_progress(tx, hook))? {
            return Ok(p);
        }
        self.backend.write(|tx| events::progress(tx, hook))
    }

    fn hook_attempt(
        &self,
        hook: &str,
        event: i64,
        delivered: bool,
        next_try: i64,
    ) -> Result<Delivery, DatastoreError> {
        self.backend
            .write(|tx| events::record(tx, hook, event, delivered, next_try))
    }

    fn hook_advance(&self, hook: &str, cursor: i64) -> Result<(), DatastoreError> {
        self.backend.write(|tx| events::advance(tx, hook, cursor))
    }

    fn prune_events(&self, hooks: &[String], keep: i64) -> Result<usize, DatastoreError> {
        self.backend.write(|tx| events::prune(tx, hooks, keep))
    }

    fn metrics(&self) -> Result<MetricsSnapshot, DatastoreError> {
        self.backend.read(|tx| events::metrics(tx))
    }
}
