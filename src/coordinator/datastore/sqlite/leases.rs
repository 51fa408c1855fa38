//! Handing builds to agents and taking their results back: allocation,
//! leases and heartbeats, success, setbacks with backoff, lease expiry.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use rusqlite::{params, Connection, Rows};

use super::agents::{self, Seen};
use super::graph;
use super::rows::{self, from_json, to_json};
use crate::coordinator::datastore::{Allocation, DatastoreError, RetryPolicy};
use crate::coordinator::model::{AgentId, AgentOffer, BuildId, BuildRecord, BuildState, CachedPath, Setback};

/// The system every agent can build (Nix's `systemSupported`).
const BUILTIN: &str = "builtin";

/// Ready builds of one system, best first. The partial index
/// `builds_ready` serves it without sorting (the `state` and `waiting_on`
/// conditions imply the index's); deferred and backing-off builds are
/// skipped while walking it.
const READY: &str = "select b.id, b.effective_priority, b.critical_path, b.avoid_agent, b.drv, \
    d.required_features \
    from builds b join derivations d on d.drv = b.drv \
    where b.system = ?1 and b.state = 'queued' and b.waiting_on = 0 \
    and (b.defer_until is null or b.defer_until <= ?2) \
    and (b.next_attempt_at is null or b.next_attempt_at <= ?2) \
    order by b.effective_priority desc, b.critical_path desc, b.id asc";

/// A ready build considered for an agent.
struct Candidate {
    id: i64,
    eff: i64,
    cp: i64,
    avoid_agent: Option<String>,
    drv: String,
    system: String,
    required_features: BTreeSet<String>,
}

impl Candidate {
    /// The allocation order: priority, then critical path, then age.
    fn rank(&self) -> (i64, i64, Reverse<i64>) {
        (self.eff, self.cp, Reverse(self.id))
    }
}

fn next_candidate(rows: &mut Rows<'_>, system: &str) -> Result<Option<Candidate>, DatastoreError> {
    let Some(r) = rows.next()? else {
        return Ok(None);
    };
    let features: String = r.get(5)?;
    Ok(Some(Candidate {
        id: r.get(0)?,
        eff: r.get(1)?,
        cp: r.get(2)?,
        avoid_agent: r.get(3)?,
        drv: r.get(4)?,
        system: system.to_owned(),
        required_features: from_json("derivations.required_features", &features)?,
    }))
}

/// Whether an agent offering `systems` and `features` can build `c`: the
/// rule of `decide::assess` (a system of its own or `builtin`, every
/// required feature offered; the coordinator's agents have no mandatory
/// features).
fn can_do(systems: &BTreeSet<String>, features: &BTreeSet<String>, c: &Candidate) -> bool {
    (c.system == BUILTIN || systems.contains(&c.system)) && c.required_features.is_subset(features)
}

/// The ready builds `agent` should get, best first, at most `slots`.
fn choose(
    conn: &Connection,
    agent: &AgentId,
    offer: &AgentOffer,
    others: &[Seen],
    slots: usize,
    now: i64,
) -> Result<Vec<Candidate>, DatastoreError> {
    let mut systems: BTreeSet<&str> = offer.systems.iter().map(String::as_str).collect();
    systems.insert(BUILTIN);
    let systems: Vec<&str> = systems.into_iter().collect();
    let mut stmts = Vec::with_capacity(systems.len());
    for _ in &systems {
        stmts.push(conn.prepare(READY)?);
    }
    let mut streams = Vec::with_capacity(systems.len());
    for (stmt, system) in stmts.iter_mut().zip(&systems) {
        streams.push(stmt.query(params![system, now])?);
    }
    let mut heads = Vec::with_capacity(systems.len());
    for (rows, system) in streams.iter_mut().zip(&systems) {
        heads.push(next_candidate(rows, system)?);
    }
    // A merge of the per-system streams, each already in order.
    let mut chosen = Vec::new();
    while chosen.len() < slots {
        let best = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|c| (i, c.rank())))
            .max_by_key(|&(_, rank)| rank)
            .map(|(i, _)| i);
        let Some(i) = best else { break };
        let c = heads[i].take().expect("best is a stream with a head");
        heads[i] = next_candidate(&mut streams[i], systems[i])?;
        if !can_do(&offer.systems, &offer.features, &c) {
            continue;
        }
        // A build that came back from this agent goes elsewhere when
        // another live agent can take it.
        if c.avoid_agent.as_deref() == Some(agent.as_str())
            && others.iter().any(|o| can_do(&o.systems, &o.features, &c))
        {
            continue;
        }
        chosen.push(c);
    }
    Ok(chosen)
}

/// See [`Datastore::allocate`](crate::coordinator::datastore::Datastore::allocate).
pub(super) fn allocate(
    conn: &Connection,
    agent: &AgentId,
    offer: &AgentOffer,
    lease_secs: i64,
    now: i64,
) -> Result<Vec<Allocation>, DatastoreError> {
    let enabled = agents::record_offer(conn, agent, offer, now)?;
    let slots = usize::try_from(offer.free_slots).unwrap_or(0);
    if !enabled || slots == 0 {
        return Ok(Vec::new());
    }
    let others = agents::others_seen_since(conn, agent, now.saturating_sub(lease_secs))?;
    let chosen = choose(conn, agent, offer, &others, slots, now)?;
    let deadline = now.saturating_add(lease_secs);
    let mut lease = conn.prepare_cached(
        "update builds set state = 'allocated', agent = ?2, lease_deadline = ?3, started_at = null \
         where id = ?1",
    )?;
    let mut out = Vec::with_capacity(chosen.len());
    for c in chosen {
        lease.execute(params![c.id, agent.as_str(), deadline])?;
        out.push(rows::allocation(conn, c.id, &c.drv, deadline)?);
    }
    if !out.is_empty() {
        tracing::debug!(agent = %agent, builds = out.len(), "datastore: allocated");
    }
    Ok(out)
}

/// The builds leased to `agent` now.
pub(super) fn leases(conn: &Connection, agent: &AgentId) -> Result<Vec<Allocation>, DatastoreError> {
    agents::require(conn, agent)?;
    let mut stmt = conn.prepare_cached(
        "select id, drv, lease_deadline from builds where state = 'allocated' and agent = ?1 \
         order by id",
    )?;
    let found = stmt
        .query_map(params![agent.as_str()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    found
        .into_iter()
        .map(|(id, drv, deadline)| rows::allocation(conn, id, &drv, deadline))
        .collect()
}

/// The build `id`, if it is leased to `agent`; else `NotLeased`.
fn leased(conn: &Connection, agent: &AgentId, id: BuildId) -> Result<BuildRecord, DatastoreError> {
    let b = rows::build(conn, id)?;
    if b.state == BuildState::Allocated && b.agent.as_ref() == Some(agent) {
        Ok(b)
    } else {
        Err(DatastoreError::NotLeased {
            id,
            agent: agent.clone(),
        })
    }
}

/// Extends the leases still held; returns the builds that are not.
pub(super) fn heartbeat(
    conn: &Connection,
    agent: &AgentId,
    builds: &[BuildId],
    lease_secs: i64,
    now: i64,
) -> Result<Vec<BuildId>, DatastoreError> {
    agents::touch(conn, agent, now)?;
    let mut extend = conn.prepare_cached(
        "update builds set lease_deadline = ?3 where id = ?1 and state = 'allocated' and agent = ?2",
    )?;
    let deadline = now.saturating_add(lease_secs);
    let mut lost = Vec::new();
    for &id in builds {
        if extend.execute(params![id.get(), agent.as_str(), deadline])? == 0 {
            lost.push(id);
        }
    }
    Ok(lost)
}

/// Marks a leased build started, the first time.
pub(super) fn start(conn: &Connection, agent: &AgentId, id: BuildId, now: i64) -> Result<(), DatastoreError> {
    leased(conn, agent, id)?;
    conn.execute(
        "update builds set started_at = ?2 where id = ?1 and started_at is null",
        params![id.get(), now],
    )?;
    Ok(())
}

/// Records paths in the cache index (a path stored again replaces its
/// entry: the newer upload is the one on disk).
pub(super) fn cache_add(conn: &Connection, paths: &[CachedPath]) -> Result<(), DatastoreError> {
    let mut stmt = conn.prepare_cached(
        "insert into cache_paths (path, nar_hash, nar_size, refs, deriver, url, file_size) \
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
         on conflict (path) do update set nar_hash = excluded.nar_hash, \
         nar_size = excluded.nar_size, refs = excluded.refs, deriver = excluded.deriver, \
         url = excluded.url, file_size = excluded.file_size",
    )?;
    for p in paths {
        let size = |what: &str, n: u64| {
            i64::try_from(n).map_err(|_| DatastoreError::Corrupt(format!("{what} {n} of '{}'", p.path)))
        };
        stmt.execute(params![
            p.path,
            p.nar_hash,
            size("nar size", p.nar_size)?,
            to_json(&p.references)?,
            p.deriver,
            p.url,
            size("file size", p.file_size)?,
        ])?;
    }
    Ok(())
}

/// A leased build succeeded: outputs into the cache index, dependents
/// stop waiting for it.
pub(super) fn succeed(
    conn: &Connection,
    agent: &AgentId,
    id: BuildId,
    outputs: &[CachedPath],
    now: i64,
) -> Result<(), DatastoreError> {
    leased(conn, agent, id)?;
    cache_add(conn, outputs)?;
    conn.execute(
        "update builds set state = 'succeeded', finished_at = ?2, lease_deadline = null, \
         message = null where id = ?1",
        params![id.get(), now],
    )?;
    conn.execute(
        "update builds set waiting_on = waiting_on - 1 \
         where id in (select build from build_deps where dependency = ?1)",
        params![id.get()],
    )?;
    conn.execute("delete from build_deps where dependency = ?1", params![id.get()])?;
    Ok(())
}

/// Fails `b` for good and everything waiting for it.
fn fail(conn: &Connection, b: &BuildRecord, message: &str, now: i64) -> Result<(), DatastoreError> {
    let dependents = graph::end_with_dependents(
        conn,
        b.id.get(),
        BuildState::Failed.as_str(),
        Some(message),
        &format!("dependency failed: {}", b.drv),
        now,
    )?;
    tracing::info!(build = %b.id, drv = %b.drv, dependents = dependents.len(), message, "datastore: build failed");
    Ok(())
}

/// The wait before the attempt after `attempts` infrastructure failures:
/// `base * 3^(attempts-1)`, at most `max`.
pub(super) fn backoff(policy: &RetryPolicy, attempts: i64) -> i64 {
    let exponent = u32::try_from(attempts.saturating_sub(1).max(0)).unwrap_or(u32::MAX);
    3_i64
        .checked_pow(exponent)
        .and_then(|f| policy.base_secs.checked_mul(f))
        .map_or(policy.max_secs, |wait| wait.min(policy.max_secs))
}

/// An infrastructure failure of `b` on `agent`: requeued with backoff,
/// away from that agent, or failed past the policy's attempts.
fn infrastructure(
    conn: &Connection,
    b: &BuildRecord,
    agent: &AgentId,
    message: &str,
    policy: &RetryPolicy,
    now: i64,
) -> Result<(), DatastoreError> {
    let attempts = b.attempts.saturating_add(1);
    if attempts >= policy.max_attempts {
        conn.execute("update builds set attempts = ?2 where id = ?1", params![b.id.get(), attempts])?;
        let message = format!("gave up after {attempts} infrastructure failures: {message}");
        return fail(conn, b, &message, now);
    }
    let next = now.saturating_add(backoff(policy, attempts));
    conn.execute(
        "update builds set state = 'queued', attempts = ?2, next_attempt_at = ?3, avoid_agent = ?4, \
         message = ?5, lease_deadline = null, started_at = null where id = ?1",
        params![b.id.get(), attempts, next, agent.as_str(), message],
    )?;
    tracing::info!(build = %b.id, agent = %agent, attempts, retry_at = next, message, "datastore: build requeued");
    Ok(())
}

/// A leased build came back without a result.
pub(super) fn setback(
    conn: &Connection,
    agent: &AgentId,
    id: BuildId,
    setback: &Setback,
    policy: &RetryPolicy,
    now: i64,
) -> Result<BuildRecord, DatastoreError> {
    let b = leased(conn, agent, id)?;
    match setback {
        Setback::BuildFailure { message } => fail(conn, &b, message, now)?,
        Setback::Infrastructure { message } => infrastructure(conn, &b, agent, message, policy, now)?,
    }
    rows::build(conn, id)
}

/// Requeues (or fails) every build whose lease ended before `now`.
pub(super) fn expire(conn: &Connection, policy: &RetryPolicy, now: i64) -> Result<Vec<BuildId>, DatastoreError> {
    let mut stmt = conn.prepare_cached(
        "select id from builds where state = 'allocated' and lease_deadline < ?1 order by id",
    )?;
    let ids = stmt
        .query_map(params![now], |r| r.get::<_, i64>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let b = rows::build(conn, rows::build_id(id)?)?;
        let agent = b
            .agent
            .clone()
            .ok_or_else(|| DatastoreError::Corrupt(format!("allocated build {id} has no agent")))?;
        infrastructure(conn, &b, &agent, &format!("lease expired on agent {agent}"), policy, now)?;
        out.push(b.id);
    }
    Ok(out)
}
