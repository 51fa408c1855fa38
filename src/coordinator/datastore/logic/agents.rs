//! Agents: created by the operator, described by their own requests.

use std::collections::BTreeSet;

use super::rows::{self, from_json, to_json};
use crate::coordinator::datastore::sql::{args, Sql};
use crate::coordinator::datastore::DatastoreError;
use crate::coordinator::model::{AgentId, AgentOffer, AgentRecord};

/// What another agent said it builds, for the `avoid_agent` rule.
pub(super) struct Seen {
    pub(super) systems: BTreeSet<String>,
    pub(super) features: BTreeSet<String>,
}

/// Whether `id` is enabled; `NoAgent` if it does not exist.
pub(super) fn require(conn: &dyn Sql, id: &AgentId) -> Result<bool, DatastoreError> {
    conn.query_opt(
        "select enabled from agents where id = ?1",
        args![id.as_str()],
    )?
    .ok_or_else(|| DatastoreError::NoAgent(id.clone()))?
    .get(0)
}

pub(super) fn create(conn: &dyn Sql, id: &AgentId, now: i64) -> Result<(), DatastoreError> {
    let inserted = conn.execute(
        "insert into agents (id, enabled, systems, features, max_parallel_builds, created_at) \
         values (?1, true, '[]', '[]', 0, ?2) on conflict (id) do nothing",
        args![id.as_str(), now],
    )?;
    if inserted == 0 {
        return Err(DatastoreError::AgentExists(id.clone()));
    }
    Ok(())
}

pub(super) fn set_enabled(
    conn: &dyn Sql,
    id: &AgentId,
    enabled: bool,
) -> Result<(), DatastoreError> {
    if conn.execute(
        "update agents set enabled = ?2 where id = ?1",
        args![id.as_str(), enabled],
    )? == 0
    {
        return Err(DatastoreError::NoAgent(id.clone()));
    }
    Ok(())
}

/// Records that the agent was heard from; returns whether it is enabled.
pub(super) fn touch(conn: &dyn Sql, id: &AgentId, now: i64) -> Result<bool, DatastoreError> {
    conn.execute(
        "update agents set last_seen = ?2 where id = ?1",
        args![id.as_str(), now],
    )?;
    require(conn, id)
}

/// Records what the agent offers; returns whether it is enabled.
pub(super) fn record_offer(
    conn: &dyn Sql,
    id: &AgentId,
    offer: &AgentOffer,
    now: i64,
) -> Result<bool, DatastoreError> {
    conn.execute(
        "update agents set systems = ?2, features = ?3, max_parallel_builds = ?4, last_seen = ?5 \
         where id = ?1",
        args![
            id.as_str(),
            to_json(&offer.systems)?,
            to_json(&offer.features)?,
            offer.max_parallel_builds,
            now
        ],
    )?;
    require(conn, id)
}

/// The enabled agents other than `id` heard from at or after `since`.
pub(super) fn others_seen_since(
    conn: &dyn Sql,
    id: &AgentId,
    since: i64,
) -> Result<Vec<Seen>, DatastoreError> {
    conn.query(
        "select systems, features from agents where enabled and id <> ?1 and last_seen >= ?2",
        args![id.as_str(), since],
    )?
    .iter()
    .map(|r| {
        Ok(Seen {
            systems: from_json("agents.systems", &r.get::<String>(0)?)?,
            features: from_json("agents.features", &r.get::<String>(1)?)?,
        })
    })
    .collect()
}

/// Every agent, with the builds leased to it.
pub(super) fn list(conn: &dyn Sql) -> Result<Vec<AgentRecord>, DatastoreError> {
    let raw = conn.query(
        "select id, enabled, systems, features, max_parallel_builds, last_seen from agents order by id",
        &[],
    )?;
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        let (id, enabled, systems, features, max_parallel_builds, last_seen): (
            String,
            bool,
            String,
            String,
            i64,
            Option<i64>,
        ) = r.to()?;
        let allocated = conn
            .column::<i64>(
                "select id from builds where state = 'allocated' and agent = ?1 order by id",
                args![&id],
            )?
            .into_iter()
            .map(rows::build_id)
            .collect::<Result<Vec<_>, _>>()?;
        out.push(AgentRecord {
            id: rows::agent_id(&id)?,
            enabled,
            systems: from_json("agents.systems", &systems)?,
            features: from_json("agents.features", &features)?,
            max_parallel_builds,
            last_seen,
            allocated,
        });
    }
    Ok(out)
}
