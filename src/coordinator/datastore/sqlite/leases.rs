//! Handing builds to agents and taking their results back: allocation,
//! leases and heartbeats, success, setbacks with backoff, lease expiry.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use rusqlite::{params, Connection, Rows};

use super::agents::{self, Seen};
use super::rows::{self, from_json, to_json};
use super::{events, graph};
use crate::coordinator::datastore::{Allocation, DatastoreError, RetryPolicy};
use crate::coordinator::model::{
    AgentId, AgentOffer, BuildId, BuildRecord, BuildState, CachedPath, EventKind, Setback,
};

/// The system every agent can build (Nix's `systemSupported`).
const BUILTIN: &str = "builtin";

/// The feature sets (JSON) of the ready builds of one system, each found
/// by one seek in `builds_ready` (a loose index scan: SQLite and
/// PostgreSQL would otherwise read every entry to answer `distinct`).
pub(super) const FEATURE_SETS: &str = "with recursive sets(f) as ( \
    select min(required_features) from builds \
    where system = ?1 and state = 'queued' and waiting_on = 0 and held_until is null \
    union all \
    select (select min(required_features) from builds \
        where system = ?1 and state = 'queued' and waiting_on = 0 and held_until is null \
        and required_features > sets.f) \
    from sets where sets.f is not null) \
    select f from sets where f is not null";

/// Ready builds of one system and feature set, best first: a walk of
/// `builds_ready` without sorting (the conditions imply the index's).
pub(super) const READY: &str = "select id, effective_priority, critical_path, avoid_agent, drv \
    from builds \
    where system = ?1 and required_features = ?2 \
    and state = 'queued' and waiting_on = 0 and held_until is null \
    order by effective_priority desc, critical_path desc, id asc";

/// A ready build considered for an agent.
struct Candidate {
    id: i64,
    eff: i64,
    cp: i64,
    avoid_agent: Option<String>,
    drv: String,
    /// Which stream it came from.
    stream: usize,
}

impl Candidate {
    /// The allocation order: priority, then critical path, then age.
    fn rank(&self) -> (i64, i64, Reverse<i64>) {
        (self.eff, self.cp, Reverse(self.id))
    }
}

fn next_candidate(rows: &mut Rows<'_>, stream: usize) -> Result<Option<Candidate>, DatastoreError> {
    let Some(r) = rows.next()? else {
        return Ok(None);
    };
    Ok(Some(Candidate {
        id: r.get(0)?,
        eff: r.get(1)?,
        cp: r.get(2)?,
        avoid_agent: r.get(3)?,
        drv: r.get(4)?,
        stream,
    }))
}

/// Builds of one system and feature set.
struct Kind {
    system: String,
    features_json: String,
    features: BTreeSet<String>,
}

/// Whether an agent offering `systems` and `features` can build a kind:
/// the rule of `decide::assess` (a system of its own or `builtin`, every
/// required feature offered; mandatory features, which only SSH workers
/// declare, are checked by `kinds`).
fn can_do(systems: &BTreeSet<String>, features: &BTreeSet<String>, k: &Kind) -> bool {
    (k.system == BUILTIN || systems.contains(&k.system)) && k.features.is_subset(features)
}

/// The kinds of ready builds the offer can do.
fn kinds(conn: &Connection, offer: &AgentOffer) -> Result<Vec<Kind>, DatastoreError> {
    let mut systems: BTreeSet<&str> = offer.systems.iter().map(String::as_str).collect();
    systems.insert(BUILTIN);
    let mut stmt = conn.prepare_cached(FEATURE_SETS)?;
    let mut out = Vec::new();
    for system in systems {
        let sets = stmt
            .query_map(params![system], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        for features_json in sets {
            let kind = Kind {
                system: system.to_owned(),
                features: from_json("builds.required_features", &features_json)?,
                features_json,
            };
            // Mandatory features (SSH workers): only builds that ask.
            let wanted = offer.mandatory_features.is_subset(&kind.features);
            if wanted && can_do(&offer.systems, &offer.features, &kind) {
                out.push(kind);
            }
        }
    }
    Ok(out)
}

/// The ready builds `agent` should get, best first, at most `slots`.
fn choose(
    conn: &Connection,
    agent: &AgentId,
    offer: &AgentOffer,
    others: &[Seen],
    slots: usize,
) -> Result<Vec<Candidate>, DatastoreError> {
    let kinds = kinds(conn, offer)?;
    let mut stmts = Vec::with_capacity(kinds.len());
    for _ in &kinds {
        stmts.push(conn.prepare(READY)?);
    }
    let mut streams = Vec::with_capacity(kinds.len());
    for (stmt, k) in stmts.iter_mut().zip(&kinds) {
        streams.push(stmt.query(params![k.system, k.features_json])?);
    }
    let mut heads = Vec::with_capacity(kinds.len());
    for (i, rows) in streams.iter_mut().enumerate() {
        heads.push(next_candidate(rows, i)?);
    }
    // A merge of the streams, each already in order.
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
        heads[i] = next_candidate(&mut streams[i], i)?;
        // A build that came back from this agent goes elsewhere when
        // another live agent can take it.
        if c.avoid_agent.as_deref() == Some(agent.as_str())
            && others
                .iter()
                .any(|o| can_do(&o.systems, &o.features, &kinds[c.stream]))
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
    // Builds whose defer time or backoff has passed join the ready index.
    conn.prepare_cached("update builds set held_until = null where held_until <= ?1")?
        .execute(params![now])?;
    let others = agents::others_seen_since(conn, agent, now.saturating_sub(lease_secs))?;
    let chosen = choose(conn, agent, offer, &others, slots)?;
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
pub(super) fn leases(
    conn: &Connection,
    agent: &AgentId,
) -> Result<Vec<Allocation>, DatastoreError> {
    agents::require(conn, agent)?;
    let mut stmt = conn.prepare_cached(
        "select id, drv, lease_deadline from builds where state = 'allocated' and agent = ?1 \
         order by id",
    )?;
    let found = stmt
        .query_map(params![agent.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
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
pub(super) fn start(
    conn: &Connection,
    agent: &AgentId,
    id: BuildId,
    now: i64,
) -> Result<(), DatastoreError> {
    leased(conn, agent, id)?;
    let first = conn.execute(
        "update builds set started_at = ?2 where id = ?1 and started_at is null",
        params![id.get(), now],
    )?;
    if first == 1 {
        events::build_event(conn, EventKind::BuildStarted, id, now)?;
    }
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
    let mut bytes: i64 = 0;
    for p in paths {
        let size = |what: &str, n: u64| {
            i64::try_from(n)
                .map_err(|_| DatastoreError::Corrupt(format!("{what} {n} of '{}'", p.path)))
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
        bytes = bytes.saturating_add(size("file size", p.file_size)?);
    }
    // Every path enters the cache through here (client uploads and build
    // outputs alike), so this counts the compressed bytes the cache took.
    if bytes > 0 {
        events::bump(conn, "bytes_uploaded", bytes)?;
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
    conn.execute(
        "delete from build_deps where dependency = ?1",
        params![id.get()],
    )?;
    events::ended(conn, id, now)
}

/// Fails `b` for good and everything waiting for it.
fn fail(conn: &Connection, b: &BuildRecord, message: &str, now: i64) -> Result<(), DatastoreError> {
    let dependents = graph::end_with_dependents(
        conn,
        b.id.get(),
        BuildState::Failed.as_str(),
        Some(message),
        &format!("dependency failed: {}", b.drv),
        Some(&b.drv),
        now,
    )?;
    tracing::info!(build = %b.id, drv = %b.drv, dependents = dependents.len(), message, "datastore: build failed");
    events::ended(conn, b.id, now)?;
    for d in dependents {
        events::ended(conn, rows::build_id(d)?, now)?;
    }
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
        conn.execute(
            "update builds set attempts = ?2 where id = ?1",
            params![b.id.get(), attempts],
        )?;
        let message = format!("gave up after {attempts} infrastructure failures: {message}");
        return fail(conn, b, &message, now);
    }
    let next = now.saturating_add(backoff(policy, attempts));
    conn.execute(
        "update builds set state = 'queued', attempts = ?2, next_attempt_at = ?3, held_until = ?3, \
         avoid_agent = ?4, message = ?5, lease_deadline = null, started_at = null where id = ?1",
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
        Setback::Infrastructure { message } => {
            infrastructure(conn, &b, agent, message, policy, now)?
        }
        Setback::MissingInputs { message } => {
            infrastructure(conn, &b, agent, message, policy, now)?;
            // After the requeue (or the final failure), so the event shows
            // the build as it now stands.
            events::build_event(conn, EventKind::BuildMissingInputs, id, now)?;
        }
    }
    rows::build(conn, id)
}

/// Requeues (or fails) every build whose lease ended before `now`.
pub(super) fn expire(
    conn: &Connection,
    policy: &RetryPolicy,
    now: i64,
) -> Result<Vec<BuildId>, DatastoreError> {
    let mut stmt = conn.prepare_cached(
        "select id from builds where state = 'allocated' and lease_deadline < ?1 order by id",
    )?;
    let ids = stmt
        .query_map(params![now], |r| r.get::<_, i64>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(ids.len());
    let mut lost: std::collections::BTreeMap<AgentId, Vec<BuildId>> = Default::default();
    for id in ids {
        let b = rows::build(conn, rows::build_id(id)?)?;
        let agent = b
            .agent
            .clone()
            .ok_or_else(|| DatastoreError::Corrupt(format!("allocated build {id} has no agent")))?;
        infrastructure(
            conn,
            &b,
            &agent,
            &format!("lease expired on agent {agent}"),
            policy,
            now,
        )?;
        lost.entry(agent).or_default().push(b.id);
        out.push(b.id);
    }
    for (agent, builds) in &lost {
        events::agent_lost(conn, agent, builds, now)?;
    }
    Ok(out)
}
