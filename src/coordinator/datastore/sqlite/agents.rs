//! Agents: created by the operator, described by their own requests.

use std::collections::BTreeSet;

use rusqlite::{params, Connection, OptionalExtension};

use super::rows::{self, from_json, to_json};
use crate::coordinator::datastore::DatastoreError;
use crate::coordinator::model::{AgentId, AgentOffer, AgentRecord};

/// What another agent said it builds, for the `avoid_agent` rule.
pub(super) struct Seen {
    pub(super) systems: BTreeSet<String>,
    pub(super) features: BTreeSet<String>,
}

/// Whether `id` is enabled; `NoAgent` if it does not exist.
pub(super) fn require(conn: &Connection, id: &AgentId) -> Result<bool, DatastoreError> {
    conn.prepare_cached("select enabled from agents where id = ?1")?
        .query_row(params![id.as_str()], |r| r.get::<_, bool>(0))
        .optional()?
        .ok_or_else(|| DatastoreError::NoAgent(id.clone()))
}

pub(super) fn create(conn: &Connection, id: &AgentId, now: i64) -> Result<(), DatastoreError> {
    let inserted = conn.execute(
        "insert into agents (id, enabled, systems, features, max_parallel_builds, created_at) \
         values (?1, 1, '[]', '[]', 0, ?2) on conflict (id) do nothing",
        params![id.as_str(), now],
    )?;
    if inserted == 0 {
        return Err(DatastoreError::AgentExists(id.clone()));
    }
    Ok(())
}

pub(super) fn set_enabled(
    conn: &Connection,
    id: &AgentId,
    enabled: bool,
) -> Result<(), DatastoreError> {
    if conn.execute(
        "update agents set enabled = ?2 where id = ?1",
        params![id.as_str(), enabled],
    )? == 0
    {
        return Err(DatastoreError::NoAgent(id.clone()));
    }
    Ok(())
}

/// Records that the agent was heard from; returns whether it is enabled.
pub(super) fn touch(conn: &Connection, id: &AgentId, now: i64) -> Result<bool, DatastoreError> {
    conn.execute(
        "update agents set last_seen = ?2 where id = ?1",
        params![id.as_str(), now],
    )?;
    require(conn, id)
}

/// Records what the agent offers; returns whether it is enabled.
pub(super) fn record_offer(
    conn: &Connection,
    id: &AgentId,
    offer: &AgentOffer,
    now: i64,
) -> Result<bool, DatastoreError> {
    conn.prepare_cached(
        "update agents set systems = ?2, features = ?3, max_parallel_builds = ?4, last_seen = ?5 \
         where id = ?1",
    )?
    .execute(params![
        id.as_str(),
        to_json(&offer.systems)?,
        to_json(&offer.features)?,
        offer.max_parallel_builds,
        now
    ])?;
    require(conn, id)
}

/// The enabled agents other than `id` heard from at or after `since`.
pub(super) fn others_seen_since(
    conn: &Connection,
    id: &AgentId,
    since: i64,
) -> Result<Vec<Seen>, DatastoreError> {
    let mut stmt = conn.prepare_cached(
        "select systems, features from agents where enabled = 1 and id <> ?1 and last_seen >= ?2",
    )?;
    let raw = stmt
        .query_map(params![id.as_str(), since], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    raw.into_iter()
        .map(|(s, f)| {
            Ok(Seen {
                systems: from_json("agents.systems", &s)?,
                features: from_json("agents.features", &f)?,
            })
        })
        .collect()
}

/// Every agent, with the builds leased to it.
pub(super) fn list(conn: &Connection) -> Result<Vec<AgentRecord>, DatastoreError> {
    type Raw = (String, bool, String, String, i64, Option<i64>);
    let raw: Vec<Raw> = conn
        .prepare_cached(
            "select id, enabled, systems, features, max_parallel_builds, last_seen from agents order by id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?
        .collect::<Result<_, _>>()?;
    let mut leased = conn.prepare_cached(
        "select id from builds where state = 'allocated' and agent = ?1 order by id",
    )?;
    let mut out = Vec::with_capacity(raw.len());
    for (id, enabled, systems, features, max_parallel_builds, last_seen) in raw {
        let allocated = leased
            .query_map(params![id], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?
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
