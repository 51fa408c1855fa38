//! Handing builds to agents and taking their results back: allocation,
//! leases and heartbeats, success, setbacks with backoff, lease expiry.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::agents::{self, Seen};
use super::rows::{self, from_json, to_json};
use super::{events, graph};
use crate::coordinator::datastore::sql::{args, Row, Sql};
use crate::coordinator::datastore::{Allocation, DatastoreError, RetryPolicy};
use crate::coordinator::model::{
    AgentId, AgentOffer, BuildId, BuildRecord, BuildState, CachedPath, EventKind, Setback,
};

/// The system every agent can build (Nix's `systemSupported`).
use crate::coordinator::model::{agent_can_build, BUILTIN_SYSTEM as BUILTIN};

/// The feature sets (JSON) of the ready builds of one system, each found
/// by one seek in `builds_ready` (a loose index scan: SQLite and
/// PostgreSQL would otherwise read every entry to answer `distinct`).
pub const FEATURE_SETS: &str = "with recursive sets(f) as ( \
    select min(required_features) from builds \
    where system = ?1 and state = 'queued' and waiting_on = 0 and held_until is null \
    union all \
    select (select min(required_features) from builds \
        where system = ?1 and state = 'queued' and waiting_on = 0 and held_until is null \
        and required_features > sets.f) \
    from sets where sets.f is not null) \
    select f from sets where f is not null";

/// Ready builds of one system and feature set, best first: a walk of
/// `builds_ready` without sorting (the conditions imply the index's),
/// stopped after `?3` rows.
pub const READY: &str = "select id, effective_priority, critical_path, avoid_agent, drv \
    from builds \
    where system = ?1 and required_features = ?2 \
    and state = 'queued' and waiting_on = 0 and held_until is null \
    order by effective_priority desc, critical_path desc, id asc limit ?3";

/// Where a candidate stands in the allocation order (higher first).
type Rank = (i64, i64, Reverse<i64>);

/// A ready build considered for an agent.
#[derive(Clone)]
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
    fn rank(&self) -> Rank {
        (self.eff, self.cp, Reverse(self.id))
    }
}

fn candidate(r: &Row, stream: usize) -> Result<Candidate, DatastoreError> {
    Ok(Candidate {
        id: r.get(0)?,
        eff: r.get(1)?,
        cp: r.get(2)?,
        avoid_agent: r.get(3)?,
        drv: r.get(4)?,
        stream,
    })
}

/// The ready builds of one kind, best first, read a page at a time: the
/// first page is as long as the agent's free slots, which is all an
/// allocation reads unless it skips builds (the `avoid_agent` rule).
struct Stream {
    kind: usize,
    page: Vec<Candidate>,
    next: usize,
    limit: usize,
}

impl Stream {
    fn new(
        conn: &dyn Sql,
        kinds: &[Kind],
        kind: usize,
        limit: usize,
    ) -> Result<Stream, DatastoreError> {
        let mut s = Stream {
            kind,
            page: Vec::new(),
            next: 0,
            limit,
        };
        s.read(conn, kinds)?;
        Ok(s)
    }

    fn read(&mut self, conn: &dyn Sql, kinds: &[Kind]) -> Result<(), DatastoreError> {
        let k = &kinds[self.kind];
        let limit = i64::try_from(self.limit).unwrap_or(i64::MAX);
        self.page = conn
            .query(
                READY,
                args![k.system.as_str(), k.features_json.as_str(), limit],
            )?
            .iter()
            .map(|r| candidate(r, self.kind))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// The best build not taken yet.
    fn head(
        &mut self,
        conn: &dyn Sql,
        kinds: &[Kind],
    ) -> Result<Option<&Candidate>, DatastoreError> {
        if self.next == self.page.len() && self.page.len() == self.limit {
            // A full page used up: read a longer one. Nothing was written
            // since the last read (leases are written once all are chosen),
            // so its first rows are the ones already taken.
            self.limit = self.limit.saturating_mul(4);
            self.read(conn, kinds)?;
        }
        Ok(self.page.get(self.next))
    }
}

/// Builds of one system and feature set.
struct Kind {
    system: String,
    features_json: String,
    features: BTreeSet<String>,
}

/// The kinds of ready builds the offer can do.
fn kinds(conn: &dyn Sql, offer: &AgentOffer) -> Result<Vec<Kind>, DatastoreError> {
    let mut systems: BTreeSet<&str> = offer.systems.iter().map(String::as_str).collect();
    systems.insert(BUILTIN);
    let mut out = Vec::new();
    for system in systems {
        let sets: Vec<String> = conn.column(FEATURE_SETS, args![system])?;
        for features_json in sets {
            let kind = Kind {
                system: system.to_owned(),
                features: from_json("builds.required_features", &features_json)?,
                features_json,
            };
            if agent_can_build(
                &offer.systems,
                &offer.features,
                &offer.mandatory_features,
                &kind.system,
                &kind.features,
            ) {
                out.push(kind);
            }
        }
    }
    Ok(out)
}

/// The ready builds `agent` should get, best first, at most `slots`.
fn choose(
    conn: &dyn Sql,
    agent: &AgentId,
    offer: &AgentOffer,
    others: &[Seen],
    slots: usize,
) -> Result<Vec<Candidate>, DatastoreError> {
    let kinds = kinds(conn, offer)?;
    let mut streams = (0..kinds.len())
        .map(|k| Stream::new(conn, &kinds, k, slots))
        .collect::<Result<Vec<_>, _>>()?;
    // A merge of the streams, each already in order.
    let mut chosen = Vec::new();
    while chosen.len() < slots {
        let mut best: Option<(usize, Rank)> = None;
        for (i, s) in streams.iter_mut().enumerate() {
            if let Some(c) = s.head(conn, &kinds)? {
                if best.as_ref().is_none_or(|(_, rank)| c.rank() > *rank) {
                    best = Some((i, c.rank()));
                }
            }
        }
        let Some((i, _)) = best else { break };
        let s = &mut streams[i];
        let c = s.page[s.next].clone();
        s.next += 1;
        // A build that came back from this agent goes elsewhere when
        // another live agent can take it (other agents' mandatory features
        // are not kept: they count as none).
        let kind = &kinds[c.stream];
        if c.avoid_agent.as_deref() == Some(agent.as_str())
            && others.iter().any(|o| {
                agent_can_build(
                    &o.systems,
                    &o.features,
                    &BTreeSet::new(),
                    &kind.system,
                    &kind.features,
                )
            })
        {
            continue;
        }
        chosen.push(c);
    }
    Ok(chosen)
}

/// See [`Datastore::allocate`](crate::coordinator::datastore::Datastore::allocate).
pub(super) fn allocate(
    conn: &dyn Sql,
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
    conn.execute(
        "update builds set held_until = null where held_until <= ?1",
        args![now],
    )?;
    let others = agents::others_seen_since(conn, agent, now.saturating_sub(lease_secs))?;
    let chosen = choose(conn, agent, offer, &others, slots)?;
    let deadline = now.saturating_add(lease_secs);
    let mut out = Vec::with_capacity(chosen.len());
    for c in chosen {
        conn.execute(
            "update builds set state = 'allocated', agent = ?2, lease_deadline = ?3, \
             started_at = null where id = ?1",
            args![c.id, agent.as_str(), deadline],
        )?;
        out.push(rows::allocation(conn, c.id, &c.drv, deadline)?);
    }
    if !out.is_empty() {
        tracing::debug!(agent = %agent, builds = out.len(), "datastore: allocated");
    }
    Ok(out)
}

/// The builds leased to `agent` now.
pub(super) fn leases(conn: &dyn Sql, agent: &AgentId) -> Result<Vec<Allocation>, DatastoreError> {
    agents::require(conn, agent)?;
    conn.query(
        "select id, drv, lease_deadline from builds where state = 'allocated' and agent = ?1 \
         order by id",
        args![agent.as_str()],
    )?
    .iter()
    .map(|r| rows::allocation(conn, r.get(0)?, &r.get::<String>(1)?, r.get(2)?))
    .collect()
}

/// The build `id`, if it is leased to `agent`; else `NotLeased`.
fn leased(conn: &dyn Sql, agent: &AgentId, id: BuildId) -> Result<BuildRecord, DatastoreError> {
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
    conn: &dyn Sql,
    agent: &AgentId,
    builds: &[BuildId],
    lease_secs: i64,
    now: i64,
) -> Result<Vec<BuildId>, DatastoreError> {
    agents::touch(conn, agent, now)?;
    let deadline = now.saturating_add(lease_secs);
    let mut lost = Vec::new();
    for &id in builds {
        let extended = conn.execute(
            "update builds set lease_deadline = ?3 \
             where id = ?1 and state = 'allocated' and agent = ?2",
            args![id.get(), agent.as_str(), deadline],
        )?;
        if extended == 0 {
            lost.push(id);
        }
    }
    Ok(lost)
}

/// Marks a leased build started, the first time.
pub(super) fn start(
    conn: &dyn Sql,
    agent: &AgentId,
    id: BuildId,
    now: i64,
) -> Result<(), DatastoreError> {
    leased(conn, agent, id)?;
    let first = conn.execute(
        "update builds set started_at = ?2 where id = ?1 and started_at is null",
        args![id.get(), now],
    )?;
    if first == 1 {
        events::build_event(conn, EventKind::BuildStarted, id, now)?;
    }
    Ok(())
}

/// Records paths in the cache index (a path stored again replaces its
/// entry: the newer upload is the one on disk).
pub(super) fn cache_add(conn: &dyn Sql, paths: &[CachedPath]) -> Result<(), DatastoreError> {
    let mut bytes: i64 = 0;
    for p in paths {
        let size = |what: &str, n: u64| {
            i64::try_from(n)
                .map_err(|_| DatastoreError::Corrupt(format!("{what} {n} of '{}'", p.path)))
        };
        conn.execute(
            "insert into cache_paths (path, nar_hash, nar_size, refs, deriver, url, file_size) \
             values (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             on conflict (path) do update set nar_hash = excluded.nar_hash, \
             nar_size = excluded.nar_size, refs = excluded.refs, deriver = excluded.deriver, \
             url = excluded.url, file_size = excluded.file_size",
            args![
                &p.path,
                &p.nar_hash,
                size("nar size", p.nar_size)?,
                to_json(&p.references)?,
                p.deriver.as_deref(),
                &p.url,
                size("file size", p.file_size)?,
            ],
        )?;
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
    conn: &dyn Sql,
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
        args![id.get(), now],
    )?;
    conn.execute(
        "update builds set waiting_on = waiting_on - 1 \
         where id in (select build from build_deps where dependency = ?1)",
        args![id.get()],
    )?;
    conn.execute(
        "delete from build_deps where dependency = ?1",
        args![id.get()],
    )?;
    events::ended(conn, id, now)
}

/// Fails `b` for good and everything waiting for it.
fn fail(conn: &dyn Sql, b: &BuildRecord, message: &str, now: i64) -> Result<(), DatastoreError> {
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
    conn: &dyn Sql,
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
            args![b.id.get(), attempts],
        )?;
        let message = format!("gave up after {attempts} infrastructure failures: {message}");
        return fail(conn, b, &message, now);
    }
    let next = now.saturating_add(backoff(policy, attempts));
    conn.execute(
        "update builds set state = 'queued', attempts = ?2, next_attempt_at = ?3, held_until = ?3, \
         avoid_agent = ?4, message = ?5, lease_deadline = null, started_at = null where id = ?1",
        args![b.id.get(), attempts, next, agent.as_str(), message],
    )?;
    tracing::info!(build = %b.id, agent = %agent, attempts, retry_at = next, message, "datastore: build requeued");
    Ok(())
}

/// A leased build came back without a result.
pub(super) fn setback(
    conn: &dyn Sql,
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
    conn: &dyn Sql,
    policy: &RetryPolicy,
    now: i64,
) -> Result<Vec<BuildId>, DatastoreError> {
    let ids: Vec<i64> = conn.column(
        "select id from builds where state = 'allocated' and lease_deadline < ?1 order by id",
        args![now],
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_triples_up_to_the_maximum() {
        let p = RetryPolicy {
            base_secs: 10,
            max_secs: 3600,
            max_attempts: 100,
        };
        let waits: Vec<i64> = (1..=7).map(|n| backoff(&p, n)).collect();
        assert_eq!(waits, [10, 30, 90, 270, 810, 2430, 3600]);
        assert_eq!(backoff(&p, 99), 3600, "no overflow");
    }
}
